"""shift: per-channel spatial shifts (shift1d/2d/3d by the input's rank), the zero-FLOP stand-in of a
depthwise conv (REFERENCE.md section 2).

Contract: out[n, c, ..., i] = x[n, c, ..., i - s] with s = shifts[c, d] along spatial dim d; sources
outside the input follow ``padding``. "sparse" and "grouped" shift by s rounded half away from zero;
"active" interpolates linearly at the real s. Gradients: x gets the exact adjoint of the forward;
shifts get the derivative of the linear interpolation at the real s ("active" exactly, "sparse"
straight-through); "grouped" shifts are fixed (no gradient).
"""
from typing import List, Sequence

import torch
import torch.nn.functional as F

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


def _setup_context(ctx, inputs, output):
    x, shifts, padding, mode = inputs
    ctx.padding, ctx.mode = padding, mode
    needs_shift_grad = mode != "grouped" and ctx.needs_input_grad[1]
    ctx.save_for_backward(x if needs_shift_grad else None, shifts)


def _backward(ctx, grad_out):
    x, shifts = ctx.saved_tensors
    grad_x = grad_shifts = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.fxeff.shift_input_grad(grad_out, shifts, ctx.padding, ctx.mode)
    if x is not None:
        grad_shifts = torch.ops.fxeff.shift_shifts_grad(grad_out, x, shifts, ctx.padding)
    return grad_x, grad_shifts, None, None


torch.library.register_autograd("fxeff::shift", _backward, setup_context=_setup_context)


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


def _window_mean_adjoint(grad: torch.Tensor, lengths: Sequence[int], pool: Sequence[int]) -> torch.Tensor:
    """Each element of the padded signal gets its window's gradient / the window's element count."""
    for d, (n, s) in enumerate(zip(lengths, pool)):
        if s == 1:
            continue
        axis = 2 + d
        counts = (n - s * torch.arange(grad.shape[axis], device=grad.device)).clamp(max=s).to(grad.dtype)
        shape = [1] * grad.dim()
        shape[axis] = -1
        grad = (grad / counts.reshape(shape)).repeat_interleave(s, dim=axis).narrow(axis, 0, n)
    return grad


def _shift_pool_setup_context(ctx, inputs, output):
    x, shifts, padding, mode, pad, pool = inputs
    ctx.padding, ctx.mode, ctx.pad, ctx.pool = padding, mode, list(pad), list(pool)
    ctx.sizes = list(x.shape[2:])
    needs_shift_grad = mode != "grouped" and ctx.needs_input_grad[1]
    ctx.save_for_backward(x if needs_shift_grad else None, shifts)


def _shift_pool_backward(ctx, grad_out):
    """The adjoints in reverse: window mean, F.pad (its adjoint is F.pad with the negated amounts), shift."""
    x, shifts = ctx.saved_tensors
    dims = len(ctx.sizes)
    lengths = [ctx.sizes[d] + ctx.pad[2 * (dims - 1 - d)] + ctx.pad[2 * (dims - 1 - d) + 1] for d in range(dims)]
    grad = _window_mean_adjoint(grad_out, lengths, ctx.pool)
    if any(ctx.pad):
        grad = F.pad(grad, [-p for p in ctx.pad])
    grad = grad.contiguous(memory_format=memory_format_of(grad_out))
    grad_x = grad_shifts = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.fxeff.shift_input_grad(grad, shifts, ctx.padding, ctx.mode)
    if x is not None:
        grad_shifts = torch.ops.fxeff.shift_shifts_grad(grad, x, shifts, ctx.padding)
    return grad_x, grad_shifts, None, None, None, None


torch.library.register_autograd("fxeff::shift_pool", _shift_pool_backward, setup_context=_shift_pool_setup_context)
