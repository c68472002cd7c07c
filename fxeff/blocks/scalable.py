"""ScalableModel: a model whose blocks switch between their descendants at run time (LegoDNN's online part).

``select`` chooses one descendant per block (the exact optimiser of select.py: least summed accuracy drop within
the latency and memory budgets, plus the cost of loading what changes); ``scale`` swaps the chosen descendants
into the running graph, in place: each block is a submodule attribute of the outlined GraphModule, so a swap is an
attribute assignment per block that changes, and the model computes exactly what a model built statically with
the same choice computes. ``save``/``load``: one artifact (the retrained descendants' weights, the profile, and
what they came from), loaded with ``torch.load(weights_only=True)``; the pruned modules are rebuilt from the
model by the same deterministic pruning, then given their weights.
"""
import copy
import dataclasses
import hashlib
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from .profile import Entry, Profile, check_profile
from .select import (_MIB, Choice, Selection, _fits, _spread, nondominated, pareto_front, select_excluding,
                     totals)

ARTIFACT_FORMAT = "fxeff.blocks/1"
Students = Mapping[str, Mapping[float, nn.Module]]


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the model's class and its state (names, shapes, dtypes and values)."""
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                      if tensor.numel() else b"")
    return digest.hexdigest()


class ScalableModel(nn.Module):
    """The outlined graph ``gm`` (fxeff.passes.Blocks) with, per block, its descendants by sparsity (0: the block
    itself) and their ``profile``. Calls run the current configuration; see the module docstring."""

    def __init__(self, gm: fx.GraphModule, students: Students, profile: Profile,
                 meta: Optional[Dict[str, Any]] = None):
        super().__init__()
        names = [b["name"] for b in getattr(gm, "fxeff_blocks", [])]
        if not names:
            raise ValueError("fxeff.blocks.ScalableModel: the graph has no blocks (build it with fxeff.Blocks)")
        check_profile(profile)
        self.gm = gm
        self.block_names: List[str] = names
        table = profile.table()
        missing = [n for n in names if 0.0 not in table.get(n, {})]
        if missing:
            raise ValueError(f"fxeff.blocks.ScalableModel: the profile has no entry for blocks {missing}")
        # plain dicts, not submodules: parameters() and state_dict() are the running configuration's
        self._modules_by_block: Dict[str, Dict[float, nn.Module]] = {}
        for name in names:
            modules = {float(s): m for s, m in students.get(name, {}).items()}
            modules[0.0] = gm.get_submodule(name)
            unprofiled = sorted(set(modules) - set(table[name]))
            if unprofiled:
                raise ValueError(f"fxeff.blocks.ScalableModel: {name} has descendants at sparsities {unprofiled} "
                                 f"that the profile does not hold")
            self._modules_by_block[name] = {s: modules[s] for s in sorted(table[name]) if s in modules}
        for modules in self._modules_by_block.values():  # every descendant in the graph's mode
            for module in modules.values():
                module.train(gm.training)
        self.profile = profile
        self.meta = dict(meta or {})
        self._current: Tuple[int, ...] = tuple(0 for _ in names)
        self.last_swap_seconds = 0.0

    def forward(self, *args, **kwargs):
        return self.gm(*args, **kwargs)

    def train(self, mode: bool = True) -> "ScalableModel":
        """Sets the mode of the running graph and of every descendant (not only the ones swapped in)."""
        super().train(mode)
        for modules in self._modules_by_block.values():
            for module in modules.values():
                module.train(mode)
        return self

    # ------------------------------------------------------------ the optimiser's view
    def sparsities(self, name: str) -> List[float]:
        """The sparsities block ``name`` can run at, in choice order (index 0: the block itself)."""
        return list(self._modules_by_block[name])

    def choices(self) -> List[List[Choice]]:
        """Per block, per sparsity: its modelled drop (Profile.entry_drop: the profiled drop plus one standard
        error of it, a pessimistic estimate, plus its sparsity's offset, at least the standard error: with the drop
        alone, descendants measured as good as their block by the test split's noise were free, the optimiser
        pruned many of them, and the small true drops added up: the most accurate configuration on ResNet-20's
        front measured 0.4 points below the original), latency, memory (parameter bytes plus peak
        activation bytes at the profiled batch) and the bytes a switch to it loads (its parameter bytes)."""
        table = self.profile.table()
        out = []
        for name in self.block_names:
            row = []
            for sparsity in self._modules_by_block[name]:
                e: Entry = table[name][sparsity]
                memory = e.param_bytes + e.peak_activation_bytes * self.profile.batch
                row.append(Choice(self.profile.entry_drop(e), e.latency, memory, e.param_bytes))
            out.append(row)
        return out

    def modelled_accuracy(self, config: Union[Selection, Sequence[int], Mapping[str, float]]) -> float:
        """The accuracy model's estimate (%) for ``config``: the model's accuracy minus Profile.modelled_drop of
        its blocks' summed modelled drops (Profile.entry_drop; the interaction of compounding errors included), or,
        for a configuration the profile measured whole, minus its measured drop (at least its standard error). The
        optimiser ranks by that sum, which orders configurations as the estimate does."""
        table = self.profile.table()
        choice = self._choice_of(config)
        known = dict(self._known())
        summed = known[choice] if choice in known else sum(
            self.profile.entry_drop(e) for e in (table[n][self.sparsities(n)[i]] for n, i in zip(self.block_names,
                                                                                                  choice)))
        return self.profile.accuracy - self.profile.modelled_drop(summed)

    def _known(self) -> List[Tuple[Tuple[int, ...], float]]:
        """(choice, summed drop) of each configuration the profile measured whole (Profile.measured): the sum
        that the accuracy model maps to its measured drop (Profile.summed_for), so that it ranks among the
        optimiser's sums by what was measured."""
        out = []
        for config, drop in self.profile.measured():
            if not set(config) <= set(self.block_names) or any(
                    config.get(n, 0.0) not in self._modules_by_block[n] for n in self.block_names):
                continue  # a profile of other blocks is refused at construction; nothing to weigh here
            out.append((tuple(self.sparsities(n).index(config.get(n, 0.0)) for n in self.block_names),
                        self.profile.summed_for(drop)))
        return out

    def _best(self, rows: List[List[Choice]], base: Mapping[str, Any], latency: Optional[float],
              memory: Optional[int], current: Optional[Sequence[int]], switch_weight: float) -> Selection:
        """The exact optimum of ``rows`` within the budgets where the configurations the profile measured whole
        (``_known``) count by their measured drops and the others by the additive model: the best of the measured
        ones within the budgets and of the others' optimum (select.select_excluding). Ties as select.select."""
        kwargs = dict(base, current=current, switch_weight=switch_weight)
        known = dict(self._known())
        best = select_excluding(rows, latency, memory, exclude=known, **kwargs)  # raises where nothing fits
        for choice, summed in known.items():
            sel = totals(rows, choice, **kwargs)
            sel = dataclasses.replace(sel, drop=summed, objective=summed + switch_weight * sel.switch_bytes / _MIB)
            if _fits(sel, latency, memory) and (best is None or (sel.objective, sel.latency, sel.memory, sel.choice)
                                                < (best.objective, best.latency, best.memory, best.choice)):
                best = sel
        assert best is not None  # select_excluding found the budgets feasible, so something met them
        return best

    def _front(self, rows: List[List[Choice]], base: Mapping[str, Any], max_points: Optional[int]
               ) -> List[Selection]:
        """The (latency, drop) Pareto front of ``rows`` where the configurations the profile measured whole
        (``_known``) count by their measured drops and the others by the additive model: the front of the others
        (select.pareto_front with them excluded, exact) merged with them; sorted by latency."""
        if max_points is not None and (isinstance(max_points, bool) or not isinstance(max_points, int)
                                       or max_points < 2):
            raise ValueError(f"fxeff.blocks.ScalableModel.series: max_points must be an int >= 2 (the front's two "
                             f"ends) or None, got {max_points!r}")
        known = dict(self._known())
        points = pareto_front(rows, exclude=known, **base)
        points += [dataclasses.replace(totals(rows, c, **base), drop=x, objective=x) for c, x in known.items()]
        front = nondominated(points)
        if max_points is not None and len(front) > max_points:
            front = [front[i] for i in _spread(np.array([s.latency for s in front]), max_points)]
        return front

    @property
    def configuration(self) -> Dict[str, float]:
        """block -> the sparsity it runs at now."""
        return {name: self.sparsities(name)[i] for name, i in zip(self.block_names, self._current)}

    def _budget_kwargs(self) -> Dict[str, Any]:
        return {"base_latency": self.profile.base_latency, "base_memory": self.profile.base_param_bytes}

    def select(self, latency: Optional[float] = None, memory: Optional[int] = None,
               switch_weight: float = 0.0) -> Selection:
        """The configuration of least modelled accuracy drop with modelled latency <= ``latency`` seconds and
        memory <= ``memory`` bytes, counting ``switch_weight`` points per MiB loaded to switch from the current
        one. The optimiser (select.select) is exact for the additive model; the configurations the profile measured
        whole then compete with their measured drops (a Selection's ``drop``: the summed modelled drops, or for
        one of those the sum the model maps to its measured drop). Infeasible budgets raise
        select.InfeasibleBudgetError (its ``closest`` configuration and ``binding`` budgets); nothing is relaxed
        silently. Nothing is swapped (see ``scale``)."""
        return self._best(self.choices(), self._budget_kwargs(), latency, memory, self._current, switch_weight)

    def series(self, max_points: Optional[int] = None, by: str = "latency") -> List[Selection]:
        """The distinct configurations on the Pareto front of modelled latency and accuracy drop, by latency; the
        configurations the profile measured whole are on it by their measured drops (see ``select``). ``by``:
        "latency", or "macs" (MACs per sample) or "memory" (modelled bytes) in the place of latency (the
        Selections' ``latency`` field then holds it; their ``memory``: the modelled bytes)."""
        if by == "latency":
            return self._front(self.choices(), self._budget_kwargs(), max_points)
        if by == "macs":
            rows, base = self.macs_choices()
            return self._front(rows, {"base_latency": base}, max_points)
        if by == "memory":
            rows = [[Choice(c.drop, float(c.memory), c.memory, c.load_bytes) for c in row] for row in self.choices()]
            return self._front(rows, {"base_latency": float(self.profile.base_param_bytes),
                                      "base_memory": self.profile.base_param_bytes}, max_points)
        raise ValueError(f"fxeff.blocks.ScalableModel.series: by must be 'latency', 'macs' or 'memory', got {by!r}")

    def macs_choices(self) -> Tuple[List[List[Choice]], float]:
        """(the choices with each one's MACs per sample in the place of its latency, the MACs outside the blocks):
        for the optimiser and ``pareto_front`` at a MAC budget, as comparisons at equal MACs need."""
        table = self.profile.table()
        rows = [[Choice(c.drop, float(table[n][s].macs), 0, c.load_bytes) for c, s in zip(row, self.sparsities(n))]
                for n, row in zip(self.block_names, self.choices())]
        return rows, float(self.profile.macs - sum(table[n][0.0].macs for n in self.block_names))

    def select_macs(self, macs: float) -> Selection:
        """The configuration of least modelled drop (as ``select``: measured where the profile measured it whole)
        with at most ``macs`` MACs per sample (its ``latency`` field holds its MACs)."""
        rows, base = self.macs_choices()
        return self._best(rows, {"base_latency": base}, macs, None, None, 0.0)

    def measure_front(self, loader: torch.utils.data.DataLoader, points: int = 8, rounds: int = 2,
                      metric: Optional[Any] = None) -> int:
        """Measures whole, on ``loader``, the configurations that the fronts by latency and by MACs put at
        ``points`` places each (``series(max_points=points)``) and that the profile has not measured, and adds
        them to the profile's measured configurations (``Profile.configurations``; the accuracy model's fit is
        left as it was: these are chosen, not random). ``rounds`` times, each round on the fronts the last one
        left: where a configuration measured worse than modelled, the next best takes its place, and is measured
        in turn. The optimiser chooses the configurations of least modelled drop, so it favours those whose
        descendants' drops the model underestimates most; measured, the front is what it claims. Returns the
        number measured."""
        from .profile import measure_whole, top1

        added, current = 0, self._current
        self.scale([0] * len(self.block_names))  # the drops are against the unpruned model
        for _ in range(rounds):
            known = {choice for choice, _ in self._known()}
            todo: List[Tuple[int, ...]] = []
            for by in ("latency", "macs"):
                for sel in self.series(max_points=points, by=by):
                    if sel.choice not in known and sel.choice not in todo and any(sel.choice):
                        todo.append(sel.choice)
            if not todo:
                break
            configs = [{n: self.sparsities(n)[i] for n, i in zip(self.block_names, c)} for c in todo]
            measured = measure_whole(self.gm, self._modules_by_block, loader, configs, metric or top1)
            self.profile.configurations += [[choice, drop, error] for choice, drop, error in measured]
            added += len(measured)
        self.scale(current)
        return added

    # ------------------------------------------------------------ switching
    def _choice_of(self, config: Union[Selection, Sequence[int], Mapping[str, float]]) -> Tuple[int, ...]:
        if isinstance(config, Selection):
            choice = tuple(config.choice)
        elif isinstance(config, Mapping):
            unknown = sorted(set(config) - set(self.block_names))
            if unknown:
                raise ValueError(f"fxeff.blocks.ScalableModel: unknown blocks {unknown}; blocks: {self.block_names}")
            choice = []
            for name, i in zip(self.block_names, self._current):
                sparsity = float(config.get(name, self.sparsities(name)[i]))
                if sparsity not in self._modules_by_block[name]:
                    raise ValueError(f"fxeff.blocks.ScalableModel: {name} has no descendant at sparsity {sparsity}; "
                                     f"it has {self.sparsities(name)}")
                choice.append(self.sparsities(name).index(sparsity))
            choice = tuple(choice)
        else:
            choice = tuple(int(i) for i in config)
        if len(choice) != len(self.block_names) or any(
                not 0 <= i < len(self._modules_by_block[n]) for n, i in zip(self.block_names, choice)):
            raise ValueError(f"fxeff.blocks.ScalableModel: a configuration needs one index per block "
                             f"({len(self.block_names)}), each below its number of descendants, got {choice}")
        return choice

    def scale(self, config: Union[Selection, Sequence[int], Mapping[str, float], None] = None, *,
              latency: Optional[float] = None, memory: Optional[int] = None,
              switch_weight: float = 0.0) -> Tuple[int, ...]:
        """Switches to ``config`` (a Selection, one choice index per block, or block -> sparsity), or, given
        budgets instead, to ``select(latency, memory, switch_weight)``'s choice; in place. Returns the choice now
        running; ``last_swap_seconds`` holds how long the swap took."""
        if config is None:
            if latency is None and memory is None:
                raise ValueError("fxeff.blocks.ScalableModel.scale: give a configuration or a budget")
            config = self.select(latency, memory, switch_weight)
        elif latency is not None or memory is not None:
            raise ValueError("fxeff.blocks.ScalableModel.scale: give a configuration or budgets, not both")
        choice = self._choice_of(config)
        start = time.perf_counter()
        for name, old, new in zip(self.block_names, self._current, choice):
            if old != new:
                setattr(self.gm, name, self._modules_by_block[name][self.sparsities(name)[new]])
        self._current = choice
        self.last_swap_seconds = time.perf_counter() - start
        return choice

    def static(self, config: Union[Selection, Sequence[int], Mapping[str, float]]) -> fx.GraphModule:
        """A new GraphModule built with ``config`` (deep copies of the graph and the chosen descendants): what a
        swap must equal."""
        choice = self._choice_of(config)
        gm = copy.deepcopy(self.gm)
        for name, i in zip(self.block_names, choice):
            setattr(gm, name, copy.deepcopy(self._modules_by_block[name][self.sparsities(name)[i]]))
        return gm

    # ------------------------------------------------------------ the artifact
    def save(self, path: str) -> None:
        """Writes the artifact: the descendants' weights by block and sparsity, their layer shapes, the profile,
        and the meta data it came from (model, data, torch version, settings); loads with weights_only=True."""
        students = {name: {f"{s:g}": {k: v.detach().cpu() for k, v in m.state_dict().items()}
                           for s, m in modules.items() if s != 0.0}
                    for name, modules in self._modules_by_block.items()}
        torch.save({"format": ARTIFACT_FORMAT, "torch": str(torch.__version__), "meta": self.meta,
                    "blocks": self.block_names, "students": students,
                    "profile": {**dataclasses.asdict(self.profile),
                                "entries": [dataclasses.asdict(e) for e in self.profile.entries]}}, path)


def read_artifact(path: str) -> Dict[str, Any]:
    """The artifact at ``path``, checked: its format and torch version. A file that is not one raises ValueError."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # pickle/zip errors of a damaged file
        raise ValueError(f"fxeff.blocks: {path} is not a readable artifact ({type(error).__name__}: {error})") \
            from None
    if not isinstance(data, dict) or data.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"fxeff.blocks: {path} is not an fxeff.blocks artifact (format "
                         f"{data.get('format') if isinstance(data, dict) else type(data).__name__!r}, expected "
                         f"{ARTIFACT_FORMAT!r})")
    for key in ("torch", "meta", "blocks", "students", "profile"):
        if key not in data:
            raise ValueError(f"fxeff.blocks: the artifact {path} is incomplete: no {key!r}")
    if data["torch"] != str(torch.__version__):
        raise ValueError(f"fxeff.blocks: the artifact {path} was profiled with torch {data['torch']}, this is torch "
                         f"{torch.__version__}: its latencies do not hold here; build it again")
    return data


def profile_from_dict(data: Mapping[str, Any]) -> Profile:
    entries = [Entry(**e) for e in data["entries"]]
    fields = {f.name for f in dataclasses.fields(Profile)} - {"entries"}
    return Profile(entries=entries, **{k: data[k] for k in fields if k in data})  # later fields have defaults


__all__ = ["ScalableModel", "ARTIFACT_FORMAT", "model_fingerprint", "read_artifact", "profile_from_dict"]
