"""Locates and loads fxeff's operator library (the compiled C++/CUDA kernels)."""
import glob
import os

import torch

_loaded = False


def library_path() -> str:
    """Path of the compiled operator library, for torch.ops.load_library or a C++ dlopen."""
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd")))
    if not found:
        raise ImportError(
            f"fxeff: the operator library _C*.so is not built in {here}; "
            "install with `pip install --no-build-isolation -e .` (or run `make setup`)")
    return found[0]


def load_library() -> None:
    """Registers the fxeff::* operators with the dispatcher (idempotent)."""
    global _loaded
    if not _loaded:
        torch.ops.load_library(library_path())
        _loaded = True
