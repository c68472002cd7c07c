"""fxeff.ops.shift_conv1x1 (a shift, its folded BatchNorm, a clamp and a 1x1 conv in one op) against its composition,
and the FuseShift pass that rewrites graphs into it, on the three graph kinds and the deployment forms."""
import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxeff
from fxeff.ops import shift_conv1x1
from fxeff.passes import FuseShift, Shift
from fxeff.passes.graph import get_attr_value

from _graph_kinds import conv_bn_relu6, randomize_batch_norms, rewritten
from _shift_reference import shift_reference

FUSED = torch.ops.fxeff.shift_conv1x1.default


def reference(x, shifts, padding, mode, pad, pool, scale, offset, lo, hi, weight, bias):
    """The composition in pure PyTorch: tests/_shift_reference.py's shift, F.pad, avg_pool2d (ceil_mode, windows
    clipped), the affine, clamp, conv2d."""
    z = shift_reference(x, shifts, padding, mode)
    if any(pad):
        z = F.pad(z, pad)
    if any(p != 1 for p in pool):
        kernel = [min(p, z.shape[2 + i]) for i, p in enumerate(pool)]
        z = F.avg_pool2d(z, kernel, pool, 0, ceil_mode=True, count_include_pad=True)
    if scale is not None:
        z = z * scale.view(1, -1, 1, 1) + offset.view(1, -1, 1, 1)
    if lo is not None or hi is not None:
        z = z.clamp(lo, hi)
    return F.conv2d(z, weight, bias)


def _case(n, c, h, w, o, dtype, seed, mode="sparse", shift_range=2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen, dtype=dtype)
    if mode == "active":
        shifts = (torch.rand(c, 2, generator=gen, dtype=dtype) * 2 - 1) * shift_range
    else:
        shifts = torch.randint(-shift_range, shift_range + 1, (c, 2), generator=gen).to(dtype)
    weight = torch.randn(o, c, 1, 1, generator=gen, dtype=dtype)
    bias = torch.randn(o, generator=gen, dtype=dtype)
    scale = torch.randn(c, generator=gen, dtype=dtype)
    offset = torch.randn(c, generator=gen, dtype=dtype)
    return x, shifts, weight, bias, scale, offset


def _check(x, shifts, padding, mode, pad, pool, scale, offset, lo, hi, weight, bias):
    out = shift_conv1x1(x, shifts, padding, mode, pad, pool, scale, offset, lo, hi, weight, bias)
    want = reference(x, shifts, padding, mode, pad, pool, scale, offset, lo, hi, weight, bias)
    assert out.shape == want.shape
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    tol = 1e-4 if x.dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)


GEOMETRIES = [([0, 0, 0, 0], [1, 1]), ([0, -1, 0, -1], [2, 2]), ([-1, -1, -1, -1], [1, 1]), ([1, 1, 0, 0], [3, 2]),
              ([0, -2, -1, 0], [2, 3])]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pad, pool", GEOMETRIES)
@pytest.mark.parametrize("epilogue", ["bn_relu6", "none", "relu", "bn_only", "bias_only"])
def test_matches_composition(channels_last, dtype, pad, pool, epilogue):
    """Every layout, dtype, crop/pad/pool geometry and epilogue: the fused op equals its composition. 37 channels
    (a partial 16-lane block) and random shifts in [-2, 2] (several distinct shifts per block, sources off the map)."""
    x, shifts, weight, bias, scale, offset = _case(2, 37, 11, 9, 13, dtype, seed=len(pad) + pool[0])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    sc, of, lo, hi, b = {"bn_relu6": (scale, offset, 0.0, 6.0, None), "none": (None, None, None, None, None),
                         "relu": (scale, offset, 0.0, None, bias), "bn_only": (scale, offset, None, None, bias),
                         "bias_only": (None, None, None, 1.5, bias)}[epilogue]
    _check(x, shifts, "zeros", "sparse", pad, pool, sc, of, lo, hi, weight, b)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mode, padding", [("active", "zeros"), ("grouped", "border"), ("sparse", "periodic"),
                                           ("sparse", "reflect"), ("active", "symmetric")])
@pytest.mark.parametrize("pooled", [False, True])
def test_modes_and_paddings(channels_last, mode, padding, pooled):
    """Interpolated shifts and every padding (the lookup-table paths), with and without the pooling."""
    x, shifts, weight, bias, scale, offset = _case(2, 20, 8, 7, 6, torch.float64, seed=3, mode=mode)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    pad, pool = ([0, -1, 0, -1], [2, 2]) if pooled else ([0, 0, 0, 0], [1, 1])
    _check(x, shifts, padding, mode, pad, pool, scale, offset, -0.5, 2.0, weight, bias)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bands_and_threads(threads, channels_last):
    """Maps larger than one tile (several bands per image, a last band shorter), more items than threads, and a
    batch of one split into bands for every thread: the same result at every thread count."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, c, h, w in ((1, 160, 61, 57), (3, 24, 9, 5), (1, 8, 3, 3)):
            x, shifts, weight, bias, scale, offset = _case(n, c, h, w, 7, torch.float32, seed=h)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for pad, pool in GEOMETRIES[:2]:
                _check(x, shifts, "zeros", "sparse", pad, pool, scale, offset, 0.0, 6.0, weight, bias)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("pad, pool", GEOMETRIES[:2])
def test_large_channels_last_input_prefetched(pad, pool):
    """A channels-last input above 8 MiB (the gather prefetches its source rows ahead): the composition's result."""
    x, shifts, weight, bias, scale, offset = _case(2, 67, 130, 127, 9, torch.float32, seed=8, shift_range=1)
    assert x.numel() * 4 > 8 * 2 ** 20
    _check(x.contiguous(memory_format=torch.channels_last), shifts, "zeros", "sparse", pad, pool, scale, offset, 0.0,
           6.0, weight, bias)


def test_non_contiguous_input_and_weight():
    x, shifts, weight, bias, scale, offset = _case(2, 12, 10, 10, 5, torch.float32, seed=4)
    wide = torch.randn(2, 24, 10, 12)
    view = wide[:, ::2, :, 1:11]  # gaps in channels and columns
    weight_t = torch.randn(12, 5, 1, 1).transpose(0, 1)
    _check(view, shifts, "zeros", "sparse", [0, -1, 0, -1], [2, 2], scale, offset, 0.0, 6.0, weight_t, bias)
    _check(x[:, :, ::2], shifts, "zeros", "sparse", [0, 0, 0, 0], [1, 1], scale, offset, None, None, weight, bias)


def test_nan_propagates_through_the_clamp():
    """torch.clamp keeps NaN; so does the fused epilogue (both layouts)."""
    x, shifts, weight, bias, scale, offset = _case(1, 16, 4, 4, 3, torch.float32, seed=5, shift_range=0)
    x[0, 3, 1, 1] = float("nan")
    for fmt in (torch.contiguous_format, torch.channels_last):
        out = shift_conv1x1(x.contiguous(memory_format=fmt), shifts, "zeros", "sparse", [0] * 4, [1, 1], scale, offset,
                            0.0, 6.0, weight, bias)
        assert torch.isnan(out[0, :, 1, 1]).all() and not torch.isnan(out[0, :, 0, 0]).any()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 40), h=st.integers(1, 12), w=st.integers(1, 12), o=st.integers(1, 20),
       stride=st.integers(1, 3), crop=st.integers(-1, 1), cl=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_random_shapes(n, c, h, w, o, stride, crop, cl, seed):
    x, shifts, weight, bias, scale, offset = _case(n, c, h, w, o, torch.float32, seed=seed)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    pad = [crop, crop, crop, 0]
    if h + crop < 1 or w + 2 * crop < 1:
        return
    _check(x, shifts, "zeros", "sparse", pad, [stride, stride], scale, offset, 0.0, 6.0, weight, bias)


def test_gradients_run_the_composition():
    """With grad the op runs as its composition: gradcheck in float64 (interpolated shifts, so the shifts' gradient
    is the exact derivative), and the gradients of the unfused composition."""
    x, shifts, weight, bias, scale, offset = _case(1, 5, 5, 4, 3, torch.float64, seed=6, mode="active")
    args = [t.clone().requires_grad_() for t in (x, shifts, scale, offset, weight, bias)]

    def fused(x, shifts, scale, offset, weight, bias):
        return shift_conv1x1(x, shifts, "zeros", "active", [0, -1, 0, -1], [2, 2], scale, offset, -1.0, 1.0,
                             weight, bias)

    assert torch.autograd.gradcheck(fused, args)
    out = fused(*args)
    assert out.grad_fn is not None and "Convolution" in type(out.grad_fn).__name__


def test_errors():
    x, shifts, weight, bias, scale, offset = _case(1, 4, 5, 5, 3, torch.float32, seed=7)
    z4, one = [0] * 4, [1, 1]
    with pytest.raises(ValueError, match=r"weight must be \[O, C, 1, 1\]"):
        shift_conv1x1(x, shifts, "zeros", "sparse", z4, one, None, None, None, None, torch.randn(3, 4, 3, 3), None)
    with pytest.raises(ValueError, match="scale and offset go together"):
        shift_conv1x1(x, shifts, "zeros", "sparse", z4, one, scale, None, None, None, weight, None)
    with pytest.raises(ValueError, match=r"bias must be \[3\]"):
        shift_conv1x1(x, shifts, "zeros", "sparse", z4, one, None, None, None, None, weight, torch.randn(4))
    with pytest.raises(ValueError, match="must be 4-D"):
        shift_conv1x1(x[0], shifts, "zeros", "sparse", z4, one, None, None, None, None, weight, None)
    with pytest.raises(NotImplementedError, match="float32 and float64 only"):
        shift_conv1x1(x.bfloat16(), shifts, "zeros", "sparse", z4, one, None, None, None, None, weight.bfloat16(), None)
    with pytest.raises(ValueError, match="weight must be Float"):
        shift_conv1x1(x, shifts, "zeros", "sparse", z4, one, None, None, None, None, weight.double(), None)
    with pytest.raises(ValueError, match=r"pad must have 2 \* dims = 4"):
        shift_conv1x1(x, shifts, "zeros", "sparse", [0, 0], one, None, None, None, None, weight, None)


def test_fake_tensor_shapes():
    """The fake kernel gives the output shape and memory format (what export and torch.compile see)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, shifts, weight, bias, scale, offset = _case(2, 6, 9, 7, 5, torch.float32, seed=8)
    mode = FakeTensorMode()
    fx_, fs, fw = (mode.from_tensor(t) for t in (x.contiguous(memory_format=torch.channels_last), shifts, weight))
    with mode:
        out = shift_conv1x1(fx_, fs, "zeros", "sparse", [0, -1, 0, -1], [2, 2], None, None, 0.0, None, fw, None)
    assert tuple(out.shape) == (2, 5, 4, 3) and out.is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------- the pass

class Block(nn.Module):
    """MobileNetV2-style blocks (expand, depthwise, project) plus the cases the pass must leave alone."""

    def __init__(self):
        super().__init__()

        cbr = conv_bn_relu6

        self.expand = cbr(3, 48)
        self.dw1 = cbr(48, 48, 3, 1, 48)
        self.project1 = nn.Conv2d(48, 12, 1, bias=False)
        self.dw2 = cbr(12, 12, 3, 2, 12)  # strided: shift_pool
        self.project2 = nn.Conv2d(12, 8, 1)
        self.dw3 = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8), nn.BatchNorm2d(8), nn.Hardswish())
        self.project3 = nn.Conv2d(8, 8, 1)  # after a Hardswish: not fused
        self.dw4 = cbr(8, 8, 3, 1, 8)
        self.head = nn.Conv2d(8, 4, 3, padding=1)  # not a 1x1 conv: not fused

    def forward(self, x):
        y = self.project1(self.dw1(self.expand(x)))
        y = self.project2(self.dw2(y))
        y = self.project3(self.dw3(y))
        return self.head(self.dw4(y))


def _shifted(seed=0):
    torch.manual_seed(seed)
    model = randomize_batch_norms(Block())
    x = torch.randn(2, 3, 12, 12)
    return fxeff.transform(model.eval(), x, passes=[Shift()]).eval(), x


def _fused_count(gm):
    return sum(1 for n in gm.graph.nodes if n.target is FUSED)


@pytest.mark.parametrize("kind", ["symbolic", "dynamo", "export"])
def test_pass_on_every_graph_kind(kind):
    """The two MobileNet-style sites fuse (BatchNorm, ReLU6 and the 1x1 conv; the strided one pooled) and the
    output equals the unfused model's in every graph kind; the Hardswish site and the site before a 3x3 conv stay,
    with their reasons."""
    shifted, x = _shifted()
    with torch.no_grad():
        want = shifted(x)
    gm, report, out = rewritten(shifted, x, kind, FuseShift())
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert _fused_count(gm) == 2
    assert [s.status for s in report.sites] == ["rewritten", "rewritten", "skipped", "skipped"]
    reasons = [s.reason for s in report.sites]
    assert "BatchNorm" in reasons[0] and "clamp(0.0, 6.0)" in reasons[0] and "1x1 conv" in reasons[0]
    assert "is not a conv" in reasons[2] and "is not a 1x1 conv2d" in reasons[3]
    left = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (
        torch.ops.fxeff.shift.default, torch.ops.fxeff.shift_pool.default, torch.ops.fxeff.shift,
        torch.ops.fxeff.shift_pool)] + [n for n in gm.graph.nodes if n.op == "call_module" and
                                        isinstance(gm.get_submodule(n.target), fxeff.nn.Shift2d)]
    assert len(left) == 2


def test_dynamo_lifted_batch_norm_folds_in_the_graph():
    """dynamo lifts parameters to graph inputs: the BatchNorm is folded by graph ops at run time (rsqrt), so a
    changed running_var changes the result as it does the unfused model's."""
    shifted, x = _shifted(1)
    gm, report, _ = rewritten(shifted, x, "dynamo", FuseShift())
    assert any(n.target is torch.rsqrt for n in gm.graph.nodes)
    assert report.sites[0].status == "rewritten"


def test_pass_leaves_training_batch_norm_and_shared_maps():
    shifted, x = _shifted(2)
    shifted.train()
    gm = fxeff.transform(shifted, x, passes=[FuseShift()])
    assert _fused_count(gm) == 0  # a BatchNorm in train mode normalises with batch statistics: nothing to fold


def test_fused_model_trains_through_the_composition():
    """A fused graph still gives gradients (the op runs as its composition when grad is needed)."""
    shifted, x = _shifted(3)
    gm = fxeff.transform(shifted, x, passes=[FuseShift()])
    out = gm(x)
    out.square().mean().backward()
    fused = [n for n in gm.graph.nodes if n.target is FUSED]
    for node in fused:  # the 1x1 conv's weight (a channel-sorted copy where sorted) and the shifts learn
        weight, shifts = get_attr_value(gm, node.args[10].target), get_attr_value(gm, node.args[1].target)
        assert weight.grad is not None and weight.grad.abs().sum() > 0
        assert shifts.grad is not None


def test_deployment_forms(tmp_path):
    """torch.jit.trace and torch.export of the fused model, and the exported program saved and loaded: the same
    output, the fused op inside."""
    shifted, x = _shifted(4)
    gm = fxeff.transform(shifted, x, passes=[FuseShift()])
    with torch.no_grad():
        want = gm(x)
        traced = torch.jit.trace(gm, (x,))
        torch.testing.assert_close(traced(x), want)
        assert "fxeff::shift_conv1x1" in str(traced.inlined_graph)
        program = torch.export.export(gm, (x,))
        path = tmp_path / "fused.pt2"
        torch.export.save(program, str(path))
        loaded = torch.export.load(str(path)).module()
        torch.testing.assert_close(loaded(x), want)
    assert any(n.target is FUSED for n in program.graph.nodes)


def test_torchvision_mobilenet_v2_fuses_every_block():
    """Every one of MobileNetV2's 17 depthwise layers becomes a shift fused with its BatchNorm, ReLU6 and the
    projection conv; the output equals the unfused model's (random weights, eval mode)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2().eval()
    x = torch.randn(1, 3, 64, 64)
    shifted = fxeff.transform(model, x, passes=[Shift(init="max_tap")]).eval()
    fused = fxeff.transform(shifted, x, passes=[FuseShift()])
    assert _fused_count(fused) == 17
    with torch.no_grad():
        torch.testing.assert_close(fused(x), shifted(x), rtol=1e-4, atol=1e-4)
        cl = x.contiguous(memory_format=torch.channels_last)
        fused_cl, shifted_cl = (m.to(memory_format=torch.channels_last) for m in (fused, shifted))
        torch.testing.assert_close(fused_cl(cl), shifted_cl(cl), rtol=1e-4, atol=1e-4)


def test_config_round_trip():
    config = FuseShift()
    assert fxeff.config_from_dict(config.to_dict()) == config
    assert config.to_dict()["pass"] == "fuse_shift"


def test_no_shift_is_reported():
    model = nn.Sequential(nn.Conv2d(3, 4, 1)).eval()
    x = torch.randn(1, 3, 4, 4)
    gm = fxeff.transform(model, x, passes=[FuseShift()])
    assert "unchanged" in " ".join(gm.fxeff_report.notes)
    assert not any(n.target is operator.add for n in gm.graph.nodes)


@pytest.mark.parametrize("kind", ["symbolic", "export"])
def test_sort_channels_renumbers_the_producer_exactly(kind):
    """With sort_channels the first site's channels (the expand conv, its BatchNorm and ReLU6, the fused op's shifts,
    scale, offset and the 1x1 conv's columns) are renumbered so that equal shifts are neighbours: the report says so,
    the output is the unfused model's in both memory formats, and the user's modules are untouched."""
    shifted, x = _shifted(5)
    expand_weight = shifted.get_submodule("expand.0").weight.detach().clone()
    with torch.no_grad():
        want = shifted(x)
    gm, report, out = rewritten(shifted, x, kind, FuseShift())
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert "channels sorted by shift" in report.sites[0].reason
    assert "sorted by shift" not in report.sites[1].reason  # 12 channels: one block, nothing to gain
    fused = [n for n in gm.graph.nodes if n.target is FUSED][0]
    shifts = get_attr_value(gm, fused.args[1].target)
    keys = [tuple(r) for r in shifts.round().tolist()]
    assert keys == sorted(keys)
    assert torch.equal(shifted.get_submodule("expand.0").weight, expand_weight)
    with torch.no_grad():
        cl = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(gm(cl), want, rtol=1e-5, atol=1e-5)
    unsorted = rewritten(shifted, x, kind, FuseShift(sort_channels=False))[1]
    assert "sorted" not in unsorted.sites[0].reason


class SEBlock(nn.Module):
    """MobileNetV3-style: expand, depthwise + BatchNorm + Hardswish, squeeze-excite, project: the shift it becomes is
    read by the squeeze-excite block (not fusable); ``head`` reads the squeezed map through a flatten and a Linear
    where ``flat`` is set (the channels cannot be renumbered there)."""

    def __init__(self, flat=False):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(3, 48, 1, bias=False), nn.BatchNorm2d(48), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(48, 48, 3, 1, 1, groups=48, bias=False), nn.BatchNorm2d(48), nn.Hardswish())
        self.fc1, self.fc2 = nn.Conv2d(48, 12, 1), nn.Conv2d(12, 48, 1)
        self.project = nn.Sequential(nn.Conv2d(48, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.flat = flat
        self.head = nn.Linear(48, 5)

    def forward(self, x):
        y = self.dw(self.expand(x))
        scale = F.hardsigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        out = self.project(y * scale)
        if self.flat:
            return out, self.head(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))
        return out


def _se_shifted(flat=False, seed=6):
    torch.manual_seed(seed)
    model = randomize_batch_norms(SEBlock(flat)).eval()
    x = torch.randn(2, 3, 10, 10)
    return fxeff.transform(model, x, passes=[Shift()]).eval(), x


@pytest.mark.parametrize("kind", ["symbolic", "export"])
def test_sort_channels_at_an_unfused_site(kind):
    """A shift read by a squeeze-excite block is not fused, but its channels are renumbered through everything that
    carries them (the expand conv, BatchNorms, Hardswish, the pooling, fc2's output, the product) up to the convs
    reading them (fc1, the projection): the report says so, the shifts are sorted and the output is the unfused
    model's in both memory formats."""
    shifted, x = _se_shifted()
    with torch.no_grad():
        want = shifted(x)
    gm, report, out = rewritten(shifted, x, kind, FuseShift())
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert _fused_count(gm) == 0
    site = report.sites[0]
    assert site.status == "skipped" and "no 1x1 conv to fuse into" in site.reason
    assert "its channels sorted by shift" in site.reason and "2 conv(s) writing them, 2 reading them" in site.reason
    shift_nodes = [n for n in gm.graph.nodes if (n.op == "call_module" and isinstance(
        gm.get_submodule(n.target), fxeff.nn.Shift2d)) or n.target in (torch.ops.fxeff.shift.default,
                                                                       torch.ops.fxeff.shift)]
    assert len(shift_nodes) == 1
    node = shift_nodes[0]
    shifts = (gm.get_submodule(node.target).shifts if node.op == "call_module" else
              get_attr_value(gm, node.args[1].target))
    keys = [tuple(r) for r in shifts.detach().round().tolist()]
    assert keys == sorted(keys)
    with torch.no_grad():
        cl = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(gm(cl), want, rtol=1e-5, atol=1e-5)
    assert "sorted" not in rewritten(shifted, x, kind, FuseShift(sort_channels=False))[1].sites[0].reason


@pytest.mark.parametrize("kind", ["symbolic", "dynamo"])
def test_unfused_channels_stay_where_they_cannot_be_renumbered(kind):
    """Channels that reach a flatten and a Linear (symbolic), or tensors dynamo lifted to graph inputs: nothing is
    renumbered, the output is unchanged."""
    shifted, x = _se_shifted(flat=kind == "symbolic")
    with torch.no_grad():
        want = shifted(x)
    gm, report, out = rewritten(shifted, x, kind, FuseShift())
    for got, expected in zip(out if isinstance(out, tuple) else (out,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert "channels not sorted" in report.sites[0].reason


def test_torchvision_mobilenet_v3_sorts_its_unfused_sites():
    """MobileNetV3-Large: 3 of 15 shifts fuse; the 12 read by squeeze-excite blocks or Hardswish layers have their
    channels sorted; the output equals the unfused model's in both memory formats."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_large().eval()
    x = torch.randn(1, 3, 64, 64)
    shifted = fxeff.transform(model, x, passes=[Shift(init="max_tap")]).eval()
    fused = fxeff.transform(shifted, x, passes=[FuseShift()])
    sites = fused.fxeff_report.sites
    assert _fused_count(fused) == 3
    assert sum("its channels sorted by shift" in s.reason for s in sites if s.status == "skipped") == 12
    with torch.no_grad():
        torch.testing.assert_close(fused(x), shifted(x), rtol=1e-4, atol=1e-4)
        cl = x.contiguous(memory_format=torch.channels_last)
        fused_cl, shifted_cl = (m.to(memory_format=torch.channels_last) for m in (fused, shifted))
        torch.testing.assert_close(fused_cl(cl), shifted_cl(cl), rtol=1e-4, atol=1e-4)


def test_sort_channels_must_be_a_bool():
    with pytest.raises(TypeError, match="sort_channels must be a bool"):
        FuseShift(sort_channels=1)
    with pytest.raises(TypeError, match="interpolated must be a bool"):
        FuseShift(interpolated="yes")


@pytest.mark.parametrize("kind", ["symbolic", "export"])
def test_interpolated_shifts_fuse_only_when_asked(kind):
    """Active (interpolated) shifts measure slower fused: by default their sites are skipped with the reason and the
    model is unchanged; interpolated=True fuses them (the two MobileNet-style sites) with the same output."""
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(2, 3, 12, 12)
    shifted = fxeff.transform(model, x, passes=[Shift(mode="active")]).eval()
    with torch.no_grad():
        want = shifted(x)
    gm, report, out = rewritten(shifted, x, kind, FuseShift())
    assert _fused_count(gm) == 0 and all(s.status == "skipped" for s in report.sites)
    assert "interpolated (mode 'active')" in report.sites[0].reason
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    gm, report, out = rewritten(shifted, x, kind, FuseShift(interpolated=True))
    assert _fused_count(gm) == 2
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
