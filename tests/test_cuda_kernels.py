"""The CUDA kernels of the shift family, hetconv2d and the Focus ops (focused_conv2d, aoi_mask, mask_resize): a build check that runs anywhere (a CUDA build registers a
CUDA kernel for every op that has a CPU one), and CPU-vs-CUDA agreement on the same inputs, which needs a GPU
(bitwise for the sparse and grouped shifts and the mask ops: they copy values or compare exact sums; allclose where the
two devices sum differently). The device code's index arithmetic also runs on the CPU (the *_on_the_host tests)."""
import hashlib
import itertools
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
import torch.utils.cpp_extension

from fxeff.ops import (SHIFT_MODES, SHIFT_PADDINGS, aoi_mask, focused_conv2d, forced_strategy, hetconv2d, mask_resize,
                       shift, strategy_counters)

# The ops of issue 6 (parts 1 and 2).
CUDA_OPS = ["shift", "shift_pool", "shift_input_grad", "shift_shifts_grad", "hetconv2d", "focused_conv2d",
            "focused_conv2d_backward", "aoi_mask", "mask_resize"]

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def has_kernel(op, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fxeff::{op}", key)


def test_a_cuda_build_has_a_cuda_kernel_for_every_cpu_op():
    assert all(has_kernel(op, "CPU") for op in CUDA_OPS)
    if not any(has_kernel(op, "CUDA") for op in CUDA_OPS):
        pytest.skip("the extension was built without CUDA")
    assert [op for op in CUDA_OPS if not has_kernel(op, "CUDA")] == []


SPATIAL = {1: (11,), 2: (7, 9), 3: (4, 5, 6)}


def inputs(dims, layout, dtype, channels=6, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, channels, *SPATIAL[dims], generator=gen).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    s = (torch.rand(channels, dims, generator=gen, dtype=torch.float64) * 2 - 1) * scale
    s[0] = 0.0
    s[1, 0] = 1.5  # an exact half: rounds away from zero on both devices
    s[2, -1] = -2.5
    s[3, 0] = 13.25  # larger than every size
    return x, s.float()


LAYOUT_CASES = [(1, "contiguous"), (2, "contiguous"), (2, "channels_last"), (3, "contiguous"), (3, "channels_last")]


@pytest.fixture(scope="module")
def emulation():
    """tests/_shift_cuda_emulation.cpp built (seconds; cached by torch.utils.cpp_extension): the CUDA kernels'
    per-element code run on the CPU as torch.ops.fxeff_emu.*."""
    if shutil.which("c++") is None:
        pytest.skip("building the host emulation needs a C++ compiler (c++) on PATH")
    here = os.path.dirname(os.path.abspath(__file__))
    source = os.path.join(here, "_shift_cuda_emulation.cpp")
    # The name carries a hash of the included headers too: the extension cache only hashes the listed sources.
    digest = hashlib.sha1()
    for path in (source, os.path.join(here, "..", "csrc", "ops", "cuda", "shift_elements.cuh"),
                 os.path.join(here, "..", "csrc", "ops", "shift.h")):
        with open(path, "rb") as f:
            digest.update(f.read())
    torch.utils.cpp_extension.load(f"fxeff_shift_cuda_emulation_{digest.hexdigest()[:12]}", [source],
                                   extra_cflags=["-O2"], is_python_module=False)
    return torch.ops.fxeff_emu


@pytest.mark.parametrize("dims,layout", LAYOUT_CASES)
def test_cuda_element_code_on_the_host(emulation, dims, layout):
    """Forward, adjoint and shift gradient of the device code equal the CPU kernel for every padding and mode
    (float64; sparse and grouped forwards bitwise), with shifts past the sizes and exact halves (inputs())."""
    x, s = inputs(dims, layout, torch.float64)
    s = s.double()
    g = torch.randn(x.shape, dtype=torch.float64)
    for padding, mode in itertools.product(SHIFT_PADDINGS, SHIFT_MODES):
        pad, linear = SHIFT_PADDINGS.index(padding), mode == "active"
        want = torch.ops.fxeff.shift(x, s, padding, mode)
        got = emulation.shift(x, s, pad, linear)
        assert got.stride() == want.stride()
        if linear:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=lambda m: f"{padding} {mode}: {m}")
        else:
            assert torch.equal(got, want), (padding, mode)
        torch.testing.assert_close(emulation.input_grad(g, s, pad, linear),
                                   torch.ops.fxeff.shift_input_grad(g, s, padding, mode), rtol=1e-12, atol=1e-12,
                                   msg=lambda m: f"{padding} {mode}: {m}")
        torch.testing.assert_close(emulation.shifts_grad(g, x, s, pad),
                                   torch.ops.fxeff.shift_shifts_grad(g, x, s, padding), rtol=1e-10, atol=1e-10,
                                   msg=lambda m: f"{padding}: {m}")


def test_cuda_adjoint_code_on_the_host_far_shifts(emulation):
    """The adjoint's preimage ranges: sizes 1 and 2 (degenerate periods) and shifts many sizes away."""
    s = torch.tensor([[-40.0], [-7.0], [-1.0], [2.0], [9.0], [33.0]], dtype=torch.float64)
    for size, padding, mode in itertools.product((1, 2, 5), SHIFT_PADDINGS, SHIFT_MODES):
        x = torch.randn(1, 6, size, dtype=torch.float64)
        for shifts in (s, s + 0.3):
            torch.testing.assert_close(
                emulation.input_grad(x, shifts, SHIFT_PADDINGS.index(padding), mode == "active"),
                torch.ops.fxeff.shift_input_grad(x, shifts, padding, mode), rtol=1e-12, atol=1e-12,
                msg=lambda m: f"size {size} {padding} {mode}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_element_code_on_the_host_dtypes(emulation, dtype):
    x, s = inputs(2, "channels_last", dtype)
    for mode in SHIFT_MODES:
        want = torch.ops.fxeff.shift(x, s, "reflect", mode)
        got = emulation.shift(x, s, SHIFT_PADDINGS.index("reflect"), mode == "active")
        if mode == "active":
            tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        else:
            assert torch.equal(got, want)


@needs_gpu
@pytest.mark.parametrize("dims,layout", LAYOUT_CASES)
@pytest.mark.parametrize("padding,mode", list(itertools.product(SHIFT_PADDINGS, SHIFT_MODES)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_shift_forward_cpu_equals_cuda(dims, layout, padding, mode, dtype):
    x, s = inputs(dims, layout, dtype)
    want = shift(x, s, padding, mode)
    got = shift(x.cuda(), s.cuda(), padding, mode)
    assert got.dtype == dtype and got.stride() == want.stride()
    if mode == "active":
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol)
    else:
        assert torch.equal(got.cpu(), want)


@needs_gpu
@pytest.mark.parametrize("dims,layout", LAYOUT_CASES)
@pytest.mark.parametrize("padding,mode", list(itertools.product(SHIFT_PADDINGS, SHIFT_MODES)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_shift_gradients_cpu_equal_cuda(dims, layout, padding, mode, dtype):
    x, s = inputs(dims, layout, dtype, seed=1)
    s = s.to(dtype)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    grads = []
    for device in ("cpu", "cuda"):
        xd, sd = x.to(device).requires_grad_(), s.to(device).requires_grad_()
        shift(xd, sd, padding, mode).backward(g.to(device))
        grads.append((xd.grad.cpu(), None if sd.grad is None else sd.grad.cpu()))
    (gx_cpu, gs_cpu), (gx_cuda, gs_cuda) = grads
    f64 = dtype == torch.float64
    torch.testing.assert_close(gx_cuda, gx_cpu, rtol=1e-12 if f64 else 1e-5, atol=1e-12 if f64 else 1e-5)
    if mode == "grouped":
        assert gs_cpu is None and gs_cuda is None
    else:  # sums over a channel: float32 CPU partial sums are float, CUDA's double
        torch.testing.assert_close(gs_cuda, gs_cpu, rtol=1e-10 if f64 else 1e-4, atol=1e-10 if f64 else 1e-3)


@needs_gpu
@pytest.mark.parametrize("padding", SHIFT_PADDINGS)
def test_adjoint_of_far_shifts_on_cuda(padding):
    """Shifts far beyond the size: border sends whole runs to an edge, the periodic ones wrap several times."""
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    s = torch.tensor([[40.0, -3.0], [-17.0, 9.0], [0.0, -25.0], [7.0, 7.0]], dtype=torch.float64)
    g = torch.randn(x.shape, dtype=torch.float64)
    for mode in SHIFT_MODES:
        want = torch.ops.fxeff.shift_input_grad(g, s, padding, mode)
        got = torch.ops.fxeff.shift_input_grad(g.cuda(), s.cuda(), padding, mode)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12)


@needs_gpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_gradients_are_deterministic(layout):
    """No atomics: the same inputs give bitwise the same gradients, also under deterministic mode."""
    x = torch.randn(8, 16, 40, 40, device="cuda")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    s = (torch.rand(16, 2, device="cuda") * 2 - 1) * 3
    g = torch.randn_like(x)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [(torch.ops.fxeff.shift_input_grad(g, s, "symmetric", "active"),
                 torch.ops.fxeff.shift_shifts_grad(g, x, s, "symmetric")) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(previous)
    for gx, gs in runs[1:]:
        assert torch.equal(gx, runs[0][0]) and torch.equal(gs, runs[0][1])


@needs_gpu
@pytest.mark.parametrize("mode", SHIFT_MODES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_shift_pool_cpu_equals_cuda(mode, layout):
    x, s = inputs(2, layout, torch.float32, seed=4)
    for pad, pool in (([-1, -1, -1, -1], [2, 2]), ([0, 1, 0, 1], [3, 2]), ([0, 0, 0, 0], [1, 1])):
        want = torch.ops.fxeff.shift_pool(x, s, "reflect", mode, pad, pool)
        got = torch.ops.fxeff.shift_pool(x.cuda(), s.cuda(), "reflect", mode, pad, pool)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


HET_CASES = [  # n, m, o, part, k, h, w, stride, padding, dilation
    (2, 16, 8, 4, 3, 9, 11, 1, 1, 1),
    (1, 12, 6, 3, 5, 10, 7, 2, 0, 1),
    (3, 8, 12, 2, 3, 12, 12, (2, 1), (2, 0), (1, 2)),
    (2, 6, 6, 1, 3, 5, 5, 1, 1, 1),
    (2, 64, 64, 16, 3, 14, 14, 1, 1, 1),
]


@needs_gpu
@pytest.mark.parametrize("case", HET_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_hetconv2d_cpu_equals_cuda(case, channels_last, dtype, bias):
    n, m, o, part, k, h, w, stride, padding, dilation = case
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, m, h, w, generator=gen, dtype=torch.float64)
    wk = torch.randn(o, m // part, k, k, generator=gen, dtype=torch.float64)
    w1 = torch.randn(o, m - m // part, generator=gen, dtype=torch.float64)
    b = torch.randn(o, generator=gen, dtype=torch.float64) if bias else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = [None if t is None else t.to(dtype) for t in (x, wk, w1, b)]
    want = hetconv2d(*args, part, stride, padding, dilation)
    got = hetconv2d(*[None if t is None else t.cuda() for t in args], part, stride, padding, dilation)
    assert got.dtype == dtype and got.stride() == want.stride()
    scale = max(1.0, float(want.double().abs().max()))
    tol = {torch.float64: 1e-12, torch.float32: 1e-4, torch.float16: 1e-2}[dtype] * scale
    torch.testing.assert_close(got.cpu().double(), want.double(), rtol=0, atol=tol)


# ---- the Focus ops: focused_conv2d, aoi_mask, mask_resize ----------------------------------------------------------


@pytest.fixture(scope="module")
def focus_emulation():
    """tests/_focus_cuda_emulation.cpp built (seconds; cached by torch.utils.cpp_extension): the CUDA Focus kernels'
    per-element and host-side code run on the CPU as torch.ops.fxeff_focus_emu.*."""
    if shutil.which("c++") is None:
        pytest.skip("building the host emulation needs a C++ compiler (c++) on PATH")
    here = os.path.dirname(os.path.abspath(__file__))
    source = os.path.join(here, "_focus_cuda_emulation.cpp")
    digest = hashlib.sha1()
    for path in (source, os.path.join(here, "..", "csrc", "ops", "cuda", "focus_elements.cuh"),
                 os.path.join(here, "..", "csrc", "ops", "focused_conv2d.h")):
        with open(path, "rb") as f:
            digest.update(f.read())
    torch.utils.cpp_extension.load(f"fxeff_focus_cuda_emulation_{digest.hexdigest()[:12]}", [source],
                                   extra_cflags=["-O2"], is_python_module=False)
    return torch.ops.fxeff_focus_emu


def dyadic_input(shape, dtype, seed=0):
    """Multiples of 1/4 in [-2, 2]: every channel sum is exact in float, so any summation order gives the same
    mask bitwise, and many pixels sum exactly to the thresholds used (ties: >= must hold)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(-8, 9, shape, generator=gen).double() / 4).to(dtype)


def aoi_views(x):
    return {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last),
            "sliced": x[:, ::2], "transposed": x.transpose(2, 3)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_aoi_mask_code_on_the_host(focus_emulation, dtype):
    x = dyadic_input((2, 6, 7, 9), dtype)
    x[1, 2, 3, 4] = float("nan")
    for name, xv in aoi_views(x).items():
        for reduce, threshold in (("sum", 0.5), ("sum", 0.0), ("mean", 0.25), ("sum", math.inf), ("mean", -math.inf)):
            got = focus_emulation.aoi_mask(xv, threshold, reduce == "mean")
            assert torch.equal(got, aoi_mask(xv, threshold, reduce)), (name, reduce, threshold)


def test_mask_resize_code_on_the_host(focus_emulation):
    gen = torch.Generator().manual_seed(0)
    for n, h, w, oh, ow in itertools.product((1, 2), (1, 5, 16), (3, 17), (1, 4, 16, 33), (2, 17, 40)):
        mask = torch.rand(n, h, w, generator=gen) < 0.15
        assert torch.equal(focus_emulation.mask_resize(mask, oh, ow), mask_resize(mask, (oh, ow))), (h, w, oh, ow)
    mask = (torch.rand(10, 12, 2, generator=gen) < 0.3).permute(2, 0, 1)
    assert torch.equal(focus_emulation.mask_resize(mask, 5, 4), mask_resize(mask, (5, 4)))


def reference_tiles(mask, t):
    """The active t x t tiles of every image, image-major raster order, as flat tile indices."""
    n, ho, wo = mask.shape
    th, tw = -(-ho // t), -(-wo // t)
    padded = torch.zeros(n, th * t, tw * t, dtype=torch.bool)
    padded[:, :ho, :wo] = mask
    active = padded.view(n, th, t, tw, t).any(4).any(2)
    return active.flatten().nonzero().flatten()


FOCUS_CASES = [  # n, c, o, groups, kernel, stride, padding, dilation, h, w
    (2, 4, 6, 1, 3, 1, 1, 1, 19, 23),
    (1, 6, 6, 6, 3, 2, 1, 1, 20, 17),
    (3, 4, 4, 2, 5, 1, 2, 2, 16, 16),
    (2, 3, 5, 1, 1, 1, 0, 1, 9, 13),
    (2, 4, 2, 1, 3, (2, 1), (0, 2), (1, 2), 15, 21),
]


def focus_case(case, dtype=torch.float64, seed=0, density=0.05):
    n, c, o, groups, k, stride, padding, dilation, h, w = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(o, c // groups, k, k, generator=gen, dtype=torch.float64)
    bias = torch.randn(o, generator=gen, dtype=torch.float64)
    ref = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    mask = torch.rand(n, ref.shape[2], ref.shape[3], generator=gen) < density
    mask[0, :3, -4:] = True  # a blob at the border
    return [t.to(dtype) for t in (x, weight, bias)] + [mask], (stride, padding, dilation, groups)


def pair_of(v):
    return list(v) if isinstance(v, tuple) else [v, v]


@pytest.mark.parametrize("case", FOCUS_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("tile", [0, 2, 3, 8, 32])
def test_focused_conv2d_tiles_code_on_the_host(focus_emulation, case, channels_last, tile):
    """The tile flags, scan and compaction, halo gather and masked scatter of the CUDA tiles strategy equal
    F.conv2d * mask (float64), and the tile list is every active tile in image-major raster order."""
    (x, weight, bias, mask), (stride, padding, dilation, groups) = focus_case(case)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out, tiles, t, _ = focus_emulation.tiles(x, weight, bias, mask, pair_of(stride), pair_of(padding),
                                             pair_of(dilation), groups, tile)
    assert tile == 0 or t == tile
    assert torch.equal(tiles, reference_tiles(mask, t))
    want = F.conv2d(x, weight, bias, stride, padding, dilation, groups) * mask[:, None]
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_focused_conv2d_choice_on_the_host(focus_emulation):
    """The auto rule: a full mask runs dense, a small blob runs tiles (cheaper_than_dense) with a tile side that
    fits it."""
    x = torch.randn(1, 16, 64, 64)
    w = torch.randn(16, 16, 3, 3)
    full = torch.ones(1, 64, 64, dtype=torch.bool)
    blob = torch.zeros(1, 64, 64, dtype=torch.bool)
    blob[0, 10:20, 30:42] = True
    args = ([1, 1], [1, 1], [1, 1], 1, 0)
    assert not focus_emulation.tiles(x, w, None, full, *args)[3]
    _, tiles, t, cheaper = focus_emulation.tiles(x, w, None, blob, *args)
    assert cheaper and len(tiles) * t * t < 64 * 64 // 2


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_focused_conv2d_masking_code_on_the_host(focus_emulation, channels_last, dtype):
    """The dense strategy's zeroing and the backward's masked gradient keep the active outputs bitwise, zero the
    rest, in the tensor's own layout."""
    out = torch.randn(2, 5, 7, 9).to(dtype)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    mask = torch.rand(2, 7, 9) < 0.4
    got = focus_emulation.keep_active(out, mask)
    assert got.stride() == out.stride()
    assert torch.equal(got, torch.where(mask[:, None], out, torch.zeros((), dtype=dtype)))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduce,threshold", [("sum", 0.5), ("sum", 0.0), ("mean", 0.25), ("sum", -math.inf)])
def test_aoi_mask_cpu_equals_cuda(dtype, reduce, threshold):
    x = dyadic_input((3, 6, 17, 19), dtype, seed=7)
    x[2, 1, 5, 5] = float("nan")
    for name, xv in aoi_views(x).items():
        want = aoi_mask(xv, threshold, reduce)
        got = aoi_mask(xv.cuda(), threshold, reduce)
        assert got.is_cuda and got.dtype == torch.bool and got.is_contiguous()
        assert torch.equal(got.cpu(), want), name


@needs_gpu
def test_aoi_mask_cuda_large_random():
    """Random inputs (sums not exact): equal except within rounding of the threshold."""
    x = torch.randn(4, 64, 56, 56)
    want, got = aoi_mask(x, 0.5), aoi_mask(x.cuda(), 0.5).cpu()
    differs = got != want
    assert not differs.any() or bool(((x.double().sum(1) - 0.5).abs()[differs] < 1e-4).all())


@needs_gpu
def test_mask_resize_cpu_equals_cuda():
    gen = torch.Generator().manual_seed(1)
    for n, h, w, oh, ow in itertools.product((1, 3), (1, 7, 56), (5, 56), (1, 4, 28, 112), (3, 28, 113)):
        mask = torch.rand(n, h, w, generator=gen) < 0.05
        assert torch.equal(mask_resize(mask.cuda(), (oh, ow)).cpu(), mask_resize(mask, (oh, ow))), (h, w, oh, ow)
    mask = (torch.rand(10, 12, 2, generator=gen) < 0.3).permute(2, 0, 1)
    assert torch.equal(mask_resize(mask.cuda(), (5, 4)).cpu(), mask_resize(mask, (5, 4)))


@needs_gpu
@pytest.mark.parametrize("case", FOCUS_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("strategy,tile", [("dense", 0), ("tiles", 0), ("tiles", 5), ("auto", 0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_focused_conv2d_cpu_equals_cuda(case, channels_last, strategy, tile, dtype):
    (x, weight, bias, mask), conv = focus_case(case, dtype, seed=3)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    want = focused_conv2d(x, weight, bias, mask, *conv)
    with forced_strategy(strategy, tile):
        got = focused_conv2d(x.cuda(), weight.cuda(), bias.cuda(), mask.cuda(), *conv)
    assert got.dtype == dtype and got.stride() == want.stride()
    assert not got.cpu()[~mask[:, None].expand_as(want)].any()  # exactly 0 outside the mask
    scale = max(1.0, float(want.double().abs().max()))
    tol = {torch.float64: 1e-12, torch.float32: 1e-4, torch.float16: 1e-2}[dtype] * scale
    torch.testing.assert_close(got.cpu().double(), want.double(), rtol=0, atol=tol)


@needs_gpu
@pytest.mark.parametrize("case", FOCUS_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_focused_conv2d_gradients_cpu_equal_cuda(case, channels_last, dtype):
    (x, weight, bias, mask), conv = focus_case(case, dtype, seed=4, density=0.3)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(focused_conv2d(x, weight, bias, mask, *conv).shape, dtype=dtype)
    grads = []
    for device in ("cpu", "cuda"):
        ts = [t.detach().to(device).requires_grad_() for t in (x, weight, bias)]
        grads.append([t.cpu() for t in torch.autograd.grad(focused_conv2d(*ts, mask.to(device), *conv), ts,
                                                            g.to(device))])
    assert grads[1][0].stride() == grads[0][0].stride()
    tol = 1e-10 if dtype == torch.float64 else 1e-3
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@needs_gpu
def test_focused_conv2d_cuda_strategies_are_observable():
    x = torch.randn(2, 32, 64, 64, device="cuda")
    w = torch.randn(32, 32, 3, 3, device="cuda")
    full = torch.ones(2, 64, 64, dtype=torch.bool, device="cuda")
    blob = torch.zeros_like(full)
    blob[:, 10:20, 30:40] = True

    def ran(mask, strategy="auto"):
        strategy_counters(reset=True)
        with forced_strategy(strategy):
            focused_conv2d(x, w, None, mask, 1, 1)
        counts = strategy_counters(reset=True)
        return [k for k, v in counts.items() if v]

    assert ran(full) == ["dense"]
    assert ran(blob) == ["tiles"]
    assert ran(torch.zeros_like(full)) == ["empty"]
    assert ran(blob, "dense") == ["dense"]
    assert ran(blob, "crop") == ["tiles"] and ran(blob, "pixels") == ["tiles"]  # no crop/pixels on CUDA
