"""Descendants of blocks (torch-pruning) and their retraining on intermediate data."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fxeff
from fxeff import reference
from fxeff.blocks.descendants import DEFAULT_SPARSITIES, IMPORTANCES, descendant, descendants
from fxeff.blocks.retrain import block_inputs, block_mse, retrain
from fxeff.passes.graph import conv_sites

import _gloo

torchvision = pytest.importorskip("torchvision")


def macs(module, x):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops() // 2


def outlined(model, x):
    gm = fxeff.transform(model, x, [fxeff.Blocks()])
    return gm, block_inputs(gm, x)


MODELS = {
    "resnet20": lambda: (reference.build("resnet20", "cluttered-fashion-mnist"), torch.randn(2, 1, 64, 64)),
    "mobilenetv2": lambda: (reference.build("mobilenetv2", "cluttered-fashion-mnist"), torch.randn(2, 1, 64, 64)),
    "vgg": lambda: (reference.build("vgg", "cluttered-fashion-mnist"), torch.randn(2, 1, 64, 64)),
    "efficientnet_b0": lambda: (torchvision.models.efficientnet_b0(), torch.randn(1, 3, 64, 64)),  # SE, residual
    "densenet121": lambda: (torchvision.models.densenet121(), torch.randn(1, 3, 64, 64)),  # concat
    "resnet50": lambda: (torchvision.models.resnet50(), torch.randn(1, 3, 64, 64)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_descendants_keep_the_block_shapes_and_shrink(name):
    torch.manual_seed(0)
    model, x = MODELS[name]()
    gm, inputs = outlined(model.eval(), x)
    for info in gm.fxeff_blocks[:4]:
        block, x_in = gm.get_submodule(info["name"]), inputs[info["name"]]
        with torch.no_grad():
            expected = block(x_in)
        children = descendants(block, x_in, info["prunable"])
        assert sorted(children) == list(DEFAULT_SPARSITIES)
        with torch.no_grad():
            assert torch.equal(children[0.0](x_in), expected)  # sparsity 0: the block itself
        previous_macs, previous_params = macs(block, x_in), sum(p.numel() for p in block.parameters())
        for sparsity in DEFAULT_SPARSITIES[1:]:
            child = children[sparsity]
            with torch.no_grad():
                out = child(x_in)
            assert out.shape == expected.shape and out.dtype == expected.dtype
            params = sum(p.numel() for p in child.parameters())
            if info["prunable"]:  # real smaller modules: fewer MACs and fewer parameters at each step
                assert macs(child, x_in) < previous_macs and params < previous_params, (info["name"], sparsity)
            previous_macs, previous_params = macs(child, x_in), params
        # the block itself is untouched, and every layer of every descendant runs in the model's (eval) mode
        with torch.no_grad():
            assert torch.equal(block(x_in), expected)
        assert not block.training
        assert not any(m.training for child in children.values() for m in child.modules())


def test_prunable_convs_lose_filters_and_the_others_keep_them():
    model, x = MODELS["resnet20"]()
    gm, inputs = outlined(model.eval(), x)
    info = gm.fxeff_blocks[0]
    block = gm.get_submodule(info["name"])
    child = descendant(block, inputs[info["name"]], 0.5, info["prunable"])
    convs = {site.name: site.weight_shape for site in conv_sites(child)}
    assert convs["layer1.0.conv1"][0] == 8 and convs["layer1.0.conv2"] == (16, 8, 3, 3)


def test_round_to_keeps_channel_counts_multiples():
    model, x = MODELS["mobilenetv2"]()
    gm, inputs = outlined(model.eval(), x)
    info = gm.fxeff_blocks[3]
    block = gm.get_submodule(info["name"])
    for sparsity in (0.2, 0.4, 0.6):
        child = descendant(block, inputs[info["name"]], sparsity, info["prunable"], round_to=8)
        for site in conv_sites(child):
            if site.name in info["prunable"]:
                assert site.weight_shape[0] % 8 == 0, (site.name, site.weight_shape)


@pytest.mark.parametrize("criterion", IMPORTANCES)
def test_every_importance_criterion_prunes(criterion):
    model, x = MODELS["resnet20"]()
    gm, inputs = outlined(model.eval(), x)
    info = gm.fxeff_blocks[1]
    block = gm.get_submodule(info["name"])
    child = descendant(block, inputs[info["name"]], 0.4, info["prunable"], importance_name=criterion)
    assert sum(p.numel() for p in child.parameters()) < sum(p.numel() for p in block.parameters())


def test_l1_keeps_the_filters_of_largest_l1_norm():
    model, x = MODELS["resnet20"]()
    gm, inputs = outlined(model.eval(), x)
    info = gm.fxeff_blocks[0]
    block = gm.get_submodule(info["name"])
    weight = block.get_submodule("layer1.0.conv1").weight.detach()
    child = descendant(block, inputs[info["name"]], 0.5, info["prunable"])
    kept = child.get_submodule("layer1.0.conv1").weight.detach()
    norms = weight.abs().sum(dim=(1, 2, 3))
    expected = weight[norms.argsort(descending=True)[:8].sort().values]
    assert torch.equal(kept, expected)


def test_arguments_are_checked():
    model, x = MODELS["resnet20"]()
    gm, inputs = outlined(model.eval(), x)
    info = gm.fxeff_blocks[0]
    block, x_in = gm.get_submodule(info["name"]), inputs[info["name"]]
    with pytest.raises(ValueError, match=r"a sparsity must be a float in \[0, 1\)"):
        descendant(block, x_in, 1.0, info["prunable"])
    with pytest.raises(ValueError, match="importance must be one of"):
        descendant(block, x_in, 0.5, info["prunable"], importance_name="taylor2")
    with pytest.raises(ValueError, match="are not modules of the block"):
        descendant(block, x_in, 0.5, ["layer9.conv"])
    with pytest.raises(ValueError, match="sparsities must be increasing and start at 0.0"):
        descendants(block, x_in, info["prunable"], sparsities=(0.2, 0.4))
    with pytest.raises(ValueError, match="round_to must be an int >= 1"):
        descendant(block, x_in, 0.5, info["prunable"], round_to=0)


def _loader(n=64, batch=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, 64, 64, generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=batch)


def test_retraining_lowers_the_block_mse_and_resumes(tmp_path):
    torch.manual_seed(0)
    model = reference.load("resnet20", "cluttered-fashion-mnist").eval()
    x = reference.first_images("cluttered-fashion-mnist", "train", 64)
    gm, inputs = outlined(model, x[:2])
    names = [b["name"] for b in gm.fxeff_blocks[:3]]
    students = {b["name"]: descendants(gm.get_submodule(b["name"]), inputs[b["name"]], b["prunable"],
                                       sparsities=(0.0, 0.5, 0.8)) for b in gm.fxeff_blocks if b["name"] in names}
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=16)
    before = block_mse(gm, students, loader)
    checkpoint = str(tmp_path / "students.pt")
    history = retrain(gm, students, loader, epochs=2, checkpoint=checkpoint, progress=False)
    assert history["epochs_done"] == 2 and len(history["loss"]) == 2
    after = block_mse(gm, students, loader)
    for name in names:
        assert after[name][0.0] == 0.0
        for sparsity in (0.5, 0.8):
            assert after[name][sparsity] < 0.8 * before[name][sparsity], (name, sparsity, before, after)
    # back in the teacher's mode (eval: BatchNorm on its running statistics)
    assert not any(m.training for by in students.values() for child in by.values() for m in child.modules())
    # the teacher is untouched: the outlined graph still computes the model
    with torch.no_grad():
        assert torch.equal(gm(x[:4]), model(x[:4]))
    # a second run finds the checkpoint: nothing left at 2 epochs, one more epoch at 3
    again = retrain(gm, students, loader, epochs=2, checkpoint=checkpoint, progress=False)
    assert again["epochs_done"] == 2 and again["loss"] == []
    more = retrain(gm, students, loader, epochs=3, checkpoint=checkpoint, progress=False)
    assert more["epochs_done"] == 3 and len(more["loss"]) == 1


def _ddp_retrain_worker(rank: int, world: int, folder: str) -> None:
    torch.manual_seed(0)  # the same model, descendants and data on every rank
    model = reference.load("resnet20", "cluttered-fashion-mnist").eval()
    x = reference.first_images("cluttered-fashion-mnist", "train", 64)
    gm, inputs = outlined(model, x[:2])
    students = {b["name"]: descendants(gm.get_submodule(b["name"]), inputs[b["name"]], b["prunable"],
                                       sparsities=(0.0, 0.5)) for b in gm.fxeff_blocks[:2]}
    dataset = torch.utils.data.TensorDataset(x)
    sampler = torch.utils.data.distributed.DistributedSampler(dataset, world, rank, shuffle=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, sampler=sampler)
    history = retrain(gm, students, loader, epochs=1, checkpoint=f"{folder}/students.pt", progress=False)
    assert history["epochs_done"] == 1 and len(loader) == 4  # each rank its half of the 64 images
    # parameters: DDP averages their gradients (BatchNorm statistics are each rank's own last batch's)
    torch.save({f"{name}/{k}": v.detach() for name, by in students.items()
                for k, v in by[0.5].named_parameters()}, f"{folder}/rank{rank}.pt")


def test_retraining_under_ddp_ends_with_the_same_students_on_every_rank(tmp_path):
    _gloo.spawn(_ddp_retrain_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    checkpoint = torch.load(tmp_path / "students.pt", weights_only=True)
    torch.manual_seed(0)
    model = reference.load("resnet20", "cluttered-fashion-mnist").eval()
    x = reference.first_images("cluttered-fashion-mnist", "train", 2)
    gm, inputs = outlined(model, x)
    start = {f"{b['name']}/{k}": v for b in gm.fxeff_blocks[:2] for k, v in
             descendant(gm.get_submodule(b["name"]), inputs[b["name"]], 0.5, b["prunable"]).state_dict().items()}
    assert checkpoint["epochs_done"] == 1
    moved = 0
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), key  # DDP averaged the gradients: identical steps
        moved += not torch.equal(start[key], value)
    assert moved > 0
    saved = checkpoint["students"]  # rank 0 wrote the checkpoint (StudentSet keys: block@sparsity/param)
    block = gm.fxeff_blocks[0]["name"]
    some = [k for k in ranks[0] if k.startswith(block) and k.endswith("weight")][0]
    assert torch.equal(saved[f"{block}@0_5.{some.split('/', 1)[1]}"], ranks[0][some])


def _students_for_two(x):
    torch.manual_seed(0)  # the same model, descendants and data in every process
    model = reference.load("resnet20", "cluttered-fashion-mnist").eval()
    gm, inputs = outlined(model, x[:2])
    students = {b["name"]: descendants(gm.get_submodule(b["name"]), inputs[b["name"]], b["prunable"],
                                       sparsities=(0.0, 0.4, 0.8)) for b in gm.fxeff_blocks[:3]}
    return gm, students


def _state(students):
    return {f"{name}/{s}/{k}": v.detach().clone() for name, by in students.items() for s, m in by.items() if s
            for k, v in m.state_dict().items()}


def _blocks_retrain_worker(rank: int, world: int, folder: str) -> None:
    x = reference.first_images("cluttered-fashion-mnist", "train", 32)
    gm, students = _students_for_two(x)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=8)  # the whole loader
    history = retrain(gm, students, loader, epochs=2, checkpoint=f"{folder}/students.pt", progress=False,
                      parallel="blocks")
    assert history["epochs_done"] == 2
    torch.save(_state(students), f"{folder}/rank{rank}.pt")


def test_retraining_parallel_over_blocks_equals_one_process(tmp_path):
    """parallel="blocks": 6 students dealt to 2 ranks, each trains its 3; after the broadcast both ranks hold all
    6, equal to one process training them all (each student's Adam steps see only its own loss)."""
    _gloo.spawn(_blocks_retrain_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    x = reference.first_images("cluttered-fashion-mnist", "train", 32)
    gm, students = _students_for_two(x)
    start = _state(students)
    torch.set_num_threads(1)  # as the ranks ran (oneDNN's sums may depend on the thread count)
    try:
        retrain(gm, students, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=8),
                epochs=2, progress=False)
    finally:
        torch.set_num_threads(2)
    alone = _state(students)
    assert set(ranks[0]) == set(alone) and len({k.split("/")[0] + k.split("/")[1] for k in alone}) == 6
    for key, value in alone.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # the broadcast: the same students on both ranks
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-5, atol=1e-6)
    assert sum(not torch.equal(start[k], v) for k, v in alone.items()) > 0
    saved = torch.load(tmp_path / "students.pt", weights_only=True)
    assert saved["epochs_done"] == 2 and len(saved["keys"]) == 6


def test_parallel_must_be_data_or_blocks():
    x = reference.first_images("cluttered-fashion-mnist", "train", 4)
    gm, students = _students_for_two(x)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4)
    with pytest.raises(ValueError, match="parallel must be 'data' or 'blocks'"):
        retrain(gm, students, loader, parallel="layers", progress=False)


def _composed_loss(gm, students, loader, choice):
    from fxeff.blocks.retrain import configured
    from fxeff.distill import kd_loss

    total = 0.0
    with torch.no_grad(), configured(gm, students) as apply:
        for (x,) in loader:
            apply({})
            target = gm(x)
            apply(choice)
            total += float(kd_loss(gm(x), target))
    return total / len(loader)


def test_composed_retraining_distils_the_output_and_leaves_the_teacher(tmp_path):
    from fxeff.blocks.retrain import retrain_composed

    x = reference.first_images("cluttered-fashion-mnist", "train", 32)
    gm, students = _students_for_two(x)
    model = reference.load("resnet20", "cluttered-fashion-mnist").eval()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=8)
    smallest = {name: 0.8 for name in students}
    before = _composed_loss(gm, students, loader, smallest)
    start = _state(students)
    teacher = {k: v.clone() for k, v in gm.state_dict().items()}
    checkpoint = str(tmp_path / "composed.pt")
    history = retrain_composed(gm, students, loader, epochs=2, lr=1e-3, checkpoint=checkpoint, progress=False)
    assert history["epochs_done"] == 2 and len(history["loss"]) == 2
    assert _composed_loss(gm, students, loader, smallest) < 0.8 * before  # the smallest is drawn every step
    after = _state(students)
    assert all(not torch.equal(start[k], after[k]) for k in start if "/0.8/" in k and k.endswith("weight"))
    # BatchNorm statistics frozen (eval mode throughout), and the teacher untouched, gradients off and back
    assert all(torch.equal(start[k], after[k]) for k in start if "running_" in k)
    assert not any(m.training for by in students.values() for child in by.values() for m in child.modules())
    assert all(torch.equal(v, teacher[k]) for k, v in gm.state_dict().items())
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in gm.parameters())
    with torch.no_grad():
        assert torch.equal(gm(x[:4]), model(x[:4]))
    again = retrain_composed(gm, students, loader, epochs=2, checkpoint=checkpoint, progress=False)
    assert again["epochs_done"] == 2 and again["loss"] == []
    assert len(retrain_composed(gm, students, loader, epochs=3, checkpoint=checkpoint, progress=False)["loss"]) == 1
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        retrain_composed(gm, students, loader, epochs=0)
    name = next(iter(students))
    setattr(gm, name, students[name][0.8])
    with pytest.raises(ValueError, match="put its own blocks back first"):
        retrain_composed(gm, students, loader)


def test_composed_retraining_draws():
    from fxeff.blocks.retrain import StudentSet, _Compositions, retrain_composed

    x = reference.first_images("cluttered-fashion-mnist", "train", 4)
    gm, students = _students_for_two(x)
    compositions = _Compositions(gm, StudentSet(students), students, 4.0, 0.9, draws="random", seed=3)
    draws = [compositions.draw() for _ in range(300)]
    assert all(len(d) == 1 for d in draws)
    for name in students:  # each of a block's 3 sparsities drawn about a third of the time
        counts = [sum(d[0][name] == s for d in draws) for s in (0.0, 0.4, 0.8)]
        assert all(70 <= c <= 130 for c in counts), (name, counts)
    sandwich = _Compositions(gm, StudentSet(students), students, 4.0, 0.9, draws="sandwich", seed=3).draw()
    assert sandwich[0] == {name: 0.8 for name in students} and len(sandwich) == 2
    levels = _Compositions(gm, StudentSet(students), students, 4.0, 0.9, draws="levels", seed=3)
    assert [levels.draw()[0] for _ in range(3)] == [{name: s for name in students} for s in (0.4, 0.8, 0.4)]
    with pytest.raises(ValueError, match="draws must be one of"):
        retrain_composed(gm, students, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x)), draws="all")


def _ddp_composed_worker(rank: int, world: int, folder: str) -> None:
    from fxeff.blocks.retrain import retrain_composed

    x = reference.first_images("cluttered-fashion-mnist", "train", 32)
    gm, students = _students_for_two(x)
    dataset = torch.utils.data.TensorDataset(x)
    sampler = torch.utils.data.distributed.DistributedSampler(dataset, world, rank, shuffle=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, sampler=sampler)
    retrain_composed(gm, students, loader, epochs=1, lr=1e-3, progress=False)
    torch.save(_state(students), f"{folder}/rank{rank}.pt")


def test_composed_retraining_under_ddp_ends_with_the_same_students_on_every_rank(tmp_path):
    _gloo.spawn(_ddp_composed_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    start = _state(_students_for_two(reference.first_images("cluttered-fashion-mnist", "train", 2))[1])
    for key, value in ranks[0].items():  # the same draws on both ranks, gradients averaged: identical steps
        assert torch.equal(value, ranks[1][key]), key
    assert sum(not torch.equal(start[k], v) for k, v in ranks[0].items()) > 0
