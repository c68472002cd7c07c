"""Quantized shift modules for torch.ao.quantization's eager convert (prepare -> calibrate -> convert).

An integer shift moves quantized values without arithmetic, so the quantized layer takes a
quint8/qint8 tensor and returns one with the same scale and zero_point: out equals
quantize(shift(dequantize(x))) exactly (the average pooling of a strided emulate_dw rounds once
more, as torch's quantized avg_pool does). Only "sparse" and "grouped" (rounded shifts) quantize;
"active" interpolates between values and is refused.

Use ``convert(model, mapping=static_quant_module_mappings())`` (torch's default static mapping
plus ``QUANTIZED_MODULE_MAPPING``). The shift layers need no observer: their output keeps the
input's quantization parameters.
"""
from typing import Dict, List, Optional

import torch
from torch import nn

from .. import ops
from ._notrace import register_notrace_module
from . import shift as _float
from .shift import check_padding_mode, dw_emulation, dw_pad_and_pool, normalize_emulate_dw


class _QuantizedShiftNd(nn.Module):
    """Fixed (buffer) shifts applied to quantized tensors; built by ``from_float``."""

    _FLOAT_MODULE = _float._ShiftNd
    dims: int = 0
    _pad: List[int]
    _pool: List[int]

    def __init__(self, shifts: torch.Tensor, padding: str = "zeros", mode: str = "sparse",
                 emulate_dw: Optional[dict] = None):
        super().__init__()
        where = f"fxeff.nn.quantized.{type(self).__name__}"
        check_padding_mode(where, padding, mode)
        if mode == "active":
            raise ValueError(f"{where}: mode 'active' interpolates between values and has no quantized form; "
                             f"use mode 'sparse' or 'grouped' (rounded shifts), got mode='active'")
        if not isinstance(shifts, torch.Tensor) or not shifts.is_floating_point() or shifts.dim() != 2 \
                or shifts.shape[1] != self.dims:
            got = f"{tuple(shifts.shape)} {shifts.dtype}" if isinstance(shifts, torch.Tensor) else type(shifts).__name__
            raise ValueError(f"{where}: shifts must be a floating tensor [C, {self.dims}], got {got}")
        self.channels, self.padding, self.mode = shifts.shape[0], padding, mode
        self.emulate_dw = normalize_emulate_dw(where, emulate_dw, self.dims)
        self._where = where
        self._pad, self._pool = dw_pad_and_pool(self.emulate_dw)
        self.register_buffer("shifts", shifts.detach().clone())

    @classmethod
    def from_float(cls, mod: nn.Module, use_precomputed_fake_quant: bool = False) -> "_QuantizedShiftNd":
        """The quantized layer of a float Shift{1,2,3}d (its current shifts, copied).

        ``use_precomputed_fake_quant`` is part of torch's from_float protocol; a shift has no weight
        to fake-quantize, so it changes nothing here.
        """
        if type(mod) is not cls._FLOAT_MODULE:
            raise TypeError(f"fxeff.nn.quantized.{cls.__name__}.from_float: expected "
                            f"fxeff.nn.{cls._FLOAT_MODULE.__name__}, got {type(mod).__name__}")
        return cls(mod.shifts, mod.padding, mod.mode, mod.emulate_dw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_quantized:
            raise ValueError(f"{self._where}: expected a quantized (quint8/qint8) input, got {x.dtype}; "
                             f"put a QuantStub before it or use the float module")
        out = ops.shift(x, self.shifts, self.padding, self.mode)
        if len(self._pad) > 0 or len(self._pool) > 0:
            out = dw_emulation(out, self._pad, self._pool, self._where)
        return out

    def _get_name(self) -> str:
        return "Quantized" + type(self).__name__  # as torch's QuantizedConv2d: tells it from the float layer

    def extra_repr(self) -> str:
        text = f"{self.channels}, padding={self.padding!r}, mode={self.mode!r}"
        if self.emulate_dw is not None:
            text += ", emulate_dw=" + repr({k: v[0] if len(set(v)) == 1 else v for k, v in self.emulate_dw.items()})
        return text


@register_notrace_module
class Shift1d(_QuantizedShiftNd):
    _FLOAT_MODULE = _float.Shift1d
    dims = 1


@register_notrace_module
class Shift2d(_QuantizedShiftNd):
    _FLOAT_MODULE = _float.Shift2d
    dims = 2


@register_notrace_module
class Shift3d(_QuantizedShiftNd):
    _FLOAT_MODULE = _float.Shift3d
    dims = 3


QUANTIZED_MODULE_MAPPING: Dict[type, type] = {cls._FLOAT_MODULE: cls for cls in
                                              (Shift1d, Shift2d, Shift3d)}


def static_quant_module_mappings() -> Dict[type, type]:
    """torch.ao.quantization's default static module mapping with fxeff's shift layers added (for convert)."""
    from torch.ao.quantization.quantization_mappings import get_default_static_quant_module_mappings

    return {**get_default_static_quant_module_mappings(), **QUANTIZED_MODULE_MAPPING}


__all__ = ["Shift1d", "Shift2d", "Shift3d", "QUANTIZED_MODULE_MAPPING", "static_quant_module_mappings"]
