"""fxeff.data's Fashion-MNIST (Debian's dataset-fashion-mnist) and Cluttered Fashion-MNIST against direct computations."""
import gzip
import os
import struct

import numpy as np
import pytest
import torch

from fxeff import data
from fxeff.data import fashion

HAVE_FMNIST = os.path.isfile(os.path.join(data.data_dir(), "t10k-labels-idx1-ubyte.gz"))
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist "
                                                          "(make test installs it)")


def _write_idx(path, array):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_root(tmp_path):
    """A folder with a 50-item train split and a 20-item test split of random pictures, in idx format."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 50), ("test", 20)):
        images_file, labels_file = fashion._FILES[split]
        _write_idx(str(tmp_path / images_file), rng.integers(0, 256, (n, 28, 28)))
        _write_idx(str(tmp_path / labels_file), rng.integers(0, 10, (n,)))
    yield str(tmp_path)
    fashion.fashion_mnist_arrays.cache_clear()


def test_idx_round_trip_and_bad_magic(tiny_root, tmp_path):
    images, labels = data.fashion_mnist_arrays("test", tiny_root)
    assert images.shape == (20, 28, 28) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    raw = gzip.open(os.path.join(tiny_root, "t10k-images-idx3-ubyte.gz")).read()
    expected = np.frombuffer(raw, np.uint8, offset=16).reshape(20, 28, 28)
    assert torch.equal(images, torch.from_numpy(expected.copy()))
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x0D, 1) + struct.pack(">i", 4) + b"\0" * 16)  # float32 idx
    with pytest.raises(ValueError, match="not a uint8 idx file"):
        fashion._read_idx(str(bad))


def test_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.fashion_mnist_arrays("train", str(tmp_path))
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'test'\), got 'val'"):
        data.fashion_mnist_arrays("val")


def test_env_variable_names_the_folder(tiny_root, monkeypatch):
    monkeypatch.setenv("FXEFF_FASHION_MNIST_DIR", tiny_root)
    assert data.data_dir() == tiny_root
    assert len(data.FashionMNIST("train")) == 50


@needs_fmnist
def test_real_fashion_mnist_shapes_labels_and_statistics():
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = data.fashion_mnist_arrays(split)
        assert images.shape == (n, 28, 28) and labels.shape == (n,)
        assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), n // 10))  # balanced classes
    images, _ = data.fashion_mnist_arrays("train")
    scaled = images.float() / 255
    assert abs(scaled.mean().item() - data.MEAN) < 1e-3 and abs(scaled.std().item() - data.STD) < 1e-3
    item, label = data.FashionMNIST("test")[0]
    assert item.shape == (1, 28, 28) and item.dtype == torch.float32 and label == 9  # an ankle boot
    batch = torch.stack([data.FashionMNIST("train", limit=2000)[i][0] for i in range(2000)])
    assert abs(batch.mean().item()) < 0.05 and abs(batch.std().item() - 1) < 0.05


def test_fashion_mnist_limit_and_errors(tiny_root):
    assert len(data.FashionMNIST("train", tiny_root, limit=7)) == 7
    assert len(data.FashionMNIST("train", tiny_root, limit=500)) == 50
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="limit must be a positive int or None"):
            data.FashionMNIST("train", tiny_root, limit=bad)


def test_random_shift_flip_is_a_shifted_maybe_flipped_copy():
    image = torch.randint(1, 256, (28, 28), dtype=torch.uint8)
    torch.manual_seed(0)
    seen = set()
    for _ in range(60):
        out = data.random_shift_flip(image)
        matches = []
        for flip in (False, True):
            src = image.flip(-1) if flip else image
            padded = torch.nn.functional.pad(src, (2, 2, 2, 2))
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    if torch.equal(out, padded[2 - dy:30 - dy, 2 - dx:30 - dx]):
                        matches.append((flip, dy, dx))
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 20  # flips and shifts in every direction actually happen


def test_augmented_items_keep_shape_and_follow_the_seed(tiny_root):
    ds = data.FashionMNIST("train", tiny_root, augment=True)
    torch.manual_seed(3)
    a = [ds[i][0] for i in range(10)]
    torch.manual_seed(3)
    b = [ds[i][0] for i in range(10)]
    assert all(torch.equal(x, y) and x.shape == (1, 28, 28) for x, y in zip(a, b))


def test_cluttered_items_are_deterministic_and_hold_their_item(tiny_root):
    first = data.ClutteredFashionMNIST("train", root=tiny_root, canvas=64)
    second = data.ClutteredFashionMNIST("train", root=tiny_root, canvas=64)
    items, _ = data.fashion_mnist_arrays("train", tiny_root)
    for i in (7, 3, 49, 0):  # any order, any instance: the same picture
        picture = first.image(i)
        assert picture.shape == (64, 64) and picture.dtype == np.uint8
        assert np.array_equal(picture, second.image(i))
        top, left = first.placement(i)
        assert 0 <= top <= 36 and 0 <= left <= 36
        region = picture[top:top + 28, left:left + 28]
        assert (region >= items[i].numpy()).all()  # the item is there; clutter only brightens it
    x, label = first[5]
    assert x.shape == (1, 64, 64) and label == int(data.fashion_mnist_arrays("train", tiny_root)[1][5])
    other_seed = data.ClutteredFashionMNIST("train", root=tiny_root, seed=1)
    assert not np.array_equal(first.image(5), other_seed.image(5))
    test_split = data.ClutteredFashionMNIST("test", root=tiny_root)
    assert test_split.placement(5) != first.placement(5) or not np.array_equal(test_split.image(5), first.image(5))


def test_cluttered_without_fragments_is_the_item_on_black(tiny_root):
    ds = data.ClutteredFashionMNIST("test", root=tiny_root, canvas=40, fragments=0)
    items, _ = data.fashion_mnist_arrays("test", tiny_root)
    for i in range(len(ds)):
        picture, (top, left) = ds.image(i), ds.placement(i)
        expected = np.zeros((40, 40), np.uint8)
        expected[top:top + 28, left:left + 28] = items[i].numpy()
        assert np.array_equal(picture, expected)


def test_cluttered_fragments_come_from_other_items(tiny_root):
    ds = data.ClutteredFashionMNIST("train", root=tiny_root, fragments=6, fragment_size=5)
    picture, (top, left) = ds.image(11), ds.placement(11)
    outside = picture.copy()
    outside[top:top + 28, left:left + 28] = 0
    assert outside.any()  # clutter around the item
    assert (outside > 0).sum() <= 6 * 25


def test_cluttered_errors(tiny_root):
    with pytest.raises(ValueError, match="canvas must be an int >= 28"):
        data.ClutteredFashionMNIST("train", root=tiny_root, canvas=20)
    with pytest.raises(ValueError, match=r"fragment_size must be an int in \[1, 28\]"):
        data.ClutteredFashionMNIST("train", root=tiny_root, fragment_size=30)
    with pytest.raises(ValueError, match="fragments must be an int >= 0"):
        data.ClutteredFashionMNIST("train", root=tiny_root, fragments=-1)
    with pytest.raises(IndexError, match="index 50 out of range for 50 items"):
        data.ClutteredFashionMNIST("train", root=tiny_root).image(50)
