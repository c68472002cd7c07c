"""The home ground of ``fxeff demo``: every technique on the trained reference models and real test images.

For each reference model (VGG-style, ResNet-20, MobileNetV2 x0.5) trained on Cluttered Fashion-MNIST, the rows
give top-1 accuracy on the test images (original vs rewritten), MACs per image and CPU latency on a batch of 16
(original vs rewritten, medians of interleaved runs), with the speedup:
- focus: the AoI is every pixel brighter than black, grown by 2 pixels (the setting of docs/accuracy.md's target
  row), fill "mean", no retraining; once with each of two Focus executions: "layer" (the published per-layer
  semantics: every conv after the split focused) and "auto" (the default: per grid, regions on tiles, per-layer
  focused convs or dense, whichever is fastest, measured at transform time);
- HetConv P=4 (VGG-style, ResNet-20) and sparse shift (MobileNetV2): the fine-tuned rewrites that ship with fxeff
  (``fxeff.reference.load_finetuned``), in their CPU inference form as the focus rows are (BatchNorms folded by
  ``fxeff.FoldBatchNorm``, the shift network fused by ``fxeff.FuseShift`` first: the accuracy report's
  ``DEPLOY_FORMS``), against the original as trained like every row here (docs/accuracy.md times them against the
  original folded too);
- glance and focus (ResNet-20): the shipped checkpoint (saliency policy), thresholds calibrated on held-out
  training images for GLANCE_BUDGET of the model's MACs, run with real early exit (``glance_row``).

``summary_plot`` draws accuracy against latency for these rows beside the photos' agreement against speedup.
"""
import os
import statistics
from typing import Dict, List, Optional, Sequence

import torch

from . import bench, reference

HOME_DATASET = "cluttered-fashion-mnist"
LATENCY_BATCH = 16
CALIBRATION_IMAGES = 64  # training images the focus rows are transformed on (as docs/accuracy.md's rows)
FINETUNED_TECHNIQUE = {"vgg": "hetconv P=4", "resnet20": "hetconv P=4", "mobilenetv2": "shift sparse"}
GLANCE = {"resnet20": "saliency"}  # the shipped glance and focus checkpoints: arch -> policy
GLANCE_BUDGET = 0.4  # MACs per image, a fraction of the model's
GLANCE_CALIBRATION = 2000  # held-out training images the thresholds are calibrated on
HOME_COLUMNS = (("model", "model"), ("technique", "technique"), ("acc_original", "acc. original"),
                ("acc_rewritten", "acc. rewritten"), ("mmacs_original", "MMACs/image original"),
                ("mmacs_rewritten", "MMACs/image rewritten"), ("ms_original", "ms original"),
                ("ms_rewritten", "ms rewritten"), ("speedup", "speedup"))


def home_focus(execution: str):
    """The home ground's Focus: every input pixel brighter than black, grown by 2 pixels, fill "mean" (the setting of
    docs/accuracy.md's target row); auto plans for the latency batch."""
    from .data import BACKGROUND
    from .passes import Focus

    return Focus(BACKGROUND, split="input", fill="mean", halo=2, execution=execution, plan_batch=LATENCY_BATCH)


def _grey_to_rgb(image: torch.Tensor, scale: int = 3) -> "numpy.ndarray":
    """A normalised grey image [1, H, W] as uint8 RGB [H * scale, W * scale, 3] (nearest upscaling)."""
    from .data import MEAN, STD

    grey = ((image[0] * STD + MEAN) * 255).round().clamp(0, 255).to(torch.uint8)
    grey = grey.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return grey.unsqueeze(-1).expand(-1, -1, 3).contiguous().numpy()


def home_ground_rows(test_images: int, runs: int, out: str, overlays: int = 4, progress: bool = True,
                     archs: Sequence[str] = reference.ARCHS) -> List[Dict[str, object]]:
    """The rows above for ``archs``, with accuracy on the first ``test_images`` test images; writes AoI overlays
    of the first ``overlays`` test images to ``out`` (``home_<i>_aoi.png``)."""
    from tqdm.auto import tqdm

    from . import focus, training
    from .accuracy_report import DEPLOY_FORMS, deploy
    from .data import BACKGROUND, CLASSES
    from .transform import transform

    os.makedirs(out, exist_ok=True)
    test = reference.dataset(HOME_DATASET, "test", limit=test_images)
    loader = training.loader(test, 250, False)
    # Original and rewritten both in channels_last, the faster CPU format for either (fxeff's ops keep it).
    cl = torch.channels_last
    timing = reference.first_images(HOME_DATASET, "test", LATENCY_BATCH).contiguous(memory_format=cl)
    calibration = reference.first_images(HOME_DATASET, "train", CALIBRATION_IMAGES).contiguous(memory_format=cl)
    rows: List[Dict[str, object]] = []
    for arch in tqdm(archs, desc="fxeff demo: reference models", unit="model", disable=not progress):
        model = reference.load(arch, HOME_DATASET).to(memory_format=cl)
        accuracy = training.accuracy(model, loader)
        macs = bench.macs(lambda: model(timing)) / LATENCY_BATCH
        if arch == archs[0]:
            masks = focus.aoi_masks(model, timing[:overlays], BACKGROUND, split="input")[0]
            for i in range(min(overlays, len(masks))):
                label = CLASSES[int(test[i][1])]
                focus.render(_grey_to_rgb(timing[i]), masks[i], os.path.join(out, f"home_{i:02d}_aoi.png"),
                             title=f"{label}: AoI {float(masks[i].float().mean()):.0%}")
        rewrites = [(f"focus, {execution} execution",
                     lambda execution=execution: transform(model, calibration, [home_focus(execution)]))
                    for execution in ("layer", "auto")]
        technique = FINETUNED_TECHNIQUE[arch]
        rewrites.append((f"{technique} (fine-tuned)", lambda: deploy(
            reference.load_finetuned(arch, HOME_DATASET, technique), DEPLOY_FORMS[technique.split(" P=")[0]],
            timing, "channels_last")))
        for name, make in rewrites:
            rewritten = make().eval().to(memory_format=cl)
            ms = bench.interleaved([lambda: model(timing), lambda: rewritten(timing)], runs)
            row = {"model": arch, "technique": name, "acc_original": accuracy,
                   "acc_rewritten": training.accuracy(rewritten, loader),
                   "mmacs_original": macs / 1e6,
                   "mmacs_rewritten": bench.macs(lambda: rewritten(timing)) / LATENCY_BATCH / 1e6,
                   "ms_original": ms[0] * 1e3, "ms_rewritten": ms[1] * 1e3, "speedup": ms[0] / ms[1]}
            rows.append(row)
            _log(tqdm, arch, name, row)
        if arch in GLANCE:
            row = glance_row(arch, model, accuracy, macs, loader, timing, runs)
            rows.append(row)
            _log(tqdm, arch, row["technique"], row)
    return rows


def _log(tqdm, arch: str, name: str, row: Dict[str, object]) -> None:
    tqdm.write(f"{arch:>12} {name:<32} top-1 {100 * row['acc_original']:.2f}% -> "
               f"{100 * row['acc_rewritten']:.2f}%  MMACs {row['mmacs_original']:.1f} -> "
               f"{row['mmacs_rewritten']:.1f}  latency {row['ms_original']:.1f} -> {row['ms_rewritten']:.1f}"
               f" ms ({row['speedup']:.2f}x)")


def glance_row(arch: str, model: torch.nn.Module, accuracy: float, macs: float, loader, timing: torch.Tensor,
               runs: int) -> Dict[str, object]:
    """The glance and focus row of ``arch``: its shipped checkpoint (``GLANCE``'s policy), thresholds calibrated
    for GLANCE_BUDGET of the model's MACs (``macs`` per image) on GLANCE_CALIBRATION held-out training images, top-1
    on ``loader`` and latency on ``timing`` with real early exit, against ``model`` timed alongside."""
    from . import glance
    from .glance.command import held_out_logits, shipped_path

    policy = GLANCE[arch]
    gf = glance.load(shipped_path(arch, HOME_DATASET, policy), reference.load(arch, HOME_DATASET), timing)
    gf.to(memory_format=torch.channels_last)  # as the model it is timed against (the faster CPU format for both)
    steps = gf.macs_per_step
    held = held_out_logits(gf, HOME_DATASET, images=GLANCE_CALIBRATION)
    thresholds = glance.calibrate(gf, held, steps, budget=GLANCE_BUDGET * macs)
    correct, spent, seen = 0, 0.0, 0
    for images, labels in loader:
        exits = glance.early_exit(gf, images, thresholds, steps)
        correct += int((exits.logits.argmax(dim=1) == labels).sum())
        spent += float(exits.macs.sum())
        seen += len(labels)
    ms = bench.interleaved([lambda: model(timing), lambda: glance.early_exit(gf, timing, thresholds, steps)], runs)
    return {"model": arch, "technique": f"glance and focus, {policy} ({GLANCE_BUDGET:.0%} MACs budget)",
            "acc_original": accuracy, "acc_rewritten": correct / seen, "mmacs_original": macs / 1e6,
            "mmacs_rewritten": spent / seen / 1e6, "ms_original": ms[0] * 1e3, "ms_rewritten": ms[1] * 1e3,
            "speedup": ms[0] / ms[1]}


def home_ground_markdown(rows: List[Dict[str, object]], test_images: int, runs: int) -> str:
    shown = [{**r, "acc_original": f"{100 * r['acc_original']:.2f}%",
              "acc_rewritten": f"{100 * r['acc_rewritten']:.2f}%"} for r in rows]
    return (f"## Home ground: the reference models on Cluttered Fashion-MNIST\n\n"
            f"Top-1 on the first {test_images} test images; MACs per image and latency on a batch of "
            f"{LATENCY_BATCH} test images (median of {runs} interleaved runs; original and rewritten both in "
            f"channels_last). Focus: AoI = pixels brighter than "
            f"black, halo 2, fill mean, no retraining. HetConv P=4 and sparse shift: the fine-tuned checkpoints "
            f"shipped in fxeff/checkpoints. Glance and focus: the shipped checkpoint, thresholds for "
            f"{GLANCE_BUDGET:.0%} of the model's MACs calibrated on {GLANCE_CALIBRATION} held-out training images, "
            f"real early exit (its MACs: those the images spent).\n\n{bench.markdown_table(shown, HOME_COLUMNS)}\n")


def summary_plot(home: List[Dict[str, object]], photos: List[Dict[str, object]], path: str,
                 photo_model: Optional[str] = None) -> str:
    """out/demo/summary.png: left, accuracy vs latency of every home-ground row (original and rewrite joined);
    right, each photo's top-1 agreement with the dense model vs its speedup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2))
    markers = {"focus, layer": "s", "focus, auto": "D", "hetconv": "^", "shift": "v", "glance": "P"}
    colours = dict(zip(reference.ARCHS, ("tab:blue", "tab:orange", "tab:green")))
    for arch in dict.fromkeys(r["model"] for r in home):
        mine = [r for r in home if r["model"] == arch]
        colour = colours.get(arch, "tab:grey")
        base = (statistics.median(r["ms_original"] for r in mine), 100 * mine[0]["acc_original"])  # timed per row
        left.scatter(*base, marker="o", s=70, color=colour, label=f"{arch} original")
        for r in mine:
            point = (r["ms_rewritten"], 100 * r["acc_rewritten"])
            marker = next(m for key, m in markers.items() if r["technique"].startswith(key))
            left.plot([base[0], point[0]], [base[1], point[1]], color=colour, alpha=0.35, lw=1)
            left.scatter(*point, marker=marker, s=60, color=colour, edgecolors="black", linewidths=0.5)
            left.annotate(r["technique"].replace(" execution", "").replace(" (fine-tuned)", ""), point, fontsize=7,
                          xytext=(4, 3), textcoords="offset points")
    left.set_xlabel(f"CPU latency, batch {LATENCY_BATCH} (ms)")
    left.set_ylabel("top-1 accuracy (%)")
    left.set_title("Reference models, Cluttered Fashion-MNIST")
    left.grid(alpha=0.3)
    left.legend(fontsize=8, loc="best")
    if photos:
        for r in photos:
            y = 1.0 if r["agree"] else 0.0
            right.scatter(r["speedup"], y, color="tab:green" if r["agree"] else "tab:red", s=50)
            right.annotate(r["image"], (r["speedup"], y), fontsize=7, rotation=30, xytext=(2, 4),
                           textcoords="offset points")
        right.axvline(1.0, color="black", ls="--", lw=1)
        right.set_yticks([0, 1], ["differs", "agrees"])
        right.set_ylim(-0.5, 1.6)
    right.set_xlabel("speedup over the dense model (batch 1)")
    right.set_title(f"{photo_model or 'photo model'} on photos: top-1 agreement vs speedup")
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["home_focus", "home_ground_rows", "glance_row", "home_ground_markdown", "summary_plot", "HOME_COLUMNS",
           "FINETUNED_TECHNIQUE"]
