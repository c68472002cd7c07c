"""Which axis of an activation holds the channels, followed through a real run of the model.

The AoI is ``reduce(split_activation, dim=1) >= threshold``: axis 1 must be the channels. A 4-D activation
does not say so itself: Swin's patch embedding permutes to [N, H, W, C], ConvNeXt's blocks permute to
channels-last around their LayerNorm and Linear layers and back. ``ChannelAxes`` watches every torch
function of a run (a TorchFunctionMode, so it sees the ops inside modules and the ops of symbolic, dynamo
and export graphs alike) and labels each tensor with the axes of the model's input or of the last conv
that its axes are: a conv's output is [N, C, *spatial]; permute, transpose, swapaxes and movedim move the
labels; an op whose output has its input's rank keeps them (elementwise ops, norms, Linear on the last
axis, pooling, concat); a reshape to another shape or a change of rank loses them (unknown) until the next
conv. ``channels_first_error`` says why an activation must not be reduced over axis 1.
"""
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

Axes = Tuple[int, ...]  # position i holds axis Axes[i] of [N, C, *spatial]: (0, 1, 2, 3) is channels-first

_CONVS = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d", "conv_transpose2d",
          "conv_transpose3d", "focused_conv2d", "hetconv2d"}
_RESHAPES = {"view", "_unsafe_view", "reshape", "view_as", "reshape_as", "flatten", "unflatten", "_reshape_alias",
             "view_copy", "squeeze", "unsqueeze", "squeeze_", "unsqueeze_"}
_PERMUTES = {"permute", "permute_copy"}
_TRANSPOSES = {"transpose", "transpose_", "swapaxes", "swapaxes_", "swapdims", "swapdims_", "transpose_copy"}
_MOVEDIMS = {"movedim", "moveaxis"}
# ops that move data between axes in ways not followed here: their outputs' layout is unknown
_UNFOLLOWED = {"einsum", "mT", "mH", "T", "H", "t", "adjoint", "as_strided", "unfold", "tensordot", "rot90",
               "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle"}


def _name(func: Any) -> str:
    if isinstance(func, torch._ops.OpOverload):
        return func.overloadpacket.__name__
    return getattr(func, "__name__", "")


def _tensors(value: Any) -> List[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _dims(args: Sequence[Any], kwargs: dict, key: str) -> List[int]:
    """permute's dims, given as varargs (x.permute(0, 2, 3, 1)), a list or a keyword."""
    if key in kwargs:
        dims = kwargs[key]
    elif len(args) == 2 and isinstance(args[1], (list, tuple, torch.Size)):
        dims = args[1]
    else:
        dims = args[1:]
    return [int(d) for d in dims]


def _reshaped(axes: Axes, before: Sequence[int], after: Sequence[int]) -> Optional[Axes]:
    """The axes of a reshape from shape ``before`` to ``after``: the leading and trailing dims it keeps keep
    their axes, and the dims between (split or merged) keep theirs when they all belonged to one axis, as in
    ShuffleNet's channel shuffle (C -> (groups, C / groups) -> C); None otherwise."""
    lead = 0
    while lead < min(len(before), len(after)) and before[lead] == after[lead]:
        lead += 1
    trail = 0
    while trail < min(len(before), len(after)) - lead and before[-1 - trail] == after[-1 - trail]:
        trail += 1
    middle = set(axes[lead:len(before) - trail])
    if len(middle) > 1 or (not middle and len(before) != len(after)):
        return None
    fill = list(middle) * (len(after) - lead - trail)
    return tuple(axes[:lead]) + tuple(fill) + tuple(axes[len(before) - trail:])


def _moved(axes: Axes, source: Any, destination: Any) -> Axes:
    rank = len(axes)
    source = [s % rank for s in ([source] if isinstance(source, int) else source)]
    destination = [d % rank for d in ([destination] if isinstance(destination, int) else destination)]
    rest = [axes[i] for i in range(rank) if i not in source]
    out: List[Optional[int]] = [None] * rank
    for s, d in zip(source, destination):
        out[d] = axes[s]
    it = iter(rest)
    return tuple(a if a is not None else next(it) for a in out)


class ChannelAxes(TorchFunctionMode):
    """A TorchFunctionMode labelling each tensor of a run with its axes (see the module docstring).

    Use: ``with ChannelAxes(inputs) as axes: run(...)``, then ``axes.of(tensor)``: the Axes of a tensor the
    run produced (or of an input, [N, C, *spatial] by convention), None when a reshape lost them.
    """

    def __init__(self, inputs: Iterable[Any] = ()):
        super().__init__()
        self.axes = WeakIdKeyDictionary()
        for x in _tensors(list(inputs)):
            self.axes[x] = tuple(range(x.dim()))

    def of(self, tensor: torch.Tensor) -> Optional[Axes]:
        return self.axes.get(tensor)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            self._label(_name(func), args, kwargs, out)
        except (TypeError, ValueError, IndexError, StopIteration):  # arguments of a form not followed: unknown
            pass
        return out

    @staticmethod
    def _moved_axes(name: str, source: Axes, args: Sequence[Any], kwargs: dict) -> Axes:
        """The axes after a permute, transpose or movedim of a tensor with axes ``source``."""
        if name in _PERMUTES:
            return tuple(source[d % len(source)] for d in _dims(args, kwargs, "dims"))
        if name in _TRANSPOSES:
            d0, d1 = (int(a) % len(source) for a in (list(args[1:3]) + [kwargs.get("dim0"), kwargs.get("dim1")])[:2])
            swapped = list(source)
            swapped[d0], swapped[d1] = swapped[d1], swapped[d0]
            return tuple(swapped)
        src = args[1] if len(args) > 1 else kwargs["source"]
        dst = args[2] if len(args) > 2 else kwargs["destination"]
        return _moved(source, src, dst)

    def _label(self, name: str, args: Sequence[Any], kwargs: dict, out: Any) -> None:
        outputs = _tensors(out)
        if not outputs:
            return
        if name in _CONVS:
            self.axes[outputs[0]] = tuple(range(outputs[0].dim()))
            return
        x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("input", kwargs.get("self"))
        source = self.axes.get(x) if isinstance(x, torch.Tensor) else None
        if name in _UNFOLLOWED:
            return
        if name in _PERMUTES or name in _TRANSPOSES or name in _MOVEDIMS:  # moves axes: followed when known
            if source is not None:
                self.axes[outputs[0]] = self._moved_axes(name, source, args, kwargs)
            return
        if name in _RESHAPES:  # keeps the axes of the dims it keeps, and of a split or merged axis
            axes = _reshaped(source, list(x.shape), list(outputs[0].shape)) if source is not None else None
            if axes is not None:
                self.axes[outputs[0]] = axes
            return
        if source is None or x.dim() != outputs[0].dim():
            candidates = [t for t in _tensors(list(args) + list(kwargs.values())) if t in self.axes]
            source = next((self.axes[t] for t in candidates if t.dim() == outputs[0].dim()), None)
        if source is None:
            return
        for t in outputs:
            if t.dim() == len(source):
                self.axes[t] = source


def channels_first_error(where: str, what: str, axes: Optional[Axes], shape: Sequence[Any]) -> Optional[str]:
    """Why the activation ``what`` (its Axes and shape) must not be reduced over axis 1 as channels, or None."""
    if axes is not None and len(axes) == len(shape) and axes[1] == 1:
        return None
    if axes is None:
        return (f"{where}: cannot tell which axis of {what} [shape {tuple(shape)}] holds the channels: an op between "
                f"the model's input (or its last conv) and it moves data between axes in a way fxeff does not "
                f"follow (a reshape that mixes channels with other axes, einsum, ...). The AoI reduces over axis 1 "
                f"and needs a channels-first [N, C, H, W] activation: take the split at a conv's output, or where "
                f"only elementwise ops, norms and pooling follow a conv")
    names = ["N", "C"] + (["H", "W"] if len(axes) == 4 else [f"S{i}" for i in range(len(axes) - 2)])
    layout = ", ".join(names[a] for a in axes)
    where_c = f"on axis {axes.index(1)}" if 1 in axes else "nowhere (merged into another axis)"
    return (f"{where}: {what} [shape {tuple(shape)}] is [{layout}]: its channels are {where_c} (a permute or "
            f"transpose after the last conv), and the AoI would reduce over axis 1, which holds {names[axes[1]]}. "
            f"Take the split where the activation is channels-first [N, C, H, W], e.g. at a conv's output or "
            f"after the permute back")
