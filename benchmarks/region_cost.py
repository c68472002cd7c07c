"""Cost model for issue 13's region execution, measured before it is built: gather tiles once, run a run of
layers on the tile batch with the vendor ops, scatter once (SBNet / SegBlocks / DynConv).

For a region of two 3x3 convs + ReLU (a VGG or ResNet stage; halo 2 at the output grid) and for a
1x1 - depthwise 3x3 - 1x1 inverted residual (MobileNet; halo 1), at a 25% AoI (one square blob, or 16
scattered blobs) this times, side by side, medians of --runs:

- dense: the region on the whole map (F.conv2d, vendor);
- region: gather the active output tiles of side T with their halo from the zero-padded input (one index of
  an unfold view), run the same ops without padding on the tile batch (positions outside the image reset to
  zero before each conv, as the conv's padding reads them), scatter the tiles' valid centres into a zero map;
- its parts: gather alone, the ops on the tile batch alone, scatter alone.

MAC ratio = MACs the tile batch computes (halo overlap included) / dense MACs. Efficiency = speedup / (1 / MAC
ratio). Pure PyTorch, no fxeff op: the numbers say which tile sizes and regions can pay before kernels exist.

    .venv/bin/python benchmarks/region_cost.py [--tiles 8,16,32] [--batch 1,8] [--runs 15] [--markdown out.md]
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fxeff.bench import interleaved, report, script_parser, write_markdown  # noqa: E402

COLUMNS = ["region", "input", "AoI", "T", "tiles", "MAC ratio", "dense ms", "region ms", "speedup", "efficiency",
           "gather ms", "ops ms", "scatter ms"]


def blob_mask(n, h, w, fraction, blobs, generator):
    """bool [n, h, w]: ``blobs`` squares covering about ``fraction`` of each image, placed at random."""
    mask = torch.zeros(n, h, w, dtype=torch.bool)
    side = max(1, round((fraction * h * w / blobs) ** 0.5))
    for i in range(n):
        for _ in range(blobs):
            y = int(torch.randint(0, h - side + 1, (1,), generator=generator))
            x = int(torch.randint(0, w - side + 1, (1,), generator=generator))
            mask[i, y:y + side, x:x + side] = True
    return mask


class Region:
    """A run of layers with its halo: ``ops(t, inside)`` applies them without padding to a tile batch."""

    def __init__(self, name, channels, kind, generator):
        self.name, self.kind = name, kind
        c = channels
        if kind == "conv-conv":
            self.w = [torch.randn(c, c, 3, 3, generator=generator) * 0.05 for _ in range(2)]
            self.halo = 2
        else:  # inverted residual: 1x1 expand x4, depthwise 3x3, 1x1 project
            self.w = [torch.randn(4 * c, c, 1, 1, generator=generator) * 0.1,
                      torch.randn(4 * c, 1, 3, 3, generator=generator) * 0.1,
                      torch.randn(c, 4 * c, 1, 1, generator=generator) * 0.1]
            self.halo = 1

    def dense(self, x):
        if self.kind == "conv-conv":
            return F.relu(F.conv2d(F.relu(F.conv2d(x, self.w[0], padding=1)), self.w[1], padding=1))
        y = F.relu6(F.conv2d(x, self.w[0]))
        y = F.relu6(F.conv2d(y, self.w[1], padding=1, groups=self.w[1].shape[0]))
        return F.conv2d(y, self.w[2]) + x

    def tiles(self, t, inside):
        """The same ops on tiles [B, C, T + 2 halo, ...] without padding; ``inside`` [B, 1, ...] marks the pixels
        inside the image (outside, the conv's zero padding must be read, so values there are reset to 0)."""
        if self.kind == "conv-conv":
            y = F.relu(F.conv2d(t, self.w[0])) * inside[:, :, 1:-1, 1:-1]
            return F.relu(F.conv2d(y, self.w[1]))
        y = F.relu6(F.conv2d(t, self.w[0])) * inside
        y = F.relu6(F.conv2d(y, self.w[1], groups=self.w[1].shape[0]))
        return F.conv2d(y, self.w[2]) + t[:, :, 1:-1, 1:-1]


def tile_plan(mask, tile):
    """(image, row, col) index tensors of the output tiles of side ``tile`` that hold an active pixel."""
    n, h, w = mask.shape
    active = F.max_pool2d(mask[:, None].float(), tile, tile, ceil_mode=True)[:, 0] > 0
    return active.nonzero(as_tuple=True)


def region_run(region, x, index, tile):
    """gather -> ops -> scatter; returns (out, gather fn, ops fn, scatter fn) for timing the parts."""
    n, c, h, w = x.shape
    halo = region.halo
    nh, nw = -(-h // tile), -(-w // tile)
    ph, pw = nh * tile - h, nw * tile - w  # pad the map to whole tiles
    xp = F.pad(x, (halo, halo + pw, halo, halo + ph))
    inside = F.pad(torch.ones(1, 1, h, w), (halo, halo + pw, halo, halo + ph))
    side = tile + 2 * halo
    windows = xp.unfold(2, side, tile).unfold(3, side, tile)  # [n, c, nh, nw, side, side] (a view)
    inside_windows = inside.unfold(2, side, tile).unfold(3, side, tile)
    images, rows, cols = index

    def gather():
        return windows[images, :, rows, cols], inside_windows[images * 0, :, rows, cols]

    def scatter(t):
        out = x.new_zeros(n, c, nh * tile, nw * tile)
        out.view(n, c, nh, tile, nw, tile).permute(0, 2, 4, 1, 3, 5)[images, rows, cols] = t
        return out[:, :, :h, :w]

    t, ins = gather()
    y = region.tiles(t, ins)
    return scatter(y), gather, (lambda: region.tiles(t, ins)), (lambda: scatter(y))


def main():
    parser = script_parser(__doc__)
    parser.add_argument("--tiles", default="8,16,32")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--aoi", type=float, default=0.25)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    shapes = [("VGG16 stage 2: 2 x conv3x3 128ch", 128, 112, "conv-conv"),
              ("ResNet stage 1: 2 x conv3x3 64ch", 64, 56, "conv-conv"),
              ("MobileNetV2 block 24ch x4", 24, 56, "inverted")]
    rows = []
    with torch.no_grad():
        for name, c, size, kind in shapes:
            region = Region(name, c, kind, g)
            for batch in [int(b) for b in args.batch.split(",")]:
                x = torch.randn(batch, c, size, size, generator=g)
                for blobs in (1, 16):
                    mask = blob_mask(batch, size, size, args.aoi, blobs, g)
                    dense_out = region.dense(x)
                    for tile in [int(t) for t in args.tiles.split(",")]:
                        index = tile_plan(mask, tile)
                        out, gather, ops, scatter = region_run(region, x, index, tile)
                        inside = mask[:, None]
                        torch.testing.assert_close(out * inside, dense_out * inside, rtol=1e-4, atol=1e-4)
                        n_tiles = int(index[0].numel())
                        # MACs on the tile batch, each layer on its own output window (a conv's MACs per output
                        # pixel = its weight's numel): conv-conv (T+2)^2 then T^2; inverted (T+2)^2, T^2, T^2
                        per_pixel = [int(wt.numel()) for wt in region.w]
                        windows = [(tile + 2) ** 2, tile ** 2] if kind == "conv-conv" else \
                            [(tile + 2) ** 2, tile ** 2, tile ** 2]
                        tile_macs = n_tiles * sum(p * a for p, a in zip(per_pixel, windows))
                        dense_macs = batch * size * size * sum(per_pixel)
                        times = interleaved([lambda: region.dense(x), lambda: region_run(region, x, index, tile)[0],
                                             gather, ops, lambda: scatter()], args.runs)
                        ratio = tile_macs / dense_macs
                        speedup = times[0] / times[1]
                        rows.append({"region": name, "input": f"{batch}x{c}x{size}x{size}",
                                     "AoI": f"{float(mask.float().mean()):.2f} ({blobs} blob{'s' if blobs > 1 else ''})",
                                     "T": tile, "tiles": n_tiles, "MAC ratio": ratio, "dense ms": times[0] * 1e3,
                                     "region ms": times[1] * 1e3, "speedup": speedup, "efficiency": speedup * ratio,
                                     "gather ms": times[2] * 1e3, "ops ms": times[3] * 1e3,
                                     "scatter ms": times[4] * 1e3})
                        print(rows[-1], flush=True)
    text = report("Region execution cost model (pure PyTorch prototype, NCHW, float32)", rows, COLUMNS, args.json)
    write_markdown(args.markdown, text)


if __name__ == "__main__":
    main()
