"""Block-grained scaling (LegoDNN, fxeff.blocks): benchmarks by part (--parts, comma list).

Part "solve": the online optimiser. fxeff.blocks.select (an exact dynamic program in numpy, in-process) against
scipy.optimize.milp (HiGHS, in-process) on the same random instances: 10 blocks x 5 choices and 20 x 8, both
budgets, each without and with switching cost (``current`` drawn at random, 0.02 points per MiB loaded). A block's
choice j is a pruned descendant: faster and smaller than choice 0 and with a larger accuracy drop, with noise.
Budgets are drawn uniformly between the smallest and the largest achievable totals, latency and memory
independently, so some instances cannot meet both (select raises InfeasibleBudgetError, milp reports
infeasible: they count as agreeing when both say so). Each instance is solved once by each, in turn, timed with
time.perf_counter from the list of Choices (milp's time includes building its matrices); median and p99 per row.
A mismatch: the optima differ by more than 1e-6, or one finds a configuration where the other says there is none.
scipy issue #24141 (milp can return an infeasible answer as optimal): milp's answer is checked against the budgets
(1e-12 relative on latency, exact on memory) and an instance where it fails is counted and not compared.
The seed (LegoDNN) shells out to a CBC solver, ~0.32 s per solve (not measured here). Targets: select's p99
<= 5 ms at 10 x 5 and <= 50 ms at 20 x 8. CPU only (--device is not used).

    .venv/bin/python benchmarks/blocks.py [--parts solve] [--instances 200] [--seed 0] [--json out.json]
        [--markdown out.md]
"""
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fxeff.bench import environment, report, script_parser, write_markdown  # noqa: E402

from fxeff.blocks.select import Choice, InfeasibleBudgetError, select  # noqa: E402

SOLVE_COLUMNS = ["blocks x choices", "switching", "instances", "feasible", "select median ms", "select p99 ms",
                 "milp median ms", "milp p99 ms", "milp / select (median)", "mismatches", "milp infeasible answers",
                 "target p99 ms", "target met"]
SHAPES = [(10, 5, 5.0), (20, 8, 50.0)]  # blocks, choices, select's p99 target in ms
SWITCH_WEIGHT = 0.02  # points per MiB loaded
MIB = 2 ** 20


def instance(rng, n_blocks, n_choices, switching):
    """Random blocks (choice 0 unpruned; later choices faster, smaller, worse), budgets and select's keywords."""
    base_latency, base_memory = float(rng.uniform(1e-3, 3e-3)), int(rng.integers(1 << 20, 8 << 20))
    l0 = rng.uniform(1e-3, 10e-3, n_blocks)
    m0 = rng.integers(1 << 20, 50 << 20, n_blocks)
    s = np.sort(rng.uniform(0, 0.9, (n_blocks, n_choices)), axis=1)
    s[:, 0] = 0
    lat = l0[:, None] * (1 - s * rng.uniform(0.5, 1.0, s.shape)) + rng.uniform(0, 2e-4, s.shape)
    mem = (m0[:, None] * (1 - s * rng.uniform(0.6, 1.0, s.shape))).astype(np.int64)
    drop = s ** 2 * rng.uniform(0, 6, (n_blocks, 1)) + rng.normal(0, 0.05, s.shape)
    drop[:, 0] = rng.normal(0, 0.01, n_blocks)
    params = (mem * rng.uniform(0.3, 0.7, s.shape)).astype(np.int64)
    blocks = [[Choice(float(drop[b, j]), float(lat[b, j]), int(mem[b, j]), int(params[b, j]))
               for j in range(n_choices)] for b in range(n_blocks)]
    latency = base_latency + float(rng.uniform(lat.min(1).sum(), lat.max(1).sum()))
    memory = base_memory + int(rng.uniform(mem.min(1).sum(), mem.max(1).sum()))
    kw = {"base_latency": base_latency, "base_memory": base_memory}
    if switching:
        kw.update(current=[int(v) for v in rng.integers(0, n_choices, n_blocks)], switch_weight=SWITCH_WEIGHT)
    return blocks, latency, memory, kw


def milp_solve(blocks, latency, memory, base_latency=0.0, base_memory=0, current=None, switch_weight=0.0):
    """scipy.optimize.milp: binary x[b, j], one choice per block, the two budgets (rows normalised by them).
    Returns a choice tuple, or None when milp finds the problem infeasible."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    sizes = [len(b) for b in blocks]
    start = np.cumsum([0] + sizes)
    flat = [c for b in blocks for c in b]
    cost = np.array([c.drop for c in flat])
    if current is not None and switch_weight:
        for b, j in enumerate(current):
            load = np.array([0 if k == j else c.load_bytes for k, c in enumerate(blocks[b])], dtype=np.float64)
            cost[start[b]:start[b + 1]] += switch_weight * load / MIB
    one = np.zeros((len(blocks), len(flat)))
    for b in range(len(blocks)):
        one[b, start[b]:start[b + 1]] = 1
    rows = [LinearConstraint(one, 1, 1),
            LinearConstraint([[c.latency / (latency - base_latency) for c in flat]], -np.inf, 1),
            LinearConstraint([[c.memory / (memory - base_memory) for c in flat]], -np.inf, 1)]
    res = milp(cost, constraints=rows, integrality=np.ones(len(flat)), bounds=Bounds(0, 1),
               options={"mip_rel_gap": 0})
    if res.x is None:
        if res.status != 2:
            raise RuntimeError(f"blocks.py: milp failed: {res.message}")
        return None
    return tuple(int(np.argmax(res.x[start[b]:start[b + 1]])) for b in range(len(blocks)))


def evaluate(blocks, choice, latency, memory, base_latency=0.0, base_memory=0, current=None, switch_weight=0.0):
    """(objective, fits the budgets) of a configuration, floats summed in block order."""
    lat, mem, drop, switch = base_latency, base_memory, 0.0, 0
    for b, j in enumerate(choice):
        c = blocks[b][j]
        lat += c.latency
        mem += c.memory
        drop += c.drop
        if current is not None and j != current[b]:
            switch += c.load_bytes
    return drop + switch_weight * switch / MIB, lat <= latency * (1 + 1e-12) and mem <= memory


def solve_part(args):
    rows = []
    for n_blocks, n_choices, target in SHAPES:
        for switching in (False, True):
            rng = np.random.default_rng([args.seed, n_blocks, n_choices, switching])
            cases = [instance(rng, n_blocks, n_choices, switching) for _ in range(args.instances)]
            for blocks, latency, memory, kw in cases[:3]:  # warm-up (imports, caches)
                try:
                    select(blocks, latency, memory, **kw)
                except InfeasibleBudgetError:
                    pass
                milp_solve(blocks, latency, memory, **kw)
            t_select, t_milp = [], []
            feasible = mismatches = skipped = 0
            for i, (blocks, latency, memory, kw) in enumerate(cases):
                def run_select():
                    try:
                        return select(blocks, latency, memory, **kw)
                    except InfeasibleBudgetError:
                        return None

                def run_milp():
                    return milp_solve(blocks, latency, memory, **kw)

                out = {}
                turns = [("select", run_select, t_select), ("milp", run_milp, t_milp)]
                for name, fn, times in turns[::-1] if i % 2 else turns:  # each goes first in half the instances
                    start = time.perf_counter()
                    out[name] = fn()
                    times.append(time.perf_counter() - start)
                ours, theirs = out["select"], out["milp"]
                feasible += ours is not None
                if theirs is None or ours is None:
                    mismatches += (theirs is None) != (ours is None)
                    continue
                objective, fits = evaluate(blocks, theirs, latency, memory, **kw)
                if not fits:  # scipy #24141
                    skipped += 1
                elif abs(objective - ours.objective) > 1e-6:
                    mismatches += 1
            ms_s, ms_m = 1e3 * np.array(t_select), 1e3 * np.array(t_milp)
            p99 = float(np.percentile(ms_s, 99))
            rows.append({"blocks x choices": f"{n_blocks} x {n_choices}", "switching": switching,
                         "instances": len(cases), "feasible": feasible, "select median ms": float(np.median(ms_s)),
                         "select p99 ms": p99, "milp median ms": float(np.median(ms_m)),
                         "milp p99 ms": float(np.percentile(ms_m, 99)),
                         "milp / select (median)": float(np.median(ms_m) / np.median(ms_s)),
                         "mismatches": mismatches, "milp infeasible answers": skipped, "target p99 ms": target,
                         "target met": p99 <= target})
            print(f"{n_blocks} x {n_choices} switching={switching}: select median {rows[-1]['select median ms']:.2f} "
                  f"ms, p99 {p99:.2f}; milp median {rows[-1]['milp median ms']:.1f} ms; mismatches {mismatches}",
                  flush=True)
    title = (f"Block selection: fxeff.blocks.select (exact DP, numpy) vs scipy.optimize.milp (HiGHS), both budgets, "
             f"{args.instances} random instances per row, per-solve times")
    return title, rows, SOLVE_COLUMNS


PARTS = {"solve": solve_part}


def main(argv=None):
    parser = script_parser(__doc__)
    parser.add_argument("--parts", default="solve", help=f"comma list of: {', '.join(PARTS)}")
    parser.add_argument("--instances", type=int, default=200, help="random instances per row (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    for p in parts:
        if p not in PARTS:
            parser.error(f"--parts takes {', '.join(PARTS)}; got {p!r}")
    torch.set_num_threads(args.threads)
    texts, results = [], {}
    for p in parts:
        title, rows, columns = PARTS[p](args)
        texts.append(report(title, rows, columns))
        results[p] = {"title": title, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "parts": results}, f, indent=1)
    write_markdown(args.markdown, "\n\n".join(texts))


if __name__ == "__main__":
    main()
