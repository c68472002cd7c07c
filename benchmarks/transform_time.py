"""How long fxeff.transform takes on deep models, in seconds and in forward passes of the model.

Issue 18's target: on ResNet-152 at 224, batch 2, each pass's transform costs no more than 3 forward passes.
For each model (random weights, eval mode) the eager forward and each pass's transform are timed in turn
(fxeff.bench.interleaved: medians of --runs rounds after one warm-up round). A transform is: symbolic_trace, the pass (its runs of the
graph on the example inputs: shapes, values for the fits, the report's MACs and errors) and recompile.

Passes: Focus at a calibrated 25% AoI (default split), HetConv P=4 with init "sum" and "fit" (each layer
fitted by least squares on the input it sees once the layers before it are rewritten), Shift (lstsq, the
same in-context fit).

    .venv/bin/python benchmarks/transform_time.py [--models resnet152,densenet201,convnext_base]
        [--batch 2] [--size 224] [--runs 3] [--json out.json] [--markdown out.md]
"""
import os
import sys

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fxeff.bench import interleaved, report, script_parser, write_markdown  # noqa: E402

import fxeff  # noqa: E402
from fxeff.passes import Focus, HetConv, Shift  # noqa: E402

COLUMNS = ["model", "pass", "input", "forward s", "transform s", "forward passes", "rewritten"]


def _passes(model, x):
    threshold = fxeff.focus.calibrate(model, x, 0.25)
    return {"Focus 25%": Focus(threshold=threshold), "HetConv P=4 sum": HetConv(part=4, init="sum"),
            "HetConv P=4 fit": HetConv(part=4, init="fit"), "Shift lstsq": Shift()}


def bench_model(name: str, batch: int, size: int, runs: int):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.rand(batch, 3, size, size)
    passes = _passes(model, x)
    # the forward and each transform timed in turn, one warm-up round (fxeff.bench, as every benchmark)
    fwd, *times = interleaved([lambda: model(x)] + [lambda c=c: fxeff.transform(model, x, [c]) for c in passes.values()],
                              runs, warmup=1)
    rewritten = {key: len(fxeff.transform(model, x, [c]).fxeff_report.rewritten) for key, c in passes.items()}
    rows = []
    for key, t in zip(passes, times):
        rows.append({"model": name, "pass": key, "input": f"{batch}x3x{size}x{size}", "forward s": fwd,
                     "transform s": t, "forward passes": t / fwd, "rewritten": rewritten[key]})
    return rows


def main():
    parser = script_parser(__doc__)
    parser.add_argument("--models", default="resnet152,densenet201,convnext_base")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, args.batch, args.size, args.runs)
        print(f"{name} done", flush=True)
    text = report("fxeff.transform time on deep models (random weights)", rows, COLUMNS, args.json, args.device)
    write_markdown(args.markdown, text)


if __name__ == "__main__":
    main()
