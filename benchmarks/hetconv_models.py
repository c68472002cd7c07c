"""Whole models before/after the HetConv pass: which init approximates the convs better on real photos,
and eager latency and MACs of VGG16 at 224 with P=4.

Part 1 (init): for each model and init ("centre", "sum"), the pass's per-layer relative output error
||hetconv(x) - conv(x)|| / ||conv(x)|| on each layer's own input from real photos (scikit-image), and
the whole model's output error (before fine-tuning). Part 2 (latency): the model and its HetConv
rewrite timed in turn (medians), with FlopCounterMode MACs.

    python benchmarks/hetconv_models.py [--models vgg16,resnet50] [--part 4] [--size 224] [--runs 10]
        [--threads 2] [--json out.json] [--markdown out.md]
"""
import argparse
import statistics

import torch

import fxeff
from fxeff import data, models
from fxeff.bench import model_before_after, report


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
            model_error = next((n.split(": ")[-1] for n in rep.notes if n.startswith("model output")), "n/a")
            rows.append({"model": name, "weights": weights, "photos": len(photos), "init": init,
                         "layers": len(errors), "mean layer error": statistics.mean(errors),
                         "max layer error": max(errors), "model output error": model_error})
    return rows


def latency_rows(names, part: int, size: int, runs: int):
    rows = []
    for name in names:
        model = models.load_model(f"torchvision:{name}").eval()
        x = torch.rand(1, 3, size, size)
        rows.append(model_before_after(name, model, fxeff.transform(model, x, [fxeff.HetConv(part=part)]), x, runs))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vgg16,resnet50")
    parser.add_argument("--latency-models", default="vgg16")
    parser.add_argument("--part", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="")
    parser.add_argument("--markdown", default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with torch.no_grad():
        rows = init_rows(args.models.split(","), args.part, args.size)
    text = report(f"HetConv init on real photos, P={args.part}: relative output error before fine-tuning", rows,
                  list(rows[0].keys()), args.json.replace(".json", "_init.json") if args.json else "")
    rows = latency_rows(args.latency_models.split(","), args.part, args.size, args.runs)
    text += "\n\n" + report("Whole model, eager, batch 1, before/after the HetConv pass", rows, list(rows[0].keys()),
                            args.json.replace(".json", "_latency.json") if args.json else "")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
