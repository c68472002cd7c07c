"""fxeff.accuracy_report on a tiny setting: one reference model, a few hundred images, one short fine-tuning."""
import os

import pytest

from fxeff import accuracy_report, reference

HAVE_FMNIST = os.path.isfile("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz") or bool(
    os.environ.get("FXEFF_FASHION_MNIST_DIR"))


@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
def test_report_generator_writes_table_targets_and_plots(tmp_path):
    settings = accuracy_report.Settings(archs=("vgg",), datasets=("cluttered-fashion-mnist",), eval_images=200,
                                        calibration_images=32, finetune_images=96, latency_runs=2,
                                        latency_batch=4, photos=False, aoi_fractions=(0.3,), hetconv_parts=(4,),
                                        progress=False)
    md = str(tmp_path / "docs" / "accuracy.md")
    text = accuracy_report.run(settings, md, str(tmp_path / "docs" / "plots"))
    assert open(md).read() == text
    table = [line for line in text.splitlines() if line.startswith("| vgg |")]
    assert len(table) == 2  # focus at 30% AoI, HetConv P=4 (the VGG-style model has no depthwise conv)
    focus, het = (line.split(" | ") for line in table)
    assert focus[2:4] == ["focus", "AoI 30%"] and het[2:4] == ["hetconv", "P=4"]
    assert het[6].endswith("%") and focus[6] == ""  # only the rewrite that changes weights is fine-tuned
    assert float(focus[8]) < 1 and float(het[8]) < 1  # both cut MACs
    assert "## Targets" in text and "hetconv P=4: drop <= 0.5 points" in text and "focus: drop <= 0.5 points" in text
    plots = sorted(os.listdir(tmp_path / "docs" / "plots"))
    assert plots == ["cluttered-fashion-mnist-latency.png", "cluttered-fashion-mnist-mac.png"]
    for name in plots:
        with open(tmp_path / "docs" / "plots" / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert f"(plots/{name})" in text


def test_targets_read_the_rows():
    rows = [{"model": "m", "dataset": "cluttered-fashion-mnist", "pass": "focus", "setting": "AoI 30%", "drop": 0.2},
            {"model": "m", "dataset": "cluttered-fashion-mnist", "pass": "focus", "setting": "AoI 40%", "drop": 5.0},
            {"model": "m", "dataset": "fashion-mnist", "pass": "focus", "setting": "AoI 10%", "drop": 9.0},
            {"model": "m", "dataset": "fashion-mnist", "pass": "hetconv", "setting": "P=4", "drop": 0.7},
            {"model": "m", "dataset": "fashion-mnist", "pass": "shift sparse", "setting": "sparse", "drop": 0.9}]
    checks = accuracy_report.targets(rows)
    assert [(c["target"].split(":")[0], c["met"]) for c in checks] == [("focus", True), ("hetconv P=4", False),
                                                                       ("shift sparse", True)]
    assert set(reference.ARCHS) == set(accuracy_report.FOCUS_SPLITS)
