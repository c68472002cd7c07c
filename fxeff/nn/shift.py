"""Shift layers (REFERENCE.md section 2): per-channel spatial shifts that replace depthwise convs at zero FLOPs.

``Shift1d/2d/3d`` hold the shifts [C, dims] (a Parameter for "sparse"/"active", fixed integers in a
buffer for "grouped") and call ``fxeff.ops.shift``. ``emulate_dw`` makes a layer a drop-in for the
depthwise conv it replaces: same output shape (crop/zero-pad, then average pooling for a stride)
and an initial range matching the conv's receptive field.

They are registered notrace modules: fxeff's tracer keeps each as one call_module node, so the
shift pass, ``sparsity_loss(gm)`` and quantization ``convert`` (which find and swap modules by
type) see them after ``fxeff.transform``. Their forward has no data-dependent Python, so plain
``torch.fx.symbolic_trace``, dynamo, torch.export and TorchScript trace through it too.
"""
import itertools
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops.focused_conv2d import conv_output_size
from ._notrace import register_notrace_module

EMULATE_DW_KEYS = ("kernel_size", "stride", "padding", "dilation")
_EMULATE_DW_DEFAULTS = {"stride": 1, "padding": 0, "dilation": 1}
_EMULATE_DW_MIN = {"kernel_size": 1, "stride": 1, "padding": 0, "dilation": 1}
INIT_RULES = (1, 2)


def _ints(where: str, name: str, value, dims: int, minimum: int) -> Tuple[int, ...]:
    """An int or a dims-sequence of ints (each >= minimum) as a dims-tuple."""
    values = [value] * dims if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(values, (tuple, list)) or len(values) != dims
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in values)):
        raise ValueError(f"{where}: emulate_dw[{name!r}] must be an int or {dims} ints, got {value!r}")
    if any(v < minimum for v in values):
        raise ValueError(f"{where}: emulate_dw[{name!r}] must be >= {minimum}, got {value!r}")
    return tuple(values)


def normalize_emulate_dw(where: str, emulate_dw, dims: int) -> Optional[Dict[str, Tuple[int, ...]]]:
    """emulate_dw with every key present as a dims-tuple of ints; None stays None."""
    if emulate_dw is None:
        return None
    if not isinstance(emulate_dw, dict):
        raise TypeError(f"{where}: emulate_dw must be a dict with keys {EMULATE_DW_KEYS}, "
                        f"got {type(emulate_dw).__name__}")
    unknown = sorted(set(emulate_dw) - set(EMULATE_DW_KEYS), key=str)
    if unknown:
        raise ValueError(f"{where}: emulate_dw has unknown keys {unknown}; expected a subset of {EMULATE_DW_KEYS}")
    if "kernel_size" not in emulate_dw:
        raise ValueError(f"{where}: emulate_dw must give 'kernel_size', got keys {sorted(emulate_dw)}")
    merged = {**_EMULATE_DW_DEFAULTS, **emulate_dw}
    return {key: _ints(where, key, merged[key], dims, _EMULATE_DW_MIN[key]) for key in EMULATE_DW_KEYS}


def dw_pad_and_pool(emulate_dw: Optional[Dict[str, Tuple[int, ...]]]) -> Tuple[List[int], List[int]]:
    """F.pad amounts (last dim first; negative = crop) and avg-pool strides that give the conv's output shape.

    Per dim the conv's output (before stride) is L + 2p - d(k-1), i.e. the shifted L cropped by
    t = d(k-1) - 2p (t//2 at the start, the rest at the end), or zero-padded by -t when t < 0.
    Empty lists when nothing is needed.
    """
    if emulate_dw is None:
        return [], []
    pad: List[int] = []
    for k, p, d in reversed(list(zip(emulate_dw["kernel_size"], emulate_dw["padding"], emulate_dw["dilation"]))):
        t = d * (k - 1) - 2 * p
        pad += [-(t // 2), -(t - t // 2)] if t >= 0 else [(-t) // 2, -t - (-t) // 2]
    pool = list(emulate_dw["stride"])
    return (pad if any(pad) else []), (pool if any(s > 1 for s in pool) else [])


def fused_pad_and_pool(pad: List[int], pool: List[int], dims: int) -> Tuple[List[int], List[int]]:
    """dw_pad_and_pool's lists in fxeff.ops.shift_pool's form: every dim present (0 pad, window 1)."""
    return (list(pad) if pad else [0] * (2 * dims)), (list(pool) if pool else [1] * dims)


@torch.fx.wrap
def dw_emulation(x: torch.Tensor, pad: List[int], pool: List[int], where: str) -> torch.Tensor:
    """Crops/zero-pads by ``pad`` then average-pools (kernel = stride = ``pool``, ceil_mode) the shifted,
    quantized x (the quantized shift modules; float layers run the fused ``fxeff.ops.shift_pool``).

    A torch.fx leaf so that plain symbolic_trace keeps the size check (an input too small for the
    emulated conv is an error, as it is for the conv) out of the traced graph's Python.
    """
    if len(pad) > 0:
        dims = len(pad) // 2
        for d in range(dims if not torch.jit.is_tracing() else 0):  # a traced graph would not keep the check
            size = x.shape[x.dim() - 1 - d] + pad[2 * d] + pad[2 * d + 1]
            if size < 1:
                raise ValueError(f"{where}: input size {x.shape[x.dim() - 1 - d]} along spatial dim "
                                 f"{dims - 1 - d} is too small for the emulated depthwise conv "
                                 f"(output size {size} < 1)")
        x = F.pad(x, pad)
    if len(pool) > 0:
        if not x.is_quantized:
            raise TypeError(f"{where}: dw_emulation pools quantized tensors; float shift layers use "
                            f"fxeff.ops.shift_pool, got {x.dtype}")
        x = _quantized_window_mean(x, pool)
    return x


def _avg_pool(x: torch.Tensor, kernel: List[int], stride: List[int], ceil_mode: bool) -> torch.Tensor:
    if len(kernel) == 1:
        return F.avg_pool1d(x, kernel, stride, 0, ceil_mode)
    if len(kernel) == 2:
        return F.avg_pool2d(x, kernel, stride, 0, ceil_mode)
    return F.avg_pool3d(x, kernel, stride, 0, ceil_mode)


def _quantized_window_mean(x: torch.Tensor, pool: List[int]) -> torch.Tensor:
    """Means over windows = strides = pool (the last clipped) of a quantized tensor: torch's quantized
    avg_pool with ceil_mode (it rounds once more than the float result)."""
    first = x.dim() - len(pool)
    # avg_pool3d refuses a kernel longer than the input: such a dim has one window, the whole length
    kernel = [min(s, x.shape[first + i]) for i, s in enumerate(pool)]
    return _avg_pool(x, kernel, pool, True)


def _check_real(where: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: {name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: {name} must be finite and >= 0, got {value}")
    return value


def check_padding_mode(where: str, padding, mode) -> None:
    if padding not in ops.SHIFT_PADDINGS:
        raise ValueError(f"{where}: padding must be one of {ops.SHIFT_PADDINGS}, got {padding!r}")
    if mode not in ops.SHIFT_MODES:
        raise ValueError(f"{where}: mode must be one of {ops.SHIFT_MODES}, got {mode!r}")


def grouped_shifts(channels: int, ranges: Sequence[int], where: str = "fxeff.nn.grouped_shifts") -> torch.Tensor:
    """Wu et al.'s grouped shift: equal consecutive channel groups on each integer offset of the neighbourhood.

    The offsets are every combination of -k_d..k_d per dim (lexicographic, dim 0 slowest);
    ``channels // n_offsets`` channels go to each, the remainder to offset 0. float32 [channels, dims].
    """
    offsets = list(itertools.product(*(range(-k, k + 1) for k in ranges)))
    per_offset = channels // len(offsets)
    if per_offset == 0:
        raise ValueError(f"{where}: mode 'grouped' needs channels >= the {len(offsets)} offsets of a "
                         f"{'x'.join(str(2 * k + 1) for k in ranges)} neighbourhood, got channels={channels}")
    shifts = torch.zeros(channels, len(ranges))
    for group, offset in enumerate(offsets):
        shifts[group * per_offset:(group + 1) * per_offset] = torch.tensor(offset, dtype=torch.float32)
    return shifts


class _ShiftNd(nn.Module):
    """Base of Shift1d/2d/3d; ``dims`` is the number of spatial dims (a class constant).

    The initial range r (per dim) is ``init_shift`` when given, else dilation * (kernel_size // 2) of
    ``emulate_dw`` (the depthwise conv's reach), else 1.0; "grouped" uses k = int(r) as the
    neighbourhood radius. ``emulate_dw`` = dict(kernel_size, stride=1, padding=0, dilation=1) (ints
    or per-dim tuples) makes the output shape that of that depthwise conv.
    """

    dims: int = 0
    _pad: List[int]
    _pool: List[int]
    _fused_pad: List[int]
    _fused_pool: List[int]

    def __init__(self, channels: int, padding: str = "zeros", mode: str = "sparse", init_shift: Optional[float] = None,
                 sparsity_term: float = 5e-4, init_rule: int = 1, emulate_dw: Optional[dict] = None,
                 device=None, dtype=None):
        super().__init__()
        where = f"fxeff.nn.{type(self).__name__}"
        if isinstance(channels, bool) or not isinstance(channels, int) or channels <= 0:
            raise ValueError(f"{where}: channels must be a positive int, got {channels!r}")
        check_padding_mode(where, padding, mode)
        if type(init_rule) is not int or init_rule not in INIT_RULES:
            raise ValueError(f"{where}: init_rule must be 1 (uniform(-r, r)) or 2 (uniform(0, r) with a random "
                             f"sign), got {init_rule!r}")
        self.sparsity_term = _check_real(where, "sparsity_term", sparsity_term)
        self.emulate_dw = normalize_emulate_dw(where, emulate_dw, self.dims)
        if init_shift is None and self.emulate_dw is not None:
            self.init_range = tuple(float(d * (k // 2)) for k, d in zip(self.emulate_dw["kernel_size"],
                                                                      self.emulate_dw["dilation"]))
        else:
            self.init_range = (_check_real(where, "init_shift", 1.0 if init_shift is None else init_shift),) * self.dims
        self.channels, self.padding, self.mode, self.init_rule = channels, padding, mode, init_rule
        self._where = where
        self._pad, self._pool = dw_pad_and_pool(self.emulate_dw)
        self._fused_pad, self._fused_pool = fused_pad_and_pool(self._pad, self._pool, self.dims)
        factory = {"device": device, "dtype": dtype}
        if mode == "grouped":
            ranges = [int(r) for r in self.init_range]
            self.register_buffer("shifts", grouped_shifts(channels, ranges, where).to(**factory))
        else:
            self.shifts = nn.Parameter(torch.empty(channels, self.dims, **factory))
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draws the shifts by init_rule (1: uniform(-r, r); 2: uniform(0, r) with a random sign), r per dim."""
        if self.mode == "grouped":
            return  # fixed by construction
        with torch.no_grad():
            r = torch.tensor(self.init_range, dtype=self.shifts.dtype, device=self.shifts.device)
            u = torch.rand_like(self.shifts)
            if self.init_rule == 1:
                self.shifts.copy_((2 * u - 1) * r)
            else:
                sign = torch.randint_like(self.shifts, 0, 2) * 2 - 1
                self.shifts.copy_(u * r * sign)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self._pad) > 0 or len(self._pool) > 0:  # the emulated conv's crop/pad and stride, fused
            return ops.shift_pool(x, self.shifts, self.padding, self.mode, self._fused_pad, self._fused_pool)
        return ops.shift(x, self.shifts, self.padding, self.mode)

    def sparsity_loss(self) -> torch.Tensor:
        """The L1 penalty sparsity_term * sum|shifts| (FE-Net); a constant for "grouped" (fixed shifts)."""
        return self.sparsity_term * self.shifts.abs().sum()

    def output_size(self, *sizes: int) -> Tuple[int, ...]:
        """The output's spatial sizes for input spatial sizes ``sizes`` (those of the emulated conv)."""
        if len(sizes) != self.dims:
            raise ValueError(f"{self._where}.output_size: expected {self.dims} sizes, got {len(sizes)}")
        if self.emulate_dw is None:
            return tuple(sizes)
        e = self.emulate_dw
        return tuple(conv_output_size(*args) for args in zip(sizes, e["kernel_size"], e["stride"], e["padding"],
                                                                e["dilation"]))

    def extra_repr(self) -> str:
        text = f"{self.channels}, padding={self.padding!r}, mode={self.mode!r}, sparsity_term={self.sparsity_term}"
        if self.emulate_dw is not None:
            text += ", emulate_dw=" + repr({k: v[0] if len(set(v)) == 1 else v for k, v in self.emulate_dw.items()})
        return text


@register_notrace_module
class Shift1d(_ShiftNd):
    """Per-channel shifts of x [N, C, L]; shifts [C, 1]."""

    dims = 1


@register_notrace_module
class Shift2d(_ShiftNd):
    """Per-channel shifts of x [N, C, H, W]; shifts [C, 2] (column 0 = H, column 1 = W)."""

    dims = 2


@register_notrace_module
class Shift3d(_ShiftNd):
    """Per-channel shifts of x [N, C, D, H, W]; shifts [C, 3]."""

    dims = 3


def shift_modules(model: nn.Module) -> List[_ShiftNd]:
    return [m for m in model.modules() if isinstance(m, _ShiftNd)]


def sparsity_loss(model: nn.Module) -> torch.Tensor:
    """Sum of ``sparsity_loss()`` over the model's shift modules (add it to the training loss).

    A model without any is an error rather than a silent 0: it usually means the loss is taken on
    the original model instead of the transformed one.
    """
    modules = shift_modules(model)
    if not modules:
        raise ValueError(f"fxeff.nn.sparsity_loss: {type(model).__name__} has no fxeff shift modules "
                         "(Shift1d/2d/3d); take the loss on the transformed model")
    total = modules[0].sparsity_loss()
    for module in modules[1:]:
        total = total + module.sparsity_loss()
    return total


__all__ = ["Shift1d", "Shift2d", "Shift3d", "sparsity_loss", "shift_modules", "grouped_shifts",
           "normalize_emulate_dw"]
