"""Block-grained scaling (LegoDNN, ../shared/REFERENCE.md section 4): a model's single-entry single-exit blocks,
their pruned descendants, and one descendant per block chosen at run time within latency and memory budgets.

- ``fxeff.passes.Blocks`` (fxeff/passes/blocks.py): finds the blocks on the normalised graph view and reports them.
- ``fxeff.blocks.descendants``: structured filter pruning of a block's internal convs with torch-pruning (DepGraph).
- ``fxeff.blocks.retrain``: every descendant learns its block's output from one teacher pass per batch.
- ``fxeff.blocks.retrain_composed``: then the descendants train composed into the model, distilling its output.
- ``fxeff.blocks.profile``: accuracy drop, bytes, MACs, peak activation memory and latency per descendant.
- ``fxeff.blocks.select``: the exact in-process optimiser (one descendant per block, two budgets, switching cost).
- ``fxeff.blocks.ScalableModel``: select, swap in place, the Pareto series; ``build``/``load`` the artifact.
"""
from .build import build, load  # noqa: E402
from .descendants import DEFAULT_SPARSITIES, IMPORTANCES, descendant, descendants  # noqa: E402
from .profile import Entry, Profile, profile  # noqa: E402
from .retrain import block_mse, retrain, retrain_composed  # noqa: E402
from .scalable import ScalableModel  # noqa: E402
from .select import Choice, InfeasibleBudgetError, Selection, pareto_front  # noqa: E402
# the optimiser is ScalableModel.select, or fxeff.blocks.select.select (not exported here: it would hide its module)

__all__ = ["build", "load", "DEFAULT_SPARSITIES", "IMPORTANCES", "descendant", "descendants", "Entry", "Profile",
           "profile", "block_mse", "retrain", "retrain_composed", "ScalableModel", "Choice", "InfeasibleBudgetError",
           "Selection", "pareto_front"]
