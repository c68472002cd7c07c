"""Every torchvision model through every pass: the model-zoo suite (issue 18), in the manner of timm's model tests.

Each classification model (``torchvision.models.list_models(module=torchvision.models)``) and each segmentation
model goes through Focus (all-active threshold at the family's default split: equal to the dense model), Shift
and HetConv (P=4): each is rewritten, or skipped for a reason stated below and matched against the error or the
report; outputs are finite and of the model's shape; the user's model is unchanged (every parameter and buffer
the same tensor, never written, and the same modules).

CI runs one model of each family at a small input (``test_zoo_family``), Focus also through torch.compile
(backend "effconv" on dynamo's graph). The whole zoo at 224x224, batch 2,
random weights, runs with ``pytest -m zoo tests/test_zoo.py`` (6 minutes on 2 cores); with
``FXEFF_ZOO_TABLE=docs/zoo.md`` it writes its result table there (docs/zoo.md holds the last one).
"""
import datetime
import os
import re

import pytest
import torch
import torchvision
from torch import nn

import fxeff
from fxeff.passes import Focus, HetConv, Shift

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

CLASSIFICATION = torchvision.models.list_models(module=torchvision.models)
SEGMENTATION = torchvision.models.list_models(module=torchvision.models.segmentation)
ALL_ACTIVE = -1e30  # every pixel's channel sum is >= this: the focused model must equal the dense one

# (pass, model name pattern) -> the reason a model is not rewritten, matched in the error or the report's notes
EXPECTED_SKIPS = {
    ("focus", r"^(swin_|vit_)"): r"has one conv \(.*\): .* focusing saves nothing",
    # no depthwise conv (ResNeXt's and RegNet's grouped convs have several channels per group)
    ("shift", r"^(alexnet|vgg|resnet|resnext|wide_resnet|densenet|googlenet|inception|squeezenet|regnet_|swin_|vit_"
              r"|fcn_|deeplabv3_resnet)"): r"no depthwise conv could be replaced by a shift",
    # no KxK conv with groups == 1 but the stem (skip_first): depthwise-separable, grouped, patchify or 1x1 designs
    # (ResNeXt and most RegNets: grouped; regnet_x_8gf and regnet_y_32gf have a few 3x3 convs with groups == 1)
    ("hetconv", r"^(vit_|swin_|convnext_|mobilenet_|efficientnet_b|mnasnet|shufflenet|lraspp_|resnext"
                r"|regnet_(?!x_8gf$|y_32gf$))"): r"no conv could be replaced by a HetConv",
}

# one model per family (the smallest), at the smallest input its architecture takes
FAMILY = {"alexnet": 64, "convnext_tiny": 64, "densenet121": 64, "efficientnet_b0": 64, "googlenet": 64,
          "inception_v3": 96, "maxvit_t": 224, "mnasnet0_5": 64, "mobilenet_v2": 64, "mobilenet_v3_small": 64,
          "regnet_x_400mf": 64, "resnet18": 64, "shufflenet_v2_x0_5": 64, "squeezenet1_1": 64, "swin_t": 64,
          "vgg11": 64, "vit_b_16": 224, "fcn_resnet50": 64, "lraspp_mobilenet_v3_large": 64,
          "deeplabv3_mobilenet_v3_large": 64}

ROWS = []  # (model, input, pass, outcome, detail) for the table


def build(name: str) -> nn.Module:
    """The model with random weights in eval mode (segmentation: no backbone weights either, no download)."""
    torch.manual_seed(0)
    kwargs = {"weights": None}
    if name in SEGMENTATION:
        kwargs["weights_backbone"] = None
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=False)  # the auxiliary heads run in training mode only
    return torchvision.models.get_model(name, **kwargs).eval()


def _fingerprint(model: nn.Module):
    """What must not change: each tensor's identity and version counter (bumped by any in-place write), and
    the module tree."""
    tensors = {k: (id(v), v._version, tuple(v.shape)) for k, v in model.state_dict(keep_vars=True).items()}
    return tensors, [(n, type(m)) for n, m in model.named_modules()]


def _outputs(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _outputs(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _outputs(v)]
    return []


def _expected_skip(pass_name: str, name: str):
    for (p, pattern), reason in EXPECTED_SKIPS.items():
        if p == pass_name and re.search(pattern, name):
            return reason
    return None


def _config(pass_name: str):
    # Focus per layer: every conv after the split rewritten (auto would rightly run an all-active mask dense)
    return {"focus": Focus(threshold=ALL_ACTIVE, execution="layer"), "shift": Shift(),
            "hetconv": HetConv(part=4)}[pass_name]


def check(name: str, model: nn.Module, x: torch.Tensor, pass_name: str):
    """Runs one pass on one model; returns (outcome, detail) or raises AssertionError on a defect."""
    with torch.no_grad():
        dense = _outputs(model(x))
    before = _fingerprint(model)
    skip = _expected_skip(pass_name, name)
    try:
        gm = fxeff.transform(model, x, [_config(pass_name)])
    except ValueError as error:
        assert skip is not None and re.search(skip, str(error)), f"{name} {pass_name}: unexpected error: {error}"
        assert _fingerprint(model) == before
        return "skipped", re.search(skip, str(error)).group(0)
    assert _fingerprint(model) == before, f"{name} {pass_name}: the user's model changed"
    report = gm.fxeff_report
    for site in report.sites:
        assert site.status == "rewritten" or site.reason, f"{name} {pass_name}: {site.name} skipped without a reason"
    with torch.no_grad():
        out = _outputs(gm(x))
    assert [t.shape for t in out] == [t.shape for t in dense], f"{name} {pass_name}: output shapes differ"
    assert all(torch.isfinite(t).all() for t in out), f"{name} {pass_name}: non-finite outputs"
    if not report.rewritten:
        assert skip is not None and any(re.search(skip, n) for n in report.notes), \
            f"{name} {pass_name}: nothing rewritten: {report.notes}"
        reasons = {}
        for site in report.sites:
            reason = site.reason.split(":")[0]
            reasons[reason] = reasons.get(reason, 0) + 1
        why = "; ".join(f"{r} ({n})" for r, n in sorted(reasons.items(), key=lambda item: -item[1]))
        return "skipped", next(re.search(skip, n).group(0) for n in report.notes if re.search(skip, n)) + \
            (f": {why}" if why else "")
    assert skip is None, f"{name} {pass_name}: expected a skip ({skip}), got a rewrite"
    if pass_name == "focus":  # all active: the focused model computes exactly what the dense one does
        for a, b in zip(out, dense):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
        detail = f"{len(report.rewritten)} convs focused, equal to dense; split {report.split}"
    else:
        detail = (f"{len(report.rewritten)} rewritten, {len(report.skipped)} skipped; MACs x"
                  f"{report.model_macs_after / report.model_macs_before:.2f}")
    return "rewritten", detail


def check_dynamo(name: str, model: nn.Module, x: torch.Tensor, pass_name: str = "focus"):
    """The torch.compile path (backend "effconv", the rewritten graph run eagerly) with the all-active Focus:
    dynamo's graph and the default split found from the compiled module; equal to the dense model."""
    with torch.no_grad():
        dense = _outputs(model(x))
    skip = _expected_skip(pass_name, name)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="effconv", fullgraph=True,
                             options={"passes": [_config(pass_name)], "inductor": False})
    try:
        with torch.no_grad():
            out = _outputs(compiled(x))
    except Exception as error:  # dynamo wraps the pass's ValueError in BackendCompilerFailed
        assert skip is not None and re.search(skip, str(error)), f"{name} {pass_name} (dynamo): unexpected: {error}"
        return "skipped", re.search(skip, str(error)).group(0)
    finally:
        torch._dynamo.reset()
    report = fxeff.backend.last_report()
    assert skip is None and report.rewritten, f"{name} {pass_name} (dynamo): expected {skip}, got {report.notes}"
    for a, b in zip(out, dense):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    return "rewritten", f"{len(report.rewritten)} convs focused, equal to dense; split {report.split}"


def _run(name: str, size: int, batch: int, dynamo: bool = False):
    model = build(name)
    x = torch.rand(batch, 3, size, size)
    failures = []
    for pass_name in ("focus", "shift", "hetconv") + (("focus (dynamo)",) if dynamo else ()):
        try:
            if pass_name == "focus (dynamo)":
                outcome, detail = check_dynamo(name, model, x)
            else:
                outcome, detail = check(name, model, x, pass_name)
        except AssertionError as error:
            outcome, detail = "FAILED", str(error).splitlines()[0]
            failures.append(f"{pass_name}: {error}")
        ROWS.append((name, f"{batch}x3x{size}x{size}", pass_name, outcome, detail))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_zoo_family(name):
    """One model per family at a small input, batch 2 (the CI subset), Focus also through torch.compile."""
    _run(name, FAMILY[name], 2, dynamo=True)


@pytest.mark.zoo
@pytest.mark.parametrize("name", CLASSIFICATION + SEGMENTATION)
def test_zoo(name):
    """Every model at 224x224, batch 2 (``-m zoo``)."""
    _run(name, 224, 2)


@pytest.fixture(scope="module", autouse=True)
def _table():
    yield
    path = os.environ.get("FXEFF_ZOO_TABLE")
    if not path or not ROWS:
        return
    lines = [f"# The model zoo through every pass\n",
             f"`FXEFF_ZOO_TABLE={path} pytest -m zoo tests/test_zoo.py` on {datetime.date.today()}, torch "
             f"{torch.__version__}, torchvision {torchvision.__version__}, {torch.get_num_threads()} threads; random "
             f"weights. Focus uses an all-active threshold at the family's default split (the focused model must "
             f"equal the dense one); Shift is `Shift()` (lstsq), HetConv is `HetConv(part=4)`.\n",
             "| model | input | pass | outcome | detail |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in ROWS]
    counts = {}
    for _, _, pass_name, outcome, _ in ROWS:
        counts[(pass_name, outcome)] = counts.get((pass_name, outcome), 0) + 1
    summary = ", ".join(f"{p} {o}: {n}" for (p, o), n in sorted(counts.items()))
    lines.insert(2, f"Summary: {len({r[0] for r in ROWS})} models; {summary}.\n")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
