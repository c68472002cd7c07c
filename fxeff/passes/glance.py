"""The glance pass: a whole classifier becomes glance and focus (fxeff.glance.GlanceFocus) over itself.

The traced graph is replaced by one call of a ``glance_focus`` submodule (the GlanceFocus, built from the
graph: its encoders are copies of the classifier's trunk, its classifiers of its linear layer) whose last step's
logits the graph returns, so the result keeps the model's input and output. The heads (a GRU or concat + linear)
and a learned policy start untrained: train ``gm.glance_focus`` with ``fxeff.glance.train`` (or ``train_ppo``),
calibrate thresholds for a MACs budget (``fxeff.glance.calibrate``) and run it with real early exit
(``fxeff.glance.early_exit``). The report gives each step's MACs (torch.utils.flop_counter) against the
model's.
"""
import dataclasses
from typing import Optional

import torch
import torch.fx as fx

from ..report import Report, SiteReport
from .config import PassConfig, PassContext, register_pass_config
from .graph import SYMBOLIC, graph_kind

SUBMODULE = "glance_focus"


@register_pass_config("glance")
@dataclasses.dataclass
class Glance(PassConfig):
    """Config of the glance pass: GlanceFocus's arguments (``patch_size``; ``steps``, the glance then
    ``steps`` - 1 patches; ``glance_size``, default the patch size; ``head``, "gru" or "concat"; ``policy``,
    "saliency", "learned", "random" or "ppo"; ``seed``, of the random policy; ``saliency``, the map the saliency
    policy centres on and the learned one starts from: "activation" or "cam")."""

    patch_size: int = 32
    steps: int = 3
    glance_size: Optional[int] = None
    head: str = "gru"
    policy: str = "saliency"
    seed: int = 0
    saliency: str = "activation"

    def __post_init__(self):
        from ..glance.model import HEADS, POLICIES, SALIENCY_MAPS

        for name in ("patch_size", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"fxeff.passes.Glance: {name} must be an int >= 1, got {value!r}")
        if self.glance_size is not None and (isinstance(self.glance_size, bool) or
                                             not isinstance(self.glance_size, int) or self.glance_size < 1):
            raise ValueError(f"fxeff.passes.Glance: glance_size must be an int >= 1 or None, got {self.glance_size!r}")
        if self.head not in HEADS:
            raise ValueError(f"fxeff.passes.Glance: head must be one of {HEADS}, got {self.head!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"fxeff.passes.Glance: policy must be one of {POLICIES}, got {self.policy!r}")
        if self.saliency not in SALIENCY_MAPS:
            raise ValueError(f"fxeff.passes.Glance: saliency must be one of {SALIENCY_MAPS}, got {self.saliency!r}")

    def run(self, gm: fx.GraphModule, context: PassContext) -> Report:
        return glance_pass(gm, self, context)


def glance_pass(gm: fx.GraphModule, config: Glance, context: PassContext) -> Report:
    """Replaces ``gm``'s graph (in place) by one call of a GlanceFocus over it; see the module docstring."""
    from ..bench import macs as count_macs
    from ..glance.inference import step_macs
    from ..glance.model import GlanceFocus
    from .measure import fake_mode_of

    if graph_kind(gm) != SYMBOLIC:
        raise NotImplementedError(
            f"fxeff.passes.Glance: {graph_kind(gm)} graphs (parameters as graph inputs) are not supported yet; build "
            "the wrapper with fxeff.transform(model, x, [fxeff.passes.Glance()]) on the model itself")
    inputs = list(context.example_inputs)
    if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() != 4:
        raise ValueError(f"fxeff.passes.Glance: the model must take one batch of images [N, C, H, W], got "
                         f"{len(inputs)} example inputs")
    if fake_mode_of(inputs) is not None:
        raise NotImplementedError("fxeff.passes.Glance: fake example inputs are not supported yet (the classifier "
                                  "is split on real shapes and each step's MACs counted on a real image)")
    example = inputs[0]
    before = count_macs(lambda: gm(example[:1]))
    gf = GlanceFocus(gm, example, config.patch_size, config.steps, glance_size=config.glance_size,
                     head=config.head, policy=config.policy, seed=config.seed,
                     saliency=config.saliency)
    macs = step_macs(gf.eval(), example)
    gf.train(gm.training)
    graph = fx.Graph()
    x = graph.placeholder(next(n.name for n in gm.graph.nodes if n.op == "placeholder"))
    every = graph.call_module(SUBMODULE, (x,))
    graph.output(graph.call_function(_last_step, (every,)))
    for name, _ in list(gm.named_children()):
        delattr(gm, name)
    gm.add_submodule(SUBMODULE, gf)
    gm.graph = graph
    gm.recompile()
    report = Report(pass_name="glance", model_macs_before=before, model_macs_after=sum(macs))
    report.sites.append(SiteReport(SUBMODULE, f"glance {gf.glance_size}px, then {gf.steps - 1} patches of "
                                              f"{gf.patch_size}px, {gf.head_kind} head, {gf.policy_kind} policy",
                                   "rewritten", "", before, sum(macs), "glance"))
    report.notes.append("MACs per step: " + ", ".join(f"{m / 1e6:.2f}M" for m in macs) +
                        f" (the model: {before / 1e6:.2f}M); every step run: {sum(macs) / before:.2f} of it")
    report.notes.append(f"the heads{' and the learned policy' if config.policy == 'learned' else ''} start untrained: "
                        f"train gm.{SUBMODULE} with fxeff.glance.train"
                        f"{'_ppo' if config.policy == 'ppo' else ''}, then calibrate thresholds for a MACs budget "
                        f"(fxeff.glance.calibrate) and run fxeff.glance.early_exit")
    return report


def _last_step(every: torch.Tensor) -> torch.Tensor:
    """The last step's logits of every step's [T, N, classes]: the model's output when every step runs."""
    return every[-1]


__all__ = ["Glance", "glance_pass"]
