"""fxeff.ops.aoi_mask against the pure-PyTorch reference reduce(x, dim=1) >= threshold, one mask per image."""
import math

import pytest
import torch

from fxeff.ops import aoi_mask, dilate_mask


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


# ---------------------------------------------------------------- dilate_mask: the AoI's halo

def dilate_reference(mask, halo):
    """A (2 halo + 1)^2 max filter of the mask as float (zeros beyond the borders)."""
    k = 2 * halo + 1
    return torch.nn.functional.max_pool2d(mask.double()[:, None], k, 1, halo)[:, 0] > 0


@pytest.mark.parametrize("halo", [1, 2, 3, 7])
@pytest.mark.parametrize("shape", [(3, 9, 17), (2, 1, 5), (1, 16, 2), (4, 64, 64)])
def test_dilate_mask_equals_a_max_filter(halo, shape, device):
    gen = torch.Generator().manual_seed(halo)
    mask = torch.rand(shape, generator=gen) < 0.08
    got = dilate_mask(mask.to(device), halo)
    assert got.dtype == torch.bool and got.is_contiguous() and got.device.type == device
    assert torch.equal(got.cpu(), dilate_reference(mask, halo))
    strided = mask.transpose(1, 2)  # a non-contiguous mask
    assert torch.equal(dilate_mask(strided.to(device), halo).cpu(), dilate_reference(strided.contiguous(), halo))
    torch.library.opcheck(torch.ops.fxeff.dilate_mask.default, (mask.to(device), halo))
    assert dilate_mask(mask, 0) is mask


def test_dilate_mask_bad_input_is_an_error():
    with pytest.raises(ValueError, match=r"fxeff\.dilate_mask: mask must be bool \[N, H, W\], got 2-D"):
        torch.ops.fxeff.dilate_mask(torch.zeros(3, 3, dtype=torch.bool), 1)
    with pytest.raises(ValueError, match=r"fxeff\.dilate_mask: halo must be >= 0, got -1"):
        torch.ops.fxeff.dilate_mask(torch.zeros(1, 3, 3, dtype=torch.bool), -1)
    with pytest.raises(ValueError, match=r"fxeff\.dilate_mask: halo must be an int >= 0, got 1.5"):
        dilate_mask(torch.zeros(1, 3, 3, dtype=torch.bool), 1.5)
