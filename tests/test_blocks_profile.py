"""Profiles of block descendants: accuracy drops by suffix evaluation (equal to swapping the block in the whole
model), sizes, MACs, peak activation memory, latency."""
import itertools

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxeff
from fxeff import reference
from fxeff.blocks.descendants import descendants
from fxeff.blocks.profile import accuracy_drops, peak_activation_bytes, profile, top1
from fxeff.blocks.retrain import block_inputs, configured

DATASET = "cluttered-fashion-mnist"


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = reference.load("resnet20", DATASET).eval()
    test = reference.dataset(DATASET, "test", limit=96)
    loader = torch.utils.data.DataLoader(test, batch_size=32)
    x = next(iter(loader))[0]
    gm = fxeff.transform(model, x[:2], [fxeff.Blocks()])
    inputs = block_inputs(gm, x[:2])
    students = {b["name"]: descendants(gm.get_submodule(b["name"]), inputs[b["name"]], b["prunable"],
                                       sparsities=(0.0, 0.4, 0.8))
                for b in gm.fxeff_blocks if b["name"] in ("block_0", "block_4", "block_8")}
    return model, gm, loader, students


def whole_model_accuracy(gm, loader, name=None, module=None):
    original = getattr(gm, name) if name else None
    if name:
        setattr(gm, name, module)
    try:
        correct = count = 0
        with torch.no_grad():
            for batch in loader:
                correct += float(top1(gm(batch[0]), batch).sum())
                count += batch[0].shape[0]
    finally:
        if name:
            setattr(gm, name, original)
    return 100.0 * correct / count


def test_drops_by_suffix_equal_swapping_the_block_in_the_whole_model(setup):
    _, gm, loader, students = setup
    accuracy, drops, errors, spent, seed = accuracy_drops(gm, students, loader, progress=False)
    assert accuracy == pytest.approx(whole_model_accuracy(gm, loader))
    for name, by_sparsity in students.items():
        assert drops[name][0.0] == 0.0
        for sparsity, module in by_sparsity.items():
            if sparsity:
                swapped = whole_model_accuracy(gm, loader, name, module)
                assert drops[name][sparsity] == pytest.approx(accuracy - swapped, abs=1e-9), (name, sparsity)
    # the standard error of each drop: sqrt(var(per-sample differences) / n), here with 0/1 scores
    name = "block_0"
    assert errors[name][0.0] == 0.0
    with torch.no_grad():
        reference_scores = torch.cat([top1(gm(b[0]), b) for b in loader])
        original = getattr(gm, name)
        setattr(gm, name, students[name][0.8])
        try:
            swapped_scores = torch.cat([top1(gm(b[0]), b) for b in loader])
        finally:
            setattr(gm, name, original)
    differences = (reference_scores - swapped_scores).double()
    expected = 100 * float(differences.std() / differences.numel() ** 0.5)
    assert expected > 0 and errors[name][0.8] == pytest.approx(expected, rel=1e-9)
    # untrained descendants at 80% lose accuracy somewhere: the comparison above is not vacuous
    assert max(drops[name][0.8] for name in students) > 1.0
    # one whole pass per batch plus each entry's suffix, against the seed's three whole passes per entry
    assert 0 < spent < seed / 3


def test_profile_entries(setup):
    _, gm, loader, students = setup
    result = profile(gm, students, loader, batch=1, runs=5, progress=False)
    table = result.table()
    # every block has its own entry (sparsity 0: the block itself, every configuration's fallback)
    assert set(table) == {b["name"] for b in gm.fxeff_blocks}
    assert all(sorted(table[name]) == [0.0] for name in set(table) - set(students))
    for name, by_sparsity in ((n, table[n]) for n in students):
        assert sorted(by_sparsity) == [0.0, 0.4, 0.8]
        sizes = [by_sparsity[s] for s in (0.0, 0.4, 0.8)]
        assert sizes[0].param_bytes > sizes[1].param_bytes > sizes[2].param_bytes > 0
        assert sizes[0].macs > sizes[1].macs > sizes[2].macs > 0
        assert all(e.latency > 0 and e.peak_activation_bytes > 0 for e in sizes)
        assert sizes[0].peak_activation_bytes >= sizes[2].peak_activation_bytes
    assert 0 <= result.base_latency < result.latency  # 0 where the fit falls back and t < x (fit_latency)
    # the latency model's calibration: the unpruned model and 16 random configurations timed whole
    assert len(result.latency_calibration) == 17 and result.latency_scale > 0
    from fxeff.blocks.profile import fit_latency

    x0, t0 = result.latency_calibration[0]
    base, scale = fit_latency((x0, t0), result.latency_calibration[1:])  # the entries carry the fitted line
    assert (result.base_latency, result.latency_scale) == (base, scale)
    unpruned = result.base_latency + sum(table[name][0.0].latency for name in table)
    assert unpruned == pytest.approx(base + scale * x0, rel=1e-9)
    assert result.macs > sum(table[name][0.0].macs for name in table)
    assert 0 < result.accuracy <= 100


def test_peak_activation_bytes_follows_liveness():
    class Net(nn.Module):
        def forward(self, x):
            a = x * 2        # x (4 KiB) and a alive
            b = a + 1        # a dies after b: x, a, b alive at b
            c = torch.cat([b, b], 1)  # b and c (8 KiB) alive, x still read below
            return c.sum() + x.sum()

    gm = fx.symbolic_trace(Net())
    x = torch.randn(1, 4, 16, 16)  # 4 KiB
    kib = 4 * 16 * 16 * 4
    # at c: x (1), b (1), c (2) alive; a died at b
    assert peak_activation_bytes(gm, x) == 4 * kib


def test_students_of_unknown_blocks_are_refused(setup):
    _, gm, loader, students = setup
    with pytest.raises(ValueError, match="not blocks of the graph"):
        profile(gm, {"block_99": students["block_0"]}, loader, progress=False)


def test_the_interaction_is_the_least_squares_fit():
    from fxeff.blocks.profile import Profile, fit_interaction

    points = [(1.0, 1.2), (2.0, 2.8), (4.0, 7.2)]  # m = x + 0.2 x^2 exactly
    assert fit_interaction(points) == pytest.approx(0.2)
    assert fit_interaction([(2.0, 1.0)]) == 0.0  # never below additive
    assert fit_interaction([]) == 0.0
    profile_ = Profile([], 90.0, 1.0, 0.5, 0, 1, 1, 1, 3, interaction=0.2)
    assert profile_.modelled_drop(4.0) == pytest.approx(7.2) and profile_.modelled_drop(-1.0) == 0.0


def test_the_offsets_are_the_ridge_fit_per_sparsity():
    from fxeff.blocks.profile import fit_accuracy, fit_offsets

    # residuals made by offsets 0.5 at 0.2 and 1.5 at 0.8 exactly: with a tiny ridge, those come back
    rows = [({0.2: 2, 0.8: 1}, 2.5), ({0.2: 1, 0.8: 2}, 3.5), ({0.2: 3}, 1.5), ({0.0: 2, 0.8: 1}, 1.5)]
    offsets = fit_offsets(rows, ridge=1e-9)
    assert offsets[0.2] == pytest.approx(0.5) and offsets[0.8] == pytest.approx(1.5) and 0.0 not in offsets
    shrunk = fit_offsets(rows, ridge=10.0)  # the ridge pulls them toward 0 (few configurations: noisy residuals)
    assert 0 < shrunk[0.2] < 0.5 and 0 < shrunk[0.8] < 1.5
    assert fit_offsets([]) == {}
    # the whole fit: blocks a, b with drops at 0.8 of 1.0 (no error), measured drops of configurations
    drops, errors = {"a": {0.0: 0.0, 0.8: 1.0}, "b": {0.0: 0.0, 0.8: 1.0}}, {"a": {0.8: 0.0}, "b": {0.8: 0.0}}
    levels, c, points = fit_accuracy([({"a": 0.8, "b": 0.0}, 1.0, 0.1), ({"a": 0.8, "b": 0.8}, 2.0, 0.1)], drops,
                                     errors)
    assert levels == [[0.8, pytest.approx(0.0)]] and c == pytest.approx(0.0)
    assert points == [[pytest.approx(1.0), 1.0], [pytest.approx(2.0), 2.0]]


def test_profile_calibrates_on_configurations_measured_whole(setup):
    _, gm, loader, students = setup
    result = profile(gm, students, loader, batch=1, runs=3, progress=False, calibration=4)
    # measured: every block at 0.4, every block at 0.8, then the 4 random configurations; the model is fitted on
    # the random ones
    assert len(result.calibration) == 4 and len(result.configurations) == 6 and result.interaction >= 0.0
    assert [c for c, _, _ in result.configurations[:2]] == [{n: s for n in students} for s in (0.4, 0.8)]
    for (summed, measured), (choice, drop, error) in zip(result.calibration, result.configurations[2:]):
        assert measured == drop and error >= 0
    # a measured configuration's drop, checked against swapping it into the whole model and evaluating it
    choice, drop, error = result.configurations[1]
    with configured(gm, students) as apply, torch.no_grad():
        reference_scores = torch.cat([top1(gm(x), (x, y)) for x, y in loader]).double()
        apply(choice)
        scores = torch.cat([top1(gm(x), (x, y)) for x, y in loader]).double()
    difference = reference_scores - scores
    assert drop == pytest.approx(100 * float(difference.mean()))
    assert error == pytest.approx(100 * float(difference.std()) / len(difference) ** 0.5)
    assert result.measured()[1] == (choice, max(drop, error))
    assert [s for s, _ in result.level_offsets] == [0.4, 0.8]
    table = result.table()
    for summed, measured in result.calibration:  # each point's x is a sum of the entries' modelled drops
        assert any(abs(summed - sum(choice)) < 1e-9 for choice in itertools.product(
            *[[result.entry_drop(table[n][s]) for s in sorted(table[n])] for n in students]))
        assert -100.0 < measured < 100.0
    offsets = dict((s, d) for s, d in result.level_offsets)
    for name in students:  # an entry's modelled drop: pessimistic, plus its sparsity's offset, at least its error
        e = table[name][0.8]
        assert result.entry_drop(e) == max(max(e.drop + e.drop_se, 0.0) + offsets[0.8], e.drop_se)
        assert e.drop_se > 0 and result.entry_drop(e) > 0  # it differs from its block: never free
        assert result.entry_drop(table[name][0.0]) == 0.0
    # gm is restored: the blocks are the original ones
    assert all(getattr(gm, name) is not students[name].get(0.4) for name in students)


def test_fit_latency_is_a_robust_line_and_falls_back_on_noise():
    from fxeff.blocks.profile import fit_latency

    whole = (4.0, 5.0)  # summed isolated timings 4, measured whole 5
    a, b = fit_latency(whole, [(2.0, 2.6), (3.0, 3.8), (1.0, 1.4)])  # exactly t = 0.2 + 1.2 x
    assert a == pytest.approx(0.2) and b == pytest.approx(1.2)
    # one point timed while the machine was busy (the unpruned one here) does not move the line
    points = [(1.0, 1.4), (1.5, 2.0), (2.0, 2.6), (2.5, 3.2), (3.0, 3.8), (3.5, 4.4)]
    a, b = fit_latency((4.0, 6.0), points)
    assert a == pytest.approx(0.2) and b == pytest.approx(1.2)
    assert fit_latency(whole, []) == (1.0, 1.0)  # no calibration: the plain additive model
    assert fit_latency(whole, [(2.0, 5.5)]) == (1.0, 1.0)  # a slope <= 0 is noise: the additive model
    assert fit_latency((4.0, 3.0), []) == (0.0, 1.0)  # never a negative base
