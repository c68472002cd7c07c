"""Pure-PyTorch reference of the focus semantics, independent of fxeff's pass and ops.

The focused model equals the original model in which the output of every conv that runs after
the split module is multiplied by the AoI mask resized to that conv's output grid, where
mask = reduce(split_output, dim=1) >= threshold, and resizing is "any" over the cells
[floor(i*in/out), ceil((i+1)*in/out)) when shrinking and nearest (floor(i*in/out)) when growing.
"""
import contextlib

import torch
from torch import nn


def aoi_mask_reference(x: torch.Tensor, threshold: float, reduce: str = "sum") -> torch.Tensor:
    r = x.sum(dim=1) if reduce == "sum" else x.mean(dim=1)
    return r >= threshold


def _cells(size_in: int, size_out: int) -> torch.Tensor:
    """[out, in] bool: which input indices feed each output index along one dimension."""
    cover = torch.zeros(size_out, size_in, dtype=torch.bool)
    for i in range(size_out):
        begin = (i * size_in) // size_out
        end = -((-(i + 1) * size_in) // size_out) if size_out <= size_in else begin + 1
        cover[i, begin:end] = True
    return cover


def mask_resize_reference(mask: torch.Tensor, size) -> torch.Tensor:
    rows = _cells(mask.shape[1], size[0]).to(torch.float64)
    cols = _cells(mask.shape[2], size[1]).to(torch.float64)
    return (rows @ mask.to(torch.float64) @ cols.T) > 0


@contextlib.contextmanager
def focused_reference(model: nn.Module, split: str, threshold: float, reduce: str = "sum", unfocused=()):
    """Within the block, ``model`` computes the focus semantics; yields the list of masks seen (one per forward).

    ``unfocused``: fqns of Conv2d modules that stay dense (convs the pass must refuse).
    """
    state = {"mask": None}
    masks = []
    convs = (nn.Conv2d,)

    def on_split(module, args, out):
        state["mask"] = aoi_mask_reference(out, threshold, reduce)
        masks.append(state["mask"])

    split_module = model.get_submodule(split)

    def on_conv(module, args, out):
        if state["mask"] is None or module is split_module:  # the split and before: unchanged
            return out
        mask = mask_resize_reference(state["mask"], out.shape[-2:])
        return out * mask[:, None].to(out.dtype)

    def on_start(module, args):
        state["mask"] = None

    handles = [model.register_forward_pre_hook(on_start), split_module.register_forward_hook(on_split)]
    handles += [m.register_forward_hook(on_conv) for name, m in model.named_modules()
                if isinstance(m, convs) and name not in unfocused]
    try:
        yield masks
    finally:
        for h in handles:
            h.remove()


def threshold_for_fraction(model: nn.Module, split: str, x: torch.Tensor, fraction: float,
                           reduce: str = "sum") -> float:
    """The threshold that leaves about ``fraction`` of the split's pixels active on x (a quantile of the channel sum)."""
    seen = {}

    def on_split(module, args, out):  # returns None: the output stays as it is
        seen["r"] = (out.sum(1) if reduce == "sum" else out.mean(1)).detach().clone()

    handle = model.get_submodule(split).register_forward_hook(on_split)
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return float(torch.quantile(seen["r"].flatten().double(), 1.0 - fraction))
