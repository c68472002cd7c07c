"""Training of glance and focus with fxeff's one training loop (``fxeff.training.fit``): every step's logits learn
the labels and, where a teacher is given, the full-resolution model's output (``steps_loss``). One stage for every
policy: the learned policy trains through the interpolating crop (AdaFocusV2), the saliency and random policies
need no training of their own."""
from typing import Dict, Optional

import torch
import torch.nn as nn

from .model import GlanceFocus, steps_loss


def train(model: GlanceFocus, loader: torch.utils.data.DataLoader, epochs: int, *,
          teacher: Optional[nn.Module] = None, lr: float = 0.02, alpha: float = 0.5, temperature: float = 4.0,
          checkpoint: Optional[str] = None, progress: bool = True, optimizer: str = "sgd") -> Dict[str, list]:
    """Trains ``model`` (a GlanceFocus, or one wrapped in DistributedDataParallel with a DistributedSampler loader)
    in place for ``epochs`` on ``loader``'s (images, labels) batches: fxeff.training.fit (SGD with a one-cycle
    learning rate peaking at ``lr``, or ``optimizer="adam"``; ``checkpoint``: the weights after each epoch) with
    ``steps_loss``, distilled from ``teacher`` (the full-resolution classifier, frozen, in eval mode) at
    ``temperature`` with weight ``alpha`` where given. Returns fit's history."""
    from ..training import bare_module, fit

    if not isinstance(bare_module(model), GlanceFocus):
        raise TypeError(f"fxeff.glance.train: model must be a GlanceFocus, got {type(bare_module(model)).__name__}")
    frozen = []
    if teacher is not None:
        teacher.eval()
        frozen = [p for p in teacher.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)

    def loss(gf: nn.Module, batch) -> torch.Tensor:
        images, labels = batch[0], batch[1]
        target = None
        if teacher is not None:
            with torch.no_grad():
                target = teacher(images)
        return steps_loss(gf(images), labels, target, temperature, alpha)

    try:
        return fit(model, loader, loss, epochs, lr=lr, checkpoint=checkpoint, channels_last=False, progress=progress,
                   description="fxeff.glance.train", optimizer=optimizer)
    finally:
        for p in frozen:
            p.requires_grad_(True)


__all__ = ["train"]
