"""The focus pass on torchvision models with their built-in default splits (random weights, small inputs).

Each model: ``transform(model, x, [Focus(threshold=t)])`` without a split, t chosen so that about 40% of the
split's pixels are active, output equal to the pure-PyTorch hook reference, and every conv in the report.
"""
import pytest
import torch
import torchvision
from torch import nn

import fxeff
from fxeff.passes import Focus, default_split, run_passes
from _focus_reference import focused_reference, threshold_for_fraction

# name, input size, expected default split, the split's output stride (input size / split grid)
MODELS = [
    ("vgg11", 64, "features.1", 1),
    ("vgg16", 64, "features.3", 1),
    ("vgg16_bn", 64, "features.5", 1),
    ("resnet18", 64, "maxpool", 4),
    ("resnet50", 64, "maxpool", 4),
    ("mobilenet_v2", 64, "features.1", 2),
    ("mobilenet_v3_small", 64, "features.1", 4),
    ("efficientnet_b0", 64, "features.1", 2),
    ("regnet_x_400mf", 64, "stem", 2),
    ("densenet121", 64, "features.pool0", 4),
]
SLOW = {"vgg16", "vgg16_bn", "densenet121"}


def _model(name):
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()


def _inputs(size):
    """Two images with different bright blobs (so the two masks differ), on a noisy background."""
    x = torch.randn(2, 3, size, size) * 0.5
    x[0, :, size // 8: size // 2, size // 8: size // 2] += 1.5
    x[1, :, size // 2:, size // 3:] += 1.5
    return x


def _check_relative(out, expected):
    scale = expected.abs().max().item()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("name, size, split, stride",
                         [pytest.param(*m, marks=pytest.mark.slow) if m[0] in SLOW else m for m in MODELS])
def test_default_split_focus_equals_reference(name, size, split, stride):
    model = _model(name)
    assert default_split(model) == split
    x = _inputs(size)
    t = threshold_for_fraction(model, split, x, 0.4)
    gm = fxeff.transform(model, x, [Focus(threshold=t)])
    report = gm.fxeff_report
    assert report.split.startswith(split) and "default for" in report.split

    convs = [fqn for fqn, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(s.name for s in report.sites) == sorted(convs)  # every conv is in the report
    assert all(s.status == "rewritten" or s.reason == "upstream of the AoI split" for s in report.sites)
    upstream = {s.name for s in report.skipped}
    assert upstream and len(report.rewritten) > len(upstream)

    with torch.no_grad():
        with focused_reference(model, split, t) as masks:
            expected = model(x)
        out = gm(x)
        dense = model(x)
    mask = masks[0]
    assert mask.shape == (2, size // stride, size // stride)
    assert 0.3 <= mask.float().mean() <= 0.5 and not torch.equal(mask[0], mask[1])
    torch.testing.assert_close(torch.tensor(report.aoi_fractions), mask.float().mean(dim=(1, 2)))
    _check_relative(out, expected)
    assert not torch.allclose(dense, expected, rtol=1e-3, atol=1e-3 * dense.abs().max().item())
    assert report.macs_after < report.macs_before


@pytest.mark.parametrize("kind", ["dynamo", "export"])
def test_resnet18_default_split_on_dynamo_and_export_graphs(kind):
    model = _model("resnet18")
    x = _inputs(64)
    t = threshold_for_fraction(model, "maxpool", x, 0.4)
    with torch.no_grad(), focused_reference(model, "maxpool", t):
        expected = model(x)
    if kind == "dynamo":
        reports = []

        def backend(gm, example_inputs):
            reports.append(run_passes(gm, example_inputs, [Focus(threshold=t)], model_class=type(model)))
            return gm

        torch._dynamo.reset()
        with torch.no_grad():
            out = torch.compile(model, backend=backend, fullgraph=True)(x)
        report = reports[0]
    else:
        gm = torch.export.export(model, (x,)).module()
        report = run_passes(gm, (x,), [Focus(threshold=t)])  # the class comes from export's module stack
        with torch.no_grad():
            out = gm(x)
    assert report.split == "maxpool (default for ResNet)"
    assert len(report.rewritten) == 19 and [s.name for s in report.skipped] == ["conv1"]
    _check_relative(out, expected)
