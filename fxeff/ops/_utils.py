"""Small helpers shared by the Python faces of fxeff's ops."""
from typing import Sequence, Union

import torch

IntPair = Union[int, Sequence[int]]


def pair(name: str, op: str, value: IntPair) -> list:
    """Normalises an int or a 2-sequence into [a, b], with an error naming the op and argument."""
    if isinstance(value, int):
        return [value, value]
    value = list(value)
    if len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ValueError(f"fxeff.{op}: {name} must be an int or 2 ints, got {value!r}")
    return value


def conv_memory_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The output format ATen's convolutions pick (and fxeff's conv kernels keep): channels_last if x or the weight
    suggests it, else contiguous (C++: conv_output_format)."""
    if torch.channels_last in (memory_format_of(x), memory_format_of(weight)):
        return torch.channels_last
    return torch.contiguous_format


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The memory format ATen's suggest_memory_format picks for x (kernels keep it for outputs)."""
    from torch._prims_common import suggest_memory_format

    return suggest_memory_format(x)
