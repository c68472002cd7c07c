"""Retraining descendants on intermediate data (LegoDNN's offline step 2).

The original model (the teacher: a graph outlined by ``fxeff.passes.Blocks``) runs once per batch with every
block's input and output captured; every descendant (student) of every block learns MSE(student(block input),
block output) from that same teacher pass. The students are trained together as one module by fxeff's one
training loop (``fxeff.training.fit``, Adam at 3e-4 by default as the seed): their parameters are disjoint, so the
summed loss gives each student exactly the gradient it would get alone, and Adam's steps are per parameter.
"""
import contextlib
import os
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Set, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

Students = Mapping[str, Mapping[float, nn.Module]]


def _key(block: str, sparsity: float) -> str:
    return f"{block}@{sparsity:g}".replace(".", "_")


def block_names(gm: fx.GraphModule) -> List[str]:
    """The blocks of a graph outlined by fxeff.passes.Blocks, in graph order."""
    blocks = getattr(gm, "fxeff_blocks", None)
    if not blocks:
        raise ValueError("fxeff.blocks: the graph has no blocks; build it with fxeff.transform(model, x, "
                         "[fxeff.Blocks()]) (its report says why a model has none)")
    return [b["name"] for b in blocks]


def images_of(batch: Any) -> torch.Tensor:
    """The model's input of a loader's batch: its images, or its first element where it is (images, labels)."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def mutating_blocks(gm: fx.GraphModule) -> Set[str]:
    """The blocks that write their input in place (a ReLU(inplace=True) on the entry, as a residual add followed
    by a ReLU that starts a block): their input is copied before them, for the teacher's record and for each
    student, which would otherwise see (and write) a value another one reads."""
    return {b["name"] for b in getattr(gm, "fxeff_blocks", []) if b.get("mutates_input") is not False}


@contextlib.contextmanager
def captured(gm: fx.GraphModule, names: List[str]) -> Iterator[Dict[str, Tuple[torch.Tensor, torch.Tensor]]]:
    """Within the block: each call of ``gm`` records block name -> (its input as it came, its output) of the last
    call."""
    seen: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    inputs: Dict[str, torch.Tensor] = {}
    copied = mutating_blocks(gm)
    hooks = []
    for name in names:
        def before(module, args, name=name):
            inputs[name] = args[0].clone() if name in copied else args[0]

        def record(module, args, out, name=name):
            seen[name] = (inputs.pop(name), out)

        hooks.append(gm.get_submodule(name).register_forward_pre_hook(before))
        hooks.append(gm.get_submodule(name).register_forward_hook(record))
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


@contextlib.contextmanager
def configured(gm: fx.GraphModule, students: Students) -> Iterator[Callable[[Mapping[str, float]], None]]:
    """Within: a function that puts a configuration (block -> sparsity; a block not named runs at 0) into ``gm``;
    gm's blocks are restored after."""
    originals = {n: getattr(gm, n) for n in block_names(gm)}

    def apply(choice: Mapping[str, float]) -> None:
        for name, original in originals.items():
            sparsity = choice.get(name, 0.0)
            setattr(gm, name, students[name][sparsity] if sparsity else original)

    try:
        yield apply
    finally:
        for name, module in originals.items():
            setattr(gm, name, module)


def block_inputs(gm: fx.GraphModule, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Block name -> its input when ``gm`` (outlined by fxeff.passes.Blocks) runs on ``x``, as it came (no_grad)."""
    names = block_names(gm)
    with captured(gm, names) as seen, torch.no_grad():
        gm(x)
    return {name: seen[name][0] for name in names}


class StudentSet(nn.Module):
    """Every (block, sparsity > 0) student as one module (their parameters disjoint): what fit trains."""

    def __init__(self, students: Students, mutating: Set[str] = frozenset()):
        super().__init__()
        self.mutating = set(mutating)  # blocks that write their input in place: each student gets a copy
        self.index: Dict[str, Tuple[str, float]] = {}
        self.students = nn.ModuleDict()
        for block, by_sparsity in students.items():
            for sparsity, module in by_sparsity.items():
                if sparsity == 0.0:
                    continue  # the block itself: nothing to learn
                key = _key(block, sparsity)
                self.students[key] = module
                self.index[key] = (block, float(sparsity))

    def forward(self, seen: Mapping[str, Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The summed loss of every student on the captured values (what DistributedDataParallel calls)."""
        return sum(self.losses(seen).values())

    def losses(self, seen: Mapping[str, Tuple[torch.Tensor, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """key -> MSE of that student's output against its block's on the captured values."""
        out = {}
        for key, module in self.students.items():
            block = self.index[key][0]
            x, y = seen[block]
            out[key] = F.mse_loss(module(x.clone() if block in self.mutating else x), y)
        return out


def _teacher_values(teacher: fx.GraphModule, names: List[str], batch: Any
                    ) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    with captured(teacher, names) as seen, torch.no_grad():
        teacher(images_of(batch))
    return dict(seen)


def block_mse(teacher: fx.GraphModule, students: Students, loader: torch.utils.data.DataLoader,
              batches: Optional[int] = None) -> Dict[str, Dict[float, float]]:
    """block -> sparsity -> mean MSE of that descendant against the block's output (eval mode) over the first
    ``batches`` batches of ``loader`` (None: all); the block itself (sparsity 0) is 0."""
    names = block_names(teacher)
    teacher.eval()
    student_set = StudentSet(students, mutating_blocks(teacher))
    modes = {name: m.training for name, m in student_set.named_modules()}
    student_set.eval()
    totals: Dict[str, float] = {key: 0.0 for key in student_set.students}
    count = 0
    for i, batch in enumerate(loader):
        if batches is not None and i >= batches:
            break
        seen = _teacher_values(teacher, names, batch)
        with torch.no_grad():
            for key, loss in student_set.losses(seen).items():
                totals[key] += float(loss)
        count += 1
    for name, m in student_set.named_modules():
        m.training = modes[name]
    if count == 0:
        raise ValueError("fxeff.blocks.block_mse: the loader yields no batch")
    result: Dict[str, Dict[float, float]] = {block: {0.0: 0.0} for block in students}
    for key, total in totals.items():
        block, sparsity = student_set.index[key]
        result[block][sparsity] = total / count
    return result


def _resume(checkpoint: Optional[str], student_set: StudentSet, caller: str) -> int:
    """The epochs done that ``checkpoint`` holds (0 where there is none), its students' weights loaded."""
    if checkpoint is None or not os.path.exists(checkpoint):
        return 0
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if sorted(state["keys"]) != sorted(student_set.students):
        raise ValueError(f"{caller}: the checkpoint {checkpoint} holds students {state['keys']}, this run trains "
                         f"{sorted(student_set.students)}")
    student_set.students.load_state_dict(state["students"])
    return int(state["epochs_done"])


def _save(checkpoint: Optional[str], student_set: StudentSet, epochs_done: int) -> None:
    """The students' weights and the epochs done, written to ``checkpoint`` (on rank 0, atomically)."""
    from ..training import _rank

    if checkpoint is not None and _rank() == 0:
        tmp = checkpoint + ".tmp"
        torch.save({"epochs_done": epochs_done, "keys": sorted(student_set.students),
                    "students": student_set.students.state_dict()}, tmp)
        os.replace(tmp, checkpoint)


def retrain(teacher: fx.GraphModule, students: Students, loader: torch.utils.data.DataLoader, epochs: int = 1,
            lr: float = 3e-4, checkpoint: Optional[str] = None, progress: bool = True,
            parallel: str = "data") -> Dict[str, Any]:
    """Trains every student (in place) on the teacher's intermediate data: MSE(student(block input), block
    output), Adam at ``lr``, ``epochs`` passes over ``loader`` (its batches: images, or (images, labels)), one
    teacher pass per batch for all students (fxeff.training.fit, progress bar). ``checkpoint``: the students'
    weights and the epochs done are saved there after each epoch, and a run that finds it resumes after the
    epochs it holds. Returns fit's history ({"loss", "seconds"} per epoch run now) and "epochs_done".

    Under torch.distributed (a process group initialised by the caller), ``parallel`` says what is split:
    - ``"data"``: each rank with its DistributedSampler loader; the students train as one DistributedDataParallel
      module: each rank runs the teacher on its shard, gradients are averaged;
    - ``"blocks"``: each rank with the whole loader (in the same order); the students are dealt to the ranks in
      turn, each rank trains its own on the teacher's values (no gradient traffic: the students share no
      parameter), and after each epoch every student's weights and statistics are broadcast from its rank. The
      result is what one process training them all computes (each student's Adam steps see only its own loss).
      Each rank runs the teacher on every batch; there must be at least as many students as ranks.
    Either way every rank ends with the same students, and rank 0 writes the checkpoint."""
    import torch.distributed as dist

    from ..training import _rank, fit

    if parallel not in ("data", "blocks"):
        raise ValueError(f"fxeff.blocks.retrain: parallel must be 'data' or 'blocks', got {parallel!r}")
    distributed = dist.is_available() and dist.is_initialized()
    names = block_names(teacher)
    teacher.eval()  # its values are taken under no_grad
    student_set = StudentSet(students, mutating_blocks(teacher))
    if not len(student_set.students):
        raise ValueError("fxeff.blocks.retrain: no student to train (every sparsity is 0)")
    keys = sorted(student_set.students)
    owner = {key: i % dist.get_world_size() for i, key in enumerate(keys)} if distributed else {}
    trained = student_set
    if distributed and parallel == "blocks":
        if dist.get_world_size() > len(keys):
            raise ValueError(f"fxeff.blocks.retrain: parallel='blocks' deals {len(keys)} students to "
                             f"{dist.get_world_size()} ranks: some rank would have none (use parallel='data')")
        trained = StudentSet({block: {s: m for s, m in by.items() if s == 0.0 or owner[_key(block, s)] == _rank()}
                              for block, by in students.items()}, student_set.mutating)

    def share() -> None:  # parallel="blocks": every student's state from the rank that trained it
        if trained is not student_set:
            for key, module in student_set.students.items():
                for tensor in list(module.parameters()) + list(module.buffers()):
                    dist.broadcast(tensor.data, src=owner[key])
    done = _resume(checkpoint, student_set, "fxeff.blocks.retrain")
    history: Dict[str, Any] = {"loss": [], "seconds": [], "epochs_done": done}
    if done >= epochs:
        return history

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        return model(_teacher_values(teacher, names, batch))

    def save(epoch: int, loss: float) -> None:
        share()
        history["epochs_done"] = done + epoch + 1
        _save(checkpoint, student_set, done + epoch + 1)

    try:  # fit trains in training mode (BatchNorm statistics of the intermediate data); then the teacher's mode
        model = nn.parallel.DistributedDataParallel(student_set) if distributed and parallel == "data" else trained
        run = fit(model, loader, loss_fn, epochs - done, lr=lr, weight_decay=0.0, optimizer="adam",
                  channels_last=False, progress=progress, description="fxeff.blocks.retrain", on_epoch_end=save)
    finally:
        student_set.train(teacher.training)
    history["loss"], history["seconds"] = run["loss"], run["seconds"]
    return history


DRAWS = ("sandwich", "levels", "random")  # what retrain_composed draws each step


class _Compositions(nn.Module):
    """The students as one module whose forward is the loss of the teacher's graph with random configurations of
    them swapped in, against the teacher's own output; what ``retrain_composed`` trains. It always runs in eval
    mode: the students' BatchNorms keep the statistics that block retraining gave them (their scale and shift
    train), so training computes what inference will."""

    def __init__(self, teacher: fx.GraphModule, student_set: StudentSet, students: Students, temperature: float,
                 alpha: float, draws: str, seed: int):
        super().__init__()
        self.student_set = student_set  # the trained parameters; the teacher is no submodule (it stays frozen)
        self._teacher = [teacher]
        self.students = students
        self.options = {name: sorted(students[name]) for name in block_names(teacher)
                        if len(students.get(name, ())) > 1}
        self.temperature, self.alpha, self.draws = temperature, alpha, draws
        self.steps = 0
        self.generator = torch.Generator().manual_seed(seed)  # every rank draws the same configurations

    def train(self, mode: bool = True) -> "_Compositions":
        return super().train(False)

    def draw(self) -> List[Dict[str, float]]:
        """This step's configurations (``DRAWS``): one random (each block at a sparsity drawn uniformly), after
        the smallest (every block at its highest sparsity: "sandwich") or after every block at one sparsity, the
        next in turn ("levels")."""
        choice = {name: options[int(torch.randint(len(options), (1,), generator=self.generator))]
                  for name, options in self.options.items()}
        self.steps += 1
        if self.draws == "random":
            return [choice]
        if self.draws == "sandwich":
            return [{name: options[-1] for name, options in self.options.items()}, choice]
        levels = sorted({s for options in self.options.values() for s in options if s})
        level = levels[(self.steps - 1) % len(levels)]
        return [{name: max([s for s in options if s <= level]) for name, options in self.options.items()}, choice]

    def forward(self, batch: Any) -> torch.Tensor:
        from ..distill import kd_loss

        teacher = self._teacher[0]
        x = images_of(batch)
        with torch.no_grad():
            target = teacher(x)
        labels = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
        loss = 0.0
        with configured(teacher, self.students) as apply:
            for choice in self.draw():
                apply(choice)
                out = teacher(x)
                if out.dim() == 2:  # logits: distilled, with the labels where the batches have them
                    term = kd_loss(out, target, self.temperature)
                    if labels is not None and self.alpha < 1:
                        term = self.alpha * term + (1 - self.alpha) * F.cross_entropy(out, labels)
                else:
                    term = F.mse_loss(out, target)
                loss = loss + term
        return loss


def retrain_composed(teacher: fx.GraphModule, students: Students, loader: torch.utils.data.DataLoader,
                     epochs: int = 1, lr: float = 3e-4, temperature: float = 4.0, alpha: float = 0.9,
                     draws: str = "levels", seed: int = 0, checkpoint: Optional[str] = None,
                     progress: bool = True) -> Dict[str, Any]:
    """Trains the students (in place, after ``retrain``) where they run: composed into the whole model. Block
    retraining makes each descendant match its block's output on the teacher's input, so errors compound where
    many blocks are pruned at once (a block's input then comes from pruned blocks), which a per-block retraining
    cannot see. Here each step draws configurations (``draws``: "random", one with each block at a sparsity drawn
    uniformly, the block itself included; "sandwich", also the smallest, every block at its highest sparsity, as
    slimmable and once-for-all networks train; "levels", also every block at one sparsity, each in turn), runs the
    model with them swapped in, and distils the teacher's output: ``fxeff.distill.kd_loss`` at ``temperature`` for
    logits [N, classes] (weighted ``alpha``, plus 1 - ``alpha`` times the cross-entropy where the batches are
    (images, labels)), the MSE for other outputs.
    Adam at ``lr`` for ``epochs`` over ``loader`` (fxeff.training.fit). Each student is stepped only when drawn;
    the teacher, and so every block at sparsity 0, stays frozen; the students run in eval mode (BatchNorm
    statistics frozen). ``seed`` fixes the draws. ``checkpoint``: resumable as ``retrain``.

    Under torch.distributed (a process group initialised by the caller, each rank with its DistributedSampler
    loader), the students train as one DistributedDataParallel module: every rank draws the same
    configurations (the same seed and steps), gradients are averaged. Returns as ``retrain``."""
    import torch.distributed as dist

    from ..training import fit

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"fxeff.blocks.retrain_composed: epochs must be an int >= 1, got {epochs!r}")
    if draws not in DRAWS:
        raise ValueError(f"fxeff.blocks.retrain_composed: draws must be one of {DRAWS}, got {draws!r}")
    if not 0 <= alpha <= 1 or not temperature > 0:
        raise ValueError(f"fxeff.blocks.retrain_composed: alpha must be in [0, 1] and temperature > 0, got "
                         f"{alpha!r} and {temperature!r}")
    swapped = [name for name in block_names(teacher)
               if any(getattr(teacher, name) is m for s, m in students.get(name, {}).items() if s)]
    if swapped:
        raise ValueError(f"fxeff.blocks.retrain_composed: the teacher runs descendants in {swapped}; put its own "
                         f"blocks back first (ScalableModel.scale to sparsity 0): its output is the target")
    teacher.eval()
    student_set = StudentSet(students, mutating_blocks(teacher))
    if not len(student_set.students):
        raise ValueError("fxeff.blocks.retrain_composed: no student to train (every sparsity is 0)")
    done = _resume(checkpoint, student_set, "fxeff.blocks.retrain_composed")
    history: Dict[str, Any] = {"loss": [], "seconds": [], "epochs_done": done}
    if done >= epochs:
        return history
    # the draws go on where a resumed run left off: the seed moves with the epochs done
    compositions = _Compositions(teacher, student_set, students, temperature, alpha, draws, seed + done)
    distributed = dist.is_available() and dist.is_initialized()
    frozen = [(p, p.requires_grad) for p in teacher.parameters()]  # the model's own (and the blocks') weights

    def save(epoch: int, loss: float) -> None:
        history["epochs_done"] = done + epoch + 1
        _save(checkpoint, student_set, done + epoch + 1)

    modes = {m: m.training for m in student_set.modules()}
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        model = nn.parallel.DistributedDataParallel(compositions, find_unused_parameters=True) if distributed \
            else compositions
        run = fit(model, loader, lambda m, batch: m(batch), epochs - done, lr=lr, weight_decay=0.0,
                  optimizer="adam", channels_last=False, progress=progress, description="fxeff.blocks.retrain_composed",
                  on_epoch_end=save)
    finally:
        for p, requires in frozen:
            p.requires_grad_(requires)
        for m, mode in modes.items():
            m.training = mode
    history["loss"], history["seconds"] = run["loss"], run["seconds"]
    return history


__all__ = ["DRAWS", "StudentSet", "block_names", "images_of", "mutating_blocks", "captured", "block_inputs",
           "block_mse", "retrain", "retrain_composed", "configured"]
