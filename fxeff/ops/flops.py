"""torch.utils.flop_counter formulas for fxeff's ops, so FlopCounterMode counts what they really compute.

A FLOP here is what FlopCounterMode counts for aten.convolution: 2 per multiply-accumulate.
"""
import torch
from torch.utils import flop_counter

from .focused_conv2d import conv_output_size

_registered = False


def _focused_conv2d_flops(x, weight, bias, mask, stride, padding, dilation, groups, fill=None, clamp_min=None,
                          clamp_max=None, residual=None, out_val=None, **kwargs) -> int:
    # Only active outputs are computed (the kernel may compute a few more inside tiles; those are overhead,
    # not work the model asks for, and benchmarks show their cost).
    o, cg, kh, kw = weight.shape
    return 2 * int(mask.count_nonzero()) * o * cg * kh * kw


def _focused_conv2d_backward_flops(grad_out, x, weight, mask, stride, padding, dilation, groups, out_val=None,
                                   **kwargs) -> int:
    # The backward runs the vendor conv backward on the masked gradient: input and weight gradients, dense.
    return flop_counter.conv_backward_flop(tuple(grad_out.shape), tuple(x.shape), tuple(weight.shape), None, stride,
                                           padding, dilation, False, [0, 0], groups, [True, True, False])


def _hetconv2d_flops(x, weight_kxk, weight_1x1, bias, part, stride, padding, dilation, out_val=None, **kwargs) -> int:
    # Per output: the own block's KxK taps (M/P * K * K) and the centre tap on the other M - M/P channels.
    n, mb, kh, kw = weight_kxk.shape
    ho = conv_output_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
    wo = conv_output_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
    return 2 * x.shape[0] * n * ho * wo * (mb * kh * kw + weight_1x1.shape[1])


def _tile_conv2d_flops(tiles, weight, bias, stride, dilation, groups, out_val=None, **kwargs) -> int:
    # The conv on every tile (halo included: that is work the tile batch really does).
    return flop_counter.conv_flop_count(list(tiles.shape), list(weight.shape), list(out_val.shape), False)


def _narrow_conv2d_flops(x, weight, bias, stride, padding, dilation, clamp_min=None, clamp_max=None, residual=None,
                         out_val=None, **kwargs) -> int:
    return flop_counter.conv_flop_count(list(x.shape), list(weight.shape), list(out_val.shape), False)


def _shift_conv1x1_flops(x, shifts, padding, mode, pad, pool, scale, offset, clamp_min, clamp_max, weight, bias,
                         out_val=None, **kwargs) -> int:
    # The 1x1 conv on the shifted (and pooled) map: the shift is free, as in fxeff.ops.shift.
    o = out_val.shape
    return flop_counter.conv_flop_count([o[0], x.shape[1], o[2], o[3]], list(weight.shape), list(o), False)


def _zero_flops(*args, **kwargs) -> int:
    return 0


def register() -> None:
    """Registers the formulas once (torch refuses duplicate registrations)."""
    global _registered
    if _registered:
        return
    ops = torch.ops.fxeff
    flop_counter.register_flop_formula(ops.focused_conv2d, get_raw=True)(_focused_conv2d_flops)
    flop_counter.register_flop_formula(ops.focused_conv2d_backward, get_raw=True)(_focused_conv2d_backward_flops)
    flop_counter.register_flop_formula(ops.hetconv2d, get_raw=True)(_hetconv2d_flops)
    flop_counter.register_flop_formula(ops.tile_conv2d, get_raw=True)(_tile_conv2d_flops)
    flop_counter.register_flop_formula(ops.narrow_conv2d, get_raw=True)(_narrow_conv2d_flops)
    flop_counter.register_flop_formula(ops.shift_conv1x1, get_raw=True)(_shift_conv1x1_flops)
    flop_counter.register_flop_formula([ops.aoi_mask, ops.mask_resize, ops.shift, ops.shift_pool, ops.shift_input_grad,
                                          ops.shift_shifts_grad], get_raw=True)(_zero_flops)
    _registered = True


register()
