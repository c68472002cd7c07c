"""fxeff.transform: symbolic_trace a model, apply passes, return the GraphModule with its report.

The returned GraphModule shares the model's parameters (rewritten convs read them through
get_attr), so fine-tuning it trains the original weights: transform a ``copy.deepcopy`` of the model
to fine-tune against the original (fxeff.finetune refuses shared weights). Layers a pass replaced
are deleted from the GraphModule, so its parameters are exactly those its graph uses. Models that torch.fx cannot trace
symbolically (data-dependent control flow, ...) go through torch.compile instead, which runs the
same passes on dynamo's graph.
"""
from typing import Any, Mapping, Sequence, Union

import torch
import torch.fx as fx

from .nn import is_notrace_module
from .passes import PassConfig, run_passes


class TraceError(RuntimeError):
    """symbolic_trace could not trace the model; the message points to the torch.compile entry point."""


class FxeffTracer(fx.Tracer):
    """torch.fx's tracer that also keeps fxeff's modules (and registered notrace modules) as leaves."""

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return is_notrace_module(m) or super().is_leaf_module(m, module_qualified_name)


def trace(model: torch.nn.Module) -> fx.GraphModule:
    """symbolic_trace with fxeff's leaves; a TraceError (naming the torch.compile path) when tracing fails."""
    tracer = FxeffTracer()
    try:
        graph = tracer.trace(model)
    except Exception as error:  # torch.fx raises TraceError, TypeError, RuntimeError, ... for untraceable code
        raise TraceError(
            f"fxeff.transform: torch.fx.symbolic_trace cannot trace {type(model).__name__} "
            f"({type(error).__name__}: {error}). Use the torch.compile entry point, which captures the graph "
            f"with dynamo and runs the same passes: torch.compile(model, backend=\"effconv\", "
            f"options={{\"passes\": [...]}}) with pass dicts such as {{\"pass\": \"focus\", \"threshold\": t}}"
        ) from error
    name = model.__class__.__name__ if isinstance(model, torch.nn.Module) else model.__name__
    return fx.GraphModule(tracer.root, graph, name)


def transform(model: torch.nn.Module, example_inputs: Union[torch.Tensor, Sequence[Any]],
              passes: Sequence[Union[PassConfig, Mapping[str, Any]]]) -> fx.GraphModule:
    """The model traced and rewritten by ``passes``; the GraphModule carries ``.fxeff_report`` (a Report).

    ``example_inputs``: a tensor or a sequence of the forward's positional inputs (real tensors give
    AoI fractions and MACs after; fake tensors give "n/a" there).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fxeff.transform: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    elif not isinstance(example_inputs, (tuple, list)):
        raise TypeError(f"fxeff.transform: example_inputs must be a tensor or a tuple/list of the forward's inputs, "
                        f"got {type(example_inputs).__name__}")
    gm = trace(model)
    report = run_passes(gm, tuple(example_inputs), passes, model_class=type(model))
    gm.delete_all_unused_submodules()  # the layers a pass replaced: no dead parameters for optimizers or DDP
    gm.fxeff_report = report
    return gm
