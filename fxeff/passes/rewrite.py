"""Graph-editing helpers shared by the passes that replace a conv with new weights (shift, hetconv, focus).

They read real tensors behind weight references in any graph kind, add new parameters to the
GraphModule (never to modules shared with the user's model; dynamo graphs get a source for each),
give inserted nodes fake values, and measure how far a rewritten graph's outputs moved.
"""
import contextlib
import dataclasses
import math
import operator
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.fake_tensor import FakeTensor

from ..report import Report, SiteReport
from .graph import ConvSite, get_attr_value, node_shape, node_value
from .measure import IncrementalRun, fake_mode_of, run_recording


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


BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_F_BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
# BatchNorm as a function, in each graph kind, with its argument names.
BN_FUNCTIONS = {F.batch_norm: _F_BATCH_NORM_ARGS,
                torch.batch_norm: tuple(a.name for a in torch.ops.aten.batch_norm.default._schema.arguments),
                torch.ops.aten.batch_norm.default:
                    tuple(a.name for a in torch.ops.aten.batch_norm.default._schema.arguments),
                torch.ops.aten._native_batch_norm_legit_no_training.default:
                    tuple(a.name for a in
                          torch.ops.aten._native_batch_norm_legit_no_training.default._schema.arguments)}


def bn_arg(node: fx.Node, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a BatchNorm call (``node.target`` in BN_FUNCTIONS), or ``default`` where not passed."""
    if name in node.kwargs:
        return node.kwargs[name]
    names = BN_FUNCTIONS[node.target]
    if name not in names:
        return default
    i = names.index(name)
    return node.args[i] if i < len(node.args) else default


def batch_norm_stats(gm: fx.GraphModule, user: fx.Node, reads: fx.Node, inputs: Dict[fx.Node, Any]
                     ) -> Tuple[Optional[Dict[str, Optional[torch.Tensor]]], float, str]:
    """(its weight, bias, running_mean and running_var tensors, eps, "") when ``user`` is a BatchNorm with running
    statistics whose input is ``reads`` (and nothing else of the graph); (None, 0, why not) when it is a BatchNorm
    that cannot be folded; (None, 0, "") when it is no BatchNorm."""
    if user.op == "call_module":
        bn = gm.get_submodule(user.target)
        if type(bn) not in BN_MODULES:
            return None, 0.0, ""
        if user.args != (reads,) or user.kwargs:
            return None, 0.0, f"BatchNorm {user.target!r} is called with extra arguments"
        if bn.running_mean is None:
            return None, 0.0, f"BatchNorm {user.target!r} has no running statistics"
        return dict(weight=bn.weight, bias=bn.bias, running_mean=bn.running_mean, running_var=bn.running_var), \
            bn.eps, ""
    if user.op != "call_function" or user.target not in BN_FUNCTIONS:
        return None, 0.0, ""
    if bn_arg(user, "input") is not reads:
        return None, 0.0, f"BatchNorm {user.name!r} reads the conv's output as a statistic"
    stats = {}
    for name in ("weight", "bias", "running_mean", "running_var"):
        ref = bn_arg(user, name)
        if ref is None:
            stats[name] = None
            continue
        stats[name], why = param_value(gm, ref, inputs)
        if stats[name] is None:
            return None, 0.0, f"BatchNorm {user.name!r}: {name}: {why}"
    if stats["running_mean"] is None or stats["running_var"] is None:
        return None, 0.0, f"BatchNorm {user.name!r} has no running statistics"
    return stats, bn_arg(user, "eps", 1e-5), ""


def held_by_module(*refs: Any) -> bool:
    """Whether each weight/bias/fill reference is held by the graph module (None, an attribute name or a get_attr
    node), not a graph input (dynamo's and export's lifted parameters, whose values may change per call)."""
    return all(ref is None or isinstance(ref, str) or (isinstance(ref, fx.Node) and ref.op == "get_attr")
               for ref in refs)


BN_NO_TRAINING = torch.ops.aten._native_batch_norm_legit_no_training.default  # export's eval BN: (out, mean, rstd)


def batch_norm_output(user: fx.Node) -> Optional[Tuple[fx.Node, List[fx.Node]]]:
    """(the node holding the output of the BatchNorm call ``user``, the getitems to erase with it): export's
    no-training op gives (out, mean, rstd) and its output is the getitem 0 (None when another of them is read);
    every other form is its own output."""
    if user.op != "call_function" or user.target is not BN_NO_TRAINING:
        return user, []
    outs = list(user.users)
    if not all(u.target is operator.getitem for u in outs) or \
            any(u.args[1] != 0 and u.users for u in outs) or sum(u.args[1] == 0 for u in outs) != 1:
        return None
    return next(u for u in outs if u.args[1] == 0), outs


def batch_norm_affine(stats: Dict[str, Optional[torch.Tensor]], eps: float
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, running_mean, beta) of an eval-mode BatchNorm in float64, y = (x - running_mean) * scale + beta with
    scale = gamma / sqrt(running_var + eps) (gamma 1 and beta 0 where it has no affine part): what every fold of a
    BatchNorm into the layer before it starts from."""
    mean, var = stats["running_mean"].detach().double(), stats["running_var"].detach().double()
    gamma = stats["weight"].detach().double() if stats["weight"] is not None else torch.ones_like(mean)
    beta = stats["bias"].detach().double() if stats["bias"] is not None else torch.zeros_like(mean)
    return gamma / (var + eps).sqrt(), mean, beta


def eval_batch_norm_after(gm: fx.GraphModule, node: fx.Node
                          ) -> Optional[Tuple[fx.Node, fx.Node, Dict[str, Optional[torch.Tensor]], float]]:
    """(the BatchNorm call, the node holding its output, its tensors, eps) when ``node``'s only user is an eval-mode
    BatchNorm with running statistics held by the graph module (not graph inputs) that reads nothing else of the
    graph; else None. Such a BatchNorm can be folded into the conv that computes ``node``."""
    users = list(node.users)
    if len(users) != 1:
        return None
    user = users[0]
    stats, eps, _ = batch_norm_stats(gm, user, node, {})
    if stats is None:
        return None
    if user.op == "call_module":
        if gm.get_submodule(user.target).training:
            return None
    elif user.target is not BN_NO_TRAINING and bn_arg(user, "training", False):
        return None
    found = batch_norm_output(user)
    return None if found is None else (user, found[0], stats, eps)


# Activations that are a clamp, as functions in each graph kind: their parameters after the input (name, default)
# and the bounds (clamp_min, clamp_max) those give.
_RELU = ((), lambda: (0.0, None))
_RELU_INPLACE = ((("inplace", False),), lambda inplace: (0.0, None))
_RELU6 = ((("inplace", False),), lambda inplace: (0.0, 6.0))
_HARDTANH = ((("min_val", -1.0), ("max_val", 1.0)), lambda min_val, max_val: (min_val, max_val))
_HARDTANH_INPLACE = (_HARDTANH[0] + (("inplace", False),), lambda min_val, max_val, inplace: (min_val, max_val))
_CLAMP = ((("min", None), ("max", None)), lambda min, max: (min, max))
_CLAMP_MIN = ((("min", None),), lambda min: (min, None))
CLAMP_FUNCTIONS = {
    torch.relu: _RELU, torch.relu_: _RELU, F.relu: _RELU_INPLACE, torch.ops.aten.relu.default: _RELU,
    torch.ops.aten.relu_.default: _RELU, F.relu6: _RELU6, torch._C._nn.relu6: ((), lambda: (0.0, 6.0)),
    torch.ops.aten.relu6.default: ((), lambda: (0.0, 6.0)),
    F.hardtanh: _HARDTANH_INPLACE, torch._C._nn.hardtanh: _HARDTANH, torch.ops.aten.hardtanh.default: _HARDTANH,
    torch.ops.aten.hardtanh_.default: _HARDTANH, torch.clamp: _CLAMP, torch.ops.aten.clamp.default: _CLAMP,
    torch.clamp_min: _CLAMP_MIN, torch.ops.aten.clamp_min.default: _CLAMP_MIN,
}
CLAMP_METHODS = {"relu": _RELU, "relu_": _RELU, "clamp": _CLAMP, "clamp_": _CLAMP, "clamp_min": _CLAMP_MIN,
                 "clamp_min_": _CLAMP_MIN}


def clamp_bounds(gm: fx.GraphModule, node: fx.Node, reads: fx.Node) -> Optional[Tuple[Optional[float],
                                                                                     Optional[float]]]:
    """(clamp_min, clamp_max) when ``node`` is an activation that is a clamp of ``reads`` (ReLU, ReLU6, Hardtanh,
    clamp with number bounds; a module, function or method, in place or not), else None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if node.args != (reads,) or node.kwargs:
            return None
        if type(module) is nn.ReLU:
            return 0.0, None
        if isinstance(module, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
            return float(module.min_val), float(module.max_val)
        return None
    if node.op == "call_function":
        spec = CLAMP_FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        spec = CLAMP_METHODS.get(node.target)
    else:
        return None
    if spec is None or not node.args or node.args[0] is not reads:
        return None
    params, bounds = spec
    names = [name for name, _ in params]
    if len(node.args) - 1 > len(params) or any(k not in names for k in node.kwargs):
        return None
    values = {name: default for name, default in params}
    values.update(zip(names, node.args[1:]))
    values.update(node.kwargs)
    lo, hi = bounds(**values)
    if any(b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or math.isnan(b))
           for b in (lo, hi)):
        return None  # tensor or symbolic bounds
    if lo is not None and hi is not None and lo > hi:
        return None  # torch.clamp's min > max case: every value becomes max; left to the graph
    return (None if lo is None else float(lo)), (None if hi is None else float(hi))


def clamp_after(gm: fx.GraphModule, node: fx.Node) -> Optional[Tuple[fx.Node, Optional[float], Optional[float]]]:
    """(the activation, clamp_min, clamp_max) when ``node``'s only user is an activation that is a clamp of it
    (clamp_bounds), else None: a conv computing ``node`` can take that activation in as its epilogue."""
    users = list(node.users)
    if len(users) != 1:
        return None
    bounds = clamp_bounds(gm, users[0], node)
    return None if bounds is None else (users[0],) + bounds


# Adds of two tensors, in each graph kind; the in-place ones write their first operand.
_ADD_FUNCTIONS = {operator.add: False, torch.add: False, torch.ops.aten.add.Tensor: False, operator.iadd: True,
                  torch.ops.aten.add_.Tensor: True}
_ADD_METHODS = {"add": False, "add_": True}


def residual_add_after(node: fx.Node) -> Optional[Tuple[fx.Node, fx.Node]]:
    """(the add, its other operand) when ``node``'s only user adds ``node`` and another tensor of the same shape and
    dtype (a residual connection: no alpha, no broadcast; an in-place add must write ``node`` itself), else None: a
    conv computing ``node`` can take that add in as its epilogue."""
    users = list(node.users)
    if len(users) != 1:
        return None
    add = users[0]
    if add.op == "call_function" and add.target in _ADD_FUNCTIONS:
        in_place = _ADD_FUNCTIONS[add.target]
    elif add.op == "call_method" and add.target in _ADD_METHODS:
        in_place = _ADD_METHODS[add.target]
    else:
        return None
    if add.kwargs or len(add.args) != 2 or not all(isinstance(a, fx.Node) for a in add.args) or \
            add.args[0] is add.args[1] or (in_place and add.args[0] is not node):
        return None
    other = add.args[1] if add.args[0] is node else add.args[0]
    shape, other_shape = node_shape(node), node_shape(other)
    dtype, other_dtype = (getattr(node_value(n), "dtype", None) for n in (node, other))
    if shape is None or other_shape is None or len(shape) != 4 or len(other_shape) != 4 or dtype is None or \
            other_dtype != dtype:
        return None
    # symbolic sizes compare by their expressions (comparing SymInts would guard on them)
    if any(a != b if isinstance(a, int) and isinstance(b, int) else str(a) != str(b)
           for a, b in zip(shape, other_shape)):
        return None
    return add, other


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


def mark_inserted(nodes: List[fx.Node], role: str, like: fx.Node) -> None:
    """Marks the nodes a pass inserted (``node.meta[role]``) and gives them the module stack and stack trace of the
    node they replace, so that later passes and reports place them where ``like`` was."""
    for node in nodes:
        node.meta[role] = True
        for meta in ("nn_module_stack", "stack_trace"):
            if meta in like.meta:
                node.meta[meta] = like.meta[meta]


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


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact|| / ||exact|| in float64 (0 when both are 0, inf when only exact is)."""
    with torch.no_grad():
        diff = float((approx.double() - exact.double()).norm())
        norm = float(exact.double().norm())
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


def relative_output_error(before: Dict[fx.Node, Any], after: Dict[fx.Node, Any], nodes_before: List[fx.Node],
                           nodes_after: List[fx.Node]) -> Optional[float]:
    pairs = [(before[a], after[b]) for a, b in zip(nodes_before, nodes_after)
             if isinstance(before.get(a), torch.Tensor) and before[a].is_floating_point()]
    if not pairs:
        return None
    diff = math.sqrt(sum(float((y - x).double().norm()) ** 2 for x, y in pairs))
    norm = math.sqrt(sum(float(x.double().norm()) ** 2 for x, _ in pairs))
    return diff / norm if norm else None


# ---------------------------------------------------------------- the frame of a weight-converting pass

@dataclasses.dataclass
class Recorded:
    """What a pass measured on the example inputs before rewriting: placeholder values, whether they are
    fake, the graph's output nodes, its FLOPs (counted for fake inputs only: with real ones the sweep
    gives them, see finish_report), and the values of the kept nodes."""

    inputs: Dict[fx.Node, Any]
    fake: bool
    outputs: List[fx.Node]
    flops: Optional[int]
    values: Dict[fx.Node, Any]


def record_before(gm: fx.GraphModule, example_inputs: Sequence[Any], sites: Sequence[ConvSite]) -> Recorded:
    """Runs gm once, keeping every site's input and output and the graph outputs."""
    inputs = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs))
    outputs = output_nodes(gm)
    keep = [n for s in sites for n in (s.input, s.node)] + outputs
    fake = fake_mode_of(example_inputs) is not None
    flops, values = run_recording(gm, example_inputs, keep, count_flops=fake)
    return Recorded(inputs, fake, outputs, flops if fake else None, values)


def sweep(gm: fx.GraphModule, example_inputs: Sequence[Any], recorded: Recorded) -> contextlib.AbstractContextManager:
    """The one run of the graph that a weight-converting pass rewrites as it goes (an IncrementalRun), or
    None (as a context) for fake example inputs. ``run.value(site.input)`` is the input a site sees once
    the sites before it are rewritten: fits to it correct the error of the layers rewritten before (He et
    al., ICCV'17); the whole pass costs the run before rewriting, this one, and the fits, whatever the depth."""
    return contextlib.nullcontext() if recorded.fake else IncrementalRun(gm, example_inputs)


def site_params(gm: fx.GraphModule, site: ConvSite, inputs: Dict[fx.Node, Any]):
    """(weight, bias, None) as real tensors, or (None, None, why one of them is unknown)."""
    weight, why = param_value(gm, site.weight, inputs)
    bias, why_bias = param_value(gm, site.bias, inputs) if site.bias is not None else (None, "")
    if weight is None or (site.bias is not None and bias is None):
        return None, None, f"the conv's {'weight' if weight is None else 'bias'} is unknown: {why or why_bias}"
    return weight, bias, None


def finish_report(gm: fx.GraphModule, run: Optional[IncrementalRun], pass_name: str, sites: List[SiteReport],
                  notes: List[str], recorded: Recorded, unchanged_note: str, role: str) -> Report:
    """Recompiles gm and reports: model MACs before/after and, with real inputs (``run``: the pass's sweep,
    which this finishes), the output error. ``role``: the node.meta key marking the nodes the pass inserted.

    With real inputs the FLOPs are counted once, by the sweep, in the final graph: the graph before is the
    final one with each inserted node's counted FLOPs replaced by its conv's (flop_counter's formula, as
    ``ConvSite.macs``), which saves the counter's cost in the run before rewriting."""
    rewritten = [s for s in sites if s.status == "rewritten"]
    if not rewritten:
        notes.append(unchanged_note)
    gm.graph.lint()
    gm.recompile()
    report = Report(pass_name=pass_name, sites=sites, notes=notes)
    if recorded.fake:
        report.model_macs_before = recorded.flops // 2
        report.notes.append("example inputs are fake tensors: relative errors and model MACs after are n/a")
        return report
    outputs_after = output_nodes(gm)
    flops_after, after = run.finish(outputs_after)
    report.model_macs_after = flops_after // 2
    inserted = sum(f for node, f in run.node_flops.items() if node.meta.get(role))
    # a site without MACs of its own (FoldBatchNorm: the layer is the one that ran before) adds none
    report.model_macs_before = (flops_after - inserted) // 2 + sum(s.macs_before or 0 for s in rewritten)
    if rewritten:
        error = relative_output_error(recorded.values, after, recorded.outputs, outputs_after)
        if error is not None:
            report.notes.append(f"model output relative error on the example inputs (before fine-tuning): {error:.4f}")
    return report
