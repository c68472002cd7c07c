"""The HetConv pass: standard KxK convs become ``fxeff::hetconv2d`` with part P (REFERENCE.md section 3).

Each filter j keeps its KxK taps on its channel block g = floor(j * P / N) and one tap on every other
channel (the conv's centre tap with ``init="centre"``, the sum of its taps with ``init="sum"``, or all
of them fitted to the example inputs with ``init="fit"``), so the layer costs 1/P + (1 - 1/P)/K^2 of
the conv's MACs. Candidates are the 2-D convs with groups == 1 that are not transposed; each is
rewritten or listed as skipped with the reason (the first conv when
``skip_first``, 1x1 kernels, even or non-square kernels, fewer than ``min_channels`` channels,
channels not divisible by P, padding modes other than zeros). The weights are new parameters on
the GraphModule (the user's model is not changed): symbolic graphs get a ``call_module`` of
``fxeff.nn.HetConv2d`` (fine-tune it like any layer), dynamo and export graphs a ``call_function`` of
the op. The report gives each layer's relative output error on the example inputs (the layer on the
input it sees once the layers before it are rewritten, against the conv's output in the original model,
so it includes their error) and the MACs before/after; the notes give the whole model's output error.
"""
import dataclasses
from typing import List, Optional

import torch
import torch.fx as fx

from ..nn import hetconv as hetconv_nn
from ..report import Report, SiteReport
from .config import PassConfig, PassContext, register_pass_config
from .graph import SYMBOLIC, ConvSite, concrete_shape, conv_site, conv_sites, graph_kind
from .measure import IncrementalRun
from .rewrite import Recorded, fake_key_and_mode, finish_report, mark_inserted, new_attr, propagate_fake, \
    record_before, relative_error, site_params, sweep, unique_name

HETCONV2D = torch.ops.fxeff.hetconv2d.default
_ROLE = "fxeff_hetconv"  # node.meta key marking the nodes this pass inserted


@register_pass_config("hetconv")
@dataclasses.dataclass
class HetConv(PassConfig):
    """Config of the HetConv pass.

    ``part``: P, the number of channel blocks (each filter keeps KxK taps on M/P input channels).
    ``min_channels``: convs with fewer input or output channels are skipped. ``skip_first``: keep the
    graph's first conv (the stem reading the image) whole. ``init``: "sum" or "centre", the single tap
    kept on the other channels, or "fit": every weight fitted by least squares to reproduce the conv's
    output on its input from the example inputs, which must then be real, representative data (a few
    hundred images), not random tensors (see fxeff.nn.HetConv2d.from_conv).
    """

    part: int = 4
    min_channels: int = 16
    skip_first: bool = True
    init: str = "sum"

    def __post_init__(self):
        for name in ("part", "min_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"fxeff.passes.HetConv: {name} must be an int >= 1, got {value!r}")
        if not isinstance(self.skip_first, bool):
            raise ValueError(f"fxeff.passes.HetConv: skip_first must be a bool, got {self.skip_first!r}")
        if self.init not in hetconv_nn.INITS:
            raise ValueError(f"fxeff.passes.HetConv: init must be one of {hetconv_nn.INITS}, got {self.init!r}")

    def run(self, gm: fx.GraphModule, context: PassContext) -> Report:
        return hetconv_pass(gm, self, context)


def _is_candidate(site: ConvSite) -> bool:
    return site.dims == 2 and not site.transposed and site.groups == 1 and site.weight_shape is not None


def _skip_reason(site: ConvSite, config: HetConv, first: bool) -> Optional[str]:
    n, m, kh, kw = site.weight_shape
    if site.unsupported:
        return site.unsupported
    if first and config.skip_first:
        return "first conv of the graph (skip_first=True): the stem keeps its full kernel"
    if kh == 1 and kw == 1:
        return "1x1 kernel: already pointwise"
    if kh != kw or kh % 2 == 0:
        return f"kernel {kh}x{kw}: hetconv2d needs a square, odd kernel"
    if min(n, m) < config.min_channels:
        return f"{m} -> {n} channels: fewer than min_channels={config.min_channels}"
    if m % config.part or n % config.part:
        return f"{m} -> {n} channels: not divisible by part={config.part}"
    if site.padding_mode != "zeros":
        return f"padding_mode={site.padding_mode!r}: hetconv2d pads with zeros"
    return None


def _rewrite(gm: fx.GraphModule, kind: str, site: ConvSite, module: hetconv_nn.HetConv2d) -> fx.Node:
    """Replaces the conv by the HetConv2d module (symbolic) or the op on new parameters (dynamo, export)."""
    graph = gm.graph
    base = f"fxeff_hetconv_{site.name}"
    key, fake_mode = fake_key_and_mode(site)
    new: List[fx.Node] = []
    with graph.inserting_before(site.node):
        if kind == SYMBOLIC:
            name = unique_name(gm, base)
            gm.add_submodule(name, module)
            out = graph.call_module(name, (site.input,))
        else:
            params = [module.weight_kxk, module.weight_1x1] + ([module.bias] if module.bias is not None else [])
            for suffix, p in zip(("weight_kxk", "weight_1x1", "bias"), params):
                new.append(graph.get_attr(new_attr(gm, f"{base}_{suffix}", p, True)))
            bias = new[2] if module.bias is not None else None
            out = graph.call_function(HETCONV2D, (site.input, new[0], new[1], bias, module.part, list(module.stride),
                                                  list(module.padding), list(module.dilation)))
        new.append(out)
    mark_inserted(new, _ROLE, site.node)
    if kind != SYMBOLIC:
        propagate_fake(gm, new, key, fake_mode)
    site.node.replace_all_uses_with(out)
    graph.erase_node(site.node)
    return out


def hetconv_pass(gm: fx.GraphModule, config: HetConv, context: PassContext) -> Report:
    """Rewrites ``gm`` in place (recompiled) and returns the report; see the module docstring."""
    kind = graph_kind(gm)
    candidates = [s for s in conv_sites(gm) if _is_candidate(s)]
    recorded = record_before(gm, context.example_inputs, candidates)
    with sweep(gm, context.example_inputs, recorded) as run:
        site_reports = [_rewrite_site(gm, kind, site, config, recorded, run, first=i == 0)
                        for i, site in enumerate(candidates)]
        return finish_report(gm, run, "hetconv", site_reports, [f"init={config.init!r}, part={config.part}"], recorded,
                             "no conv could be replaced by a HetConv: the graph is unchanged", _ROLE)


def _rewrite_site(gm: fx.GraphModule, kind: str, site: ConvSite, config: HetConv, recorded: Recorded,
                  run: Optional[IncrementalRun], first: bool) -> SiteReport:
    """Rewrites one candidate (or says why not); ``run`` gives the input it sees after the rewrites before it."""
    macs = site.macs()
    weight, bias, unknown = site_params(gm, site, recorded.inputs)
    reason = _skip_reason(site, config, first) or unknown
    if reason is not None:
        return SiteReport(site.name, site.describe(), "skipped", reason, macs, macs, "hetconv")
    if config.init == "fit" and recorded.fake:
        raise ValueError("fxeff.passes.HetConv: init='fit' fits each layer to its input on the example inputs "
                         "and expected real example inputs, got fake tensors; use init='sum' or real inputs")
    n = site.weight_shape[0]
    original_input = None if recorded.fake else recorded.values[site.input]
    site.input = conv_site(gm, site.node).input  # an earlier rewrite may have replaced the input node
    # the input it sees after the rewrites before it: "fit" fits on it, the error is measured on it
    seen = None if recorded.fake else run.value(site.input)
    module = hetconv_nn.HetConv2d.from_weight(weight, bias, config.part, site.stride, site.padding, site.dilation,
                                              config.init, seen, original_input)
    out_shape = concrete_shape(site.node)
    macs_after = None
    if out_shape is not None:
        macs_after = out_shape[0] * out_shape[2] * out_shape[3] * n * module.fan_in
    error = None
    if not recorded.fake:
        with torch.no_grad():
            out = module(seen)
        error = relative_error(out, recorded.values[site.node])
    new = _rewrite(gm, kind, site, module)
    if not recorded.fake:  # the sweep takes the layer's output from here instead of computing it again
        run.seed(new, out, 2 * macs_after)
    return SiteReport(site.name, site.describe(), "rewritten", f"part={config.part}", macs, macs_after, "hetconv",
                      error=error)


__all__ = ["HetConv", "hetconv_pass"]
