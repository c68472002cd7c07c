"""Descendants of a block: structured filter pruning of its internal convs with torch-pruning (DepGraph).

A descendant is a real, smaller copy of the block (its convs hold fewer filters, and the layers that read them
fewer input channels), not a mask: fewer MACs and fewer bytes. The convs that produce the block's output, and
those whose channels meet the block's input in an elementwise op, keep every filter (``fxeff.passes.Blocks``
names the others ``prunable``), so every descendant reads and returns the shapes the block does and can take its
place. torch-pruning's dependency graph keeps the coupled layers consistent: BatchNorm, the next conv's input
channels, grouped and depthwise convs, concat, squeeze-excitation.
"""
import copy
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn

DEFAULT_SPARSITIES = (0.0, 0.2, 0.4, 0.6, 0.8)
IMPORTANCES = ("l1", "group_l1", "l2", "lamp", "bn_scale", "random")
# layers torch-pruning would prune and fxeff counts as convs or linears: every one not named prunable is kept whole
_PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)


def importance(name: str):
    """torch-pruning's importance criterion called ``name``: "l1" (the seed's: the L1 norm of each pruned conv's
    filter alone), "group_l1" (DepGraph's: the L1 norms of every coupled layer's slices, averaged), "l2" (group
    L2), "lamp" (layer-adaptive magnitude), "bn_scale" (the following BatchNorm's |gamma|) or "random"."""
    import torch_pruning as tp

    criteria = {"l1": lambda: tp.importance.MagnitudeImportance(p=1, group_reduction="first", normalizer=None),
                "group_l1": lambda: tp.importance.MagnitudeImportance(p=1),
                "l2": lambda: tp.importance.MagnitudeImportance(p=2),
                "lamp": lambda: tp.importance.LAMPImportance(),
                "bn_scale": lambda: tp.importance.BNScaleImportance(),
                "random": lambda: tp.importance.RandomImportance()}
    if name not in criteria:
        raise ValueError(f"fxeff.blocks: importance must be one of {IMPORTANCES}, got {name!r}")
    return criteria[name]()


def _check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"fxeff.blocks: a sparsity must be a float in [0, 1), got {sparsity!r}")
    return float(sparsity)


def descendant(block: nn.Module, example_input: torch.Tensor, sparsity: float, prunable: Sequence[str],
               importance_name: str = "l1", round_to: Optional[int] = None) -> nn.Module:
    """A copy of ``block`` with ``sparsity`` of the filters of each conv named in ``prunable`` (module names in
    ``block``) removed, by ``importance_name`` (see ``importance``), channel counts rounded to multiples of
    ``round_to`` (e.g. 8: counts the vendor kernels run fast). Sparsity 0: an unchanged copy. ``example_input``:
    one value of the block's input (for torch-pruning's dependency graph). The block itself is not changed."""
    sparsity = _check_sparsity(sparsity)
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"fxeff.blocks: round_to must be an int >= 1 or None, got {round_to!r}")
    modules = dict(block.named_modules())
    missing = [name for name in prunable if name not in modules]
    if missing:
        raise ValueError(f"fxeff.blocks: prunable names {missing} are not modules of the block "
                         f"(its modules: {[n for n, m in modules.items() if isinstance(m, _PRUNABLE_TYPES)]})")
    criterion = importance(importance_name)
    child = copy.deepcopy(block)
    if sparsity == 0.0 or not prunable:
        return child
    import torch_pruning as tp

    child_modules = dict(child.named_modules())
    keep = set(prunable)
    ignored = [m for name, m in child_modules.items() if isinstance(m, _PRUNABLE_TYPES) and name not in keep]
    x = example_input[:1].detach().clone()  # a block may write its input in place
    with torch.no_grad():
        expected = block(x)
    modes = {name: m.training for name, m in child.named_modules()}  # each layer's own, restored below
    child.eval()
    with torch.random.fork_rng():  # "random" prunes the same filters every time: load() rebuilds descendants
        torch.manual_seed(0)
        pruner = tp.pruner.MetaPruner(child, x, importance=criterion, pruning_ratio=sparsity,
                                      ignored_layers=ignored, round_to=round_to)
        pruner.step()
    with torch.no_grad():
        out = child(x)
    for name, m in child.named_modules():
        m.training = modes.get(name, modes[""])  # a layer torch-pruning made anew takes the block's mode
    if out.shape != expected.shape:  # never seen: the kept layers hold the block's output shape
        raise RuntimeError(f"fxeff.blocks: the descendant at sparsity {sparsity} returns {tuple(out.shape)}, the "
                           f"block {tuple(expected.shape)}")
    return child


def descendants(block: nn.Module, example_input: torch.Tensor, prunable: Sequence[str],
                sparsities: Sequence[float] = DEFAULT_SPARSITIES, importance_name: str = "l1",
                round_to: Optional[int] = None) -> Dict[float, nn.Module]:
    """sparsity -> ``descendant(block, example_input, sparsity, ...)`` for each of ``sparsities`` (distinct,
    increasing, starting at 0: the block itself, unpruned, is every configuration's reference)."""
    values = [_check_sparsity(s) for s in sparsities]
    if not values or values[0] != 0.0 or any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"fxeff.blocks: sparsities must be increasing and start at 0.0, got {list(sparsities)}")
    return {s: descendant(block, example_input, s, prunable, importance_name, round_to) for s in values}


__all__ = ["DEFAULT_SPARSITIES", "IMPORTANCES", "importance", "descendant", "descendants"]
