"""The focus pass: config, the normalised conv view on the three graph kinds, split location, skips, report,
and the exact semantics against a pure-PyTorch reference (conv outputs multiplied by the resized mask)."""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import fxeff
from fxeff.nn import AoIThreshold
from fxeff.passes import Focus, config_from_dict, conv_sites, graph_kind, normalize_fqn, run_passes
from fxeff.passes.config import PassConfig, register_pass_config
from fxeff.passes.measure import run_recording
from fxeff.transform import trace
from _focus_reference import focused_reference, mask_resize_reference, outside_means, threshold_for_fraction
from _graph_kinds import dynamo_graph, rewritten

FOCUSED = torch.ops.fxeff.focused_conv2d.default
AOI = torch.ops.fxeff.aoi_mask.default
RESIZE = torch.ops.fxeff.mask_resize.default


class ResidualNet(nn.Module):
    """A stem, then a strided conv, a residual block with dilation and groups, a depthwise conv, a 1x1 head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.block_a = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.block_b = nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=4)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        s = self.stem(x)
        y = F.relu(self.down(s))
        y = y + self.block_b(F.relu(self.block_a(y)))
        return self.head(F.relu(self.dw(y)))


class OddConvs(nn.Module):
    """Convs the pass must refuse (transposed, asymmetric 'same', 1-D) or handle exactly (reflect padding)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.same4 = nn.Conv2d(8, 8, 4, padding="same")
        self.line = nn.Conv1d(8, 4, 1)

    def forward(self, x):
        s = F.relu(self.stem(x))
        u = self.same4(self.up(self.reflect(s)))
        return self.line(u.flatten(2)).mean(-1)


def _eval(model):
    model.eval()
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


# ---------------------------------------------------------------- config

def test_focus_config_validation():
    assert Focus(threshold=1, execution="layer").threshold == 1.0
    for bad in (float("nan"), float("inf"), -math.inf):
        with pytest.raises(ValueError, match="fxeff.passes.Focus: threshold must be finite"):
            Focus(threshold=bad, execution="layer")
    for bad in ("0.5", None, True):
        with pytest.raises(TypeError, match="fxeff.passes.Focus: threshold must be a float"):
            Focus(threshold=bad, execution="layer")
    with pytest.raises(ValueError, match=r"reduce must be one of \('sum', 'mean'\), got 'max'"):
        Focus(threshold=0.5, reduce="max", execution="layer")
    with pytest.raises(ValueError, match="split must be"):
        Focus(threshold=0.5, split="", execution="layer")


def test_focus_config_dict_and_json_round_trip():
    config = Focus(threshold=0.5, split="features.3", reduce="mean", fill="mean", halo=2, execution="layer")
    d = json.loads(json.dumps(config.to_dict()))
    assert d == {"pass": "focus", "version": 1, "threshold": 0.5, "split": "features.3", "reduce": "mean",
                 "fill": "mean", "halo": 2, "execution": "layer", "tile": None, "dense_above": 0.9,
                 "fold_batchnorm": True, "fuse_epilogue": True, "plan_batch": None}
    assert config_from_dict(d) == config
    assert Focus.from_dict(d) == config
    assert config_from_dict({"pass": "focus", "threshold": 0.5, "split": "features.3"}) == \
        Focus(threshold=0.5, split="features.3", execution="auto")  # the default
    assert config_from_dict(config) is config


def test_config_from_dict_errors():
    with pytest.raises(ValueError, match="needs a 'pass' key"):
        config_from_dict({"threshold": 0.5})
    with pytest.raises(ValueError, match="unknown pass 'blur'"):
        config_from_dict({"pass": "blur"})
    with pytest.raises(ValueError, match=r"unknown keys \['treshold'\]"):
        config_from_dict({"pass": "focus", "treshold": 0.5})
    with pytest.raises(ValueError, match="'version' must be 1, got 7"):
        config_from_dict({"pass": "focus", "threshold": 0.5, "version": 7})
    with pytest.raises(TypeError, match="expected a dict or a pass config"):
        config_from_dict("focus")
    with pytest.raises(ValueError, match="already registered"):
        register_pass_config("focus")(type("OtherFocus", (PassConfig,), {}))


# ---------------------------------------------------------------- the conv view

def _site_summary(sites):
    return [(s.name, s.dims, s.transposed, s.stride, s.padding, s.dilation, s.groups, tuple(s.weight_shape),
             tuple(s.output_shape), s.unsupported is None) for s in sites]


def test_conv_view_is_the_same_on_symbolic_dynamo_and_export_graphs():
    model = _eval(ResidualNet())
    x = torch.randn(2, 3, 16, 16)
    symbolic = trace(model)
    run_recording(symbolic, (x,))  # symbolic graphs carry no shapes: fill them
    dyn, _ = dynamo_graph(model, x)
    exported = torch.export.export(model, (x,))
    graphs = {"symbolic": symbolic, "dynamo": dyn, "export": exported.graph_module, "export_module": exported.module()}
    assert [graph_kind(g) for g in graphs.values()] == ["symbolic", "dynamo", "export", "export"]
    summaries = {name: _site_summary(conv_sites(g)) for name, g in graphs.items()}
    expected = [
        ("stem.0", 2, False, (1, 1), (1, 1), (1, 1), 1, (8, 3, 3, 3), (2, 8, 16, 16), True),
        ("down", 2, False, (2, 2), (1, 1), (1, 1), 1, (16, 8, 3, 3), (2, 16, 8, 8), True),
        ("block_a", 2, False, (1, 1), (1, 1), (1, 1), 1, (16, 16, 3, 3), (2, 16, 8, 8), True),
        ("block_b", 2, False, (1, 1), (2, 2), (2, 2), 4, (16, 4, 3, 3), (2, 16, 8, 8), True),
        ("dw", 2, False, (1, 1), (1, 1), (1, 1), 16, (16, 1, 3, 3), (2, 16, 8, 8), True),
        ("head", 2, False, (1, 1), (0, 0), (1, 1), 1, (4, 16, 1, 1), (2, 4, 8, 8), True),
    ]
    for name, summary in summaries.items():
        assert summary == expected, name
    kinds = {name: {s.kind for s in conv_sites(g)} for name, g in graphs.items()}
    assert kinds == {"symbolic": {"call_module"}, "dynamo": {"torch_function"}, "export": {"aten"},
                     "export_module": {"aten"}}
    assert conv_sites(symbolic)[2].bias is None and conv_sites(dyn)[2].bias is None


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
def test_conv_view_of_odd_convs():
    model = OddConvs().eval()
    x = torch.randn(1, 3, 8, 8)
    symbolic = trace(model)
    run_recording(symbolic, (x,))
    exported = torch.export.export(model, (x,)).module()
    for gm in (symbolic, exported):
        sites = {s.name: s for s in conv_sites(gm)}
        assert sites["up"].transposed and sites["up"].dims == 2
        assert sites["line"].dims == 1
        assert "asymmetric" in sites["same4"].unsupported
        assert sites["reflect"].describe().startswith("conv2d 8->8 3x3")
    reflect = {s.name: s for s in conv_sites(symbolic)}["reflect"]
    assert reflect.padding_mode == "reflect" and reflect.describe().endswith("reflect")


@pytest.mark.parametrize("mangled, clean", [("L['self'].features[3]", "features.3"),
                                            ("L['self']._modules['layer1']._modules['0'].conv1", "layer1.0.conv1"),
                                            ("L['mod'].stem", "stem"), ("features.3", "features.3")])
def test_normalize_fqn(mangled, clean):
    assert normalize_fqn(mangled) == clean


# ---------------------------------------------------------------- semantics

def _masked_inputs():
    """Three images with different bright regions, so the masks differ per image."""
    x = torch.randn(3, 3, 32, 32) * 0.1
    x[0, :, 2:12, 3:15] += 2.0
    x[1, :, 18:30, 16:31] += 2.0
    x[2, :, 5:9, 5:9] += 2.0
    x[2, :, 20:28, 2:10] += 2.0
    return x


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_focused_model_equals_reference(reduce):
    model = _eval(ResidualNet())
    x = _masked_inputs()
    t = threshold_for_fraction(model, "stem", x, 0.3, reduce)
    gm = fxeff.transform(model, x, [Focus(threshold=t, split="stem", reduce=reduce, execution="layer")])
    with torch.no_grad():
        for inputs in (x, x.flip(0), x[[2, 0]].roll(7, dims=-1), _masked_inputs()[1:]):
            with focused_reference(model, "stem", t, reduce) as masks:
                expected = model(inputs)
            assert masks[0].any() and not masks[0].all()
            torch.testing.assert_close(gm(inputs), expected, rtol=1e-4, atol=1e-5)
            assert (model(inputs) - expected).abs().max() > 1e-3  # the reference really differs from dense
        with focused_reference(model, "stem", t, reduce) as masks:
            model(x)
    per_image = masks[0].float().mean(dim=(1, 2))
    assert len(set(per_image.tolist())) == 3  # different masks per image within the batch
    torch.testing.assert_close(torch.tensor(gm.fxeff_report.aoi_fractions), per_image)


def test_rewritten_graph_structure():
    model = _eval(ResidualNet())
    x = torch.randn(2, 3, 16, 16)
    gm = fxeff.transform(model, x, [Focus(threshold=0.0, split="stem", execution="layer")])
    nodes = list(gm.graph.nodes)
    masks = [n for n in nodes if n.target == AOI]
    resizes = [n for n in nodes if n.target == RESIZE]
    focused = [n for n in nodes if n.target == FOCUSED]
    assert len(masks) == 1 and masks[0].args[0].target == "stem.2"  # right after the split's output
    assert nodes.index(masks[0]) == nodes.index(masks[0].args[0]) + 1
    assert len(resizes) == 1 and resizes[0].args == (masks[0], [8, 8])  # one resize per distinct grid
    assert len(focused) == 5 and all(n.args[3] is resizes[0] for n in focused)
    assert [n.target for n in nodes if n.op == "call_module" and "stem.0" == n.target] == ["stem.0"]
    # parameters stay shared: the focused convs read the model's own Parameters through get_attr
    weights = {n.args[1].target for n in focused}
    assert weights == {"down.weight", "block_a.weight", "block_b.weight", "dw.weight", "head.weight"}
    assert gm.get_parameter("down.weight") is model.down.weight


def test_mask_follows_each_new_input():
    model = _eval(ResidualNet())
    x = _masked_inputs()
    t = threshold_for_fraction(model, "stem", x, 0.3)
    gm = fxeff.transform(model, x[:1], [Focus(threshold=t, split="stem", execution="layer")])
    with torch.no_grad(), focused_reference(model, "stem", t):
        expected = model(x[1:2])
    torch.testing.assert_close(gm(x[1:2]), expected, rtol=1e-4, atol=1e-5)


def test_gradients_flow_through_focused_convs():
    model = _eval(ResidualNet())
    x = _masked_inputs()
    t = threshold_for_fraction(model, "stem", x, 0.4)
    gm = fxeff.transform(model, x, [Focus(threshold=t, split="stem", execution="layer")])
    gm(x).square().sum().backward()
    focused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with focused_reference(model, "stem", t):
        model(x).square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(focused_grads[name], p.grad, rtol=1e-3, atol=1e-4, msg=name)


def test_training_mode_batchnorm_statistics_are_untouched_by_the_pass():
    model = ResidualNet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fxeff.transform(model, torch.randn(2, 3, 16, 16), [Focus(threshold=0.0, split="stem", execution="layer")])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------- skips and odd convs

@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
def test_skip_reasons_and_exact_reflect_padding():
    model = OddConvs().eval()
    x = torch.randn(2, 3, 12, 12)
    gm = fxeff.transform(model, x, [Focus(threshold=0.5, split="stem", execution="layer")])
    report = gm.fxeff_report
    status = {s.name: (s.status, s.reason) for s in report.sites}
    assert status["stem"] == ("skipped", "upstream of the AoI split")
    assert status["reflect"] == ("rewritten", "")
    assert status["up"][0] == "skipped" and "transposed" in status["up"][1]
    assert status["same4"][0] == "skipped" and "asymmetric" in status["same4"][1]
    assert status["line"][0] == "skipped" and "1-D conv" in status["line"][1]
    # the reflect conv is computed with reflect padding (F.pad in that mode), never silently zero-padded
    pads = [n for n in gm.graph.nodes if n.target is F.pad]
    assert len(pads) == 1 and pads[0].kwargs == {"mode": "reflect"}
    with torch.no_grad(), focused_reference(model, "stem", 0.5, unfocused={"same4"}):
        expected = model(x)
    torch.testing.assert_close(gm(x), expected, rtol=1e-4, atol=1e-5)


def test_conv_on_a_branch_not_reading_the_split_is_skipped():
    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(3, 4, 3, padding=1)
            self.c = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.c(F.relu(self.a(x))) + self.b(x)

    gm = fxeff.transform(TwoBranches(), torch.randn(1, 3, 8, 8), [Focus(threshold=0.1, split="a", execution="layer")])
    status = {s.name: (s.status, s.reason) for s in gm.fxeff_report.sites}
    assert status["a"] == ("skipped", "upstream of the AoI split")
    assert status["b"][0] == "skipped" and status["b"][1].startswith("not downstream of the AoI split")
    assert status["c"] == ("rewritten", "")


# ---------------------------------------------------------------- locating the split

class SeedStyle(nn.Module):
    """The seed's pattern: early layers, a channel-sum threshold, and later convs (spelling chosen per test)."""

    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling
        self.top = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.aoi = AoIThreshold(0.8)
        self.rest = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, padding=1))

    def forward(self, x):
        y = self.top(x)
        if self.spelling == "module":
            mask = self.aoi(y)
        elif self.spelling == "sum_ge":
            mask = y.sum(1) >= 0.8
        elif self.spelling == "torch_ge":
            mask = torch.ge(torch.sum(y, dim=1), 0.8)
        else:
            mask = fxeff.ops.aoi_mask(y, 0.8)
        return self.rest(y), mask


@pytest.mark.parametrize("spelling", ["module", "sum_ge", "torch_ge", "op"])
def test_existing_aoi_threshold_is_found_without_split(spelling):
    model = SeedStyle(spelling).eval()
    x = torch.randn(2, 3, 16, 16)
    gm = fxeff.transform(model, x, [Focus(threshold=0.8, execution="layer")])
    report = gm.fxeff_report
    assert report.split.startswith("top_1") and "input of" in report.split
    assert [s.status for s in report.sites] == ["skipped", "rewritten", "rewritten"]
    out, mask = gm(x)
    with torch.no_grad(), focused_reference(model, "top", 0.8) as masks:
        expected, _ = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mask, masks[0])


@pytest.mark.parametrize("spelling", ["sum_ge", "module"])
@pytest.mark.parametrize("kind", ["dynamo", "export"])
def test_existing_threshold_is_found_in_dynamo_and_export_graphs(kind, spelling):
    model = SeedStyle(spelling).eval()
    x = torch.randn(2, 3, 16, 16)
    if kind == "dynamo":
        gm, inputs = dynamo_graph(model, x)
    else:
        gm, inputs = torch.export.export(model, (x,)).module(), (x,)
    report = run_passes(gm, inputs, [Focus(threshold=0.8, execution="layer")])
    assert [s.status for s in report.sites] == ["skipped", "rewritten", "rewritten"]
    with torch.no_grad(), focused_reference(model, "top", 0.8):
        expected, _ = model(x)
    out = gm(*inputs)[0] if kind == "dynamo" else gm(x)[0]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["symbolic", "dynamo", "export"])
def test_split_by_module_fqn_on_every_graph_kind(kind):
    model = _eval(ResidualNet())
    x = _masked_inputs()
    t = threshold_for_fraction(model, "stem", x, 0.3)
    if kind == "symbolic":
        gm, inputs = trace(model), (x,)
    elif kind == "dynamo":
        gm, inputs = dynamo_graph(model, x)
    else:
        gm, inputs = torch.export.export(model, (x,)).module(), (x,)
    report = run_passes(gm, inputs, [{"pass": "focus", "threshold": t, "split": "stem", "execution": "layer"}])
    assert report.split == "stem (given)"
    assert [s.name for s in report.rewritten] == ["down", "block_a", "block_b", "dw", "head"]
    with torch.no_grad(), focused_reference(model, "stem", t):
        expected = model(x)
    out = gm(*inputs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


class ConvIntoConv(nn.Module):
    """A conv whose output feeds the next conv directly (ConvNeXt's downsampling conv into a 7x7 depthwise)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 2, stride=2)
        self.dw = nn.Conv2d(16, 16, 7, padding=3, groups=16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.dw(self.down(F.relu(self.stem(x)))))


@pytest.mark.parametrize("kind", ["symbolic", "dynamo", "export", "dynamic"])
def test_a_conv_feeding_a_conv_reads_the_rewritten_conv(kind):
    """Each focused conv is wired to its input as the graph holds it when it is rewritten (the conv before it
    may already be a focused_conv2d): ConvNeXt crashed in graph.lint() with 'used before it has been defined'."""
    model = ConvIntoConv().eval()
    x = _masked_inputs()
    t = threshold_for_fraction(model, "stem", x, 0.3)
    config = Focus(threshold=t, split="stem", execution="layer")
    if kind == "dynamic":
        reports = []

        def backend(gm, example_inputs):
            reports.append(run_passes(gm, example_inputs, [config]))
            return gm

        torch._dynamo.reset()
        with torch.no_grad():
            out = torch.compile(model, backend=backend, dynamic=True, fullgraph=True)(x)
        report = reports[0]
    else:
        _, report, out = rewritten(model, x, kind, config)
        out = out[0] if isinstance(out, (tuple, list)) else out
    assert [s.name for s in report.rewritten] == ["down", "dw", "head"]
    with torch.no_grad(), focused_reference(model, "stem", t):
        expected = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_dynamic_shapes_graph_computes_each_grid_in_the_graph():
    model = _eval(ResidualNet())
    t = 0.5
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(run_passes(gm, example_inputs, [Focus(threshold=t, split="stem", execution="layer")]))
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=True, fullgraph=True)
    for shape in ((2, 3, 32, 24), (3, 3, 21, 30), (4, 3, 17, 16)):  # H != W, N > 1: no duck sizing, no 0/1 specialization
        x = torch.randn(shape)
        with torch.no_grad(), focused_reference(model, "stem", t):
            expected = model(x)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-5)
    assert len(graphs) == 1  # one graph for every size: the grids are computed from sym_size in the graph
    assert [s.name for s in graphs[0].rewritten] == ["down", "block_a", "block_b", "dw", "head"]


def test_split_by_node_name_and_by_leaf_module():
    model = _eval(ResidualNet())
    x = torch.randn(1, 3, 16, 16)
    by_leaf = fxeff.transform(model, x, [Focus(threshold=0.0, split="stem.2", execution="layer")]).fxeff_report
    by_node = fxeff.transform(model, x, [Focus(threshold=0.0, split="relu", execution="layer")]).fxeff_report  # F.relu after down
    assert [s.name for s in by_leaf.rewritten] == ["down", "block_a", "block_b", "dw", "head"]
    assert [s.name for s in by_node.rewritten] == ["block_a", "block_b", "dw", "head"]


def test_split_errors():
    model = ResidualNet()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="split 'nope' names no module of ResidualNet"):
        fxeff.transform(model, x, [Focus(threshold=0.0, split="nope", execution="layer")])
    with pytest.raises(ValueError, match="no default split for model class 'ResidualNet'.*no AoI threshold"):
        fxeff.transform(model, x, [Focus(threshold=0.0, execution="layer")])


class PatchEmbedding(nn.Module):
    """A transformer's shape: one conv (the patch embedding), then only linear layers."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.mlp = nn.Linear(8, 8)

    def forward(self, x):
        return self.mlp(self.patch(x).flatten(2).transpose(1, 2)).mean(1)


def test_a_model_with_one_conv_is_told_that_focus_saves_nothing():
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"Focus: PatchEmbedding has one conv \('patch'\): .* focusing saves nothing"):
        fxeff.transform(PatchEmbedding(), x, [Focus(threshold=0.0, execution="layer")])
    with pytest.raises(ValueError, match=r"calibrate: PatchEmbedding has one conv \('patch'\): .* saves nothing"):
        fxeff.focus.calibrate(PatchEmbedding(), x, 0.3)


def test_two_different_thresholds_need_an_explicit_split():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = self.a(x)
            z = self.b(y)
            return z, y.sum(1) >= 0.1, z.sum(1) >= 0.1

    with pytest.raises(ValueError, match="2 AoI thresholds on different activations"):
        fxeff.transform(Two(), torch.randn(1, 3, 8, 8), [Focus(threshold=0.1, execution="layer")])


# ---------------------------------------------------------------- report

def test_report_counts_macs_of_the_aoi():
    model = _eval(ResidualNet())
    x = _masked_inputs()
    t = threshold_for_fraction(model, "stem", x, 0.3)
    report = fxeff.transform(model, x, [Focus(threshold=t, split="stem", execution="layer")]).fxeff_report
    with torch.no_grad(), focused_reference(model, "stem", t) as masks:
        model(x)
    grid = mask_resize_reference(masks[0], (16, 16))  # 32x32 input, stride 2 after the stem
    per_position = {"down": 16 * 8 * 9, "block_a": 16 * 16 * 9, "block_b": 16 * 4 * 9, "dw": 16 * 9, "head": 4 * 16}
    for name, macs in per_position.items():
        site = report.site(name)
        assert site.macs_before == 3 * 16 * 16 * macs
        assert site.macs_after == int(grid.sum()) * macs
    stem = report.site("stem.0")
    assert stem.macs_before == stem.macs_after == 3 * 32 * 32 * 8 * 27
    total_before = stem.macs_before + sum(3 * 16 * 16 * m for m in per_position.values())
    assert report.macs_before == total_before == report.model_macs_before  # FlopCounterMode agrees
    assert report.macs_after == report.model_macs_after < report.macs_before
    assert report.mac_ratio == pytest.approx(report.macs_after / report.macs_before)
    text = str(report)
    assert "AoI split: stem (given)" in text and "5 rewritten, 1 skipped" in text
    assert "upstream of the AoI split" in text and f"ratio {report.mac_ratio:.3f}" in text
    d = json.loads(report.to_json())
    assert d["pass_name"] == "focus" and len(d["sites"]) == 6 and d["macs_after"] == report.macs_after


def test_fake_inputs_give_na_rather_than_numbers():
    model = _eval(ResidualNet())
    with FakeTensorMode():
        x = torch.empty(2, 3, 16, 16)
    report = fxeff.transform(model, x, [Focus(threshold=0.0, split="stem", execution="layer")]).fxeff_report
    assert report.aoi_fractions is None and report.macs_after is None and report.model_macs_after is None
    assert all(s.macs_after is None for s in report.rewritten)
    assert report.site("head").macs_before == 2 * 64 * 64
    assert "n/a" in str(report)


def test_run_passes_argument_errors():
    gm = trace(ResidualNet())
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="passes is empty"):
        run_passes(gm, (x,), [])
    with pytest.raises(TypeError, match="wrap it in a list"):
        run_passes(gm, (x,), Focus(threshold=0.0, split="stem", execution="layer"))
    with pytest.raises(ValueError, match=r"one value per graph input \(1: \['x'\]\), got 2"):
        run_passes(gm, (x, x), [Focus(threshold=0.0, split="stem", execution="layer")])
    with pytest.raises(TypeError, match="must be a torch.fx.GraphModule"):
        run_passes(ResidualNet(), (x,), [Focus(threshold=0.0, split="stem", execution="layer")])


def test_site_report_validation():
    from fxeff.report import SiteReport

    with pytest.raises(ValueError, match="status must be one of"):
        SiteReport("conv", "conv2d", "done")
    with pytest.raises(ValueError, match="a skipped site needs a reason"):
        SiteReport("conv", "conv2d", "skipped")
    report = fxeff.Report("focus", [SiteReport("a", "conv2d", "rewritten", "", 10, 4)])
    assert report.mac_ratio == 0.4 and report.macs_after == 4
    with pytest.raises(KeyError, match="no site named 'b'"):
        report.site("b")


# ---------------------------------------------------------------- fill="mean"

FOCUSED_CONVS = ["down", "block_a", "block_b", "dw", "head"]


@pytest.mark.parametrize("kind", ["symbolic", "dynamo", "export"])
def test_fill_mean_puts_the_original_background_outside_the_aoi(kind):
    model = _eval(ResidualNet())
    x = _masked_inputs()
    t = threshold_for_fraction(model, "stem", x, 0.3)
    fills = outside_means(model, "stem", t, x, FOCUSED_CONVS)
    _, report, out = rewritten(model, x, kind, Focus(threshold=t, split="stem", fill="mean", execution="layer"))
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert [s.name for s in report.rewritten] == FOCUSED_CONVS
    assert any("fill='mean'" in note for note in report.notes)
    with torch.no_grad(), focused_reference(model, "stem", t, fills=fills):
        expected = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad(), focused_reference(model, "stem", t):
        zeros = model(x)
    assert (zeros - expected).abs().max() > 1e-2  # the fill really changes the result


def test_fill_mean_gradients_reach_weights_and_biases():
    """fill='mean' is emitted as focused_conv2d(x, w, bias - mean) + mean: the bias (and a conv without one)
    still gets the gradient of the reference semantics."""
    model = _eval(ResidualNet()).double()
    x = _masked_inputs().double()
    t = threshold_for_fraction(model, "stem", x, 0.3)
    fills = outside_means(model, "stem", t, x, FOCUSED_CONVS)
    gm = fxeff.transform(model, x, [Focus(threshold=t, split="stem", fill="mean", execution="layer")])
    assert not any(n.target is torch.ops.aten.where.self for n in gm.graph.nodes)
    params = dict(model.named_parameters())

    def grads(fn):
        model.zero_grad()
        (fn(x) ** 2).sum().backward()
        return {k: p.grad.clone() for k, p in params.items() if p.grad is not None}

    got = grads(gm)
    with focused_reference(model, "stem", t, fills={k: v.double() for k, v in fills.items()}):
        expected = grads(model)
    assert set(got) == set(expected) and "down.bias" in got and "block_a.weight" in got
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-9, atol=1e-9, msg=k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fill_mean_channels_last_and_dtypes(dtype):
    model = _eval(ResidualNet()).to(dtype=dtype, memory_format=torch.channels_last)
    x = _masked_inputs().to(dtype=dtype, memory_format=torch.channels_last)
    t = threshold_for_fraction(model, "stem", x, 0.3)
    gm = fxeff.transform(model, x, [Focus(threshold=t, split="stem", fill="mean", execution="layer")])
    fills = outside_means(model, "stem", t, x, FOCUSED_CONVS)
    with torch.no_grad():
        out = gm(x)
        with focused_reference(model, "stem", t, fills=fills):
            expected = model(x)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    else:  # bf16 rounds each layer differently from the dense reference; compare the whole output
        assert float((out - expected).float().norm() / expected.float().norm()) < 1e-2


def test_fill_mean_buffers_and_closeness_on_a_flat_background():
    model = _eval(ResidualNet())
    x = torch.full((4, 3, 32, 32), -0.5)  # a flat background with one bright object per image
    for i, (r, c) in enumerate([(4, 4), (12, 18), (20, 6), (8, 22)]):
        x[i, :, r:r + 8, c:c + 8] = torch.rand(3, 8, 8) + 1.0
    t = threshold_for_fraction(model, "stem", x, 0.3)
    gm = fxeff.transform(model, x, [Focus(threshold=t, split="stem", fill="mean", execution="layer")])
    fills = outside_means(model, "stem", t, x, FOCUSED_CONVS)
    stored = {n.target: gm.get_buffer(n.target) for n in gm.graph.nodes if n.op == "get_attr" and "aoi_fill" in n.target}
    assert len(stored) == len(FOCUSED_CONVS)
    for name in FOCUSED_CONVS:
        buffer = stored[f"{name}_aoi_fill"]
        assert buffer.shape == (1, model.get_submodule(name).out_channels, 1, 1)
        torch.testing.assert_close(buffer.flatten().double(), fills[name], rtol=1e-5, atol=1e-6)
    zeros = fxeff.transform(model, x, [Focus(threshold=t, split="stem", execution="layer")])
    with torch.no_grad():
        dense = model(x)
        error_mean = (gm(x) - dense).norm() / dense.norm()
        error_zeros = (zeros(x) - dense).norm() / dense.norm()
    assert error_mean < 0.5 * error_zeros  # the background the later layers expect, instead of zeros


def test_fill_errors():
    with pytest.raises(ValueError, match=r"fill must be one of \('zeros', 'mean'\), got 'max'"):
        Focus(threshold=0.0, fill="max", execution="layer")
    model = _eval(ResidualNet())
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="fill='mean' measures the background on real example inputs, got fake"):
        run_passes(trace(model), (fake,), [Focus(threshold=0.0, split="stem", fill="mean", execution="layer")])


@pytest.mark.parametrize("kind", ["symbolic", "dynamo", "export"])
def test_halo_grows_the_aoi_before_the_convs_read_it(kind):
    model = _eval(ResidualNet())
    x = _masked_inputs()
    t = threshold_for_fraction(model, "stem", x, 0.2)
    _, report, out = rewritten(model, x, kind, Focus(threshold=t, split="stem", halo=2, execution="layer"))
    out = out[0] if isinstance(out, (tuple, list)) else out
    with torch.no_grad(), focused_reference(model, "stem", t, halo=2) as masks:
        expected = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    grown = masks[0].float().mean(dim=(1, 2))
    with torch.no_grad(), focused_reference(model, "stem", t) as plain:
        model(x)
    assert (grown > plain[0].float().mean(dim=(1, 2))).all()  # the halo really adds pixels
    if kind == "symbolic":
        torch.testing.assert_close(torch.tensor(report.aoi_fractions), grown)  # the report shows the grown AoI


def test_dilate_mask_matches_the_shift_reference():
    from fxeff.passes.focus import dilate_mask
    from _focus_reference import dilate_reference

    gen = torch.Generator().manual_seed(0)
    for shape in [(3, 11, 14), (2, 1, 1), (1, 5, 1), (2, 4, 9)]:
        mask = torch.rand(shape, generator=gen) < 0.08
        mask[0, 0, -1] = True  # at least one pixel, on a border
        for halo in range(0, 10):  # every doubling remainder, and halos wider than the mask
            assert torch.equal(dilate_mask(mask, halo), dilate_reference(mask, halo)), (shape, halo)
    strided = (torch.rand(2, 12, 20, generator=gen) < 0.1)[:, ::2, ::2]  # non-contiguous
    assert torch.equal(dilate_mask(strided, 2), dilate_reference(strided.contiguous(), 2))
    with pytest.raises(ValueError, match="halo must be an int >= 0, got -1"):
        Focus(threshold=0.0, halo=-1, execution="layer")


def test_a_pass_that_focuses_nothing_removes_only_its_own_mask_and_halo():
    model = _eval(ResidualNet())
    x = _masked_inputs()
    t = threshold_for_fraction(model, "stem", x, 0.3)
    gm = fxeff.transform(model, x, [Focus(threshold=t, split="stem", execution="layer")])
    before = [n.target for n in gm.graph.nodes]
    report = run_passes(gm, (x,), [Focus(threshold=t, split="stem", halo=1, execution="layer")])  # nothing left to focus
    assert not report.rewritten and "no conv could be focused" in " ".join(report.notes)
    assert [n.target for n in gm.graph.nodes] == before  # the first pass's mask stays, the new chain is gone


class ChannelsLastBlock(nn.Module):
    """ConvNeXt's and Swin's shape: a conv, then channels-last [N, H, W, C] around a LayerNorm and a Linear, then
    channels-first again for the next conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.mlp = nn.Linear(8, 8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.mlp(self.norm(self.stem(x).permute(0, 2, 3, 1)))
        return self.conv(y.permute(0, 3, 1, 2))


@pytest.mark.parametrize("kind", ["symbolic", "dynamo", "export"])
def test_a_channels_last_split_is_refused_and_channels_first_is_taken(kind):
    """The AoI reduces over axis 1: a split whose output is [N, H, W, C] (Swin's patch embedding, the inside of
    a ConvNeXt block) was reduced over H without a word; now it is refused, and the same model split where it is
    channels-first again is focused exactly."""
    model = ChannelsLastBlock().eval()
    x = torch.randn(2, 3, 12, 10)  # H != W: a reduction over the wrong axis would not even fit the grid
    for split in ("norm", "mlp"):
        with pytest.raises(ValueError, match=r"split " + split + r" \(given\) \[shape \(2, 12, 10, 8\)\] is "
                                             r"\[N, H, W, C\]: its channels are on axis 3"):
            rewritten(model, x, kind, Focus(threshold=0.0, split=split, execution="layer"))
    with pytest.raises(ValueError, match=r"split_activations: the output of split 'mlp' .* is \[N, H, W, C\]"):
        fxeff.focus.calibrate(model, x, 0.3, split="mlp")
    t = threshold_for_fraction(model, "stem", x, 0.4)
    _, report, out = rewritten(model, x, kind, Focus(threshold=t, split="stem", execution="layer"))
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert [s.name for s in report.rewritten] == ["conv"]
    with torch.no_grad(), focused_reference(model, "stem", t):
        expected = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_channel_axes_follow_permutes_and_lose_reshapes():
    from fxeff.passes.layout import ChannelAxes, channels_first_error

    x = torch.randn(2, 3, 4, 5)
    w = torch.randn(6, 3, 1, 1)
    with ChannelAxes([x]) as axes:
        y = F.conv2d(x, w)
        nhwc = y.permute(0, 2, 3, 1)
        back = torch.ops.aten.permute.default(F.layer_norm(nhwc, (6,)), [0, 3, 1, 2])
        swapped = y.transpose(1, 3)
        moved = torch.movedim(y, 1, -1)
        summed = y + torch.ones(6, 1, 1)
        same = y.reshape(2, 6, 4, 5)
        other = y.reshape(2, 4, 6, 5)
        flat = y.flatten(2)
        shuffled = y.view(2, 2, 3, 4, 5).transpose(1, 2).contiguous().view(2, 6, 4, 5)  # ShuffleNet's channel shuffle
        copied = torch.ops.aten.permute_copy.default(y, [0, 2, 3, 1])
        mixed = torch.einsum("nchw->nhwc", y)
    assert axes.of(x) == axes.of(y) == axes.of(back) == axes.of(summed) == axes.of(same) == (0, 1, 2, 3)
    assert axes.of(shuffled) == (0, 1, 2, 3)
    assert axes.of(nhwc) == axes.of(moved) == axes.of(copied) == (0, 2, 3, 1) and axes.of(swapped) == (0, 3, 2, 1)
    assert axes.of(other) is None and axes.of(flat) is None and axes.of(mixed) is None
    assert channels_first_error("f", "y", axes.of(y), y.shape) is None
    assert "is [N, H, W, C]: its channels are on axis 3" in channels_first_error("f", "y", axes.of(nhwc), nhwc.shape)
    assert "cannot tell which axis" in channels_first_error("f", "y", None, other.shape)


# ---------------------------------------------------------------- BatchNorm folded into focused convs

class ConvBNNet(nn.Module):
    """conv-BN-ReLU blocks after the stem: one BN as a module, one as F.batch_norm on buffers, one in a residual
    branch, and a conv whose BN also feeds another user (kept)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.a = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(16)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(16)
        self.c = nn.Conv2d(16, 16, 1)
        self.register_buffer("c_mean", torch.rand(16) - 0.5)
        self.register_buffer("c_var", torch.rand(16) + 0.5)

    def forward(self, x):
        s = self.stem(x)
        y = F.relu(self.bn_a(self.a(s)))
        y = y + F.relu(self.bn_b(self.b(y)))
        return F.batch_norm(self.c(y), self.c_mean, self.c_var, eps=1e-3)


@pytest.mark.parametrize("fill", ["zeros", "mean"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batchnorm_folded_into_focused_convs_computes_the_same(fill, channels_last):
    model = _eval(ConvBNNet())
    with torch.no_grad():
        for bn in (model.bn_a, model.bn_b):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    x = _masked_inputs()
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    t = threshold_for_fraction(model, "stem", x, 0.3)
    kept = fxeff.transform(model, x, [Focus(t, split="stem", fill=fill, execution="layer", fold_batchnorm=False)])
    gm = fxeff.transform(model, x, [Focus(t, split="stem", fill=fill, execution="layer")])
    nodes = list(gm.graph.nodes)
    assert not any(n.op == "call_module" and n.target.startswith("bn_") for n in nodes)
    assert not any(n.target is F.batch_norm for n in nodes)
    assert any(n.op == "call_module" and n.target.startswith("bn_") for n in kept.graph.nodes)
    assert any("3 eval-mode BatchNorm(s) folded" in note for note in gm.fxeff_report.notes)
    focused = [n for n in nodes if n.target == FOCUSED]
    assert len(focused) == 3 and all(n.args[8] is not None for n in focused)  # BN(0) outside is no zero fill
    if channels_last:  # the folded weights keep the model's memory format
        assert all(gm.get_buffer(n.args[1].target).is_contiguous(memory_format=torch.channels_last)
                   for n in focused if n.args[1].target.endswith("_bn_weight"))
    with torch.no_grad():
        for inputs in (x, x.flip(0)):
            torch.testing.assert_close(gm(inputs), kept(inputs), rtol=1e-4, atol=1e-5)


def test_batchnorm_in_training_mode_or_with_other_readers_is_kept():
    model = _eval(ConvBNNet())
    model.bn_b.train()
    x = _masked_inputs()
    t = threshold_for_fraction(model, "stem", x, 0.3)
    gm = fxeff.transform(model, x, [Focus(t, split="stem", execution="layer")])
    modules = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert "bn_b" in modules and "bn_a" not in modules
    assert any("2 eval-mode BatchNorm(s) folded into the focused conv before them (bn_a, " in note
               for note in gm.fxeff_report.notes)
    with pytest.raises(TypeError, match="fold_batchnorm must be a bool"):
        Focus(0.0, fold_batchnorm="yes")


# ---------------------------------------------------------------- residual adds and activations fused into focused convs

class EpilogueNet(nn.Module):
    """After the stem, focused convs followed by each spelling of a clamp activation (module, function, method, in
    place or not), residual adds (plain and in place), one whose output has a second reader, and ops that are no
    epilogue (a product, a sigmoid, an add after the activation)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(10))
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.relu6 = nn.ReLU6()
        self.hardtanh = nn.Hardtanh(-0.5, 0.5)

    def forward(self, x):
        c = self.convs
        y = self.relu(self.bn(c[0](self.stem(x))))
        y = self.relu6(c[1](y) * 4)  # not fused: the clamp reads a product
        y = self.hardtanh(c[2](y))
        y = F.relu6(c[3](y) * 0.5 + c[4](y))  # c[4]: the product is its residual, then ReLU6
        y = torch.clamp(c[5](y), min=-1.0, max=2.0)
        z = c[6](y)
        y = z.clamp_min(0.1) + torch.sigmoid(z)  # two readers: not fused
        r = c[8](y)
        r += y  # in place on the conv's output: fused
        y = F.relu(c[9](r)) + r  # ReLU fused; the add after it is not
        return torch.sigmoid(c[7](F.relu(y)))


@pytest.mark.parametrize("kind", ["symbolic", "dynamo", "export"])
@pytest.mark.parametrize("fill", ["zeros", "mean"])
def test_residual_adds_and_activations_fused_into_focused_convs_compute_the_same(kind, fill):
    model = _eval(EpilogueNet())
    x = _masked_inputs()
    t = threshold_for_fraction(model, "stem", x, 0.3)
    config = Focus(t, split="stem", fill=fill, execution="layer")
    gm, report, out = rewritten(model, x, kind, config)
    _, _, kept = rewritten(model, x, kind, dataclasses.replace(config, fuse_epilogue=False))
    torch.testing.assert_close(out, kept, rtol=1e-4, atol=1e-5)
    focused = [n for n in gm.graph.nodes if n.target == FOCUSED]
    extras = [tuple(n.args[8:]) + (None,) * (12 - len(n.args)) for n in focused]  # fill, clamps, residual
    epilogues = sorted(((e[1], e[2], e[3] is not None) for e in extras), key=str)
    # c[0] (after the folded BN: ReLU; dynamo graphs keep BatchNorms whose tensors are graph inputs, so there it
    # reads the BN), c[2] (Hardtanh), c[4] (residual, ReLU6), c[5] (clamp), c[8] (residual), c[9] (ReLU)
    expected = [(-1.0, 2.0, False), (-0.5, 0.5, False), (0.0, 6.0, True), (None, None, True), (0.0, None, False)]
    expected += [(None, None, False)] * 4  # c[1], c[3], c[6], c[7]
    expected += [(0.0, None, False)] if kind != "dynamo" else [(None, None, False)]
    assert epilogues == sorted(expected, key=str)
    fused = 7 if kind != "dynamo" else 6
    note = [n for n in report.notes if "fused into the focused conv" in n]
    assert len(note) == 1 and note[0].startswith(f"{fused} residual add(s) and activation(s) fused")
    with pytest.raises(TypeError, match="fuse_epilogue must be a bool"):
        Focus(0.0, fuse_epilogue=1)
