"""``fxeff blocks build ARCH DATASET`` and ``fxeff blocks select --latency-ms X --memory-mb Y``: block scaling of
the trained reference models from the command line (artifact, table, plot)."""
import argparse
import os
from typing import Dict, List, Optional

import torch

from .select import InfeasibleBudgetError, Selection

OUT = os.path.join("out", "blocks")
LAST = os.path.join(OUT, "LAST")  # the artifact of the last build: select's default


def _sparsities(text: str) -> List[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated fractions, got {text!r}") from None
    if not values or values[0] != 0.0 or any(not 0.0 <= v < 1.0 for v in values) or \
            any(b <= a for a, b in zip(values, values[1:])):
        raise argparse.ArgumentTypeError(f"must be increasing fractions in [0, 1) starting at 0, got {text!r}")
    return values


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..reference import ARCHS, DATASETS
    from .descendants import DEFAULT_SPARSITIES, IMPORTANCES

    blocks = sub.add_parser("blocks", help="block scaling (LegoDNN): build swappable pruned blocks of a reference "
                                           "model, then choose one per block within budgets")
    commands = blocks.add_subparsers(dest="blocks_command", required=True)
    p = commands.add_parser("build", help="find the blocks, prune, retrain and profile their descendants; save the "
                                          "artifact, print the front, plot it")
    p.add_argument("arch", choices=ARCHS)
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("--sparsities", type=_sparsities, default=list(DEFAULT_SPARSITIES),
                   help="comma-separated, from 0 (default 0,0.2,0.4,0.6,0.8)")
    p.add_argument("--importance", choices=IMPORTANCES, default="l1")
    p.add_argument("--round-to", type=int, default=None, help="channel counts rounded to multiples of this")
    p.add_argument("--epochs", type=int, default=2, help="block retraining epochs over --train-images")
    p.add_argument("--composed-epochs", type=int, default=3,
                   help="then epochs of training the descendants composed into the model, distilling its output "
                        "(0: block retraining only, as LegoDNN)")
    p.add_argument("--train-images", type=int, default=10000)
    p.add_argument("--test-images", type=int, default=10000,
                   help="images the accuracy drops are measured on (default the whole test split: single "
                        "descendants' drops are fractions of a point)")
    p.add_argument("--batch", type=int, default=16, help="batch size of the profiled latencies (default 16, the "
                                                          "demo's: at batch 1 these small models time their calls)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help=f"artifact path (default {OUT}/ARCH-DATASET.pt)")
    p.set_defaults(func=build_command)
    p = commands.add_parser("select", help="the configuration of least accuracy drop within the budgets; with "
                                           "--measure, swapped in and timed")
    p.add_argument("--artifact", default=None, help=f"default: the last build's ({LAST})")
    p.add_argument("--latency-ms", type=float, default=None)
    p.add_argument("--memory-mb", type=float, default=None, help="parameters plus peak activations, MiB")
    p.add_argument("--switch-weight", type=float, default=0.0, help="accuracy points per MiB loaded to switch")
    p.add_argument("--measure", action="store_true", help="swap it in and measure latency and accuracy")
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=select_command)


def reference_loaders(dataset: str, train_images: int, test_images: int, batch: int = 64):
    """(training loader, shuffled with a fixed seed; test loader) over the first images of a reference dataset."""
    from .. import reference

    train = torch.utils.data.DataLoader(reference.dataset(dataset, "train", limit=train_images), batch_size=batch,
                                        shuffle=True, generator=torch.Generator().manual_seed(0))
    test = torch.utils.data.DataLoader(reference.dataset(dataset, "test", limit=test_images), batch_size=256)
    return train, test


def _describe(scalable, selection: Selection) -> str:
    names = scalable.block_names
    config = ", ".join(f"{n}={scalable.sparsities(n)[i]:g}" for n, i in zip(names, selection.choice))
    accuracy = scalable.modelled_accuracy(selection)
    return (f"modelled accuracy {accuracy:.2f}% (drop {scalable.profile.accuracy - accuracy:.2f} points), latency "
            f"{selection.latency * 1e3:.3f} ms, memory {selection.memory / 2**20:.2f} MiB; sparsities: {config}")


def plot(scalable, path: str) -> None:
    """Modelled accuracy vs latency and vs memory: the configurations on the Pareto front, and every block at one
    sparsity (uniform scaling) for comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .select import totals

    # the front in memory: the same optimiser with each choice's memory in the place of its latency
    fronts = {"latency": scalable.series(), "memory": scalable.series(by="memory")}
    uniform = []
    choices = scalable.choices()
    for s in sorted({s for n in scalable.block_names for s in scalable.sparsities(n)}):
        pick = [scalable.sparsities(n).index(s) if s in scalable.sparsities(n) else 0 for n in scalable.block_names]
        uniform.append((s, totals(choices, pick, base_latency=scalable.profile.base_latency,
                                  base_memory=scalable.profile.base_param_bytes)))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, unit, scale in ((axes[0], "latency", "ms", 1e3), (axes[1], "memory", "MiB", 1 / 2**20)):
        front = fronts[key]
        ax.plot([getattr(s, key) * scale for s in front], [scalable.modelled_accuracy(s) for s in front], "o-",
                ms=3, label=f"fxeff blocks: Pareto front ({len(front)} configurations)")
        ax.plot([getattr(u, key) * scale for _, u in uniform], [scalable.modelled_accuracy(u) for _, u in uniform],
                "s--", label="every block at one sparsity")
        for s, u in uniform:
            ax.annotate(f"{s:g}", (getattr(u, key) * scale, scalable.modelled_accuracy(u)), fontsize=7)
        ax.set_xlabel(f"modelled {key} ({unit})")
        ax.set_ylabel("modelled accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{scalable.meta.get('model', '')}: {scalable.meta.get('data', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_command(args: argparse.Namespace) -> None:
    import time

    from .. import reference
    from .build import build

    torch.set_num_threads(args.threads)
    model = reference.load(args.arch, args.dataset).eval()
    train, test = reference_loaders(args.dataset, args.train_images, args.test_images)
    start = time.perf_counter()
    scalable = build(model, train, test, sparsities=args.sparsities, importance=args.importance,
                     round_to=args.round_to, epochs=args.epochs, composed_epochs=args.composed_epochs,
                     batch=args.batch,
                     data=f"{args.dataset}: {len(train.dataset)} train / {len(test.dataset)} test images")
    seconds = time.perf_counter() - start
    scalable.meta["source"] = {"arch": args.arch, "dataset": args.dataset}
    os.makedirs(OUT, exist_ok=True)
    path = args.out or os.path.join(OUT, f"{args.arch}-{args.dataset}.pt")
    scalable.save(path)
    with open(LAST, "w") as f:
        f.write(path)
    png = os.path.splitext(path)[0] + ".png"
    plot(scalable, png)
    front = scalable.series()
    names = scalable.block_names
    print(f"{args.arch} on {args.dataset}: {len(names)} blocks, built in {seconds / 60:.1f} min on "
          f"{torch.get_num_threads()} threads; accuracy {scalable.profile.accuracy:.2f}%")
    print(f"Pareto front: {len(front)} configurations, modelled latency {front[0].latency * 1e3:.3f} to "
          f"{front[-1].latency * 1e3:.3f} ms ({front[-1].latency / front[0].latency:.2f}x)")
    for s in (front[0], front[len(front) // 2], front[-1]):
        print("  " + _describe(scalable, s))
    print(f"accuracy drops measured with {scalable.profile.evaluation_macs / scalable.profile.seed_evaluation_macs:.3f}"
          f" of the MACs of three whole evaluations per entry (the seed's)")
    print(f"artifact: {path}\nplot: {png}")


def _model_for(data: Dict) -> torch.nn.Module:
    from .. import reference

    source = data["meta"].get("source")
    if not source:
        raise ValueError("fxeff blocks select: the artifact names no reference model (built by the Python API: use "
                         "fxeff.blocks.load(path, model, x))")
    return reference.load(source["arch"], source["dataset"]).eval()


def select_command(args: argparse.Namespace) -> Optional[int]:
    from .. import bench, reference
    from ..cli import path_or_last
    from .build import load
    from .scalable import read_artifact

    torch.set_num_threads(args.threads)
    path = path_or_last(args.artifact, LAST, "fxeff blocks select: no --artifact", "fxeff blocks build ARCH DATASET")
    data = read_artifact(path)
    model = _model_for(data)
    source = data["meta"]["source"]
    x = reference.first_images(source["dataset"], "test", 2)
    scalable = load(path, model, x)
    latency = None if args.latency_ms is None else args.latency_ms / 1e3
    memory = None if args.memory_mb is None else int(args.memory_mb * 2**20)
    try:
        chosen = scalable.select(latency, memory, args.switch_weight)
    except InfeasibleBudgetError as error:
        print(f"infeasible: {error}")
        print("closest: " + _describe(scalable, error.closest))
        return 1
    print("chosen: " + _describe(scalable, chosen))
    if args.measure:
        from ..training import accuracy

        scalable.scale(chosen)
        _, test = reference_loaders(source["dataset"], 1, args.test_images)
        one = x[:1]
        times = bench.interleaved([lambda: model(one), lambda: scalable(one)], 21)
        measured, original = 100 * accuracy(scalable, test), 100 * accuracy(model, test)
        print(f"measured: accuracy {measured:.2f}% (original {original:.2f}%), latency {times[1] * 1e3:.3f} ms "
              f"(original {times[0] * 1e3:.3f} ms, batch 1); swap took {scalable.last_swap_seconds * 1e3:.3f} ms")
    return None
