"""Block-grained scaling (LegoDNN, fxeff.blocks): benchmarks by part (--parts, comma list).

Part "solve": the online optimiser. fxeff.blocks.select (an exact dynamic program in numpy, in-process) against
scipy.optimize.milp (HiGHS, in-process) on the same random instances: 10 blocks x 5 choices and 20 x 8, both
budgets, each without and with switching cost (``current`` drawn at random, 0.02 points per MiB loaded). A block's
choice j is a pruned descendant: faster and smaller than choice 0 and with a larger accuracy drop, with noise.
Budgets are drawn uniformly between the smallest and the largest achievable totals, latency and memory
independently, so some instances cannot meet both (select raises InfeasibleBudgetError, milp reports
infeasible: they count as agreeing when both say so). Each instance is solved once by each, in turn, timed with
time.perf_counter from the list of Choices (milp's time includes building its matrices); median and p99 per row.
A mismatch: the optima differ by more than 1e-6, or one finds a configuration where the other says there is none.
scipy issue #24141 (milp can return an infeasible answer as optimal): milp's answer is checked against the budgets
(1e-12 relative on latency, exact on memory) and an instance where it fails is counted and not compared.
The seed (LegoDNN) shells out to a CBC solver, ~0.32 s per solve (not measured here). Targets: select's p99
<= 5 ms at 10 x 5 and <= 50 ms at 20 x 8. CPU only (--device is not used).

    .venv/bin/python benchmarks/blocks.py [--parts solve] [--instances 200] [--seed 0] [--json out.json]
        [--markdown out.md]
"""
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fxeff.bench import report, run_parts, script_parser  # noqa: E402

from fxeff.blocks.select import Choice, InfeasibleBudgetError, select, totals  # noqa: E402

SOLVE_COLUMNS = ["blocks x choices", "switching", "instances", "feasible", "select median ms", "select p99 ms",
                 "milp median ms", "milp p99 ms", "milp / select (median)", "mismatches", "milp infeasible answers",
                 "target p99 ms", "target met"]
SHAPES = [(10, 5, 5.0), (20, 8, 50.0)]  # blocks, choices, select's p99 target in ms
SWITCH_WEIGHT = 0.02  # points per MiB loaded
MIB = 2 ** 20


def instance(rng, n_blocks, n_choices, switching):
    """Random blocks (choice 0 unpruned; later choices faster, smaller, worse), budgets and select's keywords."""
    base_latency, base_memory = float(rng.uniform(1e-3, 3e-3)), int(rng.integers(1 << 20, 8 << 20))
    l0 = rng.uniform(1e-3, 10e-3, n_blocks)
    m0 = rng.integers(1 << 20, 50 << 20, n_blocks)
    s = np.sort(rng.uniform(0, 0.9, (n_blocks, n_choices)), axis=1)
    s[:, 0] = 0
    lat = l0[:, None] * (1 - s * rng.uniform(0.5, 1.0, s.shape)) + rng.uniform(0, 2e-4, s.shape)
    mem = (m0[:, None] * (1 - s * rng.uniform(0.6, 1.0, s.shape))).astype(np.int64)
    drop = s ** 2 * rng.uniform(0, 6, (n_blocks, 1)) + rng.normal(0, 0.05, s.shape)
    drop[:, 0] = rng.normal(0, 0.01, n_blocks)
    params = (mem * rng.uniform(0.3, 0.7, s.shape)).astype(np.int64)
    blocks = [[Choice(float(drop[b, j]), float(lat[b, j]), int(mem[b, j]), int(params[b, j]))
               for j in range(n_choices)] for b in range(n_blocks)]
    latency = base_latency + float(rng.uniform(lat.min(1).sum(), lat.max(1).sum()))
    memory = base_memory + int(rng.uniform(mem.min(1).sum(), mem.max(1).sum()))
    kw = {"base_latency": base_latency, "base_memory": base_memory}
    if switching:
        kw.update(current=[int(v) for v in rng.integers(0, n_choices, n_blocks)], switch_weight=SWITCH_WEIGHT)
    return blocks, latency, memory, kw


def milp_solve(blocks, latency, memory, base_latency=0.0, base_memory=0, current=None, switch_weight=0.0):
    """scipy.optimize.milp: binary x[b, j], one choice per block, the two budgets (rows normalised by them).
    Returns a choice tuple, or None when milp finds the problem infeasible."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    sizes = [len(b) for b in blocks]
    start = np.cumsum([0] + sizes)
    flat = [c for b in blocks for c in b]
    cost = np.array([c.drop for c in flat])
    if current is not None and switch_weight:
        for b, j in enumerate(current):
            load = np.array([0 if k == j else c.load_bytes for k, c in enumerate(blocks[b])], dtype=np.float64)
            cost[start[b]:start[b + 1]] += switch_weight * load / MIB
    one = np.zeros((len(blocks), len(flat)))
    for b in range(len(blocks)):
        one[b, start[b]:start[b + 1]] = 1
    rows = [LinearConstraint(one, 1, 1),
            LinearConstraint([[c.latency / (latency - base_latency) for c in flat]], -np.inf, 1),
            LinearConstraint([[c.memory / (memory - base_memory) for c in flat]], -np.inf, 1)]
    res = milp(cost, constraints=rows, integrality=np.ones(len(flat)), bounds=Bounds(0, 1),
               options={"mip_rel_gap": 0})
    if res.x is None:
        if res.status != 2:
            raise RuntimeError(f"blocks.py: milp failed: {res.message}")
        return None
    return tuple(int(np.argmax(res.x[start[b]:start[b + 1]])) for b in range(len(blocks)))


def evaluate(blocks, choice, latency, memory, base_latency=0.0, base_memory=0, current=None, switch_weight=0.0):
    """(objective, fits the budgets) of a configuration (fxeff.blocks.select.totals: summed as select sums)."""
    sel = totals(blocks, choice, base_latency=base_latency, base_memory=base_memory, current=current,
                 switch_weight=switch_weight)
    return sel.objective, sel.latency <= latency * (1 + 1e-12) and sel.memory <= memory


def solve_part(args):
    rows = []
    for n_blocks, n_choices, target in SHAPES:
        for switching in (False, True):
            rng = np.random.default_rng([args.seed, n_blocks, n_choices, switching])
            cases = [instance(rng, n_blocks, n_choices, switching) for _ in range(args.instances)]
            for blocks, latency, memory, kw in cases[:3]:  # warm-up (imports, caches)
                try:
                    select(blocks, latency, memory, **kw)
                except InfeasibleBudgetError:
                    pass
                milp_solve(blocks, latency, memory, **kw)
            t_select, t_milp = [], []
            feasible = mismatches = skipped = 0
            for i, (blocks, latency, memory, kw) in enumerate(cases):
                def run_select():
                    try:
                        return select(blocks, latency, memory, **kw)
                    except InfeasibleBudgetError:
                        return None

                def run_milp():
                    return milp_solve(blocks, latency, memory, **kw)

                out = {}
                turns = [("select", run_select, t_select), ("milp", run_milp, t_milp)]
                for name, fn, times in turns[::-1] if i % 2 else turns:  # each goes first in half the instances
                    start = time.perf_counter()
                    out[name] = fn()
                    times.append(time.perf_counter() - start)
                ours, theirs = out["select"], out["milp"]
                feasible += ours is not None
                if theirs is None or ours is None:
                    mismatches += (theirs is None) != (ours is None)
                    continue
                objective, fits = evaluate(blocks, theirs, latency, memory, **kw)
                if not fits:  # scipy #24141
                    skipped += 1
                elif abs(objective - ours.objective) > 1e-6:
                    mismatches += 1
            ms_s, ms_m = 1e3 * np.array(t_select), 1e3 * np.array(t_milp)
            p99 = float(np.percentile(ms_s, 99))
            rows.append({"blocks x choices": f"{n_blocks} x {n_choices}", "switching": switching,
                         "instances": len(cases), "feasible": feasible, "select median ms": float(np.median(ms_s)),
                         "select p99 ms": p99, "milp median ms": float(np.median(ms_m)),
                         "milp p99 ms": float(np.percentile(ms_m, 99)),
                         "milp / select (median)": float(np.median(ms_m) / np.median(ms_s)),
                         "mismatches": mismatches, "milp infeasible answers": skipped, "target p99 ms": target,
                         "target met": p99 <= target})
            print(f"{n_blocks} x {n_choices} switching={switching}: select median {rows[-1]['select median ms']:.2f} "
                  f"ms, p99 {p99:.2f}; milp median {rows[-1]['milp median ms']:.1f} ms; mismatches {mismatches}",
                  flush=True)
    title = (f"Block selection: fxeff.blocks.select (exact DP, numpy) vs scipy.optimize.milp (HiGHS), both budgets, "
             f"{args.instances} random instances per row, per-solve times")
    return title, rows, SOLVE_COLUMNS


# ---------------------------------------------------------------- the other parts: real models

def _tv(name):
    import torchvision

    if name == "fcn_resnet50":
        return torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None)
    if name == "fasterrcnn_backbone":
        return torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).backbone
    return getattr(torchvision.models, name)()


GRAPH_MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "densenet121", "efficientnet_b0",
                "fcn_resnet50", "fasterrcnn_backbone"]
GRAPH_COLUMNS = ["model", "convs", "blocks", "convs in blocks", "prunable convs", "largest block (convs)",
                 "transform s (median of 3)", "target s", "target met"]


def graph_part(args):
    """Blocks found on each listed model (224x224, batch 1) and the time of fxeff.transform with the Blocks pass
    (symbolic trace included); target: under 1 s for ResNet-50."""
    import fxeff
    from fxeff import reference

    rows = []
    models = [(f"reference {a}", lambda a=a: reference.build(a, "cluttered-fashion-mnist"), (1, 1, 64, 64))
              for a in reference.ARCHS] + [(n, lambda n=n: _tv(n), (1, 3, 224, 224)) for n in GRAPH_MODELS]
    for name, make, shape in models:
        torch.manual_seed(0)
        model = make().eval()
        x = torch.randn(shape)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            gm = fxeff.transform(model, x, [fxeff.Blocks()])
            times.append(time.perf_counter() - start)
        info = gm.fxeff_blocks
        convs = sum(len(b["convs"]) for b in info) + len(gm.fxeff_report.skipped)
        seconds = float(np.median(times))
        rows.append({"model": name, "convs": convs, "blocks": len(info),
                     "convs in blocks": sum(len(b["convs"]) for b in info),
                     "prunable convs": sum(len(b["prunable"]) for b in info),
                     "largest block (convs)": max(len(b["convs"]) for b in info),
                     "transform s (median of 3)": seconds, "target s": 1.0 if name == "resnet50" else "",
                     "target met": (seconds < 1.0) if name == "resnet50" else ""})
        print(f"{name}: {len(info)} blocks, {seconds:.2f} s", flush=True)
    return "The blocks pass on the listed models (fxeff.transform with fxeff.Blocks(), 224x224 or 64x64)", rows, \
        GRAPH_COLUMNS


def _scalable_without_training(model, x, sparsities, round_to=None, batch=1, runs=5):
    """A ScalableModel of ``model`` with descendants at ``sparsities`` pruned but not retrained, profiled on two
    random labelled images (for timings and sizes only: its drops mean nothing)."""
    from fxeff.blocks.build import _outline
    from fxeff.blocks.profile import profile
    from fxeff.blocks.scalable import ScalableModel

    settings = {"sparsities": list(sparsities), "importance": "l1", "round_to": round_to, "max_ratio": 0.125,
                "min_convs": 2}
    gm, students = _outline(model.eval(), x, settings)
    data = torch.utils.data.TensorDataset(x, torch.zeros(x.shape[0], dtype=torch.long))
    loader = torch.utils.data.DataLoader(data, batch_size=x.shape[0])
    result = profile(gm, students, loader, batch=batch, runs=runs, progress=False)
    return ScalableModel(gm, students, result)


SWITCH_COLUMNS = ["model", "blocks", "swaps", "blocks per swap", "median ms per swap", "p99 ms per swap",
                  "median ms per block", "target", "target met"]


def switch_part(args):
    """Swap time of ScalableModel.scale: alternating every block of torchvision ResNet-18 between its block and
    its descendant at 0.5 (and one block at a time), 200 swaps each; the seed's swaps take 0.4-54 ms. Targets:
    <= 1 ms per block, <= 5 ms for all of ResNet-18."""
    torch.manual_seed(0)
    model = _tv("resnet18").eval()
    scalable = _scalable_without_training(model, torch.randn(2, 3, 224, 224), (0.0, 0.5))
    n = len(scalable.block_names)
    rows = []
    for label, changed in (("all blocks", n), ("one block", 1)):
        times = []
        for i in range(200):
            high = [1 if (i % 2 == 0 and b < changed) else 0 for b in range(n)]
            scalable.scale(high)
            times.append(scalable.last_swap_seconds * 1e3)
        ms = np.array(times)
        per_block = float(np.median(ms)) / changed
        met = per_block <= 1.0 and (changed < n or float(np.percentile(ms, 99)) <= 5.0)
        rows.append({"model": f"resnet18 ({label})", "blocks": n, "swaps": len(ms), "blocks per swap": changed,
                     "median ms per swap": float(np.median(ms)), "p99 ms per swap": float(np.percentile(ms, 99)),
                     "median ms per block": per_block, "target": "<= 1 ms per block, <= 5 ms all",
                     "target met": met})
    with torch.no_grad():  # a swapped model equals a static build
        x = torch.randn(1, 3, 224, 224)
        scalable.scale([1] * n)
        assert torch.equal(scalable(x), scalable.static([1] * n)(x))
    return "Swapping descendants in place (ScalableModel.scale), torchvision ResNet-18, CPU", rows, SWITCH_COLUMNS


SPEED_COLUMNS = ["model", "batch", "sparsity (every block)", "MAC speedup", "latency speedup",
                 "latency / MAC speedup", "target", "target met"]


def speed_part(args):
    """Real CPU speed of pruned configurations: torchvision ResNet-18/50 at 224, every block at one sparsity
    (round_to 8), batch 1 and 8; latency speedup over MAC speedup against the original (medians of interleaved
    runs, fxeff.bench), both with their BatchNorms folded (torch.fx's fuse: the inference form, as
    fxeff.blocks.build profiles it). Torch-Pruning's README: 0.57 on ResNet-50; target >= 0.6."""
    from torch.fx.experimental.optimization import fuse

    from fxeff import bench

    rows = []
    for name in ("resnet18", "resnet50"):
        torch.manual_seed(0)
        model = _tv(name).eval()
        scalable = _scalable_without_training(model, torch.randn(2, 3, 224, 224), (0.0, 0.3, 0.5), round_to=8,
                                              runs=3)
        n = len(scalable.block_names)
        model = fuse(model)
        for batch in (1, 8):
            x = torch.randn(batch, 3, 224, 224)
            for index, sparsity in ((1, 0.3), (2, 0.5)):
                pruned = fuse(scalable.static([index] * n))
                macs = bench.macs(lambda: model(x[:1])) / bench.macs(lambda: pruned(x[:1]))
                with torch.no_grad():
                    times = bench.interleaved([lambda: model(x), lambda: pruned(x)], args.runs)
                ratio = times[0] / times[1] / macs
                rows.append({"model": name, "batch": batch, "sparsity (every block)": sparsity, "MAC speedup": macs,
                             "latency speedup": times[0] / times[1], "latency / MAC speedup": ratio,
                             "target": ">= 0.6", "target met": ratio >= 0.6})
                print(f"{name} batch {batch} sparsity {sparsity}: MAC {macs:.2f}x, latency "
                      f"{times[0] / times[1]:.2f}x", flush=True)
    return ("Pruned configurations on CPU: latency speedup / MAC speedup (torchvision, 224x224, BatchNorm folded)",
            rows, SPEED_COLUMNS)


NARROW_COLUMNS = ["conv", "batch", "map", "vendor ms", "narrow ms", "speedup", "rule picks narrow", "rule right"]
# (inputs, outputs, kernel, stride, map side): ResNet-20's convs pruned and not (28/14/7 at 28x28 inputs), its
# shortcuts, and torchvision-sized ones; at batch 16 / 1 (ResNet-20) and 8 / 1 (224-sized)
NARROW_SHAPES = [(16, 3, 3, 1, 28), (3, 16, 3, 1, 28), (16, 8, 3, 1, 28), (16, 16, 3, 1, 28), (32, 6, 3, 1, 14),
                 (6, 32, 3, 1, 14), (32, 32, 3, 1, 14), (64, 13, 3, 1, 7), (13, 64, 3, 1, 7), (64, 64, 3, 1, 7),
                 (16, 6, 3, 2, 28), (32, 12, 3, 2, 14), (16, 32, 3, 2, 28), (16, 32, 1, 2, 28), (32, 64, 1, 2, 14)]
WIDE_SHAPES = [(64, 8, 3, 1, 56), (64, 32, 3, 1, 56), (8, 64, 3, 1, 56), (8, 256, 3, 1, 14), (256, 8, 3, 1, 14),
               (512, 16, 3, 1, 7), (64, 24, 1, 1, 56), (64, 128, 1, 2, 56), (128, 256, 1, 2, 28),
               (64, 32, 3, 2, 56), (3, 64, 7, 2, 224)]


def narrow_part(args):
    """fxeff::narrow_conv2d (pixel-vectorised, fxeff.nn.NarrowConv2d) against the vendor conv (F.conv2d, oneDNN) on
    the convs pruning leaves: medians of interleaved runs, float32 NCHW, bias, padding k // 2. "rule picks narrow":
    fxeff.nn.narrow.gains, the rule fxeff.blocks.build rewrites by; "rule right": it picks narrow exactly where
    narrow is faster (ties within 5% count either way)."""
    import torch.nn.functional as F

    from fxeff import bench, ops
    from fxeff.nn.narrow import gains

    rows = []
    for shapes, batches in ((NARROW_SHAPES, (16, 1)), (WIDE_SHAPES, (8, 1))):
        for (i, o, k, stride, side) in shapes:
            conv = torch.nn.Conv2d(i, o, k, stride, k // 2)
            for batch in batches:
                x = torch.randn(batch, i, side, side)
                w, b = conv.weight.detach(), conv.bias.detach()
                with torch.no_grad():
                    vendor, narrow = bench.interleaved([lambda: F.conv2d(x, w, b, stride, k // 2),
                                                        lambda: ops.narrow_conv2d(x, w, b, stride, k // 2)],
                                                       args.runs)
                speedup = vendor / narrow
                picks = gains(conv)
                rows.append({"conv": f"{i}->{o} {k}x{k} s{stride}", "batch": batch, "map": f"{side}x{side}",
                             "vendor ms": vendor * 1e3, "narrow ms": narrow * 1e3, "speedup": speedup,
                             "rule picks narrow": picks,
                             "rule right": picks == (speedup >= 1) or abs(speedup - 1) <= 0.05})
                print(f"{rows[-1]['conv']} batch {batch} {side}: {speedup:.2f}x", flush=True)
    return ("fxeff::narrow_conv2d against the vendor conv (CPU, float32, NCHW)", rows, NARROW_COLUMNS)


REFERENCE_COLUMNS = ["measure", "value", "target", "target met"]
CONFIG_COLUMNS = ["configuration", "MACs (M)", "MAC speedup", "modelled accuracy", "measured accuracy",
                  "modelled latency ms", "measured latency ms", "latency error", "modelled memory MiB",
                  "measured memory MiB"]


def _measured(scalable, model, choice, test, x, runs):
    from fxeff import bench
    from fxeff.training import accuracy

    scalable.scale(choice)
    with torch.no_grad():
        seconds = bench.interleaved([lambda: model(x), lambda: scalable(x)], runs)
    macs = bench.macs(lambda: scalable(x[:1]))
    return 100 * accuracy(scalable, test), seconds[1], seconds[0], macs


UNIFORM_RATIOS = (0.15, 0.3, 0.45)  # torch-pruning's ratio of every conv: about 0.7, 0.5 and 0.3 of the MACs
INTERNAL_RATIOS = (0.31, 0.53, 0.72)  # of the blocks' internal convs only: about the same MACs


def _uniform_pruned(model, x, ratio, epochs, train, internal=False):
    """torch-pruning (DepGraph, per-filter L1 as the descendants) on the whole model at ``ratio`` for every conv,
    the classifier's outputs kept, then fxeff.finetune (distilled from the original, with the labels) for
    ``epochs`` on ``train``; BatchNorm folded and narrow convs (the inference form, as the blocks').
    ``internal``: only the residual blocks' first convs (ResNet-20's ``layerN.M.conv1``: the convs the blocks'
    descendants prune) are pruned; the stem, the blocks' output convs and the shortcuts keep the residual width."""
    import copy

    import torch_pruning as tp
    from torch.fx.experimental.optimization import fuse

    from fxeff import finetune
    from fxeff.nn.narrow import narrow_convs

    pruned = copy.deepcopy(model).eval()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ignored = [pruned.fc] + ([m for n, m in pruned.named_modules() if isinstance(m, torch.nn.Conv2d)
                                  and not (n.startswith("layer") and n.endswith(".conv1"))] if internal else [])
        pruner = tp.pruner.MetaPruner(pruned, x[:1], importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=ratio, ignored_layers=ignored)
        pruner.step()
    finetune(pruned, model, train, epochs=epochs, channels_last=False, progress=False)
    inference = fuse(pruned.eval())
    narrow_convs(inference)  # as fxeff.blocks.build runs its blocks: the same kernels for the same widths
    return inference


def _reference_plot(points, original, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"front": "o-", "every block at one sparsity": "s--", "torch-pruning uniform + fine-tuning": "^:",
              "torch-pruning blocks' internal convs + fine-tuning": "v:"}
    for ax, index, label in ((axes[0], 0, "MACs per image (M)"), (axes[1], 1, "measured latency, batch 16 (ms)")):
        for name, pts in points.items():
            pts = sorted(pts, key=lambda p: p[index])
            if pts:
                ax.plot([p[index] for p in pts], [p[2] for p in pts], styles[name], ms=4,
                        label="fxeff blocks: the Pareto front" if name == "front" else name)
        ax.axhline(original, color="grey", lw=0.8, ls="--", label="the original model")
        ax.set_xlabel(label)
        ax.set_ylabel("measured accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def reference_part(args):
    """ResNet-20 on --dataset: the whole offline stage (blocks, descendants at 0.2/0.4/0.6/0.8, retraining on
    --train-images for --epochs, then --composed-epochs composed, profiles on --test-images at batch 16), then: the
    Pareto front (distinct configurations, their modelled and measured latency span), the models against 20 random
    composed configurations (accuracy, its offsets and interaction fitted by the profile on every block at each
    sparsity and 16 other random configurations, measured whole: within 1 point; additive latency: within 10% on
    95%; memory: measured peaks, fxeff.bench.peak_memory), the most accurate configuration with at most half the MACs
    (the optimiser with MACs in the place of latency; drop <= 1.5 points), the front against every block at one
    sparsity, against torch-pruning's uniform pruning of the whole model and against its pruning of the blocks'
    internal convs only (the residual width kept), each fine-tuned --uniform-epochs on the same images, at equal
    MACs, and (--plot) a PNG of the measured points."""
    from fxeff import bench, reference
    from fxeff.training import accuracy
    from fxeff.blocks.build import build
    from fxeff.blocks.command import reference_loaders

    torch.manual_seed(0)
    model = reference.load("resnet20", args.dataset).eval()
    train, test = reference_loaders(args.dataset, args.train_images, args.test_images)
    wall, cpu = time.perf_counter(), time.process_time()
    scalable = build(model, train, test, sparsities=(0.0, 0.2, 0.4, 0.6, 0.8), epochs=args.epochs,
                     composed_epochs=args.composed_epochs, batch=16,
                     progress=False, data=f"{args.dataset}: {args.train_images} train / {args.test_images} test")
    wall, cpu = (time.perf_counter() - wall) / 60, (time.process_time() - cpu) / 60
    print(f"built in {wall:.1f} min ({cpu:.1f} CPU-min)", flush=True)
    os.makedirs(os.path.join("out", "blocks"), exist_ok=True)
    artifact = os.path.join("out", "blocks", f"benchmark-resnet20-{args.dataset}.pt")
    scalable.save(artifact)  # for looking into the run afterwards (--parts noise --artifact)
    print(f"artifact: {artifact}", flush=True)
    x = reference.first_images(args.dataset, "test", 16)
    names, prof = scalable.block_names, scalable.profile
    front = scalable.series()
    fast, slow = (_measured(scalable, model, s.choice, test, x, args.runs) for s in (front[0], front[-1]))
    rows = [{"measure": "offline stage: wall minutes (CPU-minutes)", "value": f"{wall:.1f} ({cpu:.1f})",
             "target": "<= 15 CPU-minutes on 2 cores", "target met": cpu <= 15},
            {"measure": "accuracy drops: MACs spent / the seed's 3 whole evaluations per entry",
             "value": f"{prof.evaluation_macs / prof.seed_evaluation_macs:.3f}", "target": "", "target met": ""},
            {"measure": "distinct configurations on the front", "value": len(front), "target": ">= 50",
             "target met": len(front) >= 50},
            {"measure": "front: modelled latency span", "value": f"{front[-1].latency / front[0].latency:.2f}x",
             "target": "", "target met": ""},
            {"measure": "front: measured latency span (batch 16)", "value": f"{slow[1] / fast[1]:.2f}x",
             "target": ">= 2.5x", "target met": slow[1] / fast[1] >= 2.5}]
    # the additive models against composed configurations
    configs = []
    acc_errors, lat_errors, rel_errors, mem_ratios = [], [], [], []
    unpruned = [0] * len(names)
    modelled_unpruned = totals(scalable.choices(), unpruned, base_latency=prof.base_latency,
                               base_memory=prof.base_param_bytes).latency
    for i, choice in enumerate(_random_choices(scalable, args.seed)):
        modelled = totals(scalable.choices(), choice, base_latency=prof.base_latency,
                          base_memory=prof.base_param_bytes)
        modelled_acc = scalable.modelled_accuracy(choice)
        measured_acc, seconds, _, macs = _measured(scalable, model, choice, test, x, args.runs)
        acc_errors.append(abs(modelled_acc - measured_acc))
        lat_errors.append(abs(modelled.latency - seconds) / seconds)
        memory = bench.peak_memory(lambda: scalable(x))  # scale() of _measured left the configuration in
        mem_ratios.append(memory / modelled.memory)
        # the machine's speed drifts between runs (the unpruned model: 5.1 ms in one run, 5.9 in the next): the
        # ratio to the unpruned configuration timed alongside (interleaved, a swap before each call) is free of it
        with torch.no_grad():
            t0, tc = bench.interleaved([lambda: (scalable.scale(unpruned), scalable(x)),
                                        lambda: (scalable.scale(choice), scalable(x))], args.runs)
        ratio = modelled.latency / modelled_unpruned
        rel_errors.append(abs(ratio - tc / t0) / (tc / t0))
        configs.append({"configuration": f"random {i}", "MACs (M)": macs / 1e6, "MAC speedup": prof.macs / macs,
                        "modelled accuracy": modelled_acc, "measured accuracy": measured_acc,
                        "modelled latency ms": modelled.latency * 1e3, "measured latency ms": seconds * 1e3,
                        "latency error": lat_errors[-1], "modelled memory MiB": modelled.memory / MIB,
                        "measured memory MiB": memory / MIB})
    acc_ok = sum(e <= 1.0 for e in acc_errors)
    rows.append({"measure": f"accuracy model: offsets per sparsity and interaction c of x + c x^2, fitted on "
                            f"{len(prof.calibration)} random configurations measured whole (other than these 20)",
                 "value": ", ".join(f"{s:g}: {d:+.2f}" for s, d in prof.level_offsets) +
                 f"; c = {prof.interaction:.3f}",
                 "target": "", "target met": ""})
    lat_ok = sum(e <= 0.10 for e in lat_errors)
    rows += [{"measure": "accuracy model: |error| <= 1 point (20 random configurations)",
              "value": f"{acc_ok}/20 (max {max(acc_errors):.2f})", "target": "all", "target met": acc_ok == 20},
             {"measure": "additive latency model: |error| <= 10%", "value": f"{lat_ok}/20 (max {max(lat_errors):.0%})",
              "target": ">= 95%", "target met": lat_ok >= 19},
             {"measure": "the same, as a ratio to the unpruned configuration timed alongside (free of the machine's "
                         "drift between runs)",
              "value": f"{sum(e <= 0.10 for e in rel_errors)}/20 (max {max(rel_errors):.0%})", "target": ">= 95%",
              "target met": sum(e <= 0.10 for e in rel_errors) >= 19},
             {"measure": "memory model (parameters + each block's peak activations, summed): measured peak / "
                         "modelled", "value": f"{min(mem_ratios):.2f}-{max(mem_ratios):.2f} (a bound in "
                                              f"{sum(r <= 1 for r in mem_ratios)}/20)",
              "target": "a bound: <= 1", "target met": max(mem_ratios) <= 1}]
    # MACs as the budgeted quantity: the most accurate configuration at <= half the MACs
    half = scalable.select_macs(prof.macs / 2)
    half_acc, half_s, dense_s, half_macs = _measured(scalable, model, half.choice, test, x, args.runs)
    rows.append({"measure": f"most accurate at <= 1/2 the MACs ({prof.macs / half_macs:.2f}x fewer): accuracy drop",
                 "value": f"{prof.accuracy - half_acc:.2f} points (modelled "
                          f"{prof.accuracy - scalable.modelled_accuracy(half.choice):.2f})", "target": "<= 1.5",
                 "target met": prof.accuracy - half_acc <= 1.5})
    configs.append({"configuration": "most accurate at <= 1/2 MACs", "MACs (M)": half_macs / 1e6,
                    "MAC speedup": prof.macs / half_macs, "modelled accuracy": scalable.modelled_accuracy(half.choice),
                    "measured accuracy": half_acc, "modelled latency ms": "", "measured latency ms": half_s * 1e3,
                    "latency error": ""})
    # the MAC front against every block at one sparsity, at equal MACs (measured accuracy)
    mac_front = scalable.series(by="macs")

    def front_accuracy(macs):  # measured, of the front's most accurate configuration with at most ``macs``
        best = [s for s in mac_front if s.latency <= macs * (1 + 1e-9)]
        return _measured(scalable, model, best[-1].choice, test, x, args.runs)[0] if best else float("nan")

    # (MACs in M, measured ms, measured accuracy) of each measured series, for the plot
    points = {"front": [], "every block at one sparsity": [], "torch-pruning uniform + fine-tuning": [],
              "torch-pruning blocks' internal convs + fine-tuning": []}
    worse = []
    for sparsity in scalable.sparsities(names[0]):
        choice = tuple(scalable.sparsities(n).index(sparsity) if sparsity in scalable.sparsities(n) else 0
                       for n in names)
        u_acc, u_s, _, u_macs = _measured(scalable, model, choice, test, x, args.runs)
        f_acc = front_accuracy(u_macs)
        points["every block at one sparsity"].append((u_macs / 1e6, u_s * 1e3, u_acc))
        configs.append({"configuration": f"every block at {sparsity:g}", "MACs (M)": u_macs / 1e6,
                        "MAC speedup": prof.macs / u_macs, "modelled accuracy": "", "measured accuracy": u_acc,
                        "modelled latency ms": "", "measured latency ms": u_s * 1e3,
                        "latency error": f"front at <= its MACs: {f_acc:.2f}%"})
        if f_acc < u_acc:
            worse.append(f"{sparsity:g}")
    rows.append({"measure": "front at least as accurate as every block at one sparsity, at equal MACs",
                 "value": "everywhere" if not worse else f"not at {', '.join(worse)}", "target": "everywhere",
                 "target met": not worse})
    # torch-pruning's uniform pruning of the whole model (residual channels included), fine-tuned with the same
    # images and epochs as the block retraining, against the front at no more MACs (measured accuracy)
    # and the same pruning of the blocks' internal convs only (the residual width kept, as block scaling keeps
    # it): what separates the two is the residual width; what separates the latter from the front is one model
    # fine-tuned end to end per budget against descendants that serve every budget from one artifact
    behind = {False: [], True: []}
    baselines = [(r, False) for r in UNIFORM_RATIOS] + [(r, True) for r in INTERNAL_RATIOS]
    for ratio, internal in (baselines if args.uniform_epochs else ()):
        pruned = _uniform_pruned(model, x, ratio, args.uniform_epochs, train, internal)
        p_macs = bench.macs(lambda: pruned(x[:1]))
        with torch.no_grad():
            p_s = bench.interleaved([lambda: model(x), lambda: pruned(x)], args.runs)[1]
        p_acc = 100 * accuracy(pruned, test)
        f_acc = front_accuracy(p_macs)
        name = "torch-pruning blocks' internal convs" if internal else "torch-pruning uniform"
        configs.append({"configuration": f"{name} {ratio:g} + {args.uniform_epochs} epochs",
                        "MACs (M)": p_macs / 1e6, "MAC speedup": prof.macs / p_macs, "modelled accuracy": "",
                        "measured accuracy": p_acc, "modelled latency ms": "", "measured latency ms": p_s * 1e3,
                        "latency error": f"front at <= its MACs: {f_acc:.2f}%"})
        points[f"{name} + fine-tuning"].append((p_macs / 1e6, p_s * 1e3, p_acc))
        if f_acc < p_acc:
            behind[internal].append(f"{prof.macs / p_macs:.2f}x ({f_acc:.2f} vs {p_acc:.2f})")
    for internal in ((False, True) if args.uniform_epochs else ()):
        what = "pruning of the blocks' internal convs only" if internal else "uniform whole-model pruning"
        rows.append({"measure": f"front at least as accurate as torch-pruning's {what} fine-tuned "
                                f"{args.uniform_epochs} epochs on the same images, at equal MACs",
                     "value": "everywhere" if not behind[internal] else f"not at {', '.join(behind[internal])}",
                     "target": "everywhere" if not internal else "", "target met": not behind[internal]
                     if not internal else ""})
    # the front measured along its length, for the plot
    along = mac_front[::max(1, len(mac_front) // 8)]
    for s in along + ([mac_front[-1]] if along[-1] is not mac_front[-1] else []):  # the last once
        f_acc, f_s, _, f_macs = _measured(scalable, model, s.choice, test, x, args.runs)
        points["front"].append((f_macs / 1e6, f_s * 1e3, f_acc))
    if args.plot:
        _reference_plot(points, prof.accuracy, args.plot, f"ResNet-20, {args.dataset}: measured (accuracy on "
                                                          f"{args.test_images} test images, latency at batch 16)")
    scalable.scale([0] * len(names))
    print(report(f"ResNet-20 configurations on {args.dataset} (accuracy on {args.test_images} test images, latency "
                 f"at batch 16)", configs, CONFIG_COLUMNS), flush=True)
    return (f"Block scaling of the trained ResNet-20 on {args.dataset}: {len(names)} blocks, descendants at "
            f"0.2-0.8, retrained {args.epochs} epochs on {args.train_images} images, then {args.composed_epochs} "
            f"composed"), rows, REFERENCE_COLUMNS


def _random_choices(scalable, seed, count=20):
    """The reference part's random configurations (choice indices), in its order."""
    rng = np.random.default_rng(seed)
    return [tuple(int(rng.integers(len(scalable.sparsities(n)))) for n in scalable.block_names)
            for _ in range(count)]


def noise_part(args):
    """The accuracy model's errors against measurement noise, on the saved artifact of a ResNet-20 build
    (--artifact: the reference part's out/blocks/benchmark-resnet20-DATASET.pt, or the accuracy report's): the
    reference part's 20 random configurations, each measured whole on --test-images test images with the standard
    error of its paired per-sample differences from the unpruned model, against the modelled drop, whose noise is
    its entries' standard errors added in quadrature (each entry's drop was measured on the same test images). An
    error is within noise where |error| <= 2 sqrt(se_model^2 + se_measured^2)."""
    import math

    from fxeff import reference
    from fxeff.blocks.build import load
    from fxeff.blocks.command import reference_loaders
    from fxeff.blocks.scalable import read_artifact

    if not args.artifact:
        raise SystemExit("--parts noise needs --artifact (a saved ResNet-20 build)")
    data = read_artifact(args.artifact)
    dataset = data["meta"].get("source", {}).get("dataset", args.dataset)
    model = reference.load("resnet20", dataset).eval()
    scalable = load(args.artifact, model, reference.first_images(dataset, "test", 2))
    _, test = reference_loaders(dataset, 1, args.test_images)
    prof, names = scalable.profile, scalable.block_names
    table = prof.table()

    def correct():
        out = []
        with torch.no_grad():
            for images, labels in test:
                out.append((scalable(images).argmax(1) == labels).double())
        return torch.cat(out)

    scalable.scale([0] * len(names))
    base = correct()
    rows, errors, within, sigmas = [], [], 0, []
    for i, choice in enumerate(_random_choices(scalable, args.seed)):
        scalable.scale(choice)
        difference = base - correct()
        measured = 100 * float(difference.mean())
        se_measured = 100 * float(difference.std()) / math.sqrt(len(difference))
        picked = [table[n][scalable.sparsities(n)[j]] for n, j in zip(names, choice) if j]
        se_model = math.sqrt(sum(e.drop_se ** 2 for e in picked))
        modelled = prof.accuracy - scalable.modelled_accuracy(choice)
        error = modelled - measured
        sigma = math.sqrt(se_model ** 2 + se_measured ** 2)
        errors.append(error)
        sigmas.append(sigma)
        within += abs(error) <= 2 * sigma
        rows.append({"configuration": f"random {i}", "modelled drop": modelled, "measured drop": measured,
                     "error": error, "se model": se_model, "se measured": se_measured,
                     "error / sigma": error / sigma, "over 1 point": abs(error) > 1.0})
    scalable.scale([0] * len(names))
    rms = math.sqrt(sum(e * e for e in errors) / len(errors))
    noise = math.sqrt(sum(s * s for s in sigmas) / len(sigmas))
    rows.append({"configuration": "all 20", "error": f"rms {rms:.2f}, mean {sum(errors) / len(errors):+.2f}",
                 "se model": f"rms {math.sqrt(sum(r['se model'] ** 2 for r in rows) / 20):.2f}",
                 "se measured": f"rms {math.sqrt(sum(r['se measured'] ** 2 for r in rows) / 20):.2f}",
                 "error / sigma": f"{within}/20 within 2 sigma; noise rms {noise:.2f}",
                 "over 1 point": f"{sum(abs(e) > 1.0 for e in errors)}/20"})
    return (f"The accuracy model's errors against measurement noise ({args.artifact}, {args.test_images} test "
            f"images; points)"), rows, ["configuration", "modelled drop", "measured drop", "error", "se model",
                                        "se measured", "error / sigma", "over 1 point"]


PARTS = {"solve": solve_part, "graph": graph_part, "switch": switch_part, "speed": speed_part,
         "narrow": narrow_part, "reference": reference_part, "noise": noise_part}


def main(argv=None):
    parser = script_parser(__doc__)
    parser.add_argument("--parts", default="solve", help=f"comma list of: {', '.join(PARTS)}")
    parser.add_argument("--instances", type=int, default=200, help="random instances per row (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=15,
                        help="interleaved timing runs (speed, narrow, reference parts)")
    parser.add_argument("--dataset", default="cluttered-fashion-mnist", help="reference part: the dataset")
    parser.add_argument("--train-images", type=int, default=10000, help="reference part: retraining images")
    parser.add_argument("--epochs", type=int, default=2, help="reference part: block retraining epochs")
    parser.add_argument("--composed-epochs", type=int, default=3,
                        help="reference part: then epochs of composed retraining (0: block retraining only)")
    parser.add_argument("--uniform-epochs", type=int, default=2,
                        help="reference part: fine-tuning epochs of torch-pruning's uniform whole-model pruning, "
                             "the baseline (0: none)")
    parser.add_argument("--plot", default="", help="reference part: a PNG of the measured configurations")
    parser.add_argument("--artifact", default="", help="noise part: a saved ResNet-20 build")
    parser.add_argument("--test-images", type=int, default=10000,
                        help="reference part: accuracy images (default the whole test split: the drops of single "
                             "descendants are fractions of a point)")
    run_parts(parser, PARTS, argv)


if __name__ == "__main__":
    main()
