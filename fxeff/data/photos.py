"""Real photos that ship with scikit-image (no download) and their preparation as model inputs.

The photos are the RGB pictures of ``skimage.data`` that load offline: people, animals, objects,
scenes and two microscopy / sky images. They give the focus pass real AoIs (objects on backgrounds)
where random tensors would give noise.
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..models import Preprocessing


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()
    return load


def _motorcycle() -> np.ndarray:
    import skimage.data

    left, _right, _disparity = skimage.data.stereo_motorcycle()
    return left


# Name -> loader of an HxWx3 uint8 photo; in this order the natural photos come first.
PHOTOS: Dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "chelsea": _skimage("chelsea"),
    "coffee": _skimage("coffee"),
    "rocket": _skimage("rocket"),
    "motorcycle": _motorcycle,
    "hubble_deep_field": _skimage("hubble_deep_field"),
    "immunohistochemistry": _skimage("immunohistochemistry"),
    "retina": _skimage("retina"),
}


def photos(names: Optional[Sequence[str]] = None) -> List[Tuple[str, np.ndarray]]:
    """(name, HxWx3 uint8 RGB array) for each photo in ``names`` (default: all of PHOTOS, in order)."""
    if names is None:
        names = list(PHOTOS)
    if isinstance(names, str):
        raise TypeError(f"fxeff.data.photos: names must be a sequence of names, got the str {names!r}")
    unknown = [n for n in names if n not in PHOTOS]
    if unknown:
        raise ValueError(f"fxeff.data.photos: unknown photo(s) {unknown}; expected names from {list(PHOTOS)}")
    try:
        import skimage.data  # noqa: F401
    except ImportError as error:
        raise ImportError(f"fxeff.data.photos: the photos come from scikit-image (pip install scikit-image): "
                          f"{error}") from error
    out = []
    for name in names:
        image = np.ascontiguousarray(PHOTOS[name]())
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise RuntimeError(f"fxeff.data.photos: {name!r} must load as HxWx3 uint8, got {image.shape} "
                               f"{image.dtype} (scikit-image changed its data?)")
        out.append((name, image))
    return out


def center_crop(image: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    """``image`` (HxWx3 uint8) resized so its shorter side is ``preprocessing.resize`` (bilinear,
    antialiased, as torchvision's ImageClassification does on PIL images) and centre-cropped to
    ``crop`` x ``crop``: the pixels the model sees, before normalisation."""
    from PIL import Image

    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = f"{image.shape} {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"fxeff.data.center_crop: image must be an HxWx3 uint8 array, got {got}")
    h, w = image.shape[:2]
    scale = preprocessing.resize / min(h, w)
    size = (max(preprocessing.crop, round(w * scale)), max(preprocessing.crop, round(h * scale)))
    resized = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    top = (resized.shape[0] - preprocessing.crop) // 2
    left = (resized.shape[1] - preprocessing.crop) // 2
    return np.ascontiguousarray(resized[top:top + preprocessing.crop, left:left + preprocessing.crop])


def normalize(crops: Sequence[np.ndarray], preprocessing: Preprocessing) -> torch.Tensor:
    """float32 batch [N, 3, crop, crop] from HxWx3 uint8 crops: scaled to [0, 1], then (x - mean) / std."""
    batch = torch.from_numpy(np.stack(list(crops))).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std).view(1, 3, 1, 1)
    return ((batch - mean) / std).contiguous()


def to_batch(images: Sequence[np.ndarray], preprocessing: Preprocessing) -> Tuple[torch.Tensor, List[np.ndarray]]:
    """(normalised batch [N, 3, crop, crop], the uint8 crops it was made from) for HxWx3 uint8 images.
    The crops are what ``fxeff.focus.render`` draws the AoI on."""
    crops = [center_crop(image, preprocessing) for image in images]
    return normalize(crops, preprocessing), crops


__all__ = ["PHOTOS", "photos", "center_crop", "normalize", "to_batch"]
