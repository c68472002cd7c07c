"""The normalised view of a graph that every fxeff pass works on.

Three kinds of graphs carry the same convolution in different clothes:

* symbolic_trace graphs: ``call_module`` of an ``nn.Conv*d`` (or ``call_function`` F.conv2d with
  ``get_attr`` weights when a custom conv module was traced through);
* dynamo graphs: ``call_function`` torch.conv2d / F.conv2d, weights as placeholders, values in
  ``meta["example_value"]``;
* export graphs: ``aten.conv2d.default`` / ``aten.convolution.default``, values in ``meta["val"]``.

``conv_sites(gm)`` lists them all as ``ConvSite``s with normalised arguments (ints in tuples,
"same"/"valid" padding resolved), so a pass matches and rewrites one structure. Node module
paths are normalised too (dynamo writes ``L['self'].features[3]``; fxeff says ``features.3``).
"""
import dataclasses
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

aten = torch.ops.aten

# Python-level conv functions -> (spatial dims, transposed, parameter names in order).
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVT_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
TORCH_CONVS = {
    torch.conv1d: (1, False, _CONV_ARGS), torch.conv2d: (2, False, _CONV_ARGS), torch.conv3d: (3, False, _CONV_ARGS),
    torch.conv_transpose1d: (1, True, _CONVT_ARGS), torch.conv_transpose2d: (2, True, _CONVT_ARGS),
    torch.conv_transpose3d: (3, True, _CONVT_ARGS),
    F.conv1d: (1, False, _CONV_ARGS), F.conv2d: (2, False, _CONV_ARGS), F.conv3d: (3, False, _CONV_ARGS),
    F.conv_transpose1d: (1, True, _CONVT_ARGS), F.conv_transpose2d: (2, True, _CONVT_ARGS),
    F.conv_transpose3d: (3, True, _CONVT_ARGS),
}
# aten overloads -> spatial dims (None: read it from the weight) and transposed (None: read it from the args).
_ATEN_CONVS = {
    aten.conv1d.default: (1, False), aten.conv1d.padding: (1, False),
    aten.conv2d.default: (2, False), aten.conv2d.padding: (2, False),
    aten.conv3d.default: (3, False), aten.conv3d.padding: (3, False),
    aten.conv_transpose1d.default: (1, True), aten.conv_transpose2d.input: (2, True),
    aten.conv_transpose3d.input: (3, True),
    aten.convolution.default: (None, None), aten._convolution.default: (None, None),
}

SYMBOLIC, DYNAMO, EXPORT = "symbolic", "dynamo", "export"


@dataclasses.dataclass
class ConvSite:
    """One convolution, whatever the graph kind.

    ``weight``/``bias`` are graph nodes, or for ``call_module`` sites the qualified attribute name
    (``"features.5.weight"``) that a rewrite turns into a ``get_attr`` (so parameters stay shared).
    ``padding`` is explicit ints; ``unsupported`` says why the site cannot be expressed exactly as a
    (stride, padding, dilation, groups) zero-padded conv (e.g. asymmetric "same" padding), else None.
    """

    node: fx.Node
    input: fx.Node
    weight: Union[fx.Node, str]
    bias: Union[fx.Node, str, None]
    stride: Tuple[int, ...]
    padding: Tuple[int, ...]
    dilation: Tuple[int, ...]
    groups: int
    padding_mode: str
    transposed: bool
    dims: int
    kind: str
    weight_shape: Optional[Tuple[int, ...]]
    input_shape: Optional[Tuple[Any, ...]]
    output_shape: Optional[Tuple[Any, ...]]
    module_fqn: Optional[str]
    unsupported: Optional[str] = None

    @property
    def name(self) -> str:
        """The module fqn when known (what users recognise), else the node's name."""
        return self.module_fqn if self.module_fqn else self.node.name

    @property
    def output_grid(self) -> Optional[Tuple[Any, Any]]:
        """(Hout, Wout) of the graph's value: ints, or SymInts in a dynamic graph; None when unknown."""
        if self.output_shape is None or len(self.output_shape) < 2:
            return None
        return (self.output_shape[-2], self.output_shape[-1])

    def macs(self) -> Optional[int]:
        """Dense MACs of this conv on the example inputs (torch.utils.flop_counter's formula / 2).

        Uses the concrete shapes of the last ``measure.run_recording`` (so dynamic graphs get numbers
        without guarding on their SymInts), else static graph shapes; None when unknown.
        """
        shapes = [concrete_shape(self.input), concrete_shape(self.node)]
        if self.weight_shape is None or any(s is None for s in shapes):
            return None
        from torch.utils.flop_counter import conv_flop_count

        return int(conv_flop_count(list(shapes[0]), list(self.weight_shape), list(shapes[1]), self.transposed)) // 2

    def macs_per_output_position(self) -> Optional[int]:
        """MACs per output pixel (all output channels, one image): O * C/g * prod(kernel)."""
        if self.weight_shape is None:
            return None
        n = 1
        for s in self.weight_shape:
            n *= int(s)
        return n

    def describe(self) -> str:
        """Short op description for reports, e.g. ``conv2d 64->128 3x3 s2 p1``."""
        name = f"conv{'_transpose' if self.transposed else ''}{self.dims}d"
        if self.weight_shape is None:
            return name
        o, cg = self.weight_shape[0], self.weight_shape[1]
        if self.transposed:
            o, cg = cg * self.groups, o // self.groups
        kernel = "x".join(str(k) for k in self.weight_shape[2:])
        text = f"{name} {cg * self.groups}->{o} {kernel}"
        if any(s != 1 for s in self.stride):
            text += f" s{_compact(self.stride)}"
        if any(p != 0 for p in self.padding):
            text += f" p{_compact(self.padding)}"
        if any(d != 1 for d in self.dilation):
            text += f" d{_compact(self.dilation)}"
        if self.groups != 1:
            text += f" g{self.groups}"
        if self.padding_mode != "zeros":
            text += f" {self.padding_mode}"
        return text


def _compact(values: Sequence[int]) -> str:
    return str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))


# ---------------------------------------------------------------- node values and module paths

def node_value(node: fx.Node) -> Any:
    """The example value fx/dynamo/export attached to ``node`` (tensor, fake tensor or TensorMetadata), or None."""
    for key in ("val", "example_value", "tensor_meta", "fxeff_val"):
        if key in node.meta and node.meta[key] is not None:
            return node.meta[key]
    return None


def node_shape(node: Any) -> Optional[Tuple[Any, ...]]:
    """The shape of ``node``'s tensor value (ints, or SymInts in dynamic graphs), or None when unknown."""
    if not isinstance(node, fx.Node):
        return None
    value = node_value(node)
    shape = getattr(value, "shape", None)
    return tuple(shape) if shape is not None else None


def concrete_shape(node: Any) -> Optional[Tuple[int, ...]]:
    """The int shape of ``node``'s value on the example inputs (``meta["fxeff_val"]``), else its static graph shape."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("fxeff_val")
    shape = tuple(value.shape) if value is not None else node_shape(node)
    if shape is None or not all(isinstance(s, int) for s in shape):
        return None
    return shape


def node_dtype(node: fx.Node) -> Optional[torch.dtype]:
    return getattr(node_value(node), "dtype", None)


_DYNAMO_ROOT = re.compile(r"^L\[['\"][^'\"]+['\"]\]\.?")
_DYNAMO_ITEM = re.compile(r"\[['\"]?([^'\"\]]+)['\"]?\]")


def normalize_fqn(fqn: str) -> str:
    """``L['self'].features[3]`` / ``L['self']._modules['features']._modules['3']`` -> ``features.3``."""
    fqn = _DYNAMO_ROOT.sub("", fqn)
    fqn = fqn.replace("._modules", "").replace("_modules[", "[")
    fqn = _DYNAMO_ITEM.sub(r".\1", fqn)
    return fqn.strip(".")


def module_stack(node: fx.Node) -> List[str]:
    """The normalised fqns of the modules ``node`` was called within, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    fqns = []
    for value in stack.values():
        fqn = value[0] if isinstance(value, tuple) else value
        fqns.append(normalize_fqn(str(fqn)))
    if node.op == "call_module" and (not fqns or fqns[-1] != node.target):
        fqns.append(str(node.target))
    return [f for f in fqns if f]


def module_fqn(node: fx.Node) -> Optional[str]:
    """The innermost module ``node`` belongs to (the call_module target itself for call_module nodes)."""
    if node.op == "call_module":
        return str(node.target)
    stack = module_stack(node)
    return stack[-1] if stack else None


def graph_kind(gm: fx.GraphModule) -> str:
    """"export" (aten ops), "dynamo" (meta["example_value"]) or "symbolic" (neither)."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
                and node.target.namespace == "aten":
            return EXPORT
    if any("example_value" in node.meta for node in gm.graph.nodes):
        return DYNAMO
    return SYMBOLIC


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    """The data-flow graph of ``graph`` (nodes are fx.Nodes; an edge u -> v when v reads u)."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        for user in node.users:
            g.add_edge(node, user)
    return g


# ---------------------------------------------------------------- conv sites

def _ints(value: Any, dims: int) -> Tuple[Any, ...]:
    if isinstance(value, (list, tuple)):
        value = tuple(value)
        if len(value) == 1 and dims > 1:
            return value * dims
        return value
    return (value,) * dims


def _resolve_padding(padding: Any, kernel: Optional[Sequence[int]], dilation: Sequence[int],
                     stride: Sequence[int], dims: int) -> Tuple[Tuple[int, ...], Optional[str]]:
    """Explicit symmetric padding for ints/'valid'/'same'; a reason when that cannot be exact."""
    if not isinstance(padding, str):
        return _ints(padding, dims), None
    if padding == "valid":
        return (0,) * dims, None
    if padding != "same":
        return (0,) * dims, f"padding={padding!r} is not a known conv padding"
    if kernel is None:
        return (0,) * dims, "padding='same' with an unknown kernel size"
    if any(s != 1 for s in stride):
        return (0,) * dims, "padding='same' with stride != 1"
    out = []
    for k, d in zip(kernel, dilation):
        total = d * (k - 1)
        if total % 2:
            return (0,) * dims, f"padding='same' needs asymmetric padding for kernel {tuple(kernel)} (dilation " \
                                f"{tuple(dilation)}); fxeff ops pad symmetrically"
        out.append(total // 2)
    return tuple(out), None


def _call_args(node: fx.Node, names: Sequence[str], defaults: Dict[str, Any]) -> Dict[str, Any]:
    bound = dict(defaults)
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def _weight_shape(gm: fx.GraphModule, weight: Any) -> Optional[Tuple[int, ...]]:
    if isinstance(weight, str):
        return tuple(gm.get_parameter(weight).shape)
    if isinstance(weight, fx.Node):
        if weight.op == "get_attr":
            try:
                return tuple(get_attr_value(gm, weight.target).shape)
            except AttributeError:
                pass
        shape = node_shape(weight)
        return tuple(int(s) for s in shape) if shape is not None else None
    return None


def get_attr_value(gm: fx.GraphModule, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _module_site(gm: fx.GraphModule, node: fx.Node) -> Optional[ConvSite]:
    module = gm.get_submodule(node.target)
    if not isinstance(module, nn.modules.conv._ConvNd) or type(module).forward not in _CONV_FORWARDS:
        return None
    dims = len(module.kernel_size)
    fqn = str(node.target)
    bias = f"{fqn}.bias" if module.bias is not None else None
    padding, unsupported = _resolve_padding(module.padding, module.kernel_size, module.dilation, module.stride, dims)
    input_node = node.args[0] if node.args else node.kwargs.get("input")
    return ConvSite(node=node, input=input_node, weight=f"{fqn}.weight", bias=bias, stride=tuple(module.stride),
                    padding=padding, dilation=tuple(module.dilation), groups=module.groups,
                    padding_mode=module.padding_mode, transposed=module.transposed, dims=dims, kind="call_module",
                    weight_shape=tuple(module.weight.shape), input_shape=node_shape(input_node),
                    output_shape=node_shape(node), module_fqn=fqn, unsupported=unsupported)


_CONV_FORWARDS = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.ConvTranspose1d.forward,
                  nn.ConvTranspose2d.forward, nn.ConvTranspose3d.forward}


def _function_site(gm: fx.GraphModule, node: fx.Node) -> Optional[ConvSite]:
    target = node.target
    if target in TORCH_CONVS:
        dims, transposed, names = TORCH_CONVS[target]
        a = _call_args(node, names, {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1,
                                     "output_padding": 0})
        kind = "torch_function"
    elif target in _ATEN_CONVS:
        dims, transposed = _ATEN_CONVS[target]
        schema = target._schema
        names = [arg.name for arg in schema.arguments]
        defaults = {arg.name: arg.default_value for arg in schema.arguments if arg.has_default_value()}
        a = _call_args(node, names, defaults)
        if transposed is None:
            transposed = bool(a["transposed"])
        kind = "aten"
    else:
        return None
    weight_shape = _weight_shape(gm, a["weight"])
    if dims is None:
        dims = len(weight_shape) - 2 if weight_shape is not None else len(_ints(a["stride"], 1))
    stride = _ints(a["stride"], dims)
    dilation = _ints(a["dilation"], dims)
    padding, unsupported = _resolve_padding(a["padding"], weight_shape[2:] if weight_shape else None, dilation,
                                            stride, dims)
    if transposed and any(p != 0 for p in _ints(a.get("output_padding", 0), dims)):
        unsupported = unsupported or "output_padding != 0"
    return ConvSite(node=node, input=a["input"], weight=a["weight"], bias=a["bias"], stride=stride, padding=padding,
                    dilation=dilation, groups=int(a["groups"]), padding_mode="zeros", transposed=transposed,
                    dims=dims, kind=kind, weight_shape=weight_shape, input_shape=node_shape(a["input"]),
                    output_shape=node_shape(node), module_fqn=module_fqn(node), unsupported=unsupported)


def conv_site(gm: fx.GraphModule, node: fx.Node) -> Optional[ConvSite]:
    """The ConvSite of ``node``, or None when ``node`` is not a convolution."""
    if node.op == "call_module":
        return _module_site(gm, node)
    if node.op == "call_function":
        return _function_site(gm, node)
    return None


def conv_sites(gm: fx.GraphModule) -> List[ConvSite]:
    """Every convolution of ``gm`` (1/2/3-D, transposed included), in graph order.

    Shapes come from the nodes' meta (``val``, ``example_value``, ``tensor_meta``); run
    ``propagate_values`` first on a symbolic_trace graph to fill them.
    """
    sites = [site for node in gm.graph.nodes if (site := conv_site(gm, node)) is not None]
    counts: Dict[str, int] = {}
    for site in sites:
        counts[site.name] = counts.get(site.name, 0) + 1
    for site in sites:  # a module called more than once: tell the calls apart
        if site.module_fqn and counts[site.module_fqn] > 1:
            site.module_fqn = f"{site.module_fqn}@{site.node.name}"
    return sites
