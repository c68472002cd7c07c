"""fxeff.nn: AoIThreshold and FocusedConv2d against pure-PyTorch references."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxeff.nn import AoIThreshold, FocusedConv2d, register_notrace_module
from fxeff.transform import trace
from _focus_reference import aoi_mask_reference, mask_resize_reference


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_aoi_threshold_matches_reference(reduce):
    x = torch.randn(3, 5, 9, 11)
    module = AoIThreshold(0.3, reduce=reduce)
    mask = module(x)
    assert mask.dtype == torch.bool and mask.shape == (3, 9, 11)
    torch.testing.assert_close(mask, aoi_mask_reference(x, 0.3, reduce))
    assert "threshold=0.3" in repr(module) and reduce in repr(module)


def test_aoi_threshold_is_stateless():
    module = AoIThreshold(0.0)
    before = dict(module.state_dict()), set(vars(module))
    first = module(torch.randn(1, 2, 4, 4))
    second = module(-torch.ones(1, 2, 4, 4))
    assert first.any() and not second.any()
    assert (dict(module.state_dict()), set(vars(module))) == before


@pytest.mark.parametrize("bad, error", [(float("nan"), ValueError), (float("inf"), ValueError), ("1", TypeError),
                                        (True, TypeError)])
def test_aoi_threshold_rejects_bad_threshold(bad, error):
    with pytest.raises(error, match="fxeff.nn.AoIThreshold: threshold"):
        AoIThreshold(bad)


def test_aoi_threshold_rejects_bad_reduce():
    with pytest.raises(ValueError, match="reduce must be one of"):
        AoIThreshold(1.0, reduce="max")


@pytest.mark.parametrize("stride, padding, dilation, groups", [(1, 1, 1, 1), (2, 1, 1, 1), (1, 2, 2, 1), (1, 1, 1, 6),
                                                               (2, 0, 1, 2)])
def test_from_conv_matches_masked_conv(stride, padding, dilation, groups):
    conv = nn.Conv2d(6, 12, 3, stride=stride, padding=padding, dilation=dilation, groups=groups)
    focused = FocusedConv2d.from_conv(conv)
    assert focused.weight is conv.weight and focused.bias is conv.bias
    x = torch.randn(2, 6, 17, 15)
    dense = conv(x)
    mask = torch.rand(2, *dense.shape[-2:]) < 0.4
    out = focused(x, mask)
    torch.testing.assert_close(out, dense * mask[:, None], rtol=1e-5, atol=1e-5)


def test_mask_at_another_resolution_is_resized():
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1)
    focused = FocusedConv2d.from_conv(conv)
    x = torch.randn(2, 4, 16, 16)
    mask = torch.rand(2, 16, 16) < 0.2  # input resolution; the output grid is 8x8
    expected = conv(x) * mask_resize_reference(mask, (8, 8))[:, None]
    torch.testing.assert_close(focused(x, mask), expected, rtol=1e-5, atol=1e-5)


def test_shared_parameters_train_the_original_conv():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    focused = FocusedConv2d.from_conv(conv)
    x = torch.randn(1, 3, 8, 8)
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[:, 2:5, 3:7] = True
    focused(x, mask).sum().backward()
    reference = nn.Conv2d(3, 4, 3, padding=1)
    reference.load_state_dict(conv.state_dict())
    (reference(x) * mask[:, None]).sum().backward()
    torch.testing.assert_close(conv.weight.grad, reference.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.bias.grad, reference.bias.grad)


def test_constructor_and_repr():
    focused = FocusedConv2d(4, 8, 3, stride=2, padding=1, groups=2, bias=False)
    assert focused.bias is None and focused.weight.shape == (8, 2, 3, 3)
    text = repr(focused)
    assert "stride=(2, 2)" in text and "groups=2" in text and "focused=True" in text
    x = torch.randn(1, 4, 10, 10)
    out = focused(x, torch.ones(1, 5, 5, dtype=torch.bool))
    torch.testing.assert_close(out, F.conv2d(x, focused.weight, None, 2, 1, 1, 2), rtol=1e-5, atol=1e-5)


def test_same_padding_is_resolved():
    conv = nn.Conv2d(3, 3, 5, padding="same")
    focused = FocusedConv2d.from_conv(conv)
    assert focused.padding == (2, 2)
    x = torch.randn(1, 3, 9, 9)
    torch.testing.assert_close(focused(x, torch.ones(1, 9, 9, dtype=torch.bool)), conv(x), rtol=1e-5, atol=1e-5)


def test_refuses_other_padding_modes():
    with pytest.raises(ValueError, match="padding_mode must be 'zeros', got 'reflect'"):
        FocusedConv2d(3, 3, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="from_conv: padding_mode must be 'zeros'"):
        FocusedConv2d.from_conv(nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular"))
    with pytest.raises(ValueError, match="asymmetric"):
        FocusedConv2d.from_conv(nn.Conv2d(3, 3, 4, padding="same"))
    with pytest.raises(TypeError, match="expected an nn.Conv2d"):
        FocusedConv2d.from_conv(nn.Linear(3, 3))


def test_mask_is_required_and_input_must_be_4d():
    focused = FocusedConv2d(3, 3, 3)
    with pytest.raises(ValueError, match="mask is required"):
        focused(torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match="x must be 4-D"):
        focused(torch.randn(3, 5, 5), torch.ones(1, 3, 3, dtype=torch.bool))


def test_modules_are_fx_leaves():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.aoi = AoIThreshold(0.0)
            self.conv = FocusedConv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = self.stem(x)
            return self.conv(y, self.aoi(y))

    model = Model()
    gm = trace(model)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["stem", "aoi", "conv"]
    assert not any(n.op == "call_function" for n in gm.graph.nodes)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(gm(x), model(x))


def test_register_notrace_module():
    @register_notrace_module
    class Opaque(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent: symbolic_trace would fail inside
                return x
            return -x

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.opaque = Opaque()

        def forward(self, x):
            return self.opaque(x) + 1

    gm = trace(Model())
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["opaque"]
    with pytest.raises(TypeError, match="expected an nn.Module subclass"):
        register_notrace_module(int)
