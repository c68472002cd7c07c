"""fxeff.ops.focused_conv2d against the pure-PyTorch reference F.conv2d(...) * mask, for every execution strategy."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

import fxeff
from fxeff.ops import focused_conv2d, forced_strategy, strategy_counters

FORCED = ["dense", "crop", "tiles", "pixels", "auto"]
# Max error allowed relative to the output's scale: a few units in the last place of the dtype.
REL_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# cuDNN may pick Winograd/FFT-like algorithms whose float32 error is a few times larger (TF32 is off in tests).
CUDA_REL_TOL = {**REL_TOL, torch.float32: 2e-5}


def on(device, *tensors):
    """The tensors on `device` (None stays None; the layout and requires_grad are kept)."""
    out = []
    for t in tensors:
        if t is None or t.device.type == device:
            out.append(t)
        else:
            out.append(t.detach().to(device).requires_grad_(t.requires_grad))
    return out


def expected_fn(x, weight, bias, mask, stride=1, padding=0, dilation=1, groups=1):
    """The contract: F.conv2d where the mask is set, 0 elsewhere (computed in float64, cast back)."""
    out = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), stride, padding, dilation,
                   groups)
    return (out * mask[:, None]).to(x.dtype)


def assert_matches(out, ref, dtype, scale_of=None):
    """out == ref within a few units in the last place of the scale of ``scale_of`` (default: ref)."""
    assert out.dtype == ref.dtype == dtype
    assert out.shape == ref.shape
    tol = (CUDA_REL_TOL if out.is_cuda else REL_TOL)[dtype]
    out, ref = out.cpu(), ref.cpu()
    scale = max(1.0, float((ref if scale_of is None else scale_of).cpu().double().abs().max()))
    err = float((out.double() - ref.double()).abs().max())
    assert err <= tol * scale, f"max abs error {err:g} > {tol:g} * {scale:g}"


def random_mask(n, h, w, gen, blobs=2, pixel_fraction=0.05):
    """A different mask per image: a few random rectangles plus scattered single pixels."""
    mask = torch.rand(n, h, w, generator=gen) < pixel_fraction
    for i in range(n):
        for _ in range(blobs):
            y0, x0 = int(torch.randint(0, h, (1,), generator=gen)), int(torch.randint(0, w, (1,), generator=gen))
            bh, bw = int(torch.randint(1, h + 1, (1,), generator=gen)), int(torch.randint(1, w + 1, (1,), generator=gen))
            mask[i, y0:y0 + bh // 2 + 1, x0:x0 + bw // 2 + 1] = True
    return mask


def run(strategy, tile, *args):
    with forced_strategy(strategy, tile):
        return focused_conv2d(*args)


# `device` is a constant per test case (conftest.py), so hypothesis may reuse it across examples.
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    strategy=st.sampled_from(FORCED),
    tile=st.integers(2, 32),
    n=st.integers(1, 3),
    depthwise=st.booleans(),
    groups=st.sampled_from([1, 2]),
    cpg=st.integers(1, 3),
    kernel=st.sampled_from([1, 3, 5]),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    size=st.tuples(st.integers(5, 20), st.integers(5, 20)),
    bias=st.booleans(),
    seed=st.integers(0, 2 ** 16),
)
def test_matches_reference(strategy, tile, n, depthwise, groups, cpg, kernel, stride, padding, dilation, size, bias,
                           seed, device):
    gen = torch.Generator().manual_seed(seed)
    c = groups * cpg
    if depthwise:
        groups, o = c, c
    else:
        o = groups * (1 + seed % 3)
    h, w = size
    if h + 2 * padding < dilation * (kernel - 1) + 1 or w + 2 * padding < dilation * (kernel - 1) + 1:
        return
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(o, c // groups, kernel, kernel, generator=gen, dtype=torch.float64)
    b = torch.randn(o, generator=gen, dtype=torch.float64) if bias else None
    ho = (h + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    mask = random_mask(n, ho, wo, gen)
    args = (x, weight, b, mask, stride, padding, dilation, groups)
    assert_matches(run(strategy, tile, *on(device, x, weight, b, mask), *args[4:]), expected_fn(*args), torch.float64)


direct_cpu = pytest.mark.skipif(not fxeff.ops.direct_strategy_available(),
                                reason="the direct strategy needs an AVX-512 CPU")


# The direct strategy (implicit GEMM, fp32, groups 1) on random geometries, masks and both memory formats.
@direct_cpu
@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 40),
    o=st.integers(1, 80),
    kernel=st.sampled_from([1, 2, 3, 5]),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    size=st.tuples(st.integers(4, 20), st.integers(4, 20)),
    bias=st.booleans(),
    channels_last=st.booleans(),
    depthwise=st.booleans(),
    chunk=st.sampled_from([0, 2, 7]),
    seed=st.integers(0, 2 ** 16),
)
def test_direct_matches_reference(n, c, o, kernel, stride, padding, dilation, size, bias, channels_last, depthwise,
                                  chunk, seed):
    # groups 1 in either format; depthwise (its own kernel) on channels_last inputs.
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    if min(h, w) + 2 * padding < dilation * (kernel - 1) + 1:
        return
    groups = c if depthwise else 1
    if depthwise:
        o, channels_last = c, True
    x = torch.randn(n, c, h, w, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(o, c // groups, kernel, kernel, generator=gen)
    b = torch.randn(o, generator=gen) if bias else None
    ho = (h + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    mask = random_mask(n, ho, wo, gen)
    strategy_counters(reset=True)
    out = run("direct", chunk, x, weight, b, mask, stride, padding, dilation, groups)
    assert strategy_counters(reset=True)["direct"] == (1 if mask.any() else 0)
    if c > 1:  # one channel: both formats are the same strides
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_matches(out, expected_fn(x, weight, b, mask, stride, padding, dilation, groups), torch.float32)


# Wide convs: the direct strategy cuts its reduction into steps (a slice of a tap's channels, or several taps) whose
# weight rows fit L1, and writes channels_last outputs from the last step in place (masked where O is not a whole
# number of its output blocks). These shapes cover channel slices of every block width (16, 32, 64 outputs) and
# steps of several taps.
@direct_cpu
@pytest.mark.parametrize("c,o", [(300, 70), (513, 16), (257, 40), (96, 64), (3, 130), (600, 1)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_direct_reduction_steps(c, o, channels_last):
    # Small integers: every product and partial sum is exact in fp32, so the result must equal the reference exactly
    # (a dropped or doubled term, or a misplaced channel slice, cannot hide in the rounding of 5400-term sums).
    gen = torch.Generator().manual_seed(c * 1000 + o)
    x = torch.randint(-2, 3, (2, c, 9, 7), generator=gen).float()
    weight = torch.randint(-2, 3, (o, c, 3, 3), generator=gen).float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        weight = weight.contiguous(memory_format=torch.channels_last)
    b = torch.randint(-3, 4, (o,), generator=gen).float()
    mask = random_mask(2, 9, 7, gen)
    ref = expected_fn(x, weight, b, mask, 1, 1, 1, 1)
    for chunk in (0, 5, 64):
        out = run("direct", chunk, x, weight, b, mask, 1, 1, 1, 1)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


@direct_cpu
def test_direct_refuses_what_it_does_not_run():
    x, weight, bias, mask = conv_case(torch.float64)
    with pytest.raises(NotImplementedError, match="direct strategy runs fp32 convs with groups == 1"):
        run("direct", 0, x, weight, bias, mask, 1, 1)
    x, weight, bias, mask = conv_case(groups=2, o=6)
    with pytest.raises(NotImplementedError, match="groups 2"):
        run("direct", 0, x, weight, bias, mask, 1, 1, 1, 2)
    x, weight, bias, mask = conv_case(groups=8, o=8)
    with pytest.raises(NotImplementedError, match="or depthwise ones on channels_last inputs.*groups 8, NCHW"):
        run("direct", 0, x, weight, bias, mask, 1, 1, 1, 8)


@pytest.mark.parametrize("strategy", FORCED + ["direct"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fill_is_written_outside_the_mask(strategy, channels_last, dtype, device):
    # fill: each inactive output holds its channel's fill value (the conv, bias included, inside), empty mask too.
    direct_runs = dtype == torch.float32 and device == "cpu" and fxeff.ops.direct_strategy_available()
    if strategy == "direct" and not direct_runs:
        pytest.skip("the direct strategy runs fp32 on an AVX-512 CPU")
    x, weight, bias, mask = conv_case(dtype, o=20)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fill = torch.randn(1, 20, 1, 1).to(dtype)
    for m in (mask, torch.zeros_like(mask), torch.ones_like(mask)):
        out = run(strategy, 0, *on(device, x, weight, bias, m), 1, 1, 1, 1, fill.to(device))
        expected = torch.where(m[:, None], expected_fn(x, weight, bias, m, 1, 1), fill)
        assert_matches(out, expected, dtype)


def test_fill_is_checked():
    x, weight, bias, mask = conv_case()
    with pytest.raises(ValueError, match=r"fill must hold one value per output channel \(6\), got \[5\]"):
        focused_conv2d(x, weight, bias, mask, 1, 1, fill=torch.zeros(5))
    with pytest.raises(ValueError, match="fill dtype must equal x dtype"):
        focused_conv2d(x, weight, bias, mask, 1, 1, fill=torch.zeros(6, dtype=torch.float64))


def gradcheck_case(seed, device):
    """(x, weight, bias, fill, mask): a small float64 conv whose tensors (but the mask) require grad, on device."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 7, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 4, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    fill = torch.randn(1, 5, 1, 1, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = random_mask(2, 7, 7, gen, blobs=1, pixel_fraction=0.2)
    return on(device, x, weight, bias, fill, mask)


@pytest.mark.parametrize("strategy", ["auto", "crop", "tiles", "pixels"])
def test_gradcheck_with_fill(strategy, device):
    # The fill's gradient sums grad_out over the inactive outputs; x, weight and bias see only the active ones.
    x, weight, bias, fill, mask = gradcheck_case(3, device)
    with forced_strategy(strategy):
        assert torch.autograd.gradcheck(lambda x, w, b, f: focused_conv2d(x, w, b, mask, 1, 1, fill=f),
                                        (x, weight, bias, fill), fast_mode=True)
    torch.library.opcheck(torch.ops.fxeff.focused_conv2d.default,
                          (x, weight, bias, mask, [1, 1], [1, 1], [1, 1], 1, fill))


# (clamp_min, clamp_max) of the activation epilogue: ReLU, ReLU6, Hardtanh, an upper bound alone, a positive floor
# (the inactive outputs' zero is clamped too).
CLAMPS = [(0.0, None), (0.0, 6.0), (-0.5, 0.25), (None, 0.1), (0.2, None)]


epilogue_cases = pytest.mark.parametrize("strategy, channels_last, dtype, depthwise", [
    (strategy, channels_last, dtype, depthwise) for strategy in FORCED + ["direct"] for channels_last in (False, True)
    for dtype in (torch.float32, torch.float64, torch.bfloat16) for depthwise in (False, True)])


def epilogue_case(strategy, channels_last, dtype, depthwise, device):
    """(x, weight, bias, mask, groups, fill) of a 16-channel conv (depthwise or to 20 outputs) with outputs well
    beyond the clamps' bounds; skips what the direct strategy does not run."""
    direct_runs = dtype == torch.float32 and device == "cpu" and fxeff.ops.direct_strategy_available()
    if strategy == "direct" and (not direct_runs or (depthwise and not channels_last)):
        pytest.skip("the direct strategy runs fp32 on an AVX-512 CPU (depthwise: channels_last)")
    groups = 16 if depthwise else 1
    x, weight, bias, mask = conv_case(dtype, c=16, o=16 if depthwise else 20, groups=groups)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, weight * 3, bias, mask, groups, torch.randn(1, weight.shape[0], 1, 1).to(dtype)


@epilogue_cases
def test_clamp_epilogue_equals_clamp_of_the_output(strategy, channels_last, dtype, depthwise, device):
    # out == torch.clamp(the focused conv's output with its fill, clamp_min, clamp_max), every mask, with and
    # without a fill, both bounds or one.
    x, weight, bias, mask, groups, fill = epilogue_case(strategy, channels_last, dtype, depthwise, device)
    for m in (mask, torch.zeros_like(mask), torch.ones_like(mask)):
        for lo, hi in CLAMPS:
            for f in (None, fill):
                out = run(strategy, 0, *on(device, x, weight, bias, m), 1, 1, 1, groups,
                          None if f is None else f.to(device), lo, hi)
                dense = expected_fn(x, weight, bias, m, 1, 1, 1, groups)
                expected = (dense if f is None else torch.where(m[:, None], dense, f)).clamp(lo, hi)
                assert_matches(out, expected, dtype, scale_of=dense)  # the error is the conv's, before the clamp
                assert out.is_contiguous(memory_format=torch.channels_last if channels_last else
                                         torch.contiguous_format)


@epilogue_cases
def test_residual_epilogue_adds_before_the_clamp(strategy, channels_last, dtype, depthwise, device):
    # out == clamp(the focused conv's output with its fill + residual), the residual in either layout.
    x, weight, bias, mask, groups, fill = epilogue_case(strategy, channels_last, dtype, depthwise, device)
    residual = (torch.randn(x.shape[0], weight.shape[0], x.shape[2], x.shape[3]) * 4).to(dtype)
    for res in (residual, residual.contiguous(memory_format=torch.channels_last)):
        for m in (mask, torch.zeros_like(mask), torch.ones_like(mask)):
            for lo, hi in ((None, None), (0.0, None), (-0.5, 0.25)):
                for f in (None, fill):
                    out = run(strategy, 0, *on(device, x, weight, bias, m), 1, 1, 1, groups,
                              None if f is None else f.to(device), lo, hi, res.to(device))
                    dense = expected_fn(x, weight, bias, m, 1, 1, 1, groups)
                    expected = (dense if f is None else torch.where(m[:, None], dense, f)) + res
                    expected = expected if lo is None and hi is None else expected.clamp(lo, hi)
                    assert_matches(out, expected, dtype, scale_of=dense)


def test_residual_is_checked_and_gets_its_gradient():
    x, weight, bias, mask = conv_case(torch.float64, n=2, c=4, o=5, hw=7)
    with pytest.raises(ValueError, match=r"residual must be the output's shape \[2, 5, 7, 7\], got \[2, 5, 7, 6\]"):
        focused_conv2d(x, weight, bias, mask, 1, 1, residual=torch.zeros(2, 5, 7, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="residual dtype must equal x dtype"):
        focused_conv2d(x, weight, bias, mask, 1, 1, residual=torch.zeros(2, 5, 7, 7))
    residual = torch.randn(2, 5, 7, 7, dtype=torch.float64, requires_grad=True)
    fill = torch.randn(5, dtype=torch.float64, requires_grad=True)
    x, weight, bias = (t.requires_grad_() for t in (x, weight, bias))
    assert torch.autograd.gradcheck(
        lambda x, w, b, f, r: focused_conv2d(x, w, b, mask, 1, 1, fill=f, clamp_min=-0.2, residual=r),
        (x, weight, bias, fill, residual), fast_mode=True)
    torch.library.opcheck(torch.ops.fxeff.focused_conv2d.default,
                          (x, weight, bias, mask, [1, 1], [1, 1], [1, 1], 1, fill, 0.0, None, residual))


def test_clamp_epilogue_keeps_nan_and_is_checked():
    x, weight, bias, mask = conv_case()
    x[0, :, 5, 5] = float("nan")
    out = focused_conv2d(x, weight, bias, torch.ones_like(mask), 1, 1, clamp_min=0.0, clamp_max=6.0)
    expected = F.conv2d(x, weight, bias, 1, 1).clamp(0.0, 6.0)
    assert torch.equal(out.isnan(), expected.isnan()) and bool(out.isnan().any())
    with pytest.raises(ValueError, match=r"fxeff\.focused_conv2d: clamp_min must be <= clamp_max, got 1 > 0"):
        focused_conv2d(x, weight, bias, mask, 1, 1, clamp_min=1.0, clamp_max=0.0)
    with pytest.raises(ValueError, match="clamp_max must not be NaN"):
        focused_conv2d(x, weight, bias, mask, 1, 1, clamp_max=float("nan"))


@pytest.mark.parametrize("strategy", FORCED + ["direct"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fill_pass_epilogue_on_planes_with_a_tail(strategy, channels_last):
    # The fill pass's float loop runs 16 values per step on AVX-512 CPUs: a 7 x 9 plane (63 values: 3 steps and a
    # tail of 15) with NaN in the input and the residual, inside and outside the mask; every epilogue combination.
    if strategy == "direct" and not fxeff.ops.direct_strategy_available():
        pytest.skip("the direct strategy runs on AVX-512 CPUs")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 7, 9, generator=gen)
    weight, bias = torch.randn(5, 4, 3, 3, generator=gen), torch.randn(5, generator=gen)
    mask = random_mask(2, 7, 9, gen)
    mask[0, 3, :5], mask[1, 6, 8] = True, False
    x[0, 1, 3, 2] = float("nan")  # reaches active outputs only through the conv
    residual = torch.randn(2, 5, 7, 9, generator=gen)
    residual[0, 2, 3, 1], residual[1, 4, 6, 8] = float("nan"), float("nan")  # one active, one inactive output
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fill = torch.randn(5, generator=gen)
    dense = F.conv2d(x.double(), weight.double(), bias.double(), 1, 1).float()
    for f in (None, fill):
        for res in (None, residual):
            for lo, hi in ((None, None), (0.0, None), (-0.5, 0.25)):
                if f is None and res is None and lo is None:
                    continue
                out = run(strategy, 0, x, weight, bias, mask, 1, 1, 1, 1, f, lo, hi, res)
                expected = torch.where(mask[:, None], dense, 0.0 if f is None else f.view(1, -1, 1, 1))
                expected = expected + res if res is not None else expected
                expected = expected.clamp(lo, hi) if lo is not None else expected
                torch.testing.assert_close(out, expected, rtol=2e-6, atol=2e-5, equal_nan=True)


@pytest.mark.parametrize("strategy", ["auto", "crop", "pixels"])
@pytest.mark.parametrize("lo, hi", [(0.0, None), (-0.3, 0.8), (None, 0.2)])
def test_gradcheck_with_clamp(strategy, lo, hi, device):
    # The epilogue's gradient is torch.clamp's: it reaches x, weight, bias and the fill only where the value lies
    # strictly inside the bounds.
    x, weight, bias, fill, mask = gradcheck_case(5, device)
    with forced_strategy(strategy):
        assert torch.autograd.gradcheck(
            lambda x, w, b, f: focused_conv2d(x, w, b, mask, 1, 1, fill=f, clamp_min=lo, clamp_max=hi),
            (x, weight, bias, fill), fast_mode=True)
        grads = torch.autograd.grad(focused_conv2d(x, weight, bias, mask, 1, 1, fill=fill, clamp_min=lo,
                                                   clamp_max=hi).sum(), (x, weight, bias, fill))
    reference = torch.where(mask[:, None], F.conv2d(x, weight, bias, 1, 1), fill).clamp(lo, hi)
    for got, want in zip(grads, torch.autograd.grad(reference.sum(), (x, weight, bias, fill))):
        torch.testing.assert_close(got, want)
    torch.library.opcheck(torch.ops.fxeff.focused_conv2d.default,
                          (x, weight, bias, mask, [1, 1], [1, 1], [1, 1], 1, fill, lo, hi))


@direct_cpu
def test_direct_sees_weights_changed_in_place():
    # The direct strategy caches its packed weight per weight tensor: an in-place update (an optimizer step, a
    # fine-tune) and a new weight tensor must both be seen.
    x, weight, bias, mask = conv_case(o=40)
    for step in range(3):
        out = run("direct", 0, x, weight, bias, mask, 1, 1)
        assert_matches(out, expected_fn(x, weight, bias, mask, 1, 1), torch.float32)
        with torch.no_grad():
            weight.mul_(-0.5).add_(0.25)
    weight = torch.randn_like(weight)
    assert_matches(run("direct", 0, x, weight, bias, mask, 1, 1), expected_fn(x, weight, bias, mask, 1, 1),
                   torch.float32)


@pytest.mark.parametrize("strategy", FORCED)
@pytest.mark.parametrize("x_cl, w_cl", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("c", [1, 8])
def test_output_format_follows_conv2d(strategy, x_cl, w_cl, c, device):
    # As ATen's convs: channels_last out where x or the weight is channels_last (so a model converted with
    # .to(memory_format=torch.channels_last) stays so, even after a one-channel input whose strides say both).
    x, weight, bias, mask = on(device, *conv_case(c=c, o=8))
    if x_cl:
        x = x.contiguous(memory_format=torch.channels_last)
    if w_cl:
        weight = weight.contiguous(memory_format=torch.channels_last)
    out = run(strategy, 0, x, weight, bias, mask, 1, 1)
    dense = F.conv2d(x, weight, bias, 1, 1)
    assert out.stride() == dense.stride()
    assert_matches(out, expected_fn(x.cpu(), weight.cpu(), bias.cpu(), mask.cpu(), 1, 1), torch.float32)
    fake = torch.library.opcheck(torch.ops.fxeff.focused_conv2d.default,
                                 (x, weight, bias, mask, [1, 1], [1, 1], [1, 1], 1), test_utils="test_faketensor")
    assert fake["test_faketensor"] == "SUCCESS"


def conv_case(dtype=torch.float32, n=3, c=8, o=6, hw=24, groups=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, hw, hw, generator=gen).to(dtype)
    weight = (torch.randn(o, c // groups, 3, 3, generator=gen) / 3).to(dtype)
    bias = torch.randn(o, generator=gen).to(dtype)
    mask = random_mask(n, hw, hw, gen)
    return x, weight, bias, mask


@pytest.mark.parametrize("strategy", FORCED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(strategy, dtype, device):
    x, weight, bias, mask = conv_case(dtype)
    out = run(strategy, 0, *on(device, x, weight, bias, mask), 1, 1)
    assert_matches(out, expected_fn(x, weight, bias, mask, 1, 1), dtype)


@pytest.mark.parametrize("strategy", FORCED)
@pytest.mark.parametrize("groups", [1, 8])
def test_channels_last_stays_channels_last(strategy, groups, device):
    x, weight, bias, mask = conv_case(c=8, o=8, groups=groups)
    x = x.contiguous(memory_format=torch.channels_last)
    out = run(strategy, 0, *on(device, x, weight, bias, mask), 1, 1, 1, groups)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_matches(out, expected_fn(x, weight, bias, mask, 1, 1, 1, groups), torch.float32)


@pytest.mark.parametrize("strategy", FORCED)
def test_non_contiguous_inputs(strategy, device):
    bias = torch.randn(6, device=device)
    x_nc = torch.randn(2, 20, 8, 20, device=device).transpose(1, 2)  # [2, 8, 20, 20], C and H swapped in memory
    x_sliced = torch.randn(2, 16, 20, 20, device=device)[:, ::2]  # every other channel
    weight_nc = torch.randn(3, 3, 8, 6, device=device).permute(3, 2, 0, 1)  # [6, 8, 3, 3] permuted storage
    mask_nc = torch.rand(20, 20, 2, device=device).permute(2, 0, 1) < 0.4  # [2, 20, 20] permuted storage
    for xi in (x_nc, x_sliced):
        assert not xi.is_contiguous()
        out = run(strategy, 0, xi, weight_nc, bias, mask_nc, 1, 1)
        assert_matches(out, expected_fn(*[t.cpu() for t in (xi, weight_nc, bias, mask_nc)], 1, 1), torch.float32)


@pytest.mark.parametrize("strategy", ["auto", "crop", "tiles", "pixels"])
def test_empty_mask_runs_no_conv(strategy):
    x, weight, bias, _ = conv_case()
    mask = torch.zeros(3, 24, 24, dtype=torch.bool)
    strategy_counters(reset=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = run(strategy, 0, x, weight, bias, mask, 1, 1)
    names = {e.name for e in prof.events()}
    assert "fxeff::focused_conv2d::empty" in names
    assert not any(n.startswith("aten::conv") or n in ("aten::mm", "aten::mm.out") for n in names), names
    assert strategy_counters(reset=True)["empty"] == 1
    assert out.shape == (3, 6, 24, 24) and out.dtype == x.dtype and not out.any()
    out = run(strategy, 0, x.contiguous(memory_format=torch.channels_last), weight, bias, mask, 1, 1)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.any()  # the format is kept when empty


@pytest.mark.parametrize("strategy", FORCED)
def test_full_mask_equals_conv2d(strategy, device):
    x, weight, bias, _ = conv_case()
    x, weight, bias = on(device, x, weight, bias)
    mask = torch.ones(3, 24, 24, dtype=torch.bool, device=device)
    out = run(strategy, 0, x, weight, bias, mask, 1, 1)
    torch.testing.assert_close(out, F.conv2d(x, weight, bias, 1, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", FORCED)
@pytest.mark.parametrize("corner", [(0, 0), (0, -1), (-1, 0), (-1, -1)])
def test_blob_touching_the_image_border_is_exact(strategy, corner, device):
    # The focusedconv seed is wrong on a padding-wide ring at the crop edge and the image border: here every
    # active output, the AoI edge ring and the image border included, must equal the dense conv.
    x, weight, bias, _ = conv_case(torch.float64, n=2, hw=20)
    mask = torch.zeros(2, 20, 20, dtype=torch.bool)
    ys = slice(0, 7) if corner[0] == 0 else slice(13, 20)
    xs = slice(0, 9) if corner[1] == 0 else slice(11, 20)
    mask[0, ys, xs] = True
    mask[1, 5:12, 6:15] = True  # an interior blob in the other image
    for padding, kernel in ((1, 3), (2, 5)):
        w = torch.randn(6, 8, kernel, kernel, dtype=torch.float64)
        out = run(strategy, 0, *on(device, x, w, bias, mask), 1, padding)
        assert_matches(out, expected_fn(x, w, bias, mask, 1, padding), torch.float64)


def strategy_of_call(*args):
    strategy_counters(reset=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        focused_conv2d(*args)
    counts = strategy_counters(reset=True)
    ran = [name for name, count in counts.items() if count]
    assert len(ran) == 1 and counts[ran[0]] == 1, counts
    records = {e.name for e in prof.events() if e.name.startswith("fxeff::focused_conv2d::")}
    assert records == {f"fxeff::focused_conv2d::{ran[0]}"}, records
    return ran[0]


def test_auto_strategy_is_observable():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, 64, 64, generator=gen)
    weight = torch.randn(64, 64, 3, 3, generator=gen)
    full = torch.ones(1, 64, 64, dtype=torch.bool)
    blob = torch.zeros(1, 64, 64, dtype=torch.bool)
    blob[0, 10:30, 20:40] = True
    pixels = torch.rand(1, 64, 64, generator=gen) < 0.1
    assert strategy_of_call(x, weight, None, full, 1, 1) == "dense"
    assert strategy_of_call(x, weight, None, blob, 1, 1) == "crop"
    # Scattered pixels: the implicit GEMM where the CPU runs it (no im2col copies), else im2col and a GEMM.
    assert strategy_of_call(x, weight, None, pixels, 1, 1) == (
        "direct" if fxeff.ops.direct_strategy_available() else "pixels")
    assert strategy_of_call(x, weight, None, torch.zeros_like(full), 1, 1) == "empty"
    with forced_strategy("tiles", 8):
        assert strategy_of_call(x, weight, None, pixels, 1, 1) == "tiles"


def test_forced_strategy_restores_and_validates():
    with forced_strategy("crop"):
        pass
    x, weight, bias, mask = conv_case(n=1)
    assert strategy_of_call(x, weight, bias, torch.ones_like(mask), 1, 1) == "dense"
    with pytest.raises(ValueError,
                       match="strategy must be one of auto, dense, crop, tiles, pixels, direct, got \"best\""):
        with forced_strategy("best"):
            pass
    with pytest.raises(ValueError, match="tile must be 0 \\(auto\\) or >= 2, got 1"):
        with forced_strategy("tiles", 1):
            pass


def opcheck_inputs(dtype, requires_grad, device="cpu"):
    x, weight, bias, mask = on(device, *conv_case(dtype, n=2, c=4, o=4, hw=8))
    return (x.requires_grad_(requires_grad), weight.requires_grad_(requires_grad), bias.requires_grad_(requires_grad),
            mask, [1, 1], [1, 1], [1, 1], 1)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_opcheck(dtype, requires_grad, device):
    torch.library.opcheck(torch.ops.fxeff.focused_conv2d.default, opcheck_inputs(dtype, requires_grad, device))


def test_opcheck_channels_last_and_no_bias(device):
    x, weight, _, mask = opcheck_inputs(torch.float32, True, device)[:4]
    x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(torch.ops.fxeff.focused_conv2d.default, (x, weight, None, mask, [1, 1], [1, 1], [1, 1], 1))


@pytest.mark.parametrize("strategy", ["auto", "crop", "tiles", "pixels"])
@pytest.mark.parametrize("groups, stride", [(1, 1), (2, 2)])
def test_gradcheck(strategy, groups, stride, device):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 7, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 4 // groups, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    ho = (7 + 2 - 3) // stride + 1
    mask = random_mask(2, ho, ho, gen, blobs=1, pixel_fraction=0.2)
    x, weight, bias, mask = on(device, x, weight, bias, mask)
    with forced_strategy(strategy):
        assert torch.autograd.gradcheck(
            lambda x, w, b: focused_conv2d(x, w, b, mask, stride, 1, 1, groups), (x, weight, bias), fast_mode=True)


def test_gradients_equal_reference(device):
    x, weight, bias, mask = on(device, *conv_case(torch.float64, n=2))
    for t in (x, weight, bias):
        t.requires_grad_()
    grad = torch.randn(2, 6, 24, 24, dtype=torch.float64, device=device)
    got = torch.autograd.grad(focused_conv2d(x, weight, bias, mask, 1, 1), (x, weight, bias), grad)
    want = torch.autograd.grad(F.conv2d(x, weight, bias, 1, 1) * mask[:, None], (x, weight, bias), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


class FocusedLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x, mask):
        return focused_conv2d(x, self.conv.weight, self.conv.bias, mask, 1, 1)


def test_stays_one_fx_leaf():
    gm = torch.fx.symbolic_trace(FocusedLayer())
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    # The wrapper is a leaf where fx.wrap patched it; called from elsewhere, the op itself is the leaf.
    assert len(calls) == 1 and calls[0].target in (focused_conv2d, torch.ops.fxeff.focused_conv2d), calls
    x, mask = torch.randn(1, 4, 9, 9), torch.rand(1, 9, 9) < 0.5
    torch.testing.assert_close(gm(x, mask), FocusedLayer.forward(gm, x, mask))


def test_flop_counter_counts_active_outputs():
    x, weight, bias, mask = conv_case()
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        focused_conv2d(x, weight, bias, mask, 1, 1)
    assert counter.get_total_flops() == 2 * int(mask.sum()) * 6 * 8 * 3 * 3


def bad_call(**changes):
    x, weight, bias, mask = conv_case(n=2, c=4, o=4, hw=8)
    args = dict(x=x, weight=weight, bias=bias, mask=mask, stride=1, padding=1, dilation=1, groups=1)
    args.update(changes)
    return torch.ops.fxeff.focused_conv2d(args["x"], args["weight"], args["bias"], args["mask"],
                                          [args["stride"]] * 2, [args["padding"]] * 2, [args["dilation"]] * 2,
                                          args["groups"])


@pytest.mark.parametrize("changes, message", [
    (dict(mask=torch.ones(2, 8, 7, dtype=torch.bool)), r"mask must be bool \[N, Hout, Wout\] = \[2, 8, 8\], got \[2, 8, 7\] Bool"),
    (dict(mask=torch.ones(2, 8, 8)), r"mask must be bool \[N, Hout, Wout\] = \[2, 8, 8\], got \[2, 8, 8\] Float"),
    (dict(mask=torch.ones(3, 8, 8, dtype=torch.bool)), r"mask must be bool \[N, Hout, Wout\] = \[2, 8, 8\], got \[3, 8, 8\]"),
    (dict(mask=torch.ones(8, 8, dtype=torch.bool)), r"mask must be bool \[N, Hout, Wout\] = \[2, 8, 8\], got \[8, 8\]"),
    (dict(x=torch.randn(4, 8, 8)), r"x must be 4-D \[N, C, H, W\], got 3-D \[4, 8, 8\]"),
    (dict(groups=3), r"groups must divide the input and output channels, got groups=3 with 4 input and 4 output"),
    (dict(weight=torch.randn(4, 4, 3, 3, dtype=torch.float64)), r"weight dtype must equal x dtype Float, got Double"),
    (dict(bias=torch.randn(5)), r"bias must be \[4\], got \[5\]"),
    (dict(stride=0), r"stride must be >= 1, got \[0, 0\]"),
    (dict(x=torch.randn(2, 4, 8, 8).int()), r"x must be floating point, got Int"),
])
def test_bad_input_names_op_and_argument(changes, message):
    with pytest.raises(ValueError, match=r"fxeff\.focused_conv2d: " + message):
        bad_call(**changes)


def test_wrapper_rejects_bad_pairs():
    x, weight, bias, mask = conv_case(n=1)
    with pytest.raises(ValueError, match=r"fxeff\.focused_conv2d: stride must be an int or 2 ints, got \[1, 1, 1\]"):
        focused_conv2d(x, weight, bias, mask, (1, 1, 1), 1)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("kernel, padding, dilation", [(3, 1, 1), (5, 2, 1), (3, 2, 2), (3, 0, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_active_region_equals_reference(channels_last, kernel, padding, dilation, dtype):
    # Large enough that the cost model sends a sparse mask's backward through the pixels path; the profiler says
    # which path ran, and the gradients must equal the reference's either way.
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 32, 31, 29, generator=gen).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = torch.randn(24, 32, kernel, kernel, generator=gen).to(dtype).requires_grad_()
    bias = torch.randn(24, generator=gen).to(dtype).requires_grad_()
    ref = F.conv2d(x, weight, bias, 1, padding, dilation)
    mask = random_mask(2, ref.shape[2], ref.shape[3], gen, blobs=1, pixel_fraction=0.03)
    grad = torch.randn(ref.shape, generator=gen).to(dtype)
    want = torch.autograd.grad(ref * mask[:, None], (x, weight, bias), grad)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = torch.autograd.grad(focused_conv2d(x, weight, bias, mask, 1, padding, dilation), (x, weight, bias), grad)
    ran = {e.name for e in prof.events() if e.name.startswith("fxeff::focused_conv2d_backward::")}
    assert ran == {"fxeff::focused_conv2d_backward::pixels"}, ran
    assert got[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    for g, w in zip(got, want):
        assert_matches(g, w, dtype)


def test_backward_of_empty_mask_is_zero_without_conv():
    x, weight, bias, _ = conv_case()
    for t in (x, weight, bias):
        t.requires_grad_()
    mask = torch.zeros(3, 24, 24, dtype=torch.bool)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        grads = torch.autograd.grad(focused_conv2d(x, weight, bias, mask, 1, 1).sum(), (x, weight, bias))
    names = {e.name for e in prof.events()}
    assert "fxeff::focused_conv2d_backward::empty" in names
    assert not any(n.startswith("aten::conv") for n in names), names
    assert all(not g.any() for g in grads)
