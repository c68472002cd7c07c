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
- "saliency" (training-free): the patch is centred on the centre of mass of a saliency map of the glance's
  feature map around its peak, cells that earlier patches covered left out. The map (``saliency=``) is
  "activation", the feature map summed over channels (the map whose threshold is focused convolution's Area of
  Interest, fxeff.focus.reduce_channels), or "cam", the class activation map of the class predicted so far (the
  classifier's own weights);
- "learned" (AdaFocusV2 / Uni-AdaFocus: one training stage, no reinforcement learning): a soft argmax over the
  glance's feature map (detached; the class activation map plus a small 1x1 conv network) places every later
  step's patch, which is cropped by interpolation (``crop_bilinear``) so that the classification loss trains it;
- "random": patches at uniformly random places (the floor, and GFNet's warm-up);
- "ppo": GFNet's own policy, the baseline: a Gaussian actor-critic on the glance's feature map, trained in three
  stages by ``fxeff.glance.train_ppo`` (random patches, then PPO on the gain in true-class probability, then
  fine-tuning).
"""
import copy
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .crop import crop, crop_bilinear
from .split import split_classifier

State = Dict[str, torch.Tensor]
POLICIES = ("saliency", "learned", "random", "ppo")
HEADS = ("gru", "concat")
SALIENCY_MAPS = ("activation", "cam")
# the default level of each saliency map (SaliencyPolicy): the one whose first patch covered >= 90% of the item on
# the most held-out Cluttered Fashion-MNIST training images (ResNet-20, glance 32, patch 32, two trainings of glance
# and focus: activation 0.3: 95.5/95.8%, 0.35: 95.2/96.0%, 0.4: 94.9/95.7%, 0.5: 93.7/94.9%; the class activation
# map, untrained: 0.2: 86.7%, 0.3: 87.0%, 0.4: 85.7%)
SALIENCY_LEVELS = {"activation": 0.35, "cam": 0.3}
_WHERE = "fxeff.glance.GlanceFocus"


def class_activation_map(weight: torch.Tensor, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The class activation map [N, h, w] of the feature map [N, C, h, w] for the class each image's ``logits``
    predict, with the classifier's ``weight`` [classes, C]."""
    return torch.einsum("nc,nchw->nhw", weight[logits.argmax(dim=1)].to(features.dtype), features)


def centred_corners(weights: torch.Tensor, image_size: List[int], patch_size: int) -> torch.Tensor:
    """Corners [N, P, 2] in [0, 1] of patches centred on the weighted mean of the feature cells' centres (in image
    pixels), ``weights`` [N, P, h, w] (each [h, w] summing to 1)."""
    _, _, h, w = weights.shape
    height, width = image_size
    ys = (torch.arange(h, device=weights.device, dtype=weights.dtype) + 0.5) * (height / h)
    xs = (torch.arange(w, device=weights.device, dtype=weights.dtype) + 0.5) * (width / w)
    centre_y = (weights.sum(dim=3) * ys).sum(dim=2)
    centre_x = (weights.sum(dim=2) * xs).sum(dim=2)
    corner_y = ((centre_y - patch_size / 2) / max(height - patch_size, 1)).clamp(0, 1)
    corner_x = ((centre_x - patch_size / 2) / max(width - patch_size, 1)).clamp(0, 1)
    return torch.stack([corner_y, corner_x], dim=-1)


def check_saliency(kind: str) -> str:
    """``kind`` if it names a saliency map (SALIENCY_MAPS), else the ValueError naming the argument."""
    if kind not in SALIENCY_MAPS:
        raise ValueError(f"{_WHERE}: saliency must be one of {SALIENCY_MAPS}, got {kind!r}")
    return kind


def saliency_map(kind: str, weight: torch.Tensor, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The saliency map [N, h, w] of the feature map [N, C, h, w]: "activation", summed over channels
    (fxeff.focus.reduce_channels: the map focused convolution thresholds into its Area of Interest; class-agnostic),
    or "cam", the class activation map for the class ``logits`` predict (``class_activation_map`` with the
    classifier's ``weight``)."""
    from ..focus import reduce_channels

    if check_saliency(kind) == "cam":
        return class_activation_map(weight, features, logits)
    return reduce_channels(features, "sum").to(features.dtype)


class SaliencyPolicy(nn.Module):
    """The patch of step t centred on the centre of mass of the glance's saliency map (``saliency_map`` of kind
    ``source`` on the feature map [N, C, h, w]; ``weight`` [classes, C]: the classifier's, for "cam") over the
    cells no earlier patch covered whose value is above ``level`` of the way from the smallest to the largest
    (there: the value above that level; default ``SALIENCY_LEVELS[source]``). The peak cell alone places a patch
    no finer than a cell (16 pixels on a 64-pixel image seen at 32); the centre of mass of the region around it
    covered >= 90% of the item on 87% of Cluttered Fashion-MNIST test images against 56% with the class activation
    map, and on 96% with the activation map (whose every cell is positive where the item is; the class weights
    are negative on some of an item's features). Returns corners [N, 2] in [0, 1] and the updated coverage
    [N, h, w]."""

    differentiable = False

    def __init__(self, weight: torch.Tensor, source: str = "activation", level: Optional[float] = None):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.source = check_saliency(source)
        self.level = SALIENCY_LEVELS[source] if level is None else level

    def forward(self, features: torch.Tensor, logits: torch.Tensor, covered: torch.Tensor, image_size: List[int],
                patch_size: int):
        n, _, h, w = features.shape
        cam = saliency_map(self.source, self.weight, features, logits).reshape(n, h * w)
        open_cells = ~covered.reshape(n, h * w)
        low = cam.masked_fill(~open_cells, float("inf")).amin(dim=1, keepdim=True)
        high = cam.masked_fill(~open_cells, float("-inf")).amax(dim=1, keepdim=True)
        cut = low + self.level * (high - low)
        mass = (cam - cut).clamp(min=0).masked_fill(~open_cells, 0.0)
        peak = cam.masked_fill(~open_cells, float("-inf")).argmax(dim=1)
        empty = mass.sum(dim=1) <= 0  # a flat map: its peak cell
        mass[empty] = torch.nn.functional.one_hot(peak[empty], h * w).to(mass.dtype)
        weights = (mass / mass.sum(dim=1, keepdim=True)).reshape(n, 1, h, w)
        corners = centred_corners(weights, image_size, patch_size)[:, 0]
        height, width = image_size
        # cells whose centres the (pixel-rounded) patch covers
        top = torch.round(corners[:, 0] * (height - patch_size))
        left = torch.round(corners[:, 1] * (width - patch_size))
        ys = (torch.arange(h, device=features.device, dtype=features.dtype) + 0.5) * (height / h)
        xs = (torch.arange(w, device=features.device, dtype=features.dtype) + 0.5) * (width / w)
        inside_y = (ys[None] >= top[:, None]) & (ys[None] < top[:, None] + patch_size)
        inside_x = (xs[None] >= left[:, None]) & (xs[None] < left[:, None] + patch_size)
        covered = covered | (inside_y[:, :, None] & inside_x[:, None, :])
        return corners, covered


class LearnedPolicy(nn.Module):
    """Corners of the patches of steps 1..T-1 [N, T-1, 2] from the glance's feature map [N, C, h, w] (detached, as
    AdaFocusV2: the policy does not pull the glance's features; Uni-AdaFocus: the place from the feature map, not
    from pooled features, which have lost where things are): per later step, a score for every cell, the saliency
    map of kind ``source`` (``saliency_map``; standardised, times a learned scale) plus a two-layer 1x1 conv
    network of the features, and the patch centred on the softmax-weighted mean of the cells' centres (a soft
    argmax: differentiable, so the classification loss trains it through the interpolating crop). The network's
    last layer starts at zero, so training starts from the map's soft argmax at ``scale``."""

    differentiable = True

    def __init__(self, weight: torch.Tensor, channels: int, places: int, hidden: int = 64,
                 source: str = "activation", scale: float = 2.0):
        super().__init__()
        self.places, self.source = places, check_saliency(source)
        self.register_buffer("weight", weight.detach().clone())
        self.net = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, places, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.map_scale = nn.Parameter(torch.full((places,), float(scale)))

    def forward(self, features: torch.Tensor, logits: torch.Tensor, image_size: List[int], patch_size: int
                ) -> torch.Tensor:
        features = features.detach()
        n, _, h, w = features.shape
        prior = saliency_map(self.source, self.weight, features, logits.detach()).reshape(n, 1, h * w)
        prior = (prior - prior.mean(dim=2, keepdim=True)) / (prior.std(dim=2, keepdim=True) + 1e-6)
        scores = self.map_scale[None, :, None] * prior + self.net(features).reshape(n, self.places, h * w)
        weights = torch.softmax(scores, dim=2).reshape(n, self.places, h, w)
        return centred_corners(weights, image_size, patch_size)


class PPOPolicy(nn.Module):
    """GFNet's policy, the baseline (fxeff.glance.train_ppo trains it): an actor-critic on the glance's feature
    map (detached): a 1x1 conv to 32 channels, flattened (where things are stays in it), a hidden layer, then for
    the later steps an actor (the means of Gaussians over the patches' corners in [0, 1]^2, standard deviation
    ``action_std``: GFNet's 0.1) and a critic (each step's expected return). ``mode``: "mean" (inference),
    "sample" (PPO's rollouts), "random" (stage 1: uniform places)."""

    differentiable = False

    def __init__(self, channels: int, cells: int, places: int, hidden: int = 256, action_std: float = 0.1):
        super().__init__()
        self.places, self.action_std, self.mode = places, action_std, "mean"
        self.encoder = nn.Sequential(nn.Conv2d(channels, 32, 1, bias=False), nn.ReLU(inplace=True), nn.Flatten(),
                                     nn.Linear(32 * cells, hidden), nn.ReLU(inplace=True))
        self.actor = nn.Linear(hidden, 2 * places)
        self.critic = nn.Linear(hidden, places)

    def forward(self, features: torch.Tensor):
        """(the actor's means [N, places, 2], the critic's values [N, places])."""
        hidden = self.encoder(features.detach())
        return torch.sigmoid(self.actor(hidden)).reshape(-1, self.places, 2), self.critic(hidden)

    def places_for(self, features: torch.Tensor, state: State) -> torch.Tensor:
        """The patches' corners [N, places, 2] in this policy's ``mode``; a rollout keeps the critic's values."""
        mean, value = self(features)
        if self.mode == "random":
            return torch.rand_like(mean)
        if self.mode == "sample":
            state["ppo_value"] = value
            return (mean + self.action_std * torch.randn_like(mean)).clamp(0, 1)
        if self.mode != "mean":
            raise ValueError(f"{_WHERE}: PPOPolicy.mode must be 'mean', 'sample' or 'random', got {self.mode!r}")
        return mean


class GlanceFocus(nn.Module):
    """Glance and focus over ``model`` (a CNN classifier: trunk, global pooling, one linear layer), for images of
    ``example``'s size: the glance at ``glance_size`` (default: ``patch_size``, so a glance costs what a patch
    does), then ``steps - 1`` patches of ``patch_size``; ``head``: "gru" or "concat"; ``policy``: "saliency",
    "learned", "random" or "ppo"; ``saliency``: the map the saliency policy centres on and the learned policy
    starts from, "activation" or "cam" (see the module docstring). ``forward(x)``: the logits of every step [steps, N,
    classes] (anytime prediction; ``fxeff.glance.inference`` exits early)."""

    def __init__(self, model: nn.Module, example: torch.Tensor, patch_size: int, steps: int = 3,
                 glance_size: Optional[int] = None, head: str = "gru", policy: str = "saliency", seed: int = 0,
                 saliency: str = "activation"):
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
        check_saliency(saliency)
        split = split_classifier(model, example[:2])
        self.image_size = [height, width]
        self.patch_size, self.glance_size, self.steps = patch_size, glance_size, steps
        self.head_kind, self.policy_kind, self.saliency, self.pooling = head, policy, saliency, split.pooling
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
            self.policy = SaliencyPolicy(split.linear.weight, saliency)
        elif policy == "learned":
            self.policy = LearnedPolicy(split.linear.weight, channels, max(steps - 1, 1), source=saliency)
        elif policy == "ppo":
            with torch.no_grad():  # the glance's feature map: its cells
                cells = split.trunk(torch.zeros(1, example.shape[1], glance_size, glance_size)).shape[-2:]
            self.policy = PPOPolicy(channels, int(cells[0]) * int(cells[1]), max(steps - 1, 1))
        else:
            self.policy = None
        self.seed = seed

    def config(self) -> Dict[str, object]:
        """The constructor arguments besides the classifier and the example: what rebuilds this model around the
        same classifier (checkpoints) and, with the weights, tells it from another (thresholds' fingerprint)."""
        return {"patch_size": self.patch_size, "steps": self.steps, "glance_size": self.glance_size,
                "head": self.head_kind, "policy": self.policy_kind, "seed": self.seed, "saliency": self.saliency}

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
        state: State = self._classify({"features": features, "pooled": pooled}, pooled, 0)
        if self.policy_kind == "saliency":
            state["covered"] = torch.zeros(features.shape[0], *features.shape[-2:], dtype=torch.bool,
                                           device=features.device)
        elif self.policy_kind == "learned":
            state["places"] = self.policy(features, state["logits"], self.image_size, self.patch_size)
        elif self.policy_kind == "ppo":
            state["places"] = self.policy.places_for(features, state)
        else:  # random: every later step's place drawn now, per image (they stay with it when the batch shrinks)
            generator = torch.Generator().manual_seed(self.seed)
            state["places"] = torch.rand(x.shape[0], max(self.steps - 1, 1), 2, generator=generator).to(pooled)
        return state

    def corners(self, state: State, t: int) -> torch.Tensor:
        """The corners [N, 2] of step t's patch (1 <= t < steps); the saliency policy also marks what it covers."""
        if self.policy_kind == "saliency":
            corners, state["covered"] = self.policy(state["features"], state["logits"], state["covered"],
                                                    self.image_size, self.patch_size)
            return corners
        return state["places"][:, t - 1]  # learned, ppo and random: placed at the glance

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

    def fold_batchnorm(self) -> "GlanceFocus":
        """The inference form, in place: every BatchNorm of both encoders folded into the conv before it
        (torch.fx.experimental.optimization.fuse; eval mode only, as folding freezes the running statistics).
        Calibrate thresholds after folding: the weights, hence the fingerprint, change."""
        from torch.fx.experimental.optimization import fuse

        if self.training:
            raise RuntimeError(f"{_WHERE}.fold_batchnorm: call .eval() first (folding freezes the BatchNorms' "
                               f"running statistics)")
        self.global_encoder = fuse(self.global_encoder)
        self.local_encoder = fuse(self.local_encoder)
        return self

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


__all__ = ["GlanceFocus", "SaliencyPolicy", "LearnedPolicy", "PPOPolicy", "class_activation_map", "saliency_map",
           "check_saliency", "centred_corners", "POLICIES", "HEADS", "SALIENCY_MAPS", "steps_loss"]
