"""aoi_mask: the Area of Interest of each image, thresholded from early-layer activations."""
import torch



@torch.fx.wrap
def aoi_mask(x: torch.Tensor, threshold: float, reduce: str = "sum") -> torch.Tensor:
    """bool [N, H, W]: ``reduce(x, dim=1) >= threshold`` per image ("sum" as in the focusedconv seed, or "mean")."""
    return torch.ops.fxeff.aoi_mask(x, float(threshold), reduce)


@torch.library.register_fake("fxeff::aoi_mask")
def _aoi_mask_fake(x, threshold, reduce="sum"):
    torch._check(x.dim() == 4, lambda: f"fxeff.aoi_mask: x must be 4-D [N, C, H, W], got {x.dim()}-D")
    return x.new_empty((x.shape[0], x.shape[2], x.shape[3]), dtype=torch.bool)
