"""fxeff.glance: batched crops against a per-sample reference, the classifier split, GlanceFocus's steps, real early
exit against computing every step, per-step MACs against the flop counter, threshold calibration for a budget."""
import itertools

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from fxeff import glance, reference

DATASET = "cluttered-fashion-mnist"


def reference_crop(x, corners, size):
    """One image at a time, by slicing: the seed's way."""
    h, w = x.shape[-2:]
    out = []
    for image, (cy, cx) in zip(x, corners.tolist()):
        top = min(max(int(torch.round(torch.tensor(cy * (h - size)))), 0), h - size)
        left = min(max(int(torch.round(torch.tensor(cx * (w - size)))), 0), w - size)
        out.append(image[:, top:top + size, left:left + size])
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.uint8])
def test_crop_equals_a_per_sample_reference(dtype):
    g = torch.Generator().manual_seed(0)
    for n, c, h, w, size in [(1, 1, 8, 8, 8), (5, 3, 17, 23, 4), (7, 2, 64, 64, 32), (3, 4, 9, 30, 1)]:
        x = (torch.rand(n, c, h, w, generator=g) * 100).to(dtype)
        corners = torch.rand(n, 2, generator=g)
        corners[0] = torch.tensor([0.0, 1.0])  # both edges
        for variant in (x, x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3).contiguous()
                        .transpose(2, 3)):
            got = glance.crop(variant, corners, size)
            assert got.dtype == dtype and got.shape == (n, c, size, size) and got.is_contiguous()
            assert torch.equal(got, reference_crop(x, corners, size))


def test_crop_bilinear_at_whole_pixels_is_the_crop_and_is_differentiable():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 20, 24, generator=g)
    size = 8
    pixels = torch.tensor([[0, 0], [12, 16], [5, 9], [7, 1]], dtype=torch.float32)
    corners = pixels / torch.tensor([20 - size, 24 - size])
    torch.testing.assert_close(glance.crop_bilinear(x, corners, size), glance.crop(x, corners, size),
                               rtol=1e-5, atol=1e-5)
    xd = torch.randn(2, 2, 9, 11, dtype=torch.float64, generator=g, requires_grad=True)
    cd = (torch.rand(2, 2, dtype=torch.float64, generator=g) * 0.8 + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: glance.crop_bilinear(a, b, 4), (xd, cd))


def test_crop_refuses_bad_input():
    x = torch.zeros(2, 1, 16, 16)
    with pytest.raises(ValueError, match="patch size 17 is larger than the image"):
        glance.crop(x, torch.zeros(2, 2), 17)
    with pytest.raises(ValueError, match=r"corners must be a \[N, 2\] tensor"):
        glance.crop(x, torch.zeros(3, 2), 4)
    with pytest.raises(ValueError, match="size must be a positive int"):
        glance.crop_bilinear(x, torch.zeros(2, 2), 0)


@pytest.mark.parametrize("arch", reference.ARCHS)
def test_the_split_classifier_recomposes_the_model(arch):
    model = reference.load(arch, DATASET).eval()
    x = reference.first_images(DATASET, "test", 4)
    split = glance.split_classifier(model, x)
    with torch.no_grad():
        features = split.trunk(x)
        assert features.shape[1] == split.channels and tuple(features.shape[-2:]) == split.feature_size
        torch.testing.assert_close(split.linear(features.mean(dim=(2, 3))), model(x), rtol=1e-5, atol=1e-5)


def test_the_split_refuses_models_that_do_not_end_in_pooling_and_one_linear():
    two = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="ends in two linear layers"):
        glance.split_classifier(two, torch.zeros(2, 1, 8, 8))
    dense = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 2))
    with pytest.raises(ValueError, match="no global pooling|expected global pooling"):
        glance.split_classifier(dense, torch.zeros(2, 1, 8, 8))
    maps = nn.Sequential(nn.Conv2d(1, 4, 3))
    with pytest.raises(ValueError, match=r"not \[N, classes\] logits"):
        glance.split_classifier(maps, torch.zeros(2, 1, 8, 8))


@pytest.fixture(scope="module")
def trained():
    model = reference.load("resnet20", DATASET).eval()
    x = reference.first_images(DATASET, "test", 24)
    return model, x


def models(model, x):
    for head, policy in itertools.product(glance.model.HEADS, glance.model.POLICIES):
        torch.manual_seed(0)
        yield glance.GlanceFocus(model, x, patch_size=32, steps=3, head=head, policy=policy).eval()


def test_glance_focus_runs_every_step(trained):
    model, x = trained
    for gf in models(model, x):
        with torch.no_grad():
            out = gf(x)
        assert out.shape == (3, len(x), 10) and torch.isfinite(out).all()
    # the concat head's first step is the original classifier on the glance's features
    gf = glance.GlanceFocus(model, x, patch_size=64, glance_size=64, steps=1, head="concat")
    with torch.no_grad():
        torch.testing.assert_close(gf(x)[0], model(x), rtol=1e-5, atol=1e-5)


def test_glance_focus_refuses_bad_arguments(trained):
    model, x = trained
    with pytest.raises(ValueError, match=r"steps \(T\) must be an int >= 1"):
        glance.GlanceFocus(model, x, patch_size=32, steps=0)
    with pytest.raises(ValueError, match=r"patch_size must be an int in \[1, 64\]"):
        glance.GlanceFocus(model, x, patch_size=65)
    with pytest.raises(ValueError, match="policy must be one of"):
        glance.GlanceFocus(model, x, patch_size=32, policy="ppo2")
    with pytest.raises(ValueError, match=r"saliency must be one of \('activation', 'cam'\), got 'grad'"):
        glance.GlanceFocus(model, x, patch_size=32, saliency="grad")
    gf = glance.GlanceFocus(model, x, patch_size=32)
    with pytest.raises(ValueError, match=r"expected images \[N, C, 64, 64\]"):
        gf(torch.zeros(2, 1, 32, 32))


@pytest.mark.parametrize("saliency,level", [("activation", 0.35), ("cam", 0.3)])
def test_the_saliency_policy_centres_on_its_maps_region(trained, saliency, level):
    model, x = trained
    gf = glance.GlanceFocus(model, x, patch_size=32, steps=3, head="concat", policy="saliency",
                            saliency=saliency).eval()
    with torch.no_grad():
        state = gf.glance(x)
        if saliency == "cam":  # the class activation map of the predicted class
            cam = torch.einsum("nc,nchw->nhw", gf.policy.weight[state["logits"].argmax(1)], state["features"])
        else:  # the feature map summed over channels
            cam = state["features"].sum(1)
        corners = gf.corners(state, 1)
    h, w = cam.shape[-2:]
    for i in range(len(x)):  # one image at a time, by the definition
        c = cam[i].double()
        mass = (c - (c.min() + level * (c.max() - c.min()))).clamp(min=0)
        rows, cols = torch.meshgrid((torch.arange(h) + 0.5) * 64 / h, (torch.arange(w) + 0.5) * 64 / w,
                                    indexing="ij")
        centre = torch.stack([(mass * rows).sum(), (mass * cols).sum()]) / mass.sum()
        torch.testing.assert_close(corners[i].double(), ((centre - 16) / 32).clamp(0, 1), rtol=1e-5, atol=1e-5)
    # the cells whose centres the patch covers are now covered
    pixels = glance.pixel_corners(corners, 32, 64, 64)
    centres = (torch.arange(h) + 0.5) * 64 / h
    for i, (top, left) in enumerate(pixels.tolist()):
        inside = ((centres >= top) & (centres < top + 32))[:, None] & ((centres >= left) & (centres < left + 32))[None]
        assert torch.equal(state["covered"][i], inside)
    with torch.no_grad():
        second = gf.corners(state, 2)
    assert not torch.equal(second, corners)  # the next patch goes elsewhere
    # a flat map (every cell equal): the first open cell's centre
    flat = torch.ones(2, gf.channels, h, w)
    covered = torch.zeros(2, h, w, dtype=torch.bool)
    covered[1, 0, 0] = True
    got, _ = gf.policy(flat, state["logits"][:2], covered, [64, 64], 32)
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.0], [0.0, 0.5 * 64 / w / 32]]))


@pytest.mark.parametrize("saliency", ["activation", "cam"])
def test_the_learned_policy_starts_at_the_soft_argmax_of_its_map(trained, saliency):
    model, x = trained
    gf = glance.GlanceFocus(model, x, patch_size=32, steps=3, head="gru", policy="learned",
                            saliency=saliency).eval()
    with torch.no_grad():
        state = gf.glance(x)
        if saliency == "cam":
            cam = torch.einsum("nc,nchw->nhw", gf.policy.weight[state["logits"].argmax(1)], state["features"])
        else:
            cam = state["features"].sum(1)
    n, h, w = cam.shape
    z = cam.reshape(n, -1)
    weights = torch.softmax(2.0 * (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + 1e-6), 1)
    rows, cols = torch.meshgrid((torch.arange(h) + 0.5) * 64 / h, (torch.arange(w) + 0.5) * 64 / w, indexing="ij")
    centre = torch.stack([(weights * rows.reshape(1, -1)).sum(1), (weights * cols.reshape(1, -1)).sum(1)], 1)
    want = ((centre - 16) / 32).clamp(0, 1)
    for t in (1, 2):
        torch.testing.assert_close(gf.corners(state, t), want, rtol=1e-5, atol=1e-5)


def test_the_learned_policy_trains_through_the_crop(trained):
    model, x = trained
    gf = glance.GlanceFocus(model, x, patch_size=32, steps=3, head="gru", policy="learned").train()
    loss = glance.steps_loss(gf(x), torch.zeros(len(x), dtype=torch.long))
    loss.backward()
    assert gf.policy.net[-1].weight.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.abs().sum() for p in gf.global_encoder.parameters()
               if p in set(gf.policy.parameters()))


def test_early_exit_equals_every_step_then_the_exit_chosen(trained):
    model, x = trained
    for gf in models(model, x):
        macs = glance.step_macs(gf, x)
        with torch.no_grad():
            every = gf(x)
        thresholds = glance.calibrate(gf, every, macs, p=1.0)
        exits = glance.early_exit(gf, x, thresholds, macs)
        confidence = torch.softmax(every, dim=2).amax(dim=2)
        for i in range(len(x)):
            leave = [t for t in range(gf.steps) if t == gf.steps - 1 or confidence[t, i] >= thresholds.values[t]]
            assert int(exits.step[i]) == leave[0], (gf.head_kind, gf.policy_kind, i)
            torch.testing.assert_close(exits.logits[i], every[leave[0], i], rtol=1e-4, atol=1e-4)
        assert set(exits.step.tolist()) == {0, 1, 2}  # p = 1: a third meant to leave at each step
        cumulative = torch.tensor(macs, dtype=torch.float64).cumsum(0)
        assert torch.equal(exits.macs, cumulative[exits.step])


def test_step_macs_are_the_flop_counters_on_each_part(trained):
    model, x = trained

    def count(fn):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() // 2

    for gf in models(model, x[:1]):
        macs = glance.step_macs(gf, x)
        small = torch.nn.functional.interpolate(x[:1], size=(32, 32), mode="bilinear", antialias=True)
        features = gf.global_encoder(small)
        pooled = features.mean(dim=(2, 3))
        head = count(lambda: gf.rnn(pooled)) + count(lambda: gf.classifiers[0](pooled)) if gf.head_kind == "gru" \
            else count(lambda: gf.classifiers[0](pooled))
        logits = gf.classifiers[0](gf.rnn(pooled) if gf.head_kind == "gru" else pooled)
        policy = count(lambda: gf.policy(features, logits, [64, 64], 32)) if gf.policy_kind == "learned" else \
            count(lambda: gf.policy(features)) if gf.policy_kind == "ppo" else 0
        assert macs[0] == count(lambda: gf.global_encoder(small)) + head + policy
        patch = x[:1, :, :32, :32]
        local = count(lambda: gf.local_encoder(patch))
        assert macs[1] > local and macs[1] - local < 0.05 * local  # the head (and the saliency map) on top


def test_calibration_meets_a_budget_and_refuses_what_it_cannot(trained):
    model, x = trained
    gf = glance.GlanceFocus(model, x, patch_size=32, steps=3, head="concat", policy="saliency").eval()
    macs = glance.step_macs(gf, x)
    with torch.no_grad():
        every = gf(x)
    total = sum(macs)
    for fraction in (0.5, 0.7, 0.9):
        found = glance.calibrate(gf, every, macs, budget=fraction * total, tolerance=0.03)
        assert abs(found.expected_macs - fraction * total) <= 0.03 * fraction * total, (fraction, found)
        # the expected MACs are the thresholds' own on these images
        exits = glance.early_exit(gf, x, found, macs)
        assert float(exits.macs.mean()) == pytest.approx(found.expected_macs)
    with pytest.raises(ValueError, match="budget expected MACs per image in"):
        glance.calibrate(gf, every, macs, budget=macs[0] * 0.5)
    other = glance.GlanceFocus(model, x, patch_size=32, steps=3, head="gru", policy="saliency").eval()
    with pytest.raises(ValueError, match="calibrated for another model"):
        glance.early_exit(other, x, found, macs)


def test_thresholds_make_steps_without_exits_explicit():
    confidence = torch.tensor([[0.9, 0.5, 0.4], [0.95, 0.6, 0.7], [0.99, 0.8, 0.9]])
    values, counts, none = glance.thresholds_for(confidence, p=10.0)  # shares 1/111, 10/111, 100/111 of 3
    assert none == [0, 1] and values[:2] == [float("inf")] * 2 and counts == [0, 0, 3]
    values, counts, none = glance.thresholds_for(confidence, p=1.0)  # one image per step
    assert none == [] and counts == [1, 1, 1] and values[0] == pytest.approx(0.9) and values[-1] == float("-inf")


def test_training_lowers_the_loss_and_leaves_the_teacher_untouched(trained):
    model, x = trained
    data = torch.utils.data.DataLoader(reference.dataset(DATASET, "train", limit=64), batch_size=32)
    gf = glance.GlanceFocus(model, x, patch_size=32, steps=2, head="concat", policy="learned")
    before_teacher = {k: v.clone() for k, v in model.state_dict().items()}

    def mean_loss():
        gf.eval()
        with torch.no_grad():
            return sum(float(glance.steps_loss(gf(a), b)) for a, b in data) / len(data)

    start = mean_loss()
    history = glance.train(gf, data, epochs=3, teacher=model, lr=0.01, progress=False)
    assert len(history["loss"]) == 3 and mean_loss() < start
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before_teacher.items())
    assert all(p.requires_grad for p in model.parameters())
    assert not model.training
    with pytest.raises(TypeError, match="model must be a GlanceFocus"):
        glance.train(model, data, epochs=1)


def _ddp_worker(rank: int, world: int, folder: str) -> None:
    torch.manual_seed(0)  # the same model and data on every rank
    model = reference.load("resnet20", DATASET)
    gf = glance.GlanceFocus(model, reference.first_images(DATASET, "test", 2), patch_size=32, steps=3,
                            policy="learned")
    data = reference.dataset(DATASET, "train", limit=32)
    sampler = torch.utils.data.distributed.DistributedSampler(data, world, rank, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=8, sampler=sampler)
    history = glance.train(nn.parallel.DistributedDataParallel(gf), loader, 1, teacher=model, lr=0.01,
                           checkpoint=f"{folder}/ckpt.pt", progress=False)
    assert len(history["loss"]) == 1 and len(loader) == 2
    torch.save({k: v.detach().clone() for k, v in gf.state_dict().items()}, f"{folder}/rank{rank}.pt")


def test_training_under_ddp_takes_the_same_steps_on_every_rank(tmp_path):
    import _gloo

    _gloo.spawn(_ddp_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    torch.manual_seed(0)
    start = glance.GlanceFocus(reference.load("resnet20", DATASET), reference.first_images(DATASET, "test", 2),
                               patch_size=32, steps=3, policy="learned").state_dict()
    parameters = {name for name, _ in glance.GlanceFocus(
        reference.load("resnet20", DATASET), reference.first_images(DATASET, "test", 2), patch_size=32, steps=3,
        policy="learned").named_parameters()}
    moved = 0
    for name, value in ranks[0].items():
        assert torch.equal(checkpoint[name], value), name  # rank 0 saved the bare GlanceFocus's state
        if name in parameters:  # gradients averaged: the same steps (the BatchNorms' running statistics are
            assert torch.equal(value, ranks[1][name]), name  # each rank's own after the last batch)
            moved += not torch.equal(start[name], value)
    assert moved > 0 and not torch.equal(start["policy.map_scale"], ranks[0]["policy.map_scale"])


def test_exit_steps_from_the_anytime_logits_are_early_exits(trained):
    model, x = trained
    for gf in models(model, x):
        macs = glance.step_macs(gf, x)
        with torch.no_grad():
            every = gf(x)
        confidence = torch.softmax(every, dim=2).amax(dim=2)
        for k in (3, 8, 16):
            # each threshold midway between two images' confidences: a threshold equal to one image's confidence
            # (calibrate's, on its own images) decides that image by float rounding, which the compacted batch
            # computes otherwise
            values = []
            for t in range(gf.steps - 1):
                ranked = torch.sort(confidence[t]).values
                values.append(float(ranked[k] + ranked[k + 1]) / 2)
            thresholds = glance.Thresholds(values + [-float("inf")], glance.inference.fingerprint(gf), [], 0.0, 1.0)
            assert torch.equal(glance.exit_steps(every, thresholds), glance.early_exit(gf, x, thresholds, macs).step)


def test_the_budget_curve_applies_held_out_thresholds(trained):
    model, x = trained
    gf = glance.GlanceFocus(model, x, patch_size=32, steps=3, head="gru", policy="saliency").eval()
    macs = glance.step_macs(gf, x)
    with torch.no_grad():
        every = gf(x)
    held, test = every[:, :12], every[:, 12:]
    labels = torch.arange(12) % 10
    cumulative = torch.tensor(macs, dtype=torch.float64).cumsum(0)
    budgets = [float(cumulative[0] * 1.2), float(cumulative[1]), float(cumulative[2] * 0.9)]
    points = glance.budget_curve(gf, held, test, labels, macs, budgets)
    for budget, point in zip(budgets, points):
        thresholds = glance.calibrate(gf, held, macs, budget=budget)
        assert point.calibration_macs == pytest.approx(thresholds.expected_macs)
        step = glance.exit_steps(test, thresholds)
        assert point.macs == pytest.approx(float(cumulative[step].mean()))
        want = 100.0 * float((test[step, torch.arange(12)].argmax(1) == labels).double().mean())
        assert point.accuracy == pytest.approx(want) and sum(point.exit_shares) == pytest.approx(1.0)


def test_item_coverage_counts_the_items_own_pixels():
    data = reference.dataset(DATASET, "test", limit=3)
    places = [data.placement(i) for i in range(3)]
    mask = data.sources[0] > 0
    at = torch.tensor([list(p) for p in places])
    assert glance.item_coverage(at, 28, data, range(3)).tolist() == [1.0, 1.0, 1.0]
    # a patch over the item's left half: the share of its pixels in columns 0..13
    top, left = places[0]
    half = glance.item_coverage(torch.tensor([[top, left - 14]]), 28, data, [0])
    assert float(half) == pytest.approx(mask[:, :14].sum() / mask.sum())
    far = torch.tensor([[top + 28, left]]) if top + 28 <= 36 else torch.tensor([[top - 28, left]])
    assert float(glance.item_coverage(far, 28, data, [0])) == 0.0
    with pytest.raises(TypeError, match="must know its items' places"):
        glance.item_coverage(at, 28, reference.dataset("fashion-mnist", "test", limit=3), range(3))


def test_checkpoints_rebuild_the_model_with_its_macs(trained, tmp_path):
    model, x = trained
    gf = glance.GlanceFocus(model, x, patch_size=24, glance_size=16, steps=2, head="concat", policy="learned")
    with torch.no_grad():
        gf.policy.net[-1].bias.fill_(0.3)  # not its initial weights
    gf.eval()
    path = str(tmp_path / "gf.pt")
    record = glance.save(gf, path, x, {"epochs": 1})
    assert record["macs"] == glance.step_macs(gf, x)
    back = glance.load(path, reference.load("resnet20", DATASET), x)
    assert back.macs_per_step == record["macs"] and back.meta == {"epochs": 1}
    with torch.no_grad():
        assert torch.equal(back(x), gf(x))
    with pytest.raises(ValueError, match="built from another classifier"):
        other = reference.load("resnet20", DATASET)
        other.conv1.stride = (1, 1)  # the same weights, 4x the MACs
        glance.load(path, other, x)
    with pytest.raises(ValueError, match="weights do not fit"):
        glance.load(path, reference.load("vgg", DATASET), x)
    with pytest.raises(ValueError, match="for \\[64, 64\\] images"):
        glance.load(path, model, torch.zeros(1, 1, 32, 32))
    # a checkpoint written before the saliency map was a choice was built on the class activation map
    cam = glance.GlanceFocus(model, x, patch_size=24, steps=2, policy="saliency", saliency="cam").eval()
    glance.save(cam, path, x)
    old = torch.load(path, weights_only=True)
    assert old["config"].pop("saliency") == "cam"
    torch.save(old, path)
    back = glance.load(path, model, x)
    with torch.no_grad():
        assert back.saliency == "cam" and torch.equal(back(x), cam(x))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable glance checkpoint"):
        glance.load(str(tmp_path / "bad.pt"), model, x)


def test_the_fingerprint_follows_every_weight_change(trained):
    model, x = trained
    gf = glance.GlanceFocus(model, x, patch_size=32, steps=2)
    first = glance.inference.fingerprint(gf)
    original = {k: v.clone() for k, v in gf.state_dict().items()}
    assert glance.inference.fingerprint(gf) == first  # cached
    with torch.no_grad():
        gf.local_encoder.conv1.weight[0, 0, 0, 0] += 1.0
    changed = glance.inference.fingerprint(gf)
    assert changed != first
    gf.load_state_dict(original)
    assert glance.inference.fingerprint(gf) == first
    gf.rnn.bias_hh.data = gf.rnn.bias_hh.data + 1  # a new tensor, not an in-place write
    assert glance.inference.fingerprint(gf) not in (first, changed)
    # the same weights with another saliency map or random seed place patches elsewhere: another model
    for other in ({"saliency": "cam"}, {"policy": "random", "seed": 1}):
        torch.manual_seed(0)
        a = glance.GlanceFocus(model, x, patch_size=32, steps=2, **{"policy": other.get("policy", "saliency")})
        b = glance.GlanceFocus(model, x, patch_size=32, steps=2, **{"policy": "saliency", **other})
        b.load_state_dict(a.state_dict())
        assert glance.inference.fingerprint(a) != glance.inference.fingerprint(b)


def test_the_command_line_trains_then_evaluates_at_a_budget(tmp_path, capsys, monkeypatch):
    from fxeff.cli import main

    monkeypatch.chdir(tmp_path)  # out/glance/LAST goes there, not into the checkout

    path = str(tmp_path / "gf.pt")
    assert main(["glance", "train", "resnet20", DATASET, "--policy", "saliency", "--train-images", "64",
                 "--epochs", "1", "--out", path]) == 0
    out = capsys.readouterr().out
    assert "policy saliency: trained 1 epochs on 64 images" in out and "MACs per step (M): " in out
    assert main(["glance", "eval", "--checkpoint", path, "--budget", "0.4", "--test-images", "256",
                 "--batch", "32"]) == 0
    out = capsys.readouterr().out
    realised = float(out.split("realised ")[1].split()[0])
    assert abs(realised - 0.4) <= 0.1 and "real early exit, batch 32" in out  # 256 test images: coarse
    with pytest.raises(ValueError, match=r"--budget expected a fraction of the full model's MACs in \[0.25"):
        main(["glance", "eval", "--checkpoint", path, "--budget", "0.1", "--test-images", "256"])
    with pytest.raises(ValueError, match="train_images must be in"):
        main(["glance", "train", "resnet20", DATASET, "--train-images", "59000", "--out", path])


def test_folding_the_batchnorms_keeps_every_steps_logits(trained):
    model, x = trained
    for gf in models(model, x):
        with torch.no_grad():
            before = gf(x)
            gf.fold_batchnorm()
            after = gf(x)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in gf.modules())
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match=r"call .eval\(\) first"):
        glance.GlanceFocus(model, x, patch_size=32).train().fold_batchnorm()


def test_pictures_of_the_steps_and_the_budget_curves(trained, tmp_path):
    import matplotlib.image

    model, x = trained
    gf = glance.GlanceFocus(model, x, patch_size=32, steps=3, policy="saliency").eval()
    path = glance.visualise(gf, x[:3], str(tmp_path / "steps.png"), torch.tensor([0, 1, 2]), [str(i) for i in
                                                                                               range(10)])
    picture = matplotlib.image.imread(path)
    assert picture.shape[0] >= 500 and picture.shape[1] >= 500  # three rows of three panels, titled
    macs = glance.step_macs(gf, x)
    with torch.no_grad():
        every = gf(x)
    points = glance.budget_curve(gf, every, every, torch.zeros(len(x), dtype=torch.long), macs,
                                 [1.5 * macs[0], 2.5 * macs[0]])
    path = glance.plot_curves({"saliency": points}, 90.0, 4 * macs[0], str(tmp_path / "curve.png"),
                              latency={"saliency": [(0.3, 80.0), (0.5, 85.0)]})
    assert matplotlib.image.imread(path).shape[1] > 1000  # two panels


def test_ppo_trains_the_policy_alone_between_its_warm_up_and_fine_tuning(trained):
    model, x = trained
    data = torch.utils.data.DataLoader(reference.dataset(DATASET, "train", limit=64), batch_size=32)
    torch.manual_seed(0)
    gf = glance.GlanceFocus(model, x, patch_size=32, steps=3, policy="ppo")
    policy = gf.policy
    # the modes: the actor's means, Gaussian samples around them, uniform places
    with torch.no_grad():
        gf.eval()
        mean = gf.glance(x)["places"]
        policy.mode = "sample"
        state = gf.glance(x)
        assert "ppo_value" in state and not torch.equal(state["places"], mean)
        assert float((state["places"] - mean).std()) == pytest.approx(0.1, rel=0.3)
        policy.mode = "random"
        assert not torch.equal(gf.glance(x)["places"], mean)
        policy.mode = "mean"
    # the loss reaches the policy only
    policy.mode = "sample"
    labels = torch.arange(len(x)) % 10
    glance.ppo_loss(gf, x, labels).backward()
    policy.mode = "mean"
    assert policy.actor.weight.grad.abs().sum() > 0 and policy.critic.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in gf.named_parameters() if not n.startswith("policy."))
    gf.zero_grad(set_to_none=True)
    # stage 2 alone: the policy moves, nothing else does (BatchNorm statistics included)
    before = {k: v.clone() for k, v in gf.state_dict().items()}
    gf.local_encoder.conv1.weight.requires_grad_(False)  # a user's frozen weight stays frozen
    history = glance.train_ppo(gf, data, stages=(0, 1, 0), progress=False)
    after = gf.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("policy.") for k in moved) and list(history) == ["ppo"]
    assert policy.mode == "mean" and not gf.local_encoder.conv1.weight.requires_grad
    assert all(p.requires_grad for n, p in gf.named_parameters() if n != "local_encoder.conv1.weight")
    # stage 3 alone: the policy frozen, the encoders move
    before = {k: v.clone() for k, v in gf.state_dict().items()}
    glance.train_ppo(gf, data, stages=(0, 0, 1), progress=False)
    moved = {k for k in before if not torch.equal(before[k], gf.state_dict()[k])}
    assert moved and not any(k.startswith("policy.") for k in moved)
    with pytest.raises(TypeError, match="policy='ppo'"):
        glance.train_ppo(glance.GlanceFocus(model, x, patch_size=32, policy="random"), data)
    with pytest.raises(ValueError, match="three epoch counts"):
        glance.train_ppo(gf, data, stages=(1, 1))


def test_the_glance_pass_makes_the_model_glance_and_focus(trained):
    import fxeff

    model, x = trained
    gm = fxeff.transform(model, x, [fxeff.Glance(patch_size=24, glance_size=16, steps=3, policy="learned")])
    gf = gm.glance_focus
    assert isinstance(gf, glance.GlanceFocus) and [n for n, _ in gm.named_children()] == ["glance_focus"]
    assert (gf.patch_size, gf.glance_size, gf.steps, gf.policy_kind) == (24, 16, 3, "learned")
    with torch.no_grad():
        assert torch.equal(gm(x), gf(x)[-1]) and gm(x).shape == model(x).shape
    report = gm.fxeff_report
    macs = glance.step_macs(gf.eval(), x)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x[:1])
    assert report.model_macs_before == counter.get_total_flops() // 2 and report.model_macs_after == sum(macs)
    assert "the heads and the learned policy start untrained" in " ".join(report.notes)
    # as a dict (torch.compile options, JSON)
    config = fxeff.config_from_dict({"pass": "glance", "patch_size": 24, "policy": "ppo"})
    assert config == fxeff.Glance(patch_size=24, policy="ppo") and config.to_dict()["pass"] == "glance"
    for bad, match in [({"patch_size": 0}, "patch_size must be an int >= 1"), ({"head": "lstm"}, "head must be"),
                       ({"policy": "greedy"}, "policy must be one of"), ({"glance_size": 1.5}, "glance_size"),
                       ({"saliency": "grad"}, "saliency must be one of")]:
        with pytest.raises(ValueError, match=match):
            fxeff.Glance(**bad)
    with pytest.raises(ValueError, match=r"patch_size must be an int in \[1, 64\]"):
        fxeff.transform(model, x, [fxeff.Glance(patch_size=65)])


def test_the_exported_parts_reproduce_early_exit_on_any_batch(trained, tmp_path):
    model, x = trained
    for head, policy in [("gru", "saliency"), ("concat", "learned"), ("gru", "ppo")]:
        torch.manual_seed(0)
        gf = glance.GlanceFocus(model, x, patch_size=32, steps=3, head=head, policy=policy).eval()
        parts = glance.export_parts(gf, x[:4], directory=str(tmp_path / policy))
        want = {"glance", "local", "classify_1", "classify_2"} | ({"policy"} if policy == "saliency" else set())
        assert set(parts.programs) == want
        assert sorted(p.name for p in (tmp_path / policy).iterdir()) == sorted(f"{n}.pt2" for n in want)
        macs = glance.step_macs(gf, x)
        with torch.no_grad():
            every = gf(x)
        confidence = torch.softmax(every, dim=2).amax(dim=2)
        values = [float(torch.sort(confidence[t]).values[8:10].mean()) for t in range(2)]  # between two images
        thresholds = glance.Thresholds(values + [-float("inf")], glance.inference.fingerprint(gf), [], 0.0, 1.0)
        for batch in (x, x[:1], x[:7]):  # other batch sizes than the example's 4
            eager = glance.early_exit(gf, batch, thresholds, macs)
            exported = glance.run_parts(parts, batch, thresholds, macs)
            assert torch.equal(exported.step, eager.step) and torch.equal(exported.macs, eager.macs)
            torch.testing.assert_close(exported.logits, eager.logits, rtol=1e-5, atol=1e-5)
        # a saved part loads back and gives the same glance
        loaded = torch.export.load(str(tmp_path / policy / "glance.pt2")).module()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x)[0], gf.glance(x)["logits"])
    other = glance.Thresholds(values + [-float("inf")], "another model", [], 0.0, 1.0)
    with pytest.raises(ValueError, match="calibrated for another model"):
        glance.run_parts(parts, x, other, macs)
    with pytest.raises(NotImplementedError, match="random policy"):
        glance.export_parts(glance.GlanceFocus(model, x, patch_size=32, policy="random").eval(), x[:4])
    with pytest.raises(ValueError, match="at least 2 images"):
        glance.export_parts(gf, x[:1])
