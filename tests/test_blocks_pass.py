"""The blocks pass (fxeff.passes.Blocks): single-entry single-exit blocks found, outlined, reported."""
import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxeff
from fxeff import reference
from fxeff.passes.blocks import BLOCK_PREFIX, max_convs
from fxeff.passes.graph import conv_sites

torchvision = pytest.importorskip("torchvision")


def block_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith(BLOCK_PREFIX)]


def check_blocks(model, x, max_ratio=0.125, min_convs=2):
    """Runs the pass; checks what every result must satisfy; returns (gm, report)."""
    n_convs = len(conv_sites(fx.symbolic_trace(model)))
    gm = fxeff.transform(model, x, [fxeff.Blocks(max_ratio=max_ratio, min_convs=min_convs)])
    report = gm.fxeff_report
    most = max_convs(n_convs, max_ratio, min_convs)
    calls = block_calls(gm)
    assert len(calls) == len(gm.fxeff_blocks) == len(report.rewritten)
    seen = set()
    for call, info in zip(calls, gm.fxeff_blocks):
        assert info["name"] == call.target
        # one input (its entry), one output: a descendant with the same shapes can take its place
        assert len(call.args) == 1 and not call.kwargs
        block = gm.get_submodule(call.target)
        assert [n.op for n in block.graph.nodes].count("placeholder") == 1
        assert min_convs <= len(info["convs"]) <= most
        assert set(info["prunable"]) <= set(info["convs"])
        assert not seen & set(info["convs"]), "a conv in two blocks"
        seen |= set(info["convs"])
        assert len(conv_sites(block)) == len(info["convs"])
        assert info["params"] == sum(p.numel() for p in block.parameters()) > 0
        assert info["macs"] > 0
    # every conv is in a block or skipped with a reason
    assert len(seen) + len(report.skipped) == n_convs
    assert all(s.reason for s in report.skipped)
    with torch.no_grad():
        expected, out = model(x), gm(x)
    if isinstance(expected, dict):
        assert expected.keys() == out.keys() and all(torch.equal(expected[k], out[k]) for k in expected)
    else:
        assert torch.equal(expected, out)
    return gm, report


@pytest.mark.parametrize("arch", reference.ARCHS)
def test_reference_models(arch):
    model = reference.build(arch, "cluttered-fashion-mnist").eval()
    gm, report = check_blocks(model, torch.randn(2, 1, 64, 64))
    assert len(gm.fxeff_blocks) >= 3
    assert report.notes[0].startswith(f"{len(gm.fxeff_blocks)} blocks")


def test_a_residual_block_is_one_block_and_its_output_convs_are_not_pruned():
    model = reference.build("resnet20", "cluttered-fashion-mnist").eval()
    gm, report = check_blocks(model, torch.randn(2, 1, 64, 64))
    first = gm.fxeff_blocks[0]
    # layer1.0 whole: both convs, the skip's add and the ReLU after it
    assert first["convs"] == ["layer1.0.conv1", "layer1.0.conv2"]
    assert first["prunable"] == ["layer1.0.conv1"]
    block = gm.get_submodule(first["name"])
    assert any(n.op == "call_function" and "add" in str(n.target) for n in block.graph.nodes)
    assert [n for n in block.graph.nodes if n.op == "output"][0].args[0].name.startswith("layer1_0_relu")
    # ResNet-20 has 21 convs: at most max(floor(21 / 8), 2) = 2 per block, so the stem conv and the 1x1 downsample
    # convs (a third conv in their residual block) are left out, each with its reason
    skipped = {s.name: s.reason for s in report.skipped}
    assert set(skipped) == {"conv1", "layer2.0.downsample.0", "layer3.0.downsample.0"}
    assert "no single-entry single-exit subgraph with 2 to 2 convs" in skipped["conv1"]
    # the downsampling residual block's own branch (conv1, conv2) is a block without the third conv
    assert ["layer2.0.conv1", "layer2.0.conv2"] in [b["convs"] for b in gm.fxeff_blocks]


def test_mobilenetv2_blocks_end_at_the_bottlenecks():
    model = reference.build("mobilenetv2", "cluttered-fashion-mnist").eval()
    gm, _ = check_blocks(model, torch.randn(2, 1, 64, 64))
    for info in gm.fxeff_blocks[1:-1]:  # each inverted residual block: expand, depthwise, project
        assert len(info["convs"]) == 3 and info["convs"][-1].endswith("conv.2")
        assert info["prunable"] == info["convs"][:2]


TORCHVISION = {
    "resnet18": lambda: torchvision.models.resnet18(),
    "resnet50": lambda: torchvision.models.resnet50(),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(),
    "mobilenet_v3_large": lambda: torchvision.models.mobilenet_v3_large(),
    "densenet121": lambda: torchvision.models.densenet121(),  # concat
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(),  # squeeze-excitation
    "fcn_resnet50": lambda: torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None),
    "fasterrcnn_backbone": lambda: torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None).backbone,  # a dict of FPN features
}


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_families(name):
    torch.manual_seed(0)
    model = TORCHVISION[name]().eval()
    gm, report = check_blocks(model, torch.randn(1, 3, 96, 96))
    covered = sum(len(b["convs"]) for b in gm.fxeff_blocks)
    assert covered >= 0.8 * (covered + len(report.skipped)), report.notes[0]


def test_densenet_blocks_read_the_concat():
    model = torchvision.models.densenet121().eval()
    gm, _ = check_blocks(model, torch.randn(1, 3, 64, 64))
    dense_layers = [b for b in gm.fxeff_blocks if b["convs"][0].startswith("features.denseblock")]
    assert len(dense_layers) >= 50


def test_squeeze_excitation_stays_inside_its_block():
    model = torchvision.models.efficientnet_b0().eval()
    gm, _ = check_blocks(model, torch.randn(1, 3, 64, 64))
    for info in gm.fxeff_blocks:
        fcs = [c for c in info["convs"] if ".fc1" in c or ".fc2" in c]
        for fc in fcs:  # fc1 and fc2 of one SE module always together
            partner = fc.replace(".fc1", ".fc2") if ".fc1" in fc else fc.replace(".fc2", ".fc1")
            assert partner in info["convs"]


def test_a_model_without_blocks_gets_a_clear_report():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    gm = fxeff.transform(model, torch.randn(1, 3, 16, 16), [fxeff.Blocks()])
    report = gm.fxeff_report
    assert not block_calls(gm) and not report.rewritten
    assert report.notes[0].startswith("no block found") and "the graph is unchanged" in report.notes[0]
    assert [s.name for s in report.skipped] == ["0"]


def test_max_ratio_bounds_the_block_size():
    model = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 64, 64)
    small, _ = check_blocks(model, x, max_ratio=0.05)
    large, _ = check_blocks(model, x, max_ratio=0.25)
    assert max(len(b["convs"]) for b in small.fxeff_blocks) <= 2 < max(len(b["convs"]) for b in large.fxeff_blocks)
    assert len(large.fxeff_blocks) < len(small.fxeff_blocks)


def test_config_is_checked_and_round_trips():
    with pytest.raises(ValueError, match="max_ratio must be a float in"):
        fxeff.Blocks(max_ratio=0)
    with pytest.raises(ValueError, match="min_convs must be an int >= 1"):
        fxeff.Blocks(min_convs=0)
    config = fxeff.Blocks(max_ratio=0.2, min_convs=3)
    assert fxeff.config_from_dict(config.to_dict()) == config


def test_dynamo_graphs_are_refused_with_the_way_out():
    model = reference.build("resnet20", "cluttered-fashion-mnist").eval()
    compiled = torch.compile(model, backend="effconv", options={"passes": [{"pass": "blocks"}]})
    with pytest.raises(Exception, match="fxeff.passes.Blocks: dynamo graphs"):
        compiled(torch.randn(2, 1, 64, 64))


@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_a_boundary_never_parts_a_conv_from_its_batchnorm_and_relu(name):
    """ResNet-20's first block began with the stem's BatchNorm and ReLU; they now stay with the stem conv, outside
    every block, where they fold into it for inference. No block starts or ends between a conv and its epilogue."""
    if name == "resnet20":
        model, x = reference.build("resnet20", "fashion-mnist").eval(), torch.randn(2, 1, 28, 28)
    else:
        model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)
    gm, _ = check_blocks(model, x)
    first = gm.fxeff_blocks[0]
    assert not {"bn1", "relu"} & set(first["nodes"]), first["nodes"]
    traced = fx.symbolic_trace(model)
    nodes = {n.name: n for n in traced.graph.nodes}
    for info in gm.fxeff_blocks:
        entry = nodes[info["entry"]]
        assert not (entry.op == "call_module" and isinstance(traced.get_submodule(entry.target), nn.Conv2d)
                    and len(entry.users) == 1), (info["name"], info["entry"])
        if entry.op == "call_module" and isinstance(traced.get_submodule(entry.target), nn.BatchNorm2d):
            assert not all(isinstance(traced.get_submodule(u.target), nn.ReLU) for u in entry.users
                           if u.op == "call_module"), (info["name"], info["entry"])
