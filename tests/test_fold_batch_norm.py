"""The FoldBatchNorm pass: eval-mode BatchNorms folded into the conv or HetConv they read, on the three graph kinds
and the deployment forms, against the unfolded model."""
import pytest
import torch
from torch import nn

import fxeff
from fxeff.passes import FoldBatchNorm, FuseShift, HetConv, Shift

from _graph_kinds import conv_bn_relu6, randomize_batch_norms, rewritten

HETCONV = torch.ops.fxeff.hetconv2d.default
SHIFT_CONV = torch.ops.fxeff.shift_conv1x1.default


class Net(nn.Module):
    """conv -> BN -> ReLU (the stem), then 3x3 convs with and without bias, a 1x1 conv, a conv read twice (not
    folded), a BatchNorm after a ReLU (not folded) and a Conv1d-free residual block."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32))
        self.shortcut = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
        self.twice = nn.Conv2d(32, 32, 3, padding=1)
        self.bn_twice = nn.BatchNorm2d(32)
        self.after_relu = nn.BatchNorm2d(32)

    def forward(self, x):
        y = self.a(self.stem(x))
        y = torch.relu(self.b(y) + self.shortcut(y))
        t = self.twice(y)
        return self.after_relu(torch.relu(self.bn_twice(t) + t))


def _model(seed=0):
    torch.manual_seed(seed)
    return randomize_batch_norms(Net()).eval(), torch.randn(2, 3, 16, 16)


def _batch_norms(gm):
    return sum(1 for n in gm.graph.nodes if (n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                                               nn.BatchNorm2d))
               or (n.op == "call_function" and "batch_norm" in str(n.target)))


@pytest.mark.parametrize("kind", ["symbolic", "export"])
def test_folds_every_batch_norm_read_by_a_conv_alone(kind):
    """The four conv -> BN pairs fold (with and without a bias, strided, 1x1); the BN after a conv read twice and
    the BN after a ReLU stay; the output is the unfolded model's; the user's modules are untouched."""
    model, x = _model()
    weight = model.a[0].weight.detach().clone()
    with torch.no_grad():
        want = model(x)
    gm, report, out = rewritten(model, x, kind, FoldBatchNorm())
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert [s.status for s in report.sites] == ["rewritten"] * 4
    assert all("folded into the weights and bias" in s.reason for s in report.sites)
    assert _batch_norms(gm) == 2
    assert torch.equal(model.a[0].weight, weight) and model.a[0].bias is None
    with torch.no_grad():  # channels_last through the folded graph
        cl = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(gm(cl), want, rtol=1e-5, atol=1e-5)


def test_dynamo_lifted_batch_norm_is_reported_not_folded():
    model, x = _model(1)
    with torch.no_grad():
        want = model(x)
    gm, report, out = rewritten(model, x, "dynamo", FoldBatchNorm())
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    assert report.sites and all(s.status == "skipped" for s in report.sites)
    assert all("graph input" in s.reason or "placeholder" in s.reason or "input" in s.reason for s in report.sites)


def test_training_batch_norm_is_left_with_the_reason():
    model, x = _model(2)
    gm = fxeff.transform(model.train(), x, passes=[FoldBatchNorm()])
    assert all(s.status == "skipped" and "training mode" in s.reason for s in gm.fxeff_report.sites)
    assert _batch_norms(gm) == 6


@pytest.mark.parametrize("kind", ["symbolic", "export"])
@pytest.mark.parametrize("bias", [True, False])
def test_hetconv_layers_fold(kind, bias):
    """HetConv modules (symbolic) and fxeff::hetconv2d calls (export) take their BatchNorm's scale into weight_kxk
    and weight_1x1 and get a bias; float32 and float64, NCHW and channels_last give the unfolded output."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1, bias=bias), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1, bias=bias), nn.BatchNorm2d(32)).eval()
    randomize_batch_norms(model)
    x = torch.randn(2, 3, 12, 12)
    het = fxeff.transform(model, (x,), [HetConv(part=4)]).eval()
    with torch.no_grad():
        want = het(x)
    gm, report, out = rewritten(het, x, kind, FoldBatchNorm())
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert [s.status for s in report.sites] == ["rewritten"] * 3
    assert sum("hetconv" in s.op for s in report.sites) == 2
    assert _batch_norms(gm) == 0
    with torch.no_grad():
        cl = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(gm(cl), want, rtol=1e-5, atol=1e-5)
        if kind == "symbolic":
            double = fxeff.transform(het.double(), (x.double(),), [FoldBatchNorm()])
            torch.testing.assert_close(double(x.double()), het(x.double()), rtol=1e-10, atol=1e-10)


class MobileBlock(nn.Module):
    """expand -> depthwise -> project with a BatchNorm after the project conv, twice (the second strided)."""

    def __init__(self):
        super().__init__()

        cbr = conv_bn_relu6

        self.body = nn.Sequential(cbr(3, 32), cbr(32, 32, 3, 1, 32), nn.Conv2d(32, 16, 1, bias=False),
                                  nn.BatchNorm2d(16), cbr(16, 48), cbr(48, 48, 3, 2, 48), nn.Conv2d(48, 24, 1),
                                  nn.BatchNorm2d(24))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("kind", ["symbolic", "export"])
def test_folds_the_batch_norm_after_a_fused_shift(kind):
    """FuseShift leaves the project conv's BatchNorm after fxeff::shift_conv1x1; FoldBatchNorm folds it into the
    op's 1x1 weight and bias (with and without a bias, strided): no BatchNorm left, the same output."""
    torch.manual_seed(5)
    model, x = randomize_batch_norms(MobileBlock()).eval(), torch.randn(2, 3, 12, 12)
    shifted = fxeff.transform(model, x, passes=[Shift()]).eval()
    with torch.no_grad():
        want = shifted(x)
    gm, report, out = rewritten(shifted, x, kind, [FuseShift(), FoldBatchNorm()])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert _batch_norms(gm) == 0
    assert sum(1 for n in gm.graph.nodes if n.target is SHIFT_CONV) == 2
    folded = [s for s in report.sites if s.pass_name == "fold_batch_norm" and "shift_conv1x1" in s.op]
    assert len(folded) == 2 and all(s.status == "rewritten" for s in folded)
    with torch.no_grad():
        cl = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(gm(cl), want, rtol=1e-5, atol=1e-5)


def test_deployment_forms(tmp_path):
    """torch.jit.trace and torch.export of a folded HetConv model, saved and loaded: the same output."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)).eval()
    x = torch.randn(1, 3, 8, 8)
    gm = fxeff.transform(model, (x,), [HetConv(part=2), FoldBatchNorm()])
    with torch.no_grad():
        want = gm(x)
        traced = torch.jit.trace(gm, (x,))
        torch.testing.assert_close(traced(x), want)
        program = torch.export.export(gm, (x,))
        path = tmp_path / "folded.pt2"
        torch.export.save(program, str(path))
        torch.testing.assert_close(torch.export.load(str(path)).module()(x), want)
    assert any(n.target is HETCONV for n in program.graph.nodes)
    assert not any("batch_norm" in str(n.target) for n in program.graph.nodes)


def test_config_round_trip_and_unchanged_note():
    config = FoldBatchNorm()
    assert fxeff.config_from_dict(config.to_dict()) == config
    gm = fxeff.transform(nn.Sequential(nn.Conv2d(3, 4, 1)).eval(), torch.randn(1, 3, 4, 4), [config])
    assert "unchanged" in " ".join(gm.fxeff_report.notes)
