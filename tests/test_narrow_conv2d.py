"""fxeff.ops.narrow_conv2d (a conv with few channels, pixel-vectorised on CPU) against F.conv2d + clamp: random
geometries (strides, padding, dilation, kernels, clamps), memory formats, non-contiguous inputs, dtypes, gradients
(gradcheck and against autograd of the reference), opcheck, FLOPs; that the kernel really runs where it claims
to; fxeff.nn.NarrowConv2d and the rewrite fxeff.nn.narrow.narrow_convs (ReLU fused, outputs equal)."""
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import fxeff  # noqa: F401  (the effconv backend)
from fxeff.nn.narrow import NarrowConv2d, gains, narrow_convs
from fxeff.ops import narrow_conv2d
from fxeff.ops.focused_conv2d import direct_strategy_available

needs_kernel = pytest.mark.skipif(not direct_strategy_available(), reason="the CPU kernel needs AVX-512")


def expected(x, weight, bias, stride, padding, dilation, lo=None, hi=None, residual=None):
    out = F.conv2d(x, weight, bias, stride, padding, dilation)
    out = out if residual is None else out + residual
    return out if lo is None and hi is None else out.clamp(lo, hi)


def kernel_ran(fn) -> bool:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(e.name == "fxeff::narrow_conv2d::pixels" for e in prof.events())


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 20), o=st.integers(1, 30), kh=st.sampled_from([1, 2, 3, 5]),
       kw=st.sampled_from([1, 3, 4]), h=st.integers(1, 19), w=st.integers(1, 19), sh=st.integers(1, 3),
       sw=st.integers(1, 3), ph=st.integers(0, 3), pw=st.integers(0, 3), dh=st.integers(1, 2), dw=st.integers(1, 2),
       bias=st.booleans(), clamp=st.sampled_from([(None, None), (0.0, None), (0.0, 6.0), (None, 0.5)]),
       residual=st.booleans())
def test_random_geometries(n, c, o, kh, kw, h, w, sh, sw, ph, pw, dh, dw, bias, clamp, residual):
    if h + 2 * ph - dh * (kh - 1) <= 0 or w + 2 * pw - dw * (kw - 1) <= 0:
        return
    gen = torch.Generator().manual_seed(n * 1000 + c * 31 + o)
    x, weight = torch.randn(n, c, h, w, generator=gen), torch.randn(o, c, kh, kw, generator=gen)
    b = torch.randn(o, generator=gen) if bias else None
    res = torch.randn(F.conv2d(x, weight, None, [sh, sw], [ph, pw], [dh, dw]).shape, generator=gen) if residual \
        else None
    args = (x, weight, b, [sh, sw], [ph, pw], [dh, dw], *clamp, res)
    # the kernel sums in another order than the vendor's: a few ulps of the output's magnitude
    torch.testing.assert_close(narrow_conv2d(*args), expected(*args), rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("geometry, runs", [
    ((16, 3, 3, 1, 1, 1), True),     # a pruned 3x3 conv, stride 1 same width
    ((3, 16, 3, 1, 1, 1), True),
    ((16, 32, 1, 2, 0, 1), True),    # a ResNet downsample shortcut: 1x1 stride 2 (phase planes)
    ((16, 6, 3, 2, 1, 1), True),     # 3x3 stride 2
    ((4, 5, 3, 1, 2, 2), True),      # dilated, same width
    ((4, 5, 3, 1, 0, 1), False),     # stride 1 without padding: taps need columns past the output's width
])
def test_the_kernel_runs_where_it_claims(geometry, runs):
    c, o, k, s, p, d = geometry
    x, weight = torch.randn(2, c, 14, 14), torch.randn(o, c, k, k)
    assert kernel_ran(lambda: narrow_conv2d(x, weight, None, s, p, d)) == runs
    torch.testing.assert_close(narrow_conv2d(x, weight, None, s, p, d), expected(x, weight, None, s, p, d))
    assert not kernel_ran(lambda: narrow_conv2d(x.double(), weight.double(), None, s, p, d))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_memory_formats_non_contiguous_and_dtypes(dtype, device):
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else {}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 11, 13, generator=gen, dtype=dtype).to(device)
    weight = torch.randn(5, 8, 3, 3, generator=gen, dtype=dtype).to(device)
    bias = torch.randn(5, generator=gen, dtype=dtype).to(device)
    for s in (1, 2):
        want = expected(x, weight, bias, s, 1, 1, 0.0)
        for inp, w in ((x, weight), (x.contiguous(memory_format=torch.channels_last), weight),
                       (x, weight.contiguous(memory_format=torch.channels_last)),
                       (torch.cat([x, x], 1)[:, ::2], weight), (x[..., 1:][..., :-1], weight)):
            got = narrow_conv2d(inp, w, bias, s, 1, 1, 0.0)
            torch.testing.assert_close(got, expected(inp, w, bias, s, 1, 1, 0.0), **tol)
            ref = F.conv2d(inp, w, bias, s, 1)
            assert got.is_contiguous(memory_format=torch.channels_last) == \
                ref.is_contiguous(memory_format=torch.channels_last) or got.shape[1] == 1
        torch.testing.assert_close(narrow_conv2d(x, weight, bias, s, 1, 1, 0.0), want, **tol)


def test_nan_and_clamp_edges():
    x = torch.randn(1, 3, 8, 8)
    x[0, 1, 4, 4] = float("nan")
    weight = torch.randn(2, 3, 3, 3)
    torch.testing.assert_close(narrow_conv2d(x, weight, None, 1, 1, 1, 0.0, 1.0),
                               expected(x, weight, None, 1, 1, 1, 0.0, 1.0), equal_nan=True)


@pytest.mark.parametrize("clamp", [(None, None), (0.0, None), (-0.5, 0.5)])
def test_gradients(clamp, device):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 6, 7, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    weight = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    bias = torch.randn(4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    for s in (1, 2):
        torch.autograd.gradcheck(lambda *a: narrow_conv2d(*a, s, 1, 1, *clamp), (x, weight, bias))
    residual = torch.randn(2, 4, 6, 7, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    torch.autograd.gradcheck(lambda x, w, b, r: narrow_conv2d(x, w, b, 1, 1, 1, *clamp, r), (x, weight, bias, residual))
    # float32 (the kernel's forward): the gradients of the reference's autograd
    args = [t.detach().float().requires_grad_() for t in (x, weight, bias)]
    narrow_conv2d(*args, 1, 1, 1, *clamp).square().sum().backward()
    got = [a.grad for a in args]
    ref = [t.detach().float().requires_grad_() for t in (x, weight, bias)]
    expected(*ref, 1, 1, 1, *clamp).square().sum().backward()
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r.grad, rtol=1e-4, atol=1e-4)


def test_opcheck_and_flops(device):
    x, weight, bias = torch.randn(2, 4, 9, 9).to(device), torch.randn(3, 4, 3, 3).to(device), torch.randn(3).to(device)
    for s, clamp in ((1, (0.0, None)), (2, (None, None))):
        torch.library.opcheck(torch.ops.fxeff.narrow_conv2d.default, (x, weight, bias, [s, s], [1, 1], [1, 1], *clamp))
    residual = torch.randn(2, 3, 9, 9).to(device)
    torch.library.opcheck(torch.ops.fxeff.narrow_conv2d.default,
                          (x, weight, bias, [1, 1], [1, 1], [1, 1], 0.0, None, residual))
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as mine:
        narrow_conv2d(x, weight, bias, 2, 1, 1)
    with FlopCounterMode(display=False) as ref:
        F.conv2d(x, weight, bias, 2, 1)
    assert mine.get_total_flops() == ref.get_total_flops() > 0


def test_errors_name_the_op():
    with pytest.raises(RuntimeError, match="fxeff.narrow_conv2d: groups must be 1"):
        narrow_conv2d(torch.randn(1, 4, 5, 5), torch.randn(2, 2, 3, 3))
    with pytest.raises(RuntimeError, match=r"fxeff.narrow_conv2d: residual must have the output's shape"):
        narrow_conv2d(torch.randn(1, 4, 5, 5), torch.randn(2, 4, 3, 3), None, 1, 1, 1, None, None,
                      torch.randn(1, 2, 5, 4))


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(16, 3, 3, padding=1)     # gains: 3 outputs
        self.relu = nn.ReLU(inplace=True)
        self.b = nn.Conv2d(3, 16, 3, padding=1)     # gains: 3 inputs, 16 outputs
        self.c = nn.Conv2d(16, 48, 3, padding=1)    # stays: 16 inputs, 48 outputs
        self.d = nn.Conv2d(48, 32, 3, padding=1, groups=2)  # stays: grouped
        self.e = nn.Conv2d(32, 64, 1, stride=2)     # gains: a strided 1x1 shortcut

    def forward(self, x):
        y = self.relu(self.a(x))
        z = self.b(y)
        return self.e(self.d(F.relu(self.c(z)))), z


def test_narrow_convs_rewrites_fuses_relu_and_keeps_outputs():
    torch.manual_seed(0)
    model = Small().eval()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 16, 12, 12)
    want = model(x)
    keys = set(gm.state_dict())
    count = narrow_convs(gm)
    kinds = {name: type(m).__name__ for name, m in gm.named_children()}
    if not direct_strategy_available():
        assert count == 0
        return
    assert count == 3 and kinds["a"] == kinds["b"] == kinds["e"] == "NarrowConv2d"
    assert kinds["c"] == kinds["d"] == "Conv2d"
    assert gm.a.clamp_min == 0.0 and gm.b.clamp_min is None  # a's ReLU fused (its only reader); b's output is read
    assert not any(n.op == "call_module" and n.target == "relu" for n in gm.graph.nodes)
    assert gm.a.weight is model.a.weight and set(gm.state_dict()) == keys  # the conv's own parameters
    for got, ref in zip(gm(x), want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert "NarrowConv2d(16, 3" in repr(gm)


def test_gains_rule():
    assert not gains(nn.Conv2d(64, 64, 3, padding=1))  # measured slower
    assert not gains(nn.Conv2d(16, 8, 3, padding=1, padding_mode="reflect"))
    assert not gains(nn.Conv2d(16, 8, 3, padding="same"))
    assert not gains(nn.Conv2d(8, 256, 3, padding=1))
    assert not gains(nn.Conv2d(64, 32, 3, stride=2, padding=1))  # measured slower
    assert not gains(nn.Conv2d(16, 8, 3))  # stride 1 without same width: the kernel would not run
    kernel = direct_strategy_available()
    for conv in (nn.Conv2d(256, 8, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1), nn.Conv2d(8, 64, 3, padding=1),
                 nn.Conv2d(128, 256, 1, stride=2), nn.Conv2d(32, 12, 3, stride=2, padding=1)):
        assert gains(conv) == kernel, conv


def test_module_matches_conv_and_compiles():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 3, padding=1, stride=2)
    narrow = NarrowConv2d.from_conv(conv, 0.0)
    fresh = NarrowConv2d(8, 4, 3, stride=2, padding=1, clamp_min=0.0)
    fresh.load_state_dict(conv.state_dict())
    x = torch.randn(3, 8, 10, 10)
    for m in (narrow, fresh):
        torch.testing.assert_close(m(x), F.relu(conv(x)))
    with torch.no_grad():
        compiled = torch.compile(narrow, backend="effconv")
        torch.testing.assert_close(compiled(x), F.relu(conv(x)))
        exported = torch.export.export(narrow, (x,))
        assert any("narrow_conv2d" in str(n.target) for n in exported.graph.nodes)
        torch.testing.assert_close(exported.module()(x), F.relu(conv(x)))
    with pytest.raises(ValueError, match="groups 1"):
        NarrowConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2))


class Residual(nn.Module):
    """A residual block as pruning leaves it: 16 -> 3 -> 16, the input added, then ReLU; and a conv whose output is
    read twice (no fusion)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(16, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 16, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        out = self.relu(self.conv2(self.relu(self.conv1(x))) + x)
        y = self.head(out)
        return y + y.mean()


def test_narrow_convs_fuses_the_residual_add_and_relu():
    torch.manual_seed(0)
    model = Residual().eval()
    x = torch.randn(2, 16, 10, 10)
    want = model(x)
    gm = torch.fx.symbolic_trace(model)
    count = narrow_convs(gm, (x,))
    if not direct_strategy_available():
        assert count == 0
        return
    assert count == 3
    calls = [(n.op, n.target) for n in gm.graph.nodes if n.op in ("call_module", "call_function")]
    # conv1 + ReLU; conv2 + the add of x + ReLU; the head (its output read twice: nothing fused)
    assert [c for c in calls if c[0] == "call_module"] == [("call_module", "conv1"), ("call_module", "conv2"),
                                                           ("call_module", "head")]
    assert gm.conv1.clamp_min == 0.0 and gm.conv2.clamp_min == 0.0 and gm.head.clamp_min is None
    conv2 = next(n for n in gm.graph.nodes if n.target == "conv2")
    assert conv2.args[1].op == "placeholder"  # x is the residual
    torch.testing.assert_close(gm(x), want, rtol=1e-5, atol=1e-5)
    # without shapes (no example inputs) the add is not fused: only the ReLUs are
    plain = torch.fx.symbolic_trace(Residual().eval())
    narrow_convs(plain)
    assert sum(n.target is operator.add for n in plain.graph.nodes) == 2


def test_a_conv_called_twice_is_left_alone():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(torch.relu(self.conv(x)))  # fusing the ReLU would clamp the second call too

    model = Twice().eval()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(1, 4, 6, 6)
    assert narrow_convs(gm, (x,)) == 0 and type(gm.conv) is nn.Conv2d
    torch.testing.assert_close(gm(x), model(x))
