"""fxeff.ops.aoi_mask against the pure-PyTorch reference reduce(x, dim=1) >= threshold, one mask per image."""
import math

import pytest
import torch

from fxeff.ops import aoi_mask


def expected_fn(x, threshold, reduce="sum"):
    r = x.double().sum(1) if reduce == "sum" else x.double().mean(1)
    return r >= threshold


def assert_mask_matches(got, x, threshold, reduce):
    """Equal to the float64 reference, except where the reduction lies within rounding of the threshold."""
    r = x.double().sum(1) if reduce == "sum" else x.double().mean(1)
    want = r >= threshold
    assert got.dtype == torch.bool and got.shape == want.shape
    eps = {torch.float64: 1e-12, torch.float32: 1e-5}.get(x.dtype, 1e-2) * max(1.0, float(x.double().abs().sum(1).max()))
    differs = got != want
    assert not differs.any() or bool(((r - threshold).abs()[differs] <= eps).all()), int(differs.sum())


@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_matches_reference(reduce, dtype, device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 11, 13, generator=gen).to(dtype)
    # A different AoI per image: the reduction differs per image, so one shared mask would be wrong.
    x[1] += 1.0
    x[2] -= 1.0
    threshold = 0.5 if reduce == "sum" else 0.1
    got = aoi_mask(x.to(device), threshold, reduce)
    assert got.device.type == device
    got = got.cpu()
    assert_mask_matches(got, x, threshold, reduce)
    assert not torch.equal(got[0], got[1]) and not torch.equal(got[1], got[2])


def test_default_reduce_is_sum_like_the_seed():
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(aoi_mask(x, 1.5), x.sum(1) >= 1.5)


def test_channels_last_and_non_contiguous(device):
    x = torch.randn(2, 6, 9, 9, device=device)
    for xi in (x.contiguous(memory_format=torch.channels_last), x[:, ::2], x.transpose(2, 3)):
        got = aoi_mask(xi, 0.0)
        assert got.is_contiguous()
        assert_mask_matches(got.cpu(), xi.cpu(), 0.0, "sum")


@pytest.mark.parametrize("bad", [float("nan")])
def test_nan_threshold_is_an_error(bad, device):
    with pytest.raises(ValueError, match="fxeff.aoi_mask: threshold must be a number, got nan"):
        aoi_mask(torch.randn(1, 2, 3, 3, device=device), bad)


def test_infinite_thresholds_give_empty_and_full_masks(device):
    x = torch.randn(2, 3, 4, 4, device=device)
    assert not aoi_mask(x, math.inf).any()
    assert aoi_mask(x, -math.inf).all()


def test_nan_is_never_in_the_aoi(device):
    x = torch.randn(2, 3, 4, 4, device=device)
    x[0, 1, 2, 3] = float("nan")
    for reduce in ("sum", "mean"):
        got = aoi_mask(x, -math.inf, reduce).cpu()
        assert not got[0, 2, 3] and int(got.sum()) == 2 * 4 * 4 - 1


def test_bad_reduce_and_shape_are_errors():
    with pytest.raises(ValueError, match="fxeff.aoi_mask: reduce must be \"sum\" or \"mean\", got \"max\""):
        aoi_mask(torch.randn(1, 2, 3, 3), 0.0, "max")
    with pytest.raises(ValueError, match=r"fxeff.aoi_mask: x must be 4-D \[N, C, H, W\], got 3-D"):
        aoi_mask(torch.randn(2, 3, 3), 0.0)
    with pytest.raises(ValueError, match="fxeff.aoi_mask: x must be floating point, got Long"):
        aoi_mask(torch.ones(1, 2, 3, 3, dtype=torch.long), 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_opcheck(dtype, device):
    x = torch.randn(2, 3, 5, 5).to(device=device, dtype=dtype)
    for reduce in ("sum", "mean"):
        torch.library.opcheck(torch.ops.fxeff.aoi_mask.default, (x, 0.25, reduce))


class Thresholded(torch.nn.Module):
    def forward(self, x):
        return aoi_mask(x, 0.5)


def test_stays_one_fx_leaf():
    gm = torch.fx.symbolic_trace(Thresholded())
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert len(calls) == 1 and calls[0].target in (aoi_mask, torch.ops.fxeff.aoi_mask), calls
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(gm(x), x.sum(1) >= 0.5)
