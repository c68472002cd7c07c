"""Recovery fine-tuning by knowledge distillation: ``fxeff.finetune(student, teacher, loader, epochs)``.

A model rewritten by fxeff's passes (Shift, HetConv) loses accuracy; ``finetune`` trains it (the
student) to match the original model (the teacher) with the one training loop, ``fxeff.training.fit``.
The loss of a batch is

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))        (batchmean)
    + (1 - alpha) * cross_entropy(student, labels)                        (batches (images, labels) only)
    + feature_weight * sum of MSE(student feature, teacher feature)       (when ``features`` is given)

The student may be wrapped in DistributedDataParallel (``fit`` does the rank handling: DistributedSampler
epochs, progress and checkpoints on rank 0); the teacher is a plain module, frozen and in eval mode
during the call and restored afterwards.
"""
import numbers
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .training import Batch, bare_module, fit

Features = Union[Mapping[str, str], Iterable[str]]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch (Hinton et al.)."""
    t = float(temperature)
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


def _check(epochs, lr, temperature, alpha, feature_weight) -> None:
    def number(value) -> bool:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"fxeff.finetune: epochs expected an int >= 1, got {epochs!r}")
    if not number(lr) or not lr > 0:
        raise ValueError(f"fxeff.finetune: lr expected a number > 0, got {lr!r}")
    if not number(temperature) or not temperature > 0:
        raise ValueError(f"fxeff.finetune: temperature expected a number > 0, got {temperature!r}")
    if not number(alpha) or not 0 <= alpha <= 1:
        raise ValueError(f"fxeff.finetune: alpha expected a number in [0, 1], got {alpha!r}")
    if not number(feature_weight) or not feature_weight >= 0:
        raise ValueError(f"fxeff.finetune: feature_weight expected a number >= 0, got {feature_weight!r}")


def _feature_pairs(features: Optional[Features]) -> List[Tuple[str, str]]:
    if features is None:
        return []
    if isinstance(features, str):
        raise ValueError(f"fxeff.finetune: features expected a dict {{student_name: teacher_name}} or a list of "
                         f"module names, got the string {features!r} (wrap it in a list)")
    if isinstance(features, Mapping):
        pairs = list(features.items())
    else:
        pairs = [(name, name) for name in features]
    for pair in pairs:
        if not all(isinstance(name, str) for name in pair):
            raise ValueError(f"fxeff.finetune: features expected module names (str), got {pair!r}")
    if not pairs:
        raise ValueError("fxeff.finetune: features expected at least one module name, got an empty collection")
    return pairs


def _submodule(model: nn.Module, name: str, role: str) -> nn.Module:
    called = None
    if isinstance(model, torch.fx.GraphModule):  # a rewritten layer can stay as an attribute the graph never calls
        called = {node.target for node in model.graph.nodes if node.op == "call_module"}
    if called is None or name in called:
        try:
            return model.get_submodule(name)
        except AttributeError:
            pass
    names = [n for n, _ in model.named_modules() if n and (called is None or n in called)]
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    raise ValueError(
        f"fxeff.finetune: features names {role} module {name!r}, which the {role} ({type(model).__name__}) does not "
        f"have{'' if called is None else ' as a module its graph calls'}. In a torch.fx GraphModule (what fxeff.transform returns) only the leaf modules that the graph calls "
        f"survive: containers (nn.Sequential, blocks) and rewritten layers are gone, so name a leaf such as a "
        f"BatchNorm or activation. Its modules: {shown or 'none'}")


def _shared_tensors(student: nn.Module, teacher: nn.Module) -> List[str]:
    """Names of the student's parameters and buffers whose storage the teacher also holds."""
    def key(t: torch.Tensor):
        return (t.device, t.untyped_storage().data_ptr()) if t.numel() and t.device.type != "meta" else id(t)

    teacher_keys = {key(t) for t in list(teacher.parameters()) + list(teacher.buffers())}
    return [name for name, t in list(student.named_parameters()) + list(student.named_buffers())
            if key(t) in teacher_keys]


def _uncalled_parameters(model: nn.Module) -> List[str]:
    """Parameters of a GraphModule that its graph never reads (a rewritten layer left as an attribute)."""
    if not isinstance(model, torch.fx.GraphModule):
        return []
    used = [node.target for node in model.graph.nodes if node.op in ("call_module", "get_attr")]
    return [name for name, _ in model.named_parameters()
            if not any(name == target or name.startswith(target + ".") for target in used)]


def _device(model: nn.Module) -> Optional[torch.device]:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return None


def finetune(student: nn.Module, teacher: nn.Module, loader: torch.utils.data.DataLoader, epochs: int,
             lr: float = 0.01, temperature: float = 4.0, alpha: float = 0.9, features: Optional[Features] = None,
             feature_weight: float = 1.0, checkpoint: Optional[str] = None, channels_last: bool = True,
             progress: bool = True) -> Dict[str, list]:
    """Trains ``student`` in place for ``epochs`` to match ``teacher`` (knowledge distillation) with
    ``fxeff.training.fit`` (SGD Nesterov, one-cycle learning rate peaking at ``lr``).

    ``loader`` yields (images, labels) or (images,); the labels add (1 - alpha) * cross-entropy.
    ``features``: {student_module_name: teacher_module_name} (or a list of names used for both) whose
    outputs, captured with forward hooks, add ``feature_weight`` * MSE each (shapes must match).
    ``student`` may be a DistributedDataParallel wrapper (use a DistributedSampler loader; every
    parameter must take part in the forward, as in what fxeff.transform returns); the
    teacher is moved to the student's device, put in eval mode with frozen parameters for the call,
    and given back as it was. The student must not share weights with the teacher: fxeff.transform's
    GraphModule shares the model's, so transform a copy (``fxeff.transform(copy.deepcopy(model), ...)``).
    ``checkpoint``: the bare student's state_dict is saved there after each epoch (rank 0).

    Returns fit's history ({"loss", "seconds"}: per epoch) plus the per-epoch means of the terms,
    "kd", "ce" and "feature" (0.0 where a term is absent), on this process's batches.
    """
    _check(epochs, lr, temperature, alpha, feature_weight)
    if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
        raise ValueError(f"fxeff.finetune: student and teacher expected nn.Modules, got "
                         f"{type(student).__name__} and {type(teacher).__name__}")
    bare, teacher = bare_module(student), bare_module(teacher)
    if bare is teacher:
        raise ValueError("fxeff.finetune: student and teacher expected two different modules, got the same one")
    shared = _shared_tensors(bare, teacher)
    if shared:
        raise ValueError(
            f"fxeff.finetune: student and teacher expected separate weights, got {len(shared)} tensor(s) shared "
            f"({', '.join(shared[:5])}{', ...' if len(shared) > 5 else ''}): fxeff.transform's GraphModule shares "
            f"the model's parameters, so the teacher would be trained and frozen with the student. Transform a "
            f"copy: student = fxeff.transform(copy.deepcopy(teacher), x, passes=[...])")
    if isinstance(student, nn.parallel.DistributedDataParallel) and not student.find_unused_parameters:
        dead = _uncalled_parameters(bare)
        if dead:
            raise ValueError(
                f"fxeff.finetune: a DistributedDataParallel student expected every parameter to take part in the "
                f"forward, got {len(dead)} its graph never reads ({', '.join(dead[:5])}"
                f"{', ...' if len(dead) > 5 else ''}). Call "
                f"student.delete_all_unused_submodules() before wrapping it in DistributedDataParallel")
    pairs = _feature_pairs(features)
    hooks_on = [(_submodule(bare, s, "student"), _submodule(teacher, t, "teacher")) for s, t in pairs]

    device = _device(bare)
    teacher_device = _device(teacher)
    teacher_training = teacher.training
    teacher_grad = [(p, p.requires_grad) for p in teacher.parameters()]
    captured: Dict[Tuple[str, int], torch.Tensor] = {}
    handles = []

    def capture(side: str, index: int):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                raise ValueError(f"fxeff.finetune: features {pairs[index][0 if side == 's' else 1]!r} expected a "
                                 f"module returning a tensor, got {type(output).__name__}")
            captured[(side, index)] = output
        return hook

    epoch_terms: Dict[str, list] = {"kd": [], "ce": [], "feature": []}
    history_terms: Dict[str, list] = {"kd": [], "ce": [], "feature": []}

    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        images = batch[0]
        labels = batch[1] if len(batch) > 1 else None
        captured.clear()
        with torch.no_grad():
            teacher_logits = teacher(images)
        student_logits = model(images)
        kd = kd_loss(student_logits, teacher_logits, temperature)
        loss = alpha * kd
        ce = feature = None
        if labels is not None:
            ce = F.cross_entropy(student_logits, labels)
            if alpha < 1:
                loss = loss + (1 - alpha) * ce
        if pairs:
            terms = []
            for i, (s_name, t_name) in enumerate(pairs):
                s, t = captured.get(("s", i)), captured.get(("t", i))
                if s is None or t is None:
                    which = f"student module {s_name!r}" if s is None else f"teacher module {t_name!r}"
                    raise ValueError(f"fxeff.finetune: features expected {which} to run in the forward, got no "
                                     f"output from it (in a torch.fx GraphModule, modules the graph does not call "
                                     f"never run)")
                if s.shape != t.shape:
                    raise ValueError(f"fxeff.finetune: features expected student {s_name!r} and teacher {t_name!r} "
                                     f"outputs of the same shape, got {tuple(s.shape)} and {tuple(t.shape)}")
                terms.append(F.mse_loss(s, t.detach()))
            feature = torch.stack(terms).sum()
            loss = loss + feature_weight * feature
        captured.clear()
        for key, value in (("kd", kd), ("ce", ce), ("feature", feature)):
            epoch_terms[key].append(value.detach() if value is not None else None)
        return loss

    def on_epoch_end(epoch: int, mean_loss: float) -> None:
        for key, values in epoch_terms.items():
            present = [v for v in values if v is not None]
            history_terms[key].append(float(torch.stack(present).sum()) / len(present) if present else 0.0)
            values.clear()

    try:
        if device is not None:
            teacher.to(device)
        teacher.eval()
        for p, _ in teacher_grad:
            p.requires_grad_(False)
        for i, (s_module, t_module) in enumerate(hooks_on):
            handles.append(s_module.register_forward_hook(capture("s", i)))
            handles.append(t_module.register_forward_hook(capture("t", i)))
        history = fit(student, loader, loss_fn, epochs, lr=lr, checkpoint=checkpoint, channels_last=channels_last,
                      progress=progress, description="fxeff.finetune", on_epoch_end=on_epoch_end)
    finally:
        for handle in handles:
            handle.remove()
        captured.clear()
        for p, flag in teacher_grad:
            p.requires_grad_(flag)
        teacher.train(teacher_training)
        if teacher_device is not None and device is not None and teacher_device != device:
            teacher.to(teacher_device)
    history = dict(history)
    history.update(history_terms)
    return history


__all__ = ["finetune", "kd_loss"]
