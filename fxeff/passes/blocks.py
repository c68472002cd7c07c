"""The blocks pass: a model's single-entry single-exit blocks (LegoDNN's unit of scaling), outlined as submodules.

A block is a subgraph that reads one activation (its entry: every path from the model's inputs to a node of the
block passes through it) and whose nodes are read outside the block only at one node (its exit), holding between
``min_convs`` and max(floor(n x ``max_ratio``), ``min_convs``) of the model's n convs. A residual block is one: the
skip and the branch both start at the entry and meet at the add. Found on the normalised graph view (networkx over
the fx graph):

1. the data-flow nodes (those that depend on a graph input) and their dominator tree from a root above the inputs;
2. for each node x, its dominators e walked upwards, growing the subgraph between e and x (the nodes that reach x
   without passing e) until it holds more convs than the maximum; each (e, x) whose subgraph is read outside only
   at x, and that does not part a conv from the BatchNorm and activation after it (for inference they fold into
   the conv only on one side of a boundary), is a candidate;
3. the candidates to keep, pairwise disjoint, by an integer program (scipy's milp): most convs covered; then exits
   at small activations (the natural boundaries: residual adds, bottlenecks, after pooling; without this rule
   MobileNetV2's blocks ended after expand convs, on maps 6x wider); then most prunable convs (the seed's rule
   keeps a block's output shape, so the convs that produce its output are never pruned, nor those whose channels
   meet the entry's in an elementwise op, as a residual add inside the block); then most nodes (a ReLU or pooling
   after a block's last conv joins it), then later exits.

Each kept block becomes a call of a submodule ``block_<i>`` (a GraphModule of the block's own nodes, one input,
one output): the graph computes exactly what it did, and a descendant of the block (a pruned copy with the same
input and output shapes, ``fxeff.blocks``) can be swapped in by setting that attribute. The report lists each
block with its nodes, parameters, MACs on the example inputs and what in it is prunable, and each conv left out
with the reason.
"""
import dataclasses
import math
from collections import deque
from typing import Any, Dict, List, Optional, Set, Tuple

import networkx as nx
import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions
from torch.utils.flop_counter import FlopCounterMode

from ..report import Report, SiteReport
from .config import PassConfig, PassContext, register_pass_config
from .graph import SYMBOLIC, conv_sites, graph_kind, node_shape
from .measure import fake_mode_of, run_recording

BLOCK_PREFIX = "block_"
_ROOT = "__fxeff_blocks_root__"  # the dominator tree's root, above every graph input


@register_pass_config("blocks")
@dataclasses.dataclass
class Blocks(PassConfig):
    """Config of the blocks pass.

    ``max_ratio``: a block holds at most max(floor(n x max_ratio), min_convs) of the model's n convs (the seed's
    0.125). ``min_convs``: and at least this many (the seed's 2).
    """

    max_ratio: float = 0.125
    min_convs: int = 2

    def __post_init__(self):
        if isinstance(self.max_ratio, bool) or not isinstance(self.max_ratio, (int, float)) or \
                not 0 < self.max_ratio <= 1:
            raise ValueError(f"fxeff.passes.Blocks: max_ratio must be a float in (0, 1], got {self.max_ratio!r}")
        if isinstance(self.min_convs, bool) or not isinstance(self.min_convs, int) or self.min_convs < 1:
            raise ValueError(f"fxeff.passes.Blocks: min_convs must be an int >= 1, got {self.min_convs!r}")
        self.max_ratio = float(self.max_ratio)

    def run(self, gm: fx.GraphModule, context: PassContext) -> Report:
        return blocks_pass(gm, self, context)


@dataclasses.dataclass
class Block:
    """One block found in a graph: its entry (the value it reads), its exit, its nodes in graph order, its convs
    (conv site names), the ones that may be pruned (all but those that produce its output) and their count."""

    entry: fx.Node
    exit: fx.Node
    nodes: List[fx.Node]
    convs: List[str]
    prunable: List[str]

    def describe(self) -> str:
        prunable = ", ".join(self.prunable) if self.prunable else "nothing (every conv produces the output)"
        return f"{self.entry.name} -> {self.exit.name}: {len(self.convs)} convs ({', '.join(self.convs)}); " \
               f"prunable: {prunable}"


def max_convs(n_convs: int, max_ratio: float = 0.125, min_convs: int = 2) -> int:
    """The most convs a block may hold in a model of ``n_convs`` convs: max(floor(n x max_ratio), min_convs)."""
    return max(int(math.floor(n_convs * max_ratio + 1e-9)), min_convs)


def _data_flow(gm: fx.GraphModule) -> Tuple[nx.DiGraph, Set[fx.Node]]:
    """(the data-flow graph of the nodes that depend on a graph input, with _ROOT above the inputs; those nodes)."""
    graph = nx.DiGraph()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    flow: Set[fx.Node] = set()
    for node in gm.graph.nodes:  # graph order is topological
        if node.op == "placeholder" or any(isinstance(a, fx.Node) and a in flow for a in node.all_input_nodes):
            flow.add(node)
    graph.add_node(_ROOT)
    for p in placeholders:
        graph.add_edge(_ROOT, p)
    for node in flow:
        for arg in node.all_input_nodes:
            if arg in flow:
                graph.add_edge(arg, node)
    return graph, flow


def _producers(nodes: Set[fx.Node], exit_node: fx.Node, convs: Set[fx.Node]) -> Set[fx.Node]:
    """The convs of ``nodes`` with a path to ``exit_node`` through no other conv (they make the block's output)."""
    found, seen, queue = set(), {exit_node}, deque([exit_node])
    while queue:
        node = queue.popleft()
        if node in convs:
            found.add(node)
            continue
        for arg in node.all_input_nodes:
            if arg in nodes and arg not in seen:
                seen.add(arg)
                queue.append(arg)
    return found


def _concat(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "") in ("cat", "concat", "concatenate")


def _tied_to_entry(nodes: Set[fx.Node], entry: fx.Node, convs: Set[fx.Node]) -> Set[fx.Node]:
    """The convs of ``nodes`` whose output channels meet the entry's in an elementwise op with no conv between
    (a residual add inside the block, a gate): pruning them would break that op, since the entry keeps its
    channels. A concat joins channels without tying them."""
    from_entry, queue = set(), deque([entry])
    while queue:  # reached from the entry through no conv (and no concat)
        node = queue.popleft()
        for user in node.users:
            if user in nodes and user not in from_entry and user not in convs and not _concat(user):
                from_entry.add(user)
                queue.append(user)
    tied = set()
    for conv in convs & nodes:
        seen, queue = {conv}, deque([conv])
        while queue:
            node = queue.popleft()
            for user in node.users:
                if user not in nodes or user in seen or user in convs or _concat(user):
                    continue
                if user in from_entry:
                    tied.add(conv)
                    queue.clear()
                    break
                seen.add(user)
                queue.append(user)
    return tied


class _Candidate:
    __slots__ = ("entry", "exit", "nodes", "convs", "prunable")

    def exit_size(self) -> int:
        """Elements of one sample of the exit's value (0 where its shape is unknown)."""
        shape = node_shape(self.exit)
        return math.prod(int(s) for s in shape[1:]) if shape and all(isinstance(s, int) for s in shape) else 0

    def __init__(self, entry: fx.Node, exit_node: fx.Node, nodes: Set[fx.Node], convs: Set[fx.Node],
                 prunable: Set[fx.Node]):
        self.entry, self.exit, self.nodes, self.convs, self.prunable = entry, exit_node, nodes, convs, prunable


def _unsplittable(gm: fx.GraphModule, conv_nodes: Set[fx.Node]) -> Set[fx.Node]:
    """The nodes after which a block boundary must not fall: a conv whose only user is its BatchNorm or a clamp
    activation (ReLU, ReLU6), and such a BatchNorm when its only user is such an activation. For inference the
    BatchNorm folds into its conv and the activation becomes the conv's epilogue, but only where they are on one
    side of a boundary (a stem's BatchNorm and ReLU at the head of ResNet-20's first block stayed unfused and cost
    the pruned model's latency span)."""
    from .rewrite import batch_norm_stats, clamp_after

    found = set()
    for conv in conv_nodes:
        users = list(conv.users)
        if len(users) == 1 and batch_norm_stats(gm, users[0], conv, {})[0] is not None:
            found.add(conv)
            if clamp_after(gm, users[0]) is not None:
                found.add(users[0])
        elif clamp_after(gm, conv) is not None:
            found.add(conv)
    return found


def _candidates(gm: fx.GraphModule, conv_nodes: Set[fx.Node], most: int, least: int) -> List[_Candidate]:
    """Every (entry, exit) pair whose subgraph is single-entry single-exit with ``least`` to ``most`` convs, and
    does not part a conv from its BatchNorm and activation (``_unsplittable``)."""
    graph, flow = _data_flow(gm)
    unsplittable = _unsplittable(gm, conv_nodes)
    idom = nx.immediate_dominators(graph, _ROOT)
    found = []
    for x in gm.graph.nodes:
        if x not in flow or x.op in ("placeholder", "output"):
            continue
        nodes: Set[fx.Node] = {x}
        convs = {x} & conv_nodes
        frontier = [x]  # nodes whose inputs are not yet in ``nodes``
        e = idom.get(x)
        while e is not None and e != _ROOT:
            # grow the subgraph back from the frontier to e (e dominates x: every path back meets e)
            queue = deque(frontier)
            while queue:
                node = queue.popleft()
                for arg in node.all_input_nodes:
                    if arg in flow and arg is not e and arg not in nodes:
                        nodes.add(arg)
                        queue.append(arg)
                        if arg in conv_nodes:
                            convs.add(arg)
            if len(convs) > most:
                break
            if len(convs) >= least and e not in unsplittable and x not in unsplittable and \
                    all(user in nodes for node in nodes if node is not x for user in node.users):
                fixed = _producers(nodes, x, conv_nodes) | _tied_to_entry(nodes, e, conv_nodes)
                found.append(_Candidate(e, x, set(nodes), set(convs), convs - fixed))
            nodes.add(e)
            if e in conv_nodes:
                convs.add(e)
                if len(convs) > most:
                    break
            frontier = [e]
            e = idom.get(e)
    return found


def _choose(candidates: List[_Candidate]) -> List[_Candidate]:
    """The pairwise disjoint candidates with the most convs, then the smallest exits, then the most prunable convs,
    then the most nodes, then the latest exits: scipy.optimize.milp (each node in at most one chosen block), one
    criterion at a time, each later one solved with the earlier ones held at their optimum (lexicographic)."""
    if not candidates:
        return []
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    order = {node: i for i, node in enumerate(candidates[0].exit.graph.nodes)}
    # criteria to maximise, in order (integers: the held optima are exact)
    criteria = [np.array(values, dtype=np.float64) for values in (
        [len(c.convs) for c in candidates], [-c.exit_size() for c in candidates],
        [len(c.prunable) for c in candidates], [len(c.nodes) for c in candidates], [order[c.exit] for c in candidates])]
    index: Dict[fx.Node, int] = {}
    rows, cols = [], []
    for j, cand in enumerate(candidates):
        for node in cand.nodes:
            rows.append(index.setdefault(node, len(index)))
            cols.append(j)
    shared = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(index), len(candidates))).tocsr()
    keep = np.asarray(shared.sum(axis=1)).ravel() > 1  # a node in one candidate constrains nothing
    constraints = [LinearConstraint(shared[keep], -np.inf, 1)] if keep.any() else []
    result = None
    for criterion in criteria:
        result = milp(-criterion, integrality=np.ones(len(candidates)), bounds=Bounds(0, 1), constraints=constraints,
                      options={"mip_rel_gap": 0.0})
        if not result.success:
            raise RuntimeError(f"fxeff.passes.Blocks: choosing disjoint blocks failed: {result.message}")
        best = float(np.round(criterion @ np.round(result.x)))
        constraints = constraints + [LinearConstraint(criterion[None, :], best - 0.5, np.inf)]
    chosen = [c for c, x in zip(candidates, result.x) if x > 0.5]
    used: Set[fx.Node] = set()
    for cand in chosen:  # the integer program's answer checked (scipy issue #24141)
        if used & cand.nodes:
            raise RuntimeError("fxeff.passes.Blocks: the integer program returned overlapping blocks")
        used |= cand.nodes
    return chosen


def find_blocks(gm: fx.GraphModule, max_ratio: float = 0.125, min_convs: int = 2
                ) -> Tuple[List[Block], Dict[fx.Node, str], int]:
    """(the blocks of ``gm`` in graph order, conv node -> why it is in no block, the most convs a block may hold)."""
    sites = conv_sites(gm)
    by_node = {site.node: site for site in sites}
    most = max_convs(len(sites), max_ratio, min_convs)
    candidates = _candidates(gm, set(by_node), most, min_convs)
    chosen = _choose(candidates)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    blocks = []
    for cand in sorted(chosen, key=lambda c: order[c.exit]):
        nodes = sorted(cand.nodes, key=order.__getitem__)
        blocks.append(Block(cand.entry, cand.exit, nodes, [by_node[n].name for n in nodes if n in cand.convs],
                            [by_node[n].name for n in nodes if n in cand.prunable]))
    in_block = set().union(*(c.convs for c in chosen)) if chosen else set()
    in_candidate = set().union(*(c.convs for c in candidates)) if candidates else set()
    why = {}
    for node in by_node:
        if node in in_block:
            continue
        if node in in_candidate:
            why[node] = "each single-entry single-exit subgraph around it overlaps a block chosen for more convs"
        else:
            why[node] = f"no single-entry single-exit subgraph with {min_convs} to {most} convs contains it"
    return blocks, why, most


def _local_attrs(gm: fx.GraphModule, block: Block) -> List[fx.Node]:
    """The get_attr nodes the block reads (each its own copy where other nodes read it too), placed before the
    block's first node, so that the outlined block reads only its entry."""
    graph, inside, attrs = gm.graph, set(block.nodes), []
    for node in block.nodes:
        for arg in node.all_input_nodes:
            if arg.op != "get_attr" or arg in inside or arg in attrs:
                continue
            if all(user in inside for user in arg.users):
                attrs.append(arg)
                continue
            with graph.inserting_before(block.nodes[0]):
                copy = graph.get_attr(arg.target)
            copy.meta.update(arg.meta)
            for user in [u for u in arg.users if u in inside]:
                user.replace_input_with(arg, copy)
            attrs.append(copy)
    return attrs


def _block_stats(gm: fx.GraphModule, name: str, x: Optional[torch.Tensor]
                 ) -> Tuple[int, int, Optional[int], Optional[bool]]:
    """(parameters, their bytes, MACs on ``x``, whether it writes its input in place) of the outlined block
    ``name`` (the last two None without a real ``x``)."""
    module = gm.get_submodule(name)
    params = list(module.parameters())
    macs = mutates = None
    if isinstance(x, torch.Tensor) and fake_mode_of([x]) is None:
        x = x.clone()
        version = x._version  # bumped by every in-place write (a ReLU(inplace=True) on the entry)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(x)
        macs, mutates = counter.get_total_flops() // 2, x._version != version
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params), macs, mutates


def blocks_pass(gm: fx.GraphModule, config: Blocks, context: PassContext) -> Report:
    """Outlines each block of ``gm`` (in place) as a submodule ``block_<i>``; see the module docstring."""
    if graph_kind(gm) != SYMBOLIC:
        raise NotImplementedError(
            f"fxeff.passes.Blocks: {graph_kind(gm)} graphs (parameters as graph inputs) are not supported yet; build "
            "the blocks with fxeff.transform(model, x, [fxeff.passes.Blocks()]) and compile or export the result")
    gm.fxeff_blocks = []  # one dict per block outlined below (none: the report says why)
    run_recording(gm, context.example_inputs, count_flops=False)  # shapes: the exits' sizes, the convs' MACs
    blocks, why, most = find_blocks(gm, config.max_ratio, config.min_convs)
    sites = {site.node: site for site in conv_sites(gm)}
    n_convs = len(sites)
    report = Report(pass_name="blocks")
    for node, reason in why.items():
        macs = sites[node].macs()
        report.sites.append(SiteReport(sites[node].name, sites[node].describe(), "skipped", reason, macs, macs,
                                       "blocks"))
    if not blocks:
        report.notes.append(f"no block found: no single-entry single-exit subgraph holds {config.min_convs} to "
                            f"{most} of the model's {n_convs} convs, so nothing can be scaled; the graph is unchanged")
        return report
    descriptions = [block.describe() for block in blocks]
    partitions = []
    for block in blocks:
        members = _local_attrs(gm, block) + block.nodes
        partitions.append({node: None for node in members})
    fuse_by_partitions(gm, partitions, prefix=BLOCK_PREFIX)
    gm.recompile()
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith(BLOCK_PREFIX)]
    for call in calls:  # a new GraphModule (and the plain Modules that hold its paths) starts in training mode:
        for module in gm.get_submodule(call.target).modules():  # the graph's own; its layers keep theirs
            if type(module) is nn.Module or isinstance(module, fx.GraphModule):
                module.training = gm.training
    inputs: Dict[fx.Node, Any] = {}
    if fake_mode_of(context.example_inputs) is None:
        _, values = run_recording(gm, context.example_inputs, [call.args[0] for call in calls], count_flops=False)
        inputs = {call: values.get(call.args[0]) for call in calls}
    for call, block, description in zip(sorted(calls, key=lambda n: int(str(n.target)[len(BLOCK_PREFIX):])), blocks,
                                        descriptions):
        params, nbytes, macs, mutates = _block_stats(gm, str(call.target), inputs.get(call))
        gm.fxeff_blocks.append({"name": str(call.target), "entry": block.entry.name, "exit": block.exit.name,
                                "nodes": [n.name for n in block.nodes], "convs": block.convs,
                                "prunable": block.prunable, "params": params, "param_bytes": nbytes, "macs": macs,
                                "mutates_input": mutates})
        report.sites.append(SiteReport(str(call.target), f"block {description}", "rewritten", "", macs, macs,
                                       "blocks"))
        report.notes.append(f"{call.target}: {len(block.nodes)} nodes, {params} parameters ({nbytes / 2**20:.2f} MiB)"
                            f", {'n/a' if macs is None else f'{macs / 1e6:.2f}M'} MACs; {description}")
    report.notes.insert(0, f"{len(blocks)} blocks of {config.min_convs} to {most} convs cover "
                           f"{sum(len(b.convs) for b in blocks)} of the model's {n_convs} convs")
    return report


__all__ = ["Blocks", "Block", "blocks_pass", "find_blocks", "max_convs", "BLOCK_PREFIX"]
