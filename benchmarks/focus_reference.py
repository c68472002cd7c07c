"""Focus on the trained reference models (Cluttered Fashion-MNIST), per execution: latency against the original at
batch 16 and batch 1, MACs, and accuracy on test images; issue 13's home-ground targets (latency ratio <= 0.5 at
batch 16 and <= 0.7 at batch 1, accuracy drop <= 0.5 points).

The AoI is docs/accuracy.md's target row: every input pixel brighter than black, grown by 2 pixels, fill "mean",
no retraining. Each model is transformed on the first 64 training images (per execution: "layer", per-layer
focused convs; "region", tiles planned by the cost model; "auto", per grid whichever of tiles, per-layer or dense
is fastest, measured at transform time) and timed beside the original (medians of --runs interleaved runs).

With --profile it also prints, per model, where the time of a batch-16 forward goes (torch.profiler, self CPU time
per op over 20 forwards): the original in NCHW and in channels_last, and each execution; the numbers behind the
gap analysis in docs/regions.md.

    .venv/bin/python benchmarks/focus_reference.py [--archs vgg,resnet20,mobilenetv2]
        [--executions layer,region,auto] [--test-images 2000] [--runs 20] [--profile] [--json out.json]
        [--markdown out.md]
"""
import copy
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

COLUMNS = ["model", "execution", "AoI", "MAC ratio", "latency ratio b16", "latency ratio b1", "acc. original",
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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    calibration = reference.first_images(DATASET, "train", CALIBRATION_IMAGES)
    timing = reference.first_images(DATASET, "test", LATENCY_BATCH)
    # the AoI of the timing batch (the input split's: it is the same for every model and execution)
    aoi = float(dilate_mask(aoi_mask(timing, BACKGROUND, "sum"), 2).float().mean())
    loader = training.loader(reference.dataset(DATASET, "test", limit=args.test_images), 250, False)
    rows = []
    for arch in [a for a in args.archs.split(",") if a]:
        model = reference.load(arch, DATASET)
        accuracy = training.accuracy(model, loader)
        if args.profile:
            cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
            cl_timing = timing.contiguous(memory_format=torch.channels_last)
            dense, dense_cl = interleaved([lambda: model(timing), lambda: cl(cl_timing)], args.runs)
            print(f"{arch}: original {dense * 1e3:.2f} ms, channels_last {dense_cl * 1e3:.2f} ms "
                  f"({dense_cl / dense:.2f}) at batch {len(timing)}")
            profile(f"{arch} original (NCHW)", model, timing)
            profile(f"{arch} original (channels_last)", cl, cl_timing)
        for execution in [e for e in args.executions.split(",") if e]:
            start = time.perf_counter()
            focused = transform(model, calibration, [home_focus(execution)])
            seconds = time.perf_counter() - start
            rep = focused.fxeff_report
            b16 = interleaved([lambda: model(timing), lambda: focused(timing)], args.runs)
            one = timing[:1]
            b1 = interleaved([lambda: model(one), lambda: focused(one)], args.runs)
            acc = training.accuracy(focused, loader)
            grids = "; ".join(n.split(" (")[0] for n in rep.notes if n.startswith("grid "))
            if args.profile:
                profile(f"{arch} {execution}", focused, timing)
            rows.append({"model": arch, "execution": execution, "AoI": aoi,
                         "MAC ratio": macs(lambda: focused(timing)) / macs(lambda: model(timing)),
                         "latency ratio b16": b16[1] / b16[0], "latency ratio b1": b1[1] / b1[0],
                         "acc. original": f"{100 * accuracy:.2f}%", "acc. focused": f"{100 * acc:.2f}%",
                         "drop (points)": 100 * (accuracy - acc), "transform s": seconds, "grids": grids or "-"})
            print(f"{arch} {execution}: latency ratio b16 {rows[-1]['latency ratio b16']:.2f}, "
                  f"b1 {rows[-1]['latency ratio b1']:.2f}, drop {rows[-1]['drop (points)']:.2f}", flush=True)
    text = report(f"Focus on the reference models (Cluttered Fashion-MNIST, input split, halo 2, fill mean; accuracy "
                  f"on {args.test_images} test images)", rows, COLUMNS, args.json)
    write_markdown(args.markdown, text)


if __name__ == "__main__":
    main()
