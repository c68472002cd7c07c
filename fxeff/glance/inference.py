"""Inference of glance and focus: real early exit (the images that have left stop computing), per-step MACs, and
the confidence thresholds of budgeted batch classification (MSDNet's procedure, as GFNet's inference.py, with its
silent failure made explicit) found for a MACs budget by bisection.

The seed (GFNet-Pytorch) only simulates early exit: it computes every step for every image and picks the exit
afterwards. Here, after each step, the images whose confidence (the largest softmax probability) reaches the
step's threshold are written out in their place, and the batch is compacted to the others (FastBERT-style), so
each image costs the steps it ran.
"""
import dataclasses
import hashlib
import itertools
import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .model import GlanceFocus, State

_WHERE = "fxeff.glance"


_REGISTRATIONS = [0]  # parameters, buffers and submodules registered anywhere since the watch began
_WATCH: List[object] = []


def _count_registration(*args) -> None:
    _REGISTRATIONS[0] += 1


def _watch_registrations() -> None:
    """Counts every parameter, buffer and submodule assignment in the process (torch.nn's global registration
    hooks), so that a cached fingerprint knows when a tensor was replaced rather than written in place."""
    if not _WATCH:
        from torch.nn.modules import module

        _WATCH.extend([module.register_module_parameter_registration_hook(_count_registration),
                       module.register_module_buffer_registration_hook(_count_registration),
                       module.register_module_module_registration_hook(_count_registration)])


def fingerprint(model: GlanceFocus) -> str:
    """sha256 over the model's configuration and weights (fxeff.blocks' model_fingerprint): thresholds calibrated
    on one model are refused on another. Cached on the model while none of its tensors changes: no registration
    anywhere since (a replaced parameter, buffer or submodule), and the same sum of its tensors' version counters
    (which every in-place write bumps) and storage addresses (``.data =``). Early exit checks it on every call:
    hashing the weights cost a batch of one more than its steps, walking the state dict 0.3-0.6 ms."""
    from ..blocks.scalable import model_fingerprint

    _watch_registrations()
    cached = model.__dict__.get("_fxeff_fingerprint")
    if cached is not None and cached[0] == _REGISTRATIONS[0] and \
            cached[1] == sum(t._version + t.data_ptr() for t in cached[2]):
        return cached[3]
    config = (tuple(model.image_size), sorted(model.config().items()))  # every constructor argument
    value = hashlib.sha256((repr(config) + model_fingerprint(model)).encode()).hexdigest()
    tensors = list(model.state_dict(keep_vars=True).values())
    model.__dict__["_fxeff_fingerprint"] = (_REGISTRATIONS[0], sum(t._version + t.data_ptr() for t in tensors),
                                            tensors, value)
    return value


def step_macs(model: GlanceFocus, example: torch.Tensor) -> List[int]:
    """MACs per image of each step (torch.utils.flop_counter on one image): step 0 the glance (its encoder, head and
    the policy's glance work), step t the patch's policy, encoder and head; the crop and the resize count 0."""
    x = example[:1]
    out = []
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            state = model.glance(x)
        out.append(counter.get_total_flops() // 2)
        for t in range(1, model.steps):
            with FlopCounterMode(display=False) as counter:
                state = model.focus(x, state, t)
            out.append(counter.get_total_flops() // 2)
    return out


@dataclasses.dataclass
class Exits:
    """What early exit gave: per image its ``logits`` [N, classes] (of the step it left at), that ``step`` [N], and
    the ``macs`` it cost (the cumulative MACs of the steps it ran)."""
    logits: torch.Tensor
    step: torch.Tensor
    macs: torch.Tensor


def _confidence(logits: torch.Tensor) -> torch.Tensor:
    return F.softmax(logits.float(), dim=1).amax(dim=1)


def _compact(state: State, keep: torch.Tensor) -> State:
    return {k: v[keep] for k, v in state.items()}


@dataclasses.dataclass
class Thresholds:
    """Per-step confidence thresholds (an image leaves after step k when its confidence >= ``values[k]``; the last
    is -inf: everything left leaves), the model they were calibrated for (``fingerprint``), and what the
    calibration found: ``no_exit_steps`` (steps that no image was meant to leave at: their threshold is +inf, which
    GFNet's procedure leaves silent), ``expected_macs`` per image on the calibration images, ``p`` (the exit
    shares' ratio)."""
    values: List[float]
    fingerprint: str
    no_exit_steps: List[int]
    expected_macs: float
    p: float


def early_exit(model: GlanceFocus, x: torch.Tensor, thresholds: Thresholds, macs: Optional[Sequence[int]] = None
               ) -> Exits:
    """Glance and focus on ``x`` with real early exit at ``thresholds`` (refused when calibrated for another
    model); ``macs``: step_macs(model, x) where known (computed otherwise)."""
    if thresholds.fingerprint != fingerprint(model):
        raise ValueError(f"{_WHERE}.early_exit: the thresholds were calibrated for another model (or the same "
                         f"with other weights); calibrate them for this one")
    if len(thresholds.values) != model.steps:
        raise ValueError(f"{_WHERE}.early_exit: {len(thresholds.values)} thresholds for {model.steps} steps")
    macs = macs if macs is not None else step_macs(model, x)
    return exit_loop(x, model.steps, thresholds, macs, model.glance, model.focus)


def exit_loop(x: torch.Tensor, steps: int, thresholds: Thresholds, macs: Sequence[int],
              first: Callable[[torch.Tensor], State], step: Callable[[torch.Tensor, State, int], State]) -> Exits:
    """Real early exit of ``steps`` steps over the images ``x``: ``first(x)`` and ``step(x, state, t)`` return the
    state after each step (a dict of per-image tensors holding its ``logits``); after each step the images whose
    confidence reaches ``thresholds.values[t]`` are written out in their place and ``x`` and the state shrink to
    the others. The one loop of ``early_exit`` (eager) and ``run_parts`` (the exported parts)."""
    cumulative = list(itertools.accumulate(macs))
    n = x.shape[0]
    index = torch.arange(n)
    logits_out: Optional[torch.Tensor] = None
    step_out = torch.full((n,), -1, dtype=torch.long)
    with torch.no_grad():
        state = first(x)
        for t in range(steps):
            if t:
                state = step(x, state, t)
            logits = state["logits"]
            if logits_out is None:
                logits_out = logits.new_empty(n, logits.shape[1])
            leave = _confidence(logits) >= thresholds.values[t] if t < steps - 1 else \
                torch.ones(len(index), dtype=torch.bool)
            leave = leave.cpu()
            if bool(leave.all()):
                if len(index) == n:  # everyone leaves at once (a batch of one, often): no scatter
                    logits_out, step_out = logits, torch.full((n,), t, dtype=torch.long)
                else:
                    logits_out[index] = logits
                    step_out[index] = t
                break
            logits_out[index[leave]] = logits[leave.to(logits.device)]
            step_out[index[leave]] = t
            keep = ~leave
            index = index[keep]
            keep = keep.to(x.device)
            x, state = x[keep], _compact(state, keep)
    return Exits(logits_out, step_out, torch.tensor(cumulative, dtype=torch.float64)[step_out])


def anytime(model: GlanceFocus, loader: torch.utils.data.DataLoader) -> Tuple[torch.Tensor, torch.Tensor]:
    """(every step's logits [T, N, classes], the labels [N]) over ``loader``'s (images, labels) batches."""
    outs, labels = [], []
    model.eval()
    with torch.no_grad():
        for batch in loader:
            outs.append(model(batch[0]))
            labels.append(batch[1])
    if not outs:
        raise ValueError(f"{_WHERE}.anytime: the loader yields no batch")
    return torch.cat(outs, dim=1), torch.cat(labels)


def thresholds_for(confidence: torch.Tensor, p: float) -> Tuple[List[float], List[int], List[int]]:
    """MSDNet's / GFNet's procedure on ``confidence`` [T, N] (each image's confidence at each step): the share of
    images meant to leave at step k is q_k proportional to p^k; at each step but the last, the images still running
    are sorted by confidence and the threshold is the floor(N q_k)-th's. Returns (thresholds, the count leaving at
    each step, the steps with no exit: floor(N q_k) = 0 gives the threshold +inf)."""
    steps, n = confidence.shape
    weights = [p ** k for k in range(steps)]
    shares = [w / sum(weights) for w in weights]
    running = torch.ones(n, dtype=torch.bool)
    values, counts, none = [], [], []
    for k in range(steps):
        if k == steps - 1:
            values.append(-math.inf)
            counts.append(int(running.sum()))
            break
        count = min(int(math.floor(n * shares[k])), int(running.sum()))
        if count == 0:
            values.append(math.inf)
            counts.append(0)
            none.append(k)
            continue
        threshold = float(torch.sort(confidence[k][running], descending=True).values[count - 1])
        values.append(threshold)
        leave = running & (confidence[k] >= threshold)
        counts.append(int(leave.sum()))
        running &= ~leave
    return values, counts, none


def calibrate(model: GlanceFocus, logits: torch.Tensor, macs: Sequence[int], budget: Optional[float] = None,
              p: Optional[float] = None, tolerance: float = 0.03) -> Thresholds:
    """Thresholds from every step's ``logits`` [T, N, classes] on held-out images (not augmented), with ``macs``
    per step (step_macs): for the exit shares' ratio ``p``, or, with ``budget`` (MACs per image), for the p whose
    expected MACs on those images come within ``tolerance`` of it (bisection on log p; the closest found
    otherwise). A budget below the glance's MACs, or above running every step, is refused."""
    if (budget is None) == (p is None):
        raise ValueError(f"{_WHERE}.calibrate: give p or budget (MACs per image), one of them")
    confidence = _confidence(logits.detach().reshape(-1, logits.shape[-1])).reshape(logits.shape[:2])
    cumulative = torch.tensor(list(macs), dtype=torch.float64).cumsum(0)

    def expected(p_: float) -> Tuple[List[float], List[int], List[int], float]:
        values, counts, none = thresholds_for(confidence, p_)
        cost = float(sum(c * cumulative[k] for k, c in enumerate(counts))) / confidence.shape[1]
        return values, counts, none, cost

    if budget is not None:
        low, high = float(cumulative[0]), float(cumulative[-1])
        if not low <= budget <= high:
            raise ValueError(f"{_WHERE}.calibrate: budget expected MACs per image in [{low:.0f}, {high:.0f}] (the "
                             f"glance alone to every step), got {budget!r}")
        lo, hi = math.log(1e-4), math.log(1e4)
        best = None
        for _ in range(60):
            mid = (lo + hi) / 2
            found = expected(math.exp(mid))
            if best is None or abs(found[3] - budget) < abs(best[1][3] - budget):
                best = (math.exp(mid), found)
            if abs(found[3] - budget) <= tolerance * budget:
                break
            lo, hi = (mid, hi) if found[3] < budget else (lo, mid)
        p, (values, _, none, cost) = best
    else:
        values, _, none, cost = expected(float(p))
    return Thresholds(values, fingerprint(model), none, cost, float(p))


__all__ = ["Exits", "Thresholds", "early_exit", "exit_loop", "step_macs", "anytime", "thresholds_for", "calibrate",
           "fingerprint"]
