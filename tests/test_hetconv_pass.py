"""fxeff.nn.HetConv2d and the HetConv pass: from_conv / compact weights, exactness against F.conv2d with the
dense masked kernel, candidates and skip reasons, every graph kind, the report, the user's model untouched,
and end to end on torchvision VGG16 and ResNet-50 (transform, effconv backend, export, trace)."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import fxeff
import fxeff.backend
import fxeff.export
from fxeff.nn import HetConv2d
from fxeff.nn.hetconv import compact_weights, own_block_mask
from fxeff.passes import HetConv, config_from_dict
from _graph_kinds import rewritten

HETCONV2D = torch.ops.fxeff.hetconv2d.default

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


class Net(nn.Module):
    """A stem, two eligible convs (one strided), a 1x1, a depthwise conv, an odd-channel conv and a 5x5."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 32, 3, padding=1)
        self.b = nn.Conv2d(32, 32, 3, stride=2, padding=1, bias=False)
        self.pw = nn.Conv2d(32, 32, 1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.odd = nn.Conv2d(32, 18, 3, padding=1)
        self.big = nn.Conv2d(18, 16, 5, padding=2, dilation=1)
        self.c = nn.Conv2d(32, 16, 5, padding=4, dilation=2)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.b(F.relu(self.a(x))))
        x = self.dw(self.pw(x))
        return self.big(self.odd(x)), self.c(x)


def test_compact_weights_and_dense_weight_round_trip():
    conv = nn.Conv2d(8, 12, 3, padding=1)
    for init in ("centre", "sum"):
        wk, w1 = compact_weights(conv.weight.detach(), 4, init)
        assert wk.shape == (12, 2, 3, 3) and w1.shape == (12, 6)
        module = HetConv2d.from_conv(conv, 4, init=init)
        dense = module.dense_weight().detach()
        own = own_block_mask(12, 8, 4)
        # own block: every tap kept; other channels: the centre only, holding the chosen single tap
        assert torch.equal(dense[own], conv.weight.detach()[own])
        single = conv.weight.detach()[:, :, 1, 1] if init == "centre" else conv.weight.detach().sum((2, 3))
        assert torch.equal(dense[~own][:, 1, 1], single[~own])
        ring = dense[~own].clone()
        ring[:, 1, 1] = 0
        assert not ring.any()


@pytest.mark.parametrize("stride,padding,dilation,k", [(1, 1, 1, 3), (2, 1, 1, 3), (1, 0, 1, 3), (1, 2, 2, 3),
                                                       (2, 2, 1, 5), (1, 3, 1, 7)])
def test_module_equals_conv_with_the_dense_weight(stride, padding, dilation, k):
    torch.manual_seed(0)
    module = HetConv2d(16, 24, k, 4, stride, padding, dilation)
    x = torch.randn(2, 16, 13, 11)
    want = F.conv2d(x, module.dense_weight(), module.bias, stride, padding, dilation)
    torch.testing.assert_close(module(x), want, rtol=1e-4, atol=1e-4)
    assert module.mac_ratio() == pytest.approx(1 / 4 + (1 - 1 / 4) / k ** 2)


def test_module_errors_and_repr():
    with pytest.raises(ValueError, match=r"fxeff.nn.HetConv2d: in_channels must be a positive multiple of part=4"):
        HetConv2d(10, 16, 3, 4)
    with pytest.raises(ValueError, match=r"kernel_size must be square and odd"):
        HetConv2d(16, 16, 4, 4)
    with pytest.raises(ValueError, match=r"from_conv: conv.groups must be 1"):
        HetConv2d.from_conv(nn.Conv2d(16, 16, 3, groups=2), 4)
    with pytest.raises(ValueError, match=r"init must be one of"):
        HetConv2d.from_conv(nn.Conv2d(16, 16, 3), 4, init="mean")
    assert "part=4" in repr(HetConv2d(16, 16, 3, 4, padding=1))


def test_config_validation_and_dict_round_trip():
    config = HetConv(part=2, min_channels=8, skip_first=False, init="centre")
    assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for bad in (dict(part=0), dict(min_channels=True), dict(skip_first=1), dict(init="mean")):
        with pytest.raises(ValueError, match=r"fxeff.passes.HetConv"):
            HetConv(**bad)


def _reference(model, gm, x):
    """The model with every rewritten conv's weight replaced by its HetConv's dense weight (and bias)."""
    ref = Net()
    ref.load_state_dict(model.state_dict())
    for name, module in gm.named_modules():
        if isinstance(module, HetConv2d):
            target = ref.get_submodule(name.removeprefix("fxeff_hetconv_"))
            with torch.no_grad():
                target.weight.copy_(module.dense_weight())
    with torch.no_grad():
        return ref(x)


def test_symbolic_rewrite_equals_the_dense_masked_model():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 16, 16)
    gm, report, out = rewritten(model, x, "symbolic", HetConv(part=4))
    status = {s.name: (s.status, s.reason) for s in report.sites}
    assert status["stem"][0] == "skipped" and "first conv" in status["stem"][1]
    assert status["pw"] == ("skipped", "1x1 kernel: already pointwise")
    assert "dw" not in status  # grouped convs are not candidates
    assert status["big"][0] == "skipped" and "not divisible by part=4" in status["big"][1]
    assert status["odd"][0] == "skipped" and "not divisible by part=4" in status["odd"][1]
    assert [n for n, s in status.items() if s[0] == "rewritten"] == ["a", "b", "c"]
    for want, got in zip(_reference(model, gm, x), out):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # MACs after are the HetConv count exactly
    site = report.site("a")
    assert site.macs_after == 2 * 16 * 16 * 32 * (16 // 4 * 9 + 16 - 16 // 4)
    assert 0 < site.error < 10
    text = str(report)
    assert "rel. error" in text and "model output relative error" in text


@pytest.mark.parametrize("kind", ["dynamo", "export"])
def test_dynamo_and_export_graphs_agree_with_symbolic(kind):
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 16, 16)
    _, sym_report, sym_out = rewritten(model, x, "symbolic", HetConv(part=2))
    gm, report, out = rewritten(model, x, kind, HetConv(part=2))
    assert [(s.status, s.macs_after) for s in report.sites] == [(s.status, s.macs_after) for s in sym_report.sites]
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is HETCONV2D]
    assert len(calls) == len(sym_report.rewritten) == 5  # a, b, odd, big, c
    for a, b in zip(out, sym_out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_min_channels_skip_first_and_fake_inputs():
    model = Net().eval()
    x = torch.randn(1, 3, 16, 16)
    _, report, _ = rewritten(model, x, "symbolic", HetConv(part=2, min_channels=20, skip_first=False))
    reasons = {s.name: s.reason for s in report.skipped}
    assert "fewer than min_channels=20" in reasons["stem"] and "fewer than min_channels=20" in reasons["a"]
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = mode.from_tensor(x)
    gm = fxeff.transform(model, (fake,), [HetConv(part=2)])
    assert all(s.error is None for s in gm.fxeff_report.sites)
    assert gm.fxeff_report.model_macs_after is None
    with torch.no_grad():
        gm(x)


def test_the_users_model_is_not_changed_and_the_new_layers_train():
    torch.manual_seed(0)
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = fxeff.transform(model, torch.randn(1, 3, 16, 16), [HetConv(part=4)])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    out = gm(torch.randn(2, 3, 16, 16))
    (out[0].square().mean() + out[1].square().mean()).backward()
    module = gm.get_submodule("fxeff_hetconv_a")
    assert module.weight_kxk.grad is not None and module.weight_1x1.grad is not None
    assert model.a.weight.grad is None


@pytest.mark.parametrize("name,size", [("vgg16", 32), ("resnet50", 64)])
def test_torchvision_vgg16_and_resnet50_end_to_end(name, size, tmp_path):
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(2, 3, size, size)
    gm = fxeff.transform(model, x, [HetConv(part=4)])
    report = gm.fxeff_report
    count = len(report.rewritten)
    assert count == {"vgg16": 12, "resnet50": 16}[name]
    assert report.model_macs_after < report.model_macs_before
    with torch.no_grad():
        expected = gm(x)
    # effconv backend: the same rewrite on dynamo's graph (eager after the pass, to keep the test short)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="effconv", options={"passes": [{"pass": "hetconv", "part": 4}],
                                                                "inductor": False})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), expected, rtol=1e-3, atol=1e-3)
    assert len(fxeff.backend.last_report().rewritten) == count
    torch._dynamo.reset()
    fxeff.export.export(gm, (x,), tmp_path / "model.pt2")
    loaded = fxeff.export.load_exported(tmp_path / "model.pt2")
    assert fxeff.export.fxeff_ops_in(loaded) == {"fxeff::hetconv2d": count}
    fxeff.export.trace(gm, (x,), tmp_path / "model.traced.pt")
    traced = fxeff.export.load_traced(tmp_path / "model.traced.pt")
    assert fxeff.export.fxeff_ops_in(traced) == {"fxeff::hetconv2d": count}
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(x), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(traced(x), expected, rtol=1e-4, atol=1e-4)


def _fit_reference(weight, part, x, x_ref, stride, padding, dilation, ridge):
    """init="fit" by brute force: one ridge least-squares problem per filter over the taps its dense mask keeps."""
    n, m, k, _ = weight.shape
    w = weight.double()
    cols = F.unfold(x.double(), k, dilation, padding, stride).transpose(1, 2).reshape(-1, m * k * k)
    target = F.conv2d(x_ref.double(), w, None, stride, padding, dilation).permute(0, 2, 3, 1).reshape(-1, n)
    start = HetConv2d.from_weight(w, None, part, init="sum").dense_weight().detach().reshape(n, -1)
    mask = HetConv2d(m, n, k, part, bias=False).requires_grad_(False)
    mask.weight_kxk.fill_(1)
    mask.weight_1x1.fill_(1)
    keep = mask.dense_weight().reshape(n, -1).bool()
    dense = torch.zeros(n, m * k * k, dtype=torch.float64)
    for j in range(n):
        a = cols[:, keep[j]]
        lam = ridge * (a * a).sum(0).mean()
        gram = a.T @ a + lam * torch.eye(a.shape[1], dtype=torch.float64)
        dense[j, keep[j]] = torch.linalg.solve(gram, a.T @ target[:, j] + lam * start[j, keep[j]])
    return dense.reshape(n, m, k, k)


@pytest.mark.parametrize("stride,padding,dilation,k,part", [(1, 1, 1, 3, 4), (2, 1, 1, 3, 2), (1, 0, 1, 3, 4),
                                                            (1, 2, 2, 3, 4), (2, 2, 1, 5, 2)])
def test_fit_init_solves_the_least_squares_problem(stride, padding, dilation, k, part, monkeypatch):
    import fxeff.nn.hetconv as hetconv_nn

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, k, stride, padding, dilation, bias=False)
    x = torch.randn(6, 8, 11, 10).cumsum(2)  # correlated pixels, as in images
    x_seen = x + 0.3 * torch.randn_like(x)     # what a layer sees once the ones before it are rewritten
    want = _fit_reference(conv.weight.detach(), part, x_seen, x, stride, padding, dilation, hetconv_nn.FIT_RIDGE)
    module = HetConv2d.from_weight(conv.weight, None, part, stride, padding, dilation, "fit", x_seen, x)
    torch.testing.assert_close(module.dense_weight().double(), want, rtol=1e-4, atol=1e-5)
    assert module.weight_kxk.dtype == torch.float32
    monkeypatch.setattr(hetconv_nn, "FIT_CHUNK_ELEMENTS", 1)  # one image at a time: the same Gram sums
    chunked = HetConv2d.from_weight(conv.weight, None, part, stride, padding, dilation, "fit", x_seen, x)
    torch.testing.assert_close(chunked.dense_weight(), module.dense_weight(), rtol=1e-5, atol=1e-6)


def test_fit_init_recovers_a_hetconv_and_beats_sum_on_its_data():
    torch.manual_seed(0)
    het = HetConv2d(16, 8, 3, 4, padding=1, bias=False).double()
    x = torch.randn(20, 16, 9, 9, dtype=torch.float64)
    dense = het.dense_weight().detach()
    kxk, one = fxeff.nn.hetconv.fit_weights(dense, 4, x, padding=1, ridge=1e-12)
    torch.testing.assert_close(kxk, het.weight_kxk.detach())
    torch.testing.assert_close(one, het.weight_1x1.detach())
    conv = nn.Conv2d(16, 8, 3, padding=1)
    x = torch.randn(4, 16, 12, 12).cumsum(3)
    y = conv(x).detach()
    errors = {init: float((HetConv2d.from_conv(conv, 4, init, x)(x) - y).norm() / y.norm())
              for init in ("sum", "fit")}
    assert errors["fit"] < 0.8 * errors["sum"]
    with pytest.raises(ValueError, match=r"init='fit' .* expected inputs=\[B, M, H, W\], got None"):
        HetConv2d.from_conv(conv, 4, "fit")
    with pytest.raises(ValueError, match=r"inputs expected \[B, 16, H, W\], got \[4, 8, 12, 12\]"):
        HetConv2d.from_conv(conv, 4, "fit", x[:, :8])


def test_pass_init_fit_fits_each_layer_to_the_input_it_sees():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(8, 3, 16, 16).cumsum(3)
    errors = {}
    for init in ("sum", "fit"):
        gm, report, _ = rewritten(model, x, "symbolic", HetConv(part=4, init=init))
        note = next(n for n in report.notes if n.startswith("model output relative error"))
        errors[init] = float(note.rsplit(" ", 1)[1])
    assert errors["fit"] < 0.8 * errors["sum"]
    # layer b: fitted to what the rewritten layer a gives it, against what the original a gave
    a_in = F.relu(model.stem(x))
    b_seen = F.relu(gm.get_submodule("fxeff_hetconv_a")(a_in))
    b_ref = F.relu(model.a(a_in))
    want = HetConv2d.from_weight(model.b.weight, None, 4, 2, 1, 1, "fit", b_seen, b_ref)
    torch.testing.assert_close(gm.get_submodule("fxeff_hetconv_b").dense_weight(), want.dense_weight())
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = mode.from_tensor(x)
    with pytest.raises(ValueError, match=r"init='fit' .* expected real example inputs, got fake tensors"):
        fxeff.transform(model, (fake,), [HetConv(part=4, init="fit")])


def test_fit_init_is_the_same_with_two_threads():
    """The fit's batched solve ran into an MKL LU failure (inf weights) with 2 threads; it must not depend on threads."""
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    x = torch.randn(16, 64, 8, 8).relu()
    threads = torch.get_num_threads()
    try:
        weights = []
        for n in (1, 2):
            torch.set_num_threads(n)
            weights.append(HetConv2d.from_conv(conv, 4, "fit", x).dense_weight().detach())
    finally:
        torch.set_num_threads(threads)
    assert torch.isfinite(weights[1]).all()
    torch.testing.assert_close(weights[1], weights[0])
