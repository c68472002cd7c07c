"""The CUDA kernels of the shift family and hetconv2d: a build check that runs anywhere (a CUDA build registers a
CUDA kernel for every op that has a CPU one), and CPU-vs-CUDA agreement on the same inputs, which needs a GPU
(bitwise for the sparse and grouped shifts: they copy values; allclose where the two devices sum differently)."""
import hashlib
import itertools
import os
import shutil

import pytest
import torch
import torch.utils.cpp_extension

from fxeff.ops import SHIFT_MODES, SHIFT_PADDINGS, hetconv2d, shift

# The ops of this part of issue 6 (focused_conv2d and the mask ops are not in it).
CUDA_OPS = ["shift", "shift_pool", "shift_input_grad", "shift_shifts_grad", "hetconv2d"]

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
