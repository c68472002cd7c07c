"""fxeff.ops.mask_resize against a pure-Python reference: "any active" when shrinking, nearest when growing."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxeff.ops import mask_resize


def cells(size_in, size_out):
    """Input index range of each output index along one dimension."""
    if size_out <= size_in:  # shrink: the adaptive cell [floor(i*in/out), ceil((i+1)*in/out))
        return [range(i * size_in // size_out, math.ceil((i + 1) * size_in / size_out)) for i in range(size_out)]
    return [range(i * size_in // size_out, i * size_in // size_out + 1) for i in range(size_out)]  # grow: nearest


def expected_fn(mask, size):
    n, h, w = mask.shape
    rows, cols = cells(h, size[0]), cells(w, size[1])
    out = torch.zeros(n, *size, dtype=torch.bool)
    for b in range(n):
        for i, rr in enumerate(rows):
            for j, cc in enumerate(cols):
                out[b, i, j] = bool(mask[b, rr.start:rr.stop, cc.start:cc.stop].any())
    return out


# `device` is a constant per test case (conftest.py), so hypothesis may reuse it across examples.
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 3), h=st.integers(1, 17), w=st.integers(1, 17), oh=st.integers(1, 17), ow=st.integers(1, 17),
       density=st.sampled_from([0.02, 0.2, 0.6]), seed=st.integers(0, 2 ** 16))
def test_matches_reference(n, h, w, oh, ow, density, seed, device):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, h, w, generator=gen) < density
    got = mask_resize(mask.to(device), (oh, ow))
    assert got.device.type == device
    assert torch.equal(got.cpu(), expected_fn(mask, (oh, ow)))


def test_identity(device):
    mask = torch.rand(2, 9, 7, device=device) < 0.3
    assert torch.equal(mask_resize(mask, (9, 7)), mask)


def test_grow_is_nearest_like_interpolate(device):
    mask = torch.rand(2, 5, 7, device=device) < 0.4
    want = torch.nn.functional.interpolate(mask[:, None].float(), size=(13, 16), mode="nearest")[:, 0].bool()
    assert torch.equal(mask_resize(mask, (13, 16)), want)


def test_shrink_loses_no_active_pixel():
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(3, 56, 56, generator=gen) < 0.01  # isolated pixels: each must survive
    small = mask_resize(mask, (7, 9))
    for b, y, x in mask.nonzero().tolist():
        assert small[b, y * 7 // 56, x * 9 // 56], (b, y, x)
    # Pooling view of the same rule for an exact multiple: max-pool of the mask.
    assert torch.equal(mask_resize(mask, (14, 14)),
                       torch.nn.functional.max_pool2d(mask[:, None].float(), 4)[:, 0].bool())


def test_mixed_shrink_one_dim_grow_the_other():
    mask = torch.zeros(1, 8, 3, dtype=torch.bool)
    mask[0, 5, 1] = True
    got = mask_resize(mask, (4, 6))
    assert torch.equal(got, expected_fn(mask, (4, 6)))
    assert got[0, 2].tolist() == [False, False, True, True, False, False]


def test_non_contiguous_mask(device):
    mask = torch.rand(10, 12, 2) < 0.3
    mask = mask.permute(2, 0, 1)
    assert torch.equal(mask_resize(mask.to(device), (5, 4)).cpu(), expected_fn(mask.contiguous(), (5, 4)))


def test_bad_input_is_an_error():
    with pytest.raises(ValueError, match=r"fxeff.mask_resize: mask must be bool \[N, H, W\], got 3-D \[1, 4, 4\] Float"):
        mask_resize(torch.ones(1, 4, 4), (2, 2))
    with pytest.raises(ValueError, match=r"fxeff.mask_resize: mask must be bool \[N, H, W\], got 2-D"):
        mask_resize(torch.ones(4, 4, dtype=torch.bool), (2, 2))
    with pytest.raises(ValueError, match=r"fxeff.mask_resize: size must be two positive ints \[H, W\], got \[0, 2\]"):
        mask_resize(torch.ones(1, 4, 4, dtype=torch.bool), (0, 2))
    with pytest.raises(ValueError, match=r"fxeff.mask_resize: size must be an int or 2 ints"):
        mask_resize(torch.ones(1, 4, 4, dtype=torch.bool), (1, 2, 3))


def test_opcheck(device):
    mask = torch.rand(2, 9, 11, device=device) < 0.3
    for size in ([3, 4], [9, 11], [20, 5]):
        torch.library.opcheck(torch.ops.fxeff.mask_resize.default, (mask, size))


class Resize(torch.nn.Module):
    def forward(self, mask):
        return mask_resize(mask, (4, 4))


def test_stays_one_fx_leaf():
    gm = torch.fx.symbolic_trace(Resize())
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert len(calls) == 1 and calls[0].target in (mask_resize, torch.ops.fxeff.mask_resize), calls
    mask = torch.rand(1, 8, 8) < 0.2
    assert torch.equal(gm(mask), expected_fn(mask, (4, 4)))
