"""GlanceFocus: glance and focus (GFNet) built from a user's CNN classifier.

Step 0 (the glance) runs the global encoder on the image downscaled to ``glance_size``; each later step t runs
the local encoder on one ``patch_size`` patch of the full-resolution image, placed by the policy from what was
seen, and the head combines the steps: a GRU over the steps' pooled features (GFNet's recurrent classifier) or
the concatenation of every step's features so far into a linear layer per step. Both encoders start as copies of
the classifier's trunk (fxeff.glance.split_classifier), the classifiers as copies of its linear layer.

Every step is a function of a state, a dict of per-image tensors (its first dimension the batch), so that early
exit can drop the images that have left (``fxeff.glance.inference``): ``glance(x)`` -> state, ``focus(x, state,
t)`` -> state, each state holding the step's ``logits``.

Policies (``policy=``):
- "saliency" (training-free): the patch is centred on the peak of the class activation map of the glance's
  feature map for the class predicted so far (the classifier's own weights), cells that earlier patches covered
  suppressed;
- "learned" (AdaFocusV2 / Uni-AdaFocus: one training stage, no reinforcement learning): a small network maps the
  glance's pooled features (detached) to the corners of every later step's patch, which is cropped by
  interpolation (``crop_bilinear``) so that the classification loss trains it;
- "random": patches at uniformly random places (the floor, and GFNet's warm-up).
"""
import copy
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .crop import crop, crop_bilinear
from .split import split_classifier

State = Dict[str, torch.Tensor]
POLICIES = ("saliency", "learned", "random")
HEADS = ("gru", "concat")
_WHERE = "fxeff.glance.GlanceFocus"


class SaliencyPolicy(nn.Module):
    """The patch of step t centred on the strongest cell of the glance's class activation map (``weight`` [classes,
    C] of the classifier, on the feature map [N, C, h, w]) for the class the latest logits predict, among the cells
    no earlier patch covered. Returns corners [N, 2] in [0, 1] and the updated coverage [N, h, w]."""

    differentiable = False

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())

    def forward(self, features: torch.Tensor, logits: torch.Tensor, covered: torch.Tensor, image_size: List[int],
                patch_size: int):
        n, _, h, w = features.shape
        cls = logits.argmax(dim=1)
        cam = torch.einsum("nc,nchw->nhw", self.weight[cls].to(features.dtype), features)
        cam = cam.masked_fill(covered, float("-inf"))
        flat = cam.reshape(n, h * w).argmax(dim=1)
        row, col = torch.div(flat, w, rounding_mode="floor"), flat % w
        height, width = image_size
        # the cell's centre in image pixels, the patch centred there, as a corner fraction
        centre_y = (row.to(features.dtype) + 0.5) * (height / h)
        centre_x = (col.to(features.dtype) + 0.5) * (width / w)
        corner_y = ((centre_y - patch_size / 2) / max(height - patch_size, 1)).clamp(0, 1)
        corner_x = ((centre_x - patch_size / 2) / max(width - patch_size, 1)).clamp(0, 1)
        corners = torch.stack([corner_y, corner_x], dim=1)
        # cells whose centres the (pixel-rounded) patch covers
        top = torch.round(corner_y * (height - patch_size))
        left = torch.round(corner_x * (width - patch_size))
        ys = (torch.arange(h, device=features.device, dtype=features.dtype) + 0.5) * (height / h)
        xs = (torch.arange(w, device=features.device, dtype=features.dtype) + 0.5) * (width / w)
        inside_y = (ys[None] >= top[:, None]) & (ys[None] < top[:, None] + patch_size)
        inside_x = (xs[None] >= left[:, None]) & (xs[None] < left[:, None] + patch_size)
        covered = covered | (inside_y[:, :, None] & inside_x[:, None, :])
        return corners, covered


class LearnedPolicy(nn.Module):
    """Corners of the patches of steps 1..T-1 [N, T-1, 2] from the glance's pooled features [N, C] (detached, as
    AdaFocusV2: the policy does not pull the glance's features): a two-layer network with a sigmoid."""

    differentiable = True

    def __init__(self, channels: int, places: int, hidden: int = 128):
        super().__init__()
        self.places = places
        self.net = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 2 * places))
        nn.init.zeros_(self.net[-1].weight)  # every patch starts in the middle; the gradients move them
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(pooled.detach())).reshape(-1, self.places, 2)


class GlanceFocus(nn.Module):
    """Glance and focus over ``model`` (a CNN classifier: trunk, global pooling, one linear layer), for images of
    ``example``'s size: the glance at ``glance_size`` (default: ``patch_size``, so a glance costs what a patch
    does), then ``steps - 1`` patches of ``patch_size``; ``head``: "gru" or "concat"; ``policy``: "saliency",
    "learned" or "random" (see the module docstring). ``forward(x)``: the logits of every step [steps, N,
    classes] (anytime prediction; ``fxeff.glance.inference`` exits early)."""

    def __init__(self, model: nn.Module, example: torch.Tensor, patch_size: int, steps: int = 3,
                 glance_size: Optional[int] = None, head: str = "gru", policy: str = "saliency", seed: int = 0):
        super().__init__()
        if not isinstance(example, torch.Tensor) or example.dim() != 4:
            raise ValueError(f"{_WHERE}: example must be a batch of images [N, C, H, W], got "
                             f"{tuple(example.shape) if isinstance(example, torch.Tensor) else type(example).__name__}")
        height, width = (int(s) for s in example.shape[-2:])
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"{_WHERE}: steps (T) must be an int >= 1 (the glance, then T - 1 patches), got "
                             f"{steps!r}")
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or not 1 <= patch_size <= min(height,
                                                                                                         width):
            raise ValueError(f"{_WHERE}: patch_size must be an int in [1, {min(height, width)}] (the image is "
                             f"{height}x{width}), got {patch_size!r}")
        glance_size = patch_size if glance_size is None else glance_size
        if isinstance(glance_size, bool) or not isinstance(glance_size, int) or not 1 <= glance_size <= min(
                height, width):
            raise ValueError(f"{_WHERE}: glance_size must be an int in [1, {min(height, width)}], got "
                             f"{glance_size!r}")
        if head not in HEADS:
            raise ValueError(f"{_WHERE}: head must be one of {HEADS}, got {head!r}")
        if policy not in POLICIES:
            raise ValueError(f"{_WHERE}: policy must be one of {POLICIES}, got {policy!r}")
        split = split_classifier(model, example[:2])
        self.image_size = [height, width]
        self.patch_size, self.glance_size, self.steps = patch_size, glance_size, steps
        self.head_kind, self.policy_kind, self.pooling = head, policy, split.pooling
        self.global_encoder = split.trunk
        self.local_encoder = copy.deepcopy(split.trunk)
        channels, classes = split.channels, split.linear.out_features
        self.channels, self.classes = channels, classes
        if head == "gru":
            self.rnn = nn.GRUCell(channels, channels)
            self.classifiers = nn.ModuleList([copy.deepcopy(split.linear)])  # one for every step
        else:
            self.classifiers = nn.ModuleList()
            for t in range(steps):
                linear = nn.Linear(channels * (t + 1), classes)
                with torch.no_grad():  # step t starts as the mean of the original classifier over the steps
                    linear.weight.copy_(split.linear.weight.repeat(1, t + 1) / (t + 1))
                    linear.bias.copy_(split.linear.bias)
                self.classifiers.append(linear)
        if policy == "saliency":
            self.policy = SaliencyPolicy(split.linear.weight)
        elif policy == "learned":
            self.policy = LearnedPolicy(channels, max(steps - 1, 1))
        else:
            self.policy = None
        self.seed = seed

    # ------------------------------------------------------------------ the steps
    def _pool(self, features: torch.Tensor) -> torch.Tensor:
        return features.amax(dim=(2, 3)) if self.pooling == "max" else features.mean(dim=(2, 3))

    def _classify(self, state: State, pooled: torch.Tensor, t: int) -> State:
        if self.head_kind == "gru":
            hidden = self.rnn(pooled, state["hidden"]) if "hidden" in state else self.rnn(pooled)
            state["hidden"] = hidden
            state["logits"] = self.classifiers[0](hidden)
        else:
            memory = pooled if t == 0 else torch.cat([state["memory"], pooled], dim=1)
            state["memory"] = memory
            state["logits"] = self.classifiers[t](memory)
        return state

    def glance(self, x: torch.Tensor) -> State:
        """Step 0 on images ``x`` [N, C, H, W] at this model's image size."""
        self._check_input(x)
        small = x if self.glance_size == self.image_size[0] == self.image_size[1] else F.interpolate(
            x, size=(self.glance_size, self.glance_size), mode="bilinear", align_corners=False, antialias=True)
        features = self.global_encoder(small)
        pooled = self._pool(features)
        state: State = {"features": features, "pooled": pooled}
        if self.policy_kind == "saliency":
            state["covered"] = torch.zeros(features.shape[0], *features.shape[-2:], dtype=torch.bool,
                                           device=features.device)
        elif self.policy_kind == "learned":
            state["places"] = self.policy(pooled)
        else:  # random: every later step's place drawn now, per image (they stay with it when the batch shrinks)
            generator = torch.Generator().manual_seed(self.seed)
            state["places"] = torch.rand(x.shape[0], max(self.steps - 1, 1), 2, generator=generator).to(pooled)
        return self._classify(state, pooled, 0)

    def corners(self, state: State, t: int) -> torch.Tensor:
        """The corners [N, 2] of step t's patch (1 <= t < steps); the saliency policy also marks what it covers."""
        if self.policy_kind == "saliency":
            corners, state["covered"] = self.policy(state["features"], state["logits"], state["covered"],
                                                    self.image_size, self.patch_size)
            return corners
        return state["places"][:, t - 1]  # learned and random: drawn at the glance

    def focus(self, x: torch.Tensor, state: State, t: int) -> State:
        """Step t (1 <= t < steps) on images ``x`` whose state after step t - 1 is ``state`` (updated in place and
        returned)."""
        if not 1 <= t < self.steps:
            raise ValueError(f"{_WHERE}.focus: t must be in [1, {self.steps - 1}], got {t}")
        corners = self.corners(state, t)
        differentiable = self.policy_kind == "learned"
        patch = (crop_bilinear if differentiable else crop)(x, corners, self.patch_size)
        state["corners"] = corners
        pooled = self._pool(self.local_encoder(patch))
        return self._classify(state, pooled, t)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or list(x.shape[-2:]) != self.image_size:
            raise ValueError(f"{_WHERE}: expected images [N, C, {self.image_size[0]}, {self.image_size[1]}], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.glance(x)
        out = [state["logits"]]
        for t in range(1, self.steps):
            state = self.focus(x, state, t)
            out.append(state["logits"])
        return torch.stack(out)


def steps_loss(logits: torch.Tensor, labels: torch.Tensor, teacher: Optional[torch.Tensor] = None,
               temperature: float = 4.0, alpha: float = 0.5) -> torch.Tensor:
    """The training loss of every step's logits [T, N, classes]: the mean over steps of cross-entropy with
    ``labels``, mixed with ``alpha`` of the distillation loss (fxeff.distill.kd_loss at ``temperature``) from the
    full-resolution model's ``teacher`` logits where given."""
    from ..distill import kd_loss

    losses = []
    for step in logits:
        loss = F.cross_entropy(step, labels)
        if teacher is not None:
            loss = (1 - alpha) * loss + alpha * kd_loss(step, teacher, temperature)
        losses.append(loss)
    return torch.stack(losses).mean()


__all__ = ["GlanceFocus", "SaliencyPolicy", "LearnedPolicy", "POLICIES", "HEADS", "steps_loss"]
