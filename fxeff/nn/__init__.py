"""Drop-in modules backed by fxeff's operators; all are torch.fx leaves (see register_notrace_module)."""
from ._notrace import is_notrace_module, notrace_modules, register_notrace_module
from .focus import AoIThreshold, FocusedConv2d
from .hetconv import HetConv2d
from .narrow import NarrowConv2d
from .shift import Shift1d, Shift2d, Shift3d, sparsity_loss
from . import quantized  # noqa: E402  (fxeff.nn.quantized.Shift1d/2d/3d for torch.ao.quantization convert)

__all__ = ["AoIThreshold", "FocusedConv2d", "register_notrace_module", "is_notrace_module", "notrace_modules",
           "Shift1d", "Shift2d", "Shift3d", "sparsity_loss", "quantized", "HetConv2d",
           "NarrowConv2d"]
