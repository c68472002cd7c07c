"""Measuring glance and focus: the budget curve (accuracy against MACs per image, thresholds calibrated on held-out
images and applied to others), where the first patch lands against the item's true place (Cluttered
Fashion-MNIST's generator knows it), and checkpoints that carry their per-step MACs (GFNet cannot count a
user-trained checkpoint's MACs: its issue #8)."""
import dataclasses
import json
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from .crop import pixel_corners
from .inference import Thresholds, _confidence, calibrate, step_macs
from .model import GlanceFocus

_WHERE = "fxeff.glance"
CONFIG_KEYS = ("patch_size", "steps", "glance_size", "head", "policy", "seed", "saliency")
# what a checkpoint written before a key existed was built with
CONFIG_BEFORE = {"saliency": "cam"}


def exit_steps(logits: torch.Tensor, thresholds: Thresholds) -> torch.Tensor:
    """The step [N] each image leaves at under ``thresholds``, from every step's logits [T, N, classes]: the first
    whose confidence reaches its threshold (the last step takes the rest). What ``early_exit`` computes with
    compaction, here from the anytime logits."""
    steps = logits.shape[0]
    if len(thresholds.values) != steps:
        raise ValueError(f"{_WHERE}.exit_steps: {len(thresholds.values)} thresholds for {steps} steps")
    confidence = _confidence(logits.reshape(-1, logits.shape[-1])).reshape(logits.shape[:2])
    values = torch.tensor(thresholds.values[:-1] + [-float("inf")], dtype=confidence.dtype)
    leaves = confidence >= values[:, None]
    return leaves.to(torch.int8).argmax(dim=0)  # the first True; the last row is all True


@dataclasses.dataclass
class BudgetPoint:
    """One point of the budget curve: the MACs per image asked, the thresholds' ratio ``p`` and silent steps, the
    MACs per image realised on the calibration images and on the test images, the test accuracy (%), and the share
    of test images leaving at each step."""
    asked: float
    p: float
    no_exit_steps: List[int]
    calibration_macs: float
    macs: float
    accuracy: float
    exit_shares: List[float]


def budget_curve(model: GlanceFocus, calibration_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                 macs: Sequence[int], budgets: Sequence[float], tolerance: float = 0.01) -> List[BudgetPoint]:
    """For each budget (MACs per image), thresholds calibrated on ``calibration_logits`` [T, M, classes] (held-out
    images, not augmented: ``calibrate``, within ``tolerance`` of the budget there: 1%, so that the realised MACs
    on other images stay within the 3% the budget mode promises) and applied to ``logits`` [T, N, classes] with
    ``labels`` [N]."""
    cumulative = torch.tensor(list(macs), dtype=torch.float64).cumsum(0)
    out = []
    for budget in budgets:
        th = calibrate(model, calibration_logits, macs, budget=float(budget), tolerance=tolerance)
        step = exit_steps(logits, th)
        chosen = logits[step, torch.arange(logits.shape[1])]
        accuracy = 100.0 * float((chosen.argmax(dim=1) == labels).double().mean())
        shares = torch.bincount(step, minlength=logits.shape[0]).double() / logits.shape[1]
        out.append(BudgetPoint(float(budget), th.p, list(th.no_exit_steps), th.expected_macs,
                               float(cumulative[step].mean()), accuracy, [float(s) for s in shares]))
    return out


def first_corners(model: GlanceFocus, x: torch.Tensor) -> torch.Tensor:
    """The pixel corners [N, 2] (top, left) of step 1's patch on images ``x``."""
    if model.steps < 2:
        raise ValueError(f"{_WHERE}.first_corners: the model has one step (the glance), no patch")
    with torch.no_grad():
        corners = model.corners(model.glance(x), 1)
    return pixel_corners(corners, model.patch_size, *model.image_size)


def item_coverage(corners: torch.Tensor, patch_size: int, dataset: Any, indices: Sequence[int]) -> torch.Tensor:
    """The share [N] of each item's pixels (its non-zero pixels in the Fashion-MNIST source) that the patch at
    pixel ``corners`` [N, 2] covers, for items ``indices`` of ``dataset`` (a ClutteredFashionMNIST: it knows where
    it put each item)."""
    if not hasattr(dataset, "placement") or not hasattr(dataset, "sources"):
        raise TypeError(f"{_WHERE}.item_coverage: dataset must know its items' places (ClutteredFashionMNIST), got "
                        f"{type(dataset).__name__}")
    if len(corners) != len(indices):
        raise ValueError(f"{_WHERE}.item_coverage: {len(corners)} corners for {len(indices)} items")
    out = torch.empty(len(indices), dtype=torch.float64)
    for k, (i, (y, x)) in enumerate(zip(indices, corners.tolist())):
        top, left = dataset.placement(int(i))
        mask = torch.from_numpy(dataset.sources[int(i)] > 0)
        rows = torch.arange(28) + top
        cols = torch.arange(28) + left
        inside = ((rows >= y) & (rows < y + patch_size))[:, None] & ((cols >= x) & (cols < x + patch_size))[None]
        out[k] = float((mask & inside).sum()) / max(int(mask.sum()), 1)
    return out


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def config_of(model: GlanceFocus) -> Dict[str, Any]:
    """The constructor arguments that rebuild ``model`` around the same classifier (``GlanceFocus.config``)."""
    return model.config()


def save(model: GlanceFocus, path: str, example: torch.Tensor, meta: Optional[Mapping[str, Any]] = None
         ) -> Dict[str, Any]:
    """Saves ``model`` to ``path``: its configuration, weights, MACs per step (``step_macs`` on ``example``) and
    ``meta`` (JSON-able values: where it came from), loadable with ``weights_only=True``. Returns what was saved."""
    from .inference import fingerprint

    record = {"format": "fxeff.glance/1", "config": config_of(model), "image_size": list(model.image_size),
              "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
              "macs": step_macs(model, example), "fingerprint": fingerprint(model), "torch": str(torch.__version__),
              "meta": json.loads(json.dumps(dict(meta or {})))}  # plain values (a TorchVersion is not)
    torch.save(record, path)
    return record


def load(path: str, model: nn.Module, example: torch.Tensor) -> GlanceFocus:
    """The GlanceFocus saved at ``path`` (``save``), rebuilt around ``model`` (the classifier it was built from)
    for images like ``example``; its MACs per step recounted and checked against the saved ones."""
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt file reads as one clear error
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"{_WHERE}.load: {path} is not a readable glance checkpoint ({first})") from exc
    if not isinstance(record, dict) or record.get("format") != "fxeff.glance/1":
        raise ValueError(f"{_WHERE}.load: {path} is not a glance checkpoint (fxeff.glance.save writes them)")
    if list(example.shape[-2:]) != list(record["image_size"]):
        raise ValueError(f"{_WHERE}.load: the checkpoint is for {record['image_size']} images, the example is "
                         f"{list(example.shape[-2:])}")
    gf = GlanceFocus(model, example, **{k: record["config"].get(k, CONFIG_BEFORE.get(k)) for k in CONFIG_KEYS})
    try:
        gf.load_state_dict(record["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"{_WHERE}.load: the checkpoint's weights do not fit a GlanceFocus over this classifier: "
                         f"it was built from another one ({str(exc).splitlines()[0]})") from exc
    counted = step_macs(gf, example)
    if counted != list(record["macs"]):
        raise ValueError(f"{_WHERE}.load: the rebuilt model counts {counted} MACs per step, the checkpoint "
                         f"recorded {record['macs']}: it was built from another classifier")
    gf.meta = dict(record["meta"])
    gf.macs_per_step = counted
    return gf.eval()


__all__ = ["exit_steps", "BudgetPoint", "budget_curve", "first_corners", "item_coverage", "config_of", "save",
           "load"]
