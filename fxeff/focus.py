"""Choosing the AoI threshold for a model and looking at the AoI it gives.

``calibrate`` finds the threshold of ``fxeff.passes.Focus`` that makes the AoI cover a wanted
fraction of the image on sample inputs; ``aoi_masks`` gives the masks a threshold yields (what the
focused model computes in its graph); ``render`` draws a mask over its image as a PNG.
"""
import math
from typing import Iterable, List, Optional, Union

import numpy as np
import torch

from . import ops as fxeff_ops
from .nn.focus import REDUCES
from .passes.layout import ChannelAxes, channels_first_error
from .passes.splits import default_split, no_split_message

Images = Union[torch.Tensor, Iterable[torch.Tensor]]


class _ReachedSplit(Exception):
    """Raised by the forward hook to stop the model once the split's output is captured."""


def resolve_split(model: torch.nn.Module, split: Optional[str], caller: str) -> str:
    """``split`` checked to name a submodule of ``model``, or the family's default when None."""
    if split is None:
        split = default_split(model)
        if split is None:
            convs = [fqn for fqn, m in model.named_modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
            raise ValueError(no_split_message(f"fxeff.focus.{caller}", type(model).__name__, convs))
    if not isinstance(split, str) or not split:
        raise ValueError(f"fxeff.focus.{caller}: split must be a module fqn (non-empty str), got {split!r}")
    try:
        model.get_submodule(split)
    except AttributeError:
        raise ValueError(f"fxeff.focus.{caller}: split {split!r} names no module of {type(model).__name__}") from None
    return split


def _batches(images: Images, caller: str) -> List[torch.Tensor]:
    batches = [images] if isinstance(images, torch.Tensor) else list(images)
    if not batches:
        raise ValueError(f"fxeff.focus.{caller}: images is empty")
    for b in batches:
        if not isinstance(b, torch.Tensor) or b.dim() != 4 or b.shape[0] == 0:
            got = f"{tuple(b.shape)}" if isinstance(b, torch.Tensor) else type(b).__name__
            raise ValueError(f"fxeff.focus.{caller}: images must be a tensor [N, C, H, W] or an iterable of them "
                             f"(N >= 1), got {got}")
    return batches


def split_activations(model: torch.nn.Module, images: Images, split: Optional[str] = None) -> List[torch.Tensor]:
    """The output of module ``split`` (default: the family's) for each batch of ``images``, one tensor
    [N, C, H, W] per batch. The model runs without grad only up to the split (its first call)."""
    split = resolve_split(model, split, "split_activations")
    module = model.get_submodule(split)
    captured: List[torch.Tensor] = []

    def hook(_module, _inputs, output):
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            got = f"{tuple(output.shape)}" if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(f"fxeff.focus.split_activations: split {split!r} must output a 4-D activation "
                             f"[N, C, H, W], got {got}")
        wrong_axis = channels_first_error("fxeff.focus.split_activations", f"the output of split {split!r}",
                                          axes.of(output), output.shape)
        if wrong_axis:
            raise ValueError(wrong_axis)
        captured.append(output.detach())
        raise _ReachedSplit

    outputs = []
    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for batch in _batches(images, "split_activations"):
                axes = ChannelAxes([batch])  # which axis of the split's output holds the channels
                try:
                    with axes:
                        model(batch)
                except _ReachedSplit:
                    pass
                if not captured:
                    raise RuntimeError(f"fxeff.focus.split_activations: the forward of {type(model).__name__} "
                                       f"never called the split module {split!r}")
                outputs.append(captured.pop())
    finally:
        handle.remove()
    return outputs


def reduce_channels(activation: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """[N, H, W]: ``activation`` reduced over channels exactly as ``fxeff.ops.aoi_mask`` reduces it
    (same reduction, accumulated in float32, or float64 for float64 inputs), so thresholds carry over."""
    if reduce not in REDUCES:
        raise ValueError(f"fxeff.focus.reduce_channels: reduce must be one of {REDUCES}, got {reduce!r}")
    acc = torch.float64 if activation.dtype == torch.float64 else torch.float32
    return activation.sum(1, dtype=acc) if reduce == "sum" else activation.mean(1, dtype=acc)


def calibrate(model: torch.nn.Module, images: Images, target_fraction: float, split: Optional[str] = None,
              reduce: str = "sum") -> float:
    """The threshold whose mean AoI fraction over ``images`` is ``target_fraction``.

    ``images``: a batch [N, C, H, W] or an iterable of batches (sizes may differ: every image weighs
    the same in the mean). The AoI of an image is ``reduce(split activation, dim=1) >= threshold``,
    as ``Focus(threshold, split, reduce)`` computes it. The threshold returned is the largest reduced
    value ``t`` whose mean fraction of pixels ``>= t`` reaches ``target_fraction``: with distinct
    values that is the target rounded up to the next pixel (error < 1 / pixels of one image); tied
    values enter or leave the AoI together, so with ties the fraction can exceed the target by the
    ties' share. Target 0 gives a threshold just above the largest value (an empty AoI); NaN
    activations are never in the AoI (aoi_mask compares them false).
    """
    if isinstance(target_fraction, bool) or not isinstance(target_fraction, (int, float)) or \
            not 0.0 <= target_fraction <= 1.0:
        raise ValueError(f"fxeff.focus.calibrate: target_fraction must be a number in [0, 1], got {target_fraction!r}")
    if reduce not in REDUCES:
        raise ValueError(f"fxeff.focus.calibrate: reduce must be one of {REDUCES}, got {reduce!r}")
    split = resolve_split(model, split, "calibrate")
    values, weights = [], []
    n_images = 0
    for activation in split_activations(model, images, split):
        reduced = reduce_channels(activation, reduce)
        n, h, w = reduced.shape
        n_images += n
        values.append(reduced.reshape(-1).double())
        weights.append(torch.full((n * h * w,), 1.0 / (h * w), dtype=torch.float64))
    values, weights = torch.cat(values), torch.cat(weights) / n_images
    finite_or_inf = ~torch.isnan(values)
    values, weights = values[finite_or_inf], weights[finite_or_inf]
    if target_fraction == 0:
        return _next_float32_up(float(values.max())) if values.numel() else 0.0
    if values.numel() == 0:
        raise ValueError(f"fxeff.focus.calibrate: target_fraction {target_fraction} is unreachable: every "
                         f"activation at split {split!r} is NaN")
    order = torch.argsort(values, descending=True, stable=True)
    values, covered = values[order], torch.cumsum(weights[order], 0)
    reachable = float(covered[-1])
    # Tolerance for the cumulative sum's rounding: 1e-9 is far below one pixel's weight.
    k = int(torch.searchsorted(covered, torch.tensor([target_fraction - 1e-9], dtype=torch.float64)))
    if k >= values.numel():  # only when NaNs removed part of the pixels
        raise ValueError(f"fxeff.focus.calibrate: target_fraction {target_fraction} is unreachable: only "
                         f"{reachable:.4f} of the pixels have a non-NaN activation at split {split!r}")
    return float(values[k])


def _next_float32_up(value: float) -> float:
    """The smallest float32 above ``value`` (aoi_mask compares in float32)."""
    if math.isinf(value):
        return value
    as32 = np.float32(value)
    return float(np.nextafter(as32, np.float32(np.inf)))


def aoi_masks(model: torch.nn.Module, images: Images, threshold: float, split: Optional[str] = None,
              reduce: str = "sum") -> List[torch.Tensor]:
    """bool [N, H, W] at the split's resolution for each batch of ``images``: the AoI that
    ``Focus(threshold, split, reduce)`` computes in the transformed model (fxeff.ops.aoi_mask)."""
    return [fxeff_ops.aoi_mask(a, threshold, reduce) for a in split_activations(model, images, split)]


# ---------------------------------------------------------------- rendering

_OUTLINE_RGB = np.array([255, 214, 0], dtype=np.float32)  # amber: visible on photos and on the dimmed rest
_OUTSIDE_BRIGHTNESS = 0.3


def _image_to_uint8(image: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    """HxWx3 uint8 from an HxWx3 uint8 array or a CHW float tensor/array (values in [0, 1] kept,
    anything else, e.g. a normalised input, rescaled by its min and max)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(f"fxeff.focus.render: a tensor image must be float CHW [3, H, W], got "
                             f"{tuple(image.shape)} {image.dtype}")
        image = image.float().permute(1, 2, 0).numpy()
    elif isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[0] == 3 and image.shape[2] != 3 and \
            np.issubdtype(image.dtype, np.floating):
        image = image.transpose(1, 2, 0)
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.shape} {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"fxeff.focus.render: image must be HxWx3 uint8 or a float CHW [3, H, W] tensor, got {got}")
    if image.dtype == np.uint8:
        return image
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"fxeff.focus.render: an HxWx3 image must be uint8 (or float), got {image.dtype}")
    lo, hi = float(np.nanmin(image)), float(np.nanmax(image))
    if lo < 0.0 or hi > 1.0:
        image = (image - lo) / (hi - lo if hi > lo else 1.0)
    return (np.nan_to_num(image) * 255.0 + 0.5).clip(0, 255).astype(np.uint8)


def _mask_to_2d(mask: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2 or array.dtype != np.bool_:
        raise ValueError(f"fxeff.focus.render: mask must be bool [h, w] (or [1, h, w]), got {array.shape} "
                         f"{array.dtype}")
    return array


def upsample_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """bool [height, width]: each pixel takes the mask cell it falls in (nearest, cell-aligned)."""
    rows = (np.arange(height) * mask.shape[0]) // height
    cols = (np.arange(width) * mask.shape[1]) // width
    return mask[rows[:, None], cols[None, :]]


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of the AoI within ``width`` pixels of a non-AoI pixel (the AoI's inner border)."""
    inside = mask.copy()
    padded = np.pad(mask, width, mode="edge")
    h, w = mask.shape
    for dy in range(-width, width + 1):
        for dx in range(-width, width + 1):
            inside &= padded[width + dy:width + dy + h, width + dx:width + dx + w]
    return mask & ~inside


def render(image: Union[np.ndarray, torch.Tensor], mask: Union[np.ndarray, torch.Tensor], path: str,
           title: Optional[str] = None) -> str:
    """Writes a PNG of ``image`` beside its AoI: in the right half the AoI keeps full colour while the
    rest is dimmed to 30% and tinted grey-blue; AoI cells of 4+ pixels also get an amber outline.
    ``title`` (default: the AoI fraction) goes in the top-left corner.

    ``image``: HxWx3 uint8, or a float CHW [3, H, W] tensor (see _image_to_uint8). ``mask``: bool
    [h, w] at any resolution, upsampled nearest to HxW. Returns ``path``.
    """
    from PIL import Image, ImageDraw

    rgb = _image_to_uint8(image)
    height, width = rgb.shape[:2]
    cells = _mask_to_2d(mask)
    aoi = upsample_nearest(cells, height, width)
    out = rgb.astype(np.float32)
    grey = out.mean(axis=2, keepdims=True)
    dimmed = (0.5 * grey + 0.5 * out) * _OUTSIDE_BRIGHTNESS + np.array([0, 10, 30], dtype=np.float32)
    out = np.where(aoi[..., None], out, dimmed)
    cell_pixels = min(height / cells.shape[0], width / cells.shape[1])
    if cell_pixels >= 4:  # finer cells would be all outline
        out[_outline(aoi, max(1, round(min(height, width) / 200)))] = _OUTLINE_RGB
    gap = np.full((height, max(2, width // 50), 3), 255, dtype=np.uint8)
    picture = Image.fromarray(np.concatenate([rgb, gap, out.clip(0, 255).astype(np.uint8)], axis=1))
    if title is None:
        title = f"AoI {aoi.mean():.1%}"
    if title:
        draw = ImageDraw.Draw(picture)
        left, top, right, bottom = draw.textbbox((4, 4), title)
        draw.rectangle((left - 3, top - 3, right + 3, bottom + 3), fill=(0, 0, 0))
        draw.text((4, 4), title, fill=(255, 255, 255))
    picture.save(path, format="PNG")
    return path


__all__ = ["calibrate", "aoi_masks", "split_activations", "reduce_channels", "resolve_split", "render",
           "upsample_nearest"]
