"""Region execution's runtime: tile plans, gathers, scatters and global means, in plain ATen ops.

A focused model in region execution (``fxeff.passes.Focus(execution="region")``) runs each stretch of spatially
local layers on a *tile batch* instead of whole maps. The grid of a region's output is cut into tiles of side T;
the tiles that hold an active AoI pixel of an image form the batch [B, C, T + 2m, T + 2m], where m (the margin)
is the halo the remaining layers of the region still need. The functions here move data between whole maps and
tile batches; the layers themselves run as ordinary torch ops on the tile batch (convs as
``fxeff::tile_conv2d``). They are graph leaves (``torch.fx.wrap``) whose bodies are ATen ops, so dynamo, inductor,
torch.export, AOTInductor and torch.jit.trace all see through them; the tile count B is data-dependent (an
unbacked size under export).

A *plan* is an int64 tensor [3, B]: per active tile, its image, tile row and tile column.
"""
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F


def tiles_along(size: int, tile: int) -> int:
    """How many tiles of side ``tile`` cover ``size`` pixels (the last one may stick out)."""
    return -(-size // tile)


@torch.fx.wrap
def region_plan(mask: torch.Tensor, tile: int) -> torch.Tensor:
    """int64 [3, B]: (image, tile row, tile col) of each tile of side ``tile`` holding a True pixel of ``mask``
    (bool [N, H, W]), in row-major order per image; B >= 1."""
    n, h, w = mask.shape
    nh, nw = tiles_along(h, tile), tiles_along(w, tile)
    padded = F.pad(mask, [0, nw * tile - w, 0, nh * tile - h]) if (nh * tile != h or nw * tile != w) else mask
    active = padded.view(n, nh, tile, nw, tile).any(dim=4).any(dim=2)
    # at least one tile: with none active, image 0's first tile (all outside the AoI, so what it computes is
    # replaced by the fill at the scatter and counts 0 in a mean). Ops on the tile batch (batch_norm's
    # decomposition) may then assume a non-empty batch, as export and inductor need to know.
    first = torch.zeros_like(active)
    first[0, 0, 0] = True
    plan = (active | (first & ~active.any())).nonzero().t()
    if not torch.jit.is_tracing():
        torch._check(plan.shape[1] > 0)
    return plan


@torch.fx.wrap
def region_gather(x: torch.Tensor, plan: torch.Tensor, grid: List[int], tile: int, margin: int,
                  stride: Sequence[int] = (1, 1), extent: Sequence[int] = (1, 1),
                  padding: Sequence[int] = (0, 0)) -> torch.Tensor:
    """The tile batch [B, C, h, w] of ``x`` [N, C, H, W] that an op needs to produce the plan's output tiles of side
    ``tile`` plus ``margin`` on each side, on an output grid ``grid`` [Ho, Wo].

    The op reads ``x`` with ``stride``, ``padding`` and a window ``extent`` (dilation * (kernel - 1) + 1), as a conv
    does; the defaults (1, 1, 0) gather ``x`` itself on its own grid. Positions outside ``x`` read 0 (a conv's zero
    padding). h = (tile + 2 margin - 1) * stride + extent.
    """
    pads: List[int] = []
    sizes, steps = [], []
    for dim in (1, 0):  # F.pad takes the last dim first
        s, e, p = int(stride[dim]), int(extent[dim]), int(padding[dim])
        size = (tile + 2 * margin - 1) * s + e
        step = tile * s
        before = margin * s + p
        after = (tiles_along(grid[dim], tile) - 1) * step + size - before - x.shape[2 + dim]
        pads += [before, after]
        sizes.insert(0, size)
        steps.insert(0, step)
    windows = F.pad(x, pads).unfold(2, sizes[0], steps[0]).unfold(3, sizes[1], steps[1])  # [N, C, nh, nw, h, w]
    return windows[plan[0], :, plan[1], plan[2]]


@torch.fx.wrap
def region_inside(plan: torch.Tensor, like: torch.Tensor, grid: List[int], tile: int, margin: int) -> torch.Tensor:
    """[B, 1, tile + 2 margin, ...] in ``like``'s dtype: 1 at tile positions inside the image, 0 outside (the halo
    beyond the border, and what sticks out of the last tiles). Multiplying a tile batch by it before a conv makes
    the conv read zeros there, as its padding reads."""
    ones = torch.ones(1, 1, grid[0], grid[1], dtype=like.dtype, device=like.device)
    at_image_0 = torch.stack([torch.zeros_like(plan[0]), plan[1], plan[2]])
    return region_gather(ones, at_image_0, grid, tile, margin)


@torch.fx.wrap
def region_crop(tiles: torch.Tensor, by: int) -> torch.Tensor:
    """The tiles without ``by`` pixels on each side (a smaller margin)."""
    if by == 0:
        return tiles
    return tiles[:, :, by:tiles.shape[2] - by, by:tiles.shape[3] - by]


@torch.fx.wrap
def region_per_image(x: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
    """Rows of a per-image tensor ``x`` [N, ...] (such as a squeeze-excitation scale [N, C, 1, 1]) for each tile."""
    return x.index_select(0, plan[0])


def _fill_view(fill: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    return None if fill is None else fill.to(like.dtype).view(1, -1, 1, 1)


def _centres(tiles: torch.Tensor, plan: torch.Tensor, mask: torch.Tensor, tile: int, margin: int,
             fill: Optional[torch.Tensor]) -> torch.Tensor:
    """The tiles' centres [B, C, tile, tile], holding the fill at pixels outside the AoI."""
    centre = region_crop(tiles, margin)
    n, h, w = mask.shape
    active = region_gather(mask.unsqueeze(1), plan, [h, w], tile, 0)  # [B, 1, tile, tile], False beyond the image
    value = _fill_view(fill, tiles)
    return centre * active if value is None else torch.where(active, centre, value)


@torch.fx.wrap
def region_scatter(tiles: torch.Tensor, plan: torch.Tensor, mask: torch.Tensor, tile: int, margin: int,
                   fill: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The whole map [N, C, H, W] of a tile batch: the tiles' centres where ``mask`` (bool [N, H, W]) is True, the
    fill elsewhere (per channel, ``fill`` [C]; None: 0). The map has the tiles' memory format."""
    n, h, w = mask.shape
    c = tiles.shape[1]
    nh, nw = tiles_along(h, tile), tiles_along(w, tile)
    centre = _centres(tiles, plan, mask, tile, margin, fill)
    channels_last = tiles.shape[1] > 1 and tiles.is_contiguous(memory_format=torch.channels_last)
    value = _fill_view(fill, tiles)
    if value is None:
        out = (tiles.new_zeros(n, nh * tile, nw * tile, c).permute(0, 3, 1, 2) if channels_last else
               tiles.new_zeros(n, c, nh * tile, nw * tile))
    else:
        out = value.expand(n, c, nh * tile, nw * tile).clone(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    out.view(n, c, nh, tile, nw, tile).permute(0, 2, 4, 1, 3, 5)[plan[0], plan[1], plan[2]] = centre
    if nh * tile != h or nw * tile != w:
        out = out[:, :, :h, :w]
    return out


@torch.fx.wrap
def region_mean(tiles: torch.Tensor, plan: torch.Tensor, mask: torch.Tensor, tile: int, margin: int,
                fill: Optional[torch.Tensor] = None, keepdim: bool = True) -> torch.Tensor:
    """The spatial mean [N, C, 1, 1] (or [N, C]) of the map ``region_scatter`` would make, without making it: the
    AoI pixels' sum over the tiles plus the fill times the pixels outside the AoI, over H x W. Exact: the same map,
    summed in a different order."""
    n, h, w = mask.shape
    c = tiles.shape[1]
    inside = _centres(tiles, plan, mask, tile, margin, None)  # 0 outside the AoI
    sums = torch.zeros(n, c, dtype=torch.float32, device=tiles.device)
    sums = sums.index_add(0, plan[0], inside.sum(dim=(2, 3), dtype=torch.float32))
    if fill is not None:
        outside = (h * w - mask.sum(dim=(1, 2))).to(torch.float32)
        sums = sums + outside.unsqueeze(1) * fill.to(torch.float32).unsqueeze(0)
    mean = (sums / (h * w)).to(tiles.dtype)
    return mean.view(n, c, 1, 1) if keepdim else mean


__all__ = ["region_plan", "region_gather", "region_inside", "region_crop", "region_per_image", "region_scatter",
           "region_mean", "tiles_along"]
