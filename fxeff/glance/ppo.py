"""GFNet's three-stage training of its PPO policy: the baseline the learned policy (one stage, through an
interpolating crop) is measured against, on the same encoders.

1. warm-up: encoders and head trained with patches at random places (``fxeff.glance.train``);
2. the policy alone, everything else frozen and in eval mode: each batch is one rollout (Gaussian places around the
   actor's means), the reward of step t's patch is the gain in the true class's probability over step t - 1 (GFNet's),
   its return the sum of the rewards from t on, the critic's value the baseline; one clipped-surrogate update per
   rollout (PPO, Adam), through ``fxeff.training.fit``;
3. fine-tuning: encoders and head trained again with the policy's means, the policy frozen.
"""
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import GlanceFocus
from .train import train

_WHERE = "fxeff.glance.train_ppo"


def ppo_loss(model: GlanceFocus, images: torch.Tensor, labels: torch.Tensor, clip: float = 0.2,
             value_weight: float = 0.5) -> torch.Tensor:
    """The PPO loss of one rollout of ``model`` (policy "ppo", in mode "sample") on a batch: the clipped surrogate
    of the normalised advantages (returns minus the critic's values) plus ``value_weight`` times the critic's
    squared error. Only the policy's parameters get gradients."""
    policy = model.policy
    with torch.no_grad():
        state = model.glance(images)
        gained = [F.softmax(state["logits"].float(), dim=1).gather(1, labels[:, None])[:, 0]]
        for t in range(1, model.steps):
            state = model.focus(images, state, t)
            gained.append(F.softmax(state["logits"].float(), dim=1).gather(1, labels[:, None])[:, 0])
        probability = torch.stack(gained)  # [T, N]
        rewards = probability[1:] - probability[:-1]  # [T - 1, N]: step t's patch
        returns = rewards.flip(0).cumsum(0).flip(0).t()  # [N, T - 1]
        actions, features = state["places"], state["features"]
    mean, value = policy(features)
    distribution = torch.distributions.Normal(mean, policy.action_std)
    log_prob = distribution.log_prob(actions).sum(dim=2)  # [N, T - 1]
    advantage = returns - value.detach()
    advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)
    ratio = torch.exp(log_prob - log_prob.detach())  # one update per rollout: the old policy is this one
    surrogate = torch.min(ratio * advantage, ratio.clamp(1 - clip, 1 + clip) * advantage)
    return -surrogate.mean() + value_weight * F.mse_loss(value, returns)


def train_ppo(model: GlanceFocus, loader: torch.utils.data.DataLoader, stages: Sequence[int] = (3, 2, 1), *,
              teacher: Optional[nn.Module] = None, lr: float = 0.02, policy_lr: float = 3e-4,
              finetune_lr: Optional[float] = None, progress: bool = True) -> Dict[str, Dict[str, list]]:
    """Trains ``model`` (policy "ppo") in place by GFNet's three stages of ``stages`` epochs each (0 skips one):
    warm-up with random patches and fine-tuning (``fxeff.glance.train`` at ``lr`` and ``finetune_lr``, default
    ``lr`` / 10, distilled from ``teacher`` where given), between them PPO on the policy alone (Adam at
    ``policy_lr``). Returns each stage's fit history."""
    from ..training import bare_module, fit

    gf = bare_module(model)
    if not isinstance(gf, GlanceFocus) or gf.policy_kind != "ppo":
        raise TypeError(f"{_WHERE}: model must be a GlanceFocus with policy='ppo', got "
                        f"{getattr(gf, 'policy_kind', type(gf).__name__)!r}")
    if len(stages) != 3 or any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in stages):
        raise ValueError(f"{_WHERE}: stages must be three epoch counts >= 0, got {tuple(stages)!r}")
    history: Dict[str, Dict[str, list]] = {}
    policy = gf.policy
    trainable = {p: p.requires_grad for p in gf.parameters()}
    others = [p for name, p in gf.named_parameters() if not name.startswith("policy.")]
    try:
        if stages[0]:
            policy.mode = "random"
            history["warm-up"] = train(model, loader, stages[0], teacher=teacher, lr=lr, progress=progress)
        if stages[1]:
            policy.mode = "sample"
            for p in others:
                p.requires_grad_(False)

            def loss(m: nn.Module, batch) -> torch.Tensor:
                g = bare_module(m)
                g.global_encoder.eval()  # frozen: no BatchNorm statistics move either
                g.local_encoder.eval()
                return ppo_loss(g, batch[0], batch[1])

            history["ppo"] = fit(model, loader, loss, stages[1], lr=policy_lr, optimizer="adam",
                                 channels_last=False, progress=progress, description=f"{_WHERE} (PPO)")
            for p in others:
                p.requires_grad_(trainable[p])
        if stages[2]:
            policy.mode = "mean"
            for p in policy.parameters():
                p.requires_grad_(False)
            history["fine-tune"] = train(model, loader, stages[2], teacher=teacher,
                                         lr=lr / 10 if finetune_lr is None else finetune_lr, progress=progress)
    finally:
        policy.mode = "mean"
        for p, flag in trainable.items():
            p.requires_grad_(flag)
    return history


__all__ = ["train_ppo", "ppo_loss"]
