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


def hetconv2d_pack_cache(limit_mb: Optional[float] = None, clear: bool = False) -> dict:
    """The CPU kernel's cache of packed weights (the channels-last direct strategy, float32 with AVX-512).

    An inference call packs a layer's weights into the kernel's order once and keeps them, keyed by the weight
    tensors (their storage, place, shape and version counter: an in-place update such as an optimiser step,
    ``load_state_dict`` or ``copy_`` packs again). A call that records for autograd packs per call. A change made
    through ``.data`` bypasses the version counter: call this with ``clear=True`` after one. ``limit_mb`` sets the
    byte limit (least recently used entries dropped beyond it; 0 turns the cache off; default 256, or the
    environment's ``FXEFF_HETCONV_PACK_CACHE_MB``). Returns ``{"entries", "bytes", "hits", "misses", "limit_mb"}``.
    """
    if limit_mb is not None and not limit_mb >= 0:
        raise ValueError(f"fxeff.ops.hetconv2d_pack_cache: limit_mb must be >= 0, got {limit_mb!r}")
    limit = -1 if limit_mb is None else int(limit_mb * 2 ** 20)
    entries, size, hits, misses, kept = torch.ops.fxeff._hetconv2d_pack_cache(limit, bool(clear))
    return {"entries": entries, "bytes": size, "hits": hits, "misses": misses, "limit_mb": kept / 2 ** 20}


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


# Autograd: csrc/ops/autograd.cpp (C++, so that inference never enters Python): the vendor conv backward of the
# 1x1 centre piece and of the grouped KxK piece, weight gradients gathered back into the compact weights.
