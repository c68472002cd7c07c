"""The shift-fusion pass: a shift layer, its BatchNorm, a clamp activation and the 1x1 conv reading them become
one ``fxeff::shift_conv1x1`` (inference).

The shift pass leaves ``shift -> BatchNorm -> activation -> 1x1 conv`` where a MobileNet-style block had its
depthwise conv (the BatchNorm re-parameterised to see the shift). Run as three ops the shifted map is written,
read by the BatchNorm, written, read by the activation and read again by the conv; ``shift_conv1x1`` builds the
shifted (for strided layers pooled) map one band of output rows at a time in an L2-sized tile, applies the
BatchNorm as a per-channel scale and offset and the clamp there, and multiplies the tile into the conv's output
rows with one GEMM, so the shifted map never reaches memory.

A site is a shift (``fxeff.nn.Shift2d`` module, ``fxeff::shift`` / ``fxeff::shift_pool`` call; 4-D input) whose
only reader is, in order and each optional: an eval-mode BatchNorm with running statistics (folded: scale = gamma /
sqrt(var + eps), offset = beta - mean * scale; at transform time, in float64, where the graph module holds its
tensors; in the graph, at run time, where they are graph inputs, as dynamo lifts parameters), an activation that
is a clamp (ReLU, ReLU6, Hardtanh, clamp), and a 1x1 conv (stride 1, no padding, groups 1) that reads only that.
Anything else between them (an SE block's multiply, a Hardswish, a residual add) leaves the site unfused, with the
reason in the report. The result computes the same function in eval mode up to float rounding (the BatchNorm
folded). It is the inference form: fuse after fine-tuning. A call that needs grad runs the op as its composition
(differentiable, not fused; the BatchNorm stays folded). All three graph kinds (symbolic, dynamo, export).

With ``sort_channels`` (default) the channels from the conv that produces a shifted map (through its BatchNorm,
clamp and zero padding) to the fused op are renumbered so that channels with the same rounded shift are neighbours:
the same function, and in channels_last a pixel's block of 16 channels is then one masked load per distinct shift
(MobileNetV2 at 224 with fitted taps: 4-9 distinct shifts per block before, 1-2 after). Only where the graph module
holds every tensor involved (symbolic and export graphs; dynamo lifts parameters to graph inputs). An unfused shift's
channels are renumbered the same way where everything carrying them (BatchNorms, activations, pooling, the
products of a squeeze-excite block) ends in convs that write and read them (MobileNetV3-Large's 12 unfused sites:
55-513 masked loads per pixel before, 25-68 after).
"""
import copy
import dataclasses
import operator
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import ops as fxeff_ops
from ..nn import shift as shift_nn
from ..report import Report, SiteReport
from .config import PassConfig, PassContext, register_pass_config
from .graph import EXPORT, TORCH_CONVS, ConvSite, conv_site, get_attr_value, graph_kind, node_shape
from .measure import fake_mode_of
from .rewrite import BN_FUNCTIONS, BN_MODULES, BN_NO_TRAINING, batch_norm_affine, batch_norm_output, bn_arg, \
    clamp_after, clamp_bounds, fake_key_and_mode, finish_report, held_by_module, mark_inserted, new_attr, \
    propagate_fake, record_before, sweep, unique_name

aten = torch.ops.aten

_ROLE = "fxeff_fuse_shift"  # node.meta key marking the nodes this pass inserted
_SHIFT_OPS = {torch.ops.fxeff.shift.default: False, torch.ops.fxeff.shift: False, fxeff_ops.shift: False,
              torch.ops.fxeff.shift_pool.default: True, torch.ops.fxeff.shift_pool: True,
              fxeff_ops.shift_pool: True}
_SHIFT_ARGS = ("x", "shifts", "padding", "mode", "pad", "pool")
_SHIFT_DEFAULTS = {"padding": "zeros", "mode": "sparse"}


@register_pass_config("fuse_shift")
@dataclasses.dataclass
class FuseShift(PassConfig):
    """Config of the shift-fusion pass (no options): see the module docstring. Run it on the fine-tuned model in
    eval mode (``fxeff.transform(model.eval(), x, passes=[Shift(), FuseShift()])`` for a model that needs no
    fine-tuning, or on the fine-tuned shift network): the BatchNorms are folded with their running statistics.

    ``sort_channels``: renumber the channels from the conv producing each shifted map to the fused op so that
    channels with the same shift are neighbours (exact; where the graph module holds every tensor involved), which
    makes a channels-last pixel one masked load per distinct shift in each block of 16 channels. An unfused shift
    (read by a squeeze-excite block, a Hardswish) is renumbered too, through everything carrying its channels up to
    the convs writing and reading them; its site stays "skipped", the reason says what was sorted.

    ``interpolated``: fuse interpolated shifts (mode "active") too. Off by default: they measure slower fused than
    unfused (the fine-tuned reference MobileNetV2 with active shifts, batch 16 of 64x64: 1.25 vs 1.09 of the
    original's time in NCHW, 2.22 vs 1.56 in channels_last, docs/benchmarks.md), so those sites are left as they are
    and reported as skipped."""

    sort_channels: bool = True
    interpolated: bool = False

    def __post_init__(self):
        for name in ("sort_channels", "interpolated"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"fxeff.passes.FuseShift: {name} must be a bool, got {getattr(self, name)!r}")

    def run(self, gm: fx.GraphModule, context: PassContext) -> Report:
        return fuse_shift_pass(gm, self, context)


@dataclasses.dataclass
class _ShiftCall:
    node: fx.Node
    input: fx.Node
    shifts: Union[fx.Node, str]  # a graph node, or (call_module) the attribute name of the module's shifts
    padding: str
    mode: str
    pad: List[int]
    pool: List[int]
    name: str


def _shift_call(gm: fx.GraphModule, node: fx.Node) -> Optional[_ShiftCall]:
    """The shift computed by ``node`` (a Shift2d module or a shift / shift_pool call), else None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if type(module) is not shift_nn.Shift2d or len(node.args) != 1 or node.kwargs:
            return None
        return _ShiftCall(node, node.args[0], f"{node.target}.shifts", module.padding, module.mode,
                          list(module._fused_pad), list(module._fused_pool), str(node.target))
    if node.op != "call_function" or node.target not in _SHIFT_OPS:
        return None
    pooled = _SHIFT_OPS[node.target]
    names = _SHIFT_ARGS if pooled else _SHIFT_ARGS[:4]
    if len(node.args) > len(names) or any(k not in names for k in node.kwargs):
        return None
    values: Dict[str, Any] = dict(_SHIFT_DEFAULTS)
    values.update(zip(names, node.args))
    values.update(node.kwargs)
    if any(n not in values for n in names) or not isinstance(values["x"], fx.Node):
        return None
    pad, pool = (list(values["pad"]), list(values["pool"])) if pooled else ([0, 0, 0, 0], [1, 1])
    if len(pad) != 4 or len(pool) != 2 or not all(isinstance(v, int) for v in pad + pool):
        return None  # not 2-D, or symbolic amounts
    return _ShiftCall(node, values["x"], values["shifts"], values["padding"], values["mode"], pad, pool, node.name)


def _pointwise_conv(gm: fx.GraphModule, node: fx.Node, reads: fx.Node) -> Tuple[Optional[ConvSite], str]:
    """(the conv site, "") when ``node`` is a 1x1 conv2d (stride 1, no padding, groups 1) reading only ``reads``;
    (None, why not) otherwise."""
    site = conv_site(gm, node)
    if site is None:
        return None, f"its reader {node.name!r} is not a conv"
    if site.input is not reads or reads in (site.node.args[1:] + tuple(site.node.kwargs.values())):
        return None, f"the conv {site.name!r} reads the shifted map other than as its input"
    if site.transposed or site.dims != 2 or site.weight_shape is None or tuple(site.weight_shape[2:]) != (1, 1):
        return None, f"the conv {site.name!r} is not a 1x1 conv2d ({site.describe()})"
    if any(s != 1 for s in site.stride) or any(p != 0 for p in site.padding) or site.groups != 1:
        return None, f"the conv {site.name!r} has a stride, padding or groups ({site.describe()})"
    if site.unsupported:
        return None, f"the conv {site.name!r}: {site.unsupported}"
    return site, ""


@dataclasses.dataclass
class _EvalBatchNorm:
    node: fx.Node  # the BatchNorm call
    out: fx.Node  # the node holding its output (export: the getitem of the no-training op)
    removed: List[fx.Node]  # nodes to erase with it (the getitems)
    refs: Dict[str, Any]  # weight / bias / running_mean / running_var: a tensor, a graph node, or None
    eps: float
    name: str


def _eval_batch_norm(gm: fx.GraphModule, node: fx.Node) -> Optional[_EvalBatchNorm]:
    """The eval-mode BatchNorm with running statistics that is ``node``'s only reader and reads nothing else of the
    graph, else None. Its tensors are values where the graph module holds them (modules, get_attr) and graph nodes
    where they are graph inputs (dynamo's lifted parameters): those are folded at run time, in the graph."""
    users = list(node.users)
    if len(users) != 1:
        return None
    user = users[0]
    if user.op == "call_module":
        bn = gm.get_submodule(user.target)
        if type(bn) not in BN_MODULES or bn.training or bn.running_mean is None or user.args != (node,) or \
                user.kwargs:
            return None
        refs = dict(weight=bn.weight, bias=bn.bias, running_mean=bn.running_mean, running_var=bn.running_var)
        return _EvalBatchNorm(user, user, [], refs, bn.eps, str(user.target))
    if user.op != "call_function" or user.target not in BN_FUNCTIONS or bn_arg(user, "input") is not node:
        return None
    refs = {name: bn_arg(user, name) for name in ("weight", "bias", "running_mean", "running_var")}
    if refs["running_mean"] is None or refs["running_var"] is None or node in refs.values():
        return None
    if user.target is not BN_NO_TRAINING and bn_arg(user, "training", False):
        return None
    found = batch_norm_output(user)
    if found is None:
        return None
    out, removed = found
    for name, ref in refs.items():
        if isinstance(ref, fx.Node) and ref.op == "get_attr":
            refs[name] = get_attr_value(gm, ref.target)
        elif ref is not None and not isinstance(ref, fx.Node):
            return None
    return _EvalBatchNorm(user, out, removed, refs, bn_arg(user, "eps", 1e-5), user.name)


def _fold_constant(refs: Dict[str, Any], eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode BatchNorm as y = x * scale + offset (float64, then the statistics' dtype)."""
    scale, mean, beta = batch_norm_affine(refs, eps)
    dtype = refs["running_mean"].dtype
    return scale.to(dtype), (beta - mean * scale).to(dtype)


def _fold_in_graph(gm: fx.GraphModule, bn: _EvalBatchNorm, kind: str, base: str,
                   new_nodes: List[fx.Node]) -> Tuple[fx.Node, fx.Node]:
    """(scale, offset) nodes computing the fold at run time from the BatchNorm's tensors (some are graph inputs):
    scale = weight * rsqrt(var + eps), offset = bias - mean * scale, as torch functions (dynamo) or aten ops
    (export). Appends the new nodes to new_nodes."""
    graph = gm.graph
    if kind == EXPORT:
        add, mul, sub, rsqrt, neg = aten.add.Tensor, aten.mul.Tensor, aten.sub.Tensor, aten.rsqrt.default, \
            aten.neg.default
    else:
        add, mul, sub, rsqrt, neg = operator.add, operator.mul, operator.sub, torch.rsqrt, operator.neg

    def node(ref: Any, name: str) -> fx.Node:
        if isinstance(ref, fx.Node):
            return ref
        new_nodes.append(graph.get_attr(new_attr(gm, f"{base}_bn_{name}", ref, False)))
        return new_nodes[-1]

    def call(target, *args) -> fx.Node:
        new_nodes.append(graph.call_function(target, args))
        return new_nodes[-1]

    refs = bn.refs
    scale = call(rsqrt, call(add, node(refs["running_var"], "running_var"), bn.eps))
    if refs["weight"] is not None:
        scale = call(mul, node(refs["weight"], "weight"), scale)
    shifted_mean = call(mul, node(refs["running_mean"], "running_mean"), scale)
    offset = call(sub, node(refs["bias"], "bias"), shifted_mean) if refs["bias"] is not None else \
        call(neg, shifted_mean)
    return scale, offset


def _fuse_site(gm: fx.GraphModule, kind: str, call: _ShiftCall, config: FuseShift) -> SiteReport:
    graph = gm.graph
    shape = node_shape(call.input)
    describe = f"shift2d {call.mode} {call.padding}" + (
        f" pad {call.pad} pool {call.pool}" if any(call.pad) or any(p != 1 for p in call.pool) else "")
    if shape is not None and len(shape) != 4:
        return SiteReport(call.name, describe, "skipped", f"a {len(shape)}-D shift: the fused op is 2-D",
                          pass_name="fuse_shift")
    if call.mode == "active" and not config.interpolated:
        return SiteReport(call.name, describe, "skipped", "interpolated (mode 'active') shifts measure slower fused "
                          "than unfused; FuseShift(interpolated=True) fuses them", pass_name="fuse_shift")
    tail, removed, parts = call.node, [], []
    bn = _eval_batch_norm(gm, tail)
    if bn is not None:
        removed += [bn.node] + bn.removed
        tail = bn.out
        parts.append(f"BatchNorm {bn.name}")
    lo = hi = None
    found = clamp_after(gm, tail)
    if found is not None:
        act, lo, hi = found
        removed.append(act)
        tail = act
        parts.append(f"clamp({lo}, {hi}) {act.target if act.op == 'call_module' else act.name}")
    users = list(tail.users)
    if len(users) != 1:
        why = f"{tail.name!r} has {len(users)} readers" if users else f"nothing reads {tail.name!r}"
        return SiteReport(call.name, describe, "skipped", f"no 1x1 conv to fuse into: {why}", pass_name="fuse_shift")
    site, why = _pointwise_conv(gm, users[0], tail)
    if site is None:
        return SiteReport(call.name, describe, "skipped", f"no 1x1 conv to fuse into: {why}", pass_name="fuse_shift")
    base = f"fxeff_fuse_shift_{site.name}".replace(".", "_")
    key, fake_mode = fake_key_and_mode(site)
    new_nodes: List[fx.Node] = []
    with graph.inserting_before(site.node):
        def param(ref):
            if isinstance(ref, str):
                new_nodes.append(graph.get_attr(ref))
                return new_nodes[-1]
            return ref

        scale = offset = None
        if bn is not None and not any(isinstance(r, fx.Node) for r in bn.refs.values()):
            for name, value in zip(("scale", "offset"), _fold_constant(bn.refs, bn.eps)):
                new_nodes.append(graph.get_attr(new_attr(gm, f"{base}_{name}", value, False)))
            scale, offset = new_nodes[-2:]
        elif bn is not None:
            scale, offset = _fold_in_graph(gm, bn, kind, base, new_nodes)
        args = (call.input, param(call.shifts), call.padding, call.mode, call.pad, call.pool, scale, offset, lo, hi,
                param(site.weight), param(site.bias))
        fused = graph.call_function(torch.ops.fxeff.shift_conv1x1.default, args)
    new_nodes.append(fused)
    mark_inserted(new_nodes, _ROLE, site.node)
    propagate_fake(gm, new_nodes, key, fake_mode)
    site.node.replace_all_uses_with(fused)
    for node in [site.node] + removed[::-1] + [call.node]:
        graph.erase_node(node)
    what = " + ".join([f"shift {call.name}"] + parts + [f"1x1 conv {site.name}"])
    sorted_ = _sort_channels(gm, fused, base) if config.sort_channels else ""
    what += f"; {sorted_}" if sorted_ else ""
    return SiteReport(call.name, describe, "rewritten", f"fused: {what}", site.macs(), site.macs(), "fuse_shift")


# ---------------------------------------------------------------- channels sorted by shift (channels_last gathers)

_PAD_FUNCTIONS = {torch.nn.functional.pad, aten.constant_pad_nd.default, aten.pad.default}


def _rounded(shifts: torch.Tensor) -> torch.Tensor:
    """The shifts as the op rounds them (half away from zero), int64 [C, 2]."""
    s = shifts.detach().double()
    return (s.sign() * (s.abs() + 0.5).floor()).long()


def _block_groups(rounded: torch.Tensor) -> int:
    """Distinct shifts summed over the blocks of 16 channels: the masked loads a channels-last pixel costs."""
    return sum(len({tuple(r) for r in rounded[b:b + 16].tolist()}) for b in range(0, rounded.shape[0], 16))


def _producer_chain(gm: fx.GraphModule, x: fx.Node) -> Optional[Tuple[ConvSite, List[fx.Node]]]:
    """(the conv computing x, the per-channel nodes between: BatchNorms, clamps, zero pads) when x is a conv's
    output (groups 1) passed through only such nodes, each read by the next alone, the conv's tensors held by the
    graph module; else None. Its output channels can then be renumbered without changing the function."""
    chain, node = [], x
    while True:
        if len(node.users) != 1:
            return None
        site = conv_site(gm, node)
        if site is not None:
            if site.transposed or site.groups != 1 or site.unsupported or not held_by_module(site.weight, site.bias):
                return None
            return site, chain
        chain.append(node)
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if not (type(module) in BN_MODULES or clamp_bounds(gm, node, node.args[0]) is not None):
                return None
            node = node.args[0]
        elif node.op == "call_function" and node.target is operator.getitem and \
                getattr(node.args[0], "target", None) is BN_NO_TRAINING and node.args[1] == 0:
            bn = node.args[0]
            if any(u is not node and u.users for u in bn.users):
                return None
            chain.append(bn)
            node = bn.args[0]
        elif node.op == "call_function" and node.target in BN_FUNCTIONS:
            if not held_by_module(*[bn_arg(node, k) for k in ("weight", "bias", "running_mean", "running_var")]):
                return None
            node = bn_arg(node, "input")
        elif node.op == "call_function" and node.target in _PAD_FUNCTIONS:
            pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
            if not isinstance(pad, (list, tuple)) or len(pad) > 4 or \
                    any(k not in ("mode", "value") for k in node.kwargs if k != "pad") or \
                    (node.target is torch.nn.functional.pad and node.kwargs.get("mode", "constant") != "constant"):
                return None
            node = node.args[0]
        elif clamp_bounds(gm, node, node.args[0] if node.args else None) is not None:
            node = node.args[0]
        else:
            return None
        if not isinstance(node, fx.Node):
            return None


def _permuted_attr(gm: fx.GraphModule, before: fx.Node, ref: Any, perm: torch.Tensor, dim: int, base: str) -> Any:
    """A get_attr node (inserted before ``before``) of the tensor ``ref`` refers to, its ``dim`` indexed by perm."""
    if ref is None:
        return None
    value = get_attr_value(gm, ref if isinstance(ref, str) else ref.target)
    permuted = value.detach().index_select(dim, perm.to(value.device))
    name = new_attr(gm, base, permuted, isinstance(value, torch.nn.Parameter))
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta.update({k: v for k, v in (ref.meta.items() if isinstance(ref, fx.Node) else ()) if k in ("val",)})
    return node


_PER_CHANNEL_ATTRS = ("weight", "bias", "running_mean", "running_var")


def _permute_module(gm: fx.GraphModule, node: fx.Node, perm: torch.Tensor, base: str,
                    attrs: Tuple[str, ...] = _PER_CHANNEL_ATTRS, dim: int = 0) -> None:
    """node (a call_module) gets a copy of its module whose tensors ``attrs`` (those it has) are indexed by perm along
    ``dim``: a conv's or BatchNorm's output channels by default, a conv's input channels with ("weight",) and dim 1,
    a Shift2d's shifts with ("shifts",)."""
    module = copy.deepcopy(gm.get_submodule(node.target))
    with torch.no_grad():
        for name in attrs:
            t = getattr(module, name, None)
            if isinstance(t, torch.Tensor):
                t.copy_(t.index_select(dim, perm.to(t.device)))
    name = unique_name(gm, base)
    gm.add_submodule(name, module)
    node.target = name


def _permute_conv(gm: fx.GraphModule, site: ConvSite, perm: torch.Tensor, dim: int, base: str) -> List[fx.Node]:
    """The conv of ``site`` with its output channels (dim 0: weight and bias) or input channels (dim 1: weight) in
    perm order: a copy of its module, or new get_attr nodes for a conv call. Returns the nodes inserted."""
    if site.node.op == "call_module":
        _permute_module(gm, site.node, perm, base, ("weight", "bias") if dim == 0 else ("weight",), dim)
        return []
    names = tuple(a.name for a in site.node.target._schema.arguments) if isinstance(
        site.node.target, torch._ops.OpOverload) else TORCH_CONVS[site.node.target][2]
    inserted = []
    for name, ref in (("weight", site.weight), ("bias", site.bias if dim == 0 else None)):
        if ref is not None:
            inserted.append(_permuted_attr(gm, site.node, ref, perm, dim if name == "weight" else 0,
                                           f"{base}_{name}"))
            _set_node_arg(site.node, names, name, inserted[-1])
    return inserted


def _permute_batch_norm(gm: fx.GraphModule, node: fx.Node, perm: torch.Tensor, base: str) -> List[fx.Node]:
    """The BatchNorm computed by ``node`` (a module or a call) with its channels in perm order. Returns the nodes
    inserted."""
    if node.op == "call_module":
        _permute_module(gm, node, perm, base)
        return []
    inserted = []
    for name in _PER_CHANNEL_ATTRS:
        ref = bn_arg(node, name)
        if ref is not None:
            inserted.append(_permuted_attr(gm, node, ref, perm, 0, f"{base}_{name}"))
            _set_node_arg(node, BN_FUNCTIONS[node.target], name, inserted[-1])
    return inserted


def _shift_order(shifts: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
    """(the permutation that makes equal rounded shifts neighbours, the masked loads per channels-last pixel before
    and after it)."""
    rounded = _rounded(shifts)
    perm = torch.sort(rounded[:, 0] * 4096 + rounded[:, 1], stable=True).indices
    return perm, _block_groups(rounded), _block_groups(rounded[perm])


def _set_node_arg(node: fx.Node, names: Tuple[str, ...], name: str, value: Any) -> None:
    if name in node.kwargs:
        node.update_kwarg(name, value)
    else:
        node.update_arg(names.index(name), value)


def _sort_channels(gm: fx.GraphModule, fused: fx.Node, base: str) -> str:
    """Renumbers the channels between the conv that produces the shifted map and the fused op so that channels with
    the same shift are neighbours: in channels_last a pixel's block of 16 channels then takes one masked load per
    distinct shift instead of up to 9 (25 for 5x5 layers). Exact (a relabeling); only where every tensor involved is
    held by the graph module and the shifts are rounded. Returns what it did (or why not), for the report."""
    x, shifts_ref, mode = fused.args[0], fused.args[1], fused.args[3]
    if mode == "active" or not (isinstance(shifts_ref, fx.Node) and shifts_ref.op == "get_attr"):
        return "channels not sorted: the shifts are interpolated or a graph input"
    perm, before, after = _shift_order(get_attr_value(gm, shifts_ref.target))
    if after >= before:
        return ""
    found = _producer_chain(gm, x)
    if found is None or not held_by_module(*fused.args[6:8], fused.args[10], fused.args[11]):
        return "channels not sorted: the map does not come straight from a conv held by the graph module"
    site, chain = found
    graph = gm.graph
    # the producer conv's and BatchNorms' output channels
    _permute_conv(gm, site, perm, 0, f"{base}_producer")
    for node in chain:
        if (node.op == "call_module" and type(gm.get_submodule(node.target)) in BN_MODULES) or \
                (node.op == "call_function" and node.target in BN_FUNCTIONS):
            _permute_batch_norm(gm, node, perm, f"{base}_producer_bn")
    # the fused op's per-channel arguments and the 1x1 conv's input channels
    args = list(fused.args)
    args[1] = _permuted_attr(gm, fused, shifts_ref, perm, 0, f"{base}_shifts")
    for i in (6, 7):
        if args[i] is not None:
            args[i] = _permuted_attr(gm, fused, args[i], perm, 0, f"{base}_{('scale', 'offset')[i - 6]}")
    args[10] = _permuted_attr(gm, fused, args[10], perm, 1, f"{base}_weight")
    for node in [n for n in (args[1], args[6], args[7], args[10]) if isinstance(n, fx.Node)]:
        node.meta[_ROLE] = True
    fused.args = tuple(args)
    for node in list(graph.nodes):  # the references the copies replaced
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    return f"channels sorted by shift ({before} -> {after} masked loads per channels-last pixel)"


# ---------------------------------------------------------------- channels sorted at unfused sites

# Per-channel ops a renumbering passes through unchanged: elementwise activations and spatial pooling.
_PER_CHANNEL_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.SiLU,
                        nn.Identity, nn.Dropout, nn.AdaptiveAvgPool2d)
_PER_CHANNEL_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.hardtanh, F.hardswish, F.hardsigmoid, torch.sigmoid,
                          F.sigmoid, F.silu, F.dropout, F.adaptive_avg_pool2d, torch.clamp,
                          aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default,
                          aten.hardswish.default, aten.hardswish_.default, aten.hardsigmoid.default,
                          aten.hardsigmoid_.default, aten.sigmoid.default, aten.silu.default, aten.silu_.default,
                          aten.clamp.default, aten.dropout.default, aten.adaptive_avg_pool2d.default}
_BINARY_FUNCTIONS = {operator.mul, operator.add, torch.mul, torch.add, aten.mul.Tensor, aten.add.Tensor}


@dataclasses.dataclass
class _Closure:
    """The nodes whose outputs carry a shifted map's channels (inside), the convs that produce them (output channels
    renumbered) and the convs that read them (input channels renumbered)."""
    inside: List[fx.Node] = dataclasses.field(default_factory=list)
    producers: List[ConvSite] = dataclasses.field(default_factory=list)
    readers: List[ConvSite] = dataclasses.field(default_factory=list)


def _channel_kind(gm: fx.GraphModule, node: fx.Node) -> str:
    """How a renumbering of node's channels passes through node: "shift", "bn", "per-channel", "binary" or ""."""
    if _shift_call(gm, node) is not None:
        return "shift"
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if type(module) in BN_MODULES and not module.training and len(node.args) == 1 and not node.kwargs:
            return "bn"
        return "per-channel" if type(module) in _PER_CHANNEL_MODULES and len(node.args) == 1 else ""
    if node.op != "call_function":
        return ""
    if node.target in BN_FUNCTIONS:
        return "bn"
    if node.target is operator.getitem and getattr(node.args[0], "target", None) is BN_NO_TRAINING:
        return "per-channel" if node.args[1] == 0 else ""
    extra = list(node.args[1:]) + list(node.kwargs.values())
    if node.target in _PER_CHANNEL_FUNCTIONS and not any(isinstance(a, fx.Node) for a in extra):
        return "per-channel"
    if node.target in _BINARY_FUNCTIONS and not node.kwargs and len(node.args) == 2:
        return "binary"
    return ""


def _data_inputs(gm: fx.GraphModule, node: fx.Node, kind: str) -> List[fx.Node]:
    if kind == "shift":
        return [_shift_call(gm, node).input]
    if kind == "bn":
        return [node.args[0] if node.op == "call_module" else bn_arg(node, "input")]
    if kind == "binary":
        return [a for a in node.args if isinstance(a, fx.Node)]
    return [node.args[0]]


def _channel_closure(gm: fx.GraphModule, start: fx.Node, channels: int) -> Optional[_Closure]:
    """The closure of ``start``'s channels through the graph: every node that carries them (their readers and
    writers, both ways) until convs produce or consume them; None where they meet anything a renumbering does not
    pass through (a reshape, a depthwise conv, a graph input or output, a tensor the graph module does not hold)."""
    closure, seen, work = _Closure(), {start}, [start]
    boundary: Dict[fx.Node, str] = {}

    def conv(node: fx.Node, role: str) -> bool:
        site = conv_site(gm, node)
        ok = site is not None and not site.transposed and site.groups == 1 and not site.unsupported and \
            held_by_module(site.weight, site.bias) and site.weight_shape is not None
        if not ok or boundary.get(node, role) != role:
            return False
        if node not in boundary:
            boundary[node] = role
            (closure.producers if role == "out" else closure.readers).append(site)
            if role == "out":  # everything reading a renumbered output carries the renumbering
                for user in node.users:
                    if user not in seen:
                        seen.add(user)
                        work.append(user)
        return True

    while work:
        node = work.pop()
        kind = _channel_kind(gm, node)
        shape = node_shape(node)
        if not kind or (shape is not None and (len(shape) < 2 or shape[1] != channels)):
            return None
        if kind == "bn" and node.op == "call_function":
            refs = [bn_arg(node, k) for k in _PER_CHANNEL_ATTRS]
            if not held_by_module(*refs) or refs[2] is None or (node.target is not BN_NO_TRAINING and
                                                                 bn_arg(node, "training", False)):
                return None
            if node.target is BN_NO_TRAINING:  # the tuple's other outputs must be unread
                if any(u.target is not operator.getitem or (u.args[1] != 0 and u.users) for u in node.users):
                    return None
        if kind == "shift" and not (node.op == "call_module" or held_by_module(_shift_call(gm, node).shifts)):
            return None
        closure.inside.append(node)
        for source in _data_inputs(gm, node, kind):
            if source not in seen and not conv(source, "out"):
                if not _channel_kind(gm, source):
                    return None
                seen.add(source)
                work.append(source)
        for user in node.users:
            if user in seen or (node.target is BN_NO_TRAINING and user.args[1] != 0):
                continue
            site = conv_site(gm, user)
            if site is not None and site.input is node:
                if not conv(user, "in"):
                    return None
                continue
            seen.add(user)
            work.append(user)
    return closure


def _sort_unfused(gm: fx.GraphModule, call: _ShiftCall, base: str) -> str:
    """Renumbers the channels of an unfused shift (one read by a squeeze-excite block or a Hardswish, say) so that
    equal shifts are neighbours, as ``_sort_channels`` does for fused ones: through everything that carries its
    channels (``_channel_closure``) up to the convs producing and reading them. Exact (a relabeling). Returns what it
    did, or "" where it did nothing."""
    shifts_ref = call.shifts
    if call.mode == "active":
        return ""
    if not (isinstance(shifts_ref, str) or (isinstance(shifts_ref, fx.Node) and shifts_ref.op == "get_attr")):
        return "channels not sorted: the shifts are a graph input"
    shifts = get_attr_value(gm, shifts_ref if isinstance(shifts_ref, str) else shifts_ref.target)
    perm, before, after = _shift_order(shifts)
    if after >= before:
        return ""
    closure = _channel_closure(gm, call.node, shifts.shape[0])
    if closure is None or any(_channel_kind(gm, n) == "shift" and n is not call.node for n in closure.inside):
        return "channels not sorted: they reach an op a renumbering does not pass through"
    inserted: List[fx.Node] = []
    for sites, dim, tag in ((closure.producers, 0, "producer"), (closure.readers, 1, "reader")):
        for site in sites:
            inserted += _permute_conv(gm, site, perm, dim, f"{base}_{tag}")
    for node in closure.inside:
        kind = _channel_kind(gm, node)
        if kind == "bn":
            inserted += _permute_batch_norm(gm, node, perm, f"{base}_bn")
        elif kind == "shift" and node.op == "call_module":
            _permute_module(gm, node, perm, f"{base}_shift", ("shifts",))
        elif kind == "shift":
            inserted.append(_permuted_attr(gm, node, shifts_ref, perm, 0, f"{base}_shifts"))
            node.replace_input_with(shifts_ref, inserted[-1])
    for node in inserted:
        node.meta[_ROLE] = True
    for node in list(gm.graph.nodes):  # the references the copies replaced
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    return f"its channels sorted by shift ({before} -> {after} masked loads per channels-last pixel; " \
           f"{len(closure.producers)} conv(s) writing them, {len(closure.readers)} reading them)"


def fuse_shift_pass(gm: fx.GraphModule, config: FuseShift, context: PassContext) -> Report:
    """Rewrites ``gm`` in place (recompiled) and returns the report; see the module docstring."""
    shift_nodes = [n for n in gm.graph.nodes if _shift_call(gm, n) is not None]
    recorded = record_before(gm, context.example_inputs, [])
    with sweep(gm, context.example_inputs, recorded) as run:
        kind = graph_kind(gm)
        # each shift read again when its turn comes: a fusion before it may have replaced its input node
        sites = []
        for node in shift_nodes:
            call = _shift_call(gm, node)
            site = _fuse_site(gm, kind, call, config)
            if config.sort_channels and site.status == "skipped" and site.reason.startswith("no 1x1 conv"):
                sorted_ = _sort_unfused(gm, call, f"fxeff_fuse_shift_{call.name}".replace(".", "_"))
                site = dataclasses.replace(site, reason=f"{site.reason}; {sorted_}") if sorted_ else site
            sites.append(site)
        notes = [] if fake_mode_of(context.example_inputs) is not None or not shift_nodes else \
            ["inference form: BatchNorms folded with their running statistics (a call that needs grad runs the fused "
             "op as its composition)"]
        return finish_report(gm, run, "fuse_shift", sites, notes, recorded,
                             "no shift read by a 1x1 conv: the graph is unchanged", _ROLE)


__all__ = ["FuseShift", "fuse_shift_pass"]
