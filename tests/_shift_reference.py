"""Pure-PyTorch reference of fxeff::shift (REFERENCE.md section 2), written for clarity, not speed.

out[..., i] = x[..., i - s] per spatial dim; out-of-range sources follow the padding mode. "active"
interpolates linearly at the real shift; "sparse" and "grouped" use the shift rounded half away from
zero. Autograd of these functions is the contract of the op's backward: input gradients are the exact
adjoints (scatter-add where a padding maps several outputs to one input); the sparse shift gradient is
the active one at the real shift (straight-through); grouped has none.
"""
import torch

PADDINGS = ("zeros", "border", "periodic", "reflect", "symmetric")
MODES = ("sparse", "active", "grouped")


def source_index(j: torch.Tensor, size: int, padding: str):
    """(index in [0, size), valid) of the integer source positions ``j`` under ``padding``."""
    if padding == "zeros":
        return j.clamp(0, size - 1), (j >= 0) & (j < size)
    if padding == "border":
        idx = j.clamp(0, size - 1)
    elif padding == "periodic":
        idx = torch.remainder(j, size)
    elif padding == "reflect":
        if size == 1:
            idx = torch.zeros_like(j)
        else:
            period = 2 * size - 2
            m = torch.remainder(j, period)
            idx = torch.where(m < size, m, period - m)
    elif padding == "symmetric":
        period = 2 * size
        m = torch.remainder(j, period)
        idx = torch.where(m < size, m, period - 1 - m)
    else:
        raise ValueError(padding)
    return idx, torch.ones_like(j, dtype=torch.bool)


def round_half_away(s: torch.Tensor) -> torch.Tensor:
    return torch.sign(s) * torch.floor(s.abs() + 0.5)


def _take(x: torch.Tensor, axis: int, j: torch.Tensor, padding: str) -> torch.Tensor:
    """x gathered along ``axis`` at integer positions j [C, L] (per channel), padded by ``padding``."""
    idx, valid = source_index(j, x.shape[axis], padding)
    shape = [1] * x.dim()
    shape[1], shape[axis] = j.shape[0], j.shape[1]
    idx = idx.reshape(shape).expand(*x.shape[:axis], j.shape[1], *x.shape[axis + 1:])
    out = torch.gather(x, axis, idx)
    return out * valid.reshape(shape).to(x.dtype)


def _shift_axis(x: torch.Tensor, s: torch.Tensor, axis: int, padding: str, interpolate: bool) -> torch.Tensor:
    size = x.shape[axis]
    i = torch.arange(size, dtype=torch.float64)
    if not interpolate:
        j = (i[None, :] - round_half_away(s.detach().double())[:, None]).long()
        return _take(x, axis, j, padding)
    p = i[None, :] - s.double()[:, None]  # [C, L]
    f = torch.floor(p).detach()
    a = (p - f).to(x.dtype)
    shape = [1] * x.dim()
    shape[1], shape[axis] = a.shape[0], a.shape[1]
    a = a.reshape(shape)
    f = f.long()
    return (1 - a) * _take(x, axis, f, padding) + a * _take(x, axis, f + 1, padding)


def _shift_all(x, shifts, padding, interpolate):
    out = x
    for d in range(x.dim() - 2):
        out = _shift_axis(out, shifts[:, d], 2 + d, padding, interpolate)
    return out


def shift_reference(x: torch.Tensor, shifts: torch.Tensor, padding: str = "zeros", mode: str = "sparse"):
    """The op's semantics; differentiable as the op is (see the module docstring)."""
    assert padding in PADDINGS and mode in MODES
    assert shifts.shape == (x.shape[1], x.dim() - 2), (shifts.shape, x.shape)
    if mode == "active":
        return _shift_all(x, shifts, padding, True)
    out = _shift_all(x, shifts, padding, False)
    if mode == "sparse" and shifts.requires_grad:
        xd = x.detach()
        straight_through = _shift_all(xd, shifts, padding, True)
        out = out + (straight_through - straight_through.detach())
    return out
