"""Focus on the trained reference models (Cluttered Fashion-MNIST), per execution: latency against the original at
batch 16 and batch 1, MACs, and accuracy on test images; issue 13's home-ground targets (latency ratio <= 0.5 at
batch 16 and <= 0.7 at batch 1, accuracy drop <= 0.5 points).

The AoI is docs/accuracy.md's target row: every input pixel brighter than black, grown by 2 pixels, fill "mean",
no retraining. Each model is transformed on the first 64 training images (per execution: "layer", per-layer
focused convs; "region", tiles planned by the cost model; "auto", per grid whichever of tiles, per-layer or dense
is fastest, measured at transform time) and timed beside the original (medians of --runs interleaved runs).

Each model runs in every format of --formats (default NCHW and channels_last): the original and the focused model
both in that format (weights and inputs converted; fxeff's ops keep the format as ATen's convs do), so each latency
ratio compares like with like. On CPU channels_last is the faster format for both (oneDNN convs without reorders,
the direct strategy's implicit GEMM reads pixels in place).

With --profile it also prints, per model, where the time of a batch-16 forward goes (torch.profiler, self CPU time
per op over 20 forwards): the original and each execution; the numbers behind the gap analysis in docs/regions.md.

    .venv/bin/python benchmarks/focus_reference.py [--archs vgg,resnet20,mobilenetv2]
        [--executions layer,region,auto] [--formats nchw,channels_last] [--test-images 2000] [--runs 20] [--profile]
        [--json out.json]
        [--markdown out.md]
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fxeff.bench import interleaved, macs, report, script_parser, write_markdown  # noqa: E402

from fxeff import reference, training  # noqa: E402
from fxeff.data import BACKGROUND  # noqa: E402
from fxeff.demo import CALIBRATION_IMAGES, HOME_DATASET as DATASET, LATENCY_BATCH, home_focus  # noqa: E402
from fxeff.ops import aoi_mask  # noqa: E402
from fxeff.passes.focus import dilate_mask  # noqa: E402
from fxeff.transform import transform  # noqa: E402

COLUMNS = ["model", "format", "execution", "AoI", "MAC ratio", "latency ratio b16", "latency ratio b1", "acc. original",
           "acc. focused", "drop (points)", "transform s", "grids"]


def profile(title: str, model: torch.nn.Module, x: torch.Tensor, forwards: int = 20) -> None:
    """Prints the ops that take the most self CPU time over ``forwards`` no-grad forwards of ``model`` on ``x``."""
    with torch.no_grad():
        for _ in range(3):
            model(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(forwards):
                model(x)
    print(f"\n{title}: self CPU time of {forwards} forwards")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


def main(argv=None):
    parser = script_parser(__doc__)
    parser.add_argument("--archs", default=",".join(reference.ARCHS))
    parser.add_argument("--executions", default="layer,region,auto")
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--profile", action="store_true", help="also print where each forward's time goes")
    parser.add_argument("--formats", default="nchw,channels_last",
                        help="memory formats the original and the focused model both run in (comma list)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    calibration = reference.first_images(DATASET, "train", CALIBRATION_IMAGES)
    timing = reference.first_images(DATASET, "test", LATENCY_BATCH)
    # the AoI of the timing batch (the input split's: it is the same for every model and execution)
    aoi = float(dilate_mask(aoi_mask(timing, BACKGROUND, "sum"), 2).float().mean())
    loader = training.loader(reference.dataset(DATASET, "test", limit=args.test_images), 250, False)
    rows = []
    formats = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
    for arch, fmt in [(a, f) for a in args.archs.split(",") if a for f in args.formats.split(",") if f]:
        if fmt not in formats:
            raise SystemExit(f"focus_reference.py: --formats takes nchw and channels_last, got {fmt!r}")
        # Original and focused in the same format: the model's weights and the inputs converted (fxeff's ops keep
        # the format, as ATen's convs do).
        model = reference.load(arch, DATASET).to(memory_format=formats[fmt])
        timing_f = timing.contiguous(memory_format=formats[fmt])
        accuracy = training.accuracy(model, loader)
        if args.profile:
            profile(f"{arch} original ({fmt})", model, timing_f)
        for execution in [e for e in args.executions.split(",") if e]:
            start = time.perf_counter()
            focused = transform(model, calibration.contiguous(memory_format=formats[fmt]), [home_focus(execution)])
            seconds = time.perf_counter() - start
            rep = focused.fxeff_report
            b16 = interleaved([lambda: model(timing_f), lambda: focused(timing_f)], args.runs)
            one = timing_f[:1]
            b1 = interleaved([lambda: model(one), lambda: focused(one)], args.runs)
            acc = training.accuracy(focused, loader)
            grids = "; ".join(n.split(" (")[0] for n in rep.notes if n.startswith("grid "))
            if args.profile:
                profile(f"{arch} {fmt} {execution}", focused, timing_f)
            rows.append({"model": arch, "format": fmt, "execution": execution, "AoI": aoi,
                         "MAC ratio": macs(lambda: focused(timing_f)) / macs(lambda: model(timing_f)),
                         "latency ratio b16": b16[1] / b16[0], "latency ratio b1": b1[1] / b1[0],
                         "acc. original": f"{100 * accuracy:.2f}%", "acc. focused": f"{100 * acc:.2f}%",
                         "drop (points)": 100 * (accuracy - acc), "transform s": seconds, "grids": grids or "-"})
            print(f"{arch} {fmt} {execution}: latency ratio b16 {rows[-1]['latency ratio b16']:.2f}, "
                  f"b1 {rows[-1]['latency ratio b1']:.2f}, drop {rows[-1]['drop (points)']:.2f}", flush=True)
    text = report(f"Focus on the reference models (Cluttered Fashion-MNIST, input split, halo 2, fill mean; accuracy "
                  f"on {args.test_images} test images)", rows, COLUMNS, args.json)
    write_markdown(args.markdown, text)


if __name__ == "__main__":
    main()
