"""fxeff.ops.hetconv2d against its contract: F.conv2d with the dense kernel hetconv_dense_weight(...)."""
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fxeff
from fxeff.ops import hetconv2d, hetconv_dense_weight
from fxeff.ops._utils import memory_format_of

# direct: float32 with AVX-512 (NCHW: stride 1; channels_last: any stride, also AVX-512VL), else gemm; direct_cl:
# NCHW float32 through the channels-last direct kernel (AVX-512VL; on channels_last input the same as direct)
STRATEGIES = ["auto", "gemm", "grouped", "direct", "direct_cl"]
# Max error allowed relative to the output's scale.
REL_TOL = {torch.float64: 1e-12, torch.float32: 3e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@contextmanager
def forced(strategy, chunk=0):
    previous = torch.ops.fxeff._hetconv2d_set_strategy(strategy, chunk)
    try:
        yield
    finally:
        torch.ops.fxeff._hetconv2d_set_strategy(previous, 0)


def make(n, m, o, part, k, h, w, dtype=torch.float64, bias=True, gen=None, device="cpu"):
    """Random inputs drawn on the CPU (the same values on every device), then moved to `device`."""
    x = torch.randn(n, m, h, w, dtype=dtype, generator=gen)
    wk = torch.randn(o, m // part, k, k, dtype=dtype, generator=gen)
    w1 = torch.randn(o, m - m // part, dtype=dtype, generator=gen)
    b = torch.randn(o, dtype=dtype, generator=gen) if bias else None
    return tuple(None if t is None else t.to(device) for t in (x, wk, w1, b))


def reference(x, wk, w1, b, part, stride=1, padding=0, dilation=1):
    """The contract, computed in float64 and cast back."""
    dense = hetconv_dense_weight(wk.double(), w1.double(), part)
    out = F.conv2d(x.double(), dense, None if b is None else b.double(), stride, padding, dilation)
    return out.to(x.dtype)


def assert_matches(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    scale = max(1.0, float(ref.double().abs().max()))
    err = float((out.double() - ref.double()).abs().max())
    assert err <= REL_TOL[out.dtype] * scale, f"max abs error {err:g} > {REL_TOL[out.dtype]:g} * {scale:g}"


def test_dense_weight_structure():
    part, o, m, k = 4, 8, 12, 3
    _, wk, w1, _ = make(1, m, o, part, k, 1, 1)
    dense = hetconv_dense_weight(wk, w1, part)
    assert dense.shape == (o, m, k, k)
    mb = m // part
    for j in range(o):
        g = j * part // o
        own = slice(g * mb, (g + 1) * mb)
        assert torch.equal(dense[j, own], wk[j])
        others = [c for c in range(m) if not g * mb <= c < (g + 1) * mb]
        assert torch.equal(dense[j, others, 1, 1], w1[j])
        mask = torch.ones(m, k, k, dtype=torch.bool)
        mask[own] = False
        mask[:, 1, 1] = False
        assert dense[j][mask].abs().sum() == 0  # absent taps are structural zeros


@settings(max_examples=80, deadline=None)
@given(
    strategy=st.sampled_from(STRATEGIES),
    chunk=st.sampled_from([0, 1, 7, 64]),
    n=st.integers(1, 3),
    part=st.sampled_from([1, 2, 3, 4]),
    mpb=st.integers(1, 3),
    opb=st.integers(1, 3),
    k=st.sampled_from([1, 3, 5, 7]),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 4), st.integers(0, 4)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    size=st.tuples(st.integers(5, 16), st.integers(5, 16)),
    bias=st.booleans(),
    channels_last=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_matches_reference(strategy, chunk, n, part, mpb, opb, k, stride, padding, dilation, size, bias,
                           channels_last, dtype):
    h, w = size
    if h + 2 * padding[0] < dilation[0] * (k - 1) + 1 or w + 2 * padding[1] < dilation[1] * (k - 1) + 1:
        return
    gen = torch.Generator().manual_seed(n * 1000 + h * 31 + w)
    x, wk, w1, b = make(n, part * mpb, part * opb, part, k, h, w, dtype=dtype, bias=bias, gen=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with forced(strategy, chunk):
        out = hetconv2d(x, wk, w1, b, part, stride, padding, dilation)
    assert_matches(out, reference(x, wk, w1, b, part, stride, padding, dilation))
    assert out.is_contiguous(memory_format=memory_format_of(x))  # the layout ATen reads from x (ambiguous at 1 channel)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_dtypes(strategy, dtype, channels_last, device):
    x, wk, w1, b = make(2, 16, 8, 4, 3, 9, 11, dtype=dtype, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with forced(strategy):
        out = hetconv2d(x, wk, w1, b, 4, 1, 1)
    assert_matches(out, reference(x, wk, w1, b, 4, 1, 1))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_layer_shapes(strategy, device):
    """The benchmark's layer kinds at a smaller size: 64 channels, P 2..16, batch 1 and 3, both layouts."""
    for part in (2, 4, 8, 16):
        for n in (1, 3):
            for cl in (False, True):
                x, wk, w1, b = make(n, 64, 64, part, 3, 14, 14, dtype=torch.float32, device=device)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                with forced(strategy):
                    out = hetconv2d(x, wk, w1, b, part, 1, 1)
                assert_matches(out, reference(x, wk, w1, b, part, 1, 1))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_non_contiguous_inputs(strategy, device):
    x, wk, w1, b = make(2, 8, 12, 2, 3, 10, 9, device=device)
    xs = torch.randn(2, 16, 20, 9, dtype=torch.float64).to(device)[:, ::2, ::2]  # strided, neither layout
    wkt = wk.transpose(2, 3).contiguous().transpose(2, 3)  # same values, transposed strides
    w1t = w1.t().contiguous().t()
    bs = torch.randn(24, dtype=torch.float64).to(device)[::2]
    with forced(strategy):
        out = hetconv2d(xs, wkt, w1t, bs, 2, 1, 1)
    assert_matches(out, reference(xs, wk, w1, bs, 2, 1, 1))


def test_part_inferred_from_shapes():
    x, wk, w1, b = make(1, 12, 6, 3, 3, 7, 7)
    assert torch.equal(hetconv2d(x, wk, w1, b, padding=1), hetconv2d(x, wk, w1, b, 3, 1, 1))


def test_channels_last_stays_channels_last(device):
    x, wk, w1, b = make(2, 8, 8, 2, 3, 6, 6, device=device)
    out = hetconv2d(x.contiguous(memory_format=torch.channels_last), wk, w1, b, 2, 1, 1)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert hetconv2d(x, wk, w1, b, 2, 1, 1).is_contiguous()


@pytest.mark.parametrize("k,stride,padding,dilation", [(3, 1, 1, 1), (3, 2, 0, 1), (5, 1, 3, 2), (1, 2, 1, 1),
                                                       (3, (2, 1), (2, 0), (1, 2))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck(k, stride, padding, dilation, channels_last, device):
    x, wk, w1, b = make(2, 4, 4, 2, k, 6, 7, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    inputs = [t.requires_grad_() for t in (x, wk, w1, b)]
    assert torch.autograd.gradcheck(lambda *a: hetconv2d(*a, 2, stride, padding, dilation), inputs)


def test_gradients_equal_reference(device):
    """float32 gradients of a bigger layer equal those through the dense kernel (scattered back by autograd)."""
    x, wk, w1, b = make(2, 16, 16, 4, 3, 12, 12, dtype=torch.float32, device=device)
    g = torch.randn(2, 16, 12, 12).to(device)
    ours = [t.clone().requires_grad_() for t in (x, wk, w1, b)]
    hetconv2d(*ours, 4, 1, 1).backward(g)
    ref = [t.clone().requires_grad_() for t in (x, wk, w1, b)]
    F.conv2d(ref[0], hetconv_dense_weight(ref[1], ref[2], 4), ref[3], 1, 1).backward(g)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-4)


def test_no_bias_gets_no_gradient_slot():
    x, wk, w1, _ = make(1, 4, 4, 2, 3, 5, 5)
    wk.requires_grad_()
    hetconv2d(x, wk, w1, None, 2, 1, 1).sum().backward()
    assert wk.grad is not None and w1.grad is None and x.grad is None


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(requires_grad, channels_last, device):
    x, wk, w1, b = make(2, 8, 4, 2, 3, 6, 5, dtype=torch.float32, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = [t.requires_grad_(requires_grad) for t in (x, wk, w1, b)]
    torch.library.opcheck(torch.ops.fxeff.hetconv2d.default, (*args, 2, [1, 1], [1, 1], [1, 1]))
    torch.library.opcheck(torch.ops.fxeff.hetconv2d.default, (args[0], args[1], args[2], None, 2, [2, 1], [0, 2],
                                                              [1, 2]))


class HetLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.wk = torch.nn.Parameter(torch.randn(8, 2, 3, 3))
        self.w1 = torch.nn.Parameter(torch.randn(8, 6))

    def forward(self, x):
        return torch.relu(hetconv2d(x, self.wk, self.w1, None, 4, 1, 1))


def test_stays_one_fx_leaf():
    gm = torch.fx.symbolic_trace(HetLayer())
    calls = [nd for nd in gm.graph.nodes if nd.op == "call_function" and nd.target is not torch.relu]
    # The wrapper is a leaf where fx.wrap patched it; called from elsewhere, the op itself is the leaf.
    assert len(calls) == 1 and calls[0].target in (hetconv2d, torch.ops.fxeff.hetconv2d), calls
    x = torch.randn(1, 8, 5, 5)
    torch.testing.assert_close(gm(x), HetLayer.forward(gm, x))


def test_flop_counter_counts_hetconv_macs():
    n, m, o, part, k, h, w = 2, 16, 8, 4, 3, 10, 10
    x, wk, w1, b = make(n, m, o, part, k, h, w, dtype=torch.float32)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        hetconv2d(x, wk, w1, b, part, 1, 1)
    assert counter.get_total_flops() == n * 2 * o * h * w * (m // part * k * k + m - m // part)


ERRORS = [
    (dict(m=10), "part must divide the input channels"),
    (dict(o=6), "part must divide the output channels"),
    (dict(k=4), "kernel size K must be odd"),
    (dict(wk_shape=(8, 3, 3, 3)), "weight_kxk must be [N, M/part, K, K]"),
    (dict(wk_shape=(8, 2, 3, 5)), "weight_kxk must be [N, M/part, K, K]"),
    (dict(w1_shape=(8, 7)), "weight_1x1 must be [N, M - M/part] = [8, 6]"),
    (dict(part=0), "part must be >= 1, got 0"),
    (dict(bias_shape=(7,)), "bias must be [8]"),
    (dict(wk_dtype=torch.float32), "weight_kxk dtype must equal x dtype"),
    (dict(x_shape=(8, 5, 5)), "x must be 4-D"),
    (dict(stride=[0, 1]), "stride must be >= 1"),
    (dict(size=2, k=5), "is smaller than the dilated kernel"),
]


@pytest.mark.parametrize("changes,message", ERRORS)
def test_bad_input_names_op_and_argument(changes, message):
    m, o, part, k, size = changes.get("m", 8), changes.get("o", 8), changes.get("part", 4), changes.get("k", 3), \
        changes.get("size", 5)
    x = torch.randn(*changes.get("x_shape", (1, m, size, size)), dtype=torch.float64)
    mb = m // part if part > 0 else m
    wk = torch.randn(*changes.get("wk_shape", (o, mb, k, k)), dtype=changes.get("wk_dtype", torch.float64))
    w1 = torch.randn(*changes.get("w1_shape", (o, m - mb)), dtype=torch.float64)
    b = torch.randn(*changes.get("bias_shape", (o,)), dtype=torch.float64)
    with pytest.raises(ValueError) as info:
        torch.ops.fxeff.hetconv2d(x, wk, w1, b, part, changes.get("stride", [1, 1]), [0, 0], [1, 1])
    assert "fxeff.hetconv2d" in str(info.value) and message in str(info.value), str(info.value)


def test_dense_weight_errors_and_wrapper_pairs():
    wk, w1 = torch.randn(8, 2, 3, 3), torch.randn(8, 6)
    with pytest.raises(ValueError, match="hetconv_dense_weight: weight_1x1 must be"):
        hetconv_dense_weight(wk, w1[:, :5], 4)
    with pytest.raises(ValueError, match="hetconv_dense_weight: part must be >= 1"):
        hetconv_dense_weight(wk, w1, 0)
    with pytest.raises(ValueError, match="fxeff.hetconv2d: stride must be an int or 2 ints"):
        hetconv2d(torch.randn(1, 8, 5, 5), wk, w1, None, 4, (1, 1, 1))


def test_strategy_control_validates_and_restores():
    with pytest.raises(ValueError, match="strategy must be one of auto, gemm, grouped, direct, direct_cl"):
        torch.ops.fxeff._hetconv2d_set_strategy("fast", 0)
    with forced("gemm", 5):
        pass
    assert torch.ops.fxeff._hetconv2d_set_strategy("auto", 0) == "auto"


def test_empty_inputs(device):
    x, wk, w1, b = make(0, 4, 4, 2, 3, 5, 5, device=device)
    assert hetconv2d(x, wk, w1, b, 2, 1, 1).shape == (0, 4, 5, 5)
    x, wk, w1, b = make(2, 0, 4, 1, 3, 5, 5, device=device)  # no input channels: the bias alone
    torch.testing.assert_close(hetconv2d(x, wk, w1, b, 1, 1, 1), b.view(1, 4, 1, 1).expand(2, 4, 5, 5))


@pytest.mark.parametrize("k,padding,dilation", [(3, 1, 1), (5, 0, 2), (3, (3, 0), (2, 1)), (7, 2, 1)])
@pytest.mark.parametrize("strategy", ["auto", "direct"])
def test_wide_rows_several_register_blocks(k, padding, dilation, strategy):
    """Rows of 100 outputs (two full 48-pixel blocks and a tail), 12 filters per block (one 8-filter tile and
    single filters), 16 channels per block: the shapes where auto picks the direct kernel."""
    x, wk, w1, b = make(2, 32, 24, 2, k, 9, 100, dtype=torch.float32)
    with forced(strategy):
        out = hetconv2d(x, wk, w1, b, 2, 1, padding, dilation)
    assert_matches(out, reference(x, wk, w1, b, 2, 1, padding, dilation))


# (o, part): filters per block o / part picks how many blocks share a vector (G): >= 16 one block, 4-15 four,
# 2-3 eight, 1 sixteen, halved while above the part (P = 2: two, 8 filters each; P = 3: two, the second group one
# block short); parts that leave the last group of blocks short; filters that do not fill the last vector.
CL_DIRECT_SHAPES = [(32, 2), (48, 1), (40, 2), (16, 2), (24, 2), (12, 3), (16, 4), (32, 4), (24, 4), (20, 5),
                    (36, 6), (16, 8), (24, 8), (6, 3), (16, 16), (10, 10), (17, 17)]


@pytest.mark.parametrize("o,part", CL_DIRECT_SHAPES)
@pytest.mark.parametrize("strategy", ["auto", "direct"])
def test_channels_last_direct_lane_layouts(o, part, strategy):
    """The channels_last direct kernel (auto's pick for float32 channels_last) against the reference at every
    blocks-per-vector layout, with and without bias, 2 channels per block."""
    for bias in (True, False):
        x, wk, w1, b = make(2, 2 * part, o, part, 3, 7, 9, dtype=torch.float32, bias=bias)
        x = x.contiguous(memory_format=torch.channels_last)
        with forced(strategy):
            out = hetconv2d(x, wk, w1, b, part, 1, 1)
        assert_matches(out, reference(x, wk, w1, b, part, 1, 1))
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("k,stride,padding,dilation", [(3, 2, 1, 1), (3, (1, 2), (0, 2), (2, 1)), (5, 1, 2, 1),
                                                       (5, 2, 0, 2), (7, 3, 3, 1), (3, 1, 4, 1)])
@pytest.mark.parametrize("m,o,part", [(64, 64, 4), (16, 16, 4), (24, 12, 3), (16, 16, 2)])
def test_channels_last_direct_geometry(k, stride, padding, dilation, m, o, part):
    """Strides, dilation, padding 0 and padding beyond the kernel's reach, through the padded bands."""
    x, wk, w1, b = make(2, m, o, part, k, 13, 11, dtype=torch.float32)
    x = x.contiguous(memory_format=torch.channels_last)
    with forced("direct"):
        out = hetconv2d(x, wk, w1, b, part, stride, padding, dilation)
    assert_matches(out, reference(x, wk, w1, b, part, stride, padding, dilation))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_channels_last_direct_bands_and_threads(threads):
    """Images split into several bands of rows (each pads its rows again) and more items than threads, handed out
    one at a time; row widths that leave register blocks of every size."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, size, m in [(3, (96, 50), 64), (1, (61, 23), 16), (5, (8, 8), 128)]:
            x, wk, w1, b = make(n, m, m, 4, 3, *size, dtype=torch.float32)
            x = x.contiguous(memory_format=torch.channels_last)
            with forced("direct"):
                out = hetconv2d(x, wk, w1, b, 4, 1, 1)
            assert_matches(out, reference(x, wk, w1, b, 4, 1, 1))
    finally:
        torch.set_num_threads(previous)


def test_channels_last_direct_non_contiguous_and_grad():
    """A channels_last view with gaps (a channel slice) is read through a copy; the op's gradient is unchanged."""
    x, wk, w1, b = make(2, 32, 16, 4, 3, 9, 9, dtype=torch.float32)
    wide = torch.randn(2, 48, 9, 9).contiguous(memory_format=torch.channels_last)
    xs = wide[:, 8:40]
    assert not xs.is_contiguous(memory_format=torch.channels_last)
    with forced("direct"):
        out = hetconv2d(xs, wk, w1, b, 4, 1, 1)
    assert_matches(out, reference(xs, wk, w1, b, 4, 1, 1))
    xg = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    wkg, w1g = wk.clone().requires_grad_(), w1.clone().requires_grad_()
    with forced("direct"):
        hetconv2d(xg, wkg, w1g, b, 4, 1, 1).square().sum().backward()
    xr, wkr, w1r = (t.detach().double().requires_grad_() for t in (xg, wk, w1))
    F.conv2d(xr, hetconv_dense_weight(wkr, w1r, 4), b.double(), 1, 1).square().sum().backward()
    for got, want in ((xg.grad, xr.grad), (wkg.grad, wkr.grad), (w1g.grad, w1r.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(not torch.ops.fxeff._hetconv2d_direct_available(True),
                    reason="the channels_last direct kernel needs AVX-512F and VL")
def test_auto_picks_channels_last_direct():
    """auto runs float32 channels_last through the direct kernel (its profiler scopes), float64 through another, and
    float32 NCHW through it too (direct_cl)."""
    x, wk, w1, b = make(1, 16, 16, 4, 3, 8, 8, dtype=torch.float32)
    x = x.contiguous(memory_format=torch.channels_last)

    def scopes(t):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            hetconv2d(t, wk.to(t.dtype), w1.to(t.dtype), b.to(t.dtype), 4, 1, 1)
        return {e.key for e in prof.key_averages() if e.key.startswith("fxeff::hetconv2d::")}

    with forced("auto"):
        assert {"fxeff::hetconv2d::direct", "fxeff::hetconv2d::direct::pad"} <= scopes(x)
        assert "fxeff::hetconv2d::direct" not in scopes(x.double())
        # NCHW float32 goes through the same kernel (copies in and out) and stays NCHW
        nchw = x.contiguous()
        assert "fxeff::hetconv2d::direct_cl" in scopes(nchw)
        out = hetconv2d(nchw, wk, w1, b, 4, 1, 1)
        assert out.is_contiguous() and not out.is_contiguous(memory_format=torch.channels_last)
        assert_matches(out, reference(nchw, wk, w1, b, 4, 1, 1))


@pytest.mark.skipif(not torch.ops.fxeff._hetconv2d_direct_available(True),
                    reason="the channels_last direct kernel needs AVX-512F and VL")
def test_packed_weights_are_kept_between_inference_calls_and_never_stale():
    """The direct kernel packs a layer's weights once per inference and keeps them (hits); an in-place update (copy_,
    load_state_dict, an optimiser step) packs again, a call that records for autograd packs per call and keeps
    nothing, a new tensor never reuses a freed one's packing, and every output equals the contract."""
    cache = fxeff.ops.hetconv2d_pack_cache
    limit = cache()["limit_mb"]
    cache(clear=True)
    x, wk, w1, b = make(2, 16, 32, 4, 3, 6, 6, dtype=torch.float32)
    x = x.contiguous(memory_format=torch.channels_last)

    def run(*weights):
        got = hetconv2d(x, *weights, 4, 1, 1)
        want = reference(x, *[w.detach() for w in weights], 4, 1, 1)
        assert (got - want).abs().max() <= REL_TOL[torch.float32] * want.abs().max()
        return got

    try:
        with forced("auto"):
            first = run(wk, w1, b)
            start = cache()
            assert start["entries"] == 1 and start["bytes"] > 0 and start["misses"] >= 1
            assert torch.equal(run(wk, w1, b), first)
            after = cache()
            assert after["hits"] == start["hits"] + 1 and after["misses"] == start["misses"]
            # in place: the version counter moves, the weights are packed again and replace the entry
            with torch.no_grad():
                wk.mul_(-2.0)
                b.add_(1.0)
            assert not torch.allclose(run(wk, w1, b), first)
            assert cache()["misses"] == after["misses"] + 1 and cache()["entries"] == 1
            # non-contiguous weights: packed from a contiguous copy, kept under the view's own strides
            wt = wk.transpose(2, 3).contiguous().transpose(2, 3)
            run(wt, w1, b)
            run(wt, w1, b)
            assert cache()["entries"] == 2
            # new tensors, freed between calls (storage addresses get reused): each gets its own packing
            for seed in range(4):
                gen = torch.Generator().manual_seed(seed)
                run(*make(2, 16, 32, 4, 3, 6, 6, dtype=torch.float32, gen=gen)[1:])
            run(wk, w1, b)  # the freed weights' entries are dropped
            assert cache()["entries"] == 2
            # a module: load_state_dict copies in place
            conv = fxeff.nn.HetConv2d(16, 32, 3, 4, padding=1).eval().to(memory_format=torch.channels_last)
            with torch.no_grad():
                y0 = conv(x)
                conv.load_state_dict({"weight_kxk": wk, "weight_1x1": w1, "bias": b})
                torch.testing.assert_close(conv(x), hetconv2d(x, wk, w1, b, 4, 1, 1), rtol=0, atol=0)
                assert not torch.allclose(conv(x), y0)
            # a call that records for autograd packs per call and keeps nothing
            trained = [t.clone().requires_grad_() for t in (wk, w1, b)]
            kept = cache()["entries"]
            run(*trained).sum().backward()
            assert cache()["entries"] == kept and trained[0].grad is not None
            # inference tensors have no version counter: never kept
            with torch.inference_mode():
                frozen = [t.clone() for t in (wk, w1, b)]
            run(*frozen)
            assert cache()["entries"] == kept
            # a change through .data bypasses the version counter: clear=True packs again
            with torch.no_grad():
                before = run(wk, w1, b)
            wk.data.mul_(0.5)
            cache(clear=True)
            assert cache()["entries"] == 0
            assert not torch.allclose(run(wk, w1, b), before)
            # limit 0: nothing kept
            cache(limit_mb=0)
            run(wk, w1, b)
            assert cache()["entries"] == 0
    finally:
        cache(limit_mb=limit, clear=True)
    with pytest.raises(ValueError, match="limit_mb must be >= 0"):
        cache(limit_mb=-1)
