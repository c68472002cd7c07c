"""fxeff.reference (the reference models and their committed checkpoints) and fxeff.training."""
import json
import math
import os

import pytest
import torch

from fxeff import cli, reference, training

HAVE_FMNIST = os.path.isfile("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz") or bool(
    os.environ.get("FXEFF_FASHION_MNIST_DIR"))
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist "
                                                          "(make test installs it)")
MAX_CHECKPOINT_BYTES = 5 * 1024 * 1024
# Measured accuracies are in each checkpoint's JSON; these floors catch a broken or untrained checkpoint.
MIN_ACCURACY = {"fashion-mnist": 0.88, "cluttered-fashion-mnist": 0.75}


@pytest.mark.parametrize("dataset", reference.DATASETS)
@pytest.mark.parametrize("arch", reference.ARCHS)
def test_architectures_shapes_size_and_tracing(arch, dataset):
    torch.manual_seed(0)
    model = reference.build(arch, dataset).eval()
    size = reference.DATASET_SPECS[dataset].size
    x = torch.randn(3, 1, size, size)
    with torch.no_grad():
        y = model(x)
        traced = torch.fx.symbolic_trace(model)
        assert torch.allclose(traced(x), y)
    assert y.shape == (3, 10)
    assert sum(t.numel() * t.element_size() for t in model.state_dict().values()) < MAX_CHECKPOINT_BYTES


def test_bad_names():
    with pytest.raises(ValueError, match=r"arch must be one of \('vgg', 'resnet20', 'mobilenetv2'\), got 'vgg16'"):
        reference.build("vgg16", "fashion-mnist")
    with pytest.raises(ValueError, match="dataset must be one of"):
        reference.build("vgg", "mnist")
    with pytest.raises(FileNotFoundError, match="train it with `fxeff train vgg fashion-mnist`"):
        reference.load("vgg", "fashion-mnist", checkpoint="/nonexistent.pt")


@needs_fmnist
@pytest.mark.parametrize("dataset", reference.DATASETS)
@pytest.mark.parametrize("arch", reference.ARCHS)
def test_committed_checkpoints_are_small_load_safely_and_are_trained(arch, dataset):
    path = reference.checkpoint_path(arch, dataset)
    assert os.path.isfile(path), f"the checkpoint of {arch} on {dataset} is not committed"
    assert os.path.getsize(path) <= MAX_CHECKPOINT_BYTES
    with open(os.path.splitext(path)[0] + ".json") as f:
        metrics = json.load(f)
    assert metrics["arch"] == arch and metrics["dataset"] == dataset and metrics["test_images"] == 10000
    model = reference.load(arch, dataset)  # torch.load(weights_only=True) inside
    test = reference.dataset(dataset, "test", limit=1000)
    acc = training.accuracy(model, training.loader(test, 500, False))
    assert acc >= MIN_ACCURACY[dataset]
    assert abs(acc - metrics["test_accuracy"]) < 0.04  # the first 1000 images agree with the recorded whole-split figure
    if (arch, dataset) == ("resnet20", "fashion-mnist"):
        assert metrics["test_accuracy"] >= 0.91  # the target for the ResNet-style model


@needs_fmnist
def test_train_reference_tiny_run_is_seeded_and_writes_checkpoint_and_metrics(tmp_path):
    runs = []
    for name in ("a", "b"):
        out = str(tmp_path / f"{name}.pt")
        metrics = training.train_reference("vgg", "fashion-mnist", epochs=1, out=out, limit=256, progress=False)
        runs.append(torch.load(out, weights_only=True))
        with open(str(tmp_path / f"{name}.json")) as f:
            assert json.load(f)["test_accuracy"] == metrics["test_accuracy"]
        assert metrics["train_images"] == 256 and metrics["epochs"] == 1
        assert all(math.isfinite(v) for v in metrics["loss_per_epoch"])
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])  # the same seed, the same weights
    fresh = reference.build("vgg", "fashion-mnist").state_dict()
    assert not torch.equal(fresh["features.0.weight"], runs[0]["features.0.weight"])


@needs_fmnist
def test_cli_train(tmp_path, capsys):
    out = str(tmp_path / "r.pt")
    assert cli.main(["train", "resnet20", "cluttered-fashion-mnist", "--epochs", "1", "--limit", "64",
                     "--out", out]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["arch"] == "resnet20" and os.path.isfile(out)
    reference.load("resnet20", "cluttered-fashion-mnist", checkpoint=out)


def test_fit_lowers_the_loss_and_rejects_bad_arguments():
    torch.manual_seed(0)
    x = torch.randn(64, 1, 8, 8)
    y = (x.mean((1, 2, 3)) > 0).long()
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 2))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    history = training.fit(model, loader, training.cross_entropy_loss, epochs=6, lr=0.1, progress=False)
    assert history["loss"][-1] < history["loss"][0]
    with pytest.raises(ValueError, match="epochs must be a positive int, got 0"):
        training.fit(model, loader, training.cross_entropy_loss, epochs=0)
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:0], y[:0]), batch_size=16)
    with pytest.raises(ValueError, match="the loader yields no batch"):
        training.fit(model, empty, training.cross_entropy_loss, epochs=1)


def test_fit_schedule_works_for_any_number_of_steps():
    model = torch.nn.Linear(2, 2)
    for n in (1, 2, 3, 4, 5):
        data = torch.utils.data.TensorDataset(torch.randn(n, 2), torch.zeros(n, dtype=torch.long))
        history = training.fit(model, torch.utils.data.DataLoader(data, batch_size=1), training.cross_entropy_loss,
                               1, channels_last=False, progress=False)
        assert len(history["loss"]) == 1 and math.isfinite(history["loss"][0])
