"""Drop-in modules backed by fxeff's operators; all are torch.fx leaves (see register_notrace_module)."""
from ._notrace import is_notrace_module, notrace_modules, register_notrace_module
from .focus import AoIThreshold, FocusedConv2d

__all__ = ["AoIThreshold", "FocusedConv2d", "register_notrace_module", "is_notrace_module", "notrace_modules"]
