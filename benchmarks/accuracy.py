"""Writes docs/accuracy.md and its plots: the accuracy each pass costs on the trained reference models
(before and after recovery fine-tuning), with MAC and CPU latency ratios, plus EfficientNet-Lite0's
top-1 agreement on the real photos. See fxeff.accuracy_report for what is measured.

    python benchmarks/accuracy.py [--archs vgg,resnet20,mobilenetv2] [--datasets fashion-mnist,...]
        [--eval-images N] [--finetune-epochs 1] [--finetune-images 20000] [--no-photos] [--threads 2]
        [--out docs/accuracy.md] [--plots docs/accuracy]
"""
import argparse
import os

import torch

from fxeff import accuracy_report, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _names(text, allowed, flag):
    names = tuple(n for n in text.split(",") if n)
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise SystemExit(f"{flag}: expected names from {allowed}, got {text!r}")
    return names


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default=",".join(reference.ARCHS))
    parser.add_argument("--datasets", default=",".join(reference.DATASETS))
    parser.add_argument("--eval-images", type=int, default=None, help="test images per accuracy (default: all)")
    parser.add_argument("--finetune-epochs", type=int, default=accuracy_report.Settings.finetune_epochs)
    parser.add_argument("--finetune-images", type=int, default=accuracy_report.Settings.finetune_images,
                        help="training images per fine-tuning epoch (0: all)")
    parser.add_argument("--latency-runs", type=int, default=accuracy_report.Settings.latency_runs)
    parser.add_argument("--no-photos", action="store_true", help="skip the EfficientNet-Lite0 photo table")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "accuracy.md"))
    parser.add_argument("--plots", default=os.path.join(ROOT, "docs", "accuracy"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = accuracy_report.Settings(
        archs=_names(args.archs, reference.ARCHS, "--archs"),
        datasets=_names(args.datasets, reference.DATASETS, "--datasets"), eval_images=args.eval_images,
        finetune_epochs=args.finetune_epochs, finetune_images=args.finetune_images or None,
        latency_runs=args.latency_runs, photos=not args.no_photos)
    print(accuracy_report.run(settings, args.out, args.plots))


if __name__ == "__main__":
    main()
