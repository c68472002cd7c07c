"""fxeff.ops.shift against the pure-PyTorch reference (tests/_shift_reference.py): values, gradients,
padding table, rounding, dtypes, memory formats, quantized inputs, determinism, opcheck and errors."""
import itertools

import pytest
import torch

from fxeff.ops import SHIFT_MODES, SHIFT_PADDINGS, shift
from _shift_reference import shift_reference

SPATIAL = {1: (9,), 2: (6, 7), 3: (4, 5, 6)}
CASES = list(itertools.product((1, 2, 3), SHIFT_PADDINGS, SHIFT_MODES))


def channels_last(x):
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def random_shifts(channels, dims, scale=3.0, dtype=torch.float64, gen=None):
    """Fractional shifts in (-scale, scale), plus a zero, an exact half and one larger than the sizes."""
    s = (torch.rand(channels, dims, dtype=torch.float64, generator=gen) * 2 - 1) * scale
    s[0] = 0.0
    s[1, 0] = 1.5
    s[2, -1] = -11.25
    return s.to(dtype)


def test_padding_table_of_reference_md(device):
    """REFERENCE.md: x = 1..6 shifted by s = +2 under each padding (op and reference agree with the table)."""
    table = {"zeros": [0, 0, 1, 2, 3, 4], "border": [1, 1, 1, 2, 3, 4], "periodic": [5, 6, 1, 2, 3, 4],
             "reflect": [3, 2, 1, 2, 3, 4], "symmetric": [2, 1, 1, 2, 3, 4]}
    x = torch.arange(1.0, 7.0).reshape(1, 1, 6)
    s = torch.tensor([[2.0]])
    for padding, want in table.items():
        for mode in SHIFT_MODES:
            got = shift(x.to(device), s.to(device), padding, mode)
            assert got.flatten().tolist() == want, (padding, mode)
        assert shift_reference(x, s, padding).flatten().tolist() == want


@pytest.mark.parametrize("padding", SHIFT_PADDINGS)
def test_shifts_larger_than_the_size(padding, device):
    x = torch.arange(1.0, 7.0).reshape(1, 1, 6)
    for s in (-13.0, -9.0, -6.0, 6.0, 7.0, 25.0):
        got = shift(x.to(device), torch.tensor([[s]], device=device), padding).cpu()
        torch.testing.assert_close(got, shift_reference(x, torch.tensor([[s]]), padding), rtol=0, atol=0)


def test_rounding_is_half_away_from_zero(device):
    x = torch.arange(1.0, 11.0).reshape(1, 1, 10).repeat(1, 6, 1)
    s = torch.tensor([[0.5], [-0.5], [1.5], [-1.5], [2.5], [0.49999]])
    got = shift(x.to(device), s.to(device), "zeros", "sparse").cpu()
    for c, r in enumerate([1, -1, 2, -2, 3, 0]):
        want = torch.zeros(10)
        for i in range(10):
            if 0 <= i - r < 10:
                want[i] = i - r + 1
        assert got[0, c].tolist() == want.tolist(), (s[c].item(), r)


def test_active_equals_integer_shift_at_integers_and_is_continuous():
    x = torch.randn(2, 3, 8, 9, dtype=torch.float64)
    s = torch.tensor([[1.0, -2.0], [0.0, 3.0], [-1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(shift(x, s, "border", "active"), shift(x, s, "border", "sparse"))
    eps = 1e-7
    torch.testing.assert_close(shift(x, s + eps, "border", "active"), shift(x, s, "border", "active"), atol=1e-5,
                               rtol=0)
    torch.testing.assert_close(shift(x, s - eps, "border", "active"), shift(x, s, "border", "active"), atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("dims,padding,mode", CASES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_forward_and_gradients_match_reference(dims, padding, mode, layout, device):
    gen = torch.Generator().manual_seed(dims * 100 + SHIFT_PADDINGS.index(padding) * 10 + SHIFT_MODES.index(mode))
    x = torch.randn(2, 5, *SPATIAL[dims], dtype=torch.float64, generator=gen)
    if layout == "channels_last":
        if dims == 1:
            pytest.skip("channels_last needs 4-D or 5-D input")
        x = channels_last(x)
    elif layout == "strided":  # a non-contiguous view: every other element of the last dim (made on the device)
        x = torch.randn(2, 5, *SPATIAL[dims][:-1], 2 * SPATIAL[dims][-1], dtype=torch.float64,
                        generator=gen).to(device)[..., ::2]
    s = random_shifts(5, dims, gen=gen)
    xr, sr = x.detach().cpu().clone().requires_grad_(), s.clone().requires_grad_()
    xo, so = x.detach().to(device).requires_grad_(), s.to(device).requires_grad_()
    want = shift_reference(xr, sr, padding, mode)
    got = shift(xo, so, padding, mode)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12)
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    g = torch.randn(want.shape, dtype=torch.float64, generator=gen)
    want.backward(g)
    got.backward(g.to(device))
    torch.testing.assert_close(xo.grad.cpu(), xr.grad, rtol=1e-12, atol=1e-12)
    if mode == "grouped":
        assert so.grad is None
    else:
        torch.testing.assert_close(so.grad.cpu(), sr.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", SHIFT_MODES)
@pytest.mark.parametrize("dims,layout", [(1, "contiguous"), (2, "contiguous"), (2, "channels_last"),
                                         (3, "contiguous"), (3, "channels_last")])
def test_dtypes_keep_the_input_dtype(dtype, mode, dims, layout, device):
    """Also the vectorised channels-last paths: 19 channels = two 8-wide gathers and a remainder."""
    gen = torch.Generator().manual_seed(dims)
    x = torch.randn(2, 19, *SPATIAL[dims], generator=gen).to(dtype)
    if layout == "channels_last":
        x = channels_last(x)
    s = random_shifts(19, dims, dtype=torch.float32, gen=gen)
    x, s = x.to(device), s.to(device)
    got = shift(x, s, "reflect", mode).cpu()
    want = shift_reference(x.cpu().double(), s.cpu().double(), "reflect", mode)
    assert got.dtype == dtype
    if mode == "active":
        tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    else:  # an integer shift copies values: exact in every dtype
        assert torch.equal(got.double(), want)
    x.requires_grad_()
    s.requires_grad_()
    out = shift(x, s, "reflect", mode)
    out.float().square().sum().backward()
    assert x.grad.dtype == dtype and (s.grad is None) == (mode == "grouped")


@pytest.mark.parametrize("dims,padding,mode", CASES)
def test_gradcheck_float64(dims, padding, mode, device):
    """Input gradients everywhere; shift gradients where the forward is differentiable in s (active)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 3, *[min(n, 5) for n in SPATIAL[dims]], dtype=torch.float64, generator=gen)
    x = x.to(device).requires_grad_()
    # Away from integers: the linear interpolation has kinks there.
    s = (torch.rand(3, dims, dtype=torch.float64, generator=gen) * 0.8 + 0.1) * torch.tensor([1.0, -1.0, 3.0]).reshape(3, 1)
    s = s.to(device=device, dtype=torch.float64).requires_grad_(mode == "active")
    assert torch.autograd.gradcheck(lambda a, b: shift(a, b, padding, mode), (x, s), fast_mode=True)


@pytest.mark.parametrize("dims,padding,mode", CASES)
def test_opcheck(dims, padding, mode, device):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, *[min(n, 5) for n in SPATIAL[dims]], generator=gen).to(device).requires_grad_()
    s = random_shifts(3, dims, dtype=torch.float32, gen=gen).to(device).requires_grad_(mode != "grouped")
    torch.library.opcheck(torch.ops.fxeff.shift.default, (x, s, padding, mode))
    g = torch.randn(x.shape, generator=gen).to(device)
    torch.library.opcheck(torch.ops.fxeff.shift_input_grad.default, (g, s.detach(), padding, mode))
    torch.library.opcheck(torch.ops.fxeff.shift_shifts_grad.default, (g, x.detach(), s.detach(), padding))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_shift_gradient_is_deterministic_across_thread_counts(layout):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4, 16, 24, 24, generator=gen)
    if layout == "channels_last":
        x = channels_last(x)
    s = random_shifts(16, 2, dtype=torch.float32, gen=gen)
    g = torch.randn(x.shape, generator=gen)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            xs, ss = x.clone().requires_grad_(), s.clone().requires_grad_()
            shift(xs, ss, "symmetric", "sparse").backward(g)
            grads.append((xs.grad, ss.grad))
    finally:
        torch.set_num_threads(threads)
    for gx, gs in grads[1:]:
        assert torch.equal(gx, grads[0][0]) and torch.equal(gs, grads[0][1])


@pytest.mark.parametrize("qdtype", [torch.quint8, torch.qint8])
@pytest.mark.parametrize("padding", SHIFT_PADDINGS)
@pytest.mark.parametrize("mode", ["sparse", "grouped"])
@pytest.mark.parametrize("dims,layout", [(1, "contiguous"), (2, "contiguous"), (2, "channels_last"), (3, "contiguous"),
                                         (3, "channels_last")])
def test_quantized_equals_float_quantized(qdtype, padding, mode, dims, layout):
    gen = torch.Generator().manual_seed(5)
    xf = torch.randn(2, 5, *SPATIAL[dims], generator=gen)
    zero_point = 128 if qdtype == torch.quint8 else 3
    q = torch.quantize_per_tensor(xf, 0.05, zero_point, qdtype)
    if layout == "channels_last":
        q = channels_last(q)
    s = random_shifts(5, dims, dtype=torch.float32, gen=gen)
    got = shift(q, s, padding, mode)
    want = torch.quantize_per_tensor(shift_reference(q.dequantize(), s, padding, mode), 0.05, zero_point, qdtype)
    assert got.dtype == qdtype and got.q_scale() == 0.05 and got.q_zero_point() == zero_point
    assert torch.equal(got.int_repr(), want.int_repr())


def test_quantized_active_is_refused():
    q = torch.quantize_per_tensor(torch.randn(1, 2, 4, 4), 0.1, 0, torch.quint8)
    with pytest.raises(ValueError, match=r"fxeff.shift: mode \"active\".*quantized"):
        shift(q, torch.zeros(2, 2), "zeros", "active")


def test_empty_batch(device):
    x = torch.randn(0, 3, 4, 4, device=device)
    assert shift(x, torch.ones(3, 2, device=device)).shape == (0, 3, 4, 4)


@pytest.mark.parametrize("x_shape,s_shape,s_dtype,padding,mode,match", [
    ((1, 3, 4, 4), (3, 1), torch.float32, "zeros", "sparse", r"shifts must be \[C, dims\] = \[3, 2\].*got \[3, 1\]"),
    ((1, 3, 4, 4), (2, 2), torch.float32, "zeros", "sparse", r"shifts must be \[C, dims\] = \[3, 2\]"),
    ((1, 3, 4, 4), (3, 2), torch.int64, "zeros", "sparse", r"shifts must be floating point, got Long"),
    ((1, 3, 4, 4), (3, 2), torch.float32, "wrap", "sparse", r"padding must be one of .*got \"wrap\""),
    ((1, 3, 4, 4), (3, 2), torch.float32, "zeros", "bilinear", r"mode must be one of .*got \"bilinear\""),
    ((3, 4), (3, 0), torch.float32, "zeros", "sparse", r"x must be 3-D, 4-D or 5-D.*got 2-D"),
])
def test_bad_input_names_the_argument(x_shape, s_shape, s_dtype, padding, mode, match):
    x = torch.randn(*x_shape)
    s = torch.zeros(*s_shape, dtype=s_dtype)
    with pytest.raises(ValueError, match=r"fxeff.shift: " + match):
        shift(x, s, padding, mode)


def test_non_finite_shift_is_an_error(device):
    with pytest.raises(ValueError, match=r"fxeff.shift: shifts must be finite"):
        shift(torch.randn(1, 2, 4, 4, device=device), torch.tensor([[0.0, float("nan")], [0.0, 0.0]], device=device))


def test_integer_input_is_an_error():
    with pytest.raises(ValueError, match=r"fxeff.shift: x must be floating point"):
        shift(torch.ones(1, 2, 4, dtype=torch.int32), torch.zeros(2, 1))


def test_stays_one_leaf_under_fx():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.shifts = torch.nn.Parameter(torch.zeros(3, 2))

        def forward(self, x):
            return shift(x, self.shifts, "zeros", "sparse") + 1

    gm = torch.fx.symbolic_trace(M())
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    # The wrapper is a leaf where fx.wrap patched it; called from elsewhere, the op itself is the leaf.
    assert len(calls) == 2 and calls[0].target in (shift, torch.ops.fxeff.shift), calls
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(gm(x), M()(x))


@pytest.mark.parametrize("mode", SHIFT_MODES)
@pytest.mark.parametrize("padding", ["zeros", "symmetric"])
@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_interior_float32(mode, padding, dims, device):
    """Small shifts on a larger map: the channels-last interior (hardware gathers on x86) does most pixels."""
    gen = torch.Generator().manual_seed(dims)
    x = channels_last(torch.randn(2, 19, *([6] * (dims - 2)), 10, 12, generator=gen))
    s = torch.rand(19, dims, generator=gen) * 2 - 1
    got = shift(x.to(device), s.to(device), padding, mode).cpu()
    want = shift_reference(x.double(), s.double(), padding, mode)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding", SHIFT_PADDINGS)
@pytest.mark.parametrize("spread", ["grouped", "wide"])
@pytest.mark.parametrize("size", [(7, 7), (14, 11)])
def test_channels_last_rounded_rows_float32(padding, spread, size, device):
    """Rounded shifts in channels_last float32: interior rows gather with one plan, the edge rows and columns block
    by block (few distinct shifts per 16 channels: "grouped") or channel by channel (many: "wide", in [-2, 2]); 37
    channels (a partial block), maps where most pixels are edges."""
    gen = torch.Generator().manual_seed(len(padding) + size[1])
    x = channels_last(torch.randn(3, 37, *size, generator=gen))
    if spread == "grouped":
        s = torch.tensor([[c // 13 - 1, (c // 5) % 3 - 1] for c in range(37)], dtype=torch.float32)
    else:
        s = torch.randint(-2, 3, (37, 2), generator=gen).float()
    for mode in ("sparse", "grouped"):
        got = shift(x.to(device), s.to(device), padding, mode).cpu()
        torch.testing.assert_close(got, shift_reference(x, s, padding, mode), rtol=0, atol=0)


# ---------------------------------------------------------------- shift_pool: the fused strided/cropped emulation

def shift_pool_reference(x, shifts, padding, mode, pad, pool):
    """shift, F.pad (negative = crop), then avg_pool with kernel = stride = pool and ceil_mode (clipped windows)."""
    z = torch.nn.functional.pad(shift_reference(x, shifts, padding, mode), pad)
    dims = len(pool)
    kernel = [min(p, z.shape[2 + d]) for d, p in enumerate(pool)]
    avg = {1: torch.nn.functional.avg_pool1d, 2: torch.nn.functional.avg_pool2d, 3: torch.nn.functional.avg_pool3d}
    return avg[dims](z, kernel, list(pool), 0, True)


POOL_CASES = [([-1, -1], [2]), ([0, 0], [2]), ([1, 1], [3]), ([-1, 0], [1]), ([0, 1], [2])]


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("mode", SHIFT_MODES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("pad1,pool1", POOL_CASES)
def test_shift_pool_matches_shift_pad_and_pool(dims, mode, layout, pad1, pool1, device):
    if layout == "channels_last" and dims == 1:
        pytest.skip("channels_last needs 4-D or 5-D input")
    gen = torch.Generator().manual_seed(dims)
    x = torch.randn(2, 5, *SPATIAL[dims], dtype=torch.float64, generator=gen)
    if layout == "channels_last":
        x = channels_last(x)
    s = random_shifts(5, dims, gen=gen)
    pad, pool = pad1 * dims, pool1 * dims
    xr, sr = x.clone().requires_grad_(), s.clone().requires_grad_()
    xo, so = x.to(device).requires_grad_(), s.to(device).requires_grad_()
    want = shift_pool_reference(xr, sr, "symmetric", mode, pad, pool)
    got = torch.ops.fxeff.shift_pool(xo, so, "symmetric", mode, pad, pool)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12)
    g = torch.randn(want.shape, dtype=torch.float64, generator=gen)
    want.backward(g)
    got.backward(g.to(device))
    torch.testing.assert_close(xo.grad.cpu(), xr.grad, rtol=1e-12, atol=1e-12)
    if mode != "grouped":
        torch.testing.assert_close(so.grad.cpu(), sr.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", SHIFT_MODES)
def test_shift_pool_gradcheck_and_opcheck(mode, device):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 5, 6, dtype=torch.float64, generator=gen).to(device).requires_grad_()
    s = (torch.rand(3, 2, dtype=torch.float64, generator=gen) * 0.8 + 0.1).to(device).requires_grad_(mode == "active")
    assert torch.autograd.gradcheck(lambda a, b: torch.ops.fxeff.shift_pool(a, b, "reflect", mode, [-1, 0, 0, 1],
                                                                          [2, 2]), (x, s), fast_mode=True)
    torch.library.opcheck(torch.ops.fxeff.shift_pool.default, (x.float().detach().requires_grad_(),
                                                               s.float().detach().requires_grad_(mode != "grouped"),
                                                               "zeros", mode, [-1, -1, 0, 0], [2, 2]))


@pytest.mark.parametrize("size,pad,pool", [((4, 1), [0, 0, 0, 0], [2, 2]), ((4, 5), [-2, -2, 0, 0], [1, 2]),
                                           ((4, 3), [0, 0, 0, 0], [1, 4]), ((7, 2), [-1, 0, 1, 0], [3, 3])])
def test_shift_pool_rows_narrower_than_a_window(size, pad, pool, device):
    """Rows with no whole window inside (the unchecked fast path must not run there)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, *size, dtype=torch.float64, generator=gen)
    s = torch.zeros(3, 2, dtype=torch.float64)
    s[1] = torch.tensor([1.0, -1.0])
    got = torch.ops.fxeff.shift_pool(x.to(device), s.to(device), "zeros", "sparse", pad, pool).cpu()
    torch.testing.assert_close(got, shift_pool_reference(x, s, "zeros", "sparse", pad, pool), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("padding", SHIFT_PADDINGS)
@pytest.mark.parametrize("pad1,pool1", POOL_CASES + [([0, 0], [3]), ([2, 0], [2])])
@pytest.mark.parametrize("size", [(7, 7), (13, 10), (2, 3)])
def test_shift_pool_channels_last_float32(padding, pad1, pool1, size, device):
    """channels_last float32 with rounded shifts (the gather that pools straight into the output): 37 channels,
    every crop/pad/pool case, whole and clipped windows, maps smaller than a window; a channels_last result."""
    gen = torch.Generator().manual_seed(size[0] + pool1[0])
    x = channels_last(torch.randn(2, 37, *size, generator=gen))
    s = torch.randint(-2, 3, (37, 2), generator=gen).float()
    pad, pool = pad1 * 2, pool1 * 2
    if any(n + pad[2 * i] + pad[2 * i + 1] < 1 for i, n in enumerate(reversed(size))):
        return
    for mode in ("sparse", "grouped"):
        got = torch.ops.fxeff.shift_pool(x.to(device), s.to(device), padding, mode, pad, pool).cpu()
        want = shift_pool_reference(x.double(), s.double(), padding, mode, pad, pool)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
        assert got.is_contiguous(memory_format=torch.channels_last)


def test_shift_pool_channels_last_large_input(device):
    """An input above 8 MiB (the gather prefetches ahead), stride 2 with a crop, as MobileNet's strided layers."""
    gen = torch.Generator().manual_seed(3)
    x = channels_last(torch.randn(2, 72, 120, 123, generator=gen))
    s = torch.randint(-1, 2, (72, 2), generator=gen).float()
    got = torch.ops.fxeff.shift_pool(x.to(device), s.to(device), "zeros", "sparse", [0, -1, 0, -1], [2, 2]).cpu()
    want = shift_pool_reference(x.double(), s.double(), "zeros", "sparse", [0, -1, 0, -1], [2, 2])
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_shift_pool_errors():
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match=r"fxeff.shift_pool: pad must have 2 \* dims = 4 entries"):
        torch.ops.fxeff.shift_pool(x, torch.zeros(2, 2), "zeros", "sparse", [0, 0], [2, 2])
    with pytest.raises(ValueError, match=r"fxeff.shift_pool: pool must have dims = 2 entries"):
        torch.ops.fxeff.shift_pool(x, torch.zeros(2, 2), "zeros", "sparse", [0, 0, 0, 0], [2])
    with pytest.raises(ValueError, match=r"too small for the emulated depthwise conv"):
        torch.ops.fxeff.shift_pool(x, torch.zeros(2, 2), "zeros", "sparse", [-2, -2, 0, 0], [1, 1])


def test_autograd_records_only_what_needs_grad():
    """The ops' autograd (C++): no graph under no_grad or without inputs that need grad, and each gradient only
    for the inputs that need it (the shifts' gradient reads x, which is saved only then)."""
    x = torch.randn(2, 3, 5, 6, requires_grad=True)
    shifts = torch.randn(3, 2)
    with torch.no_grad():
        assert torch.ops.fxeff.shift(x, shifts.requires_grad_(), "zeros", "sparse").grad_fn is None
    shifts = shifts.detach()
    assert torch.ops.fxeff.shift(x.detach(), shifts, "zeros", "sparse").grad_fn is None
    out = torch.ops.fxeff.shift(x, shifts, "zeros", "sparse")
    out.sum().backward()
    assert x.grad is not None and shifts.grad is None
    s = shifts.clone().requires_grad_()
    pooled = torch.ops.fxeff.shift_pool(x.detach(), s, "zeros", "active", [0, 0, 0, 0], [2, 2])
    pooled.sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
