"""ScalableModel: build (blocks, descendants, retraining, profile), select, scale in place, series, the artifact."""
import copy

import numpy as np
import pytest
import torch

import fxeff
import fxeff.blocks as blocks
from fxeff import reference
from fxeff.blocks.select import TIE, InfeasibleBudgetError
from fxeff.nn import NarrowConv2d
from fxeff.ops.focused_conv2d import direct_strategy_available

DATASET = "cluttered-fashion-mnist"


@pytest.fixture(scope="module")
def built():
    torch.manual_seed(0)
    model = reference.load("resnet20", DATASET).eval()
    train = torch.utils.data.DataLoader(reference.dataset(DATASET, "train", limit=64), batch_size=32)
    test = torch.utils.data.DataLoader(reference.dataset(DATASET, "test", limit=64), batch_size=32)
    scalable = blocks.build(model, train, test, sparsities=(0.0, 0.4, 0.8), epochs=1, progress=False,
                            data=f"{DATASET}: 64 train / 64 test images")
    return model, scalable, test


def images(n=8):
    return reference.first_images(DATASET, "test", n)


def test_build_starts_as_the_original_model(built):
    model, scalable, _ = built
    assert scalable.configuration == {name: 0.0 for name in scalable.block_names}
    with torch.no_grad():  # the blocks' BatchNorms folded into their convs (fold_batchnorm): equal to rounding
        torch.testing.assert_close(scalable(images()), model(images()), rtol=1e-4, atol=1e-4)
    # none left, the stem's included: a block boundary never parts a conv from its BatchNorm, so the stem's folds
    # outside the blocks
    assert not [m for m in scalable.gm.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert not [m for by_sparsity in scalable._modules_by_block.values() for student in by_sparsity.values()
                for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert scalable.meta["settings"]["sparsities"] == [0.0, 0.4, 0.8]
    for name, by_sparsity in scalable.meta["mse"].items():  # retraining lowered every descendant's block MSE
        for key, (before, after) in by_sparsity.items():
            assert after <= before if key == "0" else after < before, (name, key, before, after)


def test_a_swap_equals_a_static_build_bit_for_bit(built):
    _, scalable, _ = built
    rng = torch.Generator().manual_seed(1)
    for _ in range(5):
        choice = tuple(int(torch.randint(len(scalable.sparsities(n)), (1,), generator=rng))
                       for n in scalable.block_names)
        static = scalable.static(choice)
        scalable.scale(choice)
        with torch.no_grad():
            assert torch.equal(scalable(images()), static(images()))
        assert scalable.last_swap_seconds < 0.005 * len(scalable.block_names)
    scalable.scale({name: 0.0 for name in scalable.block_names})


def test_select_meets_the_budgets_and_scale_applies_it(built):
    _, scalable, _ = built
    front = scalable.series()
    assert len(front) >= 3
    assert [s.latency for s in front] == sorted(s.latency for s in front)
    assert all(a.drop > b.drop for a, b in zip(front, front[1:]))  # faster costs accuracy along the front
    middle = front[len(front) // 2]
    chosen = scalable.select(latency=middle.latency)
    assert chosen.feasible and chosen.latency <= middle.latency * (1 + 1e-9) and chosen.drop <= middle.drop + 1e-9
    choice = scalable.scale(latency=middle.latency)
    assert choice == chosen.choice
    assert scalable.configuration == {n: scalable.sparsities(n)[i] for n, i in zip(scalable.block_names, choice)}
    scalable.scale([0] * len(scalable.block_names))


def _mixed_brute_force(scalable, rows, base, known, current=None, switch_weight=0.0):
    """Every configuration (numpy): choice indices, latency, memory, objective, where a configuration measured
    whole counts by its measured drop (``known``: choice -> summed drop) and the others by the additive model."""

    index = np.indices([len(r) for r in rows]).reshape(len(rows), -1).T
    pick = lambda field: sum(np.array([getattr(c, field) for c in row])[index[:, b]]  # noqa: E731
                             for b, row in enumerate(rows))
    latency = base.get("base_latency", 0.0) + pick("latency")
    memory = base.get("base_memory", 0) + pick("memory")
    drop = pick("drop")
    for choice, summed in known.items():
        drop[np.all(index == np.array(choice), axis=1)] = summed
    if current is not None:
        loads = sum(np.array([c.load_bytes * (k != current[b]) for k, c in enumerate(row)])[index[:, b]]
                    for b, row in enumerate(rows))
        drop = drop + switch_weight * loads / 2 ** 20
    return index, latency, memory, drop


def test_configurations_measured_whole_count_by_their_measured_drops(built):
    """The profile measured every block at each sparsity and 16 random configurations whole; the optimiser and the
    front weigh those by their measured drops, the others by the additive model: select, select_macs and series
    are that mixed objective's exact optima, checked against brute force over all 3^9 configurations, with the
    measured drops as profiled and with some made to win and some to lose against the model."""
    import dataclasses

    _, scalable, _ = built
    prof = scalable.profile
    # every block at 0.4 and at 0.8, then 16 random ones (build measures no front by default)
    assert len(prof.configurations) == 2 + 16 and "front_measured" not in scalable.meta
    assert [c for c, _, _ in prof.configurations[:2]] == [{n: s for n in scalable.block_names} for s in (0.4, 0.8)]
    for (config, drop, error), (choice, summed) in zip(prof.configurations, scalable._known()):
        assert scalable.modelled_accuracy(choice) == pytest.approx(prof.accuracy - max(drop, error))
        assert prof.modelled_drop(summed) == pytest.approx(max(drop, error))
    # every block at 0.8 measured nearly free; the additive optimum at a middle budget measured poor
    middle = scalable.series()[len(scalable.series()) // 2]
    poor = {n: scalable.sparsities(n)[i] for n, i in zip(scalable.block_names, middle.choice)}
    edited = dataclasses.replace(prof, configurations=[[prof.configurations[1][0], 0.05, 0.01], [poor, 50.0, 1.0]] +
                                 prof.configurations[2:])
    students = {n: {s: m for s, m in by.items() if s} for n, by in scalable._modules_by_block.items()}
    scalable.scale([0] * len(scalable.block_names))
    variants = [scalable, blocks.ScalableModel(scalable.gm, students, edited, scalable.meta)]
    for variant in variants:
        known = dict(variant._known())
        rows, base = variant.choices(), variant._budget_kwargs()
        index, latency, memory, objective = _mixed_brute_force(variant, rows, base, known)
        for budget in np.linspace(latency.min(), latency.max(), 9):
            got = variant.select(latency=float(budget))
            fits = latency <= budget * (1 + 1e-12)
            assert got.objective == pytest.approx(objective[fits].min(), abs=1e-9)
            assert got.latency <= budget * (1 + 1e-12)
        current = tuple(int(i) for i in index[len(index) // 3])
        _, latency_s, _, objective_s = _mixed_brute_force(variant, rows, base, known, current, 0.5)
        for budget in np.linspace(latency.min(), latency.max(), 5):
            got = variant._best(rows, base, float(budget), None, current, 0.5)
            assert got.objective == pytest.approx(objective_s[latency_s <= budget * (1 + 1e-12)].min(), abs=1e-9)
        # the front: brute force's non-dominated (latency, objective) points
        order = np.lexsort((objective, latency))
        want, best = [], np.inf
        for i in order:
            if objective[i] < best - TIE:
                want.append((latency[i], objective[i]))
                best = objective[i]
        front = variant.series()
        assert [(pytest.approx(a), pytest.approx(b, abs=1e-9)) for a, b in want] == \
            [(s.latency, s.drop) for s in front]
        # at MACs
        rows_m, base_m = variant.macs_choices()
        _, macs, _, objective_m = _mixed_brute_force(variant, rows_m, {"base_latency": base_m}, known)
        half = variant.select_macs(prof.macs / 2)
        assert half.objective == pytest.approx(objective_m[macs <= prof.macs / 2 * (1 + 1e-12)].min(), abs=1e-9)
    # the edits took effect: the nearly free configuration is chosen at its latency, the poor one never
    edited_model = variants[1]
    cheap = tuple(s.choice for s in edited_model.series())
    every_08 = tuple(len(edited_model.sparsities(n)) - 1 for n in edited_model.block_names)
    assert every_08 in cheap and middle.choice not in cheap


def test_measure_front_measures_the_configurations_the_fronts_choose(built):
    from fxeff.training import accuracy

    model, scalable, test = built
    before = len(scalable.profile.configurations)
    names = scalable.block_names
    scalable.scale([1] * len(names))
    places = {s.choice for by in ("latency", "macs") for s in scalable.series(max_points=12, by=by)}
    known = {c for c, _ in scalable._known()}
    added = scalable.measure_front(test, points=12, rounds=1)
    assert scalable._current == tuple([1] * len(names))  # the running configuration is restored
    new = scalable.profile.configurations[before:]
    assert added == len(new) == len(places - known - {tuple([0] * len(names))}) > 0
    config, drop, error = new[0]
    choice = tuple(scalable.sparsities(n).index(config[n]) for n in names)
    assert choice in places
    unpruned = 100 * accuracy(scalable.static([0] * len(names)), test)
    assert drop == pytest.approx(unpruned - 100 * accuracy(scalable.static(choice), test), abs=1e-9)
    assert 0 <= error and scalable.modelled_accuracy(choice) == pytest.approx(scalable.profile.accuracy -
                                                                             max(drop, error))
    del scalable.profile.configurations[before:]  # as the other tests expect it
    scalable.scale([0] * len(names))


def test_infeasible_budgets_name_the_binding_budget(built):
    _, scalable, _ = built
    fastest = scalable.series()[0]
    with pytest.raises(InfeasibleBudgetError) as info:
        scalable.select(latency=fastest.latency * 0.5)
    assert info.value.binding == ("latency",) and not info.value.closest.feasible
    with pytest.raises(ValueError, match="give a configuration or a budget"):
        scalable.scale()
    with pytest.raises(ValueError, match="has no descendant at sparsity 0.5"):
        scalable.scale({scalable.block_names[0]: 0.5})


def test_switching_cost_keeps_the_current_configuration_when_it_is_worth_it(built):
    _, scalable, _ = built
    front = scalable.series()
    scalable.scale(front[0])  # the fastest
    loose = front[-1].latency * 2
    free = scalable.select(latency=loose)
    assert free.drop == pytest.approx(front[-1].drop)  # no switching cost: the most accurate configuration
    assert free.choice != front[0].choice
    costly = scalable.select(latency=loose, switch_weight=1e6)
    assert costly.choice == front[0].choice and costly.switch_bytes == 0
    scalable.scale([0] * len(scalable.block_names))


def test_the_artifact_round_trips_and_refuses_what_does_not_match(built, tmp_path):
    model, scalable, _ = built
    path = str(tmp_path / "resnet20.blocks.pt")
    scalable.save(path)
    data = torch.load(path, weights_only=True)  # plain tensors and containers only
    assert data["torch"] == torch.__version__ and data["meta"]["data"].startswith(DATASET)
    loaded = blocks.load(path, model, images(2))
    assert loaded.block_names == scalable.block_names
    assert loaded.profile == scalable.profile
    choice = tuple(len(scalable.sparsities(n)) - 1 for n in scalable.block_names)
    scalable.scale(choice)
    loaded.scale(choice)
    with torch.no_grad():
        assert torch.equal(loaded(images()), scalable(images()))
    scalable.scale([0] * len(scalable.block_names))
    # another model, or the same with other weights
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.fc.weight.add_(1.0)
    with pytest.raises(ValueError, match="was built from another model"):
        blocks.load(path, other, images(2))
    # another torch version
    data["torch"] = "1.0.0"
    stale = str(tmp_path / "stale.pt")
    torch.save(data, stale)
    with pytest.raises(ValueError, match="was profiled with torch 1.0.0"):
        blocks.load(stale, model, images(2))
    # a damaged file
    damaged = str(tmp_path / "damaged.pt")
    with open(path, "rb") as f:
        payload = f.read()
    with open(damaged, "wb") as f:
        f.write(payload[: len(payload) // 2])
    with pytest.raises(ValueError, match="is not a readable artifact"):
        blocks.load(damaged, model, images(2))


def test_a_chosen_configuration_compiles(built):
    _, scalable, _ = built
    choice = tuple(1 if len(scalable.sparsities(n)) > 1 else 0 for n in scalable.block_names)
    scalable.scale(choice)
    try:
        with torch.no_grad():
            expected = scalable(images())
            compiled = torch.compile(scalable.gm, backend="effconv")
            torch.testing.assert_close(compiled(images()), expected, rtol=1e-4, atol=1e-4)
    finally:
        scalable.scale([0] * len(scalable.block_names))


def test_a_model_without_blocks_is_refused():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.randn(1, 1, 8, 8))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 1, 8, 8),
                                                                       torch.zeros(4, dtype=torch.long)), batch_size=2)
    with pytest.raises(ValueError, match="has no block to scale"):
        blocks.build(model, data, data, progress=False)
    assert fxeff.Blocks in fxeff.passes.registered_passes().values()


def test_the_command_line_builds_plots_and_selects(tmp_path, monkeypatch, capsys):
    from fxeff.cli import main

    monkeypatch.chdir(tmp_path)
    path = str(tmp_path / "r20.pt")
    assert main(["blocks", "build", "resnet20", DATASET, "--train-images", "64", "--test-images", "64", "--epochs",
                 "1", "--sparsities", "0,0.5", "--batch", "2", "--out", path]) == 0
    out = capsys.readouterr().out
    assert "9 blocks" in out and "Pareto front:" in out and (tmp_path / "r20.png").stat().st_size > 10000
    assert (tmp_path / "out" / "blocks" / "LAST").read_text() == path
    assert main(["blocks", "select", "--latency-ms", "1000", "--measure", "--test-images", "64"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("chosen: modelled accuracy") and "measured: accuracy" in out
    assert main(["blocks", "select", "--artifact", path, "--latency-ms", "0.001"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("infeasible:") and "closest:" in out


def test_a_chosen_configuration_exports_and_traces(built, tmp_path):
    from fxeff import export

    _, scalable, _ = built
    choice = tuple(len(scalable.sparsities(n)) - 1 for n in scalable.block_names)
    scalable.scale(choice)
    try:
        x = images(4)
        with torch.no_grad():
            expected = scalable(x)
        # the pruned convs are fxeff::narrow_conv2d calls where the CPU has AVX-512 (else plain convs)
        narrow = direct_strategy_available()
        assert narrow == any(isinstance(m, NarrowConv2d) for m in scalable.gm.modules())
        program = export.export(scalable.gm, (x,), str(tmp_path / "r20.pt2"), require_fxeff_ops=narrow,
                                dynamic_shapes=export.batch_dynamic_shapes((x,)))
        loaded = export.load_exported(str(tmp_path / "r20.pt2"))
        with torch.no_grad():
            torch.testing.assert_close(loaded.module()(x), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(program.module()(x[:2]), expected[:2], rtol=1e-5, atol=1e-5)
        export.trace(scalable.gm, (x,), str(tmp_path / "r20.ts"), require_fxeff_ops=narrow)
        with torch.no_grad():
            torch.testing.assert_close(export.load_traced(str(tmp_path / "r20.ts"))(x), expected, rtol=1e-5,
                                       atol=1e-5)
    finally:
        scalable.scale([0] * len(scalable.block_names))
