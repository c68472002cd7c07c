"""fxeff.ops.tile_conv2d against F.conv2d with padding 0, opcheck and gradcheck, one fx leaf, and the reason it
exists: a region on a data-dependent tile batch (nonzero) stays exact under torch.compile and AOTInductor, where
aten.convolution at that unbacked batch size hits inductor's stride misprediction (docs/regions.md)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import fxeff
import fxeff.export
from fxeff.ops import tile_conv2d


def expected_fn(tiles, weight, bias, stride, dilation, groups):
    return F.conv2d(tiles, weight, bias, stride, 0, dilation, groups)


def sample_inputs(device, requires_grad=False, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    for t, c, o, k, stride, dilation, groups, size, bias in [
        (3, 4, 6, 3, 1, 1, 1, (10, 9), True),
        (1, 4, 4, 3, 2, 1, 2, (11, 12), False),
        (5, 6, 6, 3, 1, 2, 6, (9, 9), True),  # depthwise, dilated
        (2, 8, 5, 1, 1, 1, 1, (4, 6), True),  # 1x1
    ]:
        tiles = torch.randn(t, c, *size, generator=gen, dtype=dtype).to(device).requires_grad_(requires_grad)
        weight = torch.randn(o, c // groups, k, k, generator=gen, dtype=dtype).to(device).requires_grad_(requires_grad)
        b = torch.randn(o, generator=gen, dtype=dtype).to(device).requires_grad_(requires_grad) if bias else None
        yield tiles, weight, b, [stride, stride], [dilation, dilation], groups


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_matches_reference_and_keeps_the_memory_format(dtype, device):
    for tiles, weight, bias, stride, dilation, groups in sample_inputs(device, dtype=dtype):
        want = expected_fn(tiles, weight, bias, stride, dilation, groups)
        tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else {}
        torch.testing.assert_close(tile_conv2d(tiles, weight, bias, stride, dilation, groups), want, **tol)
        cl = tiles.contiguous(memory_format=torch.channels_last)
        out = tile_conv2d(cl, weight, bias, stride, dilation, groups)
        assert out.is_contiguous(memory_format=torch.channels_last) or out.shape[0] * out.shape[1] <= 1
        torch.testing.assert_close(out, want, **tol)
        strided = torch.cat([tiles, tiles], 1)[:, ::2]  # non-contiguous
        torch.testing.assert_close(tile_conv2d(strided, weight, bias, stride, dilation, groups),
                                   expected_fn(strided, weight, bias, stride, dilation, groups), **tol)


@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, 4), c=st.sampled_from([1, 2, 4]), o=st.integers(1, 5), k=st.sampled_from([1, 3, 5]),
       h=st.integers(5, 12), w=st.integers(5, 12), s=st.integers(1, 2), d=st.integers(1, 2))
def test_random_shapes(t, c, o, k, h, w, s, d):
    if d * (k - 1) + 1 > min(h, w):
        return
    tiles, weight = torch.randn(t, c, h, w), torch.randn(o, c, k, k)
    torch.testing.assert_close(tile_conv2d(tiles, weight, None, s, d), expected_fn(tiles, weight, None, s, d, 1))


def test_gradients_and_opcheck(device):
    for args in sample_inputs(device, requires_grad=True, dtype=torch.float64):
        torch.autograd.gradcheck(lambda *a: torch.ops.fxeff.tile_conv2d(*a), args)
        torch.library.opcheck(torch.ops.fxeff.tile_conv2d.default, args)


def test_errors_name_the_op():
    with pytest.raises(RuntimeError, match=r"fxeff.tile_conv2d: tiles must have weight.size\(1\) \* groups = 4 "
                                           r"channels, got 3"):
        tile_conv2d(torch.randn(1, 3, 5, 5), torch.randn(2, 4, 3, 3))
    with pytest.raises(RuntimeError, match="tiles must be 4-D"):
        tile_conv2d(torch.randn(3, 5, 5), torch.randn(2, 3, 3, 3))


def test_one_fx_leaf():
    class M(torch.nn.Module):
        def forward(self, x, w):
            return tile_conv2d(x, w)

    gm = torch.fx.symbolic_trace(M())
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    # the wrapper is a leaf where fx.wrap patched it; called from elsewhere, the op itself is the leaf
    assert len(calls) == 1 and calls[0].target in (tile_conv2d, torch.ops.fxeff.tile_conv2d)


class TileRegion(torch.nn.Module):
    """A region as region execution runs it: the active 8x8 output tiles (nonzero: a data-dependent count) gathered
    with a halo of 2 from an unfold view, conv-ReLU-conv on the tile batch, scattered back."""

    def __init__(self, conv):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(8, 8, 3, 3) * 0.1)
        self.w2 = torch.nn.Parameter(torch.randn(8, 8, 3, 3) * 0.1)
        self.conv = conv

    def forward(self, x, mask):
        n, c, h, w = x.shape
        t, halo = 8, 2
        active = F.max_pool2d(mask[:, None].float(), t, t)[:, 0] > 0
        images, rows, cols = active.nonzero(as_tuple=True)
        side = t + 2 * halo
        tiles = F.pad(x, (halo,) * 4).unfold(2, side, t).unfold(3, side, t)[images, :, rows, cols]
        y = self.conv(F.relu(self.conv(tiles, self.w1)), self.w2)
        out = x.new_zeros(n, h // t, w // t, c, t, t).index_put((images, rows, cols), y)
        return out.permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


def _masks():
    m1 = torch.zeros(2, 32, 32, dtype=torch.bool)
    m1[0, :10, :10] = True
    m1[1, 20:, 5:20] = True
    m2 = torch.zeros(2, 32, 32, dtype=torch.bool)
    m2[0, 16:, 16:] = True
    return m1, m2


@pytest.mark.slow
def test_a_region_on_a_data_dependent_tile_batch_is_exact_under_inductor_and_aotinductor(tmp_path):
    torch.manual_seed(0)
    model = TileRegion(lambda x, w: tile_conv2d(x, w)).eval()
    x = torch.randn(2, 8, 32, 32)
    m1, m2 = _masks()
    with torch.no_grad():
        want = [model(x, m) for m in (m1, m2)]
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        for m, w in zip((m1, m2), want):
            torch.testing.assert_close(compiled(x, m), w, rtol=1e-5, atol=1e-5)
        torch._dynamo.reset()
        exported = torch.export.export(model, (x, m1))
        path = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "region.pt2"))
        run = fxeff.export.load_aoti(path)
        for m, w in zip((m1, m2), want):
            torch.testing.assert_close(run(x, m), w, rtol=1e-5, atol=1e-5)
