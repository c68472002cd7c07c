"""fxeff.accuracy_report on a tiny setting: one reference model, a few hundred images, one short fine-tuning."""
import dataclasses
import os

import pytest

from fxeff import accuracy_report, reference

HAVE_FMNIST = os.path.isfile("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz") or bool(
    os.environ.get("FXEFF_FASHION_MNIST_DIR"))


@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
def test_report_generator_writes_table_targets_and_plots(tmp_path, monkeypatch):
    full = reference.dataset

    def small_train(name, split, limit=None, **kw):  # a target row fine-tunes on the whole training split
        return full(name, split, limit=96 if split == "train" else limit, **kw)

    monkeypatch.setattr(reference, "dataset", small_train)
    settings = accuracy_report.Settings(archs=("resnet20",), datasets=("fashion-mnist",), eval_images=200,
                                        calibration_images=32, finetune_images=64, hetconv_target_epochs=1,
                                        latency_runs=2, latency_batch=4, photos=False, focus_halos=(2,),
                                        fresh_process=False, latency_repeats=1,
                                        stem_fractions=(0.3,), hetconv_parts=(2, 4), progress=False,
                                        blocks_sparsities=(0.0, 0.5), blocks_train_images=64, blocks_epochs=1,
                                        blocks_composed_epochs=1)
    md = str(tmp_path / "docs" / "accuracy.md")
    rows_path = str(tmp_path / "out" / "rows.json")
    text = accuracy_report.run(settings, md, str(tmp_path / "docs" / "plots"), rows_path=rows_path)
    assert open(md).read() == text
    section = text.split("## Every pass")[1].split("## Targets")[0].strip().splitlines()
    names = [c.strip() for c in section[0].strip("|").split("|")]
    rows = [dict(zip(names, (c.strip() for c in line.strip("|").split("|")))) for line in section[2:]]
    models = text.split("## Reference models")[1].split("## Every pass")[0]
    assert "| resnet20 | fashion-mnist | 93.13% | 8 |" in models  # the committed checkpoint's recorded metrics
    # focus: the input split (every pixel brighter than black, halo 2) with fill mean and zeros, the stem split
    # calibrated for 30% with both fills, each in execution auto (the default) and layer; HetConv P=4 (ResNet-20
    # has no depthwise conv)
    focus = ["input > black, halo 2, fill mean", "input > black, halo 2, fill zeros", "stem calibrated 30%, fill mean",
             "stem calibrated 30%, fill zeros"]
    blocks = "most accurate at <= 0.5 of the MACs, BatchNorm folded, narrow convs"
    assert [(r["pass"], r["setting"]) for r in rows] == [
        ("focus", f"{s}, {e}") for s in focus for e in ("auto", "layer")] + [("hetconv", "P=2"), ("hetconv", "P=4"),
                                                                             ("blocks", blocks)]
    # P=4 has a target: the longer budget over the whole training split; P=2 the short one
    assert rows[-3]["fine-tune"].startswith("1 x 64 images") and rows[-2]["fine-tune"].startswith("1 x 96 images")
    # block scaling: only the descendants are trained (on intermediate data, then composed), at most half the MACs
    assert rows[-1]["fine-tune"].startswith("descendants only (1 x 64 images per block, then 1 composed")
    # at sparsity 0.5 the blocks cannot reach half the MACs: the configuration with the fewest, said so
    assert rows[-1]["fine-tune"].endswith("0.5 of the MACs is out of reach: the fewest)")
    assert 0.5 < float(rows[-1]["MAC ratio"]) < 0.6
    assert len({r["AoI (measured)"] for r in rows[:4]}) == 1  # the same AoI, two fills, two executions
    for r in rows:
        # every rewrite cuts MACs; auto may run a grid dense where focusing measures slower (never above dense)
        assert 0 < float(r["MAC ratio"]) <= 1 if r["setting"].endswith("auto") else 0 < float(r["MAC ratio"]) < 1
        assert r["original acc."].endswith("%") and r["after rewrite"].endswith("%")
        # only the rewrites whose weights change fine-tune (block scaling retrains its descendants instead)
        assert (r["after fine-tuning"] != "") == (r["pass"] == "hetconv")
        assert (r["AoI (measured)"] != "") == (r["pass"] == "focus")
        # focus rows are timed in the focus format (original and rewritten alike), the fine-tuned ones after
        # fine-tuning in the deployment format, the blocks row in NCHW
        assert r["format"] == ("nchw" if r["pass"] == "blocks" else "channels_last")
        assert r["timed"] == ("fine-tuned" if r["pass"] == "hetconv" else "")
    assert "## Targets" in text and "hetconv P=4: drop <= 0.5 points" in text and "blocks: drop <= 1.5" in text
    plots = sorted(os.listdir(tmp_path / "docs" / "plots"))
    assert plots == ["fashion-mnist-latency.png", "fashion-mnist-mac.png"]
    for name in plots:
        with open(tmp_path / "docs" / "plots" / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert f"(plots/{name})" in text
    # the rows were saved as measured; a resumed run reuses them (nothing is measured again, not even the
    # original's accuracy: no dataset is read) and writes the same
    with monkeypatch.context() as m:
        m.setattr(accuracy_report, "_transform", lambda *a: pytest.fail("resume measured a row again"))
        m.setattr(reference, "dataset", lambda *a, **k: pytest.fail("resume read a dataset"))
        again = accuracy_report.run(settings, str(tmp_path / "again.md"), str(tmp_path / "plots2"),
                                    rows_path=rows_path, resume=True)
    table = text.split("## Every pass")[1].split("![")[0]
    assert again.split("## Every pass")[1].split("![")[0] == table
    # a longer HetConv P=4 budget measures that row again, and only it
    measured = []

    def recording_transform(model, x, config):
        measured.append(type(config).__name__ + (f" P={config.part}" if hasattr(config, "part") else ""))
        return transform(model, x, config)

    transform = accuracy_report._transform
    monkeypatch.setattr(accuracy_report, "_transform", recording_transform)
    longer = dataclasses.replace(settings, hetconv_target_epochs=2)
    third = accuracy_report.run(longer, str(tmp_path / "third.md"), str(tmp_path / "plots3"), rows_path=rows_path,
                                resume=True)
    assert measured == ["HetConv P=4"]
    assert "| 2 x 96 images" in third and "| 1 x 96 images" not in third
    assert [line for line in third.split("## Every pass")[1].split("![")[0].splitlines() if "P=4" not in line] == \
        [line for line in table.splitlines() if "P=4" not in line]
    # another deployment format only times the fine-tuned rows again: no fine-tuning, each timed on its rewrite
    # (no committed fine-tuned model here), the accuracy columns as they were
    from fxeff import distill

    measured.clear()
    monkeypatch.setattr(reference, "FINETUNED_DIR", str(tmp_path / "none"))
    monkeypatch.setattr(distill, "finetune", lambda *a, **k: pytest.fail("a latency change fine-tuned again"))
    nchw = dataclasses.replace(longer, hetconv_format="nchw")
    fourth = accuracy_report.run(nchw, str(tmp_path / "fourth.md"), str(tmp_path / "plots4"), rows_path=rows_path,
                                 resume=True)
    assert measured == ["HetConv P=2", "HetConv P=4"]
    retimed = [line for line in fourth.split("## Every pass")[1].splitlines() if "| hetconv |" in line]
    assert len(retimed) == 2 and all("| nchw | as rewritten |" in line for line in retimed)
    before = [line.split("|")[:10] for line in third.split("## Every pass")[1].splitlines() if "| hetconv |" in line]
    assert [line.split("|")[:10] for line in retimed] == before
    # keep: every saved row as it is, even one measured with other settings (listed); nothing measured
    measured.clear()
    kept = accuracy_report.run(dataclasses.replace(nchw, hetconv_target_epochs=3), str(tmp_path / "fifth.md"),
                               str(tmp_path / "plots5"), rows_path=rows_path, keep=True)
    assert measured == [] and "| 2 x 96 images" in kept
    assert "Rows kept as saved" in kept and "`resnet20/fashion-mnist/hetconv/P=4`" in kept


def test_targets_read_the_rows():
    rows = [{"model": "m", "dataset": "cluttered-fashion-mnist", "pass": "focus", "setting": "a", "AoI": 0.28,
             "drop": 0.2, "MAC ratio": 0.4},
            {"model": "m", "dataset": "cluttered-fashion-mnist", "pass": "focus", "setting": "a2", "AoI": 0.28,
             "drop": 0.0, "MAC ratio": 1.0},  # auto ran every grid dense: focused nothing
            {"model": "m", "dataset": "cluttered-fashion-mnist", "pass": "focus", "setting": "b", "AoI": 0.4, "drop": 5.0,
             "MAC ratio": 0.5},
            {"model": "m", "dataset": "fashion-mnist", "pass": "focus", "setting": "c", "AoI": 0.1, "drop": 9.0,
             "MAC ratio": 0.2},
            {"model": "m", "dataset": "fashion-mnist", "pass": "hetconv", "setting": "P=4", "drop": 0.7},
            {"model": "m", "dataset": "fashion-mnist", "pass": "shift sparse", "setting": "sparse", "drop": 0.9}]
    checks = accuracy_report.targets(rows)
    assert [(c["target"].split(":")[0], c["met"]) for c in checks] == [
        ("focus", True), ("focus", "n/a (ran dense)"), ("hetconv P=4", False), ("shift sparse", True)]
    assert set(reference.ARCHS) == set(accuracy_report.FOCUS_SPLITS)


def test_row_cache_reuses_a_row_only_when_measured_the_same_way(tmp_path, monkeypatch):
    path = str(tmp_path / "out" / "rows.json")
    settings = accuracy_report.Settings(archs=("vgg",), eval_images=100, hetconv_parts=(4,))
    rows = [{"model": "vgg", "dataset": "fashion-mnist", "pass": "hetconv", "setting": "P=4", "drop": 0.25},
            {"model": "vgg", "dataset": "fashion-mnist", "pass": "hetconv", "setting": "P=2", "drop": 1.5},
            {"model": "vgg", "dataset": "fashion-mnist", "pass": "focus", "setting": "input", "drop": 0.1},
            {"model": "vgg", "dataset": "fashion-mnist", "pass": "shift sparse", "setting": "sparse", "drop": 0.5},
            {"model": "vgg", "dataset": "fashion-mnist", "pass": "blocks", "setting": "half", "drop": 0.7}]
    keys = [(r["pass"], r["setting"]) for r in rows]
    cache = accuracy_report.RowCache(path, settings)
    assert cache.get("vgg", "fashion-mnist", "hetconv", "P=4") is None  # nothing saved yet
    for row in rows:
        cache.put("vgg", "fashion-mnist", row)

    def found(s, arch="vgg", reuse=True):
        again = accuracy_report.RowCache(path, s, reuse=reuse)  # a new process
        return [k for k, row in zip(keys, rows) if again.get(arch, "fashion-mnist", *k) == row]

    # the same settings find every row; which rows run, other models, photos and progress do not count
    assert found(accuracy_report.Settings(archs=("resnet20", "vgg"), eval_images=100, hetconv_parts=(2, 4, 8),
                                          photos=False, progress=False)) == keys
    assert found(settings, "resnet20") == [] and found(settings, reuse=False) == []
    # another checkpoint (a retrained model) finds none
    with monkeypatch.context() as m:
        m.setattr(accuracy_report, "_checkpoint_digest", lambda arch, dataset: "retrained")
        assert found(settings) == []
    # a setting makes stale exactly the rows it changes
    for changed, stale in (({"eval_images": 200}, keys), ({"latency_runs": 3}, keys),
                           ({"calibration_images": 64}, keys),
                           ({"hetconv_target_epochs": 1}, [("hetconv", "P=4")]),
                           ({"shift_target_epochs": 1}, [("shift sparse", "sparse")]),
                           ({"finetune_epochs": 2}, [("hetconv", "P=2")]),
                           ({"finetune_images": 100}, [("hetconv", "P=2")]),
                           ({"hetconv_init": "sum"}, [k for k in keys if k[0] == "hetconv"]),
                           ({"hetconv_fit_images": 64}, [k for k in keys if k[0] == "hetconv"]),
                           ({"finetune_lr": 0.01}, [k for k in keys if k[0] not in ("focus", "blocks")]),
                           ({"blocks_epochs": 3}, [("blocks", "half")]),
                           ({"blocks_composed_epochs": 0}, [("blocks", "half")]),
                           ({"blocks_sparsities": (0.0, 0.5)}, [("blocks", "half")]),
                           ({"focus_format": "nchw"}, [("focus", "input")])):
        other = dataclasses.replace(settings, **changed)
        assert found(other) == [k for k in keys if k not in stale], changed


def test_row_cache_keeps_saved_rows_and_finds_stale_latencies(tmp_path):
    path = str(tmp_path / "rows.json")
    settings = accuracy_report.Settings(archs=("vgg",), eval_images=100)
    rows = [{"model": "vgg", "dataset": "fashion-mnist", "pass": "hetconv", "setting": "P=4", "drop": 0.25},
            {"model": "vgg", "dataset": "fashion-mnist", "pass": "focus", "setting": "input", "drop": 0.1}]
    cache = accuracy_report.RowCache(path, settings)
    for row in rows:
        cache.put("vgg", "fashion-mnist", row)
    assert not any(cache.latency_stale("vgg", "fashion-mnist", r) for r in rows)
    # a deployment format is the fine-tuned rows' latency only: their accuracy still matches
    other = accuracy_report.RowCache(path, dataclasses.replace(settings, hetconv_format="nchw"))
    assert other.get("vgg", "fashion-mnist", "hetconv", "P=4") == rows[0]
    assert [other.latency_stale("vgg", "fashion-mnist", r) for r in rows] == [True, False]
    same = accuracy_report.RowCache(path, dataclasses.replace(settings, fresh_process=False))
    assert [same.latency_stale("vgg", "fashion-mnist", r) for r in rows] == [True, False]
    once = accuracy_report.RowCache(path, dataclasses.replace(settings, latency_repeats=1))
    assert [once.latency_stale("vgg", "fashion-mnist", r) for r in rows] == [True, False]
    again = accuracy_report.RowCache(path, settings, retime=True)  # after a kernel change: the fine-tuned rows
    assert [again.latency_stale("vgg", "fashion-mnist", r) for r in rows] == [True, False]
    # keep: a row measured with other settings is returned and listed, and put keeps its saved settings
    changed = dataclasses.replace(settings, eval_images=200)
    assert accuracy_report.RowCache(path, changed).get("vgg", "fashion-mnist", "focus", "input") is None
    keeping = accuracy_report.RowCache(path, changed, reuse=False, keep=True)
    assert keeping.get("vgg", "fashion-mnist", "focus", "input") == rows[1]
    assert keeping.kept == ["vgg/fashion-mnist/focus/input"]
    keeping.put("vgg", "fashion-mnist", rows[1])
    assert accuracy_report.RowCache(path, settings).get("vgg", "fashion-mnist", "focus", "input") == rows[1]


def test_formats_are_checked():
    with pytest.raises(ValueError, match="focus_format must be one of"):
        accuracy_report.Settings(focus_format="nhwc")
    with pytest.raises(ValueError, match="shift_format must be one of"):
        accuracy_report.Settings(shift_format="nhwc")
    with pytest.raises(ValueError, match="latency_repeats must be >= 1"):
        accuracy_report.Settings(latency_repeats=0)


def test_run_resume_needs_a_rows_path(tmp_path):
    for flags in ({"resume": True}, {"keep": True}):
        with pytest.raises(ValueError, match="needs rows_path"):
            accuracy_report.run(accuracy_report.Settings(), str(tmp_path / "a.md"), str(tmp_path), **flags)


def test_finetune_budget_follows_the_targets():
    assert accuracy_report._target_name({"pass": "hetconv", "setting": "P=4", "dataset": "fashion-mnist"}) == \
        "hetconv P=4"
    assert accuracy_report._target_name({"pass": "hetconv", "setting": "P=2", "dataset": "fashion-mnist"}) is None
    assert accuracy_report._target_name({"pass": "shift sparse", "setting": "sparse", "dataset": "x"}) == "shift sparse"
    assert accuracy_report._target_name({"pass": "shift active", "setting": "active", "dataset": "x"}) is None


@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
def test_students_are_saved_and_load_back_exactly(tmp_path, monkeypatch):
    """save_students: the fine-tuned HetConv P=4 row's model is saved; load_finetuned rebuilds the graph from the
    recorded config and calibration images, loads the weights and gives the student's logits; a checkpoint whose
    recorded logits do not match raises."""
    import json

    import torch

    full = reference.dataset
    monkeypatch.setattr(reference, "dataset", lambda name, split, limit=None, **kw: full(
        name, split, limit=min(limit or 96, 96) if split == "train" else limit, **kw))
    monkeypatch.setattr(reference, "FINETUNED_DIR", str(tmp_path))
    saved = {}
    save = reference.save_finetuned

    def keep(student, *args, **kwargs):
        saved["student"] = student
        return save(student, *args, **kwargs)

    monkeypatch.setattr(reference, "save_finetuned", keep)
    settings = accuracy_report.Settings(archs=("resnet20",), datasets=("fashion-mnist",), eval_images=64,
                                        calibration_images=32, hetconv_fit_images=16, hetconv_target_epochs=1,
                                        latency_runs=2, latency_batch=4, photos=False, focus_halos=(),
                                        stem_fractions=(), hetconv_parts=(2, 4), progress=False, save_students=True,
                                        blocks=False, fresh_process=False, latency_repeats=1)
    rows = accuracy_report.model_rows("resnet20", "fashion-mnist", settings)
    assert [r["setting"] for r in rows] == ["P=2", "P=4"]
    path = reference.finetuned_path("resnet20", "fashion-mnist", "hetconv P=4")
    assert "checkpoint" not in rows[0] and rows[1]["checkpoint"] == os.path.relpath(path)
    assert sorted(os.listdir(tmp_path)) == ["resnet20-fashion-mnist-hetconv-p4.json",
                                            "resnet20-fashion-mnist-hetconv-p4.pt"]
    record = reference.finetuned_record("resnet20", "fashion-mnist", "hetconv P=4")
    assert record["config"]["part"] == 4 and record["calibration_images"] == 16
    assert record["fine-tuned"] == rows[1]["fine-tuned"] and record["checkpoint_bytes"] == os.path.getsize(path)
    loaded = reference.load_finetuned("resnet20", "fashion-mnist", "hetconv P=4")
    x = torch.stack([reference.dataset("fashion-mnist", "test", limit=8)[i][0] for i in range(8)])
    with torch.no_grad():
        assert torch.allclose(loaded(x), saved["student"].eval()(x), atol=1e-5)
        assert not torch.allclose(loaded(x), reference.load("resnet20", "fashion-mnist")(x), atol=1e-2)
    record["check_logits"] = (torch.tensor(record["check_logits"]) + 0.1).tolist()
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(record, f)
    with pytest.raises(RuntimeError, match="no longer builds the graph"):
        reference.load_finetuned("resnet20", "fashion-mnist", "hetconv P=4")
    with pytest.raises(FileNotFoundError, match="--students"):
        reference.load_finetuned("vgg", "fashion-mnist", "hetconv P=4")
    with pytest.raises(ValueError, match="technique must be one of"):
        reference.finetuned_path("vgg", "fashion-mnist", "hetconv P=8")


@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
def test_deployed_pair_timed_in_a_fresh_process():
    """The latency of a deployed fine-tuned row (HetConv P=4 folded, channels_last) timed in a fresh process: the
    pickled graph modules run there, and the ratio is a positive number."""
    import torch

    import fxeff
    from fxeff.passes import HetConv

    model = reference.load("resnet20", "fashion-mnist").eval()
    x = torch.stack([reference.dataset("fashion-mnist", "test", limit=4)[i][0] for i in range(4)])
    student = fxeff.transform(model, x, passes=[HetConv(part=4)]).eval()
    fmt = "channels_last"
    original = accuracy_report.deploy(model, "FoldBatchNorm", x, fmt)
    deployed = accuracy_report.deploy(student, accuracy_report.DEPLOY_FORMS["hetconv"], x, fmt)
    settings = accuracy_report.Settings(latency_runs=3, latency_repeats=2)
    assert settings.fresh_process
    ratio = accuracy_report._latency_ratio(original, deployed, x.contiguous(memory_format=torch.channels_last),
                                           settings)
    assert 0 < ratio < 100
