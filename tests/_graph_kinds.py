"""The three graph kinds a pass runs on (symbolic_trace, dynamo, export), built from one model for pass tests."""
import torch

import fxeff
from fxeff.passes import run_passes


def dynamo_graph(model, x, dynamic=None):
    """The graph dynamo hands a backend, with its example inputs (``dynamic``: torch.compile's, for symbolic sizes)."""
    captured = []

    def backend(gm, example_inputs):
        captured.append((gm, example_inputs))
        return gm

    torch._dynamo.reset()
    torch.compile(model, backend=backend, fullgraph=True, dynamic=dynamic)(x)
    return captured[0]


def rewritten(model, x, kind, config):
    """(rewritten GraphModule, report, its output on x) for a graph of ``kind`` rewritten by ``config`` (a pass
    config, or a list of them run in turn)."""
    configs = list(config) if isinstance(config, (list, tuple)) else [config]
    if kind == "symbolic":
        gm = fxeff.transform(model, (x,), configs)
        report, run = gm.fxeff_report, lambda: gm(x)
    elif kind == "dynamo":
        gm, inputs = dynamo_graph(model, x)
        report = run_passes(gm, inputs, configs)
        run = lambda: (lambda out: out[0] if len(out) == 1 else tuple(out))(gm(*inputs))  # noqa: E731
    else:
        gm = torch.export.export(model, (x,)).module()
        report = run_passes(gm, (x,), configs)
        run = lambda: gm(x)  # noqa: E731
    with torch.no_grad():
        return gm, report, run()


def randomize_batch_norms(model):
    """Gives every BatchNorm2d of ``model`` running statistics and an affine part away from the identity, so that
    folding or fusing them is visible in the output. Returns the model."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model


def conv_bn_relu6(cin, cout, k=1, s=1, g=1):
    """conv (no bias, "same" padding) -> BatchNorm -> ReLU6: the MobileNet block's unit, for the shift pass tests."""
    return torch.nn.Sequential(torch.nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False),
                               torch.nn.BatchNorm2d(cout), torch.nn.ReLU6())
