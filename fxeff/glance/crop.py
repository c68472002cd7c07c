"""Batched patch crops for glance and focus: one gather (exact pixels) or one grid_sample (differentiable in the
patch's place), never a per-sample Python loop (the seed, GFNet-Pytorch, crops sample by sample).

A patch's place is its corner in [0, 1]^2 (GFNet's action): (row, column) of its top-left pixel as a fraction of
(H - size, W - size), so 0 puts the patch at the top or left edge and 1 at the bottom or right one; a patch never
leaves the image.
"""
from typing import Tuple

import torch
import torch.nn.functional as F

_WHERE = "fxeff.glance.crop"


def _check(x: torch.Tensor, corners: torch.Tensor, size: int, where: str) -> Tuple[int, int]:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{where}: x must be a [N, C, H, W] tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{where}: size must be a positive int, got {size!r}")
    h, w = x.shape[-2:]
    if size > h or size > w:
        raise ValueError(f"{where}: the patch size {size} is larger than the image ({h}x{w})")
    if not isinstance(corners, torch.Tensor) or tuple(corners.shape) != (x.shape[0], 2):
        raise ValueError(f"{where}: corners must be a [N, 2] tensor (N = {x.shape[0]}: one (row, column) in [0, 1] "
                         f"per image), got {tuple(corners.shape) if isinstance(corners, torch.Tensor) else corners!r}")
    if not corners.is_floating_point():
        raise ValueError(f"{where}: corners must be floating point (fractions in [0, 1]), got {corners.dtype}")
    return h, w


def pixel_corners(corners: torch.Tensor, size: int, height: int, width: int) -> torch.Tensor:
    """The integer (top, left) of each patch: ``corners`` [N, 2] in [0, 1] times (H - size, W - size), rounded to
    the nearest pixel (halves to even, torch.round) and clamped into the image; int64 [N, 2]."""
    span = torch.tensor([height - size, width - size], dtype=corners.dtype, device=corners.device)
    top_left = torch.round(corners.detach() * span).long()
    return torch.minimum(top_left.clamp_min(0), span.long())


def crop(x: torch.Tensor, corners: torch.Tensor, size: int) -> torch.Tensor:
    """The ``size`` x ``size`` patch of each image of ``x`` [N, C, H, W] at ``corners`` [N, 2] (see the module
    docstring; rounded to whole pixels by ``pixel_corners``): [N, C, size, size], contiguous, x's dtype and device,
    exactly x's pixels. One gather over the flattened images. Not differentiable in ``corners``
    (``crop_bilinear`` is)."""
    h, w = _check(x, corners, size, _WHERE)
    n, c = x.shape[:2]
    top_left = pixel_corners(corners, size, h, w)
    steps = torch.arange(size, device=x.device)
    rows = top_left[:, 0:1] + steps  # [N, size]
    cols = top_left[:, 1:2] + steps
    index = (rows[:, :, None] * w + cols[:, None, :]).reshape(n, 1, size * size).expand(n, c, size * size)
    return x.reshape(n, c, h * w).gather(2, index).reshape(n, c, size, size)


def crop_bilinear(x: torch.Tensor, corners: torch.Tensor, size: int) -> torch.Tensor:
    """As ``crop``, with the patch at the continuous place ``corners`` (not rounded): bilinear interpolation by
    F.affine_grid + F.grid_sample, differentiable in ``x`` and ``corners`` (AdaFocusV2's crop, which lets a policy
    learn where to look from the classification loss). At whole-pixel places it samples pixel centres and equals
    ``crop`` to rounding."""
    h, w = _check(x, corners, size, f"{_WHERE}_bilinear")
    n = x.shape[0]
    dtype = x.dtype if x.is_floating_point() else torch.float32
    corners = corners.to(dtype)
    # output pixel j of a patch whose left edge is at pixel l samples input pixel l + j: normalised (align_corners
    # False) its centre is (2 (l + j) + 1) / W - 1 = (size / W) g_j + (2 l + size) / W - 1, g_j the output grid
    left = corners[:, 1] * (w - size)
    top = corners[:, 0] * (h - size)
    theta = torch.zeros(n, 2, 3, dtype=dtype, device=x.device)
    theta[:, 0, 0] = size / w
    theta[:, 1, 1] = size / h
    theta[:, 0, 2] = (2 * left + size) / w - 1
    theta[:, 1, 2] = (2 * top + size) / h - 1
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x.to(dtype), grid, mode="bilinear", padding_mode="border", align_corners=False)


__all__ = ["crop", "crop_bilinear", "pixel_corners"]
