"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, and Cluttered Fashion-MNIST made from it.

Nothing is downloaded: the four idx files come from the package (``apt-get install dataset-fashion-mnist``
puts them in /usr/share/datasets/fashion-mnist); ``FXEFF_FASHION_MNIST_DIR`` or ``root=`` points elsewhere.
Cluttered Fashion-MNIST puts each 28x28 item at a random place on a larger canvas among fragments cut
from other items of the same split, deterministically from (seed, split, index): the benchmark where
the background really is irrelevant, the home ground of focused convolution and glance-and-focus.
"""
import functools
import gzip
import os
import struct
from typing import Optional, Tuple

import numpy as np
import torch

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Mean and standard deviation of the training images scaled to [0, 1] (fashion_mnist_arrays("train")).
MEAN, STD = 0.2860, 0.3530
# The normalised value halfway between black and 1/255: every pixel of an item or of clutter is above it, the flat
# background is below (the AoI threshold of focus at the input split).
BACKGROUND = (0.5 / 255 - MEAN) / STD
SPLITS = ("train", "test")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
_INSTALL = "apt-get install dataset-fashion-mnist (Debian), or set FXEFF_FASHION_MNIST_DIR to a folder holding them"


def _check_split(split: str, caller: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"fxeff.data.{caller}: split must be one of {SPLITS}, got {split!r}")


def _read_idx(path: str) -> np.ndarray:
    """The array of an idx file (gzip-compressed or not): magic 0x0000 0x08 (uint8) ndim, then ndim
    big-endian int32 sizes, then the bytes."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"fxeff.data.fashion_mnist_arrays: {path} is not a uint8 idx file "
                         f"(magic {raw[:4].hex()}, expected 0000 08 <ndim>)")
    shape = struct.unpack(f">{ndim}i", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"fxeff.data.fashion_mnist_arrays: {path} holds {data.size} bytes for shape {shape}")
    return data.reshape(shape)


def data_dir(root: Optional[str] = None) -> str:
    """The folder with Fashion-MNIST's idx files: ``root``, else $FXEFF_FASHION_MNIST_DIR, else the package's."""
    return root or os.environ.get("FXEFF_FASHION_MNIST_DIR") or DEFAULT_DIR


@functools.lru_cache(maxsize=4)
def fashion_mnist_arrays(split: str = "train", root: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of a split: N = 60000 (train) or 10000 (test)."""
    _check_split(split, "fashion_mnist_arrays")
    folder = data_dir(root)
    paths = [os.path.join(folder, name) for name in _FILES[split]]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"fxeff.data.fashion_mnist_arrays: Fashion-MNIST's {split} files are missing "
                                f"({', '.join(missing)}); install them with {_INSTALL}")
    images, labels = (_read_idx(p) for p in paths)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
        raise ValueError(f"fxeff.data.fashion_mnist_arrays: expected images [N, 28, 28] and labels [N], got "
                         f"{images.shape} and {labels.shape} in {folder}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def normalize_fashion(images: torch.Tensor) -> torch.Tensor:
    """float32 [N, 1, H, W] (or [1, H, W] for one image) from uint8 [N, H, W] / [H, W]: scaled to [0, 1],
    then (x - MEAN) / STD. The one normalisation of both Fashion-MNIST datasets."""
    return images.unsqueeze(-3).float().div_(255).sub_(MEAN).div_(STD)


def _check_limit(limit: Optional[int], size: int, caller: str) -> int:
    if limit is None:
        return size
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ValueError(f"fxeff.data.{caller}: limit must be a positive int or None, got {limit!r}")
    return min(limit, size)


class FashionMNIST(torch.utils.data.Dataset):
    """Fashion-MNIST ``split``: items (image float32 [1, 28, 28] normalised, label int). ``limit`` keeps the
    first items; ``augment`` (for training) applies a random horizontal flip and a random shift of up to
    ``2`` pixels (pad with the background, crop back), drawn from torch's global generator."""

    def __init__(self, split: str = "train", root: Optional[str] = None, limit: Optional[int] = None,
                 augment: bool = False):
        _check_split(split, "FashionMNIST")
        images, labels = fashion_mnist_arrays(split, root)
        n = _check_limit(limit, len(labels), "FashionMNIST")
        self.split, self.augment = split, augment
        self.images, self.labels = images[:n], labels[:n]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.augment:
            image = random_shift_flip(image)
        return normalize_fashion(image), int(self.labels[index])


def random_shift_flip(image: torch.Tensor, max_shift: int = 2) -> torch.Tensor:
    """uint8 [H, W] flipped left-right with probability 1/2 and moved by up to ``max_shift`` pixels in
    each direction (the vacated border is background, 0)."""
    if torch.rand(()) < 0.5:
        image = image.flip(-1)
    dy, dx = (torch.randint(-max_shift, max_shift + 1, (2,))).tolist()
    padded = torch.nn.functional.pad(image, (max_shift,) * 4)
    h, w = image.shape
    return padded[max_shift - dy:max_shift - dy + h, max_shift - dx:max_shift - dx + w]


class ClutteredFashionMNIST(torch.utils.data.Dataset):
    """Cluttered Fashion-MNIST: item ``i`` of Fashion-MNIST ``split`` on a ``canvas`` x ``canvas`` black
    canvas at a random place, over ``fragments`` square fragments (``fragment_size`` pixels) cut from
    other items of the same split at random places; overlaps keep the brighter pixel. Every choice
    comes from numpy's generator seeded with (seed, split, i), so item i is the same in every process
    and order. Items: (image float32 [1, canvas, canvas] normalised like Fashion-MNIST, label int)."""

    def __init__(self, split: str = "train", canvas: int = 64, fragments: int = 4, fragment_size: int = 9,
                 seed: int = 0, root: Optional[str] = None, limit: Optional[int] = None):
        _check_split(split, "ClutteredFashionMNIST")
        if not isinstance(canvas, int) or canvas < 28:
            raise ValueError(f"fxeff.data.ClutteredFashionMNIST: canvas must be an int >= 28 (an item is 28x28), "
                             f"got {canvas!r}")
        if not isinstance(fragment_size, int) or not 1 <= fragment_size <= 28:
            raise ValueError(f"fxeff.data.ClutteredFashionMNIST: fragment_size must be an int in [1, 28], "
                             f"got {fragment_size!r}")
        if not isinstance(fragments, int) or fragments < 0:
            raise ValueError(f"fxeff.data.ClutteredFashionMNIST: fragments must be an int >= 0, got {fragments!r}")
        images, labels = fashion_mnist_arrays(split, root)
        self.n = _check_limit(limit, len(labels), "ClutteredFashionMNIST")
        self.split, self.canvas, self.fragments, self.fragment_size, self.seed = split, canvas, fragments, \
            fragment_size, seed
        self.sources = images.numpy()  # fragments come from the whole split, also when limit cuts it
        self.labels = labels[:self.n]

    def __len__(self) -> int:
        return self.n

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.n:
            raise IndexError(f"fxeff.data.ClutteredFashionMNIST: index {index} out of range for {self.n} items")
        return np.random.default_rng((self.seed, SPLITS.index(self.split), index))

    def placement(self, index: int) -> Tuple[int, int]:
        """(top, left) of item ``index`` on its canvas: it covers rows top..top+27 and columns left..left+27."""
        top, left = self._rng(index).integers(0, self.canvas - 28 + 1, size=2)
        return int(top), int(left)

    def image(self, index: int) -> np.ndarray:
        """The uint8 [canvas, canvas] picture of item ``index``."""
        rng = self._rng(index)
        top, left = rng.integers(0, self.canvas - 28 + 1, size=2)  # first draw: the same as placement()
        canvas = np.zeros((self.canvas, self.canvas), dtype=np.uint8)
        s, total = self.fragment_size, len(self.sources)
        for _ in range(self.fragments):
            other = int(rng.integers(0, total - 1))
            other += other >= index  # any item but this one
            sy, sx = rng.integers(0, 28 - s + 1, size=2)
            py, px = rng.integers(0, self.canvas - s + 1, size=2)
            np.maximum(canvas[py:py + s, px:px + s], self.sources[other, sy:sy + s, sx:sx + s],
                       out=canvas[py:py + s, px:px + s])
        np.maximum(canvas[top:top + 28, left:left + 28], self.sources[index], out=canvas[top:top + 28, left:left + 28])
        return canvas

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return normalize_fashion(torch.from_numpy(self.image(index))), int(self.labels[index])


__all__ = ["CLASSES", "MEAN", "STD", "SPLITS", "data_dir", "fashion_mnist_arrays", "normalize_fashion", "FashionMNIST",
           "ClutteredFashionMNIST", "random_shift_flip"]
