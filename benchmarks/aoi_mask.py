"""The AoI mask chain that every focused model runs once per forward: the threshold (fxeff::aoi_mask), the halo
(fxeff.ops.dilate_mask) and one resize per grid (fxeff::mask_resize), beside the float max_pool2d halo that
dilate_mask replaced, and beside one dense 3x3 conv of the grid's size (what the chain must stay small against).

Shapes: the reference models' batch of 16 at 64x64 (halo 2, grids 32, 16, 8) and a 64-channel 112x112 split of a
224x224 photo (batch 1, halo 2, grids 56, 28, 14, 7). Medians of --runs interleaved runs.

    .venv/bin/python benchmarks/aoi_mask.py [--runs 50] [--threads 2] [--json out.json] [--markdown out.md]
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fxeff.bench import interleaved, report, script_parser, write_markdown  # noqa: E402

from fxeff.ops import aoi_mask, dilate_mask, mask_resize  # noqa: E402

COLUMNS = ["case", "threshold us", "halo us (dilate_mask)", "halo us (float max_pool2d)", "max_pool2d / dilate_mask",
           "resizes us", "chain us", "one 3x3 conv us (C=32 at the first grid)", "chain / conv"]
CASES = [("reference models: 16 x 1 x 64x64, halo 2", (16, 1, 64, 64), 2, (32, 16, 8)),
         ("photo split: 1 x 64 x 112x112, halo 2", (1, 64, 112, 112), 2, (56, 28, 14, 7))]


def max_pool_halo(mask: torch.Tensor, halo: int) -> torch.Tensor:
    """The halo as it was computed before dilate_mask: a (2 halo + 1)^2 max_pool2d of the mask as float."""
    k = 2 * halo + 1
    return F.max_pool2d(mask.unsqueeze(1).to(torch.float32), k, stride=1, padding=halo).squeeze(1) > 0


def chain(x: torch.Tensor, threshold: float, halo: int, grids) -> list:
    """What a focused graph computes once per forward: the mask, grown, at each grid."""
    grown = dilate_mask(aoi_mask(x, threshold, "sum"), halo)
    return [mask_resize(grown, [g, g]) for g in grids]


def main(argv=None):
    parser = script_parser(__doc__)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        for name, shape, halo, grids in CASES:
            x = torch.rand(shape, generator=gen)
            threshold = float(x.sum(1).quantile(0.8))  # about 20% of the pixels before the halo
            mask = aoi_mask(x, threshold, "sum")
            assert torch.equal(dilate_mask(mask, halo), max_pool_halo(mask, halo))
            grown = dilate_mask(mask, halo)
            conv_in = torch.randn(shape[0], 32, grids[0], grids[0], generator=gen)
            weight = torch.randn(32, 32, 3, 3, generator=gen)
            t = interleaved([lambda: aoi_mask(x, threshold, "sum"), lambda: dilate_mask(mask, halo),
                             lambda: max_pool_halo(mask, halo), lambda: [mask_resize(grown, [g, g]) for g in grids],
                             lambda: chain(x, threshold, halo, grids),
                             lambda: F.conv2d(conv_in, weight, padding=1)], args.runs)
            us = [v * 1e6 for v in t]
            rows.append({"case": name, "threshold us": us[0], "halo us (dilate_mask)": us[1],
                         "halo us (float max_pool2d)": us[2], "max_pool2d / dilate_mask": us[2] / us[1],
                         "resizes us": us[3], "chain us": us[4], "one 3x3 conv us (C=32 at the first grid)": us[5],
                         "chain / conv": us[4] / us[5]})
    text = report("The AoI mask chain (threshold, halo, resizes) per forward", rows, COLUMNS, args.json)
    write_markdown(args.markdown, text)


if __name__ == "__main__":
    main()
