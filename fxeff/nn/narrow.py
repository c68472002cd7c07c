"""NarrowConv2d: an nn.Conv2d (groups 1) with an optional residual add and clamp fused, computed by
``fxeff.ops.narrow_conv2d``: on CPU with AVX-512, 16 output pixels per vector instead of the vendor's 16 output
channels, so a conv with few channels (a pruned one) costs in proportion to its channels. ``narrow_convs`` puts it
in place of the convs that gain (``gains``) in an fx GraphModule, with the residual add and the ReLU after each
fused.
"""
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..ops._utils import pair
from ._notrace import register_notrace_module

# Where the kernel beat the vendor conv on this project's CPU at batch 1 and 8-16 (benchmarks/blocks.py, part
# "narrow"; docs/benchmarks.md, "Block scaling, seventh session"). At stride 1 with same-width padding: fewer than
# 16 outputs (1.6-3.6x), at most 32 outputs from at most 64 inputs (1.2-2.0x), fewer than 16 inputs to at most 64
# outputs (1.0-1.9x); 64 -> 64 lost (0.86-0.92), and 8 -> 256 at batch 1. At larger strides: 1x1 convs with at
# most 128 inputs and 256 outputs (ResNet's downsample shortcuts: 1.0-2.8x, but 0.81 for 32 -> 64 at batch 1),
# and KxK convs with fewer than 16 outputs from at most 32 inputs (1.1-1.7x); 64 -> 32 3x3 lost (0.54). Other
# convs stay nn.Conv2d.
FEW = 16
STRIDE_1_MOST = (64, 32)          # inputs, outputs
FEW_INPUTS_MOST_OUTPUTS = 64
STRIDED_1X1_MOST = (128, 256)     # inputs, outputs
STRIDED_FEW_OUTPUTS_MOST_INPUTS = 32


@register_notrace_module
class NarrowConv2d(nn.Module):
    """``nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=bias)`` (groups 1, zero
    padding), plus the residual given to forward (if any), then ``clamp(clamp_min, clamp_max)`` where either is set,
    by ``fxeff.ops.narrow_conv2d``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, clamp_min: Optional[float] = None, clamp_max: Optional[float] = None,
                 device=None, dtype=None):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = tuple(pair("kernel_size", "nn.NarrowConv2d", kernel_size))
        self.stride = tuple(pair("stride", "nn.NarrowConv2d", stride))
        self.padding = tuple(pair("padding", "nn.NarrowConv2d", padding))
        self.dilation = tuple(pair("dilation", "nn.NarrowConv2d", dilation))
        self.clamp_min, self.clamp_max = clamp_min, clamp_max
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        # nn.Conv2d's initialisation
        reference = nn.Conv2d(in_channels, out_channels, self.kernel_size, bias=bias, **factory)
        with torch.no_grad():
            self.weight.copy_(reference.weight)
            if bias:
                self.bias.copy_(reference.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, clamp_min: Optional[float] = None,
                  clamp_max: Optional[float] = None) -> "NarrowConv2d":
        """The same conv (its own parameters, shared, not copied), with the clamp."""
        if not convertible(conv):
            raise ValueError(f"fxeff.nn.NarrowConv2d.from_conv: needs a Conv2d with groups 1, zero padding given as "
                             f"ints, got {conv}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_channels, new.out_channels = conv.in_channels, conv.out_channels
        new.kernel_size, new.stride = tuple(conv.kernel_size), tuple(conv.stride)
        new.padding, new.dilation = tuple(conv.padding), tuple(conv.dilation)
        new.clamp_min, new.clamp_max = clamp_min, clamp_max
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        return new

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The conv of ``x``, plus ``residual`` (the output's shape) where given, then the clamp."""
        return ops.narrow_conv2d(x, self.weight, self.bias, list(self.stride), list(self.padding),
                                 list(self.dilation), self.clamp_min, self.clamp_max, residual)

    def extra_repr(self) -> str:
        clamp = "" if self.clamp_min is None and self.clamp_max is None else \
            f", clamp=({self.clamp_min}, {self.clamp_max})"
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}{clamp}")


def convertible(conv: nn.Module) -> bool:
    """Whether ``conv`` is an nn.Conv2d that NarrowConv2d computes: groups 1, zero padding given as ints."""
    return (type(conv) is nn.Conv2d and conv.groups == 1 and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


def gains(conv: nn.Module) -> bool:
    """Whether ``conv`` runs faster as a NarrowConv2d on this CPU (float32; the measurements above): convertible,
    a CPU with AVX-512, and at stride 1 with same-width padding: fewer than 16 outputs, or at most 32 outputs from
    at most 64 inputs, or fewer than 16 inputs to at most 64 outputs; at larger strides: a 1x1 conv without padding
    with at most 128 inputs and 256 outputs, or fewer than 16 outputs from at most 32 inputs."""
    if not convertible(conv) or not ops.direct_strategy_available():
        return False
    i, o = conv.in_channels, conv.out_channels
    if tuple(conv.stride) == (1, 1):
        same_width = 2 * conv.padding[1] == conv.dilation[1] * (conv.kernel_size[1] - 1)
        return same_width and (o < FEW or (i <= STRIDE_1_MOST[0] and o <= STRIDE_1_MOST[1])
                               or (i < FEW and o <= FEW_INPUTS_MOST_OUTPUTS))
    if tuple(conv.kernel_size) == (1, 1) and tuple(conv.padding) == (0, 0):
        return i <= STRIDED_1X1_MOST[0] and o <= STRIDED_1X1_MOST[1]
    return o < FEW and i <= STRIDED_FEW_OUTPUTS_MOST_INPUTS


def narrow_convs(gm: torch.fx.GraphModule, example_inputs: Optional[tuple] = None) -> int:
    """Puts a NarrowConv2d in place of each nn.Conv2d of ``gm`` that ``gains``, in place. Where the conv's only
    reader adds a value of its shape to it (a residual block's last conv: needs ``example_inputs``, which ShapeProp
    runs ``gm`` on, to know the shapes), the add is fused as the residual; an activation that is a clamp (ReLU,
    ReLU6, Hardtanh, clamp) and then the only reader is fused as the clamp. A conv module that the graph calls at several places is left as it is. Returns the
    number of convs replaced. The parameters are the conv's own (shared), so state dicts keep their keys. The add
    and the activation are found as the passes find a conv's epilogue (``fxeff.passes.rewrite.residual_add_after``,
    ``clamp_after``)."""
    from ..passes.rewrite import clamp_after, residual_add_after

    if example_inputs is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        with torch.no_grad():  # a clone: a graph may write its input in place (an in-place ReLU at its entry)
            ShapeProp(gm).propagate(*(t.clone() if isinstance(t, torch.Tensor) else t for t in example_inputs))
    calls: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    count = 0
    for node in list(gm.graph.nodes):
        # a conv module called at several places stays: a fused add or clamp would apply at every one
        if node.op != "call_module" or calls[node.target] > 1 or not gains(gm.get_submodule(node.target)):
            continue
        conv = gm.get_submodule(node.target)
        tail, residual = node, None  # the last node the narrow conv's call stands for
        add = residual_add_after(node)
        if add is not None:
            tail, residual = add
        activation = clamp_after(gm, tail)
        narrow = NarrowConv2d.from_conv(conv, *(activation[1:] if activation is not None else (None, None)))
        owner, _, leaf = node.target.rpartition(".")
        setattr(gm.get_submodule(owner) if owner else gm, leaf, narrow)
        clamp = activation is not None
        last = activation[0] if clamp else tail
        if residual is not None or clamp:
            with gm.graph.inserting_after(last):
                fused = gm.graph.call_module(node.target, (node.args[0], residual) if residual is not None
                                             else (node.args[0],))
            fused.meta = dict(last.meta)
            last.replace_all_uses_with(fused)
            for gone in ([last] if last is not tail else []) + ([tail] if tail is not node else []) + [node]:
                gm.graph.erase_node(gone)
        count += 1
    if count:
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return count


__all__ = ["NarrowConv2d", "narrow_convs", "gains", "convertible"]
