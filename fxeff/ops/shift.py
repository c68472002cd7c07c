"""shift: per-channel spatial shifts (shift1d/2d/3d by the input's rank), the zero-FLOP stand-in of a
depthwise conv (REFERENCE.md section 2).

Contract: out[n, c, ..., i] = x[n, c, ..., i - s] with s = shifts[c, d] along spatial dim d; sources
outside the input follow ``padding``. "sparse" and "grouped" shift by s rounded half away from zero;
"active" interpolates linearly at the real s. Gradients: x gets the exact adjoint of the forward;
shifts get the derivative of the linear interpolation at the real s ("active" exactly, "sparse"
straight-through); "grouped" shifts are fixed (no gradient).
"""
from typing import List, Optional, Sequence

import torch

from ._utils import memory_format_of

SHIFT_PADDINGS = ("zeros", "border", "periodic", "reflect", "symmetric")
SHIFT_MODES = ("sparse", "active", "grouped")


@torch.fx.wrap
def shift(x: torch.Tensor, shifts: torch.Tensor, padding: str = "zeros", mode: str = "sparse") -> torch.Tensor:
    """x [N, C, *spatial] shifted per channel by ``shifts`` [C, dims] (out[i] = x[i - s])."""
    return torch.ops.fxeff.shift(x, shifts, padding, mode)


def _check(x, shifts, padding, mode):
    torch._check(3 <= x.dim() <= 5, lambda: f"fxeff.shift: x must be 3-D, 4-D or 5-D [N, C, *spatial], got "
                                            f"{x.dim()}-D")
    torch._check(shifts.dim() == 2 and shifts.shape[0] == x.shape[1] and shifts.shape[1] == x.dim() - 2,
                 lambda: f"fxeff.shift: shifts must be [C, dims] = [{x.shape[1]}, {x.dim() - 2}], got "
                         f"{list(shifts.shape)}")
    torch._check(shifts.dtype.is_floating_point, lambda: f"fxeff.shift: shifts must be floating point, got "
                                                         f"{shifts.dtype}")
    torch._check(padding in SHIFT_PADDINGS, lambda: f"fxeff.shift: padding must be one of {SHIFT_PADDINGS}, got "
                                                    f"{padding!r}")
    torch._check(mode in SHIFT_MODES, lambda: f"fxeff.shift: mode must be one of {SHIFT_MODES}, got {mode!r}")


def _like(x):
    return torch.empty_like(x, memory_format=memory_format_of(x))


@torch.library.register_fake("fxeff::shift")
def _shift_fake(x, shifts, padding, mode):
    _check(x, shifts, padding, mode)
    return _like(x)


@torch.library.register_fake("fxeff::shift_input_grad")
def _shift_input_grad_fake(grad_out, shifts, padding, mode):
    _check(grad_out, shifts, padding, mode)
    return _like(grad_out)


@torch.library.register_fake("fxeff::shift_shifts_grad")
def _shift_shifts_grad_fake(grad_out, x, shifts, padding):
    _check(x, shifts, padding, "active")
    return torch.empty_like(shifts, memory_format=torch.contiguous_format)


# Autograd of shift and shift_pool: csrc/ops/autograd.cpp (C++, so that inference never enters Python), with the
# ops shift_input_grad (the adjoint) and shift_shifts_grad.


# ---------------------------------------------------------------- shift_pool: a shift layer emulating a strided conv

@torch.fx.wrap
def shift_pool(x: torch.Tensor, shifts: torch.Tensor, padding: str, mode: str, pad: List[int],
               pool: List[int]) -> torch.Tensor:
    """``window_mean(F.pad(shift(x, shifts, padding, mode), pad), pool)`` in one op: the depthwise-conv
    emulation of a shift layer (pad in F.pad order, negative = crop; windows = strides = ``pool``, the last
    window clipped as avg_pool's ceil_mode)."""
    return torch.ops.fxeff.shift_pool(x, shifts, padding, mode, pad, pool)


def pooled_sizes(sizes: Sequence[int], pad: Sequence[int], pool: Sequence[int]) -> List[int]:
    """Output spatial sizes of shift_pool: ceil((L + pad_before + pad_after) / pool) per dim."""
    dims = len(sizes)
    lengths = [sizes[d] + pad[2 * (dims - 1 - d)] + pad[2 * (dims - 1 - d) + 1] for d in range(dims)]
    return [(n + s - 1) // s for n, s in zip(lengths, pool)]


@torch.library.register_fake("fxeff::shift_pool")
def _shift_pool_fake(x, shifts, padding, mode, pad, pool):
    _check(x, shifts, padding, mode)
    torch._check(len(pad) == 2 * (x.dim() - 2) and len(pool) == x.dim() - 2,
                 lambda: f"fxeff.shift_pool: pad must have {2 * (x.dim() - 2)} and pool {x.dim() - 2} entries, got "
                         f"{list(pad)} and {list(pool)}")
    out = x.new_empty((x.shape[0], x.shape[1], *pooled_sizes(list(x.shape[2:]), pad, pool)))
    return out.contiguous(memory_format=memory_format_of(x))


# ---------------------------------------------------------------- shift_conv1x1: the shift fused into a 1x1 conv

@torch.fx.wrap
def shift_conv1x1(x: torch.Tensor, shifts: torch.Tensor, padding: str, mode: str, pad: List[int], pool: List[int],
                  scale: Optional[torch.Tensor], offset: Optional[torch.Tensor], clamp_min: Optional[float],
                  clamp_max: Optional[float], weight: torch.Tensor, bias: Optional[torch.Tensor] = None
                  ) -> torch.Tensor:
    """``conv2d(clamp(shift_pool(x, ...) * scale + offset, clamp_min, clamp_max), weight, bias)`` in one op,
    inference only: a shift layer, its BatchNorm folded to a per-channel ``scale`` and ``offset`` [C] (both or
    neither), a clamp activation (ReLU, ReLU6, Hardtanh; None bounds are open) and the 1x1 conv (``weight`` [O, C,
    1, 1], stride 1, no padding) that reads them. The shifted map never reaches memory: NCHW runs it in L2-sized
    chunks of channels, each one GEMM into the output. x: 4-D float32/float64, NCHW or channels_last (the output
    follows). ``fxeff.passes.FuseShift`` rewrites graphs into it. A call that needs grad runs as that composition
    (differentiable, not fused)."""
    return torch.ops.fxeff.shift_conv1x1(x, shifts, padding, mode, pad, pool, scale, offset, clamp_min, clamp_max,
                                         weight, bias)


@torch.library.register_fake("fxeff::shift_conv1x1")
def _shift_conv1x1_fake(x, shifts, padding, mode, pad, pool, scale, offset, clamp_min, clamp_max, weight, bias):
    _check(x, shifts, padding, mode)
    torch._check(x.dim() == 4, lambda: f"fxeff.shift_conv1x1: x must be 4-D, got {x.dim()}-D")
    torch._check(weight.dim() == 4 and weight.shape[1] == x.shape[1] and weight.shape[2] == 1 and weight.shape[3] == 1,
                 lambda: f"fxeff.shift_conv1x1: weight must be [O, {x.shape[1]}, 1, 1], got {list(weight.shape)}")
    torch._check(len(pad) == 4 and len(pool) == 2,
                 lambda: f"fxeff.shift_conv1x1: pad must have 4 and pool 2 entries, got {list(pad)} and {list(pool)}")
    out = x.new_empty((x.shape[0], weight.shape[0], *pooled_sizes(list(x.shape[2:]), pad, pool)))
    return out.contiguous(memory_format=memory_format_of(x))
