"""fxeff.focus (calibrate, aoi_masks, render), fxeff.models and fxeff.data against direct computations."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxeff
from fxeff import data, focus, models


class Tiny(nn.Module):
    """conv-relu (the split "early") then two convs: a model with a named split and no default one."""

    def __init__(self):
        super().__init__()
        self.early = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.late = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, padding=1))
        self.late_calls = 0

    def forward(self, x):
        x = self.early(x)
        self.late_calls += 1
        return self.late(x).mean((2, 3))


def _fraction(model, images, threshold, split, reduce):
    """Mean over images of the fraction aoi_mask keeps, computed from the split activation directly."""
    fractions = []
    for x in images if isinstance(images, list) else [images]:
        with torch.no_grad():
            act = model.get_submodule(split)(x)
        fractions += fxeff.ops.aoi_mask(act, threshold, reduce).float().mean((1, 2)).tolist()
    return sum(fractions) / len(fractions)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("target", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_calibrate_gives_the_target_fraction(target, reduce):
    model = Tiny().eval()
    x = torch.randn(3, 3, 20, 24)
    # conv + ReLU: many exact zeros where all channels are off; lift them so values are distinct
    with torch.no_grad():
        model.early[0].bias.fill_(5.0)
    t = focus.calibrate(model, x, target, split="early", reduce=reduce)
    got = _fraction(model, x, t, "early", reduce)
    assert abs(got - target) <= 1 / (20 * 24), (t, got)
    assert model.late_calls == 0  # the model stopped at the split


def test_calibrate_weighs_every_image_alike_across_batches_of_different_sizes():
    model = Tiny().eval()
    with torch.no_grad():
        model.early[0].bias.fill_(5.0)
    batches = [torch.randn(2, 3, 16, 16), torch.randn(1, 3, 32, 40)]
    t = focus.calibrate(model, batches, 0.3, split="early")
    assert abs(_fraction(model, batches, t, "early", "sum") - 0.3) <= 1 / (16 * 16)


def test_calibrate_with_ties_takes_the_largest_threshold_reaching_the_target():
    model = Tiny().eval()  # ReLU outputs: pixels whose 8 channels are all 0 tie at sum 0
    with torch.no_grad():
        model.early[0].bias.fill_(-1.0)
    x = torch.randn(2, 3, 16, 16)
    act = model.early(x).sum(1)
    zeros = float((act == 0).float().mean())
    assert zeros > 0.3, "the test needs a large tie at 0"
    target = 1 - zeros / 2  # inside the tied block
    t = focus.calibrate(model, x, target, split="early")
    assert t == 0.0
    assert _fraction(model, x, t, "early", "sum") == 1.0 >= target  # the whole tie enters at once
    above = float(np.nextafter(np.float32(t), np.float32(np.inf)))
    assert _fraction(model, x, above, "early", "sum") < target


def test_calibrate_zero_target_leaves_an_empty_aoi():
    model = Tiny().eval()
    x = torch.randn(2, 3, 12, 12)
    t = focus.calibrate(model, x, 0.0, split="early")
    assert _fraction(model, x, t, "early", "sum") == 0.0


def test_calibrate_uses_the_family_default_split_and_matches_the_focus_pass():
    model = models.load_model("torchvision:resnet18")
    x = torch.randn(2, 3, 64, 64)
    t = focus.calibrate(model, x, 0.4)
    assert t == focus.calibrate(model, x, 0.4, split="maxpool")
    gm = fxeff.transform(model, x, [fxeff.Focus(t)])
    masks = focus.aoi_masks(model, x, t)[0]
    assert masks.shape == (2, 16, 16)
    assert gm.fxeff_report.aoi_fractions == pytest.approx(masks.float().mean((1, 2)).tolist(), abs=1e-7)
    assert gm.fxeff_report.aoi_fraction == pytest.approx(0.4, abs=1 / 256)


def test_calibrate_errors_name_the_function_and_argument():
    model = Tiny().eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"fxeff.focus.calibrate: no split given and no default split for model class 'Tiny'"):
        focus.calibrate(model, x, 0.3)
    with pytest.raises(ValueError, match=r"split 'nope' names no module of Tiny"):
        focus.calibrate(model, x, 0.3, split="nope")
    with pytest.raises(ValueError, match=r"target_fraction must be a number in \[0, 1\], got 1.5"):
        focus.calibrate(model, x, 1.5, split="early")
    with pytest.raises(ValueError, match=r"reduce must be one of"):
        focus.calibrate(model, x, 0.3, split="early", reduce="max")
    with pytest.raises(ValueError, match=r"images must be a tensor \[N, C, H, W\]"):
        focus.calibrate(model, torch.randn(3, 8, 8), 0.3, split="early")


def test_reduce_channels_is_bitwise_the_reduction_of_aoi_mask():
    act = torch.randn(2, 64, 9, 9).to(torch.bfloat16)
    for reduce in ("sum", "mean"):
        r = focus.reduce_channels(act, reduce)
        assert r.dtype == torch.float32
        for t in r.flatten()[:20].tolist():  # each value taken as threshold keeps exactly the values >= it
            assert torch.equal(fxeff.ops.aoi_mask(act, t, reduce), r >= t)


# ---------------------------------------------------------------- render

def test_upsample_nearest_matches_interpolate():
    mask = torch.rand(5, 7) > 0.5
    up = focus.upsample_nearest(mask.numpy(), 20, 21)
    ref = F.interpolate(mask[None, None].float(), size=(20, 21), mode="nearest")[0, 0].bool().numpy()
    assert np.array_equal(up, ref)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_render_keeps_the_aoi_and_dims_the_rest(tmp_path, as_tensor):
    from PIL import Image

    rng = np.random.default_rng(0)
    image = rng.integers(80, 256, size=(48, 64, 3), dtype=np.uint8)
    mask = np.zeros((6, 8), dtype=bool)
    mask[1:4, 2:6] = True  # 8x8-pixel cells: outlined
    source = torch.from_numpy(image).permute(2, 0, 1).float() / 255 if as_tensor else image
    path = focus.render(source, torch.from_numpy(mask), str(tmp_path / "aoi.png"), title="")
    png = np.asarray(Image.open(path).convert("RGB"))
    gap = max(2, 64 // 50)
    assert png.shape == (48, 64 + gap + 64, 3)
    left, right = png[:, :64].astype(int), png[:, 64 + gap:].astype(int)
    assert np.abs(left - image.astype(int)).max() <= 1  # the original beside the overlay
    aoi = focus.upsample_nearest(mask, 48, 64)
    inner = np.zeros_like(aoi)
    inner[9:31, 17:47] = True  # the AoI less its outline
    assert np.abs(right[inner] - image.astype(int)[inner]).max() <= 1
    assert (right[~aoi].sum(-1) < 0.5 * image.astype(int)[~aoi].sum(-1)).all()
    ring = aoi & ~inner
    assert (right[ring] == [255, 214, 0]).all(axis=-1).mean() > 0.9


def test_render_errors(tmp_path):
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"fxeff.focus.render: mask must be bool \[h, w\]"):
        focus.render(image, np.zeros((4, 4), dtype=np.float32), str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match=r"fxeff.focus.render: image must be HxWx3 uint8"):
        focus.render(np.zeros((8, 8), dtype=np.uint8), np.ones((4, 4), dtype=bool), str(tmp_path / "x.png"))


# ---------------------------------------------------------------- models and data

def test_load_model_names_and_errors(tmp_path):
    model = models.load_model("torchvision:resnet18")
    assert not model.training
    assert "torchvision:vgg16" in models.model_names()
    with pytest.raises(ValueError, match=r"fxeff.models.load_model: unknown model 'resnet18'"):
        models.load_model("resnet18")
    with pytest.raises(ValueError, match=r"'torchvision:nope' names no torchvision classification model"):
        models.load_model("torchvision:nope")
    with pytest.raises(FileNotFoundError, match=r"checkpoint .* is not a file"):
        models.load_model("torchvision:resnet18", checkpoint=str(tmp_path / "missing.pt"))
    torch.save({"state_dict": model.state_dict()}, tmp_path / "r18.pt")
    again = models.load_model("torchvision:resnet18", checkpoint=str(tmp_path / "r18.pt"))
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert models.has_real_weights("torchvision:resnet18", str(tmp_path / "r18.pt"))
    assert not models.has_real_weights("torchvision:resnet18")


def test_preprocessing_recipes():
    assert models.preprocessing("torchvision:vgg16") == models.Preprocessing(256, 224)
    assert models.preprocessing("torchvision:inception_v3").crop == 299
    assert models.preprocessing("efficientnet-lite0").at_size(64) == models.Preprocessing(73, 64)
    assert len(models.imagenet_categories()) == 1000


def test_photos_and_batches():
    photos = data.photos(["chelsea", "motorcycle"])
    assert [n for n, _ in photos] == ["chelsea", "motorcycle"]
    assert all(im.ndim == 3 and im.shape[2] == 3 and im.dtype == np.uint8 for _, im in photos)
    prep = models.preprocessing("torchvision:resnet18").at_size(64)
    batch, crops = data.to_batch([im for _, im in photos], prep)
    assert batch.shape == (2, 3, 64, 64) and batch.dtype == torch.float32
    assert all(c.shape == (64, 64, 3) for c in crops)
    undone = batch * torch.tensor(prep.std).view(1, 3, 1, 1) + torch.tensor(prep.mean).view(1, 3, 1, 1)
    assert torch.allclose(undone, torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255, atol=1e-5)
    with pytest.raises(ValueError, match=r"fxeff.data.photos: unknown photo\(s\) \['lena'\]"):
        data.photos(["lena"])


def test_efficientnet_lite0_has_real_imagenet_weights():
    """The packaged weights and the documented preprocessing classify scikit-image's cat and coffee."""
    model = models.load_model("efficientnet-lite0")
    batch, _ = data.to_batch([im for _, im in data.photos(["chelsea", "coffee"])],
                             models.preprocessing("efficientnet-lite0"))
    with torch.no_grad():
        top1 = model(batch).argmax(-1).tolist()
    categories = models.imagenet_categories()
    assert categories[top1[0]] in ("tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat")
    assert categories[top1[1]] in ("espresso", "cup", "coffee mug")
    assert focus.resolve_split(model, None, "test") == "_blocks.0"
    assert math.isfinite(focus.calibrate(model, batch, 0.3))
