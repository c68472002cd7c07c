"""The BatchNorm-folding pass: each eval-mode BatchNorm that is the only reader of a convolution, a HetConv or a fused
shift + 1x1 conv (``fxeff::shift_conv1x1``) is folded into that layer's weights and bias (inference form).

Per output channel s = gamma / sqrt(running_var + eps): the weights (a conv's weight; a HetConv's weight_kxk and
weight_1x1) times s, the bias (b - running_mean) * s + beta (a layer without one gets one), computed in float64 at
transform time and stored in the weights' dtype. The BatchNorm leaves the graph, and with it a pass over the
layer's output: in channels_last with 16 channels, ATen's BatchNorm takes about as long as a HetConv layer itself
(ResNet-20's first stage at batch 16: 0.25 ms against 0.39; docs/benchmarks.md). The result computes the model's
eval-mode function up to float rounding; it is the inference form: fold after fine-tuning (a folded model trains
without its BatchNorms).

A site is a layer -- ``nn.Conv1d/2d/3d`` module or a conv call (``F.conv2d``, ``aten.conv2d``,
``aten.convolution``; not transposed), ``fxeff.nn.HetConv2d`` module, ``fxeff::hetconv2d`` or
``fxeff::shift_conv1x1`` call (its 1x1 conv's weight and bias; ``FuseShift`` leaves the BatchNorm after it) --
whose only reader is an eval-mode BatchNorm with running statistics. The layer's tensors and the BatchNorm's must
be held by the graph module (symbolic and export graphs); where dynamo lifted them to graph inputs the site is
reported as skipped. The user's modules are not changed: folded layers get new modules or constants on the graph module.
"""
import copy
import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

from .. import ops as fxeff_ops
from ..nn import hetconv as hetconv_nn
from ..report import Report, SiteReport
from .config import PassConfig, PassContext, register_pass_config
from .graph import conv_site, get_attr_value
from .rewrite import batch_norm_affine, batch_norm_stats, eval_batch_norm_after, finish_report, held_by_module, \
    mark_inserted, new_attr, record_before, sweep, unique_name

_ROLE = "fxeff_fold_batch_norm"  # node.meta key marking the nodes this pass inserted
_HETCONV_OPS = (torch.ops.fxeff.hetconv2d.default, torch.ops.fxeff.hetconv2d, fxeff_ops.hetconv2d)
_SHIFT_CONV_OPS = (torch.ops.fxeff.shift_conv1x1.default, torch.ops.fxeff.shift_conv1x1, fxeff_ops.shift_conv1x1)
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@register_pass_config("fold_batch_norm")
@dataclasses.dataclass
class FoldBatchNorm(PassConfig):
    """Config of the BatchNorm-folding pass (no options): see the module docstring. Run it on the model in eval mode,
    after any fine-tuning: ``fxeff.transform(model.eval(), x, passes=[HetConv(), FoldBatchNorm()])``."""

    def run(self, gm: fx.GraphModule, context: PassContext) -> Report:
        return fold_batch_norm_pass(gm, context)


@dataclasses.dataclass
class _Layer:
    node: fx.Node
    kind: str  # "conv module", "hetconv module", "conv call", "hetconv call", "shift_conv1x1 call"
    weights: List[object]  # weight (conv) or weight_kxk, weight_1x1 (HetConv): attribute names or graph nodes
    bias: object  # attribute name, graph node or None
    bias_index: int  # the call's argument index of the bias
    weight_indices: Tuple[int, ...] = ()  # the call's argument indices of the weights


def _layer(gm: fx.GraphModule, node: fx.Node) -> Optional[_Layer]:
    """The conv or HetConv computed by ``node``, else None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if type(module) in _CONV_MODULES:
            return _Layer(node, "conv module", ["weight"], "bias" if module.bias is not None else None, -1)
        if type(module) is hetconv_nn.HetConv2d:
            return _Layer(node, "hetconv module", ["weight_kxk", "weight_1x1"],
                          "bias" if module.bias is not None else None, -1)
        return None
    if node.op != "call_function":
        return None
    if node.target in _HETCONV_OPS:
        if len(node.args) < 3 or node.kwargs:
            return None
        return _Layer(node, "hetconv call", [node.args[1], node.args[2]], node.args[3] if len(node.args) > 3 else None,
                      3, (1, 2))
    if node.target in _SHIFT_CONV_OPS:
        if len(node.args) != 12 or node.kwargs:
            return None
        return _Layer(node, "shift_conv1x1 call", [node.args[10]], node.args[11], 11, (10,))
    site = conv_site(gm, node)
    if site is None or site.transposed or node.kwargs or site.node.args[1] is not site.weight:
        return None
    return _Layer(node, "conv call", [site.weight], site.bias, 2, (1,))


def _fold(weights: List[torch.Tensor], bias: Optional[torch.Tensor], stats: Dict[str, Optional[torch.Tensor]],
          eps: float) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """The weights and bias of layer -> BatchNorm as one layer (float64, stored in the weights' dtype and strides: a
    channels_last weight stays channels_last, which decides the conv's output format where the input's is ambiguous,
    as for a one-channel image)."""
    scale, mean, beta = batch_norm_affine(stats, eps)
    dtype = weights[0].dtype
    folded = [torch.empty_strided(w.shape, w.stride(), dtype=dtype, device=w.device).copy_(
        w.detach().double() * scale.view(-1, *([1] * (w.dim() - 1)))) for w in weights]
    b = bias.detach().double() if bias is not None else torch.zeros_like(mean)
    return folded, ((b - mean) * scale + beta).to(dtype)


def _fold_site(gm: fx.GraphModule, layer: _Layer) -> SiteReport:
    node, graph = layer.node, gm.graph
    name = str(node.target) if node.op == "call_module" else node.name
    describe = f"{layer.kind} -> BatchNorm"
    found = eval_batch_norm_after(gm, node)
    if found is None:
        stats, _, why = batch_norm_stats(gm, next(iter(node.users)), node, {})
        if stats is not None:
            why = "its BatchNorm is in training mode, or its batch statistics are read (fold the eval-mode model)"
        return SiteReport(name, describe, "skipped", why, pass_name="fold_batch_norm")
    user, out, stats, eps = found
    new_nodes: List[fx.Node] = []
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        weights, bias = _fold([getattr(module, w) for w in layer.weights], module.bias, stats, eps)
        fused = copy.deepcopy(module)
        for attr, value in zip(layer.weights, weights):
            setattr(fused, attr, nn.Parameter(value, requires_grad=getattr(module, attr).requires_grad))
        fused.bias = nn.Parameter(bias, requires_grad=getattr(module, layer.weights[0]).requires_grad)
        target = unique_name(gm, f"{name}_bn_folded")
        gm.add_submodule(target, fused)
        node.target = target
    else:
        refs = layer.weights + [layer.bias]
        if not held_by_module(*refs):
            return SiteReport(name, describe, "skipped", "the layer's weights are graph inputs (dynamo lifts "
                              "parameters): nothing to fold at transform time", pass_name="fold_batch_norm")
        values = [get_attr_value(gm, r.target) if r is not None else None for r in refs]
        weights, bias = _fold(values[:-1], values[-1], stats, eps)
        base = name.replace(".", "_")
        args = list(node.args) + [None] * (layer.bias_index + 1 - len(node.args))
        indices = list(layer.weight_indices) + [layer.bias_index]
        fake = node.args[indices[0]].meta.get("val")  # export: the fake value later passes read
        with graph.inserting_before(node):
            for i, value in zip(indices, weights + [bias]):
                attr = graph.get_attr(new_attr(gm, f"{base}_bn_folded_{i}", value, parameter=False))
                if fake is not None and hasattr(fake, "fake_mode"):
                    attr.meta["val"] = fake.fake_mode.from_tensor(value)
                new_nodes.append(attr)
                args[i] = attr
        node.args = tuple(args)
        for ref in refs:
            if isinstance(ref, fx.Node) and not ref.users:
                graph.erase_node(ref)
    mark_inserted(new_nodes, _ROLE, node)
    bn_name = user.target if user.op == "call_module" else user.name
    out.replace_all_uses_with(node)
    if out is not user:
        for u in list(user.users):
            graph.erase_node(u)
    read = [a for a in user.all_input_nodes if a.op == "get_attr"]
    graph.erase_node(user)
    for attr in read:  # the BatchNorm's tensors (export's get_attrs), read by nothing now
        if not attr.users:
            graph.erase_node(attr)
    return SiteReport(name, describe, "rewritten", f"BatchNorm {bn_name} folded into the weights and bias",
                      pass_name="fold_batch_norm")


def fold_batch_norm_pass(gm: fx.GraphModule, context: PassContext) -> Report:
    """Rewrites ``gm`` in place (recompiled) and returns the report; see the module docstring."""
    layers = [layer for n in gm.graph.nodes
              if len(n.users) == 1 and _reads_batch_norm(gm, n) and (layer := _layer(gm, n)) is not None]
    recorded = record_before(gm, context.example_inputs, [])
    with sweep(gm, context.example_inputs, recorded) as run:
        sites = [_fold_site(gm, layer) for layer in layers]
        notes = ["inference form: BatchNorms folded with their running statistics"] if any(
            s.status == "rewritten" for s in sites) else []
        return finish_report(gm, run, "fold_batch_norm", sites, notes, recorded,
                             "no BatchNorm reads a conv or HetConv alone: the graph is unchanged", _ROLE)


def _reads_batch_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node``'s only reader is a BatchNorm (any form, foldable or not)."""
    user = next(iter(node.users))
    stats, _, why = batch_norm_stats(gm, user, node, {})
    return stats is not None or bool(why)


__all__ = ["FoldBatchNorm", "fold_batch_norm_pass"]
