"""The focus pass on torchvision models with their built-in default splits (random weights, small inputs).

Each model: ``transform(model, x, [Focus(threshold=t, execution="layer")])`` without a split, t chosen so that about 40% of the
split's pixels are active, output equal to the pure-PyTorch hook reference, and every conv in the report.
"""
import pytest
import torch
import torchvision
from torch import nn

import fxeff
from fxeff.passes import Focus, default_split, run_passes
from _focus_reference import focused_reference, threshold_for_fraction

# name, input size, expected default split, the split's grid (its output's H = W)
MODELS = [
    ("vgg11", 64, "features.1", 64),
    ("vgg16", 64, "features.3", 64),
    ("vgg16_bn", 64, "features.5", 64),
    ("resnet18", 64, "maxpool", 16),
    ("resnet50", 64, "maxpool", 16),
    ("mobilenet_v2", 64, "features.1", 32),
    ("mobilenet_v3_small", 64, "features.1", 16),
    ("efficientnet_b0", 64, "features.1", 32),
    ("regnet_x_400mf", 64, "stem", 32),
    ("densenet121", 64, "features.pool0", 16),
    ("alexnet", 96, "features.1", 23),
    ("convnext_tiny", 64, "features.0", 16),
    ("googlenet", 64, "maxpool1", 16),
    ("inception_v3", 96, "maxpool1", 22),
    ("mnasnet0_5", 64, "layers.7", 32),
    ("shufflenet_v2_x0_5", 64, "maxpool", 16),
    ("squeezenet1_0", 64, "features.1", 29),
    ("squeezenet1_1", 64, "features.1", 31),
    ("maxvit_t", 224, "stem", 112),
]
SLOW = {"vgg16", "vgg16_bn", "densenet121", "inception_v3", "convnext_tiny", "maxvit_t"}
# builder arguments: GoogLeNet and Inception v3 without their training-only auxiliary heads (whose convs an
# eval-mode graph never calls)
KWARGS = {"googlenet": dict(aux_logits=False, init_weights=False), "inception_v3": dict(aux_logits=False, init_weights=False)}


def _model(name, size=64):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, **KWARGS.get(name, {}))
    # BatchNorm statistics measured on random images: with the unit running variance of a fresh model the random
    # activations of some families (GoogLeNet, Inception v3, ShuffleNetV2) fade, and the logits are the
    # classifier's bias for any input
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(4, 3, size, size))
    return model.eval()


def _inputs(size):
    """Two images with different bright blobs (so the two masks differ), on a noisy background."""
    x = torch.randn(2, 3, size, size) * 0.5
    x[0, :, size // 8: size // 2, size // 8: size // 2] += 1.5
    x[1, :, size // 2:, size // 3:] += 1.5
    return x


def _check_relative(out, expected):
    scale = expected.abs().max().item()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("name, size, split, grid",
                         [pytest.param(*m, marks=pytest.mark.slow) if m[0] in SLOW else m for m in MODELS])
def test_default_split_focus_equals_reference(name, size, split, grid):
    model = _model(name, size)
    assert default_split(model) == split
    x = _inputs(size)
    t = threshold_for_fraction(model, split, x, 0.4)
    gm = fxeff.transform(model, x, [Focus(threshold=t, execution="layer")])
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
    assert mask.shape == (2, grid, grid)
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
            reports.append(run_passes(gm, example_inputs, [Focus(threshold=t, execution="layer")], model_class=type(model)))
            return gm

        torch._dynamo.reset()
        with torch.no_grad():
            out = torch.compile(model, backend=backend, fullgraph=True)(x)
        report = reports[0]
    else:
        gm = torch.export.export(model, (x,)).module()
        report = run_passes(gm, (x,), [Focus(threshold=t, execution="layer")])  # the class comes from export's module stack
        with torch.no_grad():
            out = gm(x)
    assert report.split == "maxpool (default for ResNet)"
    assert len(report.rewritten) == 19 and [s.name for s in report.skipped] == ["conv1"]
    _check_relative(out, expected)
