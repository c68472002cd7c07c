"""Deployment of a focused model: jit.trace, torch.export and an AOTInductor package, each saved and
loaded in a fresh process, with the AoI computed from each new input (never frozen at trace time); for both Focus
executions (per-layer focused convs, and regions on tiles)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fxeff
import fxeff.export
from _deploy_model import (CONFIGS, INPUT_A_CORNER, INPUT_B_CORNER, SPLIT, THRESHOLD, bright_square,
                           make_model)
from _focus_reference import aoi_mask_reference, mask_resize_reference

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
TESTS = os.path.dirname(os.path.abspath(__file__))
KINDS = ("traced", "exported", "aoti")
OPS = {"layer": {"fxeff::aoi_mask": 1, "fxeff::mask_resize": 1, "fxeff::focused_conv2d": 5},
       "region": {"fxeff::aoi_mask": 1, "fxeff::mask_resize": 1, "fxeff::tile_conv2d": 5}}


def inputs():
    """Name -> input: two single images with disjoint AoIs, and a batch holding both (per-image masks)."""
    a, b = bright_square(INPUT_A_CORNER), bright_square(INPUT_B_CORNER)
    return {"a": a, "b": b, "ab": torch.cat([a, b]), "ba": torch.cat([b, a])}


def output_aoi(model, x):
    """The AoI at the model's output grid, from the pure-PyTorch reference (bool [N, 16, 16])."""
    with torch.no_grad():
        mask = aoi_mask_reference(model.get_submodule(SPLIT)(x), THRESHOLD)
    return mask_resize_reference(mask, (16, 16))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def deployed(tmp_path_factory, request):
    """Builds the three artifacts from a model transformed on image "a" alone (batch 2 for export, so
    that its batch dimension can stay dynamic), then loads and runs them all in ONE fresh process
    that only imports fxeff; returns (model, transformed GraphModule, outputs per artifact kind and input,
    fxeff ops per artifact, the execution)."""
    root = tmp_path_factory.mktemp("deploy")
    model = make_model()
    x = inputs()
    gm = fxeff.transform(model, (x["a"],), [CONFIGS[request.param]()])
    fxeff.export.trace(gm, (x["a"],), root / "model.traced.pt")
    pair = (torch.cat([x["a"], x["a"]]),)
    program = fxeff.export.export(gm, pair, root / "model.exported.pt2",
                                  dynamic_shapes=fxeff.export.batch_dynamic_shapes(pair))
    fxeff.export.aoti_package(program, pair, os.fspath(root / "model.aoti.pt2"))
    torch.save(x, root / "inputs.pt")
    script = textwrap.dedent("""
        import json, sys
        import torch
        import fxeff, fxeff.export
        x = torch.load("inputs.pt")
        runners = {"traced": fxeff.export.load_traced("model.traced.pt"),
                   "exported": fxeff.export.load_exported("model.exported.pt2").module(),
                   "aoti": fxeff.export.load_aoti("model.aoti.pt2")}
        with torch.no_grad():
            outs = {kind: {name: run(v) for name, v in x.items()} for kind, run in runners.items()}
        torch.save(outs, "outputs.pt")
        ops = {"traced": fxeff.export.fxeff_ops_in(runners["traced"]),
               "exported": fxeff.export.fxeff_ops_in(fxeff.export.load_exported("model.exported.pt2"))}
        print(json.dumps(ops))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"loading the artifacts in a fresh process failed:\n{done.stdout}\n{done.stderr}"
    ops = json.loads(done.stdout.strip().splitlines()[-1])
    return model, gm, torch.load(root / "outputs.pt"), ops, request.param


@pytest.mark.parametrize("kind", KINDS)
def test_loaded_artifact_matches_transformed_model(deployed, kind):
    model, gm, outputs, _, _ = deployed
    with torch.no_grad():
        for name, x in inputs().items():
            torch.testing.assert_close(outputs[kind][name], gm(x), rtol=1e-5, atol=1e-5, msg=f"{kind} on {name}")


@pytest.mark.parametrize("kind", KINDS)
def test_aoi_follows_each_input_after_loading(deployed, kind):
    """Artifacts made from image "a" alone run image "b", whose AoI is disjoint from a's: the output
    is non-zero exactly on b's AoI (the last conv is focused), per image within a batch too."""
    model, _, outputs, _, _ = deployed
    x = inputs()
    aoi = {name: output_aoi(model, v) for name, v in x.items()}
    assert aoi["a"].any() and aoi["b"].any() and not (aoi["a"] & aoi["b"]).any()
    for name in x:
        active = (outputs[kind][name] != 0).any(dim=1)
        assert torch.equal(active, aoi[name]), f"{kind} on {name}: output support != the input's AoI"


def test_artifacts_keep_the_fxeff_ops(deployed):
    _, _, _, ops, execution = deployed
    assert ops == {"traced": OPS[execution], "exported": OPS[execution]}


def test_helpers_refuse_a_model_without_fxeff_ops(tmp_path):
    model, x = make_model(), bright_square(INPUT_A_CORNER)
    with pytest.raises(ValueError, match=r"fxeff.export.trace: the result calls no fxeff op"):
        fxeff.export.trace(model, x)
    with pytest.raises(ValueError, match=r"fxeff.export.export: the result calls no fxeff op"):
        fxeff.export.export(model, x)
    assert fxeff.export.fxeff_ops_in(fxeff.export.export(model, x, require_fxeff_ops=False)) == {}
    with pytest.raises(ValueError, match=r"path must end with .pt2, got 'model.so'"):
        fxeff.export.aoti_package(model, x, "model.so")
    with pytest.raises(TypeError, match="example_inputs must be a tensor or a tuple/list"):
        fxeff.export.export(model, {"x": x})
