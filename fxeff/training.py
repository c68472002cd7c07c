"""The one training loop of fxeff (``fit``), its evaluation (``accuracy``), and the recipe that trains
the reference models (``train_reference``). ``fxeff.finetune`` runs the same loop with a distillation loss.

``fit`` works for plain modules and for modules wrapped in torch.nn.parallel.DistributedDataParallel:
it calls ``set_epoch`` on a DistributedSampler, shows progress and writes checkpoints on rank 0 only,
and saves the wrapped module's weights (so a checkpoint loads into the bare model).
"""
import json
import os
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

Batch = Sequence[torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def bare_module(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper (else ``model`` itself)."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def _to(batch: Batch, device: torch.device, channels_last: bool) -> list:
    out = []
    for t in batch:
        t = t.to(device, non_blocking=True)
        if channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        out.append(t)
    return out


def save_state_dict(model: nn.Module, path: str) -> None:
    """The bare module's state_dict, contiguous, to ``path`` (rank 0 only; folders made as needed)."""
    if _rank() != 0:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in bare_module(model).state_dict().items()}
    torch.save(state, path)


def fit(model: nn.Module, loader: torch.utils.data.DataLoader, loss_fn: LossFn, epochs: int, lr: float = 0.05,
        weight_decay: float = 5e-4, momentum: float = 0.9, checkpoint: Optional[str] = None,
        channels_last: bool = True, progress: bool = True, description: str = "fxeff.fit",
        on_epoch_end: Optional[Callable[[int, float], None]] = None, optimizer: str = "sgd") -> Dict[str, list]:
    """Trains ``model`` in place for ``epochs`` with SGD (Nesterov momentum, weight decay on weights,
    none on BatchNorm/bias) and a one-cycle learning rate peaking at ``lr`` (runs of one or two steps:
    ``lr`` throughout); ``optimizer="adam"``: Adam at the constant ``lr`` instead (the same weight decay split;
    LegoDNN's block retraining); ``loss_fn(model, batch)``
    returns the loss of one batch (already on the model's device). Saves the weights to ``checkpoint``
    after each epoch when given. Returns {"loss": mean loss per epoch, "seconds": per epoch}."""
    from tqdm.auto import tqdm

    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"fxeff.fit: epochs must be a positive int, got {epochs!r}")
    if len(loader) == 0:
        raise ValueError("fxeff.fit: the loader yields no batch")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("fxeff.fit: the model has no parameter that requires grad")
    device = params[0].device
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"fxeff.fit: optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    adam = optimizer == "adam"
    optimizer = torch.optim.Adam(groups, lr=lr) if adam else \
        torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    steps = epochs * len(loader)
    if steps >= 3 and not adam:  # a quarter of the steps warm up (at least 2: OneCycleLR divides by warm-up - 1)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps,
                                                        pct_start=max(0.25, 2 / steps))
    else:  # Adam, or one or two steps (no cycle): lr throughout
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    history: Dict[str, list] = {"loss": [], "seconds": []}
    show = progress and _rank() == 0
    for epoch in range(epochs):
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        model.train()
        start, total, count = time.perf_counter(), 0.0, 0
        bar = tqdm(loader, desc=f"{description} {epoch + 1}/{epochs}", disable=not show, leave=False)
        for batch in bar:
            loss = loss_fn(model, _to(batch, device, channels_last))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total, count = total + float(loss.detach()), count + 1
            bar.set_postfix(loss=f"{total / count:.4f}")
        history["loss"].append(total / count)
        history["seconds"].append(time.perf_counter() - start)
        if checkpoint is not None:
            save_state_dict(model, checkpoint)
        if on_epoch_end is not None:
            on_epoch_end(epoch, total / count)
    return history


def cross_entropy_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The classification loss of a batch (images, labels)."""
    images, labels = batch[0], batch[1]
    return nn.functional.cross_entropy(model(images), labels)


@torch.no_grad()
def accuracy(model: nn.Module, loader: torch.utils.data.DataLoader, channels_last: bool = False,
             progress: bool = False) -> float:
    """Top-1 accuracy (a fraction) of ``model`` in eval mode over the (images, labels) of ``loader``."""
    from tqdm.auto import tqdm

    model.eval()
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    correct = seen = 0
    for batch in tqdm(loader, desc="accuracy", disable=not progress, leave=False):
        images, labels = _to(batch[:2], device, channels_last)
        correct += int((model(images).argmax(1) == labels).sum())
        seen += len(labels)
    if seen == 0:
        raise ValueError("fxeff.training.accuracy: the loader yields no example")
    return correct / seen


# Epochs and peak learning rate of each reference model on each dataset, chosen so each trains in
# under 20 minutes on 2 cores (docs/accuracy.md has the measured times and accuracies).
RECIPES: Dict[Tuple[str, str], Dict[str, float]] = {
    ("vgg", "fashion-mnist"): {"epochs": 6, "lr": 0.1},
    ("resnet20", "fashion-mnist"): {"epochs": 8, "lr": 0.1},
    ("mobilenetv2", "fashion-mnist"): {"epochs": 3, "lr": 0.1},
    ("vgg", "cluttered-fashion-mnist"): {"epochs": 6, "lr": 0.1},
    ("resnet20", "cluttered-fashion-mnist"): {"epochs": 6, "lr": 0.1},
    ("mobilenetv2", "cluttered-fashion-mnist"): {"epochs": 3, "lr": 0.1},
}


def loader(dataset: torch.utils.data.Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> torch.utils.data.DataLoader:
    """A single-process DataLoader (seeded shuffling), the way fxeff's tools read data."""
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                                       num_workers=0)


def train_reference(arch: str, dataset: str, epochs: Optional[int] = None, out: Optional[str] = None,
                    limit: Optional[int] = None, batch_size: int = 128, seed: int = 0,
                    progress: bool = True) -> Dict[str, object]:
    """Trains reference model ``arch`` on ``dataset`` from seed ``seed`` with its recipe (RECIPES),
    saves the state_dict to ``out`` (default: the committed checkpoint path) with a JSON of its
    metrics beside it, and returns those metrics (test accuracy, seconds, epochs, ...)."""
    from . import reference

    recipe = RECIPES.get((arch, dataset))
    if recipe is None:
        raise ValueError(f"fxeff.training.train_reference: (arch, dataset) must be one of {tuple(RECIPES)}, "
                         f"got {(arch, dataset)!r}")
    torch.manual_seed(seed)
    model = reference.build(arch, dataset)
    epochs = int(epochs or recipe["epochs"])
    train_set = reference.dataset(dataset, "train", limit=limit, augment=True)
    test_set = reference.dataset(dataset, "test", limit=None if limit is None else max(limit // 6, 1))
    out = out or reference.checkpoint_path(arch, dataset)
    start = time.perf_counter()
    history = fit(model, loader(train_set, batch_size, True, seed), cross_entropy_loss, epochs, lr=recipe["lr"],
                  checkpoint=out, progress=progress, description=f"train {arch} on {dataset}")
    seconds = time.perf_counter() - start
    model.to(memory_format=torch.contiguous_format)
    acc = accuracy(model, loader(test_set, 500, False), progress=progress)
    metrics = {"arch": arch, "dataset": dataset, "test_accuracy": acc, "epochs": epochs, "train_seconds": seconds,
               "train_images": len(train_set), "test_images": len(test_set), "seed": seed, "batch_size": batch_size,
               "lr": recipe["lr"], "threads": torch.get_num_threads(), "torch": torch.__version__,
               "loss_per_epoch": history["loss"], "checkpoint_bytes": os.path.getsize(out)}
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(metrics, f, indent=1)
    return metrics


__all__ = ["fit", "accuracy", "cross_entropy_loss", "bare_module", "save_state_dict", "loader", "RECIPES",
           "train_reference"]
