"""mask_resize: carries an AoI mask to another layer's grid without losing active pixels."""
from typing import Sequence

import torch

from ._utils import pair


@torch.fx.wrap
def mask_resize(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """bool [N, *size]: "any active" within each cell when shrinking, nearest when growing (per dimension)."""
    return torch.ops.fxeff.mask_resize(mask, pair("size", "mask_resize", size))


@torch.library.register_fake("fxeff::mask_resize")
def _mask_resize_fake(mask, size):
    torch._check(mask.dim() == 3, lambda: f"fxeff.mask_resize: mask must be bool [N, H, W], got {mask.dim()}-D")
    return mask.new_empty((mask.shape[0], size[0], size[1]), dtype=torch.bool)
