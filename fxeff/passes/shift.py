"""The shift pass: each depthwise conv becomes a zero-FLOP per-channel shift, initialised from its weights.

A depthwise conv (groups == in == out channels, any kernel, stride, padding, dilation; 1-, 2- or 3-D)
is replaced by ``fxeff::shift`` emulating its geometry as ``fxeff.nn.Shift{1,2,3}d(emulate_dw=...)``
does: shift, crop (or zero-pad) by t = d(k-1) - 2p (t//2 at the start), then average-pool by the
stride, so the output has the conv's shape. Each channel keeps ONE tap of its kernel,
``y_c ~= a_c * shift(x)_c + b_c``; the tap, the scale a and the offset b come from ``init``:

* ``"lstsq"`` (default): per channel, the tap and (a, b) that minimise ||a z_tap + b - y||^2 on the
  example inputs (y: the conv's output in the original model; z: the shifted input this layer sees
  once the layers before it are rewritten, so the fit also corrects their error). On
  EfficientNet-Lite0 with 8 real photos it halves the layers' relative output error of "max_tap"
  (mean 0.59 vs 1.12, docs/benchmarks.md). Under torch.compile the fit uses the inputs of the call
  that compiles the graph (each recompile fits again).
* ``"max_tap"``: data-free: the largest-magnitude tap, a = its weight, b = the conv's bias.

The tap's position gives the shift: the emulation reads x[i + o - s] where conv's tap k reads
x[i - p + d k] (o = the crop's start), so s = o + p - d k (= d (centre - k) for odd kernels with
"same" padding). The scale and offset are folded into the conv's only user when exact: a BatchNorm
with running statistics, re-parameterised so that it sees shift(x) (mean' = (mean - b)/a, var' =
(var + eps)/a^2 - eps, gamma' = gamma a sqrt(var' + eps)/sqrt(var + eps)): equal in eval mode, and
in train mode it normalises the same way up to eps, so fine-tuning starts from the conv's function;
or a 1x1 conv without padding (W'[:, c] = W[:, c] a_c, bias' = bias + W b). Otherwise an explicit
per-channel multiply-add (learnable) follows the shift. The user's model is never mutated: new
modules, parameters and buffers live on the GraphModule (the originals are shared with the model).

Symbolic graphs get a ``call_module`` of the Shift module (``fxeff.nn.sparsity_loss(gm)`` finds it);
dynamo and export graphs get ``call_function`` nodes (torch functions in dynamo graphs, aten ops in
export graphs) that compute exactly what the module computes. The report gives each layer's
relative output error ||y_shift - y_conv|| / ||y_conv|| on the example inputs: the rewritten layer on
the input it sees once the layers before it are rewritten, against the conv's output in the original
model, so it includes their error (n/a for fake inputs); notes give the whole model's output error.
"""
import dataclasses
import itertools
import math
import operator
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import nn

from .. import ops as fxeff_ops
from ..nn import shift as shift_nn
from ..report import Report, SiteReport
from .config import PassConfig, PassContext, register_pass_config
from .graph import TORCH_CONVS, EXPORT, SYMBOLIC, ConvSite, concrete_shape, conv_site, conv_sites, graph_kind
from .measure import IncrementalRun, fake_mode_of
from .rewrite import BN_FUNCTIONS, Recorded, batch_norm_stats, fake_key_and_mode, finish_report, new_attr, \
    mark_inserted, param_value, propagate_fake, record_before, relative_error, site_params, sweep, unique_name

aten = torch.ops.aten
INIT_RULES = ("lstsq", "max_tap")
_ROLE = "fxeff_shift"  # node.meta key marking the nodes this pass inserted
# conv padding_mode -> the shift padding that continues the input the same way
_CONV_PADDING = {"zeros": "zeros", "reflect": "reflect", "replicate": "border", "circular": "periodic"}


@register_pass_config("shift")
@dataclasses.dataclass
class Shift(PassConfig):
    """Config of the shift pass.

    ``mode``: the shift op's mode ("sparse": rounded shifts, straight-through gradient; "active":
    interpolated; "grouped": fixed). ``padding``: how shifted-in pixels are filled (fxeff.ops.SHIFT_PADDINGS).
    ``init``: "lstsq" (fit on the example inputs) or "max_tap" (data-free), see the module docstring.
    ``sparsity_term``: the L1 weight of the Shift modules' ``sparsity_loss`` (symbolic graphs).
    """

    mode: str = "sparse"
    padding: str = "zeros"
    init: str = "lstsq"
    sparsity_term: float = 5e-4

    def __post_init__(self):
        for name, allowed in (("mode", fxeff_ops.SHIFT_MODES), ("padding", fxeff_ops.SHIFT_PADDINGS),
                              ("init", INIT_RULES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"fxeff.passes.Shift: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        term = self.sparsity_term
        if isinstance(term, bool) or not isinstance(term, (int, float)) or not math.isfinite(term) or term < 0:
            raise ValueError(f"fxeff.passes.Shift: sparsity_term must be a finite float >= 0, got {term!r}")
        self.sparsity_term = float(term)

    def run(self, gm: fx.GraphModule, context: PassContext) -> Report:
        return shift_pass(gm, self, context)


# ---------------------------------------------------------------- candidates

def _is_candidate(site: ConvSite) -> bool:
    """Convs with groups == in channels (depthwise, or depthwise with a channel multiplier)."""
    ws = site.weight_shape
    if ws is None:
        return False
    if site.transposed:  # weight [in, out/groups, *k]
        return ws[1] == 1 and ws[0] == site.groups
    return ws[1] == 1 and (site.groups > 1 or ws[0] == 1)


def _skip_reason(site: ConvSite, config: Shift) -> Optional[str]:
    ws = site.weight_shape
    if site.transposed:
        return "transposed conv: a shift emulates forward convs only"
    if ws[0] != site.groups:
        return (f"channel multiplier {ws[0] // site.groups} ({site.groups} -> {ws[0]} channels): a shift maps each "
                f"channel to itself")
    if site.unsupported:
        return site.unsupported
    if all(k == 1 for k in ws[2:]):
        return "1x1 kernel: a per-channel scale, nothing to shift"
    wanted = _CONV_PADDING.get(site.padding_mode)
    if wanted is None:
        return f"padding_mode={site.padding_mode!r} is not a padding mode fxeff knows"
    if site.padding_mode != "zeros" and wanted != config.padding:
        return (f"padding_mode={site.padding_mode!r}: its shift equivalent is Shift(padding={wanted!r}), this pass "
                f"has padding={config.padding!r}")
    return None


# ---------------------------------------------------------------- initialisation

def _emulate_dw(site: ConvSite) -> Dict[str, Tuple[int, ...]]:
    return shift_nn.normalize_emulate_dw("fxeff.passes.Shift", dict(
        kernel_size=tuple(site.weight_shape[2:]), stride=tuple(site.stride), padding=tuple(site.padding),
        dilation=tuple(site.dilation)), site.dims)


def _pad_and_pool(site: ConvSite) -> Tuple[List[int], List[int]]:
    """The emulation's F.pad amounts (last dim first, negative = crop) and pool strides, as the modules do it."""
    return shift_nn.dw_pad_and_pool(_emulate_dw(site))


def tap_shifts(site: ConvSite) -> torch.Tensor:
    """[taps, dims] float64: the shift making the emulation read each kernel tap (row-major order).

    The emulation's output i reads shifted[i + o] = x[i + o - s] (o = minus the pad before the dim), the
    conv's tap k reads x[i - p + d k]: s = o + p - d k.
    """
    pad, _ = _pad_and_pool(site)
    dims = site.dims
    starts = [-(pad[2 * (dims - 1 - d)] if pad else 0) for d in range(dims)]
    per_dim = [[o + p - d * i for i in range(k)]
               for o, k, p, d in zip(starts, site.weight_shape[2:], site.padding, site.dilation)]
    return torch.tensor(list(itertools.product(*per_dim)), dtype=torch.float64)


def _shift_module(site: ConvSite, config: Shift, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The Shift module emulating the conv (its shifts are set from the conv's weights afterwards; "grouped"
    gets a radius-0 neighbourhood at construction, which any channel count allows)."""
    cls = {1: shift_nn.Shift1d, 2: shift_nn.Shift2d, 3: shift_nn.Shift3d}[site.dims]
    return cls(site.groups, padding=config.padding, mode=config.mode,
               init_shift=0.0 if config.mode == "grouped" else None, sparsity_term=config.sparsity_term,
               emulate_dw=_emulate_dw(site), device=device, dtype=dtype)


def _set_shifts(module: nn.Module, shifts: torch.Tensor) -> None:
    with torch.no_grad():
        module.shifts.copy_(shifts)


def _channel_sums(t: torch.Tensor) -> torch.Tensor:
    return t.double().sum(dim=[d for d in range(t.dim()) if d != 1])


@dataclasses.dataclass
class _Init:
    shifts: torch.Tensor  # [C, dims], the weight's dtype
    scale: torch.Tensor  # [C] float64
    offset: torch.Tensor  # [C] float64


def _max_tap(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    flat = weight.detach().double().reshape(weight.shape[0], -1)
    best = flat.abs().argmax(dim=1)
    offset = (bias.detach().double() if bias is not None
              else torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device))
    return best, flat.gather(1, best[:, None])[:, 0], offset


def _lstsq(module: nn.Module, x: torch.Tensor, y: torch.Tensor, taps: torch.Tensor, weight: torch.Tensor,
           bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """Per channel: the tap and (a, b) minimising ||a z_tap + b - y||^2. A channel whose shifted inputs are
    constant for every tap (nothing to fit a scale on) keeps its largest tap and fits only b."""
    channels = y.shape[1]
    n = y.numel() // channels
    sy, syy = _channel_sums(y), _channel_sums(y * y)
    errors, scales, means = [], [], []
    for tap in taps:
        _set_shifts(module, tap.expand(channels, -1))
        z = module(x)
        mz, szz, syz = _channel_sums(z) / n, _channel_sums(z * z) / n, _channel_sums(y * z) / n
        var_z = szz - mz * mz
        cov = syz - mz * sy / n
        fit = var_z > 1e-12 * szz.clamp_min(1e-300)
        scale = torch.where(fit, cov / var_z.where(fit, torch.ones_like(var_z)), torch.zeros_like(cov))
        var_y = syy / n - (sy / n) ** 2
        errors.append(torch.where(fit, var_y - scale * cov, torch.full_like(var_y, math.inf)))
        scales.append(scale)
        means.append(mz)
    errors, scales, means = torch.stack(errors), torch.stack(scales), torch.stack(means)
    best = errors.argmin(dim=0)
    picked = torch.arange(channels, device=y.device)
    scale = scales[best, picked]
    degenerate = torch.isinf(errors[best, picked])
    if degenerate.any():
        fallback, fallback_scale, _ = _max_tap(weight, bias)
        best = torch.where(degenerate, fallback, best)
        scale = torch.where(degenerate, fallback_scale, scale)
    offset = sy / n - scale * means[best, picked]
    return best, scale, offset


def _initialise(config: Shift, module: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor],
                taps: torch.Tensor, x: Optional[torch.Tensor], y: Optional[torch.Tensor]) -> _Init:
    with torch.no_grad():
        if config.init == "max_tap":
            best, scale, offset = _max_tap(weight, bias)
        else:
            best, scale, offset = _lstsq(module, x, y, taps, weight, bias)
    return _Init(shifts=taps.to(best.device)[best].to(weight.dtype), scale=scale, offset=offset)


def _relative_error(module: nn.Module, init: _Init, x: torch.Tensor, y: torch.Tensor) -> float:
    """||a shift(x) + b - y|| / ||y||: the rewritten layer on the input it sees, against the conv's output."""
    with torch.no_grad():
        z = module(x).double()
        view = (1, -1) + (1,) * (z.dim() - 2)
        return relative_error(z * init.scale.view(view) + init.offset.view(view), y)


# ---------------------------------------------------------------- graph editing helpers

def _arg_names(node: fx.Node) -> Sequence[str]:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return [a.name for a in target._schema.arguments]
    if target in BN_FUNCTIONS:
        return BN_FUNCTIONS[target]
    return TORCH_CONVS[target][2]


def _set_arg(node: fx.Node, name: str, value: Any) -> None:
    names = list(_arg_names(node))
    i = names.index(name)
    if name not in node.kwargs and i < len(node.args):
        node.update_arg(i, value)
    else:
        node.update_kwarg(name, value)


# ---------------------------------------------------------------- emitting the shift

def _emit_shift(gm: fx.GraphModule, kind: str, site: ConvSite, module: nn.Module, config: Shift,
                base: str) -> Tuple[fx.Node, List[fx.Node]]:
    """The nodes computing module(site.input) before site.node: (last node, all new nodes)."""
    graph = gm.graph
    new: List[fx.Node] = []
    with graph.inserting_before(site.node):
        if kind == SYMBOLIC:
            name = unique_name(gm, base)
            gm.add_submodule(name, module)
            node = graph.call_module(name, (site.input,))
            return node, [node]
        shifts = module.shifts
        attr = new_attr(gm, f"{base}_shifts", shifts, isinstance(shifts, nn.Parameter))
        new.append(graph.get_attr(attr))
        pad, pool = _pad_and_pool(site)
        if pad or pool:  # the conv's crop/pad and stride fused into the shift, as the modules do it
            pad, pool = shift_nn.fused_pad_and_pool(pad, pool, site.dims)
            new.append(graph.call_function(torch.ops.fxeff.shift_pool.default,
                                           (site.input, new[-1], config.padding, config.mode, pad, pool)))
        else:
            new.append(graph.call_function(torch.ops.fxeff.shift.default,
                                           (site.input, new[-1], config.padding, config.mode)))
    return new[-1], new


def _emit_affine(gm: fx.GraphModule, kind: str, site: ConvSite, z: fx.Node, init: _Init, dtype: torch.dtype,
                 base: str) -> List[fx.Node]:
    """z * scale + offset with learnable per-channel parameters on the GraphModule."""
    view = (-1,) + (1,) * site.dims
    graph = gm.graph
    scale = new_attr(gm, f"{base}_scale", init.scale.to(dtype).view(view), True)
    offset = new_attr(gm, f"{base}_offset", init.offset.to(dtype).view(view), True)
    mul, add = (aten.mul.Tensor, aten.add.Tensor) if kind == EXPORT else (operator.mul, operator.add)
    with graph.inserting_after(z):
        scale_node = graph.get_attr(scale)
    with graph.inserting_after(scale_node):
        offset_node = graph.get_attr(offset)
    with graph.inserting_after(offset_node):
        scaled = graph.call_function(mul, (z, scale_node))
    with graph.inserting_after(scaled):
        out = graph.call_function(add, (scaled, offset_node))
    return [scale_node, offset_node, scaled, out]


# ---------------------------------------------------------------- folding the scale into the next op

def _fold_batch_norm(gm: fx.GraphModule, conv: fx.Node, user: fx.Node, init: _Init, inputs: Dict[fx.Node, Any],
                     base: str) -> Tuple[Optional[List[fx.Node]], str]:
    """(new get_attr nodes, description) when ``user`` is a BatchNorm with running statistics reading only
    the conv's output; (None, why not) when it is a BatchNorm that cannot take the fold; (None, "") otherwise."""
    stats, eps, why = batch_norm_stats(gm, user, conv, inputs)
    if stats is None:
        return None, why
    new = _batch_norm_reparameterised(stats, init, eps)
    dtype = stats["running_mean"].dtype
    if user.op == "call_module":
        bn = gm.get_submodule(user.target)
        fresh = type(bn)(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=True, track_running_stats=True,
                         device=bn.running_mean.device, dtype=dtype)
        with torch.no_grad():
            for name, value in new.items():
                getattr(fresh, name).copy_(value)
            fresh.num_batches_tracked.copy_(bn.num_batches_tracked)
        fresh.train(bn.training)
        name = unique_name(gm, f"{base}_bn")
        gm.add_submodule(name, fresh)
        user.target = name
        return [], f"scale folded into BatchNorm {name!r} (a re-parameterised copy)"
    nodes = []
    for name, value in new.items():
        attr = new_attr(gm, f"{base}_bn_{name}", value.to(dtype), name in ("weight", "bias"))
        with gm.graph.inserting_before(user):
            nodes.append(gm.graph.get_attr(attr))
        _set_arg(user, name, nodes[-1])
    return nodes, f"scale folded into BatchNorm {user.name!r} (re-parameterised copies of its tensors)"


def _batch_norm_reparameterised(stats: Dict[str, Optional[torch.Tensor]], init: _Init,
                                eps: float) -> Dict[str, torch.Tensor]:
    """BatchNorm tensors for input z that equal BN(a z + b) in eval mode (see the module docstring);
    a channel with a == 0 is constant: gamma' = 0 and beta' carries BN(b)."""
    mean, var = stats["running_mean"].double(), stats["running_var"].double()
    gamma = stats["weight"].double() if stats["weight"] is not None else torch.ones_like(mean)
    beta = stats["bias"].double() if stats["bias"] is not None else torch.zeros_like(mean)
    a, b = init.scale, init.offset
    live = a != 0
    safe_a = torch.where(live, a, torch.ones_like(a))
    new_var = torch.where(live, ((var + eps) / safe_a ** 2 - eps).clamp_min(0.0), var)
    new_mean = torch.where(live, (mean - b) / safe_a, torch.zeros_like(mean))
    new_gamma = torch.where(live, gamma * a * (new_var + eps).sqrt() / (var + eps).sqrt(), torch.zeros_like(gamma))
    new_beta = torch.where(live, beta, beta + gamma * (b - mean) / (var + eps).sqrt())
    return dict(weight=new_gamma, bias=new_beta, running_mean=new_mean, running_var=new_var)


def _fold_pointwise(gm: fx.GraphModule, conv: fx.Node, user: fx.Node, init: _Init, inputs: Dict[fx.Node, Any],
                    base: str) -> Tuple[Optional[List[fx.Node]], str]:
    """Folds a and b into a following 1x1 conv without padding (W'[:, c] = W[:, c] a_c, bias' = bias + W b)."""
    site = conv_site(gm, user)
    if site is None:
        return None, ""
    if site.input is not conv or site.transposed or any(k != 1 for k in site.weight_shape[2:]):
        return None, ""
    if any(p != 0 for p in site.padding) and bool((init.offset != 0).any()):
        return None, f"the 1x1 conv {site.name!r} pads its input (the offset would reach the padding)"
    if site.unsupported:
        return None, f"the 1x1 conv {site.name!r}: {site.unsupported}"
    weight, why = param_value(gm, site.weight, inputs)
    bias, why_bias = param_value(gm, site.bias, inputs) if site.bias is not None else (None, "")
    if weight is None or (site.bias is not None and bias is None):
        return None, f"the 1x1 conv {site.name!r}: {why or why_bias}"
    out_channels, per_group = weight.shape[0], weight.shape[1]
    groups = site.groups
    channel = (torch.arange(out_channels)[:, None] // (out_channels // groups)) * per_group + torch.arange(per_group)
    w = weight.detach().double().reshape(out_channels, per_group)
    new_weight = (w * init.scale[channel]).reshape(weight.shape).to(weight.dtype)
    new_bias = (w * init.offset[channel]).sum(dim=1)
    if bias is not None:
        new_bias = new_bias + bias.detach().double()
    new_bias = new_bias.to(weight.dtype)
    if user.op == "call_module":
        old = gm.get_submodule(user.target)
        fresh = type(old)(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                          old.groups, True, old.padding_mode, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            fresh.weight.copy_(new_weight)
            fresh.bias.copy_(new_bias)
        fresh.train(old.training)
        name = unique_name(gm, f"{base}_pointwise")
        gm.add_submodule(name, fresh)
        user.target = name
        return [], f"scale folded into the 1x1 conv {name!r} (a rescaled copy)"
    nodes = []
    for name, value in (("weight", new_weight), ("bias", new_bias)):
        attr = new_attr(gm, f"{base}_pointwise_{name}", value, True)
        with gm.graph.inserting_before(user):
            nodes.append(gm.graph.get_attr(attr))
        _set_arg(user, name, nodes[-1])
    return nodes, f"scale folded into the 1x1 conv {site.name!r} (rescaled copies of its weight and bias)"


def _fold(gm: fx.GraphModule, site: ConvSite, init: _Init, inputs: Dict[fx.Node, Any],
          base: str) -> Tuple[Optional[List[fx.Node]], str]:
    """(new nodes, description) when the scale went into the conv's only user, else (None, why it stays explicit)."""
    users = list(site.node.users)
    if len(users) != 1:
        return None, f"explicit per-channel scale: the conv's output has {len(users)} users"
    for fold in (_fold_batch_norm, _fold_pointwise):
        nodes, text = fold(gm, site.node, users[0], init, inputs, base)
        if nodes is not None:
            return nodes, text
        if text:
            return None, f"explicit per-channel scale: {text}"
    return None, "explicit per-channel scale: no BatchNorm or 1x1 conv follows"


# ---------------------------------------------------------------- the pass

def _rewrite(gm: fx.GraphModule, kind: str, site: ConvSite, config: Shift, init: _Init, module: nn.Module,
             inputs: Dict[fx.Node, Any], dtype: torch.dtype) -> Tuple[str, bool]:
    """Replaces the conv; returns (where the scale went, whether it stayed an explicit multiply-add)."""
    base = f"fxeff_shift_{site.name}"
    key, fake_mode = fake_key_and_mode(site)
    z, new = _emit_shift(gm, kind, site, module, config, base)
    folded, description = _fold(gm, site, init, inputs, base)
    explicit = folded is None
    if explicit:
        affine = _emit_affine(gm, kind, site, z, init, dtype, base)
        new, z = new + affine, affine[-1]
    else:
        new = new + folded
    mark_inserted(new, _ROLE, site.node)
    propagate_fake(gm, [n for n in new if n.op != "call_module"], key, fake_mode)
    site.node.replace_all_uses_with(z)
    gm.graph.erase_node(site.node)
    return description, explicit


def shift_pass(gm: fx.GraphModule, config: Shift, context: PassContext) -> Report:
    """Rewrites ``gm`` in place (recompiled) and returns the report; see the module docstring."""
    kind = graph_kind(gm)
    if fake_mode_of(context.example_inputs) is not None and config.init == "lstsq":
        raise ValueError("fxeff.passes.Shift: init='lstsq' fits each channel on the example inputs' values, and "
                         "these are fake tensors; give real example inputs or use Shift(init='max_tap')")
    candidates = [s for s in conv_sites(gm) if _is_candidate(s)]
    recorded = record_before(gm, context.example_inputs, candidates)
    with sweep(gm, context.example_inputs, recorded) as run:
        site_reports = [_rewrite_site(gm, kind, site, config, recorded, run) for site in candidates]
        notes = [f"init={config.init!r}" + (" (fitted on the example inputs)" if config.init == "lstsq" else "")]
        return finish_report(gm, run, "shift", site_reports, notes, recorded,
                             "no depthwise conv could be replaced by a shift: the graph is unchanged", _ROLE)


def _rewrite_site(gm: fx.GraphModule, kind: str, site: ConvSite, config: Shift, recorded: Recorded,
                  run: Optional[IncrementalRun]) -> SiteReport:
    """Rewrites one candidate (or says why not); ``run`` gives the input it sees after the rewrites before it."""
    fake = recorded.fake
    macs = site.macs()
    weight, bias, unknown = site_params(gm, site, recorded.inputs)
    reason = _skip_reason(site, config) or unknown
    if reason is not None:
        return SiteReport(site.name, site.describe(), "skipped", reason, macs, macs, "shift")
    y = None if fake else recorded.values[site.node]
    site.input = conv_site(gm, site.node).input  # an earlier rewrite may have replaced the input node
    # the input it sees after the rewrites before it: "lstsq" fits on it, the error is measured on it
    seen = None if fake else run.value(site.input)
    module = _shift_module(site, config, weight.dtype, weight.device)
    init = _initialise(config, module, weight, bias, tap_shifts(site), seen, y)
    _set_shifts(module, init.shifts)
    error = None if fake else _relative_error(module, init, seen, y)
    out_shape = concrete_shape(site.node)
    description, explicit = _rewrite(gm, kind, site, config, init, module, recorded.inputs, weight.dtype)
    macs_after = (math.prod(out_shape) if out_shape is not None else None) if explicit else 0
    return SiteReport(site.name, site.describe(), "rewritten", description, macs, macs_after, "shift", error=error)


__all__ = ["Shift", "shift_pass", "tap_shifts", "INIT_RULES"]
