"""The ``fxeff`` command: ``demo | transform | bench | report | train | blocks``.

``fxeff demo`` is the project's main job. First the home ground (fxeff/demo.py): the trained reference models on
Cluttered Fashion-MNIST test images, each technique's accuracy, MACs and latency against the original (focus without
retraining, the shipped fine-tuned HetConv P=4 and sparse shift). Then EfficientNet-Lite0 with its real ImageNet
weights on scikit-image's real photos: it calibrates the AoI threshold, focuses the model with ``fxeff.transform``
and shows per photo what changed (AoI, top-1, MACs, latency). Overlay PNGs and ``summary.png`` (accuracy vs
latency) go to ``out/demo``.
"""
import argparse
import json
import os
import runpy
import statistics
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from . import bench

DEFAULT_MODEL = "efficientnet-lite0"
DEFAULT_AOI = 0.30


# ---------------------------------------------------------------- shared pieces

def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text}")
    return value


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="'efficientnet-lite0' (real ImageNet weights) or 'torchvision:<name>', e.g. "
                             "torchvision:vgg16 (random weights unless --checkpoint)")
    parser.add_argument("--checkpoint", default=None, help="state_dict file loaded over the model's weights")
    parser.add_argument("--size", type=int, default=None, help="input size (default: the model's, e.g. 224)")
    parser.add_argument("--photos", default=None,
                        help="comma-separated photo names (default: all of fxeff.data.PHOTOS)")
    parser.add_argument("--images", type=_positive_int, default=None, help="use only the first N photos")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--aoi", type=_fraction, default=None,
                       help=f"calibrate the threshold for this mean AoI fraction on the photos (default {DEFAULT_AOI})")
    group.add_argument("--threshold", type=float, default=None, help="use this AoI threshold as is")
    parser.add_argument("--split", default=None, help="module after which the AoI is taken (default: the family's)")
    parser.add_argument("--reduce", default="sum", choices=("sum", "mean"), help="channel reduction of the AoI")
    parser.add_argument("--execution", default="auto", choices=("layer", "region", "auto"),
                        help="Focus execution (fxeff.passes.Focus): auto (default: per grid whichever of tiles, "
                             "per-layer focused convs or dense measures fastest), layer or region")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch.set_num_threads")


class _Setup:
    """What every subcommand builds from the model arguments: model, photos, batch, threshold, focused graph."""

    def __init__(self, args: argparse.Namespace):
        from . import Focus, data, focus, models, transform

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        self.model_name = args.model
        self.real_weights = models.has_real_weights(args.model, args.checkpoint)
        # channels_last: on CPU the faster format for the original and the focused model alike (fxeff's ops keep it)
        self.model = models.load_model(args.model, args.checkpoint).to(memory_format=torch.channels_last)
        prep = models.preprocessing(args.model)
        self.preprocessing = prep.at_size(args.size) if args.size is not None else prep
        names = [n.strip() for n in args.photos.split(",") if n.strip()] if args.photos else None
        self.photos = data.photos(names)
        if args.images is not None:
            self.photos = self.photos[:args.images]
        self.batch, self.crops = data.to_batch([image for _, image in self.photos], self.preprocessing)
        self.batch = self.batch.contiguous(memory_format=torch.channels_last)
        self.split = focus.resolve_split(self.model, args.split, "cli")
        self.reduce = args.reduce
        if args.threshold is not None:
            self.threshold, self.target = float(args.threshold), None
        else:
            self.target = DEFAULT_AOI if args.aoi is None else args.aoi
            self.threshold = focus.calibrate(self.model, self.batch, self.target, self.split, self.reduce)
        # photos are timed one at a time: auto plans for batch 1
        self.focus_config = Focus(self.threshold, split=self.split, reduce=self.reduce, execution=args.execution,
                                  plan_batch=1)
        self.focused = transform(self.model, self.batch, [self.focus_config])
        self.report = self.focused.fxeff_report

    def describe(self) -> str:
        weights = "real ImageNet weights" if self.model_name == DEFAULT_MODEL and self.real_weights else (
            "checkpoint weights" if self.real_weights else "RANDOM weights: top-1 names are meaningless")
        target = f"calibrated for a mean AoI of {self.target:.0%}" if self.target is not None else "given"
        return (f"model {self.model_name} ({weights}), input {self.preprocessing.crop}x{self.preprocessing.crop}, "
                f"{len(self.photos)} photos; AoI split {self.split!r}, reduce {self.reduce!r}, "
                f"threshold {self.threshold:.6g} ({target}), execution {self.focus_config.execution!r}")


# ---------------------------------------------------------------- demo

# Why the photo rows lose agreement at small AoIs (printed under their table).
PHOTO_NOTE = ("On photos the background is not irrelevant as it is on the cluttered canvases: an ImageNet "
              "classifier reads context around the object, so computing only a small AoI (with the fill elsewhere) "
              "changes what the later layers see, and predictions change without retraining.")
DEMO_COLUMNS = (("image", "image"), ("aoi_fraction", "AoI"), ("top1_dense", "top-1 dense"),
                ("top1_focused", "top-1 focused"), ("agree", "agree"), ("macs_dense_m", "MMACs dense"),
                ("macs_focused_m", "MMACs focused"), ("mac_ratio", "MAC ratio"), ("ms_dense", "ms dense"),
                ("ms_focused", "ms focused"), ("speedup", "speedup"))


def demo(args: argparse.Namespace) -> Dict[str, object]:
    """Runs the demo; returns the summary written to ``args.out``/summary.json."""
    from tqdm import tqdm

    from . import focus, models

    os.makedirs(args.out, exist_ok=True)
    home = []
    if not args.no_home:
        from .demo import home_ground_rows

        print(f"home ground: the trained reference models on {args.test_images} Cluttered Fashion-MNIST test images",
              flush=True)
        home = home_ground_rows(args.test_images, args.home_runs, args.out)
    setup = _Setup(args)
    print(setup.describe(), flush=True)
    masks = focus.aoi_masks(setup.model, setup.batch, setup.threshold, setup.split, setup.reduce)[0]
    with torch.no_grad():
        n_classes = setup.model(setup.batch[:1]).shape[-1]
    categories = models.imagenet_categories() if n_classes == 1000 else [f"class {i}" for i in range(n_classes)]

    rows = []
    for i in tqdm(range(len(setup.photos)), desc="fxeff demo", unit="photo"):
        name = setup.photos[i][0]
        x = setup.batch[i:i + 1]
        with torch.no_grad():
            p_dense = setup.model(x).softmax(-1)[0]
            p_focused = setup.focused(x).softmax(-1)[0]
        c_dense, c_focused = int(p_dense.argmax()), int(p_focused.argmax())
        macs_dense = bench.macs(lambda: setup.model(x))
        macs_focused = bench.macs(lambda: setup.focused(x))
        s_dense, s_focused = bench.interleaved([lambda: setup.model(x), lambda: setup.focused(x)], args.runs)
        aoi = float(masks[i].float().mean())
        png = os.path.join(args.out, f"{i:02d}_{name}_aoi.png")
        focus.render(setup.crops[i], masks[i], png,
                     title=f"{name}: AoI {aoi:.1%}  {categories[c_dense]} -> {categories[c_focused]}")
        row = {"image": name, "aoi_fraction": aoi, "top1_dense": categories[c_dense], "p_dense": float(p_dense.max()),
               "top1_focused": categories[c_focused], "p_focused": float(p_focused.max()),
               "agree": c_dense == c_focused, "macs_dense_m": macs_dense / 1e6, "macs_focused_m": macs_focused / 1e6,
               "mac_ratio": macs_focused / macs_dense, "ms_dense": s_dense * 1e3, "ms_focused": s_focused * 1e3,
               "speedup": s_dense / s_focused, "png": png}
        rows.append(row)
        tqdm.write(f"{name:>22}: AoI {aoi:6.1%}  top-1 {row['top1_dense']!r} -> {row['top1_focused']!r} "
                   f"({'agree' if row['agree'] else 'DIFFER'})  MACs {macs_dense / 1e6:.0f}M -> "
                   f"{macs_focused / 1e6:.0f}M  latency {s_dense * 1e3:.1f} -> {s_focused * 1e3:.1f} ms")

    summary = {
        "home_ground": home, "test_images": args.test_images if home else 0,
        "model": setup.model_name, "real_weights": setup.real_weights, "input_size": setup.preprocessing.crop,
        "split": setup.split, "reduce": setup.reduce, "threshold": setup.threshold, "target_aoi": setup.target,
        "runs": args.runs, "environment": bench.environment(), "rows": rows,
        "agreement": sum(r["agree"] for r in rows) / len(rows),
        "mean_aoi_fraction": sum(r["aoi_fraction"] for r in rows) / len(rows),
        "mean_mac_ratio": sum(r["mac_ratio"] for r in rows) / len(rows),
        "median_speedup": statistics.median(r["speedup"] for r in rows),
    }
    totals = (f"top-1 agreement {summary['agreement']:.0%} ({sum(r['agree'] for r in rows)}/{len(rows)}), "
              f"mean AoI {summary['mean_aoi_fraction']:.1%}, mean MAC ratio {summary['mean_mac_ratio']:.3f}, "
              f"median speedup {summary['median_speedup']:.2f}x")
    env = ", ".join(f"{k} {v}" for k, v in summary["environment"].items())
    note = PHOTO_NOTE
    if not setup.report.rewritten:  # auto measured focusing no faster on every grid: say so, not the photo note alone
        note = (f"Focus's execution {setup.focus_config.execution!r} ran every grid of this model dense on these "
                "photos (focusing measured no faster on this machine: the report's notes say per grid), so "
                "predictions and time are the original's; `--execution layer` runs the published per-layer "
                "technique. " + PHOTO_NOTE)
    from .demo import home_ground_markdown, summary_plot

    home_md = home_ground_markdown(home, args.test_images, args.home_runs) + "\n" if home else ""
    markdown = (f"# fxeff demo\n\n{env}\n\n{home_md}## Natural images\n\n{setup.describe()}\n\nLatency: median of "
                f"{args.runs} interleaved runs, batch 1. {note}\n\n{bench.markdown_table(rows, DEMO_COLUMNS)}"
                f"\n\n{totals}\n\n![summary](summary.png)\n")
    summary_plot(home, rows, os.path.join(args.out, "summary.png"), setup.model_name)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(args.out, "report.txt"), "w") as f:
        f.write(str(setup.report) + "\n")
    if home:
        print("\n" + home_md.strip())
    print("\n## Natural images\n\n" + bench.markdown_table(rows, DEMO_COLUMNS) + "\n\n" + totals + "\n\n" + note)
    overlays = len(rows) + len([f for f in os.listdir(args.out) if f.startswith("home_") and f.endswith("_aoi.png")])
    print(f"wrote {overlays} AoI overlays, summary.md, summary.json, summary.png and report.txt to {args.out}")
    return summary


# ---------------------------------------------------------------- transform / report / bench

def transform_command(args: argparse.Namespace) -> None:
    """Prints the focus report and saves the focused model: torch.export program (--out .pt2),
    AOTInductor package (--aoti .pt2) and/or torch.jit.trace module (--trace .pt), for batch 1."""
    from . import export

    if args.out is None and args.trace is None and args.aoti is None:
        raise SystemExit("fxeff transform: give --out PATH.pt2 (torch.export), --aoti PATH.pt2 (AOTInductor) "
                         "and/or --trace PATH.pt (torch.jit.trace)")
    setup = _Setup(args)
    print(setup.describe())
    print(setup.report)
    example = (setup.batch[:1],)
    if args.out is not None:
        export.export(setup.focused, example, args.out)
        print(f"saved the torch.export program to {args.out} (load with fxeff.export.load_exported)")
    if args.aoti is not None:
        export.aoti_package(setup.focused, example, args.aoti)
        print(f"saved the AOTInductor package to {args.aoti} (load with fxeff.export.load_aoti)")
    if args.trace is not None:
        export.trace(setup.focused, example, args.trace)
        print(f"saved the torch.jit.trace module to {args.trace} (load with fxeff.export.load_traced)")


def report_command(args: argparse.Namespace) -> None:
    """Prints (or writes as JSON) the report of focusing the model on the photos; saves no model."""
    setup = _Setup(args)
    if args.json:
        print(json.dumps({"setup": setup.describe(), "config": setup.focus_config.to_dict(),
                          "report": setup.report.to_dict()}, indent=1))
    else:
        print(setup.describe())
        print(setup.report)


def _benchmarks_dir() -> Path:
    here = Path(__file__).resolve().parent.parent / "benchmarks"
    if not here.is_dir():
        raise FileNotFoundError(f"fxeff bench: the benchmark scripts live in the source checkout's benchmarks/ "
                                f"folder, not found at {here} (run from a clone installed with pip install -e .)")
    return here


def bench_command(args: argparse.Namespace) -> None:
    """Runs benchmarks/focus.py (one layer) or, with --models, benchmarks/focus_models.py, passing the rest on."""
    script = _benchmarks_dir() / ("focus_models.py" if args.models else "focus.py")
    if not script.is_file():
        raise FileNotFoundError(f"fxeff bench: benchmark script {script} is missing")
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(script)] + list(args.rest)
    sys.path.insert(0, str(script.parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path


def train_command(args: argparse.Namespace) -> None:
    """Trains one reference model (fxeff.training.train_reference) and prints its metrics."""
    from . import training

    if args.threads:
        torch.set_num_threads(args.threads)
    metrics = training.train_reference(args.arch, args.dataset, epochs=args.epochs, out=args.out, limit=args.limit,
                                       seed=args.seed)
    print(json.dumps(metrics, indent=1))


# ---------------------------------------------------------------- entry

def path_or_last(path: Optional[str], last: str, what: str, producer: str) -> str:
    """``path``, or the path that the file ``last`` holds (the last run of ``producer`` wrote it there): the
    default of a command that reads what another one made. ``what`` names the missing option in the error."""
    if path is not None:
        return path
    if not os.path.exists(last):
        raise FileNotFoundError(f"{what} and nothing from a last '{producer.split(' ARCH')[0]}' ({last}); run "
                                f"'{producer}' first")
    with open(last) as f:
        return f.read().strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxeff", description="fxeff: make trained CNNs cheaper to run")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="focus a real model on real photos: AoI, top-1 agreement, MACs, latency, PNGs")
    _add_model_args(p)
    p.add_argument("--runs", type=_positive_int, default=5, help="timed runs per model and photo (median)")
    p.add_argument("--test-images", type=_positive_int, default=2000,
                   help="Cluttered Fashion-MNIST test images per accuracy of the home-ground table")
    p.add_argument("--home-runs", type=_positive_int, default=20,
                   help="timed runs per home-ground row at batch 16 (median)")
    p.add_argument("--no-home", action="store_true", help="skip the home ground (the reference models)")
    p.add_argument("--out", default=os.path.join("out", "demo"), help="output folder (PNGs, summary.md/json)")
    p.set_defaults(func=demo)

    p = sub.add_parser("transform", help="focus a model, print its report and save it (export, AOTInductor, trace)")
    _add_model_args(p)
    p.add_argument("--out", default=None, help="torch.export program to write (.pt2)")
    p.add_argument("--aoti", default=None, help="AOTInductor package to write (.pt2)")
    p.add_argument("--trace", default=None, help="torch.jit.trace module to write (.pt)")
    p.set_defaults(func=transform_command)

    p = sub.add_parser("report", help="print the focus report of a model on the photos")
    _add_model_args(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=report_command)

    p = sub.add_parser("bench", help="run benchmarks/focus.py (one layer) or --models benchmarks/focus_models.py")
    p.add_argument("--models", action="store_true", help="(first) the whole-model benchmark instead of the one-layer "
                                                         "one; every other argument goes to the script")
    p.set_defaults(func=bench_command, rest=[])

    from .reference import ARCHS, DATASETS

    p = sub.add_parser("train", help="train a reference model (VGG / ResNet-20 / MobileNetV2 on (Cluttered) "
                                     "Fashion-MNIST) from its fixed seed")
    p.add_argument("arch", choices=ARCHS)
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("--epochs", type=_positive_int, default=None, help="default: the recipe's (fxeff.training.RECIPES)")
    p.add_argument("--out", default=None, help="state_dict file (default: the committed checkpoint, fxeff/checkpoints)")
    p.add_argument("--limit", type=_positive_int, default=None, help="train on the first N images only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive_int, default=None, help="torch.set_num_threads")
    p.set_defaults(func=train_command)

    from .blocks.command import add_parser as add_blocks_parser

    add_blocks_parser(sub)
    from .glance.command import add_parser as add_glance_parser

    add_glance_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["bench"]:  # the script parses its own arguments (--help included)
        rest = argv[1:]
        models = rest[:1] == ["--models"]  # the first --models picks the script; later ones are its own
        args = argparse.Namespace(func=bench_command, models=models, rest=rest[1:] if models else rest)
    else:
        args = parser.parse_args(argv)
    result = args.func(args)
    return 0 if result is None or isinstance(result, dict) else int(result)


if __name__ == "__main__":
    sys.exit(main())
