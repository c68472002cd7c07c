"""Region execution of the focus pass: runs of spatially local layers computed on the AoI's tiles only.

After the AoI split, every conv on a grid the cost model accepts becomes ``fxeff::tile_conv2d`` on a *tile batch*:
the tiles of side T (per grid) that hold an active AoI pixel, each with the halo (margin) the following layers of
its region still need. BatchNorm, activations, residual adds and other pointwise ops between maps of the same grid
run unchanged on the tile batch. Data moves between whole maps and tile batches only at a region's edges
(``fxeff/ops/regions.py``): a *gather* where a region reads a whole map (its entry conv, with that conv's stride
and padding, or a skip connection), a *scatter* where a whole map is read (an op the pass does not run on tiles, a
grid change, the output), and ``region_mean`` where a global average pool reads a region (the head's pool,
squeeze-excitation), computed from the tiles and the fill without a map.

Semantics (what the tests check):
- inside the AoI, a region's output equals the dense region applied to the same region inputs;
- outside the AoI, a scattered map holds the fill (0, or fill="mean": per channel, the mean of the original value
  there on the example inputs);
- positions outside the image read zeros before every conv inside a region (multiplied by an inside mask), as the
  conv's padding reads; a BatchNorm shift or a bias never leaks across the border.

The margin of each node is the halo its tile-batch consumers need (a same-grid conv adds its padding). A node
whose margin would exceed the budget of its grid (T // 4, at least 1) ends its region: it is computed at margin 0,
scattered, and its consumers gather it again with their halo. That keeps regions short (two or three layers), so
halos stay small against T (docs/regions.md).

Cost model (docs/regions.md, numbers of benchmarks/region_cost.py): a grid's modelled time relative to dense is
``MAC ratio / throughput(T) + 0.1`` where the MAC ratio counts the tile batch's MACs (halo and tile rounding
included) on the example inputs, throughput(T) is the tile conv's measured speed per MAC relative to the dense conv
(0.62 at T=8, 0.75 at 16, 0.8 at 32, measured; 0.45 at T=4 and 0.62 at 7, 0.75 at 14 and 0.8 at 28 not measured yet)
and 0.1 is gather and scatter. T is the candidate with
the least modelled time; a grid whose best modelled time is above ``dense_above`` runs dense, reported per grid.
"""
import dataclasses
import operator
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..ops import regions as R
from ..ops.mask_resize import mask_resize
from .graph import ConvSite, concrete_shape
from .measure import _writes_in_place
from .rewrite import clamp_after, eval_batch_norm_after, held_by_module, new_attr, residual_add_after

aten = torch.ops.aten
TILE_CONV2D = torch.ops.fxeff.tile_conv2d.default
ROLE = "fxeff_focus"

# throughput of the tile batch's convs per MAC relative to the dense conv, by tile side: T=8-32 measured by
# benchmarks/region_cost.py (docs/benchmarks.md); T=4 and T=7 are not measured yet (extrapolated, lower for T=4)
THROUGHPUT = {4: 0.45, 7: 0.62, 8: 0.62, 14: 0.75, 16: 0.75, 28: 0.8, 32: 0.8}
GATHER_SCATTER = 0.1  # gather and scatter, as a fraction of the dense region's time
# A grid can also run per layer: each conv a focused_conv2d (the published semantics), whose kernel picks its
# strategy per call. Its cost is measured at transform time, not modelled: each conv of the grid is timed as
# focused_conv2d with the example inputs' mask against F.conv2d, on inputs of its shape, dtype and memory format at
# the planned batch (LAYER_RUNS interleaved runs, medians); an eval BatchNorm, residual add and clamp activation the
# focused conv takes in are timed on the dense side, other ops cost the same either way. (The focused conv kernel's
# own cost model was tried here first: it predicts 0.54-0.87 of dense for ResNet-50's grids where whole-model runs
# measure 0.92-1.38x speedups.)
LAYER_RUNS = 5
TILE_SIDES = tuple(sorted(THROUGHPUT))
DEFAULT_TILE = 8  # without real example inputs there is no mask to cost tiles with

_POINTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.GELU,
                      nn.LeakyReLU, nn.ELU, nn.Mish, nn.Hardtanh, nn.PReLU, nn.Identity)
_EVAL_ONLY_MODULES = (nn.BatchNorm2d, nn.Dropout, nn.Dropout2d)
_POINTWISE_FUNCTIONS = {
    torch.relu, torch.relu_, F.relu, F.relu6, F.hardtanh, F.silu, F.hardswish, F.hardsigmoid, F.gelu, F.leaky_relu,
    F.elu, F.mish, torch.sigmoid, torch.tanh, F.sigmoid,
    operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, operator.truediv, torch.add, torch.mul,
    torch.sub, torch.clamp, torch.clamp_min,
    aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default, aten.silu.default,
    aten.silu_.default, aten.hardswish.default, aten.hardswish_.default, aten.hardsigmoid.default,
    aten.hardsigmoid_.default, aten.sigmoid.default, aten.tanh.default, aten.gelu.default, aten.leaky_relu.default,
    aten.elu.default, aten.add.Tensor, aten.add_.Tensor, aten.mul.Tensor, aten.mul_.Tensor, aten.sub.Tensor,
    aten.div.Tensor, aten.clamp.default, aten.clamp_min.default, aten.clone.default, aten.alias.default,
    aten._native_batch_norm_legit_no_training.default,
}
_POINTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "add", "add_", "mul", "mul_", "sub", "div", "clamp",
                      "clamp_", "clamp_min", "contiguous", "clone"}
_MEANS = {F.adaptive_avg_pool2d, aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default, torch.mean,
          aten.mean.dim}


@dataclasses.dataclass
class GridPlan:
    """How one grid (H, W) of the graph runs: its tile side, margins, and the cost model's numbers."""

    size: Tuple[int, int]
    tile: int = 0
    budget: int = 0
    mac_ratio: float = 1.0
    modelled: float = 1.0
    tiles: int = 0
    region: bool = False
    layer: bool = False  # per-layer focused convs (region is False)
    layer_modelled: float = float("inf")
    layer_times: Dict[fx.Node, Tuple[float, float]] = dataclasses.field(default_factory=dict)
    layer_focused: Set[fx.Node] = dataclasses.field(default_factory=set)  # the convs measured faster focused
    reason: str = ""
    margins: Dict[fx.Node, int] = dataclasses.field(default_factory=dict)
    cuts: Set[fx.Node] = dataclasses.field(default_factory=set)
    gather_margin: Dict[fx.Node, int] = dataclasses.field(default_factory=dict)
    convs: List[fx.Node] = dataclasses.field(default_factory=list)
    mask: Optional[fx.Node] = None
    plan: Optional[fx.Node] = None
    inside: Dict[int, fx.Node] = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        h, w = self.size
        if self.layer:
            return (f"grid {h}x{w}: per layer, {len(self.layer_focused)} of {len(self.layer_times)} convs focused "
                    f"(those measured faster than dense), {self.layer_modelled:.2f} of the dense convs' time on the "
                    f"example inputs' mask (tiles modelled {self.modelled:.2f} at T={self.tile}, MAC ratio "
                    f"{self.mac_ratio:.2f})")
        if not self.region:
            return f"grid {h}x{w}: dense ({self.reason})"
        cut = f", {len(self.cuts)} region cut(s)" if self.cuts else ""
        return (f"grid {h}x{w}: regions of {self.tile}x{self.tile} tiles, margin <= {self.budget}{cut}; "
                f"{self.tiles} active tiles on the example inputs, MAC ratio {self.mac_ratio:.2f}, modelled time "
                f"{self.modelled:.2f} of dense" + (f" (per layer measured {self.layer_modelled:.2f})"
                                                   if self.layer_modelled < float("inf") else ""))


def _recorded_format(node: fx.Node) -> torch.memory_format:
    """The memory format of ``node``'s value on the example inputs (measure.ValueMeta), contiguous if unknown."""
    return getattr(node.meta.get("fxeff_val"), "memory_format", torch.contiguous_format)


def _random_at_batch(node: fx.Node, batch: int, device: torch.device) -> Optional[torch.Tensor]:
    """A random tensor like ``node``'s value on the example inputs (its shape, dtype and memory format as recorded)
    with ``batch`` images, for timing; None where its shape is unknown."""
    shape = concrete_shape(node)
    if shape is None or len(shape) == 0:
        return None
    dtype = getattr(node.meta.get("fxeff_val"), "dtype", torch.float32)
    value = torch.randn((batch,) + tuple(shape[1:]), dtype=dtype, device=device)
    return value.contiguous(memory_format=_recorded_format(node)) if value.dim() == 4 else value


class Planner:
    """Classifies the nodes after the split (tile-form or whole-map), plans each grid and rewrites the graph."""

    def __init__(self, gm: fx.GraphModule, downstream: Set[fx.Node], sites: Dict[fx.Node, ConvSite], batch: int,
                 tile: Optional[int], dense_above: Optional[float], per_layer: bool = False, fill_add: bool = False,
                 fold_batchnorm: bool = False, fuse_epilogue: bool = False, plan_batch: Optional[int] = None):
        self.gm, self.graph = gm, gm.graph
        self.plan_batch = plan_batch  # per-layer options are timed on this many of the example images (None: all)
        self.per_layer = per_layer  # a grid may run per layer (focused_conv2d each) where the cost model prefers
        self.fill_add = fill_add  # fill="mean": a per-layer focused conv writes the fill outside the AoI (timed so)
        self.fold_batchnorm = fold_batchnorm  # a per-layer focused conv takes in the eval BatchNorm after it
        self.fuse_epilogue = fuse_epilogue  # ... and the residual add and clamp activation after that, as its epilogue
        self.downstream, self.sites, self.batch = downstream, sites, batch
        self.tile, self.dense_above = tile, dense_above
        self.order = {node: i for i, node in enumerate(gm.graph.nodes)}
        self.grid: Dict[fx.Node, Tuple[int, int]] = {}
        self.tiled: Set[fx.Node] = set()  # nodes computed on a tile batch
        self.entry: Set[fx.Node] = set()  # tiled convs that gather their input from a whole map (conv_kind "entry")
        self.why_not: Dict[fx.Node, str] = {}  # conv -> why it is not on tiles
        self.grids: Dict[Tuple[int, int], GridPlan] = {}
        self.scatters: Dict[fx.Node, fx.Node] = {}
        self.gathers: Dict[Tuple[fx.Node, Tuple[int, int]], fx.Node] = {}
        self.fills: Dict[fx.Node, Optional[torch.Tensor]] = {}
        self.whole_users: Dict[fx.Node, List[fx.Node]] = {}
        self.layer_convs: List[fx.Node] = []  # convs of the grids run per layer (focused_conv2d each)
        # convs of those grids that measured slower focused: dense, their output then set to the fill outside the AoI
        self.layer_dense: List[fx.Node] = []
        self.ended_by: Counter = Counter()  # op -> how many times a region was scattered for it (reads whole maps)

    # ------------------------------------------------------------ classification

    def _grid_of(self, node: Any) -> Optional[Tuple[int, int]]:
        shape = concrete_shape(node)
        if shape is None or len(shape) != 4 or shape[0] != self.batch:
            return None
        return (shape[2], shape[3])

    def conv_kind(self, node: fx.Node) -> Optional[str]:
        """"same" (stride 1, output on the input's grid), "entry" (reads a whole map), or None (not on tiles)."""
        site = self.sites.get(node)
        if site is None:
            return None
        if site.transposed or site.dims != 2 or site.unsupported or site.weight_shape is None:
            self.why_not[node] = site.unsupported or "not a forward 2-D conv"
            return None
        if site.padding_mode != "zeros":
            self.why_not[node] = f"padding_mode={site.padding_mode!r}: tiles are gathered with zero padding"
            return None
        kernel = site.weight_shape[2:]
        same = all(s == 1 and 2 * p == d * (k - 1) for s, p, d, k in
                   zip(site.stride, site.padding, site.dilation, kernel))
        return "same" if same and self._grid_of(site.input) == self._grid_of(node) else "entry"

    def _module_pointwise(self, node: fx.Node) -> bool:
        module = self.gm.get_submodule(node.target)
        if isinstance(module, _POINTWISE_MODULES):
            return True
        if isinstance(module, _EVAL_ONLY_MODULES) or type(module).__name__ == "FrozenBatchNorm2d":
            return not module.training or type(module).__name__ == "FrozenBatchNorm2d"
        return False

    def _is_pointwise(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return self._module_pointwise(node)
        if node.op == "call_method":
            return node.target in _POINTWISE_METHODS
        if node.op != "call_function":
            return False
        if node.target in (F.batch_norm, aten.batch_norm.default):
            training = node.args[5] if len(node.args) > 5 else node.kwargs.get("training", False)
            return training is False
        if node.target in (F.dropout, aten.dropout.default):
            training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
            return training is False
        return node.target in _POINTWISE_FUNCTIONS

    def arg_kind(self, arg: Any, grid: Tuple[int, int]) -> Optional[str]:
        """How a pointwise op's argument is read on a tile batch: "map" (gathered or cropped), "image" (per-image,
        indexed by the tiles' images), "const" (as is); None: it cannot be."""
        if not isinstance(arg, fx.Node):
            return "const" if not isinstance(arg, (list, tuple)) or not any(isinstance(a, fx.Node) for a in arg) \
                else None
        shape = concrete_shape(arg)
        if shape is None:
            return None
        if len(shape) == 4 and shape[0] == self.batch and (shape[2], shape[3]) == grid:
            return "map"
        if arg.op == "get_attr" or arg not in self.downstream and arg.op != "placeholder":
            spatial = shape[-2:] if len(shape) >= 3 else ()
            return "const" if all(s == 1 for s in spatial) else None
        if len(shape) == 4 and shape[2:] == (1, 1) and shape[0] == self.batch:
            return "image"
        if len(shape) <= 1:
            return "const"
        return None

    def classify(self) -> None:
        """Fills ``tiled``: convs downstream of the split on a static grid, and pointwise ops that read at least one
        tiled map of their own grid (and nothing that cannot be read per tile)."""
        for node in self.graph.nodes:
            if node not in self.downstream or node.meta.get(ROLE):
                continue
            if node.op == "call_function" and node.target is operator.getitem and node.args[0] in self.tiled \
                    and node.args[1] == 0 and self.grid.get(node.args[0]) is not None:
                self.grid[node] = self.grid[node.args[0]]
                self.tiled.add(node)
                continue
            if node in self.sites:
                kind = self.conv_kind(node)
                if kind is not None and self._grid_of(node) is not None:
                    self.grid[node] = self._grid_of(node)
                    self.tiled.add(node)
                    if kind == "entry":
                        self.entry.add(node)
                elif node not in self.why_not:
                    self.why_not[node] = "its output grid is not static"
                continue
            if not self._is_pointwise(node):
                continue
            first = node.args[0] if node.args else None
            grid = self._grid_of(node) or (self._grid_of(first) if node.target is
                                           aten._native_batch_norm_legit_no_training.default else None)
            if grid is None:
                continue
            kinds = [self.arg_kind(a, grid) for a in list(node.args) + list(node.kwargs.values())]
            maps = [a for a, k in zip(list(node.args) + list(node.kwargs.values()), kinds) if k == "map"]
            if None in kinds or not any(a in self.tiled and self.grid.get(a) == grid for a in maps):
                continue
            self.grid[node] = grid
            self.tiled.add(node)

    # ------------------------------------------------------------ planning

    def tile_users(self, node: fx.Node) -> List[fx.Node]:
        """Users of ``node`` that read it as a tile batch of its own grid (same-grid convs and pointwise ops)."""
        grid = self.grid.get(node)
        return [u for u in node.users if u in self.tiled and self.grid.get(u) == grid and
                u not in self.entry]

    def halo_of(self, user: fx.Node) -> int:
        """The margin a tiled user adds to its input's: a same-grid conv's padding (its larger side)."""
        if user in self.sites:
            return max(self.sites[user].padding)
        return 0

    def margins(self, grid: Tuple[int, int], budget: int) -> Tuple[Dict[fx.Node, int], Set[fx.Node], Dict]:
        """(margin of each tiled node of ``grid``, the nodes that end a region, the margin each whole-map input is
        gathered at), in one backward sweep."""
        nodes = [n for n in self.tiled if self.grid[n] == grid]
        nodes.sort(key=self.order.__getitem__, reverse=True)
        margins: Dict[fx.Node, int] = {}
        cuts: Set[fx.Node] = set()
        gather: Dict[fx.Node, int] = {}
        for node in nodes:
            need = max((margins[u] + self.halo_of(u) for u in self.tile_users(node)), default=0)
            if need > budget:
                cuts.add(node)
                gather[node] = need
                need = 0
            margins[node] = need
        for node in nodes:  # whole maps read by tiled pointwise ops or same-grid convs
            if node in self.entry:
                continue
            args = [self.sites[node].input] if node in self.sites else self._node_args(node)
            for arg in args:
                if isinstance(arg, fx.Node) and (arg not in self.tiled or self.grid.get(arg) != grid) and \
                        self.arg_kind(arg, grid) == "map":
                    gather[arg] = max(gather.get(arg, 0), margins[node] + self.halo_of(node))
        return margins, cuts, gather

    @staticmethod
    def _node_args(node: fx.Node) -> List[Any]:
        return list(node.args) + list(node.kwargs.values())

    def plan_grids(self, masks: Optional[Dict[Tuple[int, int], torch.Tensor]],
                   mask_seconds: Optional[Callable[[List[Tuple[int, int]]], float]] = None) -> None:
        """Chooses each grid's tile side (or dense) from the cost model on the example masks (None, with fake
        example inputs: the config's tile side, or DEFAULT_TILE, everywhere). With the per-layer option,
        ``mask_seconds(grids)`` measures what computing the AoI mask at those grids costs per call: when the focused
        grids' convs (measured per layer, modelled for tiles) plus that cost are above ``dense_above`` of their dense
        convs' time, every grid runs dense."""
        for grid in sorted({self.grid[n] for n in self.tiled}, key=lambda g: -g[0] * g[1]):
            plan = GridPlan(grid)
            plan.convs = sorted((n for n in self.tiled if self.grid[n] == grid and n in self.sites),
                                key=self.order.__getitem__)
            mask = masks[grid] if masks is not None else None
            dense_macs = sum(self.sites[c].macs_per_output_position() for c in plan.convs) * self.batch * \
                grid[0] * grid[1]
            sides = [self.tile] if self.tile else [t for t in TILE_SIDES if t <= max(grid)]
            if not sides or max(grid) < sides[0]:
                plan.reason = f"the grid is smaller than a tile ({sides[0] if sides else min(TILE_SIDES)})"
                self.grids[grid] = plan
                continue
            if mask is None:  # fake example inputs: no mask to cost tiles with
                sides = [self.tile or DEFAULT_TILE]
            best = None
            for side in sides:
                budget = max(1, side // 4)
                margins, cuts, gather = self.margins(grid, budget)
                if mask is None:
                    best = (0.0, side, budget, margins, cuts, gather, 0, 0.0)
                    break
                tiles = int(R.region_plan(mask, side).shape[1])
                macs = sum(self.sites[c].macs_per_output_position() * (side + 2 * margins[c]) ** 2
                           for c in plan.convs) * tiles
                ratio = macs / dense_macs if dense_macs else 1.0
                modelled = ratio / THROUGHPUT.get(side, 0.8) + GATHER_SCATTER
                if best is None or modelled < best[0]:
                    best = (modelled, side, budget, margins, cuts, gather, tiles, ratio)
            (plan.modelled, plan.tile, plan.budget, plan.margins, plan.cuts, plan.gather_margin, plan.tiles,
             plan.mac_ratio) = best
            if mask is not None and self.per_layer:
                timed = mask[:self.plan_batch]  # per-layer times at the planned batch
                plan.layer_times = self.layer_times(plan.convs, timed)
                if plan.layer_times:  # each conv focused where that measured faster, else dense
                    # a conv kept dense in a grid run per layer also holds the fill outside the AoI (one where). No
                    # dense_above margin here: the grid's mask is paid for either way, and with the margin the
                    # reference models' one-channel first conv stayed dense at 0.9-1.0 of dense + hold in isolation,
                    # where in the model its dense conv, hold, BatchNorm and ReLU took 1.4x the focused conv.
                    hold = self.hold_times(plan.layer_times, timed)
                    plan.layer_focused = {c for c, (d, f) in plan.layer_times.items() if f <= d + hold[c]}
                    plan.layer_modelled = sum(f if c in plan.layer_focused else d + hold[c]
                                              for c, (d, f) in plan.layer_times.items()) / \
                        sum(d for d, _ in plan.layer_times.values())
            best_time = min(plan.modelled, plan.layer_modelled)
            if not plan.convs:  # pointwise ops only: they follow a tiled conv of another grid, never happens
                plan.reason = "no conv on this grid"
            elif mask is not None and self.dense_above is not None and best_time > self.dense_above:
                plan.reason = (f"the cost model gives {plan.modelled:.2f} of dense time at the best tile side "
                               f"{plan.tile} (MAC ratio {plan.mac_ratio:.2f})"
                               + (f", per layer measured {plan.layer_modelled:.2f}" if plan.layer_modelled <
                                  float("inf") else "") + f", above dense_above={self.dense_above}")
            elif plan.layer_modelled < plan.modelled:
                plan.layer = True
            else:
                plan.region = True
            self.grids[grid] = plan
        focused = [g for g, p in self.grids.items() if p.region or p.layer]
        if self.per_layer and mask_seconds is not None and focused:
            dense = sum(d for g in focused for d, _ in self.grids[g].layer_times.values())
            saved = sum(self._saved(self.grids[g]) for g in focused)
            cost = mask_seconds(focused)
            if dense - saved + cost > (self.dense_above or 1.0) * dense:
                for g in focused:
                    plan = self.grids[g]
                    plan.region = plan.layer = False
                    plan.reason = (f"the focused grids' convs would take {1e3 * (dense - saved):.3g} ms and computing "
                                   f"the AoI mask {1e3 * cost:.3g} ms per call on the example inputs, against "
                                   f"{1e3 * dense:.3g} ms dense: above dense_above={self.dense_above} (this grid: "
                                   + (f"per layer measured {plan.layer_modelled:.2f}, " if plan.layer_modelled <
                                      float("inf") else "") + f"tiles modelled {plan.modelled:.2f})")
        off_tiles = {g for g, p in self.grids.items() if not p.region}
        for node in [n for n in self.tiled if self.grid[n] in off_tiles]:
            self.tiled.discard(node)
            if node in self.sites:
                plan = self.grids[self.grid[node]]
                if plan.layer and node in plan.layer_focused:
                    self.layer_convs.append(node)
                elif plan.layer:
                    dense_s, focused_s = plan.layer_times[node]
                    self.why_not[node] = (f"its grid runs per layer, but this conv measured {1e3 * focused_s:.3g} ms "
                                          f"focused against {1e3 * dense_s:.3g} ms dense: it stays dense (its output "
                                          f"set to the fill outside the AoI, as a focused conv's)")
                    self.layer_dense.append(node)
                else:
                    self.why_not[node] = plan.describe()
        self.layer_convs.sort(key=self.order.__getitem__)
        self.layer_dense.sort(key=self.order.__getitem__)

    @staticmethod
    def _saved(plan: GridPlan) -> float:
        """Seconds per call a focused grid saves against its dense convs: measured per layer, modelled for tiles."""
        if not plan.region and not plan.layer:
            return 0.0
        dense = sum(d for d, _ in plan.layer_times.values())
        return dense * (1.0 - (plan.layer_modelled if plan.layer else plan.modelled))

    def folded_batch_norm(self, conv: fx.Node) -> Optional[Tuple[Dict[str, Optional[torch.Tensor]], float]]:
        """(its tensors, eps) when a per-layer focused ``conv`` would take in the eval BatchNorm after it (as
        focus._fold_batch_norm does: the conv's parameters held by the graph module), else None."""
        site = self.sites[conv]
        if not self.fold_batchnorm or not held_by_module(site.weight, site.bias):
            return None
        found = eval_batch_norm_after(self.gm, conv)
        return None if found is None else (found[2], found[3])

    def fused_epilogue(self, conv: fx.Node) -> Tuple[bool, Tuple[Optional[float], Optional[float]]]:
        """(whether, (clamp_min, clamp_max)) a per-layer focused ``conv`` would take in a residual add and a clamp
        activation after it (and after the BatchNorm it folds), as focus._fuse_residual and _fuse_clamp do."""
        if not self.fuse_epilogue:
            return False, (None, None)
        after = eval_batch_norm_after(self.gm, conv)[1] if self.folded_batch_norm(conv) is not None else conv
        add = residual_add_after(after)
        found = clamp_after(self.gm, add[0] if add is not None else after)
        return add is not None, (None, None) if found is None else found[1:]

    def layer_times(self, convs: Sequence[fx.Node], mask: torch.Tensor) -> Dict[fx.Node, Tuple[float, float]]:
        """conv -> (seconds as F.conv2d, as focused_conv2d with ``mask``, bool [N, H, W] at the grid), measured on
        random inputs and weights of its shapes, dtype and memory format at the planned batch (mask's; see
        LAYER_RUNS; the values do not change the time, and a graph whose parameters are inputs, as dynamo's, times the
        same); empty when a conv's input shape is unknown. Where the focused conv would take in the BatchNorm after
        it (folded_batch_norm), the dense side is the conv and that BatchNorm, the focused side one focused conv with
        a bias and a fill; where it would take in a residual add and an activation after that (fused_epilogue), the
        dense side adds and clamps in place and the focused conv does both as its epilogue."""
        from .. import bench
        from ..ops.focused_conv2d import focused_conv2d

        times = {}
        for conv in convs:
            site = self.sites[conv]
            x = _random_at_batch(site.input, mask.shape[0], mask.device)
            if x is None or x.dim() != 4:
                return {}
            # its weights in the input's format too, as .to(memory_format=...) makes a channels_last model's
            weight = torch.randn(site.weight_shape, dtype=x.dtype, device=x.device)
            if len(site.weight_shape) == 4:
                weight = weight.contiguous(memory_format=_recorded_format(site.input))
            o = site.weight_shape[0]
            bias = torch.randn(o, dtype=x.dtype, device=x.device) if site.bias is not None else None
            args = (list(site.stride), list(site.padding), list(site.dilation), site.groups)
            bn = self.folded_batch_norm(conv)
            fill = torch.randn(1, o, 1, 1, dtype=x.dtype, device=x.device) if self.fill_add or bn is not None \
                else None
            # the folded conv has a bias (the BatchNorm's) even where the conv had none
            focused_bias = torch.randn(o, dtype=x.dtype, device=x.device) if bn is not None and bias is None else bias

            added, clamp = self.fused_epilogue(conv)
            residual = _random_at_batch(conv, mask.shape[0], mask.device) if added else None

            def dense():
                out = F.conv2d(x, weight, bias, *args)
                if bn is not None:
                    stats, eps = bn
                    out = F.batch_norm(out, stats["running_mean"], stats["running_var"], stats["weight"],
                                       stats["bias"], False, 0.0, eps)
                out = out.add_(residual) if residual is not None else out
                return out.clamp_(*clamp) if clamp != (None, None) else out

            times[conv] = tuple(bench.interleaved(
                [dense, lambda: focused_conv2d(x, weight, focused_bias, mask, *args, fill=fill, clamp_min=clamp[0],
                                               clamp_max=clamp[1], residual=residual)], LAYER_RUNS, warmup=1))
        return times

    def hold_times(self, convs: Sequence[fx.Node], mask: torch.Tensor) -> Dict[fx.Node, float]:
        """conv -> seconds of holding the fill outside the AoI on its output (the where that follows a conv kept
        dense in a grid run per layer), measured on a random output of its shape; 0 where the shape is unknown."""
        from .. import bench

        times = {}
        inside = mask.unsqueeze(1)
        for conv in convs:
            out = _random_at_batch(conv, mask.shape[0], mask.device)
            if out is None or out.dim() != 4 or tuple(out.shape[2:]) != tuple(mask.shape[1:]):
                times[conv] = 0.0
                continue
            fill = torch.randn(1, out.shape[1], 1, 1, device=mask.device) if self.fill_add else None
            times[conv] = bench.interleaved([lambda: torch.where(inside, out, fill) if fill is not None
                                             else torch.where(inside, out, 0.0)], LAYER_RUNS, warmup=1)[0]
        return times

    # ------------------------------------------------------------ which values leave the tiles

    def whole_map_users(self, node: fx.Node) -> List[fx.Node]:
        """Users that read ``node`` as a whole map (everything but its tile users; all users of a region cut)."""
        if node in self.grids[self.grid[node]].cuts:
            return list(node.users)
        tile_users = set(self.tile_users(node))
        return [u for u in node.users if u not in tile_users]

    def global_mean(self, user: fx.Node) -> Optional[bool]:
        """keepdim when ``user`` is a global average pool of its first argument ([N, C, 1, 1] or [N, C]), else None."""
        target = self.gm.get_submodule(user.target) if user.op == "call_module" else user.target
        if isinstance(target, nn.AdaptiveAvgPool2d):
            size = target.output_size
            return True if size in (1, (1, 1), [1, 1]) else None
        if user.op == "call_method" and user.target == "mean" or target in (torch.mean, aten.mean.dim):
            dims = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim")
            keepdim = user.args[2] if len(user.args) > 2 else user.kwargs.get("keepdim", False)
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            if sorted(d % 4 for d in dims) == [2, 3] and len(user.args) <= 3 and "dtype" not in user.kwargs:
                return bool(keepdim)
            return None
        if target in (F.adaptive_avg_pool2d, aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default):
            size = user.args[1] if len(user.args) > 1 else user.kwargs.get("output_size")
            return True if size in (1, (1, 1), [1, 1]) else None
        return None

    def needs_fill(self) -> List[fx.Node]:
        """The tiled nodes that leave their region (scattered, or reduced by a global mean): their fill is measured."""
        return sorted((n for n in self.tiled if self.whole_map_users(n)), key=self.order.__getitem__)

    # ------------------------------------------------------------ rewriting

    def _call(self, target, args, before: fx.Node, role: str) -> fx.Node:
        with self.graph.inserting_before(before):
            node = self.graph.call_function(target, tuple(args))
        node.meta[ROLE] = role
        return node

    def _plan_node(self, grid: Tuple[int, int]) -> fx.Node:
        plan = self.grids[grid]
        if plan.plan is None:
            with self.graph.inserting_after(plan.mask):
                plan.plan = self.graph.call_function(R.region_plan, (plan.mask, plan.tile))
            plan.plan.meta[ROLE] = "region_plan"
        return plan.plan

    def _inside(self, grid: Tuple[int, int], margin: int, like: fx.Node, before: fx.Node) -> fx.Node:
        plan = self.grids[grid]
        if margin not in plan.inside:
            plan.inside[margin] = self._call(R.region_inside, (self._plan_node(grid), like, list(grid), plan.tile,
                                                               margin), before, "region_inside")
        return plan.inside[margin]

    def _fill_node(self, node: fx.Node, before: fx.Node) -> Optional[fx.Node]:
        fill = self.fills.get(node)
        if fill is None:
            return None
        name = new_attr(self.gm, f"{node.name}_region_fill", fill, parameter=False)
        with self.graph.inserting_before(before):
            attr = self.graph.get_attr(name)
        attr.meta[ROLE] = "region_fill"
        return attr

    def _op_name(self, node: fx.Node) -> str:
        """A short name of what ``node`` runs (its module's class, function or method name)."""
        if node.op == "call_module":
            return type(self.gm.get_submodule(node.target)).__name__
        if node.op == "output":
            return "the graph output"
        target = node.target
        return target if isinstance(target, str) else getattr(target, "__name__", str(target))

    def ended_note(self) -> Optional[str]:
        """The report's note on where regions end because an op reads a whole map (None when none did)."""
        if not self.ended_by:
            return None
        ops = ", ".join(f"{name} ({count})" for name, count in sorted(self.ended_by.items()))
        return (f"regions are scattered to whole maps before ops that do not run on tiles (a grid change, pooling, "
                f"an op outside the pointwise list, the output): {ops}")

    def whole(self, node: fx.Node, user: fx.Node) -> fx.Node:
        """``node`` as a whole map for ``user``: itself, or its scatter (made once, before its first whole-map user)."""
        if node not in self.tiled:
            return node
        if node not in self.scatters:
            first = min(self.whole_users[node], key=self.order.__getitem__)
            plan = self.grids[self.grid[node]]
            fill = self._fill_node(node, first)
            self.scatters[node] = self._call(R.region_scatter, (node, self._plan_node(plan.size), plan.mask,
                                                                plan.tile, plan.margins[node], fill), first,
                                             "region_scatter")
        return self.scatters[node]

    def tile_input(self, arg: fx.Node, user: fx.Node, margin: int) -> Tuple[fx.Node, bool]:
        """(``arg`` as ``user``'s tile batch at ``margin``, whether it came from a zero-padded gather)."""
        grid = self.grid[user]
        plan = self.grids[grid]
        if arg in self.tiled and self.grid[arg] == grid and arg not in plan.cuts:
            by = plan.margins[arg] - margin
            value = self._call(R.region_crop, (arg, by), user, "region_crop") if by else arg
            if by and _writes_in_place(self.gm, user):
                value = self._call(aten.clone.default, (value,), user, "region_crop")
            return value, False
        key = (arg, grid)
        if key not in self.gathers:
            full = self.whole(arg, user)
            self.gathers[key] = self._call(R.region_gather, (full, self._plan_node(grid), list(grid), plan.tile,
                                                             plan.gather_margin[arg]), user, "region_gather")
        by = plan.gather_margin[arg] - margin
        return (self._call(R.region_crop, (self.gathers[key], by), user, "region_crop") if by else
                self.gathers[key]), True

    def rewrite_conv(self, node: fx.Node) -> None:
        site = self.sites[node]
        plan = self.grids[self.grid[node]]
        margin = plan.margins[node]
        kernel = site.weight_shape[2:]
        if node not in self.entry:
            x, zero_padded = self.tile_input(site.input, node, margin + max(site.padding))
            if any(site.padding) and not zero_padded:
                inside = self._inside(plan.size, margin + max(site.padding), x, node)
                x = self._call(operator.mul, (x, inside), node, "region_border")
            crop = [max(site.padding) - p for p in site.padding]  # an asymmetric kernel's smaller halo
            if any(crop):
                with self.graph.inserting_before(node):
                    for dim, by in enumerate(crop):
                        if by:
                            x = self.graph.call_function(aten.slice.Tensor, (x, 2 + dim, by, -by))
                            x.meta[ROLE] = "region_crop"
        else:
            full = self.whole(site.input, node)
            extent = [d * (k - 1) + 1 for d, k in zip(site.dilation, kernel)]
            x = self._call(R.region_gather, (full, self._plan_node(plan.size), list(plan.size), plan.tile, margin,
                                             list(site.stride), extent, list(site.padding)), node, "region_gather")
        with self.graph.inserting_before(node):
            weight = self.graph.get_attr(site.weight) if isinstance(site.weight, str) else site.weight
            bias = self.graph.get_attr(site.bias) if isinstance(site.bias, str) else site.bias
        node.op, node.target = "call_function", TILE_CONV2D
        node.args, node.kwargs = (x, weight, bias, list(site.stride), list(site.dilation), site.groups), {}

    def rewrite_pointwise(self, node: fx.Node) -> None:
        grid = self.grid[node]
        margin = self.grids[grid].margins[node]

        def convert(arg):
            if not isinstance(arg, fx.Node):
                return arg
            kind = self.arg_kind(arg, grid)
            if kind == "map":
                return self.tile_input(arg, node, margin)[0]
            if kind == "image":
                return self._call(R.region_per_image, (self.whole(arg, node), self._plan_node(grid)), node,
                                  "region_per_image")
            return arg

        if node.op == "call_function" and node.target is operator.getitem:
            return  # the tuple of a tiled batch norm: its element 0 is the tile batch already
        node.args = tuple(convert(a) for a in node.args)
        node.kwargs = {k: convert(v) for k, v in node.kwargs.items()}

    def rewrite(self, masks: Dict[Tuple[int, int], fx.Node]) -> None:
        for grid, plan in self.grids.items():
            plan.mask = masks.get(grid)
        self.whole_users = whole_users = {n: self.whole_map_users(n) for n in self.tiled}
        for node in sorted(self.tiled, key=self.order.__getitem__):
            if node in self.sites:
                self.rewrite_conv(node)
            else:
                self.rewrite_pointwise(node)
        for node in sorted(self.tiled, key=self.order.__getitem__):
            for user in whole_users[node]:
                if user in self.tiled:
                    continue  # reads the gather of this node's scatter (rewritten above)
                plan = self.grids[self.grid[node]]
                keepdim = self.global_mean(user)
                if keepdim is not None and user.args and user.args[0] is node:
                    fill = self._fill_node(node, user)
                    user.op, user.target = "call_function", R.region_mean
                    user.args = (node, self._plan_node(plan.size), plan.mask, plan.tile, plan.margins[node], fill,
                                 keepdim)
                    user.kwargs = {}
                    user.meta[ROLE] = "region_mean"
                    continue
                user.replace_input_with(node, self.whole(node, user))
                self.ended_by[self._op_name(user)] += 1
        for node in self.tiled:  # shapes recorded for whole maps no longer hold
            for key in ("val", "example_value", "tensor_meta", "fxeff_val"):
                node.meta.pop(key, None)


def grid_masks_for(mask: torch.Tensor, grids: Sequence[Tuple[int, int]]) -> Dict[Tuple[int, int], torch.Tensor]:
    """The AoI mask (bool [N, H, W] at the split's grid) at each grid, as mask_resize gives it in the graph."""
    return {g: mask if tuple(mask.shape[1:]) == tuple(g) else mask_resize(mask, list(g)) for g in grids}


def tile_macs(plan: GridPlan, node: fx.Node, site: ConvSite, tiles: int) -> int:
    """MACs a tiled conv computes for ``tiles`` tiles (its output window is T + 2 margin a side)."""
    return site.macs_per_output_position() * (plan.tile + 2 * plan.margins[node]) ** 2 * tiles


def fill_means(values: Dict[fx.Node, Any], mask: torch.Tensor, nodes: Sequence[fx.Node]) -> Dict[fx.Node, torch.Tensor]:
    """node -> per-channel mean of its original value (``values``: the original graph's; a tuple's element 0, as a
    batch norm's) outside the AoI ``mask`` (bool [N, H, W], resized to the value's grid) over the example inputs;
    zeros where the AoI covers everything. The fill="mean" of both executions."""
    means = {}
    for node in nodes:
        value = values[node]
        if isinstance(value, (tuple, list)):
            value = value[0]
        out = value.double()
        outside = (~grid_masks_for(mask, [tuple(out.shape[2:])])[tuple(out.shape[2:])]).unsqueeze(1)
        count = int(outside.sum())
        total = (out * outside).sum(dim=(0, 2, 3))
        means[node] = (total / count if count else torch.zeros_like(total)).to(value.dtype)
    return means


__all__ = ["Planner", "GridPlan", "grid_masks_for", "tile_macs", "fill_means", "THROUGHPUT", "TILE_SIDES"]
