"""The "effconv" torch.compile backend: registration, the rewrite really happening, numerics, training, errors."""
import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest
import torch
import torch._dynamo

import fxeff
import fxeff.backend
from _deploy_model import INPUT_A_CORNER, INPUT_B_CORNER, SPLIT, THRESHOLD, bright_square, focus_config, make_model
from _focus_reference import fixed_layer_times, focused_reference

TESTS = os.path.dirname(os.path.abspath(__file__))
FOCUS_DICT = {"pass": "focus", "threshold": THRESHOLD, "split": SPLIT, "execution": "layer"}


def two_images():
    """A batch of two images whose AoIs do not overlap (a different mask per image)."""
    return torch.cat([bright_square(INPUT_A_CORNER), bright_square(INPUT_B_CORNER)])


def run_python(script: str, tmp_path) -> dict:
    """Runs ``script`` in a fresh interpreter (tests/ on sys.path); returns the JSON it prints last."""
    env = dict(os.environ, PYTHONPATH=TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"subprocess failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_entry_point_names_the_backend():
    (point,) = [p for p in entry_points(group="torch_dynamo_backends") if p.name == "effconv"]
    assert point.value == "fxeff.backend:effconv"
    assert point.load() is fxeff.backend.effconv


def test_fresh_process_without_import_fxeff(tmp_path):
    """backend="effconv" with plain dict configs in a process that never imported fxeff: the entry
    point imports fxeff.backend, which loads the ops; outputs equal the eager fxeff.transform model."""
    x = two_images()
    torch.save(x, tmp_path / "x.pt")
    facts = run_python(f"""
        import json, sys, warnings
        import torch
        from _deploy_model import make_model
        assert "fxeff" not in sys.modules
        model = make_model()
        compiled = torch.compile(model, backend="effconv", fullgraph=True,
                                 options={{"passes": [{FOCUS_DICT!r}]}})
        with torch.no_grad():
            out = compiled(torch.load("x.pt"))
        torch.save(out, "out.pt")
        import fxeff.backend
        print(json.dumps({{"fxeff_loaded_by_backend": "fxeff.backend" in sys.modules,
                          "rewritten": sum(s.status == "rewritten" for s in fxeff.backend.last_report().sites)}}))
    """, tmp_path)
    assert facts == {"fxeff_loaded_by_backend": True, "rewritten": 5}
    gm = fxeff.transform(make_model(), (x,), [focus_config()])
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "out.pt"), gm(x), rtol=1e-5, atol=1e-5)


def test_import_fxeff_then_compile_registers_once(tmp_path):
    """import fxeff registers nothing; the first lookup loads the entry point; no duplicate-name error.
    (inductor=False keeps this registration test short; the inductor path is tested above and below.)"""
    facts = run_python(f"""
        import json
        import torch
        import fxeff
        from torch._dynamo.backends import registry
        from _deploy_model import bright_square, make_model
        registered_on_import = "effconv" in registry._COMPILER_FNS
        outs = []
        for _ in range(2):  # two compiles: the second must not register the name again
            torch._dynamo.reset()
            compiled = torch.compile(make_model(), backend="effconv", fullgraph=True,
                                     options={{"passes": [fxeff.Focus(**{ {k: v for k, v in FOCUS_DICT.items() if k != "pass"}!r})],
                                              "inductor": False}})
            with torch.no_grad():
                outs.append(compiled(bright_square((4, 4))))
        print(json.dumps({{"registered_on_import": registered_on_import,
                          "lookup_is_effconv": torch._dynamo.lookup_backend("effconv") is fxeff.backend.effconv,
                          "listed": "effconv" in torch._dynamo.list_backends(),
                          "same_outputs": bool(torch.equal(outs[0], outs[1]))}}))
    """, tmp_path)
    assert facts == {"registered_on_import": False, "lookup_is_effconv": True, "listed": True, "same_outputs": True}


def test_compiled_model_runs_fxeff_ops_and_matches_reference():
    """fullgraph=True (no graph break), the fxeff ops in the profiler, per-image AoIs, outputs equal to
    the eager transformed model and to the pure-PyTorch focus reference."""
    model, x = make_model(), two_images()
    gm = fxeff.transform(model, (x,), [focus_config()])
    compiled = torch.compile(model, backend="effconv", fullgraph=True, options={"passes": [focus_config()]})
    with torch.no_grad():
        out = compiled(x)
        with torch.profiler.profile() as prof:
            out_b_first = compiled(x.flip(0))  # the other image order: the masks follow the images
        expected = gm(x)
        with focused_reference(model, SPLIT, THRESHOLD) as masks:
            reference = model(x)
    names = [e.name for e in prof.events()]
    assert names.count("fxeff::aoi_mask") == 1 and names.count("fxeff::focused_conv2d") == 5
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_b_first, expected.flip(0), rtol=1e-5, atol=1e-5)
    assert not (masks[0][0] & masks[0][1]).any() and masks[0].any(dim=(1, 2)).all()
    assert not torch.allclose(out, model(x).detach(), atol=1e-3), "the AoI must change the output (partial mask)"
    report = fxeff.backend.last_report()
    assert [s.name for s in report.sites if s.status == "rewritten"] == ["conv1", "conv2", "conv3", "shortcut", "head"]
    assert report.aoi_fractions is not None and max(report.aoi_fractions) < 0.3


def test_training_through_the_backend_matches_eager_gradients():
    """loss.backward() through the compiled focused model (train mode: BN batch statistics) gives the
    gradients of the eager transformed model and of the focus reference, running fxeff's backward op."""
    model, x = make_model().train(), two_images()
    gm = fxeff.transform(model, (x,), [focus_config()])
    compiled = torch.compile(model, backend="effconv", fullgraph=True, options={"passes": [focus_config()]})

    def gradients(fn):
        model.zero_grad()
        xg = x.clone().requires_grad_()
        fn(xg).square().sum().backward()
        return {"x": xg.grad, **{n: p.grad.clone() for n, p in model.named_parameters()}}

    compiled_grads = gradients(compiled)
    with torch.profiler.profile() as prof:
        gradients(compiled)
    eager_grads = gradients(gm)
    with focused_reference(model, SPLIT, THRESHOLD):
        reference_grads = gradients(model)
    assert "fxeff::focused_conv2d_backward" in {e.name for e in prof.events()}
    for name, grad in compiled_grads.items():
        scale = max(1.0, eager_grads[name].abs().max().item())
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-5 * scale, msg=name)
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_default_split_found_from_the_compiled_module():
    """Focus without split on a torchvision ResNet: the backend finds the compiled module's class in
    dynamo's sources, so the family default split ("maxpool") applies as in fxeff.transform."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.rand(1, 3, 64, 64)
    compiled = torch.compile(model, backend="effconv", fullgraph=True,
                             options={"passes": [{"pass": "focus", "threshold": 20.0, "execution": "layer"}],
                                      "inductor": False})
    with torch.no_grad():
        out = compiled(x)
        expected = fxeff.transform(model, (x,), [fxeff.Focus(threshold=20.0, execution="layer")])(x)
    report = fxeff.backend.last_report()
    assert report.split.startswith("maxpool") and "ResNet" in report.split
    assert sum(s.status == "rewritten" for s in report.sites) == 19
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options, error, match", [
    ({"passes": []}, ValueError, "non-empty list"),
    ({"passes": FOCUS_DICT}, TypeError, "got a single dict"),
    ({"passes": [FOCUS_DICT], "fusion": True}, ValueError, r"unknown options \['fusion'\]"),
    ({"passes": [FOCUS_DICT], "inductor": "yes"}, TypeError, r"\['inductor'\] must be a bool"),
    ({"passes": [{"pass": "blur"}]}, ValueError, "unknown pass 'blur'"),
])
def test_bad_options_are_refused(options, error, match):
    with pytest.raises(error, match=match):
        fxeff.backend.parse_options(options)


def test_a_bad_mode_or_split_raises_instead_of_running_eagerly():
    x = two_images()
    for kwargs, match in [({"mode": "max-autotune"}, "mode='max-autotune' is not supported"),
                          ({"options": {"passes": [{"pass": "focus", "threshold": 0.5, "split": "nope"}]}},
                           "split 'nope' names no module")]:
        torch._dynamo.reset()
        compiled = torch.compile(make_model(), backend="effconv", **kwargs)
        with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match=match):
            compiled(x)


def test_new_image_sizes_recompile_with_the_rewrite():
    """A second image size makes dynamo recompile with a dynamic graph: the pass rewrites it as well
    (mask grids from the graph's sizes), and each size matches fxeff.transform on that size."""
    model = make_model()
    compiled = torch.compile(model, backend="effconv", options={"passes": [focus_config()]})
    for size in (32, 48, 64):
        x = torch.zeros(2, 3, size, size)
        x[0, :, 3:13, 4:14] = 1.0
        x[1, :, size - 12:size - 2, size - 12:] = 1.0
        with torch.no_grad():
            out = compiled(x)
            expected = fxeff.transform(model, (x,), [focus_config()])(x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=f"size {size}")
        assert sum(s.status == "rewritten" for s in fxeff.backend.last_report().sites) == 5


class ThresholdInTheGraph(torch.nn.Module):
    """TinyFocusNet with the AoI threshold written into its forward, as the project's card shows: an
    fxeff.nn.AoIThreshold module, or the seed's ``x.sum(1) >= t`` (the mask itself unused by the model)."""

    def __init__(self, spelling):
        super().__init__()
        self.net = make_model()
        self.spelling = spelling
        self.aoi = fxeff.nn.AoIThreshold(THRESHOLD) if spelling == "module" else None

    def forward(self, x):
        s = self.net.stem(x)
        mask = self.aoi(s) if self.spelling == "module" else s.sum(1) >= THRESHOLD
        x = torch.relu(self.net.bn1(self.net.conv1(s)))
        y = torch.relu(self.net.conv2(x))
        y = self.net.conv3(y) + self.net.shortcut(x)
        return self.net.head(torch.relu(y)), mask


@pytest.mark.parametrize("spelling", ["module", "sum_ge"])
def test_the_cards_compile_form_without_options_focuses_at_the_graphs_threshold(spelling, monkeypatch):
    """``torch.compile(model, backend="effconv")``, no options: Focus with the graph's own split and threshold in
    the default execution ("auto"), through inductor. With timings where every conv measures faster focused,
    auto focuses each grid per layer: equal to the pure-PyTorch focus reference."""
    fixed_layer_times(monkeypatch)
    model, x = ThresholdInTheGraph(spelling).eval(), two_images()
    compiled = torch.compile(model, backend="effconv")
    with torch.no_grad():
        out, mask = compiled(x)
        with focused_reference(model.net, SPLIT, THRESHOLD) as masks:
            reference = model.net(x)
    report = fxeff.backend.last_report()
    assert [s.name for s in report.rewritten] == ["net.conv1", "net.conv2", "net.conv3", "net.shortcut", "net.head"]
    # dynamo inlines the AoIThreshold module: its graph holds the aoi_mask call
    assert ("aoi_mask call" if spelling == "module" else ">= 0.5") in report.split
    assert any("per layer" in note for note in report.notes), report.notes
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mask, masks[0])


def test_without_options_a_dynamic_graph_runs_focus_per_layer_and_says_why():
    """After a new image size dynamo recompiles with symbolic sizes, where auto cannot plan its grids: the
    no-options form then runs Focus in execution "layer", equal to the reference, and the report says why."""
    model = ThresholdInTheGraph("sum_ge").eval()
    compiled = torch.compile(model, backend="effconv")
    for size in (32, 48):
        x = torch.zeros(2, 3, size, size)
        x[0, :, 3:13, 4:14] = 1.0
        x[1, :, size - 12:size - 2, size - 12:] = 1.0
        with torch.no_grad():
            out, _ = compiled(x)
            with focused_reference(model.net, SPLIT, THRESHOLD):
                reference = model.net(x)
        report = fxeff.backend.last_report()
        if size == 48:
            assert "execution 'layer' here, not the default 'auto': the graph has dynamic shapes" in report.notes[0]
            assert len(report.rewritten) == 5
            torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_without_options_a_model_without_a_pattern_compiles_unchanged_and_says_why():
    model, x = make_model(), two_images()
    compiled = torch.compile(model, backend="effconv")
    with torch.no_grad():
        out = compiled(x)
    report = fxeff.backend.last_report()
    assert report.pass_name == "effconv" and not report.sites
    assert "holds no pattern that fxeff rewrites without options" in report.notes[0]
    torch.testing.assert_close(out, model(x).detach(), rtol=1e-5, atol=1e-5)


def test_without_options_two_different_thresholds_are_left_to_the_user():
    from fxeff.backend import passes_from_graph
    from fxeff.transform import trace

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = make_model()

        def forward(self, x):
            s = self.net.stem(x)
            return self.net.head(self.net.conv1(s)), s.sum(1) >= 0.5, s.sum(1) >= 0.7

    passes, why = passes_from_graph(trace(Two()))
    assert passes == [] and "holds 2 different AoI thresholds" in why
    passes, why = passes_from_graph(trace(ThresholdInTheGraph("module")))
    assert passes == [fxeff.Focus(threshold=THRESHOLD)] and why == ""
