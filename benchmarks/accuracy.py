"""Writes docs/accuracy.md and its plots: the accuracy each pass costs on the trained reference models
(before and after recovery fine-tuning), with MAC and CPU latency ratios, plus EfficientNet-Lite0's
top-1 agreement on the real photos. See fxeff.accuracy_report for what is measured.

    python benchmarks/accuracy.py [--archs vgg,resnet20,mobilenetv2] [--datasets fashion-mnist,...]
        [--eval-images N] [--finetune-epochs 1] [--finetune-images 15000] [--target-finetune-epochs 3]
        [--finetune-lr 0.1] [--hetconv-init fit]
        [--no-photos] [--threads 2] [--out docs/accuracy.md] [--plots docs/accuracy]
        [--rows out/accuracy-rows.json] [--resume]

The whole run takes about two hours on 2 cores, most of it in fine-tuning. Each model's rows are saved to
--rows as soon as they are measured; --resume reuses the rows saved there with the same settings (an
interrupted run goes on where it stopped), so the report can also be built a few models at a time.
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
                        help="training images per fine-tuning epoch of the rows without a target (0: all)")
    parser.add_argument("--target-finetune-epochs", type=int,
                        default=accuracy_report.Settings.target_finetune_epochs,
                        help="fine-tuning epochs (whole training split) of the rows with a target")
    parser.add_argument("--finetune-lr", type=float, default=accuracy_report.Settings.finetune_lr,
                        help="peak learning rate of every fine-tuning (fxeff.finetune's lr)")
    parser.add_argument("--hetconv-init", default=accuracy_report.Settings.hetconv_init,
                        choices=("fit", "sum", "centre"), help="fxeff.passes.HetConv's init for the HetConv rows")
    parser.add_argument("--latency-runs", type=int, default=accuracy_report.Settings.latency_runs)
    parser.add_argument("--no-photos", action="store_true", help="skip the EfficientNet-Lite0 photo table")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "accuracy.md"))
    parser.add_argument("--plots", default=os.path.join(ROOT, "docs", "accuracy"))
    parser.add_argument("--rows", default=os.path.join(ROOT, "out", "accuracy-rows.json"),
                        help="each model's rows are saved here as they are measured")
    parser.add_argument("--resume", action="store_true", help="reuse the rows saved in --rows with the same settings")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = accuracy_report.Settings(
        archs=_names(args.archs, reference.ARCHS, "--archs"),
        datasets=_names(args.datasets, reference.DATASETS, "--datasets"), eval_images=args.eval_images,
        finetune_epochs=args.finetune_epochs, finetune_images=args.finetune_images or None,
        target_finetune_epochs=args.target_finetune_epochs, finetune_lr=args.finetune_lr,
        hetconv_init=args.hetconv_init,
        latency_runs=args.latency_runs,
        photos=not args.no_photos)
    print(accuracy_report.run(settings, args.out, args.plots, rows_path=args.rows, resume=args.resume))


if __name__ == "__main__":
    main()
