"""Modules that torch.fx must keep whole (leaves), as timm's register_notrace_module.

fxeff's own modules call fxeff ops and are registered here; users may register theirs too.
"""
from typing import Set, Type

import torch

_NOTRACE_MODULES: Set[Type[torch.nn.Module]] = set()


def register_notrace_module(cls: Type[torch.nn.Module]) -> Type[torch.nn.Module]:
    """Class decorator: symbolic tracing in fxeff keeps instances of ``cls`` as single call_module nodes."""
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise TypeError(f"fxeff.nn.register_notrace_module: expected an nn.Module subclass, got {cls!r}")
    _NOTRACE_MODULES.add(cls)
    return cls


def is_notrace_module(module: torch.nn.Module) -> bool:
    """Whether fxeff's tracer keeps ``module`` as a leaf."""
    return isinstance(module, tuple(_NOTRACE_MODULES))


def notrace_modules() -> Set[Type[torch.nn.Module]]:
    return set(_NOTRACE_MODULES)
