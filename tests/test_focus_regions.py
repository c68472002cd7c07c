"""Region execution of the focus pass (Focus(execution="region")): exact inside the AoI against the dense region,
the fill outside, borders, global means, every graph kind and the deployment forms."""
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import fxeff
from fxeff.ops import regions as R
from fxeff.passes import Focus, run_passes

from _focus_reference import fixed_layer_times
from _graph_kinds import dynamo_graph

ALL = -1e9  # a threshold every pixel passes


def region(**kwargs):
    return Focus(execution="region", dense_above=None, **kwargs)


class Block(nn.Module):
    """split conv -> one region on the next grid: an entry conv (any stride), a same-grid conv with BN, ReLU and
    a residual add, then a 1x1 conv; the model's output is the region's output map."""

    def __init__(self, cin, c, k, stride, dilation, groups, bias):
        super().__init__()
        self.stem = nn.Conv2d(3, cin, 3, padding=1)
        self.entry = nn.Conv2d(cin, c, k, stride=stride, padding=dilation * (k - 1) // 2, dilation=dilation,
                               bias=bias)
        self.bn1 = nn.BatchNorm2d(c)
        self.mid = nn.Conv2d(c, c, k, padding=dilation * (k - 1) // 2, dilation=dilation, groups=groups, bias=bias)
        self.bn2 = nn.BatchNorm2d(c)
        self.last = nn.Conv2d(c, c, 1)
        for bn in (self.bn1, self.bn2):  # a large shift: any leak into the padding beyond the border shows
            nn.init.uniform_(bn.bias, 1.0, 3.0)
            nn.init.uniform_(bn.running_mean, -1, 1)
            nn.init.uniform_(bn.running_var, 0.5, 2)

    def dense_region(self, x, cut=None):
        """The dense layers; ``cut``: a mask [N, 1, H, W] applied after the first ReLU, where the pass ends a region
        whose halo would grow past its budget (the second region then reads zeros outside the AoI)."""
        y = F.relu(self.bn1(self.entry(x)))
        if cut is not None:
            y = y * cut
        y = F.relu(self.bn2(self.mid(y)) + y)
        return self.last(y)

    def forward(self, x):
        return self.dense_region(self.stem(x))


def _random_block(seed):
    rng = random.Random(seed)
    k = rng.choice([1, 3, 5])
    c = rng.choice([4, 6, 8])
    groups = rng.choice([1, 2, c])
    model = Block(rng.choice([3, 5]), c, k, rng.choice([1, 2]), rng.choice([1, 2]) if k > 1 else 1, groups,
                  rng.random() < 0.5).eval()
    size = (rng.randint(9, 30), rng.randint(9, 30))
    return model, size, rng


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_inside_the_aoi_a_region_equals_the_dense_region_and_outside_holds_zero(seed, memory_format):
    model, (h, w), rng = _random_block(seed)
    batch = rng.choice([1, 2, 3])
    x = torch.randn(batch, 3, h, w).contiguous(memory_format=memory_format)
    model = model.to(memory_format=memory_format)
    with torch.no_grad():
        split = model.stem(x)
        threshold = float(split.sum(1).quantile(rng.choice([0.3, 0.6, 0.85])))
    gm = fxeff.transform(model, (x,), [region(threshold=threshold, split="stem", tile=rng.choice([None, 4, 5, 16]))])
    assert gm.fxeff_report.rewritten, gm.fxeff_report.notes
    cut = "cut" in gm.fxeff_report.notes[0]  # one region, or two when the mid conv's halo is past the budget
    with torch.no_grad():
        out = gm(x)
        grid = list(model.entry(split).shape[2:])
        mask = fxeff.ops.mask_resize(fxeff.ops.aoi_mask(split, threshold, "sum"), grid).unsqueeze(1)
        dense = model.dense_region(split, mask if cut else None)
    torch.testing.assert_close(out * mask, dense * mask, rtol=1e-4, atol=1e-4)
    assert torch.equal(out * ~mask, torch.zeros_like(out))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_dtypes_and_per_image_masks(dtype):
    model, (h, w), _ = _random_block(3)
    model = model.to(dtype)
    x = torch.randn(4, 3, h, w, dtype=dtype)
    x[3] = x[3] * 10  # the images get different AoIs
    with torch.no_grad():
        split = model.stem(x)
        threshold = float(split.sum(1).float().quantile(0.6))
    gm = fxeff.transform(model, (x,), [region(threshold=threshold, split="stem")])
    cut = "cut" in gm.fxeff_report.notes[0]
    with torch.no_grad():
        out = gm(x)
        grid = list(model.entry(split).shape[2:])
        mask = fxeff.ops.mask_resize(fxeff.ops.aoi_mask(split, threshold, "sum"), grid).unsqueeze(1)
        dense = model.dense_region(split, mask.to(dtype) if cut else None)
    tol = dict(rtol=3e-2, atol=3e-2) if dtype == torch.bfloat16 else dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out * mask, dense * mask, **tol)
    assert out.dtype == dtype
    assert len(set(mask.flatten(1).sum(1).tolist())) > 1  # per-image AoIs
    assert torch.equal(out * ~mask, torch.zeros_like(out))


def test_fill_mean_holds_the_measured_background_outside():
    model, (h, w), _ = _random_block(5)
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        split = model.stem(x)
        threshold = float(split.sum(1).median())
        dense = model.dense_region(split)
    gm = fxeff.transform(model, (x,), [region(threshold=threshold, split="stem", fill="mean", tile=16)])
    assert "cut" not in gm.fxeff_report.notes[0]
    with torch.no_grad():
        out = gm(x)
    mask = fxeff.ops.mask_resize(fxeff.ops.aoi_mask(split, threshold, "sum"), list(dense.shape[2:])).unsqueeze(1)
    outside = ~mask
    expected = (dense * outside).sum((0, 2, 3)) / outside.sum()
    torch.testing.assert_close(out * mask, dense * mask, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.where(outside, out, 0).sum((0, 2, 3)) / outside.sum(), expected)
    assert "fill='mean'" in " ".join(gm.fxeff_report.notes)


def test_fill_mean_needs_real_inputs():
    model, (h, w), _ = _random_block(1)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(1, 3, h, w))
    with pytest.raises(ValueError, match="fill='mean'"):
        run_passes(torch.fx.symbolic_trace(model), (x,), [region(threshold=0.0, split="stem", fill="mean")])
    with pytest.raises(ValueError, match="execution='auto' times each grid"):
        run_passes(torch.fx.symbolic_trace(model), (x,), [Focus(threshold=0.0, split="stem", execution="auto")])


def test_the_border_reads_zeros_before_every_conv_in_a_region():
    """An AoI on the image's border only: a BatchNorm shift of +1 to +3 must not reach the next conv's padding."""
    model = Block(3, 4, 3, 1, 1, 1, True).eval()
    with torch.no_grad():  # the stem passes the input through: its channel sum is the AoI's score
        model.stem.weight.zero_()
        model.stem.bias.zero_()
        for c in range(3):
            model.stem.weight[c, c, 1, 1] = 1
    ring = torch.ones(2, 12, 12, dtype=torch.bool)
    ring[:, 2:-2, 2:-2] = False
    x = torch.randn(2, 3, 12, 12)
    x[:, 2] = -x[:, 1]
    x[:, 0] = ring.float() * 2 - 1  # channel sum 1 on the ring, -1 inside
    gm = fxeff.transform(model, (x,), [region(threshold=0.5, split="stem", tile=8)])
    assert "cut" not in gm.fxeff_report.notes[0]
    with torch.no_grad():
        out = gm(x)
        dense = model(x)
    torch.testing.assert_close(out * ring.unsqueeze(1), dense * ring.unsqueeze(1), rtol=1e-5, atol=1e-5)
    assert torch.equal(out * ~ring.unsqueeze(1), torch.zeros_like(out))


def test_global_mean_from_tiles_equals_the_mean_of_the_scattered_map():
    g = torch.Generator().manual_seed(0)
    for tile, margin, fill in [(4, 0, None), (5, 2, torch.randn(6, generator=g)), (8, 1, torch.randn(6, generator=g))]:
        mask = torch.rand(3, 13, 11, generator=g) > 0.7
        plan = R.region_plan(mask, tile)
        tiles = torch.randn(plan.shape[1], 6, tile + 2 * margin, tile + 2 * margin, generator=g)
        full = R.region_scatter(tiles, plan, mask, tile, margin, fill)
        torch.testing.assert_close(R.region_mean(tiles, plan, mask, tile, margin, fill), full.mean((2, 3), keepdim=True))
        torch.testing.assert_close(R.region_mean(tiles, plan, mask, tile, margin, fill, keepdim=False), full.mean((2, 3)))


FAMILIES = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "vgg11", "regnet_x_400mf",
            "shufflenet_v2_x0_5", "densenet121", "googlenet", "convnext_tiny", "squeezenet1_1", "mnasnet0_5"]


@pytest.mark.parametrize("name", FAMILIES)
def test_an_all_active_mask_equals_the_dense_model(name):
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = getattr(torchvision.models, name)(**kwargs).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    gm = fxeff.transform(model, (x,), [region(threshold=ALL)])
    report = gm.fxeff_report
    with torch.no_grad():
        out = gm(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert report.rewritten, report.notes
    assert report.model_macs_after is not None


def test_the_cost_model_runs_a_grid_dense_and_says_so():
    model, (h, w), _ = _random_block(2)
    x = torch.randn(2, 3, h, w)
    gm = fxeff.transform(model, (x,), [Focus(threshold=ALL, split="stem", execution="region")])
    assert not gm.fxeff_report.rewritten
    assert any("dense" in note and "cost model" in note for note in gm.fxeff_report.notes)
    skipped = gm.fxeff_report.skipped
    assert skipped and all(s.reason for s in skipped)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def _partial(model, x):
    with torch.no_grad():
        split = model.stem(x)
    return float(split.sum(1).median())


@pytest.mark.parametrize("kind", ["dynamo", "export"])
def test_dynamo_and_export_graphs_equal_the_symbolic_one(kind):
    model, (h, w), _ = _random_block(7)
    x = torch.randn(2, 3, h, w)
    config = region(threshold=_partial(model, x), split="stem", tile=16)
    symbolic = fxeff.transform(model, (x,), [config])
    if kind == "dynamo":
        gm, inputs = dynamo_graph(model, x)
    else:
        gm, inputs = torch.export.export(model, (x,)).module(), (x,)
    report = run_passes(gm, inputs, [config])
    assert len(report.rewritten) == len(symbolic.fxeff_report.rewritten) == 3
    with torch.no_grad():
        out = gm(*inputs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        torch.testing.assert_close(out, symbolic(x))
        other = torch.randn(2, 3, h, w)  # a new input gets its own AoI
        other_out = gm(*[other if t is x else t for t in inputs])
        torch.testing.assert_close(other_out[0] if isinstance(other_out, (tuple, list)) else other_out,
                                   symbolic(other))


def test_deployment_forms_follow_each_input():
    model, (h, w), _ = _random_block(4)
    x = torch.randn(2, 3, h, w)
    gm = fxeff.transform(model, (x,), [region(threshold=_partial(model, x), split="stem")])
    other = torch.randn(2, 3, h, w) * 2
    with torch.no_grad():
        expected = gm(other)
        traced = torch.jit.trace(gm, (x,), check_trace=False)
        torch.testing.assert_close(traced(other), expected)
        exported = torch.export.export(gm, (x,))
        torch.testing.assert_close(exported.module()(other), expected)
        torch._dynamo.reset()
        compiled = torch.compile(gm, backend="inductor", fullgraph=True)
        torch.testing.assert_close(compiled(other), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fullgraph", [True, False])
def test_effconv_backend_runs_region_execution(fullgraph):
    """Through inductor, with or without fullgraph: the tile plans' data-dependent size (nonzero) must compile,
    not fail in compile_fx and leave dynamo to run the graph eagerly after a graph break."""
    from torch._dynamo.utils import counters

    model, (h, w), _ = _random_block(6)
    x = torch.randn(2, 3, h, w)
    config = region(threshold=_partial(model, x), split="stem")
    expected = fxeff.transform(model, (x,), [config])
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="effconv", fullgraph=fullgraph, options={"passes": [config.to_dict()]})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), expected(x), rtol=1e-4, atol=1e-4)
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_config_checks():
    with pytest.raises(ValueError, match="execution"):
        Focus(threshold=0.0, execution="tiles")
    with pytest.raises(ValueError, match="tile"):
        Focus(threshold=0.0, tile=0)
    with pytest.raises(ValueError, match="dense_above"):
        Focus(threshold=0.0, dense_above=-1)


def test_dynamic_shapes_are_refused_with_the_way_out():
    model, (h, w), _ = _random_block(8)
    gm, inputs = dynamo_graph(model, torch.randn(2, 3, h, w), dynamic=True)
    with pytest.raises(NotImplementedError, match="execution='layer'"):
        run_passes(gm, inputs, [region(threshold=0.0, split="stem")])


# ---------------------------------------------------------------- execution="auto": tiles, per layer or dense per grid

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fill", ["zeros", "mean"])
def test_auto_with_every_grid_per_layer_equals_layer_execution(monkeypatch, seed, fill):
    fixed_layer_times(monkeypatch)
    model, (h, w), rng = _random_block(seed)
    x = torch.randn(rng.choice([1, 2]), 3, h, w)
    threshold = _partial(model, x)
    auto = fxeff.transform(model, (x,), [Focus(threshold=threshold, split="stem", fill=fill, execution="auto")])
    layer = fxeff.transform(model, (x,), [Focus(threshold=threshold, split="stem", fill=fill, execution="layer")])
    assert any("per layer, 3 of 3 convs focused" in note for note in auto.fxeff_report.notes), auto.fxeff_report.notes
    assert [s.name for s in auto.fxeff_report.rewritten] == [s.name for s in layer.fxeff_report.rewritten]
    assert auto.fxeff_report.model_macs_after == layer.fxeff_report.model_macs_after
    other = torch.randn_like(x)
    with torch.no_grad():
        for inp in (x, other):
            torch.testing.assert_close(auto(inp), layer(inp))


@pytest.mark.parametrize("fill", ["zeros", "mean"])
def test_auto_runs_the_graph_as_it_came_where_its_whole_plan_measures_slower(monkeypatch, fill):
    """auto's last word is an end-to-end measurement of its plan against the graph as it came: when the plan loses,
    the model is the original graph (no fxeff op, no fill buffer left), and the report says why."""
    from fxeff.passes import focus

    fixed_layer_times(monkeypatch)
    checked = []

    def slower(gm, before, context, plan_batch, batch):
        checked.append(sum(n.op == "call_function" and "fxeff" in str(n.target) for n in gm.graph.nodes))
        return 1.25

    monkeypatch.setattr(focus, "_slower_than_before", slower)
    model, (h, w), _ = _random_block(0)
    x = torch.randn(2, 3, h, w)
    gm = fxeff.transform(model, (x,), [Focus(threshold=_partial(model, x), split="stem", fill=fill,
                                            execution="auto")])
    assert checked and checked[0] > 0  # it measured the rewritten graph
    assert not any("fxeff" in str(n.target) for n in gm.graph.nodes), gm.code
    assert not any("aoi_fill" in name for name, _ in gm.named_buffers())
    report = gm.fxeff_report
    assert not report.rewritten and report.model_macs_after == report.model_macs_before
    assert any("ran at 1.25x the dense graph's time" in note for note in report.notes), report.notes
    assert report.aoi_fractions is not None and len(report.aoi_fractions) == 2  # the AoI the plan would have used
    after_split = [s.reason for s in report.skipped if "upstream of the AoI split" not in s.reason]
    assert len(after_split) == 3 and all("whole plan measured 1.25x" in r for r in after_split), after_split
    with torch.no_grad():
        for inp in (x, torch.randn_like(x)):
            torch.testing.assert_close(gm(inp), model(inp))


def test_auto_whole_plan_check_measures_both_graphs():
    """The real end-to-end check returns the ratio only when the plan is slower, else None."""
    from fxeff.passes import focus
    from fxeff.passes.config import PassContext

    model, (h, w), _ = _random_block(0)
    x = torch.randn(2, 3, h, w)
    gm = torch.fx.symbolic_trace(model)
    before = torch.fx.Graph()
    before.output(before.graph_copy(gm.graph, {}))
    ratio = focus._slower_than_before(gm, before, PassContext(example_inputs=(x,)), None, 2)
    assert ratio is None or ratio > 1.0
    # planned for batch 1: the symbolic graph's inputs are cut to their first image
    seen = []
    timed = torch.fx.GraphModule(gm, gm.graph)
    timed.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    ratio = focus._slower_than_before(timed, before, PassContext(example_inputs=(x,)), 1, 2)
    assert ratio is None or ratio > 1.0
    assert seen and set(seen) == {1}


@pytest.mark.parametrize("fill", ["zeros", "mean"])
@pytest.mark.parametrize("slower", [("mid",), ("entry",), ("entry", "last")])
def test_auto_keeps_a_conv_dense_where_focused_measures_slower(monkeypatch, fill, slower):
    """A conv kept dense in a grid run per layer holds the fill outside the AoI as a focused conv would: the model
    equals layer execution on new inputs whichever convs stay dense (so auto's accuracy does not depend on what the
    timing chose), and an all-active mask gives the dense model."""
    fixed_layer_times(monkeypatch, slower=slower)
    model, (h, w), _ = _random_block(1)
    x = torch.randn(2, 3, h, w)
    threshold = _partial(model, x)
    gm = fxeff.transform(model, (x,), [Focus(threshold=threshold, split="stem", fill=fill, execution="auto")])
    layer = fxeff.transform(model, (x,), [Focus(threshold=threshold, split="stem", fill=fill, execution="layer")])
    report = gm.fxeff_report
    assert [s.name for s in report.rewritten] == [n for n in ("entry", "mid", "last") if n not in slower]
    kept = [s for s in report.skipped if s.name in slower]
    assert len(kept) == len(slower) and all("stays dense" in s.reason and "fill outside the AoI" in s.reason
                                            for s in kept)
    assert "2e+03 ms focused against 1e+03 ms dense" in kept[0].reason
    with torch.no_grad():
        for inp in (x, torch.randn_like(x)):
            torch.testing.assert_close(gm(inp), layer(inp), rtol=1e-4, atol=1e-4)
    if slower != ("mid",):
        return
    assert any("2 of 3 convs focused" in note for note in report.notes)
    assert sum(n.target is torch.ops.fxeff.focused_conv2d.default for n in gm.graph.nodes) == 2
    with torch.no_grad():  # all active: every conv computes everywhere, the dense model
        full = fxeff.transform(model, (x,), [Focus(threshold=ALL, split="stem", execution="auto")])
        torch.testing.assert_close(full(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_auto_measures_on_this_machine_and_an_all_active_mask_equals_the_dense_model(name):
    """No fixed timings: whatever the measurement picks per grid, an all-active mask gives the dense model, and
    each grid's choice is in the notes."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(2, 3, 64, 64)
    gm = fxeff.transform(model, (x,), [Focus(threshold=ALL, execution="auto")])
    notes = [n for n in gm.fxeff_report.notes if n.startswith("grid ")]
    assert notes and all("per layer" in n or "regions of" in n or "dense" in n for n in notes)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("slower", [(), ("mid",)])
def test_auto_per_layer_exports_and_compiles(monkeypatch, slower):
    fixed_layer_times(monkeypatch, slower=slower)
    model, (h, w), _ = _random_block(5)
    x = torch.randn(2, 3, h, w)
    config = Focus(threshold=_partial(model, x), split="stem", execution="auto", fill="mean")
    symbolic = fxeff.transform(model, (x,), [config])
    exported = torch.export.export(model, (x,)).module()
    run_passes(exported, (x,), [config])
    other = torch.randn(2, 3, h, w)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="effconv", fullgraph=True, options={"passes": [config.to_dict()]})
    with torch.no_grad():
        compiled(x)  # the backend measures the fill on the inputs of its first call
        torch.testing.assert_close(exported(other), symbolic(other))
        torch.testing.assert_close(compiled(other), symbolic(other), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["symbolic", "dynamo"])
def test_auto_measures_per_layer_on_every_graph_kind(kind):
    """Dynamo graphs take the parameters as inputs: the per-layer timing uses random weights of the convs' shapes,
    so every grid of either graph kind gets its per-layer measurement (in its note)."""
    model, (h, w), _ = _random_block(2)
    x = torch.randn(2, 3, h, w)
    config = Focus(threshold=_partial(model, x), split="stem", execution="auto")
    if kind == "symbolic":
        gm = fxeff.transform(model, (x,), [config])
        report = gm.fxeff_report
    else:
        gm, inputs = dynamo_graph(model, x)
        report = run_passes(gm, inputs, [config])
    notes = [n for n in report.notes if n.startswith("grid ")]
    assert notes and all("per layer" in n for n in notes), notes


class _Unknown(nn.Module):
    """A block whose region is interrupted by an op the pass does not run on tiles (a softplus)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.b(F.softplus(self.a(self.stem(x))))


def test_an_op_the_pass_does_not_know_ends_the_region_and_is_reported():
    model = _Unknown().eval()
    x = torch.randn(2, 3, 24, 24)
    gm = fxeff.transform(model, (x,), [region(threshold=_partial(model, x), split="stem", tile=8)])
    note, = [n for n in gm.fxeff_report.notes if n.startswith("regions are scattered")]
    assert "softplus (1)" in note and "the graph output (1)" in note
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.index(F.softplus) == targets.index(R.region_scatter) + 1  # scattered, then softplus on the map
    with torch.no_grad():  # softplus ran on the whole map: the second region reads its real values
        split = model.stem(x)
        mask = fxeff.ops.aoi_mask(split, _partial(model, x), "sum").unsqueeze(1)
        expected = model.b(F.softplus(model.a(split) * mask)) * mask
        torch.testing.assert_close(gm(x) * mask, expected, rtol=1e-4, atol=1e-4)


def test_auto_times_per_layer_options_at_the_planned_batch_and_the_models_format(monkeypatch):
    """auto's per-layer timings run focused_conv2d on inputs of the recorded memory format (a channels_last model is
    timed channels_last, as it runs) at Focus.plan_batch images."""
    import importlib

    op = importlib.import_module("fxeff.ops.focused_conv2d")  # the module (fxeff.ops exports the function too)
    real, seen = op.focused_conv2d, []

    def recording(x, weight, *args, **kwargs):
        seen.append((x.shape[0], x.is_contiguous(memory_format=torch.channels_last),
                     weight.is_contiguous(memory_format=torch.channels_last)))
        return real(x, weight, *args, **kwargs)

    monkeypatch.setattr(op, "focused_conv2d", recording)
    model, (h, w), _ = _random_block(0)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, h, w).contiguous(memory_format=torch.channels_last)
    fxeff.transform(model, (x,), [Focus(threshold=_partial(model, x), split="stem", execution="auto", plan_batch=2)])
    assert seen and all(s == (2, True, True) for s in seen), seen
    with pytest.raises(ValueError, match="plan_batch must be an int >= 1 or None"):
        Focus(0.0, plan_batch=0)
