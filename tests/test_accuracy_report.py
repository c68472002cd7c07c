"""fxeff.accuracy_report on a tiny setting: one reference model, a few hundred images, one short fine-tuning."""
import os

import pytest

from fxeff import accuracy_report, reference

HAVE_FMNIST = os.path.isfile("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz") or bool(
    os.environ.get("FXEFF_FASHION_MNIST_DIR"))


@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
def test_report_generator_writes_table_targets_and_plots(tmp_path):
    settings = accuracy_report.Settings(archs=("resnet20",), datasets=("fashion-mnist",), eval_images=200,
                                        calibration_images=32, finetune_images=96, latency_runs=2,
                                        latency_batch=4, photos=False, focus_halos=(2,), stem_fractions=(0.3,),
                                        hetconv_parts=(4,),
                                        progress=False)
    md = str(tmp_path / "docs" / "accuracy.md")
    text = accuracy_report.run(settings, md, str(tmp_path / "docs" / "plots"))
    assert open(md).read() == text
    section = text.split("## Every pass")[1].split("## Targets")[0].strip().splitlines()
    names = [c.strip() for c in section[0].strip("|").split("|")]
    rows = [dict(zip(names, (c.strip() for c in line.strip("|").split("|")))) for line in section[2:]]
    models = text.split("## Reference models")[1].split("## Every pass")[0]
    assert "| resnet20 | fashion-mnist | 93.13% | 8 |" in models  # the committed checkpoint's recorded metrics
    # focus: the input split (every pixel brighter than black, halo 2) with fill mean and zeros, the stem split
    # calibrated for 30% with both fills; HetConv P=4 (ResNet-20 has no depthwise conv)
    assert [(r["pass"], r["setting"]) for r in rows] == [
        ("focus", "input > black, halo 2, fill mean"), ("focus", "input > black, halo 2, fill zeros"),
        ("focus", "stem calibrated 30%, fill mean"), ("focus", "stem calibrated 30%, fill zeros"), ("hetconv", "P=4")]
    assert rows[0]["AoI (measured)"] == rows[1]["AoI (measured)"]  # the same AoI, two fills
    for r in rows:
        assert 0 < float(r["MAC ratio"]) < 1  # every rewrite cuts MACs
        assert r["original acc."].endswith("%") and r["after rewrite"].endswith("%")
        assert (r["after fine-tuning"] != "") == (r["pass"] == "hetconv")  # only weight-changing rewrites fine-tune
        assert (r["AoI (measured)"] != "") == (r["pass"] == "focus")
    assert "## Targets" in text and "hetconv P=4: drop <= 0.5 points" in text
    plots = sorted(os.listdir(tmp_path / "docs" / "plots"))
    assert plots == ["fashion-mnist-latency.png", "fashion-mnist-mac.png"]
    for name in plots:
        with open(tmp_path / "docs" / "plots" / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert f"(plots/{name})" in text


def test_targets_read_the_rows():
    rows = [{"model": "m", "dataset": "cluttered-fashion-mnist", "pass": "focus", "setting": "a", "AoI": 0.28,
             "drop": 0.2},
            {"model": "m", "dataset": "cluttered-fashion-mnist", "pass": "focus", "setting": "b", "AoI": 0.4, "drop": 5.0},
            {"model": "m", "dataset": "fashion-mnist", "pass": "focus", "setting": "c", "AoI": 0.1, "drop": 9.0},
            {"model": "m", "dataset": "fashion-mnist", "pass": "hetconv", "setting": "P=4", "drop": 0.7},
            {"model": "m", "dataset": "fashion-mnist", "pass": "shift sparse", "setting": "sparse", "drop": 0.9}]
    checks = accuracy_report.targets(rows)
    assert [(c["target"].split(":")[0], c["met"]) for c in checks] == [("focus", True), ("hetconv P=4", False),
                                                                       ("shift sparse", True)]
    assert set(reference.ARCHS) == set(accuracy_report.FOCUS_SPLITS)
