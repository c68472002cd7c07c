"""The offline stage in one call, and the artifact's way back: ``build`` finds the blocks, makes and retrains the
descendants and profiles them into a ScalableModel; ``load`` rebuilds one from its artifact and the model."""
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from .descendants import DEFAULT_SPARSITIES, descendants
from .profile import Metric, profile, top1
from .retrain import block_inputs, block_mse, images_of, retrain, retrain_composed
from .scalable import ScalableModel, model_fingerprint, profile_from_dict, read_artifact


def _outline(model: nn.Module, x: torch.Tensor, settings: Mapping[str, Any]):
    from ..passes import Blocks
    from ..transform import transform

    gm = transform(model, x, [Blocks(max_ratio=settings["max_ratio"], min_convs=settings["min_convs"])])
    names = [b["name"] for b in gm.fxeff_blocks]
    if not names:
        raise ValueError(f"fxeff.blocks: {type(model).__name__} has no block to scale: "
                         f"{gm.fxeff_report.notes[0] if gm.fxeff_report.notes else ''}")
    inputs = block_inputs(gm, x)
    students = {b["name"]: descendants(gm.get_submodule(b["name"]), inputs[b["name"]], b["prunable"],
                                       settings["sparsities"] if b["prunable"] else (0.0,), settings["importance"],
                                       settings["round_to"])
                for b in gm.fxeff_blocks}
    return gm, students


def fold_batchnorms(gm: torch.fx.GraphModule, students: Dict[str, Dict[float, nn.Module]]) -> None:
    """Each block and descendant with its eval BatchNorms folded into the convs before them (torch.fx's fuse: new
    modules, the model's own are untouched), in ``gm`` and ``students`` in place: the form that runs inference,
    whose latencies the profile then measures (at small channel counts BatchNorm took 27-42% of a pruned
    ResNet-20's time on CPU)."""
    from torch.fx.experimental.optimization import fuse

    for name, by_sparsity in students.items():
        for sparsity in list(by_sparsity):
            by_sparsity[sparsity] = fuse(by_sparsity[sparsity])
        setattr(gm, name, by_sparsity[0.0])


def narrow_block_convs(gm: torch.fx.GraphModule, students: Dict[str, Dict[float, nn.Module]],
                       example: torch.Tensor) -> int:
    """The convs of ``gm`` (outside the blocks) and of each block and descendant that run faster as
    ``fxeff.nn.NarrowConv2d`` (few channels, as pruning leaves them, and strided 1x1 shortcuts:
    ``fxeff.nn.narrow.gains``) replaced by it, in place, with the residual add and the ReLU after each fused where
    there are (``fxeff.nn.narrow.narrow_convs``; ``example``: a batch of the model's inputs, for the shapes). The
    vendor convs cost a pruned conv with 3 outputs what they cost it with 16. Returns the number replaced."""
    from ..nn.narrow import narrow_convs

    inputs = block_inputs(gm, example)
    count = narrow_convs(gm, (example,))
    for name, by_sparsity in students.items():
        for module in by_sparsity.values():
            count += narrow_convs(module, (inputs[name],))
        setattr(gm, name, by_sparsity[0.0])
    return count


def inference_form(gm: torch.fx.GraphModule, students: Dict[str, Dict[float, nn.Module]],
                   settings: Mapping[str, Any], example: torch.Tensor) -> None:
    """The model as it runs inference, in place, per ``settings``: BatchNorms folded into the convs before them
    (in every block and descendant, and outside the blocks where conv and BatchNorm are both there), then narrow
    convs (``example``: a batch of the model's inputs)."""
    if settings.get("fold_batchnorm"):
        from torch.fx.experimental.optimization import fuse

        fold_batchnorms(gm, students)
        gm.graph = fuse(gm, inplace=True, no_trace=True).graph
        gm.recompile()
    if settings.get("narrow_convs"):
        narrow_block_convs(gm, students, example)


def build(model: nn.Module, train_loader: torch.utils.data.DataLoader, eval_loader: torch.utils.data.DataLoader, *,
          sparsities: Sequence[float] = DEFAULT_SPARSITIES, importance: str = "l1", round_to: Optional[int] = None,
          epochs: int = 1, lr: float = 3e-4, max_ratio: float = 0.125, min_convs: int = 2, batch: int = 1,
          metric: Metric = top1, checkpoint: Optional[str] = None, progress: bool = True,
          data: str = "", fold_batchnorm: bool = True, narrow_convs: bool = True,
          parallel: str = "data", composed_epochs: int = 3, composed_lr: float = 3e-4,
          measure_front: int = 0) -> ScalableModel:
    """The ScalableModel of ``model`` (eval mode): its blocks (fxeff.passes.Blocks with ``max_ratio``,
    ``min_convs``), each block's descendants at ``sparsities`` (``importance``, ``round_to``), retrained for
    ``epochs`` on ``train_loader``'s images (Adam at ``lr``, resumable from ``checkpoint``), profiled on
    ``eval_loader`` (accuracy by ``metric``; latency at ``batch`` images). ``data`` names the data in the
    artifact. Its ``meta["mse"]`` holds each descendant's block MSE before and after retraining.
    ``composed_epochs``: then the descendants train composed into the model for that many epochs, distilling its
    output (``retrain_composed``, Adam at ``composed_lr``; resumable from ``checkpoint`` + ".composed"; 0: block
    retraining only, LegoDNN's method).
    ``fold_batchnorm``: after retraining, every block and descendant gets its BatchNorms folded
    (``fold_batchnorms``), for inference. ``narrow_convs``: then every conv with few channels that runs faster as
    ``fxeff.nn.NarrowConv2d`` (``narrow_block_convs``) becomes one, with its ReLU fused. ``parallel``: under
    torch.distributed, what the ranks split in retraining ("data" or "blocks": ``retrain``). ``measure_front``: then
    the configurations at that many places along the fronts by latency and by MACs are measured whole on
    ``eval_loader`` (``ScalableModel.measure_front``, two rounds; 0, the default: none; at 8 places it changed no
    measured result of ResNet-20 on the cluttered set: the budgets' choices fell between the places)."""
    model.eval()
    settings = {"sparsities": [float(s) for s in sparsities], "importance": importance, "round_to": round_to,
                "epochs": epochs, "lr": lr, "max_ratio": max_ratio, "min_convs": min_convs, "batch": batch,
                "fold_batchnorm": fold_batchnorm, "narrow_convs": narrow_convs, "composed_epochs": composed_epochs,
                "composed_lr": composed_lr, "measure_front": measure_front}
    x = images_of(next(iter(train_loader)))[:2]
    gm, students = _outline(model, x, settings)
    before = block_mse(gm, students, eval_loader, batches=4)
    history = retrain(gm, students, train_loader, epochs=epochs, lr=lr, checkpoint=checkpoint, progress=progress,
                      parallel=parallel)
    after = block_mse(gm, students, eval_loader, batches=4)
    composed: Dict[str, Any] = {"loss": []}
    if composed_epochs:
        composed = retrain_composed(gm, students, train_loader, epochs=composed_epochs, lr=composed_lr,
                                    checkpoint=None if checkpoint is None else checkpoint + ".composed",
                                    progress=progress)
    inference_form(gm, students, settings, x)
    result = profile(gm, students, eval_loader, batch=batch, metric=metric, progress=progress)
    meta: Dict[str, Any] = {"model": f"{type(model).__module__}.{type(model).__qualname__}",
                            "fingerprint": model_fingerprint(model), "data": data, "settings": settings,
                            "retrain_loss": history["loss"], "composed_loss": composed["loss"],
                            "mse": {name: {f"{s:g}": [before[name][s], after[name][s]] for s in after[name]}
                                    for name in after}}
    scalable = ScalableModel(gm, students, result, meta)
    if measure_front:
        scalable.meta["front_measured"] = scalable.measure_front(eval_loader, points=measure_front, metric=metric)
    return scalable


def load(path: str, model: nn.Module, example_input: torch.Tensor) -> ScalableModel:
    """The ScalableModel saved at ``path`` (ScalableModel.save) for ``model``, the model it was built from (the
    artifact holds its fingerprint: another model, or the same with other weights, is refused, as is another
    torch version or a damaged file). ``example_input``: a batch of its inputs. The descendants are pruned again
    (deterministically) and given the artifact's retrained weights; nothing is returned half-loaded."""
    data = read_artifact(path)
    meta = data["meta"]
    if meta.get("fingerprint") != model_fingerprint(model):
        raise ValueError(f"fxeff.blocks.load: the artifact {path} was built from another model "
                         f"({meta.get('model')}, or the same architecture with other weights) than this "
                         f"{type(model).__name__}")
    model.eval()
    gm, students = _outline(model, example_input[:2], meta["settings"])
    inference_form(gm, students, meta["settings"], example_input[:2])
    if [b["name"] for b in gm.fxeff_blocks] != list(data["blocks"]):
        raise ValueError(f"fxeff.blocks.load: the model's blocks {[b['name'] for b in gm.fxeff_blocks]} are not the "
                         f"artifact's {data['blocks']}")
    for name, by_sparsity in data["students"].items():
        for key, state in by_sparsity.items():
            sparsity = float(key)
            if name not in students or sparsity not in students[name]:
                raise ValueError(f"fxeff.blocks.load: the artifact holds {name} at sparsity {key}, which this "
                                 f"model's blocks do not make")
            try:
                students[name][sparsity].load_state_dict(state)
            except RuntimeError as error:
                raise ValueError(f"fxeff.blocks.load: {name} at sparsity {key} does not match the artifact's "
                                 f"weights: {error}") from None
    return ScalableModel(gm, students, profile_from_dict(data["profile"]), meta)


__all__ = ["build", "load", "fold_batchnorms", "narrow_block_convs", "inference_form"]
