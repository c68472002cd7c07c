"""Writes docs/accuracy.md and its plots: the accuracy each pass costs on the trained reference models
(before and after recovery fine-tuning), with MAC and CPU latency ratios, plus EfficientNet-Lite0's
top-1 agreement on the real photos. See fxeff.accuracy_report for what is measured.

    python benchmarks/accuracy.py [--archs vgg,resnet20,mobilenetv2] [--datasets fashion-mnist,...]
        [--eval-images N] [--finetune-epochs 1] [--finetune-images 15000]
        [--hetconv-target-epochs 10] [--shift-target-epochs 3]
        [--finetune-lr 0.1] [--hetconv-init fit]
        [--focus-format channels_last|nchw] [--no-photos] [--threads 2] [--out docs/accuracy.md] [--plots docs/accuracy]
        [--rows docs/accuracy-rows.json] [--resume] [--keep-saved] [--retime] [--hetconv-format F] [--shift-format F]
        [--students] [--same-process] [--default-malloc]

--students runs only the fine-tuned rows that have a target (HetConv P=4, sparse shift) and saves each fine-tuned
model beside the reference checkpoints (fxeff/checkpoints/<arch>-<dataset>-<technique>.pt and .json, read by
fxeff.reference.load_finetuned and the demo); its report goes to out/finetuned.md unless --out says otherwise.

The whole run takes about three hours on 2 cores, most of it in fine-tuning. Each row is saved to --rows as
soon as it is measured; --resume reuses the rows saved there that were measured the same way (an
interrupted run goes on where it stopped, and a changed setting measures again only the rows it changes),
so the report can also be built a few models at a time. The rows of the committed report are in
docs/accuracy-rows.json: `--resume` measures only what changed. `--keep-saved` measures nothing but the fine-tuned
rows' latencies that are stale (another --hetconv-format / --shift-format, or a new deployment form): each is timed
on the committed fine-tuned model where there is one, else on the rewrite before fine-tuning (the timed column says
which).
"""
import argparse
import os

import torch

from fxeff import accuracy_report, bench, reference

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
    parser.add_argument("--hetconv-target-epochs", type=int, default=accuracy_report.Settings.hetconv_target_epochs,
                        help="fine-tuning epochs (whole training split) of the HetConv P=4 rows (they have a target)")
    parser.add_argument("--shift-target-epochs", type=int, default=accuracy_report.Settings.shift_target_epochs,
                        help="fine-tuning epochs (whole training split) of the sparse shift rows (they have a target)")
    parser.add_argument("--finetune-lr", type=float, default=accuracy_report.Settings.finetune_lr,
                        help="peak learning rate of every fine-tuning (fxeff.finetune's lr)")
    parser.add_argument("--hetconv-init", default=accuracy_report.Settings.hetconv_init,
                        choices=("fit", "sum", "centre"), help="fxeff.passes.HetConv's init for the HetConv rows")
    parser.add_argument("--latency-runs", type=int, default=accuracy_report.Settings.latency_runs)
    parser.add_argument("--latency-repeats", type=int, default=accuracy_report.Settings.latency_repeats,
                        help="timings per latency pair (each --latency-runs interleaved runs); the median ratio "
                             "is kept")
    parser.add_argument("--focus-format", default=accuracy_report.Settings.focus_format,
                        choices=sorted(accuracy_report.FORMATS), help="the memory format the focus rows are timed in")
    parser.add_argument("--hetconv-format", default=accuracy_report.Settings.hetconv_format,
                        choices=sorted(accuracy_report.FORMATS), help="the memory format the HetConv rows are timed in")
    parser.add_argument("--shift-format", default=accuracy_report.Settings.shift_format,
                        choices=sorted(accuracy_report.FORMATS), help="the memory format the shift rows are timed in")
    bench.add_malloc_option(parser)
    parser.add_argument("--same-process", action="store_true",
                        help="time each latency pair in this process (by default each pair runs in a fresh process, "
                             "as a deployment does: fxeff.bench.interleaved_in_fresh_process)")
    parser.add_argument("--no-photos", action="store_true", help="skip the EfficientNet-Lite0 photo table")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--students", action="store_true",
                        help="only the fine-tuned rows with a target, each model saved to fxeff/checkpoints")
    parser.add_argument("--out", default=None, help="default: docs/accuracy.md (out/finetuned.md with --students)")
    parser.add_argument("--plots", default=None, help="default: docs/accuracy (out/finetuned with --students)")
    parser.add_argument("--rows", default=None,
                        help="each row is saved here as it is measured; default: docs/accuracy-rows.json, the "
                             "committed rows of docs/accuracy.md, so --resume re-measures only what changed "
                             "(out/students-rows.json with --students)")
    parser.add_argument("--resume", action="store_true", help="reuse the rows saved in --rows with the same settings")
    parser.add_argument("--retime", action="store_true",
                        help="time the saved fine-tuned rows again (after a kernel change; with --resume or "
                             "--keep-saved: their accuracy is kept)")
    parser.add_argument("--keep-saved", action="store_true",
                        help="use every row saved in --rows as it is, whatever its settings (the report lists those "
                             "measured otherwise); only the fine-tuned rows' latencies are measured again where their "
                             "deployment form or format changed (a few minutes instead of hours)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = args.out or os.path.join(ROOT, *(("out", "finetuned.md") if args.students else ("docs", "accuracy.md")))
    plots = args.plots or os.path.join(ROOT, *(("out", "finetuned") if args.students else ("docs", "accuracy")))
    only_students = dict(focus_halos=(), stem_fractions=(), hetconv_parts=(4,), shift_modes=("sparse",), blocks=False,
                         save_students=True) if args.students else {}
    rows = args.rows or os.path.join(ROOT, *(("out", "students-rows.json") if args.students
                                             else ("docs", "accuracy-rows.json")))
    settings = accuracy_report.Settings(
        archs=_names(args.archs, reference.ARCHS, "--archs"),
        datasets=_names(args.datasets, reference.DATASETS, "--datasets"), eval_images=args.eval_images,
        finetune_epochs=args.finetune_epochs, finetune_images=args.finetune_images or None,
        hetconv_target_epochs=args.hetconv_target_epochs, shift_target_epochs=args.shift_target_epochs,
        finetune_lr=args.finetune_lr,
        hetconv_init=args.hetconv_init,
        latency_runs=args.latency_runs, latency_repeats=args.latency_repeats, focus_format=args.focus_format,
        hetconv_format=args.hetconv_format, shift_format=args.shift_format, keep_freed_memory=not args.default_malloc,
        fresh_process=not args.same_process, photos=not (args.no_photos or args.students), **only_students)
    print(accuracy_report.run(settings, out, plots, rows_path=rows, resume=args.resume, keep=args.keep_saved,
                              retime=args.retime))


if __name__ == "__main__":
    main()
