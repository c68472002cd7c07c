"""The fxeff command: demo end to end (checked against predictions recomputed here), report, bench, errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

import fxeff
from fxeff import cli, data, focus, models


@pytest.fixture(scope="module")
def resnet18_checkpoint(tmp_path_factory):
    """Fixed resnet18 weights, so that this test and the demo run the same model."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("ckpt") / "resnet18.pt"
    torch.save(models.load_model("torchvision:resnet18").state_dict(), path)
    return str(path)


def test_demo_on_a_small_setting_matches_predictions_recomputed_here(tmp_path, resnet18_checkpoint):
    out = tmp_path / "demo"
    summary = cli.demo(cli.build_parser().parse_args(
        ["demo", "--model", "torchvision:resnet18", "--checkpoint", resnet18_checkpoint, "--size", "64",
         "--photos", "chelsea,rocket,coffee", "--aoi", "0.25", "--runs", "1", "--out", str(out), "--no-home", "--execution", "layer"]))
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(summary["rows"]))
    assert [r["image"] for r in on_disk["rows"]] == ["chelsea", "rocket", "coffee"]
    assert on_disk["split"] == "maxpool" and on_disk["real_weights"] is True

    # recompute everything from the same checkpoint and threshold, in channels_last as the CLI runs
    cl = torch.channels_last
    model = models.load_model("torchvision:resnet18", resnet18_checkpoint).to(memory_format=cl)
    batch, _ = data.to_batch([im for _, im in data.photos(["chelsea", "rocket", "coffee"])],
                             models.preprocessing("torchvision:resnet18").at_size(64))
    batch = batch.contiguous(memory_format=cl)
    threshold = on_disk["threshold"]
    assert threshold == focus.calibrate(model, batch, 0.25)
    focused = fxeff.transform(model, batch, [fxeff.Focus(threshold, execution="layer")])
    categories = models.imagenet_categories()
    with torch.no_grad():
        dense_top1, focused_top1 = model(batch).argmax(-1), focused(batch).argmax(-1)
    masks = focus.aoi_masks(model, batch, threshold)[0]
    for i, row in enumerate(on_disk["rows"]):
        assert row["top1_dense"] == categories[dense_top1[i]]
        assert row["top1_focused"] == categories[focused_top1[i]]
        assert row["agree"] == bool(dense_top1[i] == focused_top1[i])
        assert row["aoi_fraction"] == pytest.approx(float(masks[i].float().mean()))
        assert row["mac_ratio"] == pytest.approx(row["macs_focused_m"] / row["macs_dense_m"])
        assert row["mac_ratio"] < 1.0 and row["ms_dense"] > 0 and row["ms_focused"] > 0
        assert os.path.isfile(row["png"]) and os.path.getsize(row["png"]) > 0
    assert on_disk["agreement"] == pytest.approx(float((dense_top1 == focused_top1).float().mean()))
    assert on_disk["mean_aoi_fraction"] == pytest.approx(0.25, abs=1 / 256)
    table = (out / "summary.md").read_text()
    assert "| image | AoI | top-1 dense | top-1 focused | agree |" in table
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 1 + 3  # header + one per photo
    assert "fxeff report: pass focus" in (out / "report.txt").read_text()


@pytest.mark.skipif(not (os.path.isfile("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz") or
                         os.environ.get("FXEFF_FASHION_MNIST_DIR")),
                    reason="Fashion-MNIST missing (the home ground): apt-get install dataset-fashion-mnist")
def test_demo_default_model_is_efficientnet_lite0_with_real_weights(tmp_path):
    """The default demo: the home ground (every reference model, each technique) first, then EfficientNet-Lite0."""
    summary = cli.demo(cli.build_parser().parse_args(
        ["demo", "--photos", "chelsea", "--runs", "1", "--test-images", "32", "--out", str(tmp_path)]))
    home = summary["home_ground"]
    assert [(r["model"], r["technique"].split(",")[0].split(" (")[0]) for r in home] == [
        (arch, t) for arch, last in (("vgg", ("hetconv P=4",)), ("resnet20", ("hetconv P=4", "glance and focus")),
                                     ("mobilenetv2", ("shift sparse",))) for t in ("focus", "focus") + last]
    assert summary["test_images"] == 32
    text = (tmp_path / "summary.md").read_text()
    assert text.index("## Home ground") < text.index("## Natural images") < text.index("![summary](summary.png)")
    assert "the background is not irrelevant" in text
    # Focus in its default execution (auto): where it focused nothing, the demo says so instead of implying it did
    assert ("ran every grid of this model dense" in text) == (summary["rows"][0]["mac_ratio"] == 1.0)
    with open(tmp_path / "summary.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert len([f for f in os.listdir(tmp_path) if f.startswith("home_")]) == 4
    assert summary["model"] == "efficientnet-lite0" and summary["real_weights"] is True
    assert summary["split"] == "_blocks.0" and summary["target_aoi"] == 0.30
    chelsea, = summary["rows"]
    assert chelsea["image"] == "chelsea"
    assert chelsea["top1_dense"] in ("tabby", "tiger cat", "Egyptian cat")
    assert chelsea["macs_dense_m"] == pytest.approx(385.19, abs=0.01)  # EfficientNet-Lite0's MACs at 224


def test_report_command_prints_the_report_as_json(capsys):
    assert cli.main(["report", "--model", "torchvision:vgg11", "--size", "32", "--images", "1",
                     "--threshold=-1e30", "--json", "--execution", "layer"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["config"]["pass"] == "focus" and printed["config"]["threshold"] == -1e30
    report = printed["report"]
    assert report["aoi_fractions"] == [1.0] and report["mac_ratio"] == pytest.approx(1.0)
    assert len([s for s in report["sites"] if s["status"] == "rewritten"]) == 7  # vgg11: 8 convs, the first before the split


def test_transform_command_saves_models_whose_aoi_follows_the_input(tmp_path, capsys):
    from fxeff import export

    pt2, pt = str(tmp_path / "vgg11.pt2"), str(tmp_path / "vgg11.pt")
    assert cli.main(["transform", "--model", "torchvision:vgg11", "--size", "32", "--photos", "chelsea",
                     "--aoi", "0.3", "--out", pt2, "--trace", pt, "--execution", "layer"]) == 0
    printed = capsys.readouterr().out
    assert "fxeff report: pass focus" in printed and "AoI fraction per example image: 30." in printed
    program, traced = export.load_exported(pt2), export.load_traced(pt)
    assert export.fxeff_ops_in(program)["fxeff::focused_conv2d"] == 7
    x = torch.randn(1, 3, 32, 32)  # a new input: the saved graphs compute its own AoI
    assert torch.allclose(program.module()(x), traced(x), atol=1e-5)


def test_bad_arguments_exit_with_a_message(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--aoi", "1.5"])
    assert "must be a fraction in [0, 1], got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["demo", "--aoi", "0.3", "--threshold", "2"])
    with pytest.raises(ValueError, match=r"unknown model 'vgg16'"):
        cli.main(["report", "--model", "vgg16"])


def test_bench_dispatches_to_the_scripts_with_their_own_arguments(capsys):
    for argv, script in ((["bench", "--help"], "focus.py"), (["bench", "--models", "--models", "vgg16", "--help"],
                                                             "focus_models.py")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 0
        assert f"usage: {script}" in capsys.readouterr().out


def test_console_script_runs():
    exe = os.path.join(os.path.dirname(sys.executable), "fxeff")
    if not os.path.isfile(exe):
        pytest.skip("the fxeff console script is not installed in this environment")
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "demo" in result.stdout and "transform" in result.stdout
