"""The focus pass: compute the AoI once after an early layer and run every later conv only inside it.

After the split node it inserts ``aoi_mask(split_out, threshold, reduce)``; each conv downstream of
the split becomes ``focused_conv2d(x, w, b, mask_k, ...)`` with ``mask_k = mask_resize(mask, [Hout,
Wout])`` at that conv's output grid (one resize per distinct grid); a conv with a padding_mode
other than zeros gets its input padded by F.pad in that mode first (exact, as nn.Conv2d does). Each rewritten conv
computes F.conv2d of its own actual input at the active positions and 0 (or the fill) elsewhere; for inference an
eval BatchNorm right after it is folded into it, and a residual add and then a clamp activation (ReLU, ReLU6,
Hardtanh) after that become its epilogue; everything else (pooling, other activations) runs unchanged on the whole
map.
"""
import dataclasses
import math
import operator
from typing import Any, Dict, List, NamedTuple, Optional, Set, Tuple, Type, Union

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F

from .. import ops as fxeff_ops
from ..ops.aoi_mask import dilate_mask
from ..nn.focus import REDUCES, AoIThreshold
from ..report import Report, SiteReport
from .config import PassConfig, PassContext, register_pass_config
from .graph import SYMBOLIC, ConvSite, conv_site, conv_sites, get_attr_value, graph_kind, module_stack, node_shape, \
    node_value, normalize_fqn, to_networkx
from .layout import ChannelAxes, channels_first_error
from .measure import fake_mode_of, run_recording
from .regions import LAYER_RUNS, Planner, fill_means, grid_masks_for, tile_macs
from .rewrite import batch_norm_affine, clamp_after, eval_batch_norm_after, held_by_module, new_attr, residual_add_after
from .splits import default_split_for_class, no_split_message

aten = torch.ops.aten
AOI_MASK = torch.ops.fxeff.aoi_mask.default
MASK_RESIZE = torch.ops.fxeff.mask_resize.default
FOCUSED_CONV2D = torch.ops.fxeff.focused_conv2d.default
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_ROLE = "fxeff_focus"  # node.meta key marking the nodes this pass inserted
FILLS = ("zeros", "mean")
EXECUTIONS = ("region", "layer", "auto")


@register_pass_config("focus")
@dataclasses.dataclass
class Focus(PassConfig):
    """Config of the focus pass.

    ``threshold``: a pixel is in the AoI when ``reduce(split_activation, dim=1) >= threshold``.
    ``split``: the module fqn (or node name) after which the AoI is taken; None: an AoI threshold
    already in the graph, else the built-in default of the model's family.
    ``reduce``: "sum" (as the focusedconv seed) or "mean" over channels.
    ``fill``: what a focused conv outputs outside the AoI. "zeros": nothing (the published
    technique). "mean": per output channel, the mean of the original conv's output outside the AoI
    on the example inputs (measured once by the pass, stored as a buffer): BatchNorm, residual adds
    and global pooling then see the background they were trained with instead of zeros; no MACs.
    ``halo``: the AoI grows by this many pixels at the split's grid (a (2 halo + 1)^2 max filter of
    the mask), so convs at the AoI's edge still see the context they saw in the original.
    ``execution``: "auto" (default): per grid, whichever of regions on tiles, per-layer focused convs or dense
    is fastest on the example inputs (tiles modelled, per-layer convs and the AoI mask measured at transform time;
    it needs real example inputs and static shapes, and says per grid what it chose in the report's notes);
    "layer": the published per-layer semantics, each conv a ``focused_conv2d`` with everything else on whole
    maps (as the seed package; works with dynamic shapes); "region": runs of local layers computed on the AoI's
    tiles, gathered and scattered once per region (passes/regions.py).
    ``tile``: region execution's tile side (None: chosen per grid by the cost model).
    ``dense_above``: a grid whose best modelled time is above this fraction of dense runs dense (reported);
    None: every grid runs on tiles (or per layer, with "auto").
    ``plan_batch``: "auto" times its per-layer options, the AoI mask and (symbolic graphs) its end-to-end check on
    the first ``plan_batch`` example images: plan for the batch size the model will run at (focused convs gain
    more at small batches, whose maps stay in cache). None: the whole example batch.
    ``fold_batchnorm``: an eval-mode BatchNorm that reads only a per-layer focused conv's output is folded into it
    (its running statistics at transform time scale the conv's weight, bias and fill), so it no longer runs over
    the whole map; the graph then computes the same values for inference. Training mode BatchNorms, and BatchNorms
    whose tensors or the conv's weight are graph inputs (dynamo, export), are kept. False keeps every BatchNorm (to
    fine-tune the focused model, or to time the fold apart).
    ``fuse_epilogue``: the ops after a per-layer focused conv (and the BatchNorm it folds) that it can take in as
    its epilogue: an add of another map of its shape (a residual connection), then a ReLU, ReLU6, Hardtanh or clamp.
    The kernel applies them to the active outputs as it stores them and to the fill in the pass that writes the
    inactive ones, so no pass over the whole map is left for them. Exact, in training too.
    """

    threshold: float
    split: Optional[str] = None
    reduce: str = "sum"
    fill: str = "zeros"
    halo: int = 0
    execution: str = "auto"
    tile: Optional[int] = None
    dense_above: Optional[float] = 0.9
    fold_batchnorm: bool = True
    fuse_epilogue: bool = True
    plan_batch: Optional[int] = None

    def __post_init__(self):
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise TypeError(f"fxeff.passes.Focus: threshold must be a float, got {type(self.threshold).__name__} "
                            f"{self.threshold!r}")
        self.threshold = float(self.threshold)
        if not math.isfinite(self.threshold):
            raise ValueError(f"fxeff.passes.Focus: threshold must be finite, got {self.threshold}")
        if self.split is not None and (not isinstance(self.split, str) or not self.split):
            raise ValueError(f"fxeff.passes.Focus: split must be a module fqn or node name (non-empty str) or None, "
                             f"got {self.split!r}")
        if self.reduce not in REDUCES:
            raise ValueError(f"fxeff.passes.Focus: reduce must be one of {REDUCES}, got {self.reduce!r}")
        if self.fill not in FILLS:
            raise ValueError(f"fxeff.passes.Focus: fill must be one of {FILLS}, got {self.fill!r}")
        if isinstance(self.halo, bool) or not isinstance(self.halo, int) or self.halo < 0:
            raise ValueError(f"fxeff.passes.Focus: halo must be an int >= 0, got {self.halo!r}")
        if self.execution not in EXECUTIONS:
            raise ValueError(f"fxeff.passes.Focus: execution must be one of {EXECUTIONS}, got {self.execution!r}")
        if self.tile is not None and (isinstance(self.tile, bool) or not isinstance(self.tile, int) or self.tile < 1):
            raise ValueError(f"fxeff.passes.Focus: tile must be an int >= 1 or None, got {self.tile!r}")
        if self.dense_above is not None and (isinstance(self.dense_above, bool) or
                                             not isinstance(self.dense_above, (int, float)) or self.dense_above <= 0):
            raise ValueError(f"fxeff.passes.Focus: dense_above must be a float > 0 or None, got {self.dense_above!r}")
        if self.plan_batch is not None and (isinstance(self.plan_batch, bool) or not isinstance(self.plan_batch, int)
                                            or self.plan_batch < 1):
            raise ValueError(f"fxeff.passes.Focus: plan_batch must be an int >= 1 or None, got {self.plan_batch!r}")
        for name in ("fold_batchnorm", "fuse_epilogue"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"fxeff.passes.Focus: {name} must be a bool, got {getattr(self, name)!r}")

    def run(self, gm: fx.GraphModule, context: PassContext) -> Report:
        return focus_pass(gm, self, context)


# ---------------------------------------------------------------- locating the split

_AOI_TARGETS = (torch.ops.fxeff.aoi_mask.default, torch.ops.fxeff.aoi_mask, fxeff_ops.aoi_mask)
_REDUCE_TARGETS = {torch.sum: "sum", torch.mean: "mean", aten.sum.dim_IntList: "sum", aten.mean.dim: "mean"}
_GE_TARGETS = (operator.ge, torch.ge, aten.ge.Scalar)
_LE_TARGETS = (operator.le, torch.le, aten.le.Scalar)


def _is_channel_dim(dim: Any, ndim: Optional[int]) -> bool:
    if isinstance(dim, (list, tuple)):
        if len(dim) != 1:
            return False
        dim = dim[0]
    if not isinstance(dim, int):
        return False
    return dim == 1 or (ndim == 4 and dim == -3)


def _channel_reduction_input(node: Any) -> Optional[fx.Node]:
    """x when ``node`` is ``x.sum(1)`` / ``x.mean(dim=1)`` / ``torch.sum(x, 1)`` / aten.sum.dim_IntList(x, [1])."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method" and node.target in ("sum", "mean"):
        pass
    elif node.op == "call_function" and node.target in _REDUCE_TARGETS:
        pass
    else:
        return None
    if not node.args:
        return None
    x = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    shape = node_shape(x)
    if keepdim or not _is_channel_dim(dim, len(shape) if shape is not None else None):
        return None
    if shape is not None and len(shape) != 4:
        return None
    return x


class FoundThreshold(NamedTuple):
    """An AoI threshold already in a graph: the node whose activation it thresholds, its threshold and reduce
    (None when not a constant), and a description for reports."""

    node: fx.Node
    threshold: Optional[float]
    reduce: str
    description: str


def _reduce_of(node: fx.Node) -> str:
    target = node.target if node.op == "call_method" else _REDUCE_TARGETS.get(node.target, "sum")
    return "mean" if target == "mean" else "sum"


def _constant(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def existing_aoi_thresholds(gm: fx.GraphModule) -> List[FoundThreshold]:
    """Each AoI threshold already in the graph (see FoundThreshold).

    Recognised: an ``fxeff.nn.AoIThreshold`` module, an ``fxeff::aoi_mask`` call, and the seed's
    pattern ``x.sum(1) >= t`` (also mean, ``torch.ge``, ``t <= x.sum(1)`` and the aten forms).
    """
    found = []
    for node in gm.graph.nodes:
        if node.meta.get(_ROLE) or not node.args:
            continue
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), AoIThreshold):
            module = gm.get_submodule(node.target)
            found.append(FoundThreshold(node.args[0], module.threshold, module.reduce,
                                        f"input of the AoIThreshold module {node.target!r}"))
        elif node.op == "call_function" and node.target in _AOI_TARGETS:
            threshold = node.args[1] if len(node.args) > 1 else node.kwargs.get("threshold")
            reduce = node.args[2] if len(node.args) > 2 else node.kwargs.get("reduce", "sum")
            found.append(FoundThreshold(node.args[0], _constant(threshold), reduce,
                                        f"input of the aoi_mask call {node.name!r}"))
        elif (node.op == "call_function" and node.target in _GE_TARGETS) or \
                (node.op == "call_method" and node.target == "ge"):
            x = _channel_reduction_input(node.args[0]) if len(node.args) == 2 and \
                isinstance(node.args[1], (int, float)) else None
            if x is not None:
                found.append(FoundThreshold(x, _constant(node.args[1]), _reduce_of(node.args[0]),
                                            f"input of the threshold {node.args[0].name} >= {node.args[1]} "
                                            f"({node.name!r})"))
        elif node.op == "call_function" and node.target in _LE_TARGETS and len(node.args) == 2 and \
                isinstance(node.args[0], (int, float)):
            x = _channel_reduction_input(node.args[1])
            if x is not None:
                found.append(FoundThreshold(x, _constant(node.args[0]), _reduce_of(node.args[1]),
                                            f"input of the threshold {node.args[0]} <= {node.args[1].name} "
                                            f"({node.name!r})"))
    return found


def find_split_node(gm: fx.GraphModule, split: str) -> Optional[fx.Node]:
    """The node whose output is module ``split``'s output (or the node named ``split``), or None.

    symbolic_trace: the call_module node; dynamo/export (and containers): the last node in graph
    order whose module stack contains ``split``.
    """
    last = None
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output") or node.meta.get(_ROLE):
            continue
        if node.op == "call_module" and node.target == split:
            return node
        if split in module_stack(node):
            last = node
    if last is not None:
        return last
    for node in gm.graph.nodes:
        if node.name == split:
            return node
    return None


def _class_from_graph(gm: fx.GraphModule) -> Optional[str]:
    """The root module's class name recorded by export in nn_module_stack ('' fqn), if any."""
    for node in gm.graph.nodes:
        for value in (node.meta.get("nn_module_stack") or {}).values():
            if isinstance(value, tuple) and value[0] == "":
                cls = value[1]
                return cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
    return None


def graph_module_classes(gm: fx.GraphModule) -> Dict[str, str]:
    """fqn -> class name of the modules the graph's nodes were called within, in graph order."""
    classes: Dict[str, str] = {}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        for value in stack.values():
            if not isinstance(value, tuple) or len(value) < 2:
                continue
            fqn = normalize_fqn(str(value[0]))
            cls = value[1]
            name = cls.rsplit(".", 1)[-1] if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
            if fqn and fqn not in classes:
                classes[fqn] = name
        if node.op == "call_module" and node.target not in classes:
            classes[str(node.target)] = type(gm.get_submodule(node.target)).__name__
    return classes


def locate_split(gm: fx.GraphModule, config: Focus, model_class: Union[Type, str, None]) -> Tuple[fx.Node, str]:
    """(split node, how it was found): the config's split, else an AoI threshold in the graph, else the default."""
    if config.split is not None:
        node = find_split_node(gm, config.split)
        if node is None:
            owner = getattr(model_class, "__name__", model_class) or "the graph"
            raise ValueError(f"fxeff.passes.Focus: split {config.split!r} names no module of {owner} and no node "
                             f"of the graph")
        return node, f"{config.split} (given)"
    thresholds = existing_aoi_thresholds(gm)
    if thresholds:
        nodes = {found.node for found in thresholds}
        if len(nodes) > 1:
            raise ValueError(f"fxeff.passes.Focus: the graph holds {len(nodes)} AoI thresholds on different "
                             f"activations ({[found.description for found in thresholds]}); pass "
                             f"Focus(split=...) to choose")
        node, description = thresholds[0].node, thresholds[0].description
        return node, f"{node.name}: {description}"
    cls = model_class if model_class is not None else _class_from_graph(gm)
    split = default_split_for_class(cls, graph_module_classes(gm)) if cls is not None else None
    if split is None:
        name = str(getattr(cls, "__name__", cls)).rsplit(".", 1)[-1]
        convs = [site.name for site in conv_sites(gm)]
        raise ValueError(no_split_message("fxeff.passes.Focus", name, convs) +
                         ("" if len(convs) <= 1 else " (no AoI threshold was found in the graph either)"))
    node = find_split_node(gm, split)
    if node is None:
        raise ValueError(f"fxeff.passes.Focus: the default split {split!r} of {getattr(cls, '__name__', cls)} names "
                         f"no module of this graph; pass Focus(split='<module fqn>')")
    return node, f"{split} (default for {getattr(cls, '__name__', str(cls).rsplit('.', 1)[-1])})"


# ---------------------------------------------------------------- rewriting

def _skip_reason(site: ConvSite, downstream: set, upstream: set, split: fx.Node) -> Optional[str]:
    if site.node is split or site.node in upstream:
        return "upstream of the AoI split"
    if site.node not in downstream:
        return "not downstream of the AoI split (a branch that does not read the split's output)"
    if site.transposed:
        return "transposed conv: focused_conv2d computes forward convs only"
    if site.dims != 2:
        return f"{site.dims}-D conv: focused_conv2d is 2-D only"
    if site.padding_mode not in _PADDING_MODES:
        return f"padding_mode={site.padding_mode!r} is not a padding mode fxeff knows"
    if site.unsupported:
        return site.unsupported
    if site.weight_shape is None or len(site.weight_shape) != 4:
        return "weight shape unknown"
    if site.output_grid is None:
        return "output shape unknown"
    return None


def _grid_key(grid) -> Tuple[str, str]:
    """A hashable key of an output grid: ints, or the sympy expressions of SymInts (equal expressions, one resize)."""
    return tuple(str(s.node.expr) if isinstance(s, torch.SymInt) else str(s) for s in grid)


def _symbolic_grid(graph: fx.Graph, site: ConvSite) -> List[Any]:
    """[Hout, Wout] as graph values: (size + 2p - d(k-1) - 1) // s + 1 from sym_size of the conv's input."""
    sizes = []
    for dim in (0, 1):
        size = site.input_shape[2 + dim] if site.input_shape is not None else None
        kernel = site.weight_shape[2 + dim]
        offset = 2 * site.padding[dim] - site.dilation[dim] * (kernel - 1) - 1
        if isinstance(size, int):
            sizes.append((size + offset) // site.stride[dim] + 1)
            continue
        value = graph.call_function(aten.sym_size.int, (site.input, 2 + dim))
        if offset:
            value = graph.call_function(operator.add, (value, offset))
        if site.stride[dim] != 1:
            value = graph.call_function(operator.floordiv, (value, site.stride[dim]))
        sizes.append(graph.call_function(operator.add, (value, 1)))
    return sizes


def _set_value(new: fx.Node, template: fx.Node, shape: Tuple[int, ...], dtype: torch.dtype) -> None:
    """Gives ``new`` a fake value like its neighbours' (dynamo: example_value, export: val)."""
    for key in ("val", "example_value"):
        value = template.meta.get(key)
        fake_mode = getattr(value, "fake_mode", None)
        if fake_mode is not None:
            with fake_mode:
                new.meta[key] = torch.empty(shape, dtype=dtype, device=value.device)


def _param_node(graph: fx.Graph, ref: Union[fx.Node, str, None]) -> Optional[fx.Node]:
    return graph.get_attr(ref) if isinstance(ref, str) else ref


def _rewrite(gm: fx.GraphModule, site: ConvSite, mask: fx.Node) -> fx.Node:
    """Replaces the conv by focused_conv2d. A non-zero padding_mode (reflect, replicate, circular) is kept
    exact: the input is padded by F.pad with that mode (as nn.Conv2d itself does) and the conv pads no more."""
    graph = gm.graph
    with graph.inserting_before(site.node):
        weight = _param_node(graph, site.weight)
        bias = _param_node(graph, site.bias)
        x, padding = site.input, list(site.padding)
        if site.padding_mode != "zeros":
            pads = [p for p in reversed(site.padding) for _ in range(2)]
            x = graph.call_function(F.pad, (x, pads), {"mode": site.padding_mode})
            x.meta[_ROLE] = "pad"
            padding = [0, 0]
        new = graph.call_function(FOCUSED_CONV2D, (x, weight, bias, mask, list(site.stride), padding,
                                                   list(site.dilation), site.groups))
    for key in ("nn_module_stack", "stack_trace", "val", "example_value", "tensor_meta", "fxeff_val"):
        if key in site.node.meta:
            new.meta[key] = site.node.meta[key]
    new.meta[_ROLE] = "focused_conv2d"
    site.node.replace_all_uses_with(new)
    graph.erase_node(site.node)
    return new


def _emit_dilation(graph: fx.Graph, mask: fx.Node, halo: int, split: fx.Node, shape: Tuple[int, ...]) -> fx.Node:
    """dilate_mask(mask, halo) after ``mask`` (a leaf of ATen ops: valid in symbolic, dynamo and export graphs)."""
    with graph.inserting_after(mask):
        node = graph.call_function(dilate_mask, (mask, halo))
    node.meta[_ROLE] = "aoi_halo"
    _set_value(node, split, shape, torch.bool)
    return node


def _outside_means(config: Focus, values: Dict[fx.Node, torch.Tensor], split: fx.Node,
                   sites: List[ConvSite]) -> Dict[fx.Node, torch.Tensor]:
    """conv node -> per-channel mean of the original conv's output outside the AoI (at its own grid) over
    the example inputs (``values``: the original graph's), for fill="mean"; zeros for a conv whose AoI
    covers everything."""
    return fill_means(values, _example_mask(config, values[split]), [site.node for site in sites])


def _example_mask(config: Focus, split_value: torch.Tensor) -> torch.Tensor:
    """The AoI (grown by the halo) the graph computes from ``split_value``, the split's value on example inputs."""
    return dilate_mask(AOI_MASK(split_value, config.threshold, config.reduce), config.halo)


def _focus_conv(gm: fx.GraphModule, site: ConvSite, mask: fx.Node, mean: Optional[torch.Tensor],
                split: fx.Node, config: "Focus") -> Tuple[Optional[str], List[str]]:
    """The conv as focused_conv2d on ``mask``, with ``mean`` outside the AoI when given, (``config.fold_batchnorm``)
    the BatchNorm that follows it folded in and (``config.fuse_epilogue``) the residual add and clamp activation after
    that fused as its epilogue; returns the names of that BatchNorm (None where there is none) and of the fused ops."""
    new = _rewrite(gm, site, mask)
    if mean is not None:
        _fill_outside(gm, site, new, mean, split)
    folded = _fold_batch_norm(gm, new, site, split) if config.fold_batchnorm else None
    fused = []
    if config.fuse_epilogue:
        fused = [name for name in (_fuse_residual(gm, new), _fuse_clamp(gm, new)) if name is not None]
    return folded, fused


def _epilogue_args(new: fx.Node, **changes: Any) -> None:
    """Sets focused_conv2d's arguments after the conv's own (fill, clamp_min, clamp_max, residual) in ``new``."""
    names = ("fill", "clamp_min", "clamp_max", "residual")
    extra = dict(zip(names, tuple(new.args[8:]) + (None,) * (len(names) - len(new.args[8:]))))
    extra.update(changes)
    values = [extra[name] for name in names]
    while values and values[-1] is None:
        values.pop()
    new.args = tuple(new.args[:8]) + tuple(values)


def _fuse_residual(gm: fx.GraphModule, new: fx.Node) -> Optional[str]:
    """Fuses an add of the focused conv ``new`` and another map of its shape (a residual connection) into it
    (focused_conv2d's residual: added to the active outputs as they are stored and to the fill elsewhere, in the pass
    that writes the inactive outputs anyway); ``new`` moves to the add's place, after the other operand. Exact,
    gradients included. Returns the add's name, or None."""
    found = residual_add_after(new)
    if found is None:
        return None
    add, other = found
    add.prepend(new)
    _epilogue_args(new, residual=other)
    add.replace_all_uses_with(new)
    gm.graph.erase_node(add)
    return add.name


def _fuse_clamp(gm: fx.GraphModule, new: fx.Node) -> Optional[str]:
    """Fuses a ReLU, ReLU6, Hardtanh or clamp that reads only the focused conv ``new`` into it (focused_conv2d's
    clamp_min / clamp_max: the kernel clamps the active outputs as it stores them and writes the clamped fill), so no
    pass over the whole map is left for it; exact, gradients included. Returns its name, or None."""
    found = clamp_after(gm, new)
    if found is None:
        return None
    user, lo, hi = found
    _epilogue_args(new, clamp_min=lo, clamp_max=hi)
    user.replace_all_uses_with(new)
    gm.graph.erase_node(user)
    return str(user.target if user.op == "call_module" else user.name)


def _fold_batch_norm(gm: fx.GraphModule, new: fx.Node, site: ConvSite, split: fx.Node) -> Optional[str]:
    """Folds an eval-mode BatchNorm that reads only the focused conv ``new`` into it, with its running statistics at
    transform time: per output channel s = gamma / sqrt(var + eps), the weight times s, the bias (b - mean) s + beta
    and the fill outside the AoI (fill - mean) s + beta (computed in float64, stored in the weight's dtype and
    memory format as new buffers). The BatchNorm leaves the graph. Returns its name, or None where there is no
    BatchNorm that can be folded (see Focus.fold_batchnorm)."""
    graph = gm.graph
    found = eval_batch_norm_after(gm, new)
    if found is None:
        return None
    user, out, stats, eps = found
    weight_node, bias_node = new.args[1], new.args[2]
    fill_node = new.args[8] if len(new.args) > 8 else None
    if not held_by_module(weight_node, bias_node, fill_node):
        return None
    weight = get_attr_value(gm, weight_node.target)
    o = weight.shape[0]
    scale, mean, beta = batch_norm_affine(stats, eps)
    bias = get_attr_value(gm, bias_node.target).double() if bias_node is not None else torch.zeros_like(mean)
    fill = get_attr_value(gm, fill_node.target).double().reshape(o) if fill_node is not None \
        else torch.zeros_like(mean)
    base = site.name.replace(".", "_")
    folded = {"weight": (weight.double() * scale.view(o, 1, 1, 1)).to(weight.dtype),
              "bias": ((bias - mean) * scale + beta).to(weight.dtype)}
    with graph.inserting_before(new):
        nodes = {}
        for name, value in folded.items():
            nodes[name] = graph.get_attr(new_attr(gm, f"{base}_bn_{name}", value, parameter=False))
            nodes[name].meta[_ROLE] = "bn_fold"
            _set_value(nodes[name], split, tuple(value.shape), value.dtype)
        fill_attr = _fill_attr(gm, site, ((fill - mean) * scale + beta).to(weight.dtype), split)
    new.args = (new.args[0], nodes["weight"], nodes["bias"]) + tuple(new.args[3:8]) + (fill_attr,)
    name = user.target if user.op == "call_module" else user.name
    out.replace_all_uses_with(new)
    if out is not user:
        for u in list(user.users):
            graph.erase_node(u)
    graph.erase_node(user)
    for node in (weight_node, bias_node, fill_node):
        if node is not None and not node.users:
            graph.erase_node(node)
            if node is fill_node:  # the fill buffer this pass added for the conv: replaced by the folded one
                delattr(gm, node.target)
    return str(name)


def _fill_attr(gm: fx.GraphModule, site: ConvSite, mean: torch.Tensor, split: fx.Node) -> fx.Node:
    """A get_attr node (at the graph's insertion point) of a new buffer holding ``mean`` as [1, C, 1, 1]: the fill of
    ``site``'s output outside the AoI."""
    name = new_attr(gm, f"{site.name.replace('.', '_')}_aoi_fill", mean.view(1, -1, 1, 1), parameter=False)
    fill = gm.graph.get_attr(name)
    fill.meta[_ROLE] = "aoi_fill"
    _set_value(fill, split, (1, mean.numel(), 1, 1), mean.dtype)
    return fill


def _fill_outside(gm: fx.GraphModule, site: ConvSite, new: fx.Node, mean: torch.Tensor, split: fx.Node) -> None:
    """The focused conv's output with ``mean`` outside the AoI: the kernel writes it there itself (focused_conv2d's
    ``fill``, in the pass that writes the inactive outputs anyway), so no extra pass over the map."""
    with gm.graph.inserting_before(new):
        fill = _fill_attr(gm, site, mean, split)
    new.args = tuple(new.args[:8]) + (fill,)


def _hold_fill(gm: fx.GraphModule, site: ConvSite, mask: fx.Node, mean: Optional[torch.Tensor],
               split: fx.Node) -> None:
    """A conv that stays dense in a grid run per layer: its output outside the AoI set to the fill (``mean``, or
    zeros), as a focused conv's is. Without it the dense conv would carry the previous conv's fill through its
    nonlinear neighbours (BN, ReLU, max pool of a constant is not the mean of them) into the next focused conv's
    halo: measured on the VGG-style reference model, keeping the first conv of each grid dense that way lost 2.15
    points where layer execution loses none; with the fill held, a grid run per layer computes layer execution's
    values whatever it keeps dense."""
    graph = gm.graph
    node = site.node
    shape = node_shape(node)
    with graph.inserting_after(node):
        inside = graph.call_function(aten.unsqueeze.default, (mask, 1))
    if mean is not None:
        with graph.inserting_after(inside):
            fill = _fill_attr(gm, site, mean, split)
        with graph.inserting_after(fill):
            held = graph.call_function(aten.where.self, (inside, node, fill))
    else:
        with graph.inserting_after(inside):
            held = graph.call_function(aten.where.ScalarOther, (inside, node, 0.0))
    inside.meta[_ROLE] = held.meta[_ROLE] = "aoi_fill"
    if shape is not None:
        _set_value(inside, split, (shape[0], 1, shape[2], shape[3]), torch.bool)
        _set_value(held, split, tuple(shape), getattr(node_value(node), "dtype", None) or torch.float32)
    node.replace_all_uses_with(held, delete_user_cb=lambda user: user is not held)


def focus_pass(gm: fx.GraphModule, config: Focus, context: PassContext) -> Report:
    """Rewrites ``gm`` in place (recompiled) and returns the report; see the module docstring.

    Two runs of the graph: one before rewriting (shapes, and for fill="mean" the background), one after
    (MACs, AoI fractions). With real inputs the first counts no FLOPs: the model's MACs before are those
    after plus what each focused conv saved, which its dense and focused MAC formulas give exactly."""
    fake = fake_mode_of(context.example_inputs) is not None
    split, split_description = locate_split(gm, config, context.model_class)
    if config.fill == "mean" and fake:
        raise ValueError("fxeff.passes.Focus: fill='mean' measures the background on real example inputs, got fake "
                         "tensors; pass real images (or use fill='zeros')")
    if config.execution == "auto" and fake:
        raise ValueError("fxeff.passes.Focus: execution='auto' times each grid's options on the real example inputs' "
                         "AoI, got fake tensors; pass real images (or choose execution='layer' or 'region')")
    region = config.execution in ("region", "auto")
    keep = [split] + ([site.node for site in conv_sites(gm)] if config.fill == "mean" and not region else [])
    axes = ChannelAxes(context.example_inputs)  # which axis of the split's output holds the channels
    flops_before, before = run_recording(gm, context.example_inputs, keep, count_flops=fake or region, mode=axes)
    sites = conv_sites(gm)  # after the run: symbolic graphs now carry shapes
    split_shape = node_shape(split)
    if split_shape is None or len(split_shape) != 4:
        raise ValueError(f"fxeff.passes.Focus: the split {split_description} must produce a 4-D activation "
                         f"[N, C, H, W], got shape {split_shape}")
    wrong_axis = channels_first_error("fxeff.passes.Focus", f"the output of the split {split_description}",
                                      axes.of(before[split]), split_shape)
    if wrong_axis:
        raise ValueError(wrong_axis)
    graph = gm.graph
    flow = to_networkx(graph)
    downstream, upstream = nx.descendants(flow, split), nx.ancestors(flow, split)
    if region:
        return _region_focus(gm, config, context, split, split_description, split_shape, flops_before,
                             before[split], downstream, upstream, sites)

    aoi, mask = _emit_aoi(graph, config, split, split_shape)  # with a halo, ``mask`` ends the dilation chain
    grid_masks: Dict[Tuple[str, str], fx.Node] = {_grid_key(split_shape[2:]): mask}

    site_reports: List[SiteReport] = []
    rewritten: List[Tuple[SiteReport, ConvSite, fx.Node]] = []
    reasons = {site.node: _skip_reason(site, downstream, upstream, split) for site in sites}
    means = {}
    folded: List[str] = []  # the BatchNorms folded into focused convs
    fused: List[str] = []  # the residual adds and activations fused into them
    if config.fill == "mean":
        means = _outside_means(config, before, split, [site for site in sites if reasons[site.node] is None])
        del before
    for site in sites:
        reason = reasons[site.node]
        macs = site.macs()
        if reason is not None:
            site_reports.append(SiteReport(site.name, site.describe(), "skipped", reason, macs, macs, "focus"))
            continue
        site.input = conv_site(gm, site.node).input  # a conv feeding this one may have been rewritten already
        grid = site.output_grid
        key = _grid_key(grid)
        if key not in grid_masks:
            if all(isinstance(s, int) for s in grid):
                with graph.inserting_after(mask):
                    resized = graph.call_function(MASK_RESIZE, (mask, list(grid)))
            else:  # dynamic shapes: the grid is computed in the graph from the conv's input size
                with graph.inserting_before(site.node):
                    resized = graph.call_function(MASK_RESIZE, (mask, _symbolic_grid(graph, site)))
            resized.meta[_ROLE] = "mask_resize"
            _set_value(resized, split, (split_shape[0],) + tuple(grid), torch.bool)
            grid_masks[key] = resized
        mask_k = grid_masks[key]
        folded_bn, fused_ops = _focus_conv(gm, site, mask_k, means.get(site.node), split, config)
        folded += [folded_bn] if folded_bn is not None else []
        fused += fused_ops
        entry = SiteReport(site.name, site.describe(), "rewritten", "", macs, None, "focus")
        site_reports.append(entry)
        rewritten.append((entry, site, mask_k))

    notes = []
    if config.fill == "mean" and rewritten:
        notes.append("fill='mean': outside the AoI each focused conv outputs the per-channel mean of the original "
                     "conv's output there on the example inputs")
    notes += _folded_notes(folded, fused)
    if not rewritten:
        _erase_chain(graph, mask, aoi)
        notes.append("no conv could be focused: the graph is unchanged")
    graph.lint()
    gm.recompile()

    report = Report(pass_name="focus", sites=site_reports, split=split_description,
                    model_macs_before=flops_before // 2 if fake else None, notes=notes)
    if fake:
        report.notes.append("example inputs are fake tensors: AoI fractions and MACs after are n/a")
        return report
    keep = [mask] + [m for _, _, m in rewritten] if rewritten else []
    flops_after, values = run_recording(gm, context.example_inputs, keep)
    report.model_macs_after = flops_after // 2
    if rewritten:
        report.aoi_fractions = [float(f) for f in values[mask].float().mean(dim=(1, 2))]
        for entry, site, mask_k in rewritten:
            entry.macs_after = int(values[mask_k].count_nonzero()) * site.macs_per_output_position()
    # the graph is the original one but for the focused convs, each counted at its active outputs (ops/flops.py)
    report.model_macs_before = report.model_macs_after + sum(e.macs_before - e.macs_after for e, _, _ in rewritten)
    return report


def _folded_notes(folded: List[str], fused: List[str]) -> List[str]:
    """The report's notes on the BatchNorms folded into focused convs and the residual adds and activations fused
    into them."""
    def names(nodes: List[str]) -> str:
        return ", ".join(nodes[:6]) + (", ..." if len(nodes) > 6 else "")

    notes = []
    if folded:
        notes.append(f"{len(folded)} eval-mode BatchNorm(s) folded into the focused conv before them ({names(folded)}):"
                     " their running statistics scale the conv's weight, bias and fill, for inference "
                     "(Focus(fold_batchnorm=False) keeps them)")
    if fused:
        notes.append(f"{len(fused)} residual add(s) and activation(s) fused into the focused conv before them as its "
                     f"epilogue ({names(fused)}; Focus(fuse_epilogue=False) keeps them)")
    return notes


def _erase_chain(graph: fx.Graph, mask: fx.Node, aoi: fx.Node) -> None:
    """Removes the AoI mask this pass inserted (its dilation chain, back to its aoi_mask)."""
    node = mask
    while True:
        previous = node.args[0] if node is not aoi else None
        graph.erase_node(node)
        if previous is None:
            break
        node = previous


def _emit_aoi(graph: fx.Graph, config: Focus, split: fx.Node, split_shape) -> Tuple[fx.Node, fx.Node]:
    """(the thresholded AoI node, the mask the convs read: the AoI grown by the halo) inserted after the split."""
    with graph.inserting_after(split):
        mask = graph.call_function(AOI_MASK, (split, config.threshold, config.reduce))
    mask.meta[_ROLE] = "aoi_mask"
    mask_shape = (split_shape[0], split_shape[2], split_shape[3])
    _set_value(mask, split, mask_shape, torch.bool)
    return mask, (_emit_dilation(graph, mask, config.halo, split, mask_shape) if config.halo else mask)


# Interleaved runs of auto's end-to-end check (the rewritten graph against the graph as it came).
WHOLE_RUNS = 9


def _slower_than_before(gm: fx.GraphModule, before: fx.Graph, context: PassContext, plan_batch: Optional[int],
                        batch: int) -> Optional[float]:
    """The rewritten ``gm``'s time over the graph ``before`` (the same module's parameters) on the example inputs,
    when above 1 (else None): auto's last word, since its per-grid choices are measured one grid at a time and the
    whole may still lose (a grid's saving smaller than the AoI mask's cost, caches shared between layers). With a
    ``plan_batch`` below the example ``batch``, a symbolic graph (its inputs are the model's) runs its first
    ``plan_batch`` images; dynamo and export graphs (parameters among their inputs) the whole example batch."""
    from .. import bench

    gm.recompile()
    dense = fx.GraphModule(gm, before)
    inputs = context.example_inputs
    if plan_batch is not None and plan_batch < batch and graph_kind(gm) == SYMBOLIC:
        inputs = [x[:plan_batch] if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch else x
                  for x in inputs]
    times = bench.interleaved([lambda: dense(*inputs), lambda: gm(*inputs)], WHOLE_RUNS, warmup=1)
    ratio = times[1] / times[0]
    return ratio if ratio > 1.0 else None


def _region_focus(gm: fx.GraphModule, config: Focus, context: PassContext, split: fx.Node, split_description: str,
                  split_shape, flops_before: int, split_value: torch.Tensor, downstream: set, upstream: set,
                  sites: List[ConvSite]) -> Report:
    """Region execution (passes/regions.py): plans each grid on the example inputs, rewrites, and reports."""
    graph = gm.graph
    fake = fake_mode_of(context.example_inputs) is not None
    batch = split_shape[0]
    if not isinstance(batch, int) or not all(isinstance(s, int) for s in split_shape):
        raise NotImplementedError("fxeff.passes.Focus: region execution needs static shapes (each grid's tiles are "
                                  "planned at transform time); this graph has dynamic shapes "
                                  f"{tuple(split_shape)}: use Focus(execution='layer')")
    by_node = {site.node: site for site in sites if site.node in downstream}
    planner = Planner(gm, downstream, by_node, batch, config.tile, config.dense_above,
                      per_layer=config.execution == "auto", fill_add=config.fill == "mean",
                      fold_batchnorm=config.fold_batchnorm, fuse_epilogue=config.fuse_epilogue,
                      plan_batch=config.plan_batch)
    planner.classify()
    # auto checks its whole plan against the graph as it came (measured end to end below): a copy to go back to.
    before, copied = fx.Graph(), {}
    before.output(before.graph_copy(graph, copied))
    for node, copy in copied.items():  # what dynamo attaches to its placeholders (not meta: graph_copy drops it)
        if hasattr(node, "_dynamo_source"):
            copy._dynamo_source = node._dynamo_source
    buffers_before = {name for name, _ in gm.named_buffers()}

    def mask_seconds(at: List[Tuple[int, int]]) -> float:  # the AoI mask and its resizes, as the graph computes them
        from .. import bench

        planned = split_value[:config.plan_batch]

        def run():
            return grid_masks_for(_example_mask(config, planned), at)

        return bench.interleaved([run], LAYER_RUNS, warmup=1)[0]

    mask_value = None if fake else _example_mask(config, split_value)
    grids = sorted({planner.grid[n] for n in planner.tiled})
    value_masks = grid_masks_for(mask_value, grids) if mask_value is not None else None
    planner.plan_grids(value_masks, None if fake else mask_seconds)
    layer_means = {}
    if config.fill == "mean":
        nodes = planner.needs_fill()
        _, values = run_recording(gm, context.example_inputs, nodes + planner.layer_convs + planner.layer_dense,
                                  count_flops=False)
        planner.fills = fill_means(values, mask_value, nodes)
        layer_means = fill_means(values, mask_value, planner.layer_convs + planner.layer_dense)
        del values
    aoi, mask = _emit_aoi(graph, config, split, split_shape)
    masks = {}
    for grid, plan in sorted(planner.grids.items()):
        if not plan.region and not plan.layer:
            continue
        if grid == tuple(split_shape[2:]):
            masks[grid] = mask
            continue
        with graph.inserting_after(mask):
            masks[grid] = graph.call_function(MASK_RESIZE, (mask, list(grid)))
        masks[grid].meta[_ROLE] = "mask_resize"
    planner.rewrite(masks)
    per_layer: Set[fx.Node] = set()  # the convs of grids run per layer that run focused
    folded: List[str] = []  # the BatchNorms folded into them
    fused: List[str] = []  # the residual adds and activations fused into them
    for conv in planner.layer_convs:
        by_node[conv].input = conv_site(gm, conv).input  # it may read a region's scatter now
        per_layer.add(conv)
        folded_bn, fused_ops = _focus_conv(gm, by_node[conv], masks[planner.grid[conv]], layer_means.get(conv),
                                           split, config)
        folded += [folded_bn] if folded_bn is not None else []
        fused += fused_ops
    for conv in planner.layer_dense:
        _hold_fill(gm, by_node[conv], masks[planner.grid[conv]], layer_means.get(conv), split)
    slower = None
    if config.execution == "auto" and not fake and (planner.tiled or per_layer):
        slower = _slower_than_before(gm, before, context, config.plan_batch, batch)
        if slower is not None:  # the plan measured slower than the graph as it came: that graph runs
            gm.graph = graph = before
            for name in {name for name, _ in gm.named_buffers()} - buffers_before:
                if "." not in name:  # the fills the rewrite added
                    delattr(gm, name)
            per_layer, planner.tiled, folded, fused = set(), set(), [], []

    site_reports: List[SiteReport] = []
    tiled: List[Tuple[SiteReport, ConvSite]] = []
    layered: List[Tuple[SiteReport, ConvSite]] = []
    for site in sites:
        macs = site.macs()
        if site.node in per_layer:
            entry = SiteReport(site.name, f"{site.describe()} [per-layer focused conv]", "rewritten", "", macs, None,
                               "focus")
            layered.append((entry, site))
        elif site.node in planner.tiled:
            plan = planner.grids[planner.grid[site.node]]
            entry = SiteReport(site.name, f"{site.describe()} [tiles {plan.tile}, margin {plan.margins[site.node]}]",
                               "rewritten", "", macs, None, "focus")
            tiled.append((entry, site))
        else:
            reason = (_skip_reason(site, downstream, upstream, split) or
                      (f"auto: the whole plan measured {slower:.2f}x the dense graph's time on the example inputs"
                       if slower is not None else None) or
                      planner.why_not.get(site.node) or "not computed on tiles")
            entry = SiteReport(site.name, site.describe(), "skipped", reason, macs, macs, "focus")
        site_reports.append(entry)
    notes = [plan.describe() for _, plan in sorted(planner.grids.items(), key=lambda item: -item[0][0])]
    if planner.ended_note():
        notes.append(planner.ended_note())
    if config.fill == "mean" and tiled:
        notes.append("fill='mean': outside the AoI each region output holds the per-channel mean of the original "
                     "value there on the example inputs")
    if config.fill == "mean" and layered:
        notes.append("fill='mean': outside the AoI each per-layer focused conv outputs the per-channel mean of the "
                     "original conv's output there on the example inputs")
    notes += _folded_notes(folded, fused)
    if slower is not None:
        notes.append(f"auto: the plan above ran at {slower:.2f}x the dense graph's time on the example inputs "
                     f"(measured end to end, {WHOLE_RUNS} interleaved runs), so the graph computes the dense model")
    elif not tiled and not layered:
        notes.append("no conv runs on tiles or per layer: the graph computes the dense model")
        _erase_chain(graph, mask, aoi)
    graph.lint()
    gm.recompile()
    report = Report(pass_name="focus", sites=site_reports, split=split_description, notes=notes,
                    model_macs_before=flops_before // 2)
    if fake:
        report.notes.append("example inputs are fake tensors: tiles not costed, AoI fractions and MACs after are n/a")
        return report
    plans = [plan.plan for plan in planner.grids.values() if plan.plan is not None and slower is None]
    layer_masks = sorted({masks[planner.grid[site.node]] for _, site in layered}, key=lambda n: n.name)
    flops_after, values = run_recording(gm, context.example_inputs,
                                        plans + layer_masks + ([mask] if tiled or layered else []))
    report.model_macs_after = flops_after // 2
    if tiled or layered:
        report.aoi_fractions = [float(f) for f in values[mask].float().mean(dim=(1, 2))]
    elif slower is not None:  # the plan was dropped: the AoI it would have used, as the graph computed it
        report.aoi_fractions = [float(f) for f in mask_value.float().mean(dim=(1, 2))]
    for entry, site in tiled:
        grid = planner.grid[site.node]
        plan = planner.grids[grid]
        entry.macs_after = tile_macs(plan, site.node, site, int(values[plan.plan].shape[1]))
    for entry, site in layered:
        entry.macs_after = int(values[masks[planner.grid[site.node]]].count_nonzero()) * site.macs_per_output_position()
    return report


__all__ = ["Focus", "focus_pass", "locate_split", "find_split_node", "existing_aoi_thresholds", "FoundThreshold"]
