"""aoi_mask: the Area of Interest of each image, thresholded from early-layer activations."""
import torch
import torch.nn.functional as F


@torch.fx.wrap
def aoi_mask(x: torch.Tensor, threshold: float, reduce: str = "sum") -> torch.Tensor:
    """bool [N, H, W]: ``reduce(x, dim=1) >= threshold`` per image ("sum" as in the focusedconv seed, or "mean")."""
    return torch.ops.fxeff.aoi_mask(x, float(threshold), reduce)


@torch.library.register_fake("fxeff::aoi_mask")
def _aoi_mask_fake(x, threshold, reduce="sum"):
    torch._check(x.dim() == 4, lambda: f"fxeff.aoi_mask: x must be 4-D [N, C, H, W], got {x.dim()}-D")
    return x.new_empty((x.shape[0], x.shape[2], x.shape[3]), dtype=torch.bool)


def _window_any(mask: torch.Tensor, dim: int, k: int) -> torch.Tensor:
    """OR over every window of ``k`` along ``dim`` (length L -> L - k + 1), by doubling: about log2(k) + 1 ORs."""
    span, cur = 1, mask
    while 2 * span <= k:
        cur = cur.narrow(dim, 0, cur.shape[dim] - span) | cur.narrow(dim, span, cur.shape[dim] - span)
        span *= 2
    if span == k:
        return cur
    out = mask.shape[dim] - k + 1
    return cur.narrow(dim, 0, out) | cur.narrow(dim, k - span, out)


@torch.fx.wrap
def dilate_mask(mask: torch.Tensor, halo: int) -> torch.Tensor:
    """bool [N, H, W]: ``mask`` grown by ``halo`` pixels (a (2 halo + 1)^2 max filter, clipped at the borders).

    Separable ORs of shifted views of the zero-padded mask: at 16x64x64 it takes ~70 us where a float max_pool2d
    took ~900 us (docs/benchmarks.md). A graph leaf made of ATen ops, so every graph kind and deployment form
    sees through it."""
    if halo == 0:
        return mask
    k = 2 * halo + 1
    return _window_any(_window_any(F.pad(mask, [halo, halo, halo, halo]), 2, k), 1, k)
