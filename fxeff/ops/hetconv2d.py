"""hetconv2d: HetConv (REFERENCE.md section 3), a KxK conv whose filters keep KxK taps on M/P channels only.

Contract: hetconv2d(x, weight_kxk, weight_1x1, bias, part, stride, padding, dilation) ==
F.conv2d(x, hetconv_dense_weight(weight_kxk, weight_1x1, part), bias, stride, padding, dilation) for x
[B, M, H, W]: filter j (of N) keeps its KxK taps on the contiguous channel block g = j * part // N of size M/part
(``weight_kxk`` [N, M/part, K, K], centre tap included) and only the centre tap on the other M - M/part channels
(``weight_1x1`` [N, M - M/part], in channel order with its own block removed). The weights are stored compactly:
structurally absent taps have no storage and get no gradient. K odd; stride, padding, dilation as F.conv2d;
groups 1. Gradients flow to x, both weights and bias. The output keeps x's memory format.
"""
from typing import Optional

import torch

from ._utils import IntPair, memory_format_of, pair
from .focused_conv2d import conv_output_size


@torch.fx.wrap
def hetconv2d(x: torch.Tensor, weight_kxk: torch.Tensor, weight_1x1: torch.Tensor, bias: Optional[torch.Tensor] = None,
              part: Optional[int] = None, stride: IntPair = 1, padding: IntPair = 0,
              dilation: IntPair = 1) -> torch.Tensor:
    """HetConv with part P: F.conv2d with the dense kernel ``hetconv_dense_weight(weight_kxk, weight_1x1, part)``.

    ``part`` defaults to M / weight_kxk.shape[1] (the only value the shapes allow).
    """
    if part is None:
        part = x.shape[1] // weight_kxk.shape[1] if weight_kxk.dim() == 4 and weight_kxk.shape[1] > 0 else 0
    return torch.ops.fxeff.hetconv2d(x, weight_kxk, weight_1x1, bias, part, pair("stride", "hetconv2d", stride),
                                     pair("padding", "hetconv2d", padding), pair("dilation", "hetconv2d", dilation))


def block_columns(n_filters: int, channels: int, part: int, device) -> tuple:
    """Column indices into [N, M]: each filter's own block [N, M/P] and the other channels [N, M - M/P], in order."""
    mb, ob = channels // part, n_filters // part
    block = (torch.arange(n_filters, device=device) // ob).unsqueeze(1)
    own = block * mb + torch.arange(mb, device=device)
    rest = torch.arange(channels - mb, device=device).unsqueeze(0)
    other = rest + mb * (rest >= block * mb).long()
    return own, other


def _check_weights(weight_kxk: torch.Tensor, weight_1x1: torch.Tensor, part: int) -> None:
    if part < 1:
        raise ValueError(f"fxeff.hetconv_dense_weight: part must be >= 1, got {part}")
    if weight_kxk.dim() != 4 or weight_kxk.shape[2] != weight_kxk.shape[3] or weight_kxk.shape[2] % 2 == 0:
        raise ValueError(f"fxeff.hetconv_dense_weight: weight_kxk must be [N, M/part, K, K] with K odd, got "
                         f"{list(weight_kxk.shape)}")
    n, mb = weight_kxk.shape[:2]
    if n % part != 0:
        raise ValueError(f"fxeff.hetconv_dense_weight: part must divide the filters, got part={part} with {n} filters")
    if list(weight_1x1.shape) != [n, mb * (part - 1)]:
        raise ValueError(f"fxeff.hetconv_dense_weight: weight_1x1 must be [N, M - M/part] = [{n}, {mb * (part - 1)}], "
                         f"got {list(weight_1x1.shape)}")


def hetconv_centre_matrix(weight_kxk: torch.Tensor, weight_1x1: torch.Tensor, part: int) -> torch.Tensor:
    """The centre taps of the dense kernel as [N, M] (differentiable in both weights)."""
    n, mb, k, _ = weight_kxk.shape
    m = mb * part
    own, other = block_columns(n, m, part, weight_kxk.device)
    centre = weight_kxk[:, :, k // 2, k // 2]
    wc = weight_kxk.new_zeros((n, m))
    return wc.scatter(1, other, weight_1x1).scatter(1, own, centre)


def hetconv_dense_weight(weight_kxk: torch.Tensor, weight_1x1: torch.Tensor, part: int) -> torch.Tensor:
    """The equivalent dense F.conv2d kernel [N, M, K, K] (zeros at the absent taps; differentiable)."""
    _check_weights(weight_kxk, weight_1x1, part)
    n, mb, k, _ = weight_kxk.shape
    m = mb * part
    own, _ = block_columns(n, m, part, weight_kxk.device)
    c = k // 2
    off = weight_kxk.clone()
    off[:, :, c, c] = 0
    dense = weight_kxk.new_zeros((n, m, k * k)).scatter(1, own.unsqueeze(2).expand(n, mb, k * k),
                                                        off.reshape(n, mb, k * k))
    dense = dense.view(n, m, k, k).clone()
    dense[:, :, c, c] = hetconv_centre_matrix(weight_kxk, weight_1x1, part)
    return dense


@torch.library.register_fake("fxeff::hetconv2d")
def _hetconv2d_fake(x, weight_kxk, weight_1x1, bias, part, stride, padding, dilation):
    torch._check(x.dim() == 4, lambda: f"fxeff.hetconv2d: x must be 4-D [N, M, H, W], got {x.dim()}-D")
    torch._check(part >= 1, lambda: f"fxeff.hetconv2d: part must be >= 1, got {part}")
    torch._check(weight_kxk.dim() == 4, lambda: f"fxeff.hetconv2d: weight_kxk must be 4-D [N, M/part, K, K], got "
                                                f"{weight_kxk.dim()}-D")
    m = x.shape[1]
    n, mb, k, _ = weight_kxk.shape
    torch._check(mb * part == m and weight_kxk.shape[3] == k and k % 2 == 1,
                 lambda: f"fxeff.hetconv2d: weight_kxk must be [N, M/part, K, K] with K odd for {m} input channels "
                         f"and part={part}, got {list(weight_kxk.shape)}")
    torch._check(weight_1x1.dim() == 2 and weight_1x1.shape[0] == n and weight_1x1.shape[1] == m - mb,
                 lambda: f"fxeff.hetconv2d: weight_1x1 must be [{n}, {m - mb}], got {list(weight_1x1.shape)}")
    ho = conv_output_size(x.shape[2], k, stride[0], padding[0], dilation[0])
    wo = conv_output_size(x.shape[3], k, stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], n, ho, wo)).contiguous(memory_format=memory_format_of(x))


def _setup_context(ctx, inputs, output):
    x, weight_kxk, weight_1x1, bias, part, stride, padding, dilation = inputs
    ctx.save_for_backward(x, weight_kxk, weight_1x1)
    ctx.conv_args = (part, stride, padding, dilation)
    ctx.has_bias = bias is not None


def _centre_view(x: torch.Tensor, k: int, padding, dilation):
    """x cropped (or zero-padded) so that a 1x1 conv with stride s and the returned padding reads each output's
    centre tap; and the padding to undo the crop on the gradient."""
    crop = []
    conv_pad = []
    for d in range(2):
        p = padding[d] - dilation[d] * (k // 2)  # the 1x1 conv's padding; < 0 means cropping
        crop.append(max(0, -p))
        conv_pad.append(max(0, p))
    if crop[0] or crop[1]:
        x = x[:, :, crop[0]:x.shape[2] - crop[0], crop[1]:x.shape[3] - crop[1]]
    return x, conv_pad, crop


def _backward(ctx, grad_out):
    """Correctness first: the vendor conv backward of the two pieces (a 1x1 conv on the centre samples with the
    centre matrix, and the grouped KxK conv with the centre taps zeroed), weight gradients scattered back to the
    compact weights."""
    x, weight_kxk, weight_1x1 = ctx.saved_tensors
    part, stride, padding, dilation = ctx.conv_args
    n, mb, k, _ = weight_kxk.shape
    c = k // 2
    need_x, need_wk, need_w1 = ctx.needs_input_grad[:3]
    need_b = ctx.has_bias and ctx.needs_input_grad[3]
    grad_out = grad_out.contiguous(memory_format=memory_format_of(x))
    grad_x = grad_wk = grad_w1 = grad_b = None
    conv_bw = torch.ops.aten.convolution_backward.default
    # Piece 1: 1x1 conv with the centre matrix.
    wc = hetconv_centre_matrix(weight_kxk, weight_1x1, part).unsqueeze(-1).unsqueeze(-1)
    xcv, conv_pad, crop = _centre_view(x, k, padding, dilation)
    gx1, gwc, _ = conv_bw(grad_out, xcv, wc, None, stride, conv_pad, [1, 1], False, [0, 0], 1,
                          [need_x, need_wk or need_w1, False])
    # Piece 2: grouped KxK conv (groups = part) with the centre taps zeroed.
    if k > 1:
        w_off = weight_kxk.clone()
        w_off[:, :, c, c] = 0
        gx2, gwk, _ = conv_bw(grad_out, x, w_off, None, stride, padding, dilation, False, [0, 0], part,
                              [need_x, need_wk, False])
    else:
        gx2, gwk = None, (torch.zeros_like(weight_kxk) if need_wk else None)
    if need_x:
        if crop[0] or crop[1]:
            gx1 = torch.nn.functional.pad(gx1, (crop[1], crop[1], crop[0], crop[0]))
        grad_x = gx1 if gx2 is None else gx1 + gx2
        grad_x = grad_x.contiguous(memory_format=memory_format_of(x))
    if need_wk or need_w1:
        gwc = gwc.reshape(n, mb * part)
        own, other = block_columns(n, mb * part, part, x.device)
        if need_wk:
            grad_wk = gwk.clone()
            grad_wk[:, :, c, c] = gwc.gather(1, own)
        if need_w1:
            grad_w1 = gwc.gather(1, other)
    if need_b:
        grad_b = grad_out.sum((0, 2, 3))
    return grad_x, grad_wk, grad_w1, grad_b, None, None, None, None


torch.library.register_autograd("fxeff::hetconv2d", _backward, setup_context=_setup_context)
