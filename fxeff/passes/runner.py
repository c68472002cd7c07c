"""run_passes: the one entry that applies pass configs to any fx graph (symbolic, dynamo or export)."""
from typing import Any, Mapping, Sequence, Type, Union

import torch.fx as fx

from ..report import Report
from .config import PassConfig, PassContext, config_from_dict


def run_passes(gm: fx.GraphModule, example_inputs: Sequence[Any],
               passes: Sequence[Union[PassConfig, Mapping[str, Any]]],
               model_class: Union[Type, str, None] = None) -> Report:
    """Applies ``passes`` (configs or their dicts) to ``gm`` in order, in place; returns one merged Report.

    ``example_inputs`` are the values of gm's placeholders, real or fake tensors. ``model_class``
    (a type, or a qualified class name) selects per-family defaults such as Focus's split.
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"fxeff.passes.run_passes: gm must be a torch.fx.GraphModule, got {type(gm).__name__}")
    if isinstance(passes, (PassConfig, Mapping)):
        raise TypeError("fxeff.passes.run_passes: passes must be a list of pass configs or dicts, got a single "
                        f"{type(passes).__name__}; wrap it in a list")
    configs = [config_from_dict(p) for p in passes]
    if not configs:
        raise ValueError("fxeff.passes.run_passes: passes is empty; give at least one pass, e.g. [Focus(threshold=t)]")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    example_inputs = list(example_inputs)
    if len(example_inputs) != len(placeholders):
        raise ValueError(f"fxeff.passes.run_passes: example_inputs must give one value per graph input "
                         f"({len(placeholders)}: {[n.name for n in placeholders]}), got {len(example_inputs)}")
    context = PassContext(example_inputs=example_inputs, model_class=model_class)
    report = None
    for config in configs:
        step = config.run(gm, context)
        report = step if report is None else report.merge(step)
    return report
