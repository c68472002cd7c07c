"""Deployment of glance and focus: the parts exported as separate graphs with a dynamic batch size
(``fxeff.export``: torch.export), and the host loop that runs them with real early exit.

The parts (each an ExportedProgram; inputs and outputs are tensors, the batch dimension free):
- ``glance``: image [N, C, H, W] -> (logits, carry, features[, places]): the downscaled glance through the
  global encoder and the first classifier step; ``carry`` is the head's state (the GRU's hidden state, or the
  concat head's features so far); ``places`` [N, T - 1, 2] where the policy places every patch at the glance
  (learned, ppo);
- ``policy`` (saliency only): (features, logits, covered) -> (corners, covered);
- ``local``: (image, corners [N, 2]) -> pooled features of the patch (the crop and the local encoder);
- ``classify_<t>``: (carry, pooled) -> (logits, carry): step t's classifier (one per step: the concat head's
  layers differ; the GRU's are the same weights).

``run_parts`` is the host loop: glance, then per step the images whose confidence reaches the step's threshold
leave and the batch shrinks to the others, as ``fxeff.glance.early_exit`` (tested equal).
"""
import dataclasses
import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .crop import crop, crop_bilinear
from .inference import Exits, Thresholds, exit_loop, fingerprint
from .model import GlanceFocus, State

_WHERE = "fxeff.glance.export_parts"


class _Glance(nn.Module):
    def __init__(self, gf: GlanceFocus):
        super().__init__()
        self.gf = gf

    def forward(self, x: torch.Tensor):
        state = self.gf.glance(x)
        carry = state["hidden"] if self.gf.head_kind == "gru" else state["memory"]
        out = (state["logits"], carry, state["features"])
        return out + (state["places"],) if "places" in state else out


class _Saliency(nn.Module):
    def __init__(self, gf: GlanceFocus):
        super().__init__()
        self.gf = gf

    def forward(self, features: torch.Tensor, logits: torch.Tensor, covered: torch.Tensor):
        return self.gf.policy(features, logits, covered, self.gf.image_size, self.gf.patch_size)


class _Local(nn.Module):
    def __init__(self, gf: GlanceFocus):
        super().__init__()
        self.gf = gf

    def forward(self, x: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
        cut = crop_bilinear if self.gf.policy_kind == "learned" else crop
        return self.gf._pool(self.gf.local_encoder(cut(x, corners, self.gf.patch_size)))


class _Classify(nn.Module):
    def __init__(self, gf: GlanceFocus, t: int):
        super().__init__()
        self.gf, self.t = gf, t

    def forward(self, carry: torch.Tensor, pooled: torch.Tensor):
        key = "hidden" if self.gf.head_kind == "gru" else "memory"
        state = self.gf._classify({key: carry}, pooled, self.t)
        return state["logits"], state[key]


@dataclasses.dataclass
class Parts:
    """The exported parts (name -> ExportedProgram) and what the host loop needs: the steps, the policy, the patch
    size, and the fingerprint of the model they came from (thresholds calibrated on another are refused)."""
    programs: Dict[str, torch.export.ExportedProgram]
    steps: int
    policy: str
    head: str
    fingerprint: str


def export_parts(model: GlanceFocus, example: torch.Tensor, directory: Optional[str] = None,
                 max_batch: int = 1024) -> Parts:
    """Each part of ``model`` (eval mode; see the module docstring) exported with torch.export on ``example``
    (a batch of at least 2 images), the batch dimension dynamic up to ``max_batch``; saved as
    ``directory``/<part>.pt2 when given. The random policy draws its places with a generator at the glance and
    does not export (NotImplementedError)."""
    from ..export import export

    if model.policy_kind == "random":
        raise NotImplementedError(f"{_WHERE}: the random policy draws its places with a torch.Generator, which "
                                  f"torch.export does not capture; draw them on the host instead")
    if example.dim() != 4 or example.shape[0] < 2:
        raise ValueError(f"{_WHERE}: example must be a batch of at least 2 images [N, C, H, W] (a batch of 1 would "
                         f"be specialised), got {tuple(example.shape)}")
    model.eval()
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    x = example
    programs: Dict[str, torch.export.ExportedProgram] = {}
    with torch.no_grad():
        state = model.glance(x)
        glance_out = _Glance(model)(x)
        programs["glance"] = export(_Glance(model), (x,), dynamic_shapes=({0: batch},), require_fxeff_ops=False)
        features, logits, carry = state["features"], state["logits"], glance_out[1]
        if model.policy_kind == "saliency":
            covered = torch.zeros(x.shape[0], *features.shape[-2:], dtype=torch.bool)
            programs["policy"] = export(_Saliency(model), (features, logits, covered),
                                        dynamic_shapes=({0: batch}, {0: batch}, {0: batch}), require_fxeff_ops=False)
        corners = model.corners(dict(state), 1) if model.steps > 1 else None
        if corners is not None:
            programs["local"] = export(_Local(model), (x, corners), dynamic_shapes=({0: batch}, {0: batch}),
                                       require_fxeff_ops=False)
            pooled = _Local(model)(x, corners)
        for t in range(1, model.steps):
            programs[f"classify_{t}"] = export(_Classify(model, t), (carry, pooled),
                                               dynamic_shapes=({0: batch}, {0: batch}), require_fxeff_ops=False)
            logits, carry = _Classify(model, t)(carry, pooled)
    if directory is not None:
        os.makedirs(directory, exist_ok=True)
        for name, program in programs.items():
            torch.export.save(program, os.path.join(directory, f"{name}.pt2"))
    return Parts(programs, model.steps, model.policy_kind, model.head_kind, fingerprint(model))


def run_parts(parts: Parts, x: torch.Tensor, thresholds: Thresholds, macs: Sequence[int]) -> Exits:
    """The host loop over the exported parts: ``fxeff.glance.early_exit`` (real early exit, the batch compacted
    after each step) at ``thresholds`` (refused when calibrated on another model), ``macs`` per step."""
    if thresholds.fingerprint != parts.fingerprint:
        raise ValueError("fxeff.glance.run_parts: the thresholds were calibrated for another model than the one "
                         "these parts were exported from")
    glance = parts.programs["glance"].module()
    policy = parts.programs["policy"].module() if "policy" in parts.programs else None
    local = parts.programs["local"].module() if "local" in parts.programs else None
    classify: List = [None] + [parts.programs[f"classify_{t}"].module() for t in range(1, parts.steps)]

    def first(images: torch.Tensor) -> State:
        out = glance(images)
        state = {"logits": out[0], "carry": out[1], "features": out[2]}
        if len(out) > 3:
            state["places"] = out[3]
        if policy is not None:
            state["covered"] = torch.zeros(len(images), *out[2].shape[-2:], dtype=torch.bool)
        return state

    def step(images: torch.Tensor, state: State, t: int) -> State:
        if policy is not None:
            corners, state["covered"] = policy(state["features"], state["logits"], state["covered"])
        else:
            corners = state["places"][:, t - 1]
        state["logits"], state["carry"] = classify[t](state["carry"], local(images, corners))
        return state

    return exit_loop(x, parts.steps, thresholds, macs, first, step)


__all__ = ["Parts", "export_parts", "run_parts"]
