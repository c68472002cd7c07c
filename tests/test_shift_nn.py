"""fxeff.nn.Shift1d/2d/3d and fxeff.nn.quantized against tests/_shift_reference.py and nn.Conv{1,2,3}d(groups=C)."""
import io
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxeff
from fxeff.nn import Shift1d, Shift2d, Shift3d, quantized, sparsity_loss
from fxeff.transform import trace
from _shift_reference import shift_reference

SHIFTS = {1: Shift1d, 2: Shift2d, 3: Shift3d}
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SPATIAL = {1: (11,), 2: (7, 9), 3: (4, 5, 6)}


def _input(dims, channels=6, batch=2, requires_grad=False):
    return torch.randn(batch, channels, *SPATIAL[dims], dtype=torch.float64, requires_grad=requires_grad)


# ---------------------------------------------------------------- forward / backward against the reference


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("mode", ["sparse", "active"])
@pytest.mark.parametrize("padding", ["zeros", "border", "periodic", "reflect", "symmetric"])
def test_matches_reference_with_gradients(dims, mode, padding):
    module = SHIFTS[dims](6, padding=padding, mode=mode, init_shift=2.5).double()
    x = _input(dims, requires_grad=True)
    out = module(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    x_ref = x.detach().clone().requires_grad_(True)
    s_ref = module.shifts.detach().clone().requires_grad_(True)
    ref = shift_reference(x_ref, s_ref, padding, mode)
    ref.backward(grad_out)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert module.shifts.grad is not None
    torch.testing.assert_close(module.shifts.grad, s_ref.grad)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_grouped_shifts_are_fixed_integers_without_gradient(dims):
    module = SHIFTS[dims](3 ** dims + 2, mode="grouped", padding="border")
    assert "shifts" in dict(module.named_buffers()) and not list(module.parameters())
    assert not module.shifts.requires_grad and torch.equal(module.shifts, module.shifts.round())
    x = torch.randn(2, 3 ** dims + 2, *SPATIAL[dims], requires_grad=True)
    out = module(x)
    torch.testing.assert_close(out, shift_reference(x.detach(), module.shifts, "border", "grouped"))
    out.sum().backward()
    assert x.grad is not None and module.shifts.grad is None


def test_grouped_assignment_of_wu_et_al():
    module = Shift2d(20, mode="grouped")  # 3x3: 2 channels on each of the 9 offsets, 2 left on offset 0
    offsets = list(itertools.product((-1, 0, 1), repeat=2))
    expected = torch.tensor([o for o in offsets for _ in range(2)] + [(0, 0)] * 2, dtype=torch.float32)
    torch.testing.assert_close(module.shifts, expected)
    wide = Shift1d(11, mode="grouped", init_shift=2.7)  # k = int(2.7) = 2: offsets -2..2, 2 channels each
    torch.testing.assert_close(wide.shifts[:, 0], torch.tensor([-2, -2, -1, -1, 0, 0, 1, 1, 2, 2, 0.]))
    dw = Shift2d(15, mode="grouped", emulate_dw=dict(kernel_size=(3, 1)))  # H range 1, W range 0: 3 offsets
    torch.testing.assert_close(dw.shifts, torch.tensor([[-1., 0]] * 5 + [[0., 0]] * 5 + [[1., 0]] * 5))
    with pytest.raises(ValueError, match=r"Shift2d: mode 'grouped' needs channels >= the 9 offsets of a 3x3 "
                                         r"neighbourhood, got channels=8"):
        Shift2d(8, mode="grouped")


def test_grouped_state_dict_round_trip():
    source = Shift2d(9, mode="grouped", init_shift=1.0)
    target = Shift2d(9, mode="grouped", init_shift=0.0)
    assert not target.shifts.any()
    target.load_state_dict(source.state_dict())
    torch.testing.assert_close(target.shifts, source.shifts)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes_and_channels_last_are_kept(dtype):
    module = Shift2d(8, mode="active", padding="symmetric", emulate_dw=dict(kernel_size=5, stride=2)).to(dtype)
    x = torch.randn(2, 8, 9, 10, dtype=dtype).to(memory_format=torch.channels_last)
    out = module(x)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    expected = F.avg_pool2d(shift_reference(x.double(), module.shifts.detach().double(), "symmetric", "active")
                            [:, :, 2:-2, 2:-2], 2, 2, ceil_mode=True)
    tolerance = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)


# ---------------------------------------------------------------- initialisation, sparsity loss


@pytest.mark.parametrize("init_rule", [1, 2])
def test_init_rules(init_rule):
    shifts = Shift2d(4000, init_shift=1.5, init_rule=init_rule).shifts.detach()
    assert shifts.shape == (4000, 2) and shifts.dtype == torch.float32
    assert shifts.abs().max() <= 1.5 and shifts.abs().max() > 1.4
    assert (shifts > 0).float().mean().item() == pytest.approx(0.5, abs=0.05)
    magnitude = shifts.abs().mean().item()  # rule 1: |U(-r, r)| has mean r/2; rule 2: U(0, r) also r/2
    assert magnitude == pytest.approx(0.75, abs=0.05)
    if init_rule == 1:
        assert (shifts.abs() < 0.5).float().mean().item() == pytest.approx(1 / 3, abs=0.05)


def test_init_rules_draw_as_documented():
    torch.manual_seed(3)
    rule1 = Shift2d(50, init_shift=2.0, init_rule=1).shifts.detach()
    torch.manual_seed(3)
    rule2 = Shift2d(50, init_shift=2.0, init_rule=2).shifts.detach()
    torch.manual_seed(3)
    u = torch.rand(50, 2)
    sign = torch.randint(0, 2, (50, 2)).float() * 2 - 1
    torch.testing.assert_close(rule1, (2 * u - 1) * 2.0)  # uniform(-r, r)
    torch.testing.assert_close(rule2, u * 2.0 * sign)  # uniform(0, r) with a random sign


def test_emulate_dw_sets_initial_range_per_dim():
    module = Shift2d(3000, emulate_dw=dict(kernel_size=(3, 5), dilation=(1, 2)))
    assert module.init_range == (1.0, 4.0)  # dilation * (k // 2)
    bound = module.shifts.detach().abs().amax(0)
    assert 0.95 < bound[0] <= 1.0 and 3.8 < bound[1] <= 4.0
    assert not Shift3d(8, emulate_dw=dict(kernel_size=1)).shifts.any()  # a 1x1x1 "conv" has range 0
    assert Shift2d(8, init_shift=2.5, emulate_dw=dict(kernel_size=3)).init_range == (2.5, 2.5)  # explicit wins


def test_init_shift_default_and_dtype_device():
    module = Shift1d(500, dtype=torch.float64)
    assert module.init_range == (1.0,) and module.shifts.dtype == torch.float64
    assert module.shifts.abs().max() <= 1.0


def test_sparsity_loss():
    model = nn.Sequential(Shift2d(4, sparsity_term=1e-2), nn.ReLU(),
                          nn.Sequential(Shift1d(3), Shift2d(9, mode="grouped")))
    first, second, grouped = model[0], model[2][0], model[2][1]
    torch.testing.assert_close(first.sparsity_loss(), 1e-2 * first.shifts.abs().sum())
    total = sparsity_loss(model)
    expected = first.sparsity_loss() + second.sparsity_loss() + 5e-4 * grouped.shifts.abs().sum()
    torch.testing.assert_close(total, expected)
    total.backward()
    torch.testing.assert_close(first.shifts.grad, 1e-2 * first.shifts.sign())
    torch.testing.assert_close(second.shifts.grad, 5e-4 * second.shifts.sign())
    with pytest.raises(ValueError, match="fxeff.nn.sparsity_loss: Sequential has no fxeff shift modules"):
        sparsity_loss(nn.Sequential(nn.Conv2d(2, 2, 3)))


# ---------------------------------------------------------------- depthwise-conv emulation


def _conv_shape(dims, x, kernel_size, stride, padding, dilation):
    conv = CONVS[dims](x.shape[1], x.shape[1], kernel_size, stride, padding, dilation, groups=x.shape[1], bias=False)
    try:
        return conv(x).shape
    except RuntimeError:
        return None  # input too small for the conv


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_emulate_dw_output_shape_equals_depthwise_conv(dims):
    kernels, paddings, strides, dilations = (1, 2, 3, 4, 5), (0, 1, 2, 3), (1, 2, 3), (1, 2)
    lengths = range(1, 13) if dims < 3 else (1, 2, 5, 8)
    if dims == 3:
        kernels, paddings = (1, 2, 3, 5), (0, 1, 3)
    checked = refused = 0
    for k, p, s, d in itertools.product(kernels, paddings, strides, dilations):
        module = SHIFTS[dims](2, emulate_dw=dict(kernel_size=k, stride=s, padding=p, dilation=d))
        for length in lengths:
            # a different length per dim: the last dims get longer inputs
            x = torch.randn(1, 2, *(length + i for i in range(dims)))
            expected = _conv_shape(dims, x, k, s, p, d)
            if expected is None:
                with pytest.raises(ValueError, match="too small for the emulated depthwise conv"):
                    module(x)
                refused += 1
                continue
            assert module(x).shape == expected, (k, p, s, d, x.shape)
            assert module.output_size(*x.shape[2:]) == tuple(expected[2:])
            checked += 1
    assert checked > 100 and refused > 0


def test_emulate_dw_per_dim_tuples_equal_conv_shape():
    for k, p, s, d in [((3, 5), (0, 2), (2, 1), (1, 2)), ((1, 4), (1, 0), (1, 3), (2, 1)), ((5, 2), (3, 1), 2, 1)]:
        module = Shift2d(3, emulate_dw=dict(kernel_size=k, padding=p, stride=s, dilation=d))
        for h, w in [(9, 10), (13, 7), (6, 6)]:
            x = torch.randn(2, 3, h, w)
            assert module(x).shape == _conv_shape(2, x, k, s, p, d), (k, p, s, d, h, w)


def test_emulate_dw_values_crop_pad_and_pool():
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)

    def with_zero_shifts(**emulate_dw):
        module = Shift2d(3, emulate_dw=emulate_dw).double()
        with torch.no_grad():
            module.shifts.zero_()
        return module(x)

    torch.testing.assert_close(with_zero_shifts(kernel_size=3, padding=1), x)  # t = 0
    torch.testing.assert_close(with_zero_shifts(kernel_size=5), x[:, :, 2:-2, 2:-2])  # t = 4
    torch.testing.assert_close(with_zero_shifts(kernel_size=4), x[:, :, 1:-2, 1:-2])  # t = 3: 1 start, 2 end
    torch.testing.assert_close(with_zero_shifts(kernel_size=1, padding=(1, 2)), F.pad(x, [2, 2, 1, 1]))  # t < 0
    torch.testing.assert_close(with_zero_shifts(kernel_size=2, padding=1), F.pad(x, [0, 1, 0, 1]))  # t = -1
    torch.testing.assert_close(with_zero_shifts(kernel_size=3, padding=1, stride=2),
                               F.avg_pool2d(x, 2, 2, ceil_mode=True))
    # with real shifts: shift first, then crop, then pool
    module = Shift2d(3, padding="periodic", init_shift=3.0, emulate_dw=dict(kernel_size=5, stride=(2, 3))).double()
    expected = F.avg_pool2d(shift_reference(x, module.shifts.detach(), "periodic", "sparse")[:, :, 2:-2, 2:-2],
                            (2, 3), (2, 3), ceil_mode=True)
    torch.testing.assert_close(module(x), expected)


def _window_mean_reference(x, pool):
    """Mean over each window of pool[d] consecutive elements (the last one clipped), by explicit slicing."""
    for i, s in enumerate(pool):
        axis = x.dim() - len(pool) + i
        x = torch.stack([w.mean(axis) for w in x.split(s, axis)], axis)
    return x


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_strided_emulation_is_a_window_mean_with_clipped_last_windows(dims):
    """The pooling of the float layers' fused op (zero shifts, no crop) is the clipped window mean."""
    for pool in itertools.product((1, 2, 3), repeat=dims):
        if max(pool) == 1:
            continue
        for sizes in [(1, 2, 3)[:dims], (4, 5, 7)[:dims], (8, 6, 9)[:dims]]:
            x = torch.randn(2, 3, *sizes, dtype=torch.float64)
            pooled = fxeff.ops.shift_pool(x, torch.zeros(3, dims, dtype=torch.float64), "zeros", "sparse",
                                          [0] * (2 * dims), list(pool))
            torch.testing.assert_close(pooled, _window_mean_reference(x, pool))


def test_torch_export_dynamic_spatial_sizes():
    model = nn.Sequential(nn.Conv2d(3, 6, 1), Shift2d(6, emulate_dw=dict(kernel_size=(3, 5), stride=(2, 3), padding=1)))
    height, width = torch.export.Dim("height", min=8, max=256), torch.export.Dim("width", min=8, max=256)
    exported = torch.export.export(model, (torch.randn(2, 3, 16, 16),), dynamic_shapes=({2: height, 3: width},))
    for h, w in [(9, 13), (16, 16), (31, 8)]:
        x = torch.randn(2, 3, h, w)
        torch.testing.assert_close(exported.module()(x), model(x))


# ---------------------------------------------------------------- errors, repr


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(channels=0), ValueError, "Shift2d: channels must be a positive int, got 0"),
    (dict(channels=-3), ValueError, "channels must be a positive int, got -3"),
    (dict(channels=True), ValueError, "channels must be a positive int, got True"),
    (dict(padding="circular"), ValueError, r"padding must be one of \('zeros', .*\), got 'circular'"),
    (dict(mode="dense"), ValueError, r"mode must be one of \('sparse', 'active', 'grouped'\), got 'dense'"),
    (dict(init_rule=3), ValueError, "init_rule must be 1 .* or 2 .*, got 3"),
    (dict(init_rule=True), ValueError, "init_rule must be 1"),
    (dict(init_rule=2.0), ValueError, "init_rule must be 1"),
    (dict(init_shift=-1.0), ValueError, "init_shift must be finite and >= 0, got -1.0"),
    (dict(init_shift="1"), TypeError, "init_shift must be a float, got str"),
    (dict(sparsity_term=float("nan")), ValueError, "sparsity_term must be finite"),
    (dict(emulate_dw=dict(kernel_size=3, groups=4)), ValueError, r"emulate_dw has unknown keys \['groups'\]"),
    (dict(emulate_dw=dict(stride=2)), ValueError, "emulate_dw must give 'kernel_size'"),
    (dict(emulate_dw=dict(kernel_size=0)), ValueError, r"emulate_dw\['kernel_size'\] must be >= 1, got 0"),
    (dict(emulate_dw=dict(kernel_size=3, padding=-1)), ValueError, r"emulate_dw\['padding'\] must be >= 0"),
    (dict(emulate_dw=dict(kernel_size=3, stride=(1, 2, 1))), ValueError,
     r"emulate_dw\['stride'\] must be an int or 2 ints, got \(1, 2, 1\)"),
    (dict(emulate_dw=dict(kernel_size=3, padding="same")), ValueError, r"emulate_dw\['padding'\] must be an int"),
    (dict(emulate_dw=[3, 1, 1]), TypeError, "emulate_dw must be a dict"),
])
def test_constructor_errors(kwargs, error, message):
    kwargs = {"channels": 4, **kwargs}
    with pytest.raises(error, match=message):
        Shift2d(**kwargs)


def test_forward_errors_name_the_op():
    with pytest.raises((RuntimeError, ValueError), match=r"fxeff.shift.*shifts"):
        Shift2d(4)(torch.randn(1, 3, 5, 5))
    with pytest.raises((RuntimeError, ValueError), match="fxeff.shift"):
        Shift2d(4)(torch.randn(1, 4, 5))
    with pytest.raises(ValueError, match=r"fxeff.shift_pool: input size 2 along spatial dim 1 is too small"):
        Shift2d(4, emulate_dw=dict(kernel_size=5))(torch.randn(1, 4, 9, 2))


def test_repr_and_attributes():
    module = Shift2d(16, padding="reflect", mode="active", emulate_dw=dict(kernel_size=3, stride=(2, 1)))
    assert (module.dims, module.channels, module.padding, module.mode) == (2, 16, "reflect", "active")
    assert module.emulate_dw == {"kernel_size": (3, 3), "stride": (2, 1), "padding": (0, 0), "dilation": (1, 1)}
    assert repr(module) == ("Shift2d(16, padding='reflect', mode='active', sparsity_term=0.0005, emulate_dw="
                            "{'kernel_size': 3, 'stride': (2, 1), 'padding': 0, 'dilation': 1})")
    assert (Shift1d.dims, Shift3d.dims) == (1, 3)
    assert repr(Shift3d(2)) == "Shift3d(2, padding='zeros', mode='sparse', sparsity_term=0.0005)"


# ---------------------------------------------------------------- tracing, scripting, compile, export


class _Net(nn.Module):
    def __init__(self, mode="sparse"):
        super().__init__()
        self.conv = nn.Conv2d(3, 9, 1)
        self.shift = Shift2d(9, padding="reflect", mode=mode, init_shift=1.0 if mode == "grouped" else 2.0,
                             emulate_dw=dict(kernel_size=3, stride=2, padding=2))
        self.head = nn.Conv2d(9, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.shift(self.conv(x))))


@pytest.mark.parametrize("mode", ["sparse", "active", "grouped"])
def test_fxeff_tracer_keeps_a_leaf_and_symbolic_trace_traces_through(mode):
    model = _Net(mode)
    x = torch.randn(2, 3, 11, 10)
    gm = trace(model)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv", "shift", "head"]
    assert gm.get_submodule("shift") is model.shift
    torch.testing.assert_close(sparsity_loss(gm), sparsity_loss(model))
    torch.testing.assert_close(gm(x), model(x))
    plain = torch.fx.symbolic_trace(model)
    assert "shift" not in [n.target for n in plain.graph.nodes if n.op == "call_module"]
    assert torch.ops.fxeff.shift_pool in [n.target for n in plain.graph.nodes]  # strided: the fused op
    torch.testing.assert_close(plain(x), model(x))


def test_fxeff_transform_keeps_shift_modules():
    model = _Net()
    x = torch.randn(1, 3, 12, 12)
    gm = fxeff.transform(model, x, passes=[fxeff.Focus(threshold=0.0, split="conv")])
    assert any(isinstance(m, Shift2d) for m in gm.modules())
    assert gm(x).shape == model(x).shape


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_jit_trace_and_script(dims):
    module = SHIFTS[dims](5, padding="symmetric", init_shift=2.0, emulate_dw=dict(kernel_size=5, stride=2, padding=1))
    x = torch.randn(2, 5, *SPATIAL[dims])
    expected = module(x)
    traced = torch.jit.trace(module, x)
    scripted = torch.jit.script(module)
    for jitted in (traced, scripted):
        buffer = io.BytesIO()
        torch.jit.save(jitted, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
        torch.testing.assert_close(jitted(x), expected)
        torch.testing.assert_close(loaded(x), expected)
    with pytest.raises(Exception, match="too small for the emulated depthwise conv"):
        scripted(torch.randn(1, 5, *([2] * dims)))
    other = torch.randn(1, 5, *(n + 3 for n in SPATIAL[dims]))  # both follow the input's size
    torch.testing.assert_close(traced(other), module(other))
    torch.testing.assert_close(scripted(other), module(other))


def test_torch_compile_fullgraph_forward_and_backward():
    model = _Net("active")
    x = torch.randn(2, 3, 11, 10)
    expected = model(x)
    expected.square().sum().backward()
    expected_grad = model.shift.shifts.grad.clone()
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    torch.testing.assert_close(model.shift.shifts.grad, expected_grad)
    torch._dynamo.reset()


def test_torch_compile_inductor():
    model = _Net("sparse").eval()
    x = torch.randn(2, 3, 11, 10)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))
    torch._dynamo.reset()


def test_torch_export_round_trip():
    model = _Net("grouped").eval()
    x = torch.randn(2, 3, 11, 10)
    exported = torch.export.export(model, (x,))
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert torch.ops.fxeff.shift_pool.default in targets  # strided: the fused op
    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    torch.testing.assert_close(exported.module()(x), model(x))
    torch.testing.assert_close(loaded.module()(x), model(x))


# ---------------------------------------------------------------- quantized pipeline


class _QuantNet(nn.Module):
    def __init__(self, shift):
        super().__init__()
        self.quant, self.dequant = torch.ao.quantization.QuantStub(), torch.ao.quantization.DeQuantStub()
        self.conv = nn.Conv2d(3, 9, 3, padding=1)
        self.relu = nn.ReLU()
        self.shift = shift

    def forward(self, x):
        return self.dequant(self.shift(self.relu(self.conv(self.quant(x)))))


def _quantize(model, calibration):
    model.eval()
    model.qconfig = torch.ao.quantization.get_default_qconfig(torch.backends.quantized.engine)
    prepared = torch.ao.quantization.prepare(model)
    assert not hasattr(prepared.shift, "activation_post_process")  # keeps the input's qparams: no observer
    with torch.no_grad():
        for batch in calibration:
            prepared(batch)
    return torch.ao.quantization.convert(prepared, mapping=quantized.static_quant_module_mappings())


@pytest.mark.parametrize("mode, emulate_dw", [("sparse", None), ("grouped", None),
                                              ("sparse", dict(kernel_size=3, stride=2, padding=1))])
def test_quantized_pipeline(mode, emulate_dw):
    shift = Shift2d(9, padding="border", mode=mode, init_shift=1.7, emulate_dw=emulate_dw)
    model = _QuantNet(shift)
    calibration = [torch.randn(2, 3, 10, 12) for _ in range(4)]
    x = torch.randn(2, 3, 10, 12)
    with torch.no_grad():
        expected = model.eval()(x)
    qmodel = _quantize(model, calibration)
    assert type(qmodel.shift) is quantized.Shift2d and repr(qmodel.shift).startswith("QuantizedShift2d(9")
    torch.testing.assert_close(qmodel.shift.shifts, shift.shifts.detach())
    with torch.no_grad():
        out = qmodel(x)
        # the shift layer itself: exactly quantize(float shift of the dequantized input)
        q_in = qmodel.relu(qmodel.conv(qmodel.quant(x)))
        q_out = qmodel.shift(q_in)
    assert q_out.is_quantized and q_out.dtype == q_in.dtype
    assert (q_out.q_scale(), q_out.q_zero_point()) == (q_in.q_scale(), q_in.q_zero_point())
    float_shift = shift(q_in.dequantize())
    reference = torch.quantize_per_tensor(float_shift, q_in.q_scale(), q_in.q_zero_point(), q_in.dtype)
    if emulate_dw is None:
        assert torch.equal(q_out.int_repr(), reference.int_repr())
    else:  # the average pooling rounds once: at most one step apart
        assert (q_out.int_repr().int() - reference.int_repr().int()).abs().max() <= 1
    # the whole quantized model stays close to the float one (a few quantization steps)
    scale = q_in.q_scale()
    assert out.shape == expected.shape
    assert (out - expected).abs().max() < 6 * scale
    assert (out - expected).abs().mean() < scale
    torch.testing.assert_close(torch.jit.script(qmodel)(x), out)  # the quantized model deploys with TorchScript


@pytest.mark.parametrize("dims, dtype, zero_point", [(1, torch.quint8, 120), (3, torch.quint8, 120),
                                                     (2, torch.qint8, -5), (3, torch.qint8, 3)])
def test_quantized_1d_2d_3d_quint8_qint8(dims, dtype, zero_point):
    shift = SHIFTS[dims](9 if dims < 3 else 27, mode="grouped", padding="zeros")
    x = torch.randn(2, shift.channels, *SPATIAL[dims])
    q_in = torch.quantize_per_tensor(x, 0.05, zero_point, dtype)
    qshift = quantized.QUANTIZED_MODULE_MAPPING[type(shift)].from_float(shift)
    out = qshift(q_in)
    reference = torch.quantize_per_tensor(shift(q_in.dequantize()), 0.05, zero_point, dtype)
    assert out.dtype == dtype and torch.equal(out.int_repr(), reference.int_repr())


def test_quantized_errors():
    with pytest.raises(ValueError, match="quantized.Shift2d: mode 'active' interpolates .* has no quantized form"):
        quantized.Shift2d.from_float(Shift2d(4, mode="active"))
    with pytest.raises(TypeError, match=r"quantized.Shift2d.from_float: expected fxeff.nn.Shift2d, got Shift1d"):
        quantized.Shift2d.from_float(Shift1d(4))
    qshift = quantized.Shift2d.from_float(Shift2d(4))
    with pytest.raises(ValueError, match=r"quantized.Shift2d: expected a quantized \(quint8/qint8\) input, got "
                                         r"torch.float32"):
        qshift(torch.randn(1, 4, 5, 5))
    active = _QuantNet(Shift2d(9, mode="active"))
    with pytest.raises(ValueError, match="mode 'active'"):
        _quantize(active, [torch.randn(1, 3, 6, 6)])


def test_quantized_mapping_merges_torch_defaults():
    mapping = quantized.static_quant_module_mappings()
    assert mapping[Shift1d] is quantized.Shift1d and mapping[Shift3d] is quantized.Shift3d
    assert mapping[nn.Conv2d] is torch.ao.nn.quantized.Conv2d
    assert quantized.QUANTIZED_MODULE_MAPPING == {Shift1d: quantized.Shift1d, Shift2d: quantized.Shift2d,
                                                  Shift3d: quantized.Shift3d}
