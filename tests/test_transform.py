"""fxeff.transform: the symbolic_trace entry point."""
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import fxeff
from fxeff import Focus, Report, TraceError
from _focus_reference import focused_reference


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, padding=1))

    def forward(self, x):
        return self.body(self.stem(x))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        if x.mean() > 0:  # symbolic_trace cannot branch on a Proxy
            return self.conv(x)
        return x


def _image():
    x = torch.zeros(2, 3, 24, 24)
    x[0, :, 3:10, 4:12] = 1.0
    x[1, :, 12:22, 10:20] = 1.0
    return x + 0.05 * torch.randn_like(x)


def test_returns_a_graph_module_with_its_report():
    model = Small().eval()
    x = _image()
    gm = fxeff.transform(model, x, [Focus(threshold=0.5, split="stem", execution="layer")])
    assert isinstance(gm, fx.GraphModule) and isinstance(gm.fxeff_report, Report)
    assert [(s.name, s.status) for s in gm.fxeff_report.sites] == \
        [("stem.0", "skipped"), ("body.0", "rewritten"), ("body.2", "rewritten")]
    with torch.no_grad(), focused_reference(model, "stem", 0.5) as masks:
        expected = model(x)
    assert 0.1 < masks[0].float().mean() < 0.9
    torch.testing.assert_close(gm(x), expected, rtol=1e-4, atol=1e-5)


def test_original_model_is_left_dense_and_parameters_are_shared():
    model = Small().eval()
    x = _image()
    dense = model(x)
    gm = fxeff.transform(model, x, [Focus(threshold=0.5, split="stem", execution="layer")])
    torch.testing.assert_close(model(x), dense)  # the model itself is not rewritten
    assert not torch.allclose(gm(x), dense)
    assert gm.get_parameter("body.0.weight") is model.body[0].weight
    with torch.no_grad():
        model.body[2].bias += 1.0  # an update of the model's weights is seen by the transformed graph
    with torch.no_grad(), focused_reference(model, "stem", 0.5):
        expected = model(x)
    torch.testing.assert_close(gm(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("wrap", [lambda x: x, lambda x: (x,), lambda x: [x]])
def test_example_inputs_as_tensor_tuple_or_list(wrap):
    gm = fxeff.transform(Small().eval(), wrap(_image()), [{"pass": "focus", "threshold": 0.5, "split": "stem",
                                                                "execution": "layer"}])
    assert len(gm.fxeff_report.rewritten) == 2


def test_bad_arguments():
    with pytest.raises(TypeError, match="fxeff.transform: model must be an nn.Module, got function"):
        fxeff.transform(lambda x: x, _image(), [Focus(threshold=0.5, execution="layer")])
    with pytest.raises(TypeError, match="example_inputs must be a tensor or a tuple/list"):
        fxeff.transform(Small(), {"x": _image()}, [Focus(threshold=0.5, split="stem", execution="layer")])


def test_untraceable_model_points_to_torch_compile():
    with pytest.raises(TraceError) as info:
        fxeff.transform(DataDependent(), torch.randn(1, 3, 8, 8), [Focus(threshold=0.5, execution="layer")])
    assert isinstance(info.value, RuntimeError)
    message = str(info.value)
    assert "cannot trace DataDependent" in message
    assert 'torch.compile(model, backend="effconv", options={"passes": [...]})' in message
    assert isinstance(info.value.__cause__, Exception)


def test_print_report(capsys):
    gm = fxeff.transform(Small().eval(), _image(), [Focus(threshold=0.5, split="stem", execution="layer")])
    print(gm.fxeff_report)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "fxeff report: pass focus"
    assert "AoI fraction per example image:" in out
    header = next(line for line in lines if line.startswith("site"))
    assert all(col in header for col in ("op", "status", "MACs before", "MACs after", "reason"))
    assert any(line.startswith("body.2") and "rewritten" in line for line in lines)
    assert "sites: 2 rewritten, 1 skipped" in out and "whole model MACs" in out


def test_second_focus_pass_finds_nothing_left_and_reports_merge():
    gm = fxeff.transform(Small().eval(), _image(), [Focus(threshold=0.5, split="stem", execution="layer"),
                                                    Focus(threshold=0.5, split="stem", execution="layer")])
    report = gm.fxeff_report
    assert report.pass_name == "focus+focus"
    assert len(report.rewritten) == 2 and report.notes[-1] == "no conv could be focused: the graph is unchanged"
    assert report.notes[:-1] == ["1 residual add(s) and activation(s) fused into the focused conv before them as its "
                                 "epilogue (body.1; Focus(fuse_epilogue=False) keeps them)"]
    assert sum(1 for n in gm.graph.nodes if n.target == torch.ops.fxeff.aoi_mask.default) == 1


def test_training_a_transformed_model_updates_the_original_weights():
    model = Small()
    x = _image()
    gm = fxeff.transform(model, x, [Focus(threshold=0.5, split="stem", execution="layer")])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.body[0].weight.detach().clone()
    loss = F.mse_loss(gm(x), torch.zeros(2, 4, 12, 12))
    loss.backward()
    optimizer.step()
    assert not torch.equal(model.body[0].weight, before)
