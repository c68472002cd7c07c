"""fxeff: torch.fx passes and C++/CUDA operators that make trained CNNs cheaper to run.

Importing fxeff loads the operator library (torch.ops.fxeff.*) and their Python faces
(fake kernels, autograd, FLOP formulas).
"""
from ._library import library_path, load_library

load_library()

from . import ops  # noqa: E402,F401  (registers fake kernels, autograd and FLOP formulas)
from . import focus, nn, passes, report  # noqa: E402  (focus: calibrate, render)
from .passes import (Blocks, FoldBatchNorm, Focus, FuseShift, Glance, HetConv, Shift,  # noqa: E402
                     config_from_dict, run_passes)
from .report import Report, SiteReport  # noqa: E402
from .transform import TraceError, transform  # noqa: E402
from .distill import finetune  # noqa: E402  (the function: recovery fine-tuning by distillation)

__version__ = "0.1.0"
__all__ = ["library_path", "load_library", "ops", "focus", "nn", "passes", "report", "transform", "TraceError", "Focus",
           "Shift", "FuseShift", "FoldBatchNorm",
           "HetConv", "Blocks", "Glance", "config_from_dict", "run_passes", "Report", "SiteReport",
           "finetune"]
