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


def dilate_reference(mask: torch.Tensor, halo: int) -> torch.Tensor:
    """mask grown by ``halo`` pixels in each direction (a pixel is in if any pixel within halo is), by shifting."""
    out = mask.clone()
    h, w = mask.shape[-2:]
    for dy in range(-halo, halo + 1):
        for dx in range(-halo, halo + 1):
            if abs(dy) >= h or abs(dx) >= w:
                continue  # shifted off the mask entirely
            shifted = torch.zeros_like(mask)
            shifted[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
                mask[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
            out |= shifted
    return out


@contextlib.contextmanager
def focused_reference(model: nn.Module, split: str, threshold: float, reduce: str = "sum", unfocused=(), fills=None,
                      halo: int = 0):
    """Within the block, ``model`` computes the focus semantics; yields the list of masks seen (one per forward).

    ``unfocused``: fqns of Conv2d modules that stay dense (convs the pass must refuse). ``fills``: {conv fqn:
    per-channel values [C]} put outside the AoI instead of 0 (Focus(fill="mean")).
    """
    state = {"mask": None}
    masks = []
    convs = (nn.Conv2d,)

    def on_split(module, args, out):
        state["mask"] = dilate_reference(aoi_mask_reference(out, threshold, reduce), halo)
        masks.append(state["mask"])

    split_module = model.get_submodule(split)

    names = {m: name for name, m in model.named_modules()}

    def on_conv(module, args, out):
        if state["mask"] is None or module is split_module:  # the split and before: unchanged
            return out
        mask = mask_resize_reference(state["mask"], out.shape[-2:])[:, None]
        fill = (fills or {}).get(names[module])
        if fill is None:
            return out * mask.to(out.dtype)
        return torch.where(mask, out, fill.to(out.dtype).view(1, -1, 1, 1))

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


def outside_means(model: nn.Module, split: str, threshold: float, x: torch.Tensor, convs, reduce: str = "sum"):
    """{conv fqn: per-channel mean of the ORIGINAL model's conv output outside the AoI on x} (Focus(fill="mean"))."""
    seen = {}
    handles = [model.get_submodule(split).register_forward_hook(
        lambda m, a, out: seen.__setitem__("mask", aoi_mask_reference(out, threshold, reduce)))]
    for name in convs:
        handles.append(model.get_submodule(name).register_forward_hook(
            lambda m, a, out, name=name: seen.__setitem__(name, out.detach().double())))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    means = {}
    for name in convs:
        out = seen[name]
        outside = ~mask_resize_reference(seen["mask"], out.shape[-2:])[:, None]
        means[name] = (out * outside).sum(dim=(0, 2, 3)) / outside.sum()
    return means


def fixed_layer_times(monkeypatch, slower=()):
    """Focus(execution="auto")'s per-conv timing (Planner.layer_times) replaced by fixed timings, so that its
    decisions do not depend on this machine: every conv measures 100x faster focused (so per layer beats tiles),
    except the module names in ``slower``, which measure 2x slower. Its end-to-end check of the whole plan
    measures the plan faster than dense."""
    from fxeff.passes import focus
    from fxeff.passes.regions import Planner

    def fixed(self, convs, mask):
        return {c: (1.0, 2.0 if self.sites[c].module_fqn in slower else 0.01) for c in convs}

    monkeypatch.setattr(Planner, "layer_times", fixed)
    monkeypatch.setattr(focus, "_slower_than_before", lambda gm, before, context, plan_batch, batch: None)
