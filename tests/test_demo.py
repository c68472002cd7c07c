"""fxeff.demo: the home-ground rows (reference models, each technique, shipped fine-tuned checkpoints) and the
summary plot, checked against values recomputed here."""
import os

import pytest

from fxeff import bench, demo, reference, training

HAVE_FMNIST = os.path.isfile("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz") or bool(
    os.environ.get("FXEFF_FASHION_MNIST_DIR"))
PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG


@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
def test_home_ground_rows_match_values_recomputed_here(tmp_path):
    rows = demo.home_ground_rows(48, 1, str(tmp_path), overlays=2, progress=False, archs=("vgg",))
    assert [r["technique"] for r in rows] == ["focus, layer execution", "focus, auto execution",
                                              "hetconv P=4 (fine-tuned)"]
    loader = training.loader(reference.dataset(demo.HOME_DATASET, "test", limit=48), 250, False)
    model = reference.load("vgg", demo.HOME_DATASET)
    student = reference.load_finetuned("vgg", demo.HOME_DATASET, "hetconv P=4")
    assert rows[0]["acc_original"] == training.accuracy(model, loader)
    assert rows[2]["acc_rewritten"] == training.accuracy(student, loader)
    timing = reference.first_images(demo.HOME_DATASET, "test", demo.LATENCY_BATCH)
    assert rows[0]["mmacs_original"] == pytest.approx(bench.macs(lambda: model(timing)) / 16 / 1e6)
    record = reference.finetuned_record("vgg", demo.HOME_DATASET, "hetconv P=4")
    assert rows[2]["mmacs_rewritten"] / rows[2]["mmacs_original"] == pytest.approx(record["MAC ratio"], abs=0.01)
    assert rows[0]["mmacs_rewritten"] < rows[0]["mmacs_original"]  # layer focus computes the AoI only
    for r in rows:
        assert r["model"] == "vgg" and r["ms_original"] > 0 and r["ms_rewritten"] > 0
        assert r["speedup"] == pytest.approx(r["ms_original"] / r["ms_rewritten"])
    assert sorted(os.listdir(tmp_path)) == ["home_00_aoi.png", "home_01_aoi.png"]
    assert all(_is_png(tmp_path / name) for name in os.listdir(tmp_path))
    text = demo.home_ground_markdown(rows, 48, 1)
    assert "| model | technique | acc. original | acc. rewritten |" in text
    assert f"| vgg | hetconv P=4 (fine-tuned) | {100 * rows[0]['acc_original']:.2f}% |" in text


@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
@pytest.mark.parametrize("arch", sorted(demo.FINETUNED_TECHNIQUE))
def test_shipped_finetuned_checkpoints_load_and_keep_accuracy(arch):
    """Each shipped checkpoint is under 5 MB, rebuilds exactly (load_finetuned checks the recorded logits) and
    keeps the accuracy recorded when it was saved on the first 500 test images within a point."""
    technique = demo.FINETUNED_TECHNIQUE[arch]
    assert os.path.getsize(reference.finetuned_path(arch, demo.HOME_DATASET, technique)) < 5 * 2 ** 20
    record = reference.finetuned_record(arch, demo.HOME_DATASET, technique)
    assert record["fine-tuned"] >= record["original"] - 0.01  # the target row's recovery (docs/accuracy.md)
    student = reference.load_finetuned(arch, demo.HOME_DATASET, technique)
    loader = training.loader(reference.dataset(demo.HOME_DATASET, "test", limit=500), 250, False)
    original = training.accuracy(reference.load(arch, demo.HOME_DATASET), loader)
    assert training.accuracy(student, loader) >= original - 0.03


def test_summary_plot_writes_a_png(tmp_path):
    home = [{"model": "vgg", "technique": t, "acc_original": 0.9, "acc_rewritten": a, "ms_original": 8.0,
             "ms_rewritten": ms} for t, a, ms in (("focus, layer execution", 0.89, 9.0),
                                                  ("hetconv P=4 (fine-tuned)", 0.9, 7.5))]
    photos = [{"image": "chelsea", "agree": True, "speedup": 1.2}, {"image": "coffee", "agree": False, "speedup": 0.9}]
    path = demo.summary_plot(home, photos, str(tmp_path / "summary.png"), "efficientnet-lite0")
    assert _is_png(path) and os.path.getsize(path) > 10_000
    assert _is_png(demo.summary_plot([], [], str(tmp_path / "empty.png")))


def test_the_glance_row_runs_the_shipped_checkpoint_within_its_budget():
    from fxeff import glance
    from fxeff.glance.command import shipped_path

    path = shipped_path("resnet20", demo.HOME_DATASET, demo.GLANCE["resnet20"])
    assert os.path.getsize(path) < 5 * 2 ** 20
    model = reference.load("resnet20", demo.HOME_DATASET)
    timing = reference.first_images(demo.HOME_DATASET, "test", demo.LATENCY_BATCH)
    loader = training.loader(reference.dataset(demo.HOME_DATASET, "test", limit=500), 250, False)
    macs = bench.macs(lambda: model(timing[:1]))
    row = demo.glance_row("resnet20", model, 0.9, macs, loader, timing, 3)
    # 500 test images: the realised MACs near the budget, the accuracy near the model's
    assert abs(row["mmacs_rewritten"] * 1e6 / macs - demo.GLANCE_BUDGET) < 0.05
    assert row["acc_rewritten"] > 0.8 and row["speedup"] > 0
    gf = glance.load(path, model, timing)
    assert gf.policy_kind == demo.GLANCE["resnet20"] and gf.saliency == "activation"
    assert gf.meta["train_images"] == 55000 and gf.meta["epochs"] == 5
