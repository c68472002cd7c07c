"""Whole models before/after the HetConv pass: which init approximates the convs better (on trained
reference models and on real photos), and eager latency and MACs of VGG16 at 224 with P=4.

Part 0 (init, trained weights): fxeff's reference models (fxeff.reference: VGG-style and ResNet-20 trained
on Fashion-MNIST and Cluttered Fashion-MNIST), for each P and init ("centre", "sum", "fit"): the per-layer
and model output errors on the example inputs (training images: "fit" is fitted on them, so its
errors there are in-sample) and the test accuracy right after the rewrite (no fine-tuning).

Part 1 (init): for each model and init ("centre", "sum"; not "fit", which would be fitted and
measured on the same 4 photos), the pass's per-layer relative output error
||hetconv(x) - conv(x)|| / ||conv(x)|| on each layer's own input from real photos (scikit-image), and
the whole model's output error (before fine-tuning). Part 2 (latency): the model and its HetConv
rewrite timed in turn (medians), with FlopCounterMode MACs; --device cuda runs this latency part on the GPU
(parts 0 and 1, errors and accuracy, stay on the CPU).

    python benchmarks/hetconv_models.py [--models vgg16,resnet50] [--part 4] [--size 224] [--runs 10]
        [--latency-models vgg16,reference:vgg,reference:resnet20] [--memory-format nchw|channels_last]
        [--reference-images 2000] [--fit-images 256] [--threads 2] [--device cpu|cuda] [--json out.json] [--markdown out.md]
"""
import argparse
import statistics

import torch

import fxeff
from fxeff import data, models, reference, training
from fxeff.bench import (add_malloc_option, apply_malloc_option, model_before_after, report, script_parser,
                         write_markdown)


def _model_error(rep) -> str:
    return next((n.split(": ")[-1] for n in rep.notes if n.startswith("model output")), "n/a")


def reference_init_rows(parts, images: int, fit_images: int):
    rows = []
    for dataset in reference.DATASETS:
        test = reference.dataset(dataset, "test", limit=images)
        train = reference.dataset(dataset, "train", limit=fit_images)
        x = torch.stack([train[i][0] for i in range(len(train))])  # example inputs: what "fit" fits on
        loader = training.loader(test, 500, False)
        for arch in ("vgg", "resnet20"):
            model = reference.load(arch, dataset)
            original = training.accuracy(model, loader)
            for part in parts:
                for init in ("centre", "sum", "fit"):
                    rewritten = fxeff.transform(model, x, [fxeff.HetConv(part=part, init=init)])
                    errors = [s.error for s in rewritten.fxeff_report.rewritten]
                    rows.append({"model": arch, "dataset": dataset, "P": part, "init": init,
                                 "example (training) images": len(x), "layers": len(errors),
                                 "mean layer error": statistics.mean(errors), "max layer error": max(errors),
                                 "model output error": _model_error(rewritten.fxeff_report),
                                 "original acc. %": 100 * original,
                                 "acc. after rewrite %": 100 * training.accuracy(rewritten, loader)})
    return rows


def init_rows(names, part: int, size: int):
    rows = []
    for name in names:
        model = models.load_model(f"torchvision:{name}").eval()
        photos = data.photos()[:4]
        x, _ = data.to_batch([image for _, image in photos], models.preprocessing(f"torchvision:{name}").at_size(size))
        weights = "real" if models.has_real_weights(f"torchvision:{name}") else "random (no offline weights)"
        for init in ("centre", "sum"):
            rep = fxeff.transform(model, x, [fxeff.HetConv(part=part, init=init)]).fxeff_report
            errors = [s.error for s in rep.rewritten]
            model_error = _model_error(rep)
            rows.append({"model": name, "weights": weights, "photos": len(photos), "init": init,
                         "layers": len(errors), "mean layer error": statistics.mean(errors),
                         "max layer error": max(errors), "model output error": model_error})
    return rows


REFERENCE_DATASET = "cluttered-fashion-mnist"  # the reference models timed by --latency-models reference:<arch>


def latency_rows(names, part: int, size: int, runs: int, device: torch.device = torch.device("cpu"),
                 memory_format: str = "nchw", reference_batch: int = 16, fold_batch_norm: bool = False):
    """Each model and its HetConv rewrite timed in turn: a torchvision model at batch 1 and size x size (random
    input), or ``reference:<arch>``, fxeff's trained reference model on the first ``reference_batch`` test images
    of Cluttered Fashion-MNIST (docs/accuracy.md's latency batch). Both in ``memory_format``; with
    ``fold_batch_norm`` both with their BatchNorms folded (fxeff.FoldBatchNorm, the deployment form)."""
    fmt = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}[memory_format]
    rows = []
    for name in names:
        if name.startswith("reference:"):
            model = reference.load(name.split(":", 1)[1], REFERENCE_DATASET)
            test = reference.dataset(REFERENCE_DATASET, "test", limit=reference_batch)
            x = torch.stack([test[i][0] for i in range(len(test))])
        else:
            model = models.load_model(f"torchvision:{name}")
            x = torch.rand(1, 3, size, size)
        model = model.eval().to(device, memory_format=fmt)
        x = x.to(device).contiguous(memory_format=fmt)
        rewritten = fxeff.transform(model, x, [fxeff.HetConv(part=part)])
        if fold_batch_norm:  # the MACs stay the HetConv pass's: folding moves none
            model = fxeff.transform(model, x, [fxeff.FoldBatchNorm()]).eval()
            report = rewritten.fxeff_report
            rewritten = fxeff.transform(rewritten.eval(), x, [fxeff.FoldBatchNorm()])
            rewritten.fxeff_report = report
        row = model_before_after(name, model, rewritten, x, runs)
        rows.append({**row, "format": memory_format, "BatchNorms": "folded" if fold_batch_norm else "as trained"})
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    parser.add_argument("--models", default="vgg16,resnet50")
    parser.add_argument("--latency-models", default="vgg16",
                        help="comma list: torchvision names, or reference:vgg / reference:resnet20 (fxeff's trained "
                             "reference models on Cluttered Fashion-MNIST test images)")
    parser.add_argument("--memory-format", choices=["nchw", "channels_last"], default="nchw",
                        help="the latency part's memory format, model and input (default nchw)")
    parser.add_argument("--reference-batch", type=int, default=16, help="batch of the reference models' latency")
    parser.add_argument("--part", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--reference-images", type=int, default=2000,
                        help="test images per reference model (0 skips part 0)")
    parser.add_argument("--fit-images", type=int, default=256,
                        help="part 0: training images given as the example inputs (init='fit' fits on them)")
    parser.add_argument("--fold-batch-norm", action="store_true",
                        help="the latency part with both models' BatchNorms folded (fxeff.FoldBatchNorm)")
    add_malloc_option(parser)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    apply_malloc_option(args)
    torch.manual_seed(0)
    text = ""
    if args.reference_images:
        with torch.no_grad():
            rows = reference_init_rows((2, 4, 8), args.reference_images, args.fit_images)
        text = report(f"HetConv init on the trained reference models ({args.reference_images} test images each): "
                      "errors and accuracy before fine-tuning", rows, list(rows[0].keys()),
                      args.json.replace(".json", "_reference_init.json") if args.json else "") + "\n\n"
    names = [n for n in args.models.split(",") if n]  # --models "": no init table
    if names:
        with torch.no_grad():
            rows = init_rows(names, args.part, args.size)
        text += report(f"HetConv init on real photos, P={args.part}: relative output error before fine-tuning", rows,
                       list(rows[0].keys()), args.json.replace(".json", "_init.json") if args.json else "")
    rows = latency_rows([n for n in args.latency_models.split(",") if n], args.part, args.size, args.runs, args.device,
                        args.memory_format, args.reference_batch, args.fold_batch_norm)
    text += "\n\n" + report(f"Whole model, eager, {args.device.type}, {args.memory_format}, before/after the HetConv "
                            f"pass (torchvision models at batch 1, reference models at batch {args.reference_batch})",
                            rows,
                            list(rows[0].keys()), args.json.replace(".json", "_latency.json") if args.json else "",
                            args.device)
    write_markdown(args.markdown, text)


if __name__ == "__main__":
    main()
