"""The one run that the weight-converting passes (Shift, HetConv) rewrite a graph in (passes.measure.IncrementalRun).

Each site is fitted on the input it sees once the sites before it are rewritten. That used to cost a run of
the whole partly rewritten graph per site (HetConv on ResNet-152: 17.5 s, about 60 forward passes); now a
pass costs the run before rewriting and one run that goes along with the rewrites, whatever the depth.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxeff
from fxeff.passes import HetConv, Shift
from fxeff.passes.measure import IncrementalRun, run_recording
from fxeff.passes.rewrite import relative_error
from fxeff.transform import trace


class Deep(nn.Module):
    """``depth`` blocks of conv 3x3 - BN - ReLU - depthwise 3x3 - BN - ReLU (every conv a candidate), then a head."""

    def __init__(self, depth: int, channels: int = 16):
        super().__init__()
        layers = [nn.Conv2d(3, channels, 3, padding=1)]
        for _ in range(depth):
            layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
                       nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
                       nn.BatchNorm2d(channels), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(channels, 10)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def _deep(depth):
    torch.manual_seed(0)
    model = Deep(depth)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


CONFIGS = [HetConv(part=4, init="sum"), HetConv(part=4, init="fit"), Shift(init="lstsq"), Shift(init="max_tap")]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.pass_name}-{c.init}")
def test_a_pass_runs_the_model_twice_whatever_its_depth(config):
    """The head runs once before rewriting and once in the sweep (which also gives the report's MACs and
    output error): 2 calls for 2 blocks and for 8. A run per rewritten site gave 2 + sites calls."""
    calls = {}
    for depth in (2, 8):
        model = _deep(depth)
        count = []
        model.head.register_forward_hook(lambda *_: count.append(1))
        gm = fxeff.transform(model, torch.randn(4, 3, 12, 12), [config])
        assert len(gm.fxeff_report.rewritten) >= depth
        calls[depth] = len(count)
    assert calls == {2: 2, 8: 2}


@pytest.mark.parametrize("config", [HetConv(part=4, init="fit"), Shift(init="lstsq")], ids=lambda c: c.pass_name)
def test_each_layer_error_is_the_error_in_the_rewritten_network(config):
    """A site's input in the final graph depends only on the sites before it, so what the sweep fitted it on and
    measured it with is its input in the final graph: the reported error of every layer is recomputed there."""
    model = _deep(4)
    x = torch.randn(6, 3, 12, 12).cumsum(3)
    gm = fxeff.transform(model, x, [config])
    report = gm.fxeff_report
    # the original conv outputs, and each new layer's input in a plain run of the final graph (run_recording: the
    # per-site run the passes made before the sweep)
    traced = trace(model)
    modules = {n.target: n for n in traced.graph.nodes if n.op == "call_module"}
    values = run_recording(traced, (x,), list(modules.values()))[1]
    originals = {name: values[node] for name, node in modules.items()}
    new_nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith(f"fxeff_{config.pass_name}_")
                 and not n.target.endswith(("_bn", "_pointwise"))]
    assert len(new_nodes) == len(report.rewritten) == 4
    seen = run_recording(gm, (x,), [n.args[0] for n in new_nodes])[1]
    for node, site in zip(new_nodes, report.rewritten):
        assert node.target == f"fxeff_{config.pass_name}_{site.name.replace('.', '_')}"
        module = gm.get_submodule(node.target)
        with torch.no_grad():
            out = module(seen[node.args[0]])
        if config.pass_name == "shift":  # a and b went into the next BatchNorm (exact in eval mode): undo the BN
            bn = model.get_submodule(_next_module(model, site.name))
            with torch.no_grad():
                y = gm.get_submodule(next(iter(node.users)).target)(out)
                scale = (bn.weight / (bn.running_var + bn.eps).sqrt()).view(1, -1, 1, 1)
                out = (y - bn.bias.view(1, -1, 1, 1)) / scale + bn.running_mean.view(1, -1, 1, 1)
        error = relative_error(out, originals[site.name])
        assert site.error == pytest.approx(error, rel=1e-4, abs=1e-6), site.name


def _next_module(model, name):
    names = [n for n, _ in model.named_modules()]
    return names[names.index(name) + 1]


def test_training_mode_statistics_are_restored_including_the_folded_copies():
    """In training mode BatchNorm updates its running statistics in every run; the sweep restores them, those of
    the BatchNorm copies the shift pass folds its scales into included (made after the sweep began)."""
    model = _deep(2)
    x = torch.randn(4, 3, 12, 12)
    eval_gm = fxeff.transform(model, x, [Shift(init="max_tap")])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_gm = fxeff.transform(model.train(), x, [Shift(init="max_tap")])
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    folded = [k for k in eval_gm.state_dict() if "_bn." in k]
    assert folded
    for k in folded:
        torch.testing.assert_close(train_gm.state_dict()[k], eval_gm.state_dict()[k], rtol=0, atol=0)


def test_incremental_run_values_and_errors():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    gm, x = trace(model), torch.randn(2, 3, 9, 9)
    nodes = list(gm.graph.nodes)
    with IncrementalRun(gm, (x,)) as run:
        torch.testing.assert_close(run.value(nodes[2]), F.relu(model[0](x)))
        run.value(nodes[3])  # the ReLU's only user ran: its value is freed
        with pytest.raises(RuntimeError, match="the value of '_1' was freed"):
            run.value(nodes[2])
        flops, values = run.finish([nodes[3]])
    torch.testing.assert_close(values[nodes[3]], model(x))
    assert flops == 2 * (2 * 4 * 7 * 7 * 3 * 9 + 2 * 4 * 5 * 5 * 4 * 9)
    fake = torch._subclasses.fake_tensor.FakeTensorMode().from_tensor(x)
    with pytest.raises(ValueError, match="example inputs must be real tensors"):
        IncrementalRun(gm, (fake,))


class Mixed(nn.Module):
    """Convs of every kind the passes treat differently: a reflect-padded conv, a depthwise conv with a BatchNorm
    after it (folded), one with a 1x1 conv after it (folded), one followed by two users (explicit scale), 1x1s."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.reflect = nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect")
        self.dw_bn = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn = nn.BatchNorm2d(16)
        self.dw_pw = nn.Conv2d(16, 16, 5, stride=2, padding=2, groups=16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.dw_two = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.conv = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.reflect(F.relu(self.stem(x))))
        x = self.pw(self.dw_pw(F.relu(self.bn(self.dw_bn(x)))))
        y = self.dw_two(x)
        x = self.conv(F.relu(y)) + y
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("config", [HetConv(part=4), Shift(), Shift(init="max_tap"),
                                    fxeff.Focus(threshold=0.0, split="stem", fill="mean", halo=1, execution="layer")],
                         ids=["hetconv", "shift", "shift-max_tap", "focus"])
def test_model_macs_before_are_flop_counters_count_of_the_original(config):
    """The runs before rewriting count no FLOPs (the counter costs a third of a forward pass): the MACs before
    come from the final graph's count and the rewritten sites' formulas, and must equal a count of the model."""
    model = Mixed().eval()
    x = torch.randn(3, 3, 16, 16)
    counter = torch.utils.flop_counter.FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    gm = fxeff.transform(model, x, [config])
    report = gm.fxeff_report
    assert report.rewritten
    assert report.model_macs_before == counter.get_total_flops() // 2
    counter = torch.utils.flop_counter.FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        gm(x)
    assert report.model_macs_after == counter.get_total_flops() // 2 < report.model_macs_before


def test_a_conv_output_that_an_inplace_relu_overwrites_is_kept_as_the_conv_gave_it():
    """VGG's conv -> ReLU(inplace=True): the run before rewriting kept the conv's output by reference, the ReLU
    overwrote it, and HetConv's fits and errors used the ReLU'd map as the conv's output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(16, 16, 3, padding=1),
                          nn.ReLU(inplace=True), nn.Conv2d(16, 16, 3, padding=1)).eval()
    x = torch.randn(4, 3, 10, 10)
    gm = fxeff.transform(model, x, [HetConv(part=4)])
    with torch.no_grad():
        seen = F.relu(model[0](x))
        out = gm.get_submodule("fxeff_hetconv_2")(seen)
    assert gm.fxeff_report.site("2").error == pytest.approx(relative_error(out, model[2](seen)), rel=1e-5)
    assert gm.fxeff_report.site("2").error != pytest.approx(relative_error(out, F.relu(model[2](seen))), rel=1e-2)


class ConvChain(nn.Module):
    """HetConv candidates feeding each other directly (the sweep hands a rewritten layer's output, which the pass
    computed itself, to the next layer), with a BatchNorm and a residual add."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(32)
        self.c = nn.Conv2d(32, 32, 3, padding=2, dilation=2)

    def forward(self, x):
        y = self.bn(self.b(self.a(F.relu(self.stem(x)))))
        return self.c(y) + y


@pytest.mark.parametrize("config", [HetConv(part=4, init="fit"), Shift(init="lstsq")], ids=lambda c: c.pass_name)
def test_the_sweep_gives_the_same_fits_on_every_graph_kind(config):
    """Dynamo and export graphs rewrite into op calls on new get_attr parameters (not modules): the sweep must
    fit and measure them as on the symbolic graph."""
    from _graph_kinds import rewritten

    model = ConvChain().eval() if config.pass_name == "hetconv" else _deep(3)
    x = torch.randn(4, 3, 10, 10).cumsum(2)
    results = {kind: rewritten(model, x, kind, config) for kind in ("symbolic", "dynamo", "export")}
    symbolic = results["symbolic"][1]
    assert len(symbolic.rewritten) == 3
    for kind in ("dynamo", "export"):
        _, report, out = results[kind]
        out = out[0] if isinstance(out, (tuple, list)) else out
        assert [s.error for s in report.rewritten] == pytest.approx([s.error for s in symbolic.rewritten], rel=1e-4)
        assert (report.model_macs_before, report.model_macs_after) == (symbolic.model_macs_before,
                                                                       symbolic.model_macs_after)
        torch.testing.assert_close(out, results["symbolic"][2], rtol=1e-4, atol=1e-4)


def test_training_mode_lstsq_restores_the_statistics_its_runs_update():
    """In training mode every run updates BatchNorm's running statistics, the sweep's included (which runs the
    folded BatchNorm copies too): lstsq fits in training mode, and the user's statistics are as before."""
    model = _deep(2).train()
    x = torch.randn(4, 3, 12, 12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = fxeff.transform(model, x, [Shift(init="lstsq")])
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert len(gm.fxeff_report.rewritten) == 2
    assert all(math.isfinite(s.error) for s in gm.fxeff_report.rewritten)
