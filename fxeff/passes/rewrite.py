"""Graph-editing helpers shared by the passes that replace a conv with new weights (shift, hetconv).

They read real tensors behind weight references in any graph kind, add new parameters to the
GraphModule (never to modules shared with the user's model; dynamo graphs get a source for each),
give inserted nodes fake values, and measure how far a rewritten graph's outputs moved.
"""
import math
import re
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.fake_tensor import FakeTensor

from .graph import ConvSite, get_attr_value


def param_value(gm: fx.GraphModule, ref: Any, inputs: Dict[fx.Node, Any]) -> Tuple[Optional[torch.Tensor], str]:
    """(real tensor behind a weight/bias/statistics reference, "") or (None, why it is unknown)."""
    if isinstance(ref, str):
        return get_attr_value(gm, ref), ""
    if not isinstance(ref, fx.Node):
        return None, f"{ref!r} is not a tensor"
    if ref.op == "get_attr":
        return get_attr_value(gm, ref.target), ""
    if ref.op == "placeholder":
        value = inputs.get(ref)
        if isinstance(value, FakeTensor):  # dynamo keeps the real parameter behind a fake example input
            value = getattr(ref.meta.get("grapharg"), "example", None)
        if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor):
            return value, ""
        return None, f"the graph input {ref.name!r} has no real value (fake example inputs)"
    return None, f"it is computed in the graph by node {ref.name!r}, not a parameter"


def unique_name(gm: fx.GraphModule, base: str) -> str:
    """A free attribute name at the GraphModule's root (never inside a module shared with the user's model)."""
    base = re.sub(r"\W", "_", base)
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def new_attr(gm: fx.GraphModule, base: str, tensor: torch.Tensor, parameter: bool) -> str:
    name = unique_name(gm, base)
    if parameter:
        gm.register_parameter(name, nn.Parameter(tensor.detach().clone()))
    else:
        gm.register_buffer(name, tensor.detach().clone())
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None:  # a dynamo graph: aot_autograd wants the source of each of gm's parameters and buffers
        from torch._dynamo.source import ConstantSource

        sources[name] = ConstantSource(f"fxeff_pass.{name}")
    return name


def fake_key_and_mode(site: ConvSite):
    """("val" | "example_value", the graph's FakeTensorMode) for dynamo/export graphs, else (None, None)."""
    for key in ("val", "example_value"):
        mode = getattr(site.node.meta.get(key), "fake_mode", None)
        if mode is not None:
            return key, mode
    return None, None


def propagate_fake(gm: fx.GraphModule, nodes: List[fx.Node], key: Optional[str], fake_mode) -> None:
    """Gives inserted nodes the fake values their neighbours carry, so later passes see their shapes."""
    if fake_mode is None:
        return
    for node in nodes:
        if node.op == "get_attr":
            node.meta[key] = fake_mode.from_tensor(get_attr_value(gm, node.target), static_shapes=True)
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta[key])
        with fake_mode, enable_python_dispatcher():  # the python dispatcher: meta kernels that take SymInts
            node.meta[key] = node.target(*args, **kwargs)


def output_nodes(gm: fx.GraphModule) -> List[fx.Node]:
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    found: List[fx.Node] = []
    fx.node.map_arg(output.args, found.append)
    return found


def relative_output_error(before: Dict[fx.Node, Any], after: Dict[fx.Node, Any], nodes_before: List[fx.Node],
                           nodes_after: List[fx.Node]) -> Optional[float]:
    pairs = [(before[a], after[b]) for a, b in zip(nodes_before, nodes_after)
             if isinstance(before.get(a), torch.Tensor) and before[a].is_floating_point()]
    if not pairs:
        return None
    diff = math.sqrt(sum(float((y - x).double().norm()) ** 2 for x, y in pairs))
    norm = math.sqrt(sum(float(x.double().norm()) ** 2 for x, _ in pairs))
    return diff / norm if norm else None
