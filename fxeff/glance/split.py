"""A CNN classifier cut into its trunk (image -> feature map [N, C, h, w]) and its head (global pooling, flatten,
dropout, one linear layer), found on the torch.fx graph: the encoders of glance and focus start from the trunk, and
the head's weights give class activation maps (the saliency policy)."""
import dataclasses
from typing import List

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

_WHERE = "fxeff.glance.split_classifier"
_FLATTEN = {torch.flatten, torch.reshape, "flatten", "view", "reshape", "squeeze"}
_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_POOL_FUNCTIONS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.mean, "mean", "amax"}


@dataclasses.dataclass
class Split:
    """``trunk``: a GraphModule from the model's input to its last feature map [N, ``channels``, h, w] (at the
    example's size: ``feature_size``); ``linear``: the classifier's linear layer (a copy), applied after global
    average pooling; ``pooling``: "avg" or "max", as the model pools; ``skipped``: what lay between the feature map
    and the linear layer (pooling, flatten, dropout) by node name."""
    trunk: fx.GraphModule
    linear: nn.Linear
    channels: int
    feature_size: tuple
    pooling: str
    skipped: List[str]


def _target(gm: fx.GraphModule, node: fx.Node):
    return gm.get_submodule(node.target) if node.op == "call_module" else node.target


def split_classifier(model: nn.Module, example: torch.Tensor) -> Split:
    """``model`` (a classifier whose output is logits [N, classes] = linear(flatten(global pool(feature map))),
    with dropout or identities in between) cut before its global pooling; ``example``: a batch of its inputs.
    Raises ValueError naming what it found where the model does not end that way."""
    import copy

    gm = fx.symbolic_trace(copy.deepcopy(model).eval())
    ShapeProp(gm).propagate(example)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    node = output.args[0]
    if not isinstance(node, fx.Node):
        raise ValueError(f"{_WHERE}: {type(model).__name__} returns {type(node).__name__}, not one tensor of logits")
    meta = node.meta.get("tensor_meta")
    if meta is None or len(meta.shape) != 2:
        raise ValueError(f"{_WHERE}: {type(model).__name__}'s output is not [N, classes] logits (shape "
                         f"{tuple(meta.shape) if meta is not None else 'unknown'})")
    linear, skipped, pooling = None, [], None
    while True:
        target = _target(gm, node)
        shape = node.meta["tensor_meta"].shape if "tensor_meta" in node.meta else None
        if shape is not None and len(shape) == 4 and linear is not None and pooling is not None:
            break  # the feature map
        if isinstance(target, nn.Linear) or target is F.linear:
            if linear is not None:
                raise ValueError(f"{_WHERE}: {type(model).__name__} ends in two linear layers ({node.name} before "
                                 f"the last); glance and focus needs a trunk, global pooling and one linear layer")
            if target is F.linear:
                raise ValueError(f"{_WHERE}: the classifier's linear layer is a functional call ({node.name}); "
                                 f"make it an nn.Linear module")
            linear = copy.deepcopy(target)
        elif isinstance(target, (nn.Dropout, nn.Identity, nn.Flatten)) or target in _FLATTEN:
            pass
        elif isinstance(target, _POOL_MODULES) or target in _POOL_FUNCTIONS:
            pooling = "max" if isinstance(target, nn.AdaptiveMaxPool2d) or target in (F.adaptive_max_pool2d,
                                                                                       "amax") else "avg"
            out = node.meta["tensor_meta"].shape
            if len(out) == 4 and tuple(out[-2:]) != (1, 1):
                raise ValueError(f"{_WHERE}: {node.name} pools to {tuple(out[-2:])}, not to one value per channel")
        else:
            raise ValueError(f"{_WHERE}: between {type(model).__name__}'s feature map and its logits there is "
                             f"{node.name} ({getattr(target, '__name__', type(target).__name__)}); expected global "
                             f"pooling, flatten, dropout and one nn.Linear")
        skipped.append(node.name)
        inputs = [a for a in node.args if isinstance(a, fx.Node)]
        if len(inputs) != 1:
            raise ValueError(f"{_WHERE}: {node.name} reads {len(inputs)} values; expected a chain from the feature "
                             f"map to the logits")
        node = inputs[0]
    if linear is None or pooling is None:
        raise ValueError(f"{_WHERE}: {type(model).__name__} has no global pooling and linear classifier at its end")
    # the trunk: the graph up to ``node``
    graph = fx.Graph()
    env = {}
    for n in gm.graph.nodes:
        if n.op == "output":
            break
        env[n] = graph.node_copy(n, lambda a: env[a])
        if n is node:
            break
    graph.output(env[node])
    trunk = fx.GraphModule(gm, graph)
    trunk.graph.eliminate_dead_code()
    trunk.delete_all_unused_submodules()
    trunk.recompile()
    shape = node.meta["tensor_meta"].shape
    if linear.in_features != shape[1]:
        raise ValueError(f"{_WHERE}: the feature map has {shape[1]} channels but the linear layer reads "
                         f"{linear.in_features}")
    return Split(trunk, linear, int(shape[1]), tuple(int(s) for s in shape[-2:]), pooling, skipped[::-1])


__all__ = ["Split", "split_classifier"]
