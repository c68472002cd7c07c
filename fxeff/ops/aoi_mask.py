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


@torch.fx.wrap
def dilate_mask(mask: torch.Tensor, halo: int) -> torch.Tensor:
    """bool [N, H, W]: ``mask`` grown by ``halo`` pixels (a (2 halo + 1)^2 max filter, clipped at the borders).

    The op fxeff::dilate_mask (halo 0 returns ``mask`` itself): on CPU a separable byte kernel (~23 us at 16x64x64,
    2 threads, where ORs of shifted views of the padded mask took ~74 us and a float max_pool2d ~900 us), elsewhere
    those ORs.
    """
    if isinstance(halo, bool) or not isinstance(halo, int) or halo < 0:
        raise ValueError(f"fxeff.dilate_mask: halo must be an int >= 0, got {halo!r}")
    if halo == 0:
        return mask
    return torch.ops.fxeff.dilate_mask(mask, halo)


@torch.library.register_fake("fxeff::dilate_mask")
def _dilate_mask_fake(mask, halo):
    torch._check(mask.dim() == 3 and mask.dtype == torch.bool,
                 lambda: f"fxeff.dilate_mask: mask must be bool [N, H, W], got {mask.dim()}-D {mask.dtype}")
    return torch.empty_like(mask, memory_format=torch.contiguous_format)
