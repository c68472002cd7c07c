"""The accuracy report: what each pass costs in accuracy on the trained reference models, and what
recovery fine-tuning gives back, beside the MACs and CPU latency it saves. ``benchmarks/accuracy.py``
(``make accuracy``) runs it and writes docs/accuracy.md with its plots.

Per reference model (fxeff.reference, on Fashion-MNIST and Cluttered Fashion-MNIST) and pass:
- focus at thresholds calibrated for 10-50% mean AoI: no retraining (the weights are unchanged);
- shift (sparse, active) where the model has depthwise convs, HetConv (P = 2, 4, 8) where it has
  standard KxK convs: accuracy right after the rewrite, and after ``fxeff.finetune`` from the original;
plus EfficientNet-Lite0 (real ImageNet weights) top-1 agreement with the original on the real photos.
"""
import copy
import dataclasses
import functools
import json
import os
import statistics
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import bench, reference, training

AOI_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
HETCONV_PARTS = (2, 4, 8)
SHIFT_MODES = ("sparse", "active")
# Where each reference model's AoI is taken: "input" (the grey image itself, through the models'
# ``input`` identity) or "stem" (after the first conv-BN-ReLU, the early activation the published
# technique thresholds).
FOCUS_SPLITS = {"vgg": {"input": "input", "stem": "features.2"}, "resnet20": {"input": "input", "stem": "relu"},
                "mobilenetv2": {"input": "input", "stem": "features.0"}}
# The focus rows. At the input split the AoI is every pixel brighter than black (the datasets' flat
# background), grown by each halo of FOCUS_HALOS (fill "mean"; one row with fill "zeros" at halo
# COMPARE_HALO). At the stem split the threshold is calibrated for each AoI fraction of
# STEM_FRACTIONS (fill "mean", and "zeros" at the last fraction), as the published technique does.
FOCUS_HALOS = (0, 1, 2, 3, 4)
COMPARE_HALO = 2
STEM_FRACTIONS = (0.1, 0.3)
# Each focus row runs in these executions of fxeff.passes.Focus: "auto" (the default: per grid whichever of tiles,
# per-layer focused convs or dense measures fastest, so its MAC ratio says what really runs) and "layer" (every
# conv after the split focused: the published technique's accuracy).
FOCUS_EXECUTIONS = ("auto", "layer")
TARGET_AOI = 0.30  # the focus target holds for AoIs up to this fraction
NOTES_FILE = "accuracy_notes.md"  # beside the report: included as written after the targets
TARGETS = {"focus": 0.5, "shift sparse": 1.0, "hetconv P=4": 0.5, "blocks": 1.5}  # allowed drop, points of accuracy
BLOCKS_MACS = 0.5  # the blocks row: the most accurate configuration with at most this fraction of the MACs
# The fine-tuned rows (their pass -> what runs when the row is timed): each is timed after fine-tuning in the form it
# is deployed in on CPU, in its pass's format (Settings.hetconv_format, shift_format), against the original deployed
# alike: both with their BatchNorms folded into the convs they read (fxeff.FoldBatchNorm), and a shift network with
# fxeff.FuseShift first (the shift, its BatchNorm and clamp fused into the 1x1 conv that reads it; interpolated
# shifts stay unfused, FuseShift's default).
DEPLOY_FORMS = {"hetconv": "FoldBatchNorm", "shift sparse": "FuseShift+FoldBatchNorm",
                "shift active": "FuseShift+FoldBatchNorm"}


@dataclasses.dataclass
class Settings:
    """How much work the report does. The defaults are the documented run; tests shrink them."""

    archs: Sequence[str] = reference.ARCHS
    datasets: Sequence[str] = reference.DATASETS
    eval_images: Optional[int] = None        # test images per accuracy (None: the whole test split)
    calibration_images: int = 512            # training images that calibrate focus thresholds / fit shift
    hetconv_init: str = "fit"                # HetConv's init (fxeff.passes.HetConv)
    hetconv_fit_images: int = 256            # the first of those images, which "fit" fits HetConv on
    finetune_epochs: int = 1                 # the fine-tuned rows without a target (HetConv P=2, 8; active shift)
    finetune_images: Optional[int] = 15000   # training images per epoch of those rows (None: all)
    # The rows with a target fine-tune on every training image, this many epochs (does recovery reach the
    # original?). HetConv P=4 gets more: on the VGG-style model (no residual path) 3 epochs end 0.93 points
    # below on the cluttered set, 6 end 0.62 and 10 end 0.49 (probes in accuracy_notes.md).
    shift_target_epochs: int = 3             # sparse shift
    hetconv_target_epochs: int = 10          # HetConv P=4
    finetune_lr: float = 0.1                 # peak of the one-cycle schedule (probes in accuracy_notes.md)
    latency_batch: int = 16
    latency_runs: int = 20
    # The memory format the focus rows are timed in, original and rewritten alike (fxeff's ops keep it); on CPU
    # channels_last is the faster one for both.
    focus_format: str = "channels_last"
    # The memory formats the fine-tuned rows (DEPLOY_FORMS) are timed in, original and deployed rewrite alike, each
    # the faster one for its pass: HetConv's direct kernel is channels_last's (docs/benchmarks.md); the sparse shift
    # networks fused measured alike in both (0.73-0.90 of the original's time) and the active ones (interpolated,
    # unfused) at 1.85-1.95 in channels_last against 1.05-1.10 in NCHW.
    hetconv_format: str = "channels_last"
    shift_format: str = "nchw"
    # glibc's malloc told to keep freed memory (fxeff.bench.keep_freed_memory) before anything is timed: without it
    # a model's activations page-fault in on every call, by an amount that depends on what the process freed before
    # (the fine-tuned ResNet-20 measured 0.57 and 0.76 of the original in two processes). Recorded in the fine-tuned
    # rows' latency fingerprint; the focus and blocks rows keep what they were measured with.
    keep_freed_memory: bool = True
    # Each latency pair (original, rewritten) timed in a fresh Python process, as a deployment runs a model alone
    # (fxeff.bench.interleaved_in_fresh_process): nothing the report ran before (other models, their caches, the
    # allocator's state, the fitting libraries' thread pools) is in the process. And timed latency_repeats times,
    # the median ratio kept: this shared VM has spells, minutes long, in which the HetConv direct kernel (many short
    # parallel regions) runs ~40% slower and oneDNN ~10% (the same fine-tuned ResNet-20 pair: 0.59-0.62 for three
    # repeats, then 0.78 for two, in one process; 0.57-0.59 for nine in another; docs/benchmarks.md, fifteenth
    # session). Both are recorded in the fine-tuned rows' latency fingerprint.
    fresh_process: bool = True
    latency_repeats: int = 3
    photos: bool = True                      # the EfficientNet-Lite0 agreement table
    focus_halos: Sequence[int] = FOCUS_HALOS
    focus_executions: Sequence[str] = FOCUS_EXECUTIONS
    stem_fractions: Sequence[float] = STEM_FRACTIONS
    aoi_fractions: Sequence[float] = AOI_FRACTIONS    # the EfficientNet-Lite0 photo rows
    hetconv_parts: Sequence[int] = HETCONV_PARTS
    shift_modes: Sequence[str] = SHIFT_MODES
    # block scaling (fxeff.blocks.build, descendants retrained on intermediate data only): its row is the most
    # accurate configuration at <= BLOCKS_MACS of the MACs
    blocks: bool = True
    blocks_sparsities: Sequence[float] = (0.0, 0.2, 0.4, 0.6, 0.8)
    blocks_train_images: int = 10000
    blocks_epochs: int = 2
    blocks_composed_epochs: int = 3
    progress: bool = True
    save_students: bool = False              # save the fine-tuned rows of reference.FINETUNED (reference.save_finetuned)

    def __post_init__(self):
        for name in ("focus_format", "hetconv_format", "shift_format"):
            if getattr(self, name) not in FORMATS:
                raise ValueError(f"fxeff.accuracy_report.Settings: {name} must be one of {sorted(FORMATS)}, "
                                 f"got {getattr(self, name)!r}")
        if self.latency_repeats < 1 or self.latency_runs < 1:
            raise ValueError(f"fxeff.accuracy_report.Settings: latency_runs and latency_repeats must be >= 1, got "
                             f"{self.latency_runs} and {self.latency_repeats}")


def _batch(dataset: torch.utils.data.Dataset, n: int) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])


def _latency_ratio(model: torch.nn.Module, rewritten: torch.nn.Module, x: torch.Tensor, settings: Settings) -> float:
    """rewritten / original latency on ``x``: the median over ``settings.latency_repeats`` timings, each the ratio
    of the medians of ``settings.latency_runs`` interleaved runs, each in a fresh process unless
    ``settings.fresh_process`` is off."""
    ratios = []
    for _ in range(settings.latency_repeats):
        if settings.fresh_process:
            before, after = bench.interleaved_in_fresh_process([model, rewritten], x, settings.latency_runs,
                                                               keep_freed=settings.keep_freed_memory)
        else:
            before, after = bench.interleaved([lambda: model(x), lambda: rewritten(x)], settings.latency_runs)
        ratios.append(after / before)
    return statistics.median(ratios)


def _deploy_format(pass_name: str, settings: Settings) -> str:
    """The memory format a fine-tuned row (DEPLOY_FORMS) is timed in."""
    return settings.hetconv_format if pass_name == "hetconv" else settings.shift_format


def deploy(model: torch.nn.Module, form: str, x: torch.Tensor, fmt: str) -> torch.nn.Module:
    """``model`` in a CPU deployment form (DEPLOY_FORMS: its passes joined by "+") and memory format ``fmt``,
    checked against ``model`` on ``x`` (the fusions are exact up to float rounding)."""
    from .passes import FoldBatchNorm, FuseShift
    from .transform import transform

    passes = {"FuseShift": FuseShift(), "FoldBatchNorm": FoldBatchNorm()}
    # converted before the passes, which then see (and FoldBatchNorm keeps) the format's strides
    converted = copy.deepcopy(model).eval().to(memory_format=FORMATS[fmt])
    deployed = transform(converted, (x,), [passes[name] for name in form.split("+")]).eval()
    with torch.no_grad():
        expected, got = model.eval()(x), deployed(x)
    if not torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max())):
        raise RuntimeError(f"fxeff.accuracy_report: the model deployed with {form} differs from it by "
                           f"{float((got - expected).abs().max()):.3g}")
    return deployed


class _Context:
    """One reference model with its data: the original's accuracy, MACs and inputs, computed once, when a
    row is first measured (a resumed report whose rows are all saved computes none of them)."""

    def __init__(self, arch: str, dataset: str, settings: Settings):
        self.arch, self.dataset, self.settings = arch, dataset, settings
        self.model = reference.load(arch, dataset)
        self._formats: Dict[str, Tuple[torch.nn.Module, torch.Tensor, torch.Tensor]] = {}  # in_format's copies
        self._deployed_originals: Dict[str, torch.nn.Module] = {}

    @functools.cached_property
    def test_loader(self) -> torch.utils.data.DataLoader:
        return training.loader(reference.dataset(self.dataset, "test", limit=self.settings.eval_images), 500, False)

    @functools.cached_property
    def train(self) -> torch.utils.data.Dataset:
        return reference.dataset(self.dataset, "train")

    @functools.cached_property
    def calibration(self) -> torch.Tensor:
        return _batch(self.train, self.settings.calibration_images)

    @functools.cached_property
    def timing_input(self) -> torch.Tensor:
        return _batch(self.test_loader.dataset, self.settings.latency_batch)

    @functools.cached_property
    def accuracy(self) -> float:
        return training.accuracy(self.model, self.test_loader)

    @functools.cached_property
    def macs(self) -> int:
        return bench.macs(lambda: self.model(self.timing_input))

    def in_format(self, fmt: str) -> Tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
        """The model (a copy, made once per format; rewrites copy it again), the calibration images and the timing
        batch in memory format ``fmt``."""
        if fmt not in self._formats:
            memory_format = FORMATS[fmt]
            self._formats[fmt] = (copy.deepcopy(self.model).to(memory_format=memory_format),
                                  self.calibration.contiguous(memory_format=memory_format),
                                  self.timing_input.contiguous(memory_format=memory_format))
        return self._formats[fmt]

    def row(self, pass_name: str, setting: str, rewritten: torch.nn.Module, fmt: Optional[str] = "nchw"
            ) -> Dict[str, object]:
        """The row of one rewrite, before any fine-tuning; its latency ratio in memory format ``fmt`` (rewritten
        from the model in that format), or none with ``fmt=None`` (a fine-tuned row is timed after fine-tuning,
        ``time_deployed``)."""
        rewritten.eval()
        macs = bench.macs(lambda: rewritten(self.timing_input))
        row = {"model": self.arch, "dataset": self.dataset, "pass": pass_name, "setting": setting,
               "original": self.accuracy, "rewritten": training.accuracy(rewritten, self.test_loader),
               "MAC ratio": macs / self.macs}
        if fmt is not None:
            original, _, timing = self.in_format(fmt)
            row.update({"format": fmt,
                        "latency ratio": _latency_ratio(original, rewritten, timing, self.settings)})
        return row

    def time_deployed(self, row: Dict[str, object], student: torch.nn.Module, timed: str) -> None:
        """Times a fine-tuned row's model in its deployment form (``deploy``) against the original with its
        BatchNorms folded, both in its pass's format (``_deploy_format``); ``timed`` (its own column) says which
        weights ran."""
        fmt = _deploy_format(row["pass"], self.settings)
        _, _, timing = self.in_format(fmt)
        if fmt not in self._deployed_originals:  # the original with its BatchNorms folded, once per format
            self._deployed_originals[fmt] = deploy(self.model, "FoldBatchNorm", timing, fmt)
        original = self._deployed_originals[fmt]
        deployed = deploy(student, DEPLOY_FORMS[row["pass"]], timing, fmt)
        row.update({"format": fmt, "timed": timed,
                    "latency ratio": _latency_ratio(original, deployed, timing, self.settings)})

    def finetune(self, row: Dict[str, object], student: torch.nn.Module) -> None:
        """Recovers ``student`` by distillation from the original and records the accuracy after, with the
        budget of ``_finetune_budget``."""
        from .distill import finetune

        epochs, images = _finetune_budget(row["pass"], row["setting"], self.settings)
        subset = self.train if images is None else torch.utils.data.Subset(
            self.train, range(min(images, len(self.train))))
        start = time.perf_counter()
        finetune(student, self.model, training.loader(subset, 128, True), epochs, lr=self.settings.finetune_lr,
                 progress=self.settings.progress)
        student.to(memory_format=torch.contiguous_format).eval()
        row["fine-tuned"] = training.accuracy(student, self.test_loader)
        row["fine-tune"] = f"{epochs} x {len(subset)} images, {time.perf_counter() - start:.0f} s"


def _finetune_budget(pass_name: str, setting: str, settings: Settings) -> Tuple[int, Optional[int]]:
    """(epochs, training images per epoch or None for all) of a fine-tuned row: a row with a target gets its
    target's epochs over the whole training split, the others ``finetune_epochs`` x ``finetune_images``."""
    target = _target_name({"pass": pass_name, "setting": setting})
    if target == "shift sparse":
        return settings.shift_target_epochs, None
    if target == "hetconv P=4":
        return settings.hetconv_target_epochs, None
    return settings.finetune_epochs, settings.finetune_images


def _transform(model: torch.nn.Module, x: torch.Tensor, config) -> torch.nn.Module:
    """fxeff.transform of a copy: the rewritten model must not share trainable modules with the teacher."""
    from .transform import transform

    return transform(copy.deepcopy(model), (x,), [config])


def _has(model: torch.nn.Module, predicate) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) and predicate(m) for m in model.modules())


def _depthwise(conv: torch.nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def _standard_kxk(conv: torch.nn.Conv2d) -> bool:
    return conv.groups == 1 and conv.kernel_size[0] > 1 and conv.in_channels >= 16


def model_rows(arch: str, dataset: str, settings: Settings, cache: Optional["RowCache"] = None
               ) -> List[Dict[str, object]]:
    """Every row of one reference model: focus, then shift or HetConv (with fine-tuning). With ``cache``
    each row is saved there as soon as it is measured, and a row it already holds, measured the same way
    (``_row_fingerprint``), is taken from it instead of measured again. A saved fine-tuned row whose latency was
    measured another way (``_latency_fingerprint``: the deployment form or format) is timed again, and only timed:
    on the committed fine-tuned model where there is one (``reference.load_finetuned``), else on the rewrite before
    fine-tuning, the same graph (HetConv's time does not depend on its weights' values; a shift network's depends on
    how many distinct shifts it has, which fine-tuning changes) -- the "timed" column says which."""
    from . import data, focus
    from .passes import Focus, HetConv, Shift
    from .passes.focus import dilate_mask

    ctx = _Context(arch, dataset, settings)
    rows = []

    def measure(pass_name: str, setting: str, measure_row, retime=None) -> None:
        row = cache.get(arch, dataset, pass_name, setting) if cache is not None else None
        if row is None:
            row = measure_row()
            row["drop"] = 100 * (row["original"] - row.get("fine-tuned", row["rewritten"]))
            if cache is not None:
                cache.put(arch, dataset, row)
        elif retime is not None and cache.latency_stale(arch, dataset, row):
            retime(row)
            cache.put(arch, dataset, row)
        rows.append(row)

    def focus_row(where: str, threshold_of, fill: str, halo: int, execution: str, setting: str
                  ) -> Dict[str, object]:
        split, threshold = FOCUS_SPLITS[arch][where], threshold_of()  # a stem threshold is calibrated here
        model, calibration, _ = ctx.in_format(settings.focus_format)
        rewritten = _transform(model, calibration[:64],
                               Focus(threshold, split=split, fill=fill, halo=halo, execution=execution,
                                     plan_batch=settings.latency_batch))
        row = ctx.row("focus", setting, rewritten, settings.focus_format)
        row["execution"] = execution
        with torch.no_grad():
            masks = [dilate_mask(m, halo) for m in focus.aoi_masks(ctx.model, ctx.timing_input, threshold, split=split)]
        row["AoI"] = float(torch.cat([m.float().flatten() for m in masks]).mean())
        return row

    def finetuned_row(pass_name: str, setting: str, images: int, config) -> Dict[str, object]:
        student = _transform(ctx.model, ctx.calibration[:images], config)
        row = ctx.row(pass_name, setting, student, fmt=None)
        ctx.finetune(row, student)
        ctx.time_deployed(row, student, "fine-tuned")
        technique = _target_name(row)
        if settings.save_students and technique in reference.FINETUNED:
            meta = {k: row[k] for k in ("original", "rewritten", "fine-tuned", "fine-tune", "MAC ratio")}
            row["checkpoint"] = os.path.relpath(reference.save_finetuned(
                student, arch, dataset, technique, config, min(images, len(ctx.calibration)), meta))
        return row

    def retime(images: int, config, row: Dict[str, object]) -> None:
        technique = _target_name(row)
        if technique in reference.FINETUNED and os.path.isfile(reference.finetuned_path(arch, dataset, technique)):
            ctx.time_deployed(row, reference.load_finetuned(arch, dataset, technique), "fine-tuned (committed)")
        else:
            ctx.time_deployed(row, _transform(ctx.model, ctx.calibration[:images], config), "as rewritten")

    runs = [("input", lambda: data.BACKGROUND, "mean", h, f"input > black, halo {h}, fill mean")
            for h in settings.focus_halos]
    if COMPARE_HALO in settings.focus_halos:
        runs.append(("input", lambda: data.BACKGROUND, "zeros", COMPARE_HALO,
                     f"input > black, halo {COMPARE_HALO}, fill zeros"))
    stem_thresholds: Dict[float, float] = {}

    def stem_threshold(fraction: float) -> float:  # calibrated once, and only for a row measured
        if fraction not in stem_thresholds:
            stem_thresholds[fraction] = focus.calibrate(ctx.model, ctx.calibration, fraction,
                                                        split=FOCUS_SPLITS[arch]["stem"])
        return stem_thresholds[fraction]

    for i, fraction in enumerate(settings.stem_fractions):
        fills = ("mean", "zeros") if i == len(settings.stem_fractions) - 1 else ("mean",)
        runs += [("stem", functools.partial(stem_threshold, fraction), fill, 0,
                  f"stem calibrated {fraction:.0%}, fill {fill}") for fill in fills]
    for *run, setting in runs:
        for execution in settings.focus_executions:
            measure("focus", f"{setting}, {execution}", functools.partial(focus_row, *run, execution,
                                                                          f"{setting}, {execution}"))
    if _has(ctx.model, _depthwise):
        for mode in settings.shift_modes:
            config = Shift(mode=mode)
            measure(f"shift {mode}", mode, functools.partial(
                finetuned_row, f"shift {mode}", mode, settings.calibration_images, config),
                functools.partial(retime, settings.calibration_images, config))
    def blocks_row() -> Dict[str, object]:
        from .blocks.build import build

        images = min(settings.blocks_train_images, len(ctx.train))
        train = torch.utils.data.DataLoader(torch.utils.data.Subset(ctx.train, range(images)), batch_size=64,
                                            shuffle=True, generator=torch.Generator().manual_seed(0))
        start = time.perf_counter()
        scalable = build(copy.deepcopy(ctx.model).eval(), train, ctx.test_loader,
                         sparsities=settings.blocks_sparsities, epochs=settings.blocks_epochs,
                         composed_epochs=settings.blocks_composed_epochs,
                         batch=settings.latency_batch, progress=settings.progress)
        from .blocks.command import OUT
        from .blocks.select import InfeasibleBudgetError

        os.makedirs(OUT, exist_ok=True)  # the artifact, for a look at the row's configurations (blocks.load)
        scalable.save(os.path.join(OUT, f"accuracy-{arch}-{dataset}.pt"))
        try:
            chosen, note = scalable.select_macs(BLOCKS_MACS * scalable.profile.macs), ""
        except InfeasibleBudgetError as error:  # the sparsities cannot reach it: the fewest MACs (its own column)
            chosen, note = error.closest, f"; {BLOCKS_MACS:g} of the MACs is out of reach: the fewest"
        row = ctx.row("blocks", blocks_setting, scalable.static(chosen.choice))
        row["fine-tune"] = (f"descendants only ({settings.blocks_epochs} x {images} images per block, then "
                            f"{settings.blocks_composed_epochs} composed; build "
                            f"{time.perf_counter() - start:.0f} s{note})")
        return row

    blocks_setting = f"most accurate at <= {BLOCKS_MACS:g} of the MACs, BatchNorm folded, narrow convs"
    if _has(ctx.model, _standard_kxk):
        for part in settings.hetconv_parts:
            config = HetConv(part=part, init=settings.hetconv_init)
            measure("hetconv", f"P={part}", functools.partial(
                finetuned_row, "hetconv", f"P={part}", settings.hetconv_fit_images, config),
                functools.partial(retime, settings.hetconv_fit_images, config))
    if settings.blocks:
        measure("blocks", blocks_setting, blocks_row)
    return rows


def photo_rows(settings: Settings) -> List[Dict[str, object]]:
    """EfficientNet-Lite0 (real ImageNet weights) on the real photos: top-1 agreement of each rewrite
    with the original (no fine-tuning: ImageNet does not install offline). Focus runs per layer (execution
    "layer": every conv after the split focused), the technique's own effect on predictions; the default "auto"
    runs this model dense on the photos (focusing measures no faster), which would say nothing here."""
    from . import data, focus, models
    from .passes import Focus, Shift

    model = models.load_model(models.EFFICIENTNET_LITE0)
    x, _ = data.to_batch([image for _, image in data.photos()], models.preprocessing(models.EFFICIENTNET_LITE0))
    with torch.no_grad():
        top1 = model(x).argmax(1)
    dense_macs = bench.macs(lambda: model(x))
    thresholds = {f: focus.calibrate(model, x, f) for f in settings.aoi_fractions}
    configs = [(f"focus AoI {f:.0%}, fill {fill}, layer", Focus(t, fill=fill, execution="layer"))
               for f, t in thresholds.items() for fill in ("zeros", "mean")]
    configs += [(f"shift {mode} (no fine-tuning)", Shift(mode=mode)) for mode in settings.shift_modes]
    rows = []
    for name, config in configs:
        rewritten = _transform(model, x, config).eval()
        with torch.no_grad():
            agree = float((rewritten(x).argmax(1) == top1).float().mean())
        rows.append({"rewrite": name, "photos": len(x), "top-1 agreement": agree,
                     "MAC ratio": bench.macs(lambda: rewritten(x)) / dense_macs})
    return rows


COLUMNS = ("model", "dataset", "pass", "setting", ("AoI", "AoI (measured)"), ("original", "original acc."), ("rewritten", "after rewrite"),
           ("fine-tuned", "after fine-tuning"), ("drop", "drop (points)"), "MAC ratio", "latency ratio", "format",
           "timed", "fine-tune")
PHOTO_COLUMNS = ("rewrite", "photos", "top-1 agreement", "MAC ratio")


def _percent(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    keys = ("original", "rewritten", "fine-tuned")
    return [{k: (f"{100 * v:.2f}%" if k in keys and isinstance(v, float) else v) for k, v in r.items()} for r in rows]


def _target_name(row: Dict[str, object]) -> Optional[str]:
    """The key of TARGETS that applies to a row, or None: focus at <= 30% AoI on the cluttered set without
    retraining, sparse shift and HetConv P=4 after recovery, block scaling on ResNet-20 (issue 14's target: at
    half the MACs, after block retraining only)."""
    if row["pass"] == "focus":
        return "focus" if row["dataset"] == "cluttered-fashion-mnist" and row["AoI"] <= TARGET_AOI else None
    if row["pass"] == "shift sparse":
        return "shift sparse"
    if row["pass"] == "hetconv" and row["setting"] == "P=4":
        return "hetconv P=4"
    if row["pass"] == "blocks" and row["model"] == "resnet20":
        return "blocks"
    return None


def targets(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """The issue's accuracy targets (TARGETS, see ``_target_name``) against the measured rows. A focus row whose
    rewrite runs every grid dense (execution "auto" where focusing measured slower: MAC ratio 1) focuses nothing,
    so it neither meets nor misses the target: "n/a (ran dense)"."""
    checks = []
    for r in rows:
        name = _target_name(r)
        if name is not None:
            dense = name == "focus" and r["MAC ratio"] >= 1.0
            checks.append({"target": f"{name}: drop <= {TARGETS[name]} points" + (
                f" at AoI <= {TARGET_AOI:.0%}" if name == "focus" else ""), "model": r["model"],
                           "dataset": r["dataset"], "setting": r["setting"], "drop (points)": r["drop"],
                           "met": "n/a (ran dense)" if dense else r["drop"] <= TARGETS[name]})
    return checks


def _series(row: Dict[str, object]) -> str:
    """A row's series in the plots: its pass, and for focus its execution."""
    return f"{row['pass']} {row['execution']}" if row.get("execution") else str(row["pass"])


def plot(rows: List[Dict[str, object]], folder: str) -> List[str]:
    """accuracy vs MAC ratio and accuracy vs latency ratio, one PNG each per dataset; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    paths = []
    markers = {"vgg": "o", "resnet20": "s", "mobilenetv2": "^"}
    for dataset in sorted({r["dataset"] for r in rows}):
        for x_key, label in (("MAC ratio", "MACs after / before"), ("latency ratio", "CPU latency after / before")):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for i, series in enumerate(sorted({_series(r) for r in rows})):
                for arch, marker in markers.items():
                    pts = [r for r in rows if r["dataset"] == dataset and _series(r) == series and r["model"] == arch]
                    if not pts:
                        continue
                    acc = [100 * r.get("fine-tuned", r["rewritten"]) for r in pts]
                    ax.scatter([r[x_key] for r in pts], acc, marker=marker, color=f"C{i}",
                               label=f"{arch}: {series}")
                    originals = sorted({100 * r["original"] for r in pts})
                    for o in originals:
                        ax.axhline(o, color="grey", lw=0.5, ls=":")
            ax.set_xlabel(label)
            ax.set_ylabel("test accuracy (%), after fine-tuning where it applies")
            ax.set_title(f"{dataset}: accuracy vs {x_key} (dotted: the originals)")
            ax.legend(fontsize=7, ncol=2)
            ax.grid(alpha=0.3)
            path = os.path.join(folder, f"{dataset}-{x_key.split()[0].lower()}.png")
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths


def checkpoint_rows(settings: Settings) -> List[Dict[str, object]]:
    """The reference models as trained (the JSON written beside each committed checkpoint)."""
    rows = []
    for dataset in settings.datasets:
        for arch in settings.archs:
            with open(os.path.splitext(reference.checkpoint_path(arch, dataset))[0] + ".json") as f:
                m = json.load(f)
            rows.append({"model": arch, "dataset": dataset, "test accuracy": f"{100 * m['test_accuracy']:.2f}%",
                         "epochs": m["epochs"], "train minutes": m["train_seconds"] / 60,
                         "checkpoint MB": m["checkpoint_bytes"] / 2 ** 20, "torch": m["torch"]})
    return rows


def _row_fingerprint(pass_name: str, setting: str, settings: Settings) -> Dict[str, object]:
    """What decides one row: the test images, the calibration images (focus thresholds, shift's and
    HetConv's fitted inits), the latency batch and runs, torch, and for a fine-tuned row its init and
    fine-tuning budget. Which rows run (halos, parts, modes, models), the photos and the progress bars do
    not count: a row keeps its name (``setting``) for one way of measuring it."""
    fields = ["eval_images", "calibration_images", "latency_batch", "latency_runs"]
    if pass_name == "focus":
        fields.append("focus_format")
    elif pass_name == "blocks":
        fields += ["blocks_sparsities", "blocks_train_images", "blocks_epochs", "blocks_composed_epochs"]
    else:
        fields.append("finetune_lr")
    if pass_name == "hetconv":
        fields += ["hetconv_init", "hetconv_fit_images"]
    kept = {k: getattr(settings, k) for k in fields}
    if pass_name not in ("focus", "blocks"):
        kept["finetune"] = _finetune_budget(pass_name, setting, settings)
    return json.loads(json.dumps({**kept, "torch": torch.__version__}))  # tuples as lists, as read back


def _latency_fingerprint(pass_name: str, settings: Settings) -> Optional[Dict[str, object]]:
    """How a fine-tuned row's latency is measured (its deployment form and format), apart from its accuracy:
    a change here times the row again without fine-tuning it again. None for the other rows, whose latency is
    part of ``_row_fingerprint``."""
    if pass_name not in DEPLOY_FORMS:
        return None
    return {"format": _deploy_format(pass_name, settings), "form": DEPLOY_FORMS[pass_name],
            "malloc": "freed memory kept" if settings.keep_freed_memory else "default",
            "process": "fresh" if settings.fresh_process else "the report's", "repeats": settings.latency_repeats}


def _row_key(arch: str, dataset: str, pass_name: str, setting: str) -> str:
    """A row's key in the saved rows (and in the report's list of rows kept from other settings)."""
    return f"{arch}/{dataset}/{pass_name}/{setting}"


def _checkpoint_digest(arch: str, dataset: str) -> str:
    import hashlib

    with open(reference.checkpoint_path(arch, dataset), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class RowCache:
    """Every measured row, saved to a JSON file as soon as it is measured, so that a long report resumes
    where it stopped and a change of settings measures again only the rows it changes. With ``reuse``,
    ``get`` returns a saved row only when it was measured the same way (``_row_fingerprint``: settings and
    torch) from the same checkpoint (a retrained model is measured again); without, it returns nothing and
    the cache only saves. With ``keep`` a saved row is returned whatever its settings (still from the same
    checkpoint), and the rows kept that way are listed in ``kept``: the report is remade without measuring
    anything but stale latencies (``latency_stale``), and says which rows are older."""

    def __init__(self, path: str, settings: Settings, reuse: bool = True, keep: bool = False, retime: bool = False):
        self.path, self.settings, self.reuse, self.keep, self.retime = path, settings, reuse or keep, keep, retime
        self.kept: List[str] = []
        self.saved: Dict[str, Dict[str, object]] = {}
        if os.path.isfile(path):
            with open(path) as f:
                self.saved = json.load(f)
        self._digests: Dict[str, str] = {}

    def _digest(self, arch: str, dataset: str) -> str:
        key = f"{arch}/{dataset}"
        if key not in self._digests:
            self._digests[key] = _checkpoint_digest(arch, dataset)
        return self._digests[key]

    def get(self, arch: str, dataset: str, pass_name: str, setting: str) -> Optional[Dict[str, object]]:
        key = _row_key(arch, dataset, pass_name, setting)
        entry = self.saved.get(key)
        if not self.reuse or not entry or entry["checkpoint"] != self._digest(arch, dataset):
            return None
        if entry["settings"] != _row_fingerprint(pass_name, setting, self.settings):
            if not self.keep:
                return None
            self.kept.append(key)
        return entry["row"]

    def latency_stale(self, arch: str, dataset: str, row: Dict[str, object]) -> bool:
        """Whether a saved row's latency was measured another way than ``_latency_fingerprint`` says now (every
        fine-tuned row's with ``retime``: after a kernel change, which no setting records)."""
        if self.retime and row["pass"] in DEPLOY_FORMS:
            return True
        entry = self.saved.get(_row_key(arch, dataset, row["pass"], row["setting"]), {})
        return entry.get("latency") != _latency_fingerprint(row["pass"], self.settings)

    def put(self, arch: str, dataset: str, row: Dict[str, object]) -> None:
        key = _row_key(arch, dataset, row["pass"], row["setting"])
        self.saved[key] = {  # a kept row keeps the settings it was measured with
            "settings": self.saved[key]["settings"] if key in self.kept else _row_fingerprint(
                row["pass"], row["setting"], self.settings),
            "latency": _latency_fingerprint(row["pass"], self.settings),
            "checkpoint": self._digest(arch, dataset), "row": row}
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.saved, f, indent=1)
        os.replace(self.path + ".tmp", self.path)


def run(settings: Settings, markdown_path: str, plot_folder: str, rows_path: Optional[str] = None,
        resume: bool = False, keep: bool = False, retime: bool = False) -> str:
    """Computes every row, writes the markdown report and the plots; returns the markdown. With
    ``rows_path`` each row is also saved there as it is measured; with ``resume`` the rows saved there,
    measured the same way, are used instead of measured again (``RowCache``); with ``keep`` every row saved there
    is used as it is, and only the fine-tuned rows' stale latencies are measured again (the report lists the rows
    kept from other settings); with ``retime`` the fine-tuned rows saved there are timed again whatever their latency
    fingerprint (only timed: their accuracy is kept)."""
    from tqdm.auto import tqdm

    if (resume or keep) and not rows_path:
        raise ValueError("fxeff.accuracy_report.run: resume=True or keep=True needs rows_path (where the rows were "
                         "saved)")
    cache = RowCache(rows_path, settings, reuse=resume, keep=keep, retime=retime) if rows_path else None
    if settings.keep_freed_memory and not bench.keep_freed_memory():
        raise RuntimeError("fxeff.accuracy_report.run: keep_freed_memory needs glibc's mallopt, which this C library "
                           "lacks; run with keep_freed_memory=False (--default-malloc)")
    rows: List[Dict[str, object]] = []
    pairs = [(a, d) for d in settings.datasets for a in settings.archs]
    for arch, dataset in tqdm(pairs, desc="accuracy report", disable=not settings.progress):
        rows += model_rows(arch, dataset, settings, cache)
    rows = [{"format": "nchw", **r} for r in rows]  # rows saved before the format column were timed in NCHW
    env = bench.environment()
    lines = ["# Accuracy of each pass on the reference models", "",
             "Generated by `benchmarks/accuracy.py` (`make accuracy`); "
             + ", ".join(f"{k} {v}" for k, v in env.items()) + ".", "",
             "Accuracy is top-1 on the test split"
             + (" (whole)" if settings.eval_images is None else f" (first {settings.eval_images} images)")
             + f". MAC and latency ratios are rewritten / original on a batch of {settings.latency_batch} test "
               f"images (latency: medians of {settings.latency_runs} interleaved runs, original and rewritten in the "
               "memory format of the format column"
               + (f"; the rows this run measures: the median ratio of {settings.latency_repeats} such timings"
                  + (", each in a fresh process" if settings.fresh_process else ""))
               + "). Fine-tuning: "
               f"`fxeff.finetune` (distillation from the original) at peak lr {settings.finetune_lr}: the rows "
               f"with a target for whole epochs of the training split (HetConv P=4: {settings.hetconv_target_epochs}, "
               f"sparse shift: {settings.shift_target_epochs}), the others for {settings.finetune_epochs} epoch(s) of "
               f"{settings.finetune_images or 'all'} training images (the fine-tune column says which); focus "
               "is never fine-tuned (its weights are the original's). The rewrites start from weights fitted "
               f"on training images: shift `init=\"lstsq\"` on {settings.calibration_images}, HetConv "
               f"`init=\"{settings.hetconv_init}\"` on {min(settings.hetconv_fit_images, settings.calibration_images)}"
               " (each layer fitted to the input it sees once the layers before it are rewritten). The fine-tuned "
               "rows are timed after fine-tuning in their CPU deployment form, against the original deployed alike: "
               "both with their BatchNorms folded into the convs they read (`fxeff.FoldBatchNorm`), a shift network "
               "with `fxeff.FuseShift` first (shift, BatchNorm and clamp fused into the 1x1 conv that reads them; "
               f"interpolated shifts stay unfused); HetConv in {settings.hetconv_format}, shift in "
               f"{settings.shift_format}"
               + ("; the rows this run measures, with glibc's malloc keeping freed memory "
                  "(`fxeff.bench.keep_freed_memory`; rows reused from an earlier run keep the allocator they were "
                  "timed with: the default before the fourteenth session)" if settings.keep_freed_memory else "")
               + "; the timed column says which weights ran (a row timed again after its "
               "fine-tuning, on the committed fine-tuned model where there is one, else on the rewrite before "
               "fine-tuning: the same graph)."
             + (f" Block scaling (`fxeff.blocks.build`): descendants at sparsities "
                f"{', '.join(f'{v:g}' for v in settings.blocks_sparsities)}, each retrained to reproduce its block's "
                f"output ({settings.blocks_epochs} epochs of {settings.blocks_train_images} training images), then "
                f"trained composed into the model, distilling its output ({settings.blocks_composed_epochs} epochs, "
                f"`fxeff.blocks.retrain_composed`); its row is the configuration the optimiser finds most accurate "
                f"with at most {BLOCKS_MACS:g} of the MACs, in the inference form build leaves (BatchNorm folded, "
                f"narrow convs), timed against the original as it is." if settings.blocks else ""), "",
             "## Reference models", "",
             "Trained by `fxeff train ARCH DATASET` (fixed seed, 2 threads); the minutes include time shared with "
             "other jobs where the machine was busy (see the notes).", "",
             bench.markdown_table(checkpoint_rows(settings), ("model", "dataset", "test accuracy", "epochs",
                                                              "train minutes", "checkpoint MB", "torch")), "",
             "## Every pass", "",
             bench.markdown_table(_percent(rows), COLUMNS), ""]
    if cache is not None and cache.kept:
        lines += ["Rows kept as saved, measured with other settings than this run's (`--keep-saved`): "
                  + ", ".join(f"`{key}`" for key in cache.kept) + ".", ""]
    lines += ["## Targets", "",
              bench.markdown_table(targets(rows), ("target", "model", "dataset", "setting", "drop (points)", "met")),
              ""]
    notes = os.path.join(os.path.dirname(os.path.abspath(markdown_path)), NOTES_FILE)
    if os.path.isfile(notes):  # the hand-written reading of the numbers (the gaps and their causes)
        with open(notes) as f:
            lines += [f.read().strip(), ""]
    for path in plot(rows, plot_folder):
        rel = os.path.relpath(path, os.path.dirname(os.path.abspath(markdown_path)))
        lines += [f"![{os.path.basename(path)}]({rel})", ""]
    if settings.photos:
        lines += ["## EfficientNet-Lite0 on the real photos", "",
                  "Real ImageNet weights; agreement of the rewritten model's top-1 with the original's.", "",
                  bench.markdown_table(photo_rows(settings), PHOTO_COLUMNS), ""]
    text = "\n".join(lines)
    os.makedirs(os.path.dirname(os.path.abspath(markdown_path)), exist_ok=True)
    with open(markdown_path, "w") as f:
        f.write(text)
    return text


__all__ = ["Settings", "RowCache", "model_rows", "photo_rows", "targets", "plot", "run", "AOI_FRACTIONS", "HETCONV_PARTS",
           "SHIFT_MODES", "FOCUS_SPLITS", "FOCUS_HALOS", "STEM_FRACTIONS", "TARGETS", "DEPLOY_FORMS",
           "deploy"]
