"""fxeff.finetune: distillation from the original model into its HetConv rewrite (loss goes down, only the
student trains), feature terms, checkpoints, DistributedDataParallel over 2 gloo processes, argument errors."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxeff
from fxeff.distill import kd_loss
from fxeff.training import cross_entropy_loss, fit, loader as make_loader

import _gloo

HETCONV = fxeff.HetConv(part=2, min_channels=8, skip_first=False)


class Net(nn.Module):
    """A tiny CNN on 1x16x16 images: conv1 (1 channel in: HetConv skips it), conv2 and conv3 (rewritten)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def _images(n: int, seed: int):
    """Noisy copies of 10 fixed templates (the class): a task a tiny CNN learns in a couple of epochs."""
    templates = torch.randn(10, 1, 16, 16, generator=torch.Generator().manual_seed(123))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=generator)
    return 2 * templates[labels] + torch.randn(n, 1, 16, 16, generator=generator), labels


_TRAINED = {}


def _teacher() -> Net:
    """The teacher: Net trained briefly (once per process, then copied) so its predictions depend on the image."""
    if "state" not in _TRAINED:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            net = Net()
            fit(net, make_loader(torch.utils.data.TensorDataset(*_images(512, seed=99)), 32, True),
                cross_entropy_loss, 2, lr=0.05, channels_last=False, progress=False)
        _TRAINED["state"] = net.state_dict()
    teacher = Net()
    teacher.load_state_dict(_TRAINED["state"])
    return teacher.eval()


def _student(teacher: nn.Module) -> torch.fx.GraphModule:
    student = fxeff.transform(copy.deepcopy(teacher), (torch.randn(4, 1, 16, 16),), passes=[HETCONV])
    kinds = [type(m).__name__ for m in student.modules()]
    assert kinds.count("HetConv2d") == 2, kinds  # conv2 and conv3 rewritten, conv1 kept
    return student


def _data(teacher: nn.Module, n: int, seed: int, labels: bool = True) -> torch.utils.data.TensorDataset:
    images, truth = _images(n, seed)
    return torch.utils.data.TensorDataset(images, truth) if labels else torch.utils.data.TensorDataset(images)


def _held_out_kd(student: nn.Module, teacher: nn.Module, images: torch.Tensor, t: float = 4.0) -> float:
    student.eval()
    with torch.no_grad():
        s, q = student(images), teacher(images)
    # the distillation loss written out, independent of fxeff.distill
    p_teacher = F.softmax(q / t, 1)
    return float((p_teacher * (p_teacher.log() - F.log_softmax(s / t, 1))).sum(1).mean() * t * t)


def _snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_kd_loss_is_the_scaled_kl():
    s, q = torch.randn(5, 7), torch.randn(5, 7)
    p = F.softmax(q / 3, 1)
    expected = (p * (p.log() - F.log_softmax(s / 3, 1))).sum(1).mean() * 9
    torch.testing.assert_close(kd_loss(s, q, 3.0), expected)
    assert float(kd_loss(q, q, 3.0)) == pytest.approx(0.0, abs=1e-6)


def test_finetune_distills_into_the_hetconv_student_and_leaves_the_teacher_alone():
    teacher = _teacher()
    student = _student(teacher)
    held_out = _data(teacher, 64, seed=1).tensors[0]
    before_kd = _held_out_kd(student, teacher, held_out)
    data = make_loader(_data(teacher, 256, seed=0), 32, True)
    teacher.train()  # finetune puts it in eval mode for the call and gives it back in train mode
    teacher_before, student_before = _snapshot(teacher), _snapshot(student)

    history = fxeff.finetune(student, teacher, data, epochs=3, lr=0.05, progress=False)

    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key  # neither trained nor its BN statistics updated
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, student_before[k])]
    assert any("hetconv" in k for k in changed) and any(k.startswith("fc.") for k in changed), changed
    after_kd = _held_out_kd(student, teacher.eval(), held_out)
    assert after_kd < 0.7 * before_kd, (before_kd, after_kd)
    assert set(history) == {"loss", "seconds", "kd", "ce", "feature"}
    assert all(len(v) == 3 for v in history.values())
    assert history["kd"][-1] < history["kd"][0] and history["feature"] == [0.0] * 3
    for loss, kd, ce in zip(history["loss"], history["kd"], history["ce"]):  # alpha = 0.9: 0.9 kd + 0.1 ce
        assert loss == pytest.approx(0.9 * kd + 0.1 * ce, rel=1e-4)


def test_finetune_without_labels_is_pure_distillation():
    teacher = _teacher()
    student = _student(teacher)
    history = fxeff.finetune(student, teacher, make_loader(_data(teacher, 64, 0, labels=False), 16, True), 1,
                             alpha=0.5, channels_last=False, progress=False)
    assert history["ce"] == [0.0]
    assert history["loss"][0] == pytest.approx(0.5 * history["kd"][0], rel=1e-4)


def test_features_add_the_mse_of_named_modules():
    teacher = _teacher()
    data = make_loader(_data(teacher, 128, seed=0), 16, True)
    # a student equal to the teacher: the conv1 outputs (read straight from the image) match while the
    # student barely moves (lr tiny), so the MSE is ~0; deeper layers differ through train-mode BatchNorm
    same = copy.deepcopy(teacher)
    history = fxeff.finetune(same, teacher, data, 1, lr=1e-9, features=["conv1"], progress=False)
    assert history["feature"][0] < 1e-10
    # the HetConv student: bn2 reads the rewritten conv2, so its output differs and the term counts
    student = _student(teacher)
    history = fxeff.finetune(student, teacher, data, 4, lr=0.05, features={"bn3": "bn3", "conv1": "conv1"},
                             feature_weight=2.0, progress=False)
    assert history["feature"][0] > 1e-3
    assert history["feature"][-1] < history["feature"][0]
    for loss, kd, ce, feature in zip(history["loss"], history["kd"], history["ce"], history["feature"]):
        assert loss == pytest.approx(0.9 * kd + 0.1 * ce + 2.0 * feature, rel=1e-4)
    assert not any(m._forward_hooks for m in list(student.modules()) + list(teacher.modules()))


def test_features_errors_name_the_module_and_restore_the_teacher():
    teacher = _teacher()
    student = _student(teacher)
    data = make_loader(_data(teacher, 32, seed=0), 16, False)
    with pytest.raises(ValueError, match=r"student module 'conv2'.*leaf modules that the graph calls"):
        fxeff.finetune(student, teacher, data, 1, features=["conv2"], progress=False)  # rewritten: gone
    with pytest.raises(ValueError, match=r"teacher module 'nope'"):
        fxeff.finetune(student, teacher, data, 1, features={"bn1": "nope"}, progress=False)
    with pytest.raises(ValueError, match=r"same shape, got \(16, 8, 16, 16\) and \(16, 16, 8, 8\)"):
        fxeff.finetune(student, teacher, data, 1, features={"bn1": "bn3"}, channels_last=False, progress=False)
    assert all(p.requires_grad for p in teacher.parameters())
    assert not any(m._forward_hooks for m in list(student.modules()) + list(teacher.modules()))


def test_checkpoint_loads_into_the_bare_student(tmp_path):
    teacher = _teacher()
    student = _student(teacher)
    path = tmp_path / "ckpt" / "student.pt"
    fxeff.finetune(student, teacher, make_loader(_data(teacher, 64, seed=0), 32, True), 1, checkpoint=str(path),
                   progress=False)
    state = torch.load(path, weights_only=True)
    fresh = _student(_teacher())
    fresh.load_state_dict(state)
    for key, value in student.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 0}, r"epochs expected an int >= 1, got 0"),
    ({"epochs": 1.5}, r"epochs expected an int >= 1, got 1.5"),
    ({"alpha": 1.5}, r"alpha expected a number in \[0, 1\], got 1.5"),
    ({"alpha": -0.1}, r"alpha expected a number in \[0, 1\], got -0.1"),
    ({"temperature": 0.0}, r"temperature expected a number > 0, got 0.0"),
    ({"lr": -1.0}, r"lr expected a number > 0, got -1.0"),
    ({"feature_weight": -1.0}, r"feature_weight expected a number >= 0, got -1.0"),
    ({"features": "bn1"}, r"features expected a dict .* got the string 'bn1'"),
])
def test_bad_arguments(kwargs, message):
    teacher = _teacher()
    student = _student(teacher)
    args = {"epochs": 1, **kwargs}
    with pytest.raises(ValueError, match="fxeff.finetune: " + message):
        fxeff.finetune(student, teacher, make_loader(_data(teacher, 8, 0), 8, False), progress=False, **args)


def test_student_sharing_the_teachers_weights_is_refused():
    teacher = _teacher()
    shared = fxeff.transform(teacher, (torch.randn(2, 1, 16, 16),), passes=[HETCONV])  # shares bn*/fc with teacher
    data = make_loader(_data(teacher, 8, 0), 8, False)
    with pytest.raises(ValueError, match=r"separate weights.*copy.deepcopy"):
        fxeff.finetune(shared, teacher, data, 1, progress=False)
    with pytest.raises(ValueError, match="two different modules"):
        fxeff.finetune(teacher, teacher, data, 1, progress=False)


def _ddp_worker(rank: int, world: int, folder: str) -> None:
    torch.manual_seed(0)  # the same teacher, student and data on every rank
    teacher = _teacher()
    dataset = _data(teacher, 128, seed=0)
    sampler = torch.utils.data.distributed.DistributedSampler(dataset, world, rank, shuffle=True, seed=0)
    data = torch.utils.data.DataLoader(dataset, batch_size=8, sampler=sampler)
    student = _student(teacher)  # fxeff.transform deleted the replaced conv2/conv3: DDP takes it as it is
    # a parameter the graph never reads would make DDP fail mid-step: finetune says so up front
    dead = copy.deepcopy(student)
    dead.add_module("unused", nn.Linear(2, 2))
    try:
        fxeff.finetune(nn.parallel.DistributedDataParallel(dead), teacher, data, 1, progress=False)
        raise AssertionError("a DDP student with uncalled parameters was accepted")
    except ValueError as error:
        assert "delete_all_unused_submodules" in str(error) and "unused.weight" in str(error), error
    student = nn.parallel.DistributedDataParallel(student)
    history = fxeff.finetune(student, teacher, data, 1, lr=0.05, checkpoint=f"{folder}/ckpt.pt", progress=False)
    assert len(history["loss"]) == 1 and len(data) == 8
    torch.save({k: v.detach().cpu() for k, v in student.module.named_parameters()}, f"{folder}/rank{rank}.pt")


def test_ddp_two_processes_end_with_the_same_student(tmp_path):
    _gloo.spawn(_ddp_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    torch.manual_seed(0)
    start = _student(_teacher()).state_dict()
    assert "conv2.weight" not in checkpoint and "conv2.weight" not in start  # transform deleted the replaced convs
    moved = 0
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), name  # DDP averaged the gradients: identical steps
        assert torch.equal(checkpoint[name], value), name  # rank 0 saved the bare student's trained weights
        moved += not torch.equal(start[name], value)
    assert moved > 0
