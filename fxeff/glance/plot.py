"""Pictures of glance and focus (GFNet ships none: its issues #5 and #6): each image's glance and patch sequence
with every step's prediction and confidence, and budget curves (accuracy against MACs per image)."""
import textwrap
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from .crop import pixel_corners
from .model import GlanceFocus


def visualise(model: GlanceFocus, x: torch.Tensor, path: str, labels: Optional[torch.Tensor] = None,
              classes: Optional[Sequence[str]] = None) -> str:
    """A PNG at ``path``: one row per image of ``x`` [N, C, H, W] (at most 16): the glance as the model sees it,
    then the image with each later step's patch outlined and numbered; every panel titled with that step's
    prediction and confidence (green where it matches ``labels``, red where not). Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    x = x[:16]
    model.eval()
    with torch.no_grad():
        state = model.glance(x)
        logits, places = [state["logits"]], []
        for t in range(1, model.steps):
            state = model.focus(x, state, t)
            logits.append(state["logits"])
            places.append(pixel_corners(state["corners"], model.patch_size, *model.image_size))
        small = F.interpolate(x, size=(model.glance_size, model.glance_size), mode="bilinear", align_corners=False,
                              antialias=True)

    def title(ax, t, i):
        probs = torch.softmax(logits[t][i].float(), dim=0)
        k = int(probs.argmax())
        name = classes[k] if classes is not None else str(k)
        ok = labels is None or int(labels[i]) == k
        ax.set_title(f"step {t}: {name} {float(probs[k]):.2f}", fontsize=7, color="green" if ok else "red")

    def grey(img):
        img = img.float().mean(dim=0)
        return ((img - img.min()) / (img.max() - img.min() + 1e-12)).cpu().numpy()

    n, cols = len(x), model.steps
    fig, axes = plt.subplots(n, cols, figsize=(1.9 * cols, 1.9 * n), squeeze=False)
    colours = ["tab:orange", "tab:cyan", "tab:pink", "tab:olive", "tab:purple"]
    for i in range(n):
        axes[i][0].imshow(grey(small[i]), cmap="gray")
        title(axes[i][0], 0, i)
        for t in range(1, model.steps):
            ax = axes[i][t]
            ax.imshow(grey(x[i]), cmap="gray")
            for s in range(t):  # earlier patches faint, this one bold
                top, left = (float(v) for v in places[s][i])
                ax.add_patch(patches.Rectangle((left - 0.5, top - 0.5), model.patch_size, model.patch_size,
                                               fill=False, lw=2 if s == t - 1 else 0.8,
                                               ec=colours[s % len(colours)], alpha=1.0 if s == t - 1 else 0.5))
            title(ax, t, i)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    if labels is not None:
        for i in range(n):
            k = int(labels[i])
            axes[i][0].set_ylabel(classes[k] if classes is not None else str(k), fontsize=7)
    fig.suptitle(f"glance {model.glance_size}px, patches {model.patch_size}px, policy {model.policy_kind}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(curves: Mapping[str, Sequence], full_accuracy: float, full_macs: float, path: str,
                title: str = "Glance and focus", target: Optional[float] = 0.3, latency: Optional[Mapping] = None
                ) -> str:
    """A PNG at ``path`` of budget curves (``curves``: name -> BudgetPoints) as accuracy against MACs per image
    (a fraction of the full model's ``full_macs``) beside the full-resolution model's ``full_accuracy``, and
    ``target`` points below it; with ``latency`` (name -> [(fraction of the full model's time, accuracy)]), a
    second panel against measured latency. Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if latency else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0][0]
    for name, points in curves.items():
        ax.plot([p.macs / full_macs for p in points], [p.accuracy for p in points], marker="o", label=name)
    ax.set_xlabel("MACs per image / the full-resolution model's")
    if latency:
        for name, points in latency.items():
            axes[0][1].plot([a for a, _ in points], [b for _, b in points], marker="s", label=name)
        axes[0][1].set_xlabel("measured latency / the full-resolution model's")
    for a in axes[0]:
        a.axhline(full_accuracy, color="k", linestyle="--", label="full-resolution model")
        if target is not None:
            a.axhline(full_accuracy - target, color="grey", linestyle=":", label=f"-{target:g} points")
        a.set_ylabel("test accuracy (%)")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 90), fontsize=9)  # wrapped: a long title would leave the figure
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["visualise", "plot_curves"]
