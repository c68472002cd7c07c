"""Whole models focused on real photos: latency dense vs focused, eager and compiled, against the MACs saved.

For each model (VGG16, ResNet-50, MobileNetV2, EfficientNet-Lite0 at 224x224, batch 1) and each Focus execution
(--execution: "region", tiles; "layer", per-layer focused convs) one AoI threshold is
calibrated on the photos for a mean AoI of --aoi (default 25%), the model is focused with
fxeff.transform (eager) and with torch.compile(backend="effconv") and timed on each photo beside
the dense model (eager, and torch.compile's default inductor). The AoI is computed in the graph
from each photo, so one compiled model serves every photo.

MAC bound = dense MACs / focused MACs (torch.utils.flop_counter with fxeff's formulas, the count
of fxeff.transform's report); efficiency = speedup / MAC bound (1.0: time falls as fast as MACs). Focus folds each
eval BatchNorm after a focused conv into it, so on CPU the dense model with its BatchNorms folded the same way
(torch.fx.experimental.optimization.fuse) is timed too: "speedup vs BN-folded" is what the AoI alone buys.

With --device cuda the models, photos and masks live on the GPU (dense = cuDNN); issue 6's GPU target is an
efficiency >= 0.75 for VGG16 and ResNet-50 at a 25% AoI. --quick: the first photo only, eager only.

    .venv/bin/python benchmarks/focus_models.py [--models vgg16,resnet50,efficientnet-lite0]
        [--photos astronaut,chelsea,coffee] [--aoi 0.25] [--execution region,layer] [--format nchw|channels_last]
        [--device cpu|cuda] [--quick] [--no-compile] [--profile]
        [--json out.json] [--markdown out.md]
"""
import argparse
import os
import sys

import torch
import torch.fx.experimental.optimization  # noqa: F401  (fuse: the dense model with its BatchNorms folded)
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fxeff.bench import script_parser, write_markdown, measure, report  # noqa: E402

import fxeff  # noqa: E402
from fxeff import data, focus, models  # noqa: E402

MODELS = {"vgg16": "torchvision:vgg16", "resnet50": "torchvision:resnet50", "mobilenetv2": "torchvision:mobilenet_v2",
          "efficientnet-lite0": "efficientnet-lite0"}
COLUMNS = ["model", "format", "execution", "photo", "AoI", "MAC bound", "eager dense ms", "eager focused ms",
           "eager speedup", "eager efficiency", "dense BN-folded ms", "speedup vs BN-folded", "inductor dense ms",
           "effconv focused ms", "compiled speedup", "compiled efficiency", "effconv vs eager dense"]


def _macs(model, x) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


def _profile(name: str, fn, rows: int = 12, cuda: bool = False) -> None:
    """Where the time of ``fn`` goes, by op (self CPU time, or self CUDA time on a GPU), as torch.profiler's table."""
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    with torch.no_grad():
        for _ in range(2):
            fn()
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(5):
                fn()
    print(f"\n#### profile: {name} (5 calls, by {key})\n")
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def bench_model(key: str, photo_names, target: float, compile_models: bool, profile: bool,
                device: torch.device = torch.device("cpu"), execution: str = "region", fmt: str = "nchw"):
    name = MODELS[key]
    torch.manual_seed(0)  # torchvision models have random weights: the same ones in every run
    memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    model = models.load_model(name).to(device).to(memory_format=memory_format)  # dense and focused alike
    photos = data.photos(photo_names)
    batch, _ = data.to_batch([image for _, image in photos], models.preprocessing(name))
    batch = batch.to(device).contiguous(memory_format=memory_format)
    threshold = focus.calibrate(model, batch, target)
    config = fxeff.Focus(threshold, execution=execution, plan_batch=1)  # each photo is timed at batch 1
    focused = fxeff.transform(model, batch, [config])
    for note in focused.fxeff_report.notes:
        print(f"  {note}")
    print(f"{key} ({execution} execution): split {focused.fxeff_report.split}, threshold {threshold:.6g} for a mean AoI of {target:.0%} "
          f"over {len(photos)} photos; whole-model MACs on the batch {focused.fxeff_report.model_macs_before / 1e9:.2f}G"
          f" -> {focused.fxeff_report.model_macs_after / 1e9:.2f}G", flush=True)
    if compile_models:
        torch._dynamo.reset()
        inductor_dense = torch.compile(model)
        effconv_focused = torch.compile(model, backend="effconv", options={"passes": [config.to_dict()]})
    masks = focus.aoi_masks(model, batch, threshold)[0]
    # Focus folds each eval BatchNorm after a focused conv into it (Focus.fold_batchnorm); the dense model with its
    # BatchNorms folded the same way (torch.fx's fuse) says how much of the speedup is the fold, not the AoI.
    folded = torch.fx.experimental.optimization.fuse(model) if device.type == "cpu" else None
    rows = []
    with torch.no_grad():
        for i, (photo, _) in enumerate(photos):
            x = batch[i:i + 1]
            bound = _macs(model, x) / _macs(focused, x)
            row = {"model": key, "format": fmt, "execution": execution, "photo": photo, "AoI": float(masks[i].float().mean()), "MAC bound": bound}
            eager_dense = measure(lambda: model(x))
            eager_focused = measure(lambda: focused(x))
            row.update({"eager dense ms": eager_dense * 1e3, "eager focused ms": eager_focused * 1e3,
                        "eager speedup": eager_dense / eager_focused,
                        "eager efficiency": eager_dense / eager_focused / bound})
            if folded is not None:
                dense_folded = measure(lambda: folded(x))
                row.update({"dense BN-folded ms": dense_folded * 1e3,
                            "speedup vs BN-folded": dense_folded / eager_focused})
            if compile_models:
                compiled_dense = measure(lambda: inductor_dense(x))
                compiled_focused = measure(lambda: effconv_focused(x))
                row.update({"inductor dense ms": compiled_dense * 1e3, "effconv focused ms": compiled_focused * 1e3,
                            "compiled speedup": compiled_dense / compiled_focused,
                            "compiled efficiency": compiled_dense / compiled_focused / bound,
                            "effconv vs eager dense": eager_dense / compiled_focused})
            else:
                row.update({c: "not run" for c in COLUMNS[COLUMNS.index("inductor dense ms"):]})
            rows.append(row)
            print(f"  {photo}: AoI {row['AoI']:.1%}, MAC bound {bound:.2f}x, eager speedup {row['eager speedup']:.2f}x"
                  + (f", compiled speedup {row['compiled speedup']:.2f}x" if compile_models else ""), flush=True)
        if profile:
            x = batch[:1]
            _profile(f"{key} eager dense", lambda: model(x), cuda=device.type == "cuda")
            _profile(f"{key} eager focused", lambda: focused(x), cuda=device.type == "cuda")
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {list(MODELS)}")
    parser.add_argument("--photos", default="astronaut,chelsea,coffee", help="comma-separated fxeff.data.PHOTOS")
    parser.add_argument("--aoi", type=float, default=0.25, help="mean AoI fraction the threshold is calibrated for")
    parser.add_argument("--no-compile", action="store_true", help="eager only (skip inductor and effconv)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler table by op, dense and focused")
    parser.add_argument("--quick", action="store_true", help="the first photo only, eager only (no compile)")
    parser.add_argument("--format", default="nchw", choices=["nchw", "channels_last"],
                        help="memory format of the model and the photos, dense and focused alike")
    parser.add_argument("--execution", default="region,layer",
                        help="comma-separated Focus executions to time: region (tiles), layer (per-layer focused convs)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    device = args.device
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; expected names from {list(MODELS)}")
    torch.set_num_threads(args.threads)
    photo_names = [p.strip() for p in args.photos.split(",") if p.strip()]
    if args.quick:
        photo_names = photo_names[:1]
    compile_models = not (args.no_compile or args.quick)
    rows = []
    for key in keys:
        for execution in [e.strip() for e in args.execution.split(",") if e.strip()]:
            rows += bench_model(key, photo_names, args.aoi, compile_models, args.profile, device, execution,
                                args.format)
    text = report(f"Whole models focused on real photos (224x224, batch 1, {device.type}, threshold for a mean AoI "
                  f"of {args.aoi:.0%})", rows, COLUMNS, args.json, device)
    write_markdown(args.markdown, text)


if __name__ == "__main__":
    main()
