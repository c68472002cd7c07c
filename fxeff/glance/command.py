"""``fxeff glance train ARCH DATASET`` and ``fxeff glance eval --budget F``: glance and focus over the trained
reference models from the command line (checkpoint, budget curve point, real early exit timed)."""
import argparse
import os
import time
from typing import Any, Dict, Optional, Sequence

import torch

OUT = os.path.join("out", "glance")
LAST = os.path.join(OUT, "LAST")  # the checkpoint of the last training: eval's default
HOLDOUT = 5000  # the training split's last images: never trained on, they calibrate the thresholds


def checkpoint_path(arch: str, dataset: str, policy: str) -> str:
    return os.path.join(OUT, f"{arch}-{dataset}-{policy}.pt")


def shipped_path(arch: str, dataset: str, policy: str) -> str:
    """Where a glance and focus checkpoint that ships with fxeff lives (beside the reference checkpoints; the demo
    reads ResNet-20's on Cluttered Fashion-MNIST with the saliency policy, written by `benchmarks/glance.py --parts
    train --policies saliency --train-images 55000 --epochs 5`: 13 minutes on 2 cores)."""
    from ..reference import CHECKPOINT_DIR

    return os.path.join(CHECKPOINT_DIR, f"{arch}-{dataset}-glance-{policy}.pt")


def train_reference(arch: str, dataset: str, policy: str, *, patch_size: int, glance_size: Optional[int] = None,
                    steps: int = 3, head: str = "gru", epochs: int = 3, train_images: int = 20000,
                    lr: float = 0.02, batch: int = 128, seed: int = 0, out: Optional[str] = None,
                    progress: bool = True, ppo_stages: Sequence[int] = (2, 1), saliency: str = "activation"
                    ) -> Dict[str, Any]:
    """Glance and focus over the committed reference model ``arch`` on ``dataset``: built (``GlanceFocus``),
    trained (``fxeff.glance.train``, distilled from the model itself) on the first ``train_images`` training
    images (the split's last HOLDOUT stay out: they calibrate), saved with its MACs per step to ``out`` (default
    out/glance/ARCH-DATASET-POLICY.pt). Policy "ppo" trains by GFNet's three stages (``train_ppo``): ``epochs`` of
    warm-up, then ``ppo_stages`` epochs of PPO and of fine-tuning. Returns the saved record plus the path and the
    minutes it took."""
    from .. import reference
    from ..training import loader
    from .evaluate import save
    from .model import GlanceFocus
    from .ppo import train_ppo
    from .train import train

    data = reference.dataset(dataset, "train")
    if not 1 <= train_images <= len(data) - HOLDOUT:
        raise ValueError(f"fxeff glance train: train_images must be in [1, {len(data) - HOLDOUT}] (the split's last "
                         f"{HOLDOUT} images calibrate the thresholds), got {train_images}")
    example = reference.first_images(dataset, "test", 2)
    torch.manual_seed(seed)
    gf = GlanceFocus(reference.load(arch, dataset), example, patch_size, steps, glance_size=glance_size, head=head,
                     policy=policy, seed=seed, saliency=saliency)
    teacher = reference.load(arch, dataset)
    subset = torch.utils.data.Subset(data, range(train_images))
    wall, cpu = time.perf_counter(), time.process_time()
    data_loader = loader(subset, batch, True, seed)
    if policy == "ppo":
        stages = train_ppo(gf, data_loader, (epochs, *ppo_stages), teacher=teacher, lr=lr, progress=progress)
        history = {"loss": [v for h in stages.values() for v in h["loss"]]}
    else:
        history = train(gf, data_loader, epochs, teacher=teacher, lr=lr, progress=progress)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    path = out or checkpoint_path(arch, dataset, policy)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    record = save(gf.eval(), path, example, {
        "arch": arch, "dataset": dataset, "epochs": epochs, "train_images": train_images, "lr": lr, "batch": batch,
        "seed": seed, "ppo_stages": list(ppo_stages) if policy == "ppo" else [], "train_seconds": wall,
        "train_cpu_seconds": cpu, "threads": torch.get_num_threads(),
        "loss": history["loss"]})
    return dict(record, path=path, model=gf)


def load_reference(path: str):
    """(the GlanceFocus saved at ``path`` by ``train_reference``, the reference model it was built from)."""
    from .. import reference
    from .evaluate import load

    record = torch.load(path, map_location="cpu", weights_only=True)
    meta = record.get("meta", {}) if isinstance(record, dict) else {}
    if "arch" not in meta or "dataset" not in meta:
        raise ValueError(f"fxeff glance eval: {path} names no reference model (saved by the Python API: use "
                         f"fxeff.glance.load(path, model, example))")
    model = reference.load(meta["arch"], meta["dataset"])
    return load(path, model, reference.first_images(meta["dataset"], "test", 2)), model


def held_out_logits(gf, dataset: str, batch: int = 500, images: int = HOLDOUT) -> torch.Tensor:
    """Every step's logits [T, images, classes] on the training split's last ``images`` images (at most HOLDOUT:
    never trained on)."""
    from .. import reference
    from .inference import anytime

    if not 1 <= images <= HOLDOUT:
        raise ValueError(f"fxeff.glance.command.held_out_logits: images must be in [1, {HOLDOUT}], got {images}")
    data = reference.dataset(dataset, "train")
    held = torch.utils.data.Subset(data, range(len(data) - images, len(data)))
    return anytime(gf, torch.utils.data.DataLoader(held, batch_size=batch))[0]


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..reference import ARCHS, DATASETS
    from .model import HEADS, POLICIES, SALIENCY_MAPS

    parser = sub.add_parser("glance", help="glance and focus (GFNet): a downscaled glance, then a few "
                                           "full-resolution patches, with real early exit")
    commands = parser.add_subparsers(dest="glance_command", required=True)
    p = commands.add_parser("train", help="build glance and focus over a reference model, train it, save it")
    p.add_argument("arch", choices=ARCHS)
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("--policy", choices=POLICIES, default="learned")
    p.add_argument("--head", choices=HEADS, default="gru")
    p.add_argument("--saliency", choices=SALIENCY_MAPS, default="activation",
                   help="the map the saliency policy centres on and the learned one starts from: the feature map "
                        "summed over channels (focused convolution's) or the class activation map")
    p.add_argument("--patch-size", type=int, default=32)
    p.add_argument("--glance-size", type=int, default=None, help="default: the patch size")
    p.add_argument("--steps", type=int, default=3, help="T: the glance, then T - 1 patches")
    p.add_argument("--epochs", type=int, default=3, help="(ppo: of the warm-up with random patches)")
    p.add_argument("--ppo-stages", type=lambda t: tuple(int(v) for v in t.split(",")), default=(2, 1),
                   help="ppo only: epochs of PPO, then of fine-tuning (default 2,1)")
    p.add_argument("--train-images", type=int, default=20000)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help=f"checkpoint path (default {OUT}/ARCH-DATASET-POLICY.pt)")
    p.set_defaults(func=train_command)
    p = commands.add_parser("eval", help="calibrate thresholds for a MACs budget on held-out images, then measure "
                                         "accuracy and real early exit on the test split")
    p.add_argument("--checkpoint", default=None, help=f"default: the last training's ({LAST})")
    p.add_argument("--budget", type=float, required=True,
                   help="MACs per image as a fraction of the full-resolution model's (e.g. 0.4)")
    p.add_argument("--test-images", type=int, default=10000)
    p.add_argument("--batch", type=int, default=256, help="batch size of the timed early exit")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=eval_command)


def train_command(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    record = train_reference(args.arch, args.dataset, args.policy, patch_size=args.patch_size,
                             glance_size=args.glance_size, steps=args.steps, head=args.head, epochs=args.epochs,
                             train_images=args.train_images, lr=args.lr, out=args.out, ppo_stages=args.ppo_stages,
                             saliency=args.saliency)
    os.makedirs(OUT, exist_ok=True)
    with open(LAST, "w") as f:
        f.write(record["path"])
    meta = record["meta"]
    print(f"{args.arch} on {args.dataset}, policy {args.policy}: trained {args.epochs} epochs on "
          f"{args.train_images} images in {meta['train_seconds'] / 60:.1f} min ({meta['train_cpu_seconds'] / 60:.1f} "
          f"CPU-min, {torch.get_num_threads()} threads); loss per epoch "
          + ", ".join(f"{v:.3f}" for v in meta["loss"]))
    print("MACs per step (M): " + ", ".join(f"{m / 1e6:.2f}" for m in record["macs"]))
    print(f"checkpoint: {record['path']}")


def eval_command(args: argparse.Namespace) -> Optional[int]:
    from .. import bench, reference
    from ..cli import path_or_last
    from .evaluate import budget_curve
    from .inference import anytime, calibrate, early_exit

    torch.set_num_threads(args.threads)
    path = path_or_last(args.checkpoint, LAST, "fxeff glance eval: no --checkpoint", "fxeff glance train ARCH DATASET")
    from torch.fx.experimental.optimization import fuse

    gf, model = load_reference(path)
    gf.fold_batchnorm()
    model = fuse(model)  # both timed in the inference form (BatchNorm folded)
    dataset = gf.meta["dataset"]
    test = reference.dataset(dataset, "test", limit=args.test_images)
    x = torch.stack([test[i][0] for i in range(min(args.batch, len(test)))])
    full_macs = bench.macs(lambda: model(x[:1]))
    steps = gf.macs_per_step
    cumulative = torch.tensor(steps, dtype=torch.float64).cumsum(0)
    if not float(cumulative[0]) <= args.budget * full_macs <= float(cumulative[-1]):
        raise ValueError(f"fxeff glance eval: --budget expected a fraction of the full model's MACs in "
                         f"[{float(cumulative[0]) / full_macs:.3f}, {float(cumulative[-1]) / full_macs:.3f}] (the "
                         f"glance alone to every step), got {args.budget}")
    held = held_out_logits(gf, dataset)
    logits, labels = anytime(gf, torch.utils.data.DataLoader(test, batch_size=500))
    point = budget_curve(gf, held, logits, labels, steps, [args.budget * full_macs])[0]
    with torch.no_grad():
        full_accuracy = 100.0 * float(torch.cat([model(b) for b, _ in torch.utils.data.DataLoader(
            test, batch_size=500)]).argmax(1).eq(labels).double().mean())
    thresholds = calibrate(gf, held, steps, budget=args.budget * full_macs)
    full_s, exit_s = bench.interleaved([lambda: model(x), lambda: early_exit(gf, x, thresholds, steps)], 11)
    realised = float(early_exit(gf, x, thresholds, steps).macs.mean())
    print(f"{path}: policy {gf.policy_kind}, {gf.steps} steps, glance {gf.glance_size}, patches {gf.patch_size}")
    print(f"budget {args.budget:.3f} of {full_macs / 1e6:.2f} M MACs: realised {point.macs / full_macs:.3f} on "
          f"{len(test)} test images (calibration {point.calibration_macs / full_macs:.3f}); exits per step "
          + "/".join(f"{100 * s:.0f}%" for s in point.exit_shares)
          + (f"; no exit at steps {point.no_exit_steps}" if point.no_exit_steps else ""))
    print(f"accuracy {point.accuracy:.2f}% (full resolution {full_accuracy:.2f}%, "
          f"{point.accuracy - full_accuracy:+.2f} points)")
    print(f"real early exit, batch {len(x)}: {exit_s * 1e3:.2f} ms against {full_s * 1e3:.2f} ms for the full model "
          f"({full_s / exit_s:.2f}x; MACs {full_macs / realised:.2f}x)")
    return None


__all__ = ["train_reference", "load_reference", "held_out_logits", "checkpoint_path", "shipped_path", "add_parser",
           "HOLDOUT"]
