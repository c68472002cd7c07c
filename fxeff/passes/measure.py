"""Running a graph on its example inputs to learn shapes, values and FLOPs, without side effects.

Passes need shapes (a symbolic_trace graph carries none), and reports need MACs counted by
torch.utils.flop_counter.FlopCounterMode and, for the focus pass, the AoI actually seen. The run
happens under no_grad and restores every buffer and non-parameter input afterwards, so a model in
training mode does not get its BatchNorm statistics updated by fxeff looking at it.
"""
import contextlib
from typing import Any, Collection, Dict, Iterator, Optional, Sequence, Tuple

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


@contextlib.contextmanager
def preserved_state(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Iterator[None]:
    """Restores gm's buffers and every non-Parameter tensor input to their values on exit."""
    saved = []
    tensors = [b for b in gm.buffers()] + [x for x in example_inputs
                                           if isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter)]
    seen = set()
    for t in tensors:
        if id(t) in seen or isinstance(t, FakeTensor):
            continue
        seen.add(id(t))
        saved.append((t, t.detach().clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for t, copy in saved:
                if t.shape == copy.shape:
                    t.copy_(copy)


class _Recorder(fx.Interpreter):
    """Runs the graph, stores a meta-device copy of each tensor value in node.meta and keeps chosen values."""

    def __init__(self, gm: fx.GraphModule, keep: Collection[fx.Node]):
        super().__init__(gm)
        self.keep = set(keep)
        self.kept: Dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta[VALUE_KEY] = torch.empty(result.shape, dtype=result.dtype, device="meta")
        if n in self.keep:
            self.kept[n] = result
        return result


def run_recording(gm: fx.GraphModule, example_inputs: Sequence[Any],
                  keep: Collection[fx.Node] = ()) -> Tuple[int, Dict[fx.Node, Any]]:
    """Runs gm on the example inputs: returns (FLOPs counted by FlopCounterMode, values of ``keep``).

    Every tensor-valued node gets ``meta["fxeff_val"]`` (a meta-device tensor with its shape and
    dtype). Fake inputs run under their FakeTensorMode (real parameters are treated as constants).
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
        stack.enter_context(counter)
        recorder.run(*example_inputs)
    return int(counter.get_total_flops()), recorder.kept
