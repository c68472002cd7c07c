"""Glance and focus (GFNet, fxeff.glance) over the trained ResNet-20 on Cluttered Fashion-MNIST (64x64 canvases,
the item at a random place among clutter), by part (--parts, comma list).

Part "train": for each of --policies, a GlanceFocus over the committed ResNet-20 (fxeff.reference): the glance at
--glance-size, then --steps - 1 patches of --patch-size at full resolution, a GRU head; trained with
fxeff.glance.train (fxeff.training.fit, one stage for every policy) for --epochs on the first --train-images
training images, distilled from the full-resolution model; saved with its MACs per step to
out/glance/resnet20-cluttered-fashion-mnist-POLICY.pt (fxeff.glance.command.train_reference, as `fxeff glance
train`). The minutes (wall and CPU) are reported.

Part "curve": per policy (the checkpoints of "train"), every step's logits on 5000 held-out training images
(the split's last 5000: never trained on, not augmented) and on the test split. The budget curve: for each budget
(a fraction of the full-resolution model's MACs), thresholds calibrated on the held-out images by bisection
(fxeff.glance.calibrate) and applied to the test images: accuracy, the MACs realised against those asked. Where
the first patch lands: the share of the item's own pixels it covers (the generator knows the item's place).
Targets: within 0.3 points of the full-resolution model at <= 40% of its MACs; realised MACs within 3% of the
budget; the first patch covering >= 90% of the item on >= 95% of test images (learned or saliency; random is
the floor); saliency within 1 point of learned at equal MACs. With --latency, each point's real early exit is
timed too (the first 256 test images at once, against the full model; both BatchNorm-folded in channels_last):
the plot's second panel, accuracy against measured latency.

Part "exit": real early exit (fxeff.glance.early_exit: the images that have left stop computing) at the
thresholds of --exit-budget, on CPU at batch 256 and 1, against the full-resolution model on the same images
(both in the inference form, BatchNorm folded: GlanceFocus.fold_batchnorm, and in --memory-format, channels_last by
default; interleaved medians, fxeff.bench), also at batch 16, the demo's:
wall-clock speedup / MAC speedup (targets >= 0.75 at batch 256, >= 0.6 at batch 1), and the crop's share of a
focus step's time (target <= 2%).

    .venv/bin/python benchmarks/glance.py --parts train,curve,exit [--policies random,saliency,learned]
        [--epochs 3] [--train-images 20000] [--json out.json] [--markdown out.md] [--plot curve.png]
"""

import os

import torch

from fxeff import reference
from fxeff.bench import environment, interleaved, macs, run_parts, script_parser

ARCH, DATASET = "resnet20", "cluttered-fashion-mnist"
BUDGETS = (0.25, 0.3, 0.35, 0.4, 0.5, 0.6)


def _images(split: str, start: int, stop: int):
    """(images [n, 1, 64, 64], labels [n]) of items start..stop-1 of the split, and the dataset."""
    data = reference.dataset(DATASET, split)
    items = [data[i] for i in range(start, stop)]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items]), data


def train_part(args):
    from fxeff.glance.command import train_reference

    rows = []
    for policy in args.policies:
        record = train_reference(ARCH, DATASET, policy, patch_size=args.patch_size, glance_size=args.glance_size,
                                 steps=args.steps, epochs=args.epochs, train_images=args.train_images, lr=args.lr,
                                 batch=args.batch_size, seed=args.seed, ppo_stages=args.ppo_stages)
        meta = record["meta"]
        rows.append({"policy": policy, "epochs": args.epochs if policy != "ppo" else
                     f"{args.epochs}+{args.ppo_stages[0]}+{args.ppo_stages[1]}", "images": args.train_images,
                     "final loss": meta["loss"][-1], "wall min": meta["train_seconds"] / 60,
                     "CPU min": meta["train_cpu_seconds"] / 60,
                     "MACs per step (M)": ", ".join(f"{m / 1e6:.2f}" for m in record["macs"])})
    return (f"Glance and focus training (ResNet-20 encoders, glance {args.glance_size}, patches {args.patch_size}, "
            f"{args.steps} steps)"), rows, ["policy", "epochs", "images", "final loss", "wall min", "CPU min",
                                           "MACs per step (M)"]


def _load(policy: str):
    from fxeff.glance.command import checkpoint_path, load_reference

    return load_reference(checkpoint_path(ARCH, DATASET, policy))[0]


def curve_part(args):
    from fxeff import glance

    from fxeff.glance.command import HOLDOUT, held_out_logits

    test_x, test_y, test_data = _images("test", 0, args.test_images)
    full = reference.load(ARCH, DATASET)
    full_macs = macs(lambda: full(test_x[:1]))
    with torch.no_grad():
        full_acc = 100.0 * float((torch.cat([full(b) for b in test_x.split(500)]).argmax(1) == test_y)
                                 .double().mean())
    rows = [{"policy": "full resolution", "asked": 1.0, "MACs": 1.0, "accuracy": full_acc,
             "vs full (points)": 0.0, "latency / full": 1.0 if args.latency else ""}]
    curves, latency = {}, {}
    timed = test_x[:256].contiguous(memory_format=torch.channels_last)
    fast_full = _inference_form(full)
    for policy in args.policies:
        gf = _load(policy)
        step = gf.macs_per_step
        hold = held_out_logits(gf, DATASET)
        with torch.no_grad():
            test = torch.cat([gf(b) for b in test_x.split(500)], dim=1)
        every = [100.0 * float((test[t].argmax(1) == test_y).double().mean()) for t in range(gf.steps)]
        cumulative = torch.tensor(step, dtype=torch.float64).cumsum(0) / full_macs
        budgets = [b * full_macs for b in BUDGETS if cumulative[0] <= b <= cumulative[-1]]
        points = glance.budget_curve(gf, hold, test, test_y, step, budgets)
        curves[policy] = points
        ratios = {}
        if args.latency:  # each point's real early exit at batch 256 against the full model, both fast forms
            fast = _inference_form(gf)
            fast_hold = held_out_logits(fast, DATASET)  # thresholds after folding (the fingerprint changed)
            for pt in points:
                th = glance.calibrate(fast, fast_hold, step, budget=pt.asked)
                full_s, exit_s = interleaved([lambda: fast_full(timed),
                                              lambda: glance.early_exit(fast, timed, th, step)], args.runs)
                ratios[pt.asked] = exit_s / full_s
            latency[policy] = [(ratios[pt.asked], pt.accuracy) for pt in points]
        for t in range(gf.steps):
            rows.append({"policy": policy, "asked": "", "MACs": float(cumulative[t]), "accuracy": every[t],
                         "vs full (points)": every[t] - full_acc, "exits": f"all after step {t}"})
        for pt in points:
            rows.append({"policy": policy, "asked": pt.asked / full_macs, "MACs": pt.macs / full_macs,
                         "accuracy": pt.accuracy, "vs full (points)": pt.accuracy - full_acc,
                         "realised / asked": pt.macs / pt.asked, "latency / full": ratios.get(pt.asked, ""),
                         "exits": "/".join(f"{100 * s:.0f}" for s in pt.exit_shares) + "%" +
                         (f", no exit at {pt.no_exit_steps}" if pt.no_exit_steps else "")})
        if gf.steps > 1:
            coverage = glance.item_coverage(glance.first_corners(gf, test_x), gf.patch_size, test_data,
                                            range(args.test_images))
            rows.append({"policy": policy, "asked": "first patch", "exits": f"covers >= 90% of the item on "
                         f"{100 * float((coverage >= 0.9).double().mean()):.1f}% of images (median "
                         f"{100 * float(coverage.median()):.0f}%)"})
    if args.plot:
        from fxeff.data import CLASSES

        glance.plot_curves(curves, full_acc, full_macs, args.plot, latency=latency or None,
                           title="Glance and focus over ResNet-20, Cluttered Fashion-MNIST: thresholds for each "
                                 "budget calibrated on held-out images" + (
                                     "; latency: real early exit at batch 256 against the full model (BatchNorm "
                                     "folded, channels_last)" if latency else ""))
        for policy in args.policies:  # the first 8 test images, step by step
            glance.visualise(_load(policy), test_x[:8], f"{os.path.splitext(args.plot)[0]}-steps-{policy}.png",
                             test_y[:8], CLASSES)
    return (f"Glance and focus on Cluttered Fashion-MNIST: budget curves ({args.test_images} test images, "
            f"thresholds calibrated on {HOLDOUT} held-out training images; MACs as a fraction of the "
            f"full-resolution ResNet-20's {full_macs / 1e6:.1f} M" + (
                f"; latency / full: real early exit on the first 256 test images at once against the full model, "
                f"both BatchNorm-folded in channels_last, medians of {args.runs} interleaved runs" if args.latency
                else "") + ")"), rows, \
        ["policy", "asked", "MACs", "realised / asked", "accuracy", "vs full (points)", "latency / full", "exits"]


def _inference_form(model, memory_format=torch.channels_last):
    """A copy of ``model`` (a classifier or a GlanceFocus) in the inference form the timings use: BatchNorm
    folded, in ``memory_format``."""
    import copy

    from torch.fx.experimental.optimization import fuse

    from fxeff.glance import GlanceFocus

    model = copy.deepcopy(model).eval()
    model = model.fold_batchnorm() if isinstance(model, GlanceFocus) else fuse(model)
    return model.to(memory_format=memory_format)


def exit_part(args):
    from fxeff import glance
    from fxeff.glance.command import held_out_logits
    from fxeff.glance.crop import crop

    test_x, _, _ = _images("test", 0, 256)
    form = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}[args.memory_format]
    test_x = test_x.contiguous(memory_format=form)
    full = _inference_form(reference.load(ARCH, DATASET), form)  # both BatchNorm-folded, in --memory-format
    full_macs = macs(lambda: full(test_x[:1]))
    rows = []
    for policy in args.policies:
        gf = _inference_form(_load(policy), form)
        hold = held_out_logits(gf, DATASET)
        th = glance.calibrate(gf, hold, gf.macs_per_step, budget=args.exit_budget * full_macs)
        for batch in (256, 16, 1):  # 16: the demo's batch (no target in the issue)
            target = {256: 0.75, 1: 0.6}.get(batch)
            images = [test_x[i:i + batch] for i in range(0, 256, batch)][:max(1, 64 // batch)]
            full_s, exit_s = interleaved([lambda: [full(b) for b in images],
                                          lambda: [glance.early_exit(gf, b, th, gf.macs_per_step) for b in images]],
                                         args.runs)
            exits = [glance.early_exit(gf, b, th, gf.macs_per_step) for b in images]  # the timed images' exits
            realised = float(torch.cat([e.macs for e in exits]).mean())
            steps = torch.cat([e.step for e in exits])
            mac_speedup = full_macs / realised
            rows.append({"policy": policy, "batch": batch, "full ms": full_s * 1e3 / len(images),
                         "early exit ms": exit_s * 1e3 / len(images), "wall speedup": full_s / exit_s,
                         "MAC speedup": mac_speedup, "wall / MAC": full_s / exit_s / mac_speedup,
                         "target": target if target else "",
                         "target met": full_s / exit_s / mac_speedup >= target if target else "",
                         "exit steps": "/".join(str(int((steps == t).sum())) for t in range(gf.steps))})
        if gf.steps > 1:  # the crop's share of a focus step, batch 256
            with torch.no_grad():
                state = gf.glance(test_x)
                corners = gf.corners(dict(state), 1)
            step_s, crop_s = interleaved([lambda: gf.focus(test_x, dict(state), 1),
                                          lambda: crop(test_x, corners, gf.patch_size)], args.runs)
            rows.append({"policy": policy, "batch": 256, "early exit ms": step_s * 1e3,
                         "exit steps": f"crop {crop_s * 1e3:.3f} ms = {100 * crop_s / step_s:.2f}% of a focus step "
                                       f"(target <= 2%)", "target met": crop_s / step_s <= 0.02})
    return (f"Glance and focus: real early exit on {environment().get('device', 'cpu')} at {args.exit_budget:.0%} "
            f"of the full-resolution model's MACs, against it on the same images (both with BatchNorm folded, in "
            f"{args.memory_format}; medians of {args.runs} interleaved runs)"), \
        rows, ["policy", "batch", "full ms", "early exit ms", "wall speedup", "MAC speedup", "wall / MAC", "target",
               "target met", "exit steps"]


PARTS = {"train": train_part, "curve": curve_part, "exit": exit_part}

def main(argv=None):

    parser = script_parser(__doc__)
    parser.add_argument("--parts", default="curve", help=f"comma list of: {', '.join(PARTS)}")
    parser.add_argument("--policies", default="random,saliency,learned", type=lambda s: [p for p in s.split(",") if p])
    parser.add_argument("--patch-size", type=int, default=32)
    parser.add_argument("--glance-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="train part: epochs (ppo: of its warm-up)")
    parser.add_argument("--ppo-stages", type=lambda t: tuple(int(v) for v in t.split(",")), default=(2, 1),
                        help="train part, ppo: epochs of PPO, then of fine-tuning")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-images", type=int, default=20000)
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--exit-budget", type=float, default=0.4, help="exit part: MACs budget, fraction of full")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--memory-format", choices=("channels_last", "contiguous"), default="channels_last",
                        help="exit part: the memory format of both models and the images (channels_last: the "
                             "faster CPU format for either at batch 1, 1.66x for the full model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latency", action="store_true", help="curve part: time each point's real early exit "
                        "(batch 256) against the full model, a column and the plot's second panel")
    parser.add_argument("--plot", default="", help="curve part: a PNG of the budget curves, and beside it one per "
                                                   "policy of the first test images step by step")
    run_parts(parser, PARTS, argv)


if __name__ == "__main__":
    main()
