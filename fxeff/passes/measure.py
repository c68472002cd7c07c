"""Running a graph on its example inputs to learn shapes, values and FLOPs, without side effects.

Passes need shapes (a symbolic_trace graph carries none), and reports need MACs counted by
torch.utils.flop_counter.FlopCounterMode and, for the focus pass, the AoI actually seen. The run
happens under no_grad and restores every buffer and non-parameter input afterwards, so a model in
training mode does not get its BatchNorm statistics updated by fxeff looking at it.
"""
import contextlib
from typing import Any, Collection, Dict, Iterator, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

VALUE_KEY = "fxeff_val"


def fake_mode_of(example_inputs: Sequence[Any]) -> Optional[FakeTensorMode]:
    """The FakeTensorMode of the example inputs, or None when they are real tensors."""
    for x in example_inputs:
        if isinstance(x, FakeTensor):
            return x.fake_mode
    return None


class _SavedState:
    """Copies of tensors taken before a run may change them in place (BatchNorm statistics in training mode)."""

    def __init__(self):
        self.saved = []
        self.seen = set()

    def save(self, tensors) -> None:
        for t in tensors:
            if id(t) in self.seen or isinstance(t, FakeTensor) or isinstance(t, torch.nn.Parameter):
                continue
            self.seen.add(id(t))
            self.saved.append((t, t.detach().clone()))

    def restore(self) -> None:
        """Writes back only what changed: the user's tensors are not written (their version counters stay)."""
        with torch.no_grad():
            for t, copy in self.saved:
                if t.shape == copy.shape and not torch.equal(t, copy):
                    t.copy_(copy)


def _state_of(gm: fx.GraphModule, example_inputs: Sequence[Any]):
    return list(gm.buffers()) + [x for x in example_inputs if isinstance(x, torch.Tensor)]


@contextlib.contextmanager
def preserved_state(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Iterator[None]:
    """Restores gm's buffers and every non-Parameter tensor input to their values on exit."""
    state = _SavedState()
    state.save(_state_of(gm, example_inputs))
    try:
        yield
    finally:
        state.restore()


def _writes_in_place(gm: fx.GraphModule, user: fx.Node) -> bool:
    """Whether ``user`` may overwrite its input: a module with ``inplace=True`` (ReLU, Hardswish, Dropout, ...),
    an in-place method or function (``relu_``, ``add_``, ``operator.iadd``) or an ``inplace=True`` argument."""
    if user.kwargs.get("inplace") is True:
        return True
    if user.op == "call_module":
        return getattr(gm.get_submodule(user.target), "inplace", False) is True
    name = user.target if isinstance(user.target, str) else getattr(user.target, "__name__", "")
    if isinstance(user.target, torch._ops.OpOverload):
        return user.target._schema.is_mutable
    return (name.endswith("_") and not name.endswith("__")) or name in ("iadd", "isub", "imul", "itruediv", "ior",
                                                                        "iand", "__iadd__", "__imul__")


class _Recorder(fx.Interpreter):
    """Runs the graph, stores each tensor value's shape and dtype in node.meta and keeps chosen values
    (copied when a later node may overwrite them in place, such as the conv before a ReLU(inplace=True))."""

    def __init__(self, gm: fx.GraphModule, keep: Collection[fx.Node]):
        super().__init__(gm)
        self.keep = set(keep)
        self.kept: Dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        _record_meta(n, result)
        if n in self.keep:
            written = isinstance(result, torch.Tensor) and any(_writes_in_place(self.module, u) for u in n.users)
            self.kept[n] = result.clone() if written else result
        return result


class ValueMeta(NamedTuple):
    """The shape, dtype and memory format of a node's tensor value on the example inputs (``node.meta["fxeff_val"]``;
    channels_last where a 4-D value is laid out so and not also contiguous, e.g. at one channel)."""

    shape: torch.Size
    dtype: torch.dtype
    memory_format: torch.memory_format = torch.contiguous_format


def _record_meta(n: fx.Node, result: Any) -> None:
    if isinstance(result, torch.Tensor):  # a plain tuple: a meta tensor per node cost 50 us, 5% of a run
        cl = result.dim() == 4 and not result.is_contiguous() and \
            result.is_contiguous(memory_format=torch.channels_last)
        n.meta[VALUE_KEY] = ValueMeta(result.shape, result.dtype,
                                      torch.channels_last if cl else torch.contiguous_format)


def run_recording(gm: fx.GraphModule, example_inputs: Sequence[Any], keep: Collection[fx.Node] = (),
                  count_flops: bool = True, mode: Optional[Any] = None) -> Tuple[int, Dict[fx.Node, Any]]:
    """Runs gm on the example inputs: returns (FLOPs counted by FlopCounterMode, or 0 without
    ``count_flops``, which saves the counter's cost, about a third of a forward pass; values of ``keep``).

    Every tensor-valued node gets ``meta["fxeff_val"]`` (a ValueMeta: its shape, dtype and memory format). Fake inputs
    run under their FakeTensorMode (real parameters are treated as constants). ``mode``: a context (such
    as a TorchFunctionMode watching the run) entered around the run.
    """
    fake_mode = fake_mode_of(example_inputs)
    recorder = _Recorder(gm, keep)
    counter = FlopCounterMode(display=False)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(preserved_state(gm, example_inputs))
        if fake_mode is not None:
            previous = fake_mode.allow_non_fake_inputs
            fake_mode.allow_non_fake_inputs = True
            stack.callback(setattr, fake_mode, "allow_non_fake_inputs", previous)
            stack.enter_context(fake_mode)
        if mode is not None:
            stack.enter_context(mode)
        if count_flops:
            stack.enter_context(counter)
        recorder.run(*example_inputs)
    return (int(counter.get_total_flops()) if count_flops else 0), recorder.kept


class IncrementalRun:
    """One run of a graph that a pass rewrites while it runs: the values a partly rewritten graph computes,
    for every site, at the cost of one forward pass in all.

    A weight-converting pass rewrites its sites in graph order, and each rewrite inserts nodes just before
    the site's node and edits only nodes after it. The run computes nodes in graph order up to what the pass
    asks for (``value``); every node before that point is already what the rewritten graph computes, and every
    rewrite lands after it. So ``value(site.input)`` is the site's input once the sites before it are
    rewritten (the same tensor a fresh run of the partly rewritten graph gives), and ``finish`` runs the rest
    of the final graph: its outputs and FLOPs, without another forward pass. Values are freed once all their
    users ran. Real example inputs only; use as a context manager (no_grad, and every buffer or input the
    graph changes in place, such as BatchNorm statistics in training mode, is restored on exit).
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]):
        if fake_mode_of(example_inputs) is not None:
            raise ValueError("fxeff.passes.measure.IncrementalRun: example inputs must be real tensors, got fake ones")
        self.gm = gm
        self.interpreter = fx.Interpreter(gm, garbage_collect_values=False)
        self.interpreter.args_iter = iter(example_inputs)
        self.example_inputs = example_inputs
        self.env: Dict[fx.Node, Any] = self.interpreter.env
        self.done = set()  # nodes already run (their values may be freed)
        self.keep = set()  # nodes whose values are never freed
        self.seeded: Dict[fx.Node, Tuple[Any, int]] = {}  # nodes not yet run whose value the pass computed
        self.cursor: Optional[fx.Node] = None  # the last node run; None before the first
        self.node_flops: Dict[fx.Node, int] = {}  # FLOPs counted in each node's run (their sum: the graph's)
        self.state = _SavedState()
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> "IncrementalRun":
        self.stack.enter_context(torch.no_grad())
        self.state.save(_state_of(self.gm, self.example_inputs))
        self.stack.callback(self.state.restore)
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()

    def _advance(self, stop: Optional[fx.Node]) -> None:
        """Runs the nodes after the cursor up to ``stop`` (included), or to the graph's output when None."""
        root = self.gm.graph._root
        counter = FlopCounterMode(display=False)
        counted = 0
        with counter:
            node = self.cursor.next if self.cursor is not None else root.next
            while node is not root:
                if node in self.seeded:
                    result, self.node_flops[node] = self.seeded.pop(node)
                else:
                    if node.op == "call_module":  # its buffers, before it may change them (new modules included)
                        self.state.save(self.gm.get_submodule(node.target).buffers())
                    result = self.interpreter.run_node(node)
                    if node.op == "get_attr" and isinstance(result, torch.Tensor):
                        self.state.save([result])  # a buffer the pass added, which a functional BatchNorm may update
                    total = counter.get_total_flops()
                    self.node_flops[node], counted = total - counted, total
                _record_meta(node, result)
                self.env[node] = result
                self.done.add(node)
                self.cursor = node
                for used in node.all_input_nodes:
                    if used in self.env and used not in self.keep and all(u in self.done for u in used.users):
                        del self.env[used]
                if node is stop:
                    break
                node = node.next
        if stop is not None and stop not in self.done:
            raise RuntimeError(f"fxeff.passes.measure.IncrementalRun: {stop.name!r} is not after the nodes already "
                               f"run: a rewrite inserted it before them (rewrites must go in graph order)")

    def seed(self, node: fx.Node, value: Any, flops: int) -> None:
        """Gives a node that has not run yet the value (and FLOP count) the pass already computed for it, such
        as a rewritten layer's output on the input it sees: the run takes it instead of computing it again."""
        if node in self.done:
            raise RuntimeError(f"fxeff.passes.measure.IncrementalRun: {node.name!r} has run already")
        self.seeded[node] = (value, int(flops))

    def value(self, node: fx.Node) -> Any:
        """``node``'s value in the graph as rewritten up to now (``node`` must be at or after every node the
        rewrites since the last call touched, which holds for a site's input when sites go in graph order)."""
        if node not in self.done:
            self._advance(node)
        if node not in self.env:
            raise RuntimeError(f"fxeff.passes.measure.IncrementalRun: the value of {node.name!r} was freed: all its "
                               f"users had run")
        return self.env[node]

    def finish(self, keep: Collection[fx.Node]) -> Tuple[int, Dict[fx.Node, Any]]:
        """Runs the rest of the graph: (FLOPs of the whole final graph, values of ``keep``: nodes that have not
        run yet or whose values are still held, such as the graph's outputs)."""
        self.keep.update(keep)
        missing = [n.name for n in keep if n in self.done and n not in self.env]
        if missing:
            raise RuntimeError(f"fxeff.passes.measure.IncrementalRun: the values of {missing} were freed already")
        self._advance(None)
        return int(sum(self.node_flops.values())), {node: self.env[node] for node in keep}
