"""Retraining descendants on intermediate data (LegoDNN's offline step 2).

The original model (the teacher: a graph outlined by ``fxeff.passes.Blocks``) runs once per batch with every
block's input and output captured; every descendant (student) of every block learns MSE(student(block input),
block output) from that same teacher pass. The students are trained together as one module by fxeff's one
training loop (``fxeff.training.fit``, Adam at 3e-4 by default as the seed): their parameters are disjoint, so the
summed loss gives each student exactly the gradient it would get alone, and Adam's steps are per parameter.
"""
import contextlib
import os
from typing import Any, Dict, Iterator, List, Mapping, Optional, Set, Tuple

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
    done = 0
    if checkpoint is not None and os.path.exists(checkpoint):
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if sorted(state["keys"]) != sorted(student_set.students):
            raise ValueError(f"fxeff.blocks.retrain: the checkpoint {checkpoint} holds students {state['keys']}, "
                             f"this run trains {sorted(student_set.students)}")
        student_set.students.load_state_dict(state["students"])
        done = int(state["epochs_done"])
    history: Dict[str, Any] = {"loss": [], "seconds": [], "epochs_done": done}
    if done >= epochs:
        return history

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        return model(_teacher_values(teacher, names, batch))

    def save(epoch: int, loss: float) -> None:
        share()
        history["epochs_done"] = done + epoch + 1
        if checkpoint is not None and _rank() == 0:
            tmp = checkpoint + ".tmp"
            torch.save({"epochs_done": done + epoch + 1, "keys": sorted(student_set.students),
                        "students": student_set.students.state_dict()}, tmp)
            os.replace(tmp, checkpoint)

    try:  # fit trains in training mode (BatchNorm statistics of the intermediate data); then the teacher's mode
        model = nn.parallel.DistributedDataParallel(student_set) if distributed and parallel == "data" else trained
        run = fit(model, loader, loss_fn, epochs - done, lr=lr, weight_decay=0.0, optimizer="adam",
                  channels_last=False, progress=progress, description="fxeff.blocks.retrain", on_epoch_end=save)
    finally:
        student_set.train(teacher.training)
    history["loss"], history["seconds"] = run["loss"], run["seconds"]
    return history


__all__ = ["StudentSet", "block_names", "images_of", "mutating_blocks", "captured", "block_inputs", "block_mse",
           "retrain"]
