"""One descendant per block within latency and memory budgets: LegoDNN's online optimiser, exact and in-process.

The model is cut into blocks; block b offers choices (descendants) j with an accuracy drop, a latency, a memory
(parameter + peak activation bytes) and the bytes to load to switch to it. Drop, latency and memory add up over
blocks (plus a fixed ``base_latency`` / ``base_memory`` for the rest of the model). ``select`` picks one choice per
block minimising drop + ``switch_weight`` x (MiB loaded to switch from ``current``) within the budgets: a
multiple-choice knapsack with two constraints. ``pareto_front`` lists the configurations on the latency / drop
front (what ``series`` walks along).

Method: a dynamic program over the blocks in order. A state is a choice prefix with its summed latency, memory and
objective; extending by block b multiplies the states by its choices, then three exact prunings cut them back:

- budgets: a state whose latency plus the smallest latency of the remaining blocks exceeds the budget (memory
  alike) cannot finish feasibly;
- dominance: a state with latency, memory and objective all >= another's is never better whatever follows (both
  get the same completions; with all three equal the lexicographically larger prefix goes); vectorised in numpy:
  sort by objective, then a staircase sweep over (latency, memory) in chunks;
- bound: a state whose objective plus a lower bound of what the remaining blocks add exceeds an upper bound of
  the optimum cannot reach it. The lower bound is the largest of LP relaxations of one-constraint knapsacks over
  the remaining blocks: the latency budget left, the memory budget left, and three mixes of the two normalised by
  the budgets (surrogate constraints; they bound far better when both budgets bind). Each is exact and cheap: the
  merged lower convex hulls of the blocks' (resource, objective) points, evaluated by interpolation.

The upper bound comes from a first pass of the same program keeping only the 32 best states per block by objective
+ bound (a beam), improved by a local search (the best change of one or two blocks that still fits, repeated); it
is usually the optimum itself, and the second, exact pass then keeps a handful of states per block. When the beam
finds nothing feasible, the smallest largest overshoot max(latency / L, memory / M) is found by the same program
over (latency, memory) alone: above 1 the budgets cannot be met (``InfeasibleBudgetError``, whose ``closest``
configuration is then the best objective at that overshoot); otherwise it gives the upper bound.

Exactness: nothing is discretised and every pruning is safe, so the result is the optimum of the numbers given,
ties broken by latency, then memory, then the lexicographically smallest choice tuple. Floats are compared as
summed in block order (base first; rounding can only matter between totals equal to ~1e-15); a budget is met when
the total is <= budget x (1 + 1e-12), and memory is summed exactly in integers. The problem is NP-hard and the
pass can blow up on adversarial instances; on profiled-like ones (benchmarks/blocks.py, 2 shared cores) a solve of
10 blocks x 5 choices with both budgets takes ~2 ms (p99 ~3 ms), 20 x 8 ~6 ms (p99 ~10 ms), HiGHS's milp on the
same instances ~7 and ~20 ms.

The seed (LegoDNN) shells out to a CBC solver process for every selection, ~0.32 s per solve (mostly the process
launch), and leaves the cost of switching blocks out of its objective; here switching is in the objective
(``switch_weight`` points per MiB loaded, 0 by default: LegoDNN's objective) and nothing leaves the process.
"""
import dataclasses
import math
import numbers
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["Choice", "Selection", "InfeasibleBudgetError", "select", "select_excluding", "pareto_front", "nondominated",
           "totals"]

_WHERE = "fxeff.blocks.select"
_RTOL = 1e-12  # a budget is met when total <= budget * (1 + _RTOL) (floats summed in block order)
_SLACK = 1e-9  # pruning tests are this much looser (relative), so rounding never prunes a state that could finish
_MIXES = (0.25, 0.5, 0.75)  # latency shares of the mixed surrogate constraints
_BEAM = 32  # states kept per block by the first, upper-bound pass
_PAIRS = 400  # the local search tries changes of two blocks while there are at most this many choices in all
_CHUNK = 256  # points per chunk of the staircase sweep (a chunk is checked against itself as a CHUNK^2 matrix)
_INT_LIMIT = 1 << 62  # summed memory / load bytes stay int64
_MIB = float(1 << 20)


@dataclasses.dataclass(frozen=True)
class Choice:
    """One descendant of a block: its accuracy drop (points; may be slightly negative), latency (seconds), memory
    (bytes: parameters + peak activations) and the bytes to load to switch the block to it (its parameter bytes)."""
    drop: float
    latency: float
    memory: int
    load_bytes: int = 0

    def __post_init__(self) -> None:
        for name in ("drop", "latency"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{_WHERE}: Choice.{name} must be a real number, got {type(v).__name__} {v!r}")
            if not math.isfinite(v):
                raise ValueError(f"{_WHERE}: Choice.{name} must be finite, got {v!r}")
        if self.latency < 0:
            raise ValueError(f"{_WHERE}: Choice.latency must be >= 0 seconds, got {self.latency!r}")
        for name in ("memory", "load_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"{_WHERE}: Choice.{name} must be an int (bytes), got {type(v).__name__} {v!r}")
            if v < 0:
                raise ValueError(f"{_WHERE}: Choice.{name} must be >= 0 bytes, got {v!r}")
        # plain Python numbers (a numpy float32 would sum differently from the float64 the search uses)
        for name, kind in (("drop", float), ("latency", float), ("memory", int), ("load_bytes", int)):
            object.__setattr__(self, name, kind(getattr(self, name)))


@dataclasses.dataclass(frozen=True)
class Selection:
    """A configuration (one choice index per block) and its totals. ``objective`` = ``drop`` + switch_weight x
    ``switch_bytes`` / 2**20. ``binding``: for a feasible selection, the budgets that some objective-lowering change of
    one block would break (empty when no budget costs anything); for an infeasible one, the budgets it exceeds."""
    choice: Tuple[int, ...]
    drop: float
    latency: float
    memory: int
    switch_bytes: int
    objective: float
    feasible: bool
    binding: Tuple[str, ...]


class InfeasibleBudgetError(ValueError):
    """No configuration meets the budgets. ``binding``: the budgets that cannot be met ("latency", "memory", or both
    when each alone can be met but not together); ``closest``: the configuration with the smallest largest relative
    overshoot max(latency / budget, memory / budget), ties by objective (``feasible`` False)."""

    def __init__(self, message: str, closest: Selection, binding: Tuple[str, ...]):
        super().__init__(message)
        self.closest = closest
        self.binding = binding


# ---------------------------------------------------------------------------------------------------------------
# validation and the arrays the search runs on


def _real(name: str, v: object, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{_WHERE}: {name} must be a real number, got {type(v).__name__} {v!r}")
    if math.isnan(v):
        raise ValueError(f"{_WHERE}: {name} must not be NaN")
    if positive and not v > 0:
        raise ValueError(f"{_WHERE}: {name} must be > 0 (or None for no budget), got {v!r}")
    if not positive and (v < 0 or math.isinf(v)):
        raise ValueError(f"{_WHERE}: {name} must be finite and >= 0, got {v!r}")
    return float(v)


class _Problem:
    """The blocks as numpy arrays, with per-choice objective costs and the suffix sums the prunings need."""

    def __init__(self, blocks: Sequence[Sequence[Choice]], base_latency: float, base_memory: int,
                 current: Optional[Sequence[int]], switch_weight: float):
        if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence):
            raise TypeError(f"{_WHERE}: blocks must be a sequence of blocks (sequences of Choice), "
                            f"got {type(blocks).__name__}")
        if len(blocks) == 0:
            raise ValueError(f"{_WHERE}: blocks is empty (need at least one block)")
        self.base_latency = _real("base_latency", base_latency)
        if isinstance(base_memory, bool) or not isinstance(base_memory, numbers.Integral):
            raise TypeError(f"{_WHERE}: base_memory must be an int (bytes), got {type(base_memory).__name__} "
                            f"{base_memory!r}")
        if base_memory < 0:
            raise ValueError(f"{_WHERE}: base_memory must be >= 0 bytes, got {base_memory!r}")
        self.base_memory = int(base_memory)
        self.switch_weight = _real("switch_weight", switch_weight)
        self.blocks: List[Tuple[Choice, ...]] = []
        for b, block in enumerate(blocks):
            if isinstance(block, Choice) or not isinstance(block, Sequence):
                raise TypeError(f"{_WHERE}: block {b} must be a sequence of Choice, got {type(block).__name__}")
            if len(block) == 0:
                raise ValueError(f"{_WHERE}: block {b} has no choices (choice 0 is the unpruned original)")
            for j, c in enumerate(block):
                if not isinstance(c, Choice):
                    raise TypeError(f"{_WHERE}: block {b} choice {j} must be a Choice, got {type(c).__name__}")
            self.blocks.append(tuple(block))
        nb = len(self.blocks)
        if isinstance(current, np.ndarray):
            current = current.tolist()
        if current is not None:
            if isinstance(current, (str, bytes)) or not isinstance(current, Sequence):
                raise TypeError(f"{_WHERE}: current must be a sequence of choice indices, got {type(current).__name__}")
            if len(current) != nb:
                raise ValueError(f"{_WHERE}: current has {len(current)} entries for {nb} blocks")
            for b, j in enumerate(current):
                if isinstance(j, bool) or not isinstance(j, numbers.Integral):
                    raise TypeError(f"{_WHERE}: current[{b}] must be an int, got {type(j).__name__} {j!r}")
                if not 0 <= j < len(self.blocks[b]):
                    raise ValueError(f"{_WHERE}: current[{b}] = {j} is out of range for block {b} with "
                                     f"{len(self.blocks[b])} choices")
            self.current: Optional[Tuple[int, ...]] = tuple(int(j) for j in current)
        else:
            self.current = None
        if self.base_memory + sum(max(c.memory for c in blk) for blk in self.blocks) >= _INT_LIMIT or \
                sum(max(c.load_bytes for c in blk) for blk in self.blocks) >= _INT_LIMIT:
            raise ValueError(f"{_WHERE}: summed memory or load bytes reach 2**62")

        self.lat = [np.array([c.latency for c in blk], dtype=np.float64) for blk in self.blocks]
        self.mem = [np.array([c.memory for c in blk], dtype=np.int64) for blk in self.blocks]
        self.drop = [np.array([c.drop for c in blk], dtype=np.float64) for blk in self.blocks]
        self.sb = [np.zeros(len(blk), dtype=np.int64) for blk in self.blocks]
        if self.current is not None:
            for b, blk in enumerate(self.blocks):
                self.sb[b] = np.array([0 if j == self.current[b] else c.load_bytes for j, c in enumerate(blk)],
                                      dtype=np.int64)
        w = self.switch_weight
        self.switching = self.current is not None and w > 0
        self.cost = [d + w * s / _MIB if w else d for d, s in zip(self.drop, self.sb)]  # per choice, for bounds
        self.offsets = np.cumsum([0] + [len(blk) for blk in self.blocks])
        self.flat_block = np.repeat(np.arange(nb), np.diff(self.offsets))
        self.flat_lat, self.flat_mem = np.concatenate(self.lat), np.concatenate(self.mem)
        self.flat_cost = np.concatenate(self.cost)
        # suffix minima: rest_lat[s] = smallest latency of blocks s.. (index nb: 0)
        mins_lat = [float(a.min()) for a in self.lat]
        mins_mem = [int(a.min()) for a in self.mem]
        self.rest_lat = np.zeros(nb + 1)
        self.rest_mem = np.zeros(nb + 1, dtype=np.int64)
        for b in range(nb - 1, -1, -1):
            self.rest_lat[b] = self.rest_lat[b + 1] + mins_lat[b]
            self.rest_mem[b] = self.rest_mem[b + 1] + mins_mem[b]
        self.min_latency = _seq_sum(self.base_latency, mins_lat)  # summed in block order, as totals are
        self.min_memory = self.base_memory + sum(mins_mem)
        self._bounds: Optional[list] = None

    @property
    def n(self) -> int:
        return len(self.blocks)

    def bounds(self, latency: Optional[float], memory: Optional[float]) -> List[Tuple[float, float, list]]:
        """Surrogate knapsacks for the lower bound: (a, b, per-suffix breakpoints of the LP bound in the resource
        a x latency + b x memory): latency alone, memory alone and, with both budgets, mixes of the two normalised
        by the budgets (any nonnegative mix of the constraints is a valid relaxation; mixes bound far better when both
        budgets bind)."""
        if self._bounds is None:
            mixes = [(1.0, 0.0), (0.0, 1.0)]
            if latency is not None and memory is not None:
                mixes += [(w / latency, (1 - w) / memory) for w in _MIXES]
            self._bounds = [(a, b, _suffix_bounds([a * x + b * y for x, y in zip(self.lat, self.mem)], self.cost))
                            for a, b in mixes]
        return self._bounds

    def lower_bound(self, bounds: list, s: int, lat_cap: float, mem_cap: float, lat: np.ndarray,
                    mem: np.ndarray) -> np.ndarray:
        """A lower bound of the best objective blocks s.. can add to states at (lat, mem) within the caps."""
        out = None
        for a, b, hulls in bounds:
            if a and b:
                left = (a * lat_cap + b * mem_cap) - (a * lat + b * mem)
            else:
                left = lat_cap - lat if a else mem_cap - mem
            v = _bound(hulls[s], left)
            out = v if out is None else np.maximum(out, v)
        return out

    def selection(self, choice: Sequence[int], feasible: bool, binding: Tuple[str, ...]) -> Selection:
        """The totals of a configuration, recomputed from the Choices (floats summed in block order, base first)."""
        picked = [blk[j] for blk, j in zip(self.blocks, choice)]
        drop = _seq_sum(0.0, [c.drop for c in picked])
        latency = _seq_sum(self.base_latency, [c.latency for c in picked])
        memory = self.base_memory + sum(c.memory for c in picked)
        switch = 0
        if self.current is not None:
            switch = sum(c.load_bytes for c, j, k in zip(picked, choice, self.current) if j != k)
        return Selection(tuple(int(j) for j in choice), drop, latency, memory, switch,
                         drop + self.switch_weight * switch / 2 ** 20, feasible, binding)


def _seq_sum(start: float, values: Sequence[float]) -> float:
    total = start
    for v in values:
        total += v
    return total


def _lower_hull(x: np.ndarray, y: np.ndarray) -> Tuple[List[float], List[float]]:
    """Vertices of the lower-left convex envelope of points (x, y): x increasing, y decreasing."""
    order = np.lexsort((y, x))
    hx: List[float] = []
    hy: List[float] = []
    for px, py in zip(x[order].tolist(), y[order].tolist()):
        if hy and py >= hy[-1]:
            continue  # not below the staircase
        while len(hx) >= 2 and (hx[-1] - hx[-2]) * (py - hy[-2]) - (hy[-1] - hy[-2]) * (px - hx[-2]) <= 0:
            hx.pop()
            hy.pop()
        hx.append(px)
        hy.append(py)
    return hx, hy


def _suffix_bounds(res: List[np.ndarray], cost: List[np.ndarray]) -> list:
    """For each suffix s of the blocks (s = 0..n; n: no block), (x, y): the LP relaxation of min sum cost s.t. sum
    res <= r over blocks s.., piecewise linear in r with breakpoints x (ascending) and values y. It is the sum of the
    blocks' lower convex envelopes: start at every block's leftmost vertex, then take all their segments in order of
    slope (steepest descent first)."""
    nb = len(res)
    x0 = np.zeros(nb + 1)
    y0 = np.zeros(nb + 1)
    seg_block, seg_dx, seg_dy = [], [], []
    for b in range(nb):
        hx, hy = _lower_hull(res[b].astype(np.float64), cost[b])
        x0[b], y0[b] = hx[0], hy[0]
        for k in range(1, len(hx)):
            seg_block.append(b)
            seg_dx.append(hx[k] - hx[k - 1])
            seg_dy.append(hy[k] - hy[k - 1])
    x0 = np.cumsum(x0[::-1])[::-1]  # suffix sums; x0[nb] = 0
    y0 = np.cumsum(y0[::-1])[::-1]
    sb, dx, dy = np.array(seg_block, dtype=np.int64), np.array(seg_dx), np.array(seg_dy)
    order = np.argsort(dy / dx if len(dx) else dx, kind="stable")
    sb, dx, dy = sb[order], dx[order], dy[order]
    out = []
    for s in range(nb + 1):
        m = sb >= s
        out.append((np.concatenate(([x0[s]], x0[s] + np.cumsum(dx[m]))),
                    np.concatenate(([y0[s]], y0[s] + np.cumsum(dy[m])))))
    return out


def _bound(hull: tuple, left: np.ndarray) -> np.ndarray:
    x, y = hull
    return np.interp(left, x, y, left=y[0], right=y[-1])


# ---------------------------------------------------------------------------------------------------------------
# dominance


_TRI = np.tril(np.ones((_CHUNK, _CHUNK), dtype=bool), -1)


def _staircase_keep(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """keep[i]: no j < i has a[j] <= a[i] and b[j] <= b[i] (points in the order given). Chunks of _CHUNK points are
    checked against the staircase of the points kept so far (a binary search) and against themselves (a matrix)."""
    n = len(a)
    if n <= _CHUNK:  # one chunk, no staircase
        below = (a[None, :] <= a[:, None]) & (b[None, :] <= b[:, None]) & _TRI[:n, :n]
        return ~below.any(axis=1)
    keep = np.empty(n, dtype=bool)
    sa, sb = a[:0], b[:0]  # staircase: sa ascending, sb strictly descending
    for s in range(0, n, _CHUNK):
        ca, cb = a[s:s + _CHUNK], b[s:s + _CHUNK]
        c = len(ca)
        below = (ca[None, :] <= ca[:, None]) & (cb[None, :] <= cb[:, None]) & _TRI[:c, :c]
        dom = below.any(axis=1)
        if len(sa):
            k = np.searchsorted(sa, ca, side="right") - 1
            dom |= (k >= 0) & (sb[np.maximum(k, 0)] <= cb)
        ok = ~dom
        keep[s:s + c] = ok
        if ok.any():
            ma, mb = np.concatenate((sa, ca[ok])), np.concatenate((sb, cb[ok]))
            o = np.lexsort((mb, ma))
            ma, mb = ma[o], mb[o]
            new = np.ones(len(ma), dtype=bool)
            new[1:] = mb[1:] < np.minimum.accumulate(mb)[:-1]
            sa, sb = ma[new], mb[new]
    return keep


def _nondominated3(lat: np.ndarray, mem: np.ndarray, obj: np.ndarray) -> np.ndarray:
    """Positions (ascending) of the states no other state beats in all of latency, memory and objective; of equal
    states the first (the lexicographically smallest prefix) stays."""
    n = len(lat)
    if n <= 1:
        return np.arange(n)
    order = np.lexsort((np.arange(n), mem, lat, obj))
    return np.sort(order[_staircase_keep(lat[order], mem[order])])


def _nondominated2(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Positions (ascending) of the states no other beats in both a and b; of those equal in (a, b), the one with the
    smallest c, then the first, stays."""
    n = len(a)
    if n <= 1:
        return np.arange(n)
    order = np.lexsort((np.arange(n), c, b, a))
    bs = b[order]
    keep = np.ones(n, dtype=bool)
    keep[1:] = bs[1:] < np.minimum.accumulate(bs)[:-1]
    return np.sort(order[keep])


# ---------------------------------------------------------------------------------------------------------------
# the dynamic program


class _Layers:
    """Back-pointers of a finished pass: per block, each kept state's parent position and choice."""

    def __init__(self) -> None:
        self.parent: List[np.ndarray] = []
        self.choice: List[np.ndarray] = []

    def add(self, idx: np.ndarray, k: int) -> None:
        self.parent.append(idx // k)
        self.choice.append(idx % k)

    def trace(self, i: int) -> Tuple[int, ...]:
        out = []
        for b in range(len(self.choice) - 1, -1, -1):
            out.append(int(self.choice[b][i]))
            i = int(self.parent[b][i])
        return tuple(out[::-1])


def _min_objective(p: _Problem, budgets: tuple, lat_cap: float, mem_cap: float, fits: Callable, ub: float = math.inf,
                   beam: int = 0) -> Optional[Tuple[float, Tuple[int, ...]]]:
    """One pass of the program: the configuration minimising (objective, latency, memory, choice tuple) among those
    with ``fits(latency, memory)`` (caps: loose versions of the budgets, for pruning). With ``ub`` finite, states
    that cannot reach an objective <= ub are pruned (exact: the result is the optimum if it is <= ub, else None).
    With ``beam``, only that many states (the best by objective + bound) are kept per block: a heuristic."""
    bounds = p.bounds(*budgets)
    eps = 1e-9 * (1.0 + abs(ub)) if math.isfinite(ub) else 0.0
    lat = np.array([p.base_latency])
    mem = np.array([p.base_memory], dtype=np.int64)
    drop = np.zeros(1)
    switch = np.zeros(1, dtype=np.int64)
    layers = _Layers()
    for b in range(p.n):
        k = len(p.lat[b])
        lat = (lat[:, None] + p.lat[b]).ravel()
        mem = (mem[:, None] + p.mem[b]).ravel()
        drop = (drop[:, None] + p.drop[b]).ravel()
        if p.switching:  # the objective as Selection.objective computes it (a sum of per-block costs rounds apart)
            switch = (switch[:, None] + p.sb[b]).ravel()
            obj = drop + p.switch_weight * switch / 2 ** 20
        else:
            obj = drop
        keep = (lat + p.rest_lat[b + 1] <= lat_cap) & (mem + p.rest_mem[b + 1] <= mem_cap)
        if b + 1 < p.n and (beam or eps):
            score = obj + p.lower_bound(bounds, b + 1, lat_cap, mem_cap, lat, mem)
        else:
            score = obj
        if eps:
            keep &= score <= ub + eps
        idx = np.flatnonzero(keep)
        if len(idx) > 1:
            idx = idx[_nondominated3(lat[idx], mem[idx], obj[idx])]
            if beam and len(idx) > beam:
                idx = np.sort(idx[np.argpartition(score[idx], beam)[:beam]])
        if not len(idx):
            return None
        lat, mem, drop, obj = lat[idx], mem[idx], drop[idx], obj[idx]
        if p.switching:
            switch = switch[idx]
        layers.add(idx, k)
    ok = np.flatnonzero(fits(lat, mem))
    if not len(ok):
        return None
    i = int(ok[np.lexsort((ok, mem[ok], lat[ok], obj[ok]))[0]])
    return float(obj[i]), layers.trace(i)


def _min_overshoot(p: _Problem, latency: Optional[float], memory: Optional[float],
                   beam: int = 0, ub: float = math.inf) -> Tuple[float, Tuple[int, ...]]:
    """The smallest max(latency / L, memory / M) over all configurations (only the budgets given), and a
    configuration with it; a program over (latency, memory) alone (dominance in those two). With ``beam``: the
    heuristic first pass giving ``ub``."""
    inv_l = 1.0 / latency if latency is not None else 0.0
    inv_m = 1.0 / memory if memory is not None else 0.0
    lim = ub * (1 + _SLACK) if math.isfinite(ub) else math.inf
    lat = np.array([p.base_latency])
    mem = np.array([p.base_memory], dtype=np.int64)
    obj = np.zeros(1)
    layers = _Layers()
    for b in range(p.n):
        k = len(p.lat[b])
        lat = (lat[:, None] + p.lat[b]).ravel()
        mem = (mem[:, None] + p.mem[b]).ravel()
        obj = (obj[:, None] + p.cost[b]).ravel()
        score = np.maximum((lat + p.rest_lat[b + 1]) * inv_l, (mem + p.rest_mem[b + 1]) * inv_m)
        idx = np.flatnonzero(score <= lim)
        idx = idx[_nondominated2(lat[idx], mem[idx], obj[idx])]
        if beam and len(idx) > beam:
            idx = np.sort(idx[np.argpartition(score[idx], beam)[:beam]])
        lat, mem, obj = lat[idx], mem[idx], obj[idx]
        layers.add(idx, k)
    ratio = np.maximum(lat * inv_l, mem * inv_m)
    i = int(np.argmin(ratio))
    return float(ratio[i]), layers.trace(i)


def _exact(p: _Problem, budgets: tuple, lat_cap: float, mem_cap: float, fits: Callable, ub: float, tighten: bool,
           ) -> Tuple[float, Tuple[int, ...]]:
    """The optimum given a configuration that fits, of objective ``ub``. With ``tighten`` (``ub`` may be far from the
    optimum) first with the bound cut to a fraction of the gap above the root's lower bound; finally with ``ub``
    itself (always succeeds)."""
    root = float(p.lower_bound(p.bounds(*budgets), 0, lat_cap, mem_cap, np.array([p.base_latency]),
                               np.array([p.base_memory]))[0])
    for frac in (0.05, 0.3) if tighten else ():
        t = root + frac * (ub - root)
        if t < ub:
            r = _min_objective(p, budgets, lat_cap, mem_cap, fits, ub=t)
            if r is not None and r[0] <= t:  # (one in t's rounding margin could lose to a pruned one)
                return r
    r = _min_objective(p, budgets, lat_cap, mem_cap, fits, ub=ub)
    assert r is not None, "fxeff.blocks.select: internal error: the known configuration was pruned"
    return r


def _improve(p: _Problem, choice: Tuple[int, ...], fits: Callable, rounds: int = 20) -> float:
    """An upper bound for the exact pass: the objective of ``choice`` (which fits) after a local search, each round
    the best objective-lowering change of one block or of two blocks that still fits (pairs while there are at most
    _PAIRS choices in all). Totals are recomputed in block order before a result is trusted."""
    blk, lat_f, mem_f, cost_f = p.flat_block, p.flat_lat, p.flat_mem, p.flat_cost
    pairs = len(cost_f) <= _PAIRS
    if pairs:
        distinct = blk[:, None] < blk[None, :]
    x = np.array(choice)
    best = p.selection(choice, False, ()).objective
    for _ in range(rounds):
        pos = p.offsets[:-1] + x
        lat = _seq_sum(p.base_latency, lat_f[pos].tolist())
        mem = p.base_memory + int(mem_f[pos].sum())
        dl, dm, dc = lat_f - lat_f[pos][blk], mem_f - mem_f[pos][blk], cost_f - cost_f[pos][blk]
        gain, move = -1e-12, None
        ok = (dc < gain) & fits(lat + dl, mem + dm)
        if ok.any():
            i = int(np.flatnonzero(ok)[np.argmin(dc[ok])])
            gain, move = dc[i], (i,)
        if pairs:
            dc2 = dc[:, None] + dc[None, :]
            ok = distinct & (dc2 < gain) & fits(lat + (dl[:, None] + dl[None, :]), mem + (dm[:, None] + dm[None, :]))
            if ok.any():
                k = np.flatnonzero(ok.ravel())
                k = int(k[np.argmin(dc2.ravel()[k])])
                move = divmod(k, len(cost_f))
        if move is None:
            break
        y = x.copy()
        for i in move:
            y[blk[i]] = i - p.offsets[blk[i]]
        sel = p.selection(y, False, ())
        cost = sel.objective
        if cost >= best or not fits(np.array([sel.latency]), np.array([sel.memory]))[0]:
            break
        x, best = y, cost
    return best


def _caps(latency: Optional[float], memory: Optional[float], scale: float = 1.0) -> Tuple[float, float]:
    return (latency * scale * (1 + _SLACK) if latency is not None else math.inf,
            memory * scale * (1 + _SLACK) if memory is not None else math.inf)


def _binding(p: _Problem, sel: Selection, latency: Optional[float], memory: Optional[float]) -> Tuple[str, ...]:
    """The budgets that some objective-lowering change of one block would break."""
    blk = p.flat_block
    pos = p.offsets[:-1] + np.array(sel.choice)  # the selected choices in the flat arrays
    better = p.flat_cost < p.flat_cost[pos][blk]
    out = []
    if latency is not None and np.any(better & (sel.latency - p.flat_lat[pos][blk] + p.flat_lat
                                                > latency * (1 + _RTOL))):
        out.append("latency")
    if memory is not None and np.any(better & (sel.memory - p.flat_mem[pos][blk] + p.flat_mem > memory)):
        out.append("memory")
    return tuple(out)


def _fits_fn(latency: Optional[float], memory: Optional[float]) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    lat_lim = latency * (1 + _RTOL) if latency is not None else math.inf
    mem_lim = memory if memory is not None else math.inf
    return lambda lat, mem: (lat <= lat_lim) & (mem <= mem_lim)


def _fits(sel: Selection, latency: Optional[float], memory: Optional[float]) -> bool:
    return bool(_fits_fn(latency, memory)(np.array([sel.latency]), np.array([sel.memory]))[0])


def select(blocks: Sequence[Sequence[Choice]], latency: Optional[float] = None, memory: Optional[int] = None, *,
           base_latency: float = 0.0, base_memory: int = 0, current: Optional[Sequence[int]] = None,
           switch_weight: float = 0.0) -> Selection:
    """The choice per block minimising drop + ``switch_weight`` x MiB loaded (the ``load_bytes`` of each block whose
    choice differs from ``current``) subject to base_latency + summed latency <= ``latency`` (seconds) and base_memory
    + summed memory <= ``memory`` (bytes); None: no budget. Exact; ties: smaller latency, then memory, then the
    lexicographically smaller choice tuple. Raises ``InfeasibleBudgetError`` (with the closest configuration) when no
    configuration meets the budgets; budgets are never relaxed."""
    p = _Problem(blocks, base_latency, base_memory, current, switch_weight)
    if latency is not None:
        latency = _real("latency", latency, positive=True)
    if memory is not None:
        memory = _real("memory", memory, positive=True)
    latency = None if latency == math.inf else latency  # no budget
    memory = None if memory == math.inf else memory
    fits = _fits_fn(latency, memory)
    unmet = []
    if latency is not None and not p.min_latency <= latency * (1 + _RTOL):
        unmet.append("latency")
    if memory is not None and not p.min_memory <= memory:
        unmet.append("memory")
    lat_cap, mem_cap = _caps(latency, memory)
    overshoot = None
    if not unmet:
        budgets = (latency, memory)
        first = _min_objective(p, budgets, lat_cap, mem_cap, fits, beam=_BEAM)
        if first is not None:
            ub = _improve(p, first[1], fits)
        else:  # the beam found nothing feasible: is anything?
            overshoot = _overshoot(p, latency, memory)
            if _fits(p.selection(overshoot[1], False, ()), latency, memory):
                ub = _improve(p, overshoot[1], fits)
            else:
                unmet = ["latency", "memory"]
        if not unmet:
            _, choice = _exact(p, budgets, lat_cap, mem_cap, fits, ub, tighten=first is None)
            sel = p.selection(choice, True, ())
            return dataclasses.replace(sel, binding=_binding(p, sel, latency, memory))
    raise _infeasible(p, latency, memory, tuple(unmet), overshoot)


def select_excluding(blocks: Sequence[Sequence[Choice]], latency: Optional[float] = None,
                     memory: Optional[int] = None, *, exclude: Iterable[Sequence[int]] = (), base_latency: float = 0.0,
                     base_memory: int = 0, current: Optional[Sequence[int]] = None, switch_weight: float = 0.0
                     ) -> Optional[Selection]:
    """``select``'s optimum among the configurations not in ``exclude`` (choice tuples); None when every
    configuration within the budgets is excluded. Raises InfeasibleBudgetError as ``select`` where no configuration
    meets the budgets. Exact, by Lawler's partition: where the optimum is excluded, the configurations other than
    it are those that first differ from it at block b, for each b (its choices before b, any other choice at b,
    any after), disjoint subproblems, each solved by ``select``, recursively; a solve per block per excluded
    configuration met at most. The switching cost goes into each choice's drop, so subproblems need no
    ``current``. Ties as ``select``."""
    excluded = {tuple(int(j) for j in c) for c in exclude}
    best = select(blocks, latency, memory, base_latency=base_latency, base_memory=base_memory, current=current,
                  switch_weight=switch_weight)
    if best.choice not in excluded:
        return best
    original = blocks
    if current is not None and switch_weight:
        blocks = [[dataclasses.replace(c, drop=c.drop + (switch_weight * c.load_bytes / _MIB if k != current[b]
                                                          else 0.0))
                   for k, c in enumerate(row)] for b, row in enumerate(blocks)]

    def key(choice: Tuple[int, ...]) -> tuple:
        sel = totals(blocks, choice, base_latency=base_latency, base_memory=base_memory)
        return sel.objective, sel.latency, sel.memory, choice

    def solve(allowed: List[List[int]]) -> Optional[Tuple[int, ...]]:
        try:
            sel = select([[blocks[b][k] for k in ks] for b, ks in enumerate(allowed)], latency, memory,
                         base_latency=base_latency, base_memory=base_memory)
        except InfeasibleBudgetError:
            return None
        choice = tuple(ks[k] for ks, k in zip(allowed, sel.choice))
        if choice not in excluded:
            return choice
        found = [solve([[choice[i]] for i in range(b)] + [[k for k in allowed[b] if k != choice[b]]] +
                       allowed[b + 1:]) for b in range(len(allowed)) if len(allowed[b]) > 1]
        found = [c for c in found if c is not None]
        return min(found, key=key) if found else None

    choice = solve([list(range(len(row))) for row in blocks])
    if choice is None:
        return None
    p = _Problem(original, base_latency, base_memory, current, switch_weight)
    sel = p.selection(choice, True, ())
    return dataclasses.replace(sel, binding=_binding(p, sel, latency, memory))


def _bytes(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.6g}"


def _overshoot(p: _Problem, latency: Optional[float], memory: Optional[float]) -> Tuple[float, Tuple[int, ...]]:
    ub, _ = _min_overshoot(p, latency, memory, beam=_BEAM)
    return _min_overshoot(p, latency, memory, ub=ub)


def _infeasible(p: _Problem, latency: Optional[float], memory: Optional[float], unmet: Tuple[str, ...],
                overshoot: Optional[Tuple[float, Tuple[int, ...]]]) -> InfeasibleBudgetError:
    """The error for budgets no configuration meets, with the closest configuration: the smallest largest relative
    overshoot r, then the best objective among the configurations at r."""
    if overshoot is None:
        overshoot = _overshoot(p, latency, memory)
    r, some = overshoot
    inv_l = 1.0 / latency if latency is not None else 0.0
    inv_m = 1.0 / memory if memory is not None else 0.0

    def at_r(lat: np.ndarray, mem: np.ndarray) -> np.ndarray:
        return np.maximum(lat * inv_l, mem * inv_m) <= r

    lat_cap, mem_cap = _caps(latency, memory, r)
    _, choice = _exact(p, (latency, memory), lat_cap, mem_cap, at_r, _improve(p, some, at_r), tighten=True)
    sel = p.selection(choice, False, ())
    over = []
    if latency is not None and not sel.latency <= latency * (1 + _RTOL):
        over.append("latency")
    if memory is not None and not sel.memory <= memory:
        over.append("memory")
    sel = dataclasses.replace(sel, binding=tuple(over))
    parts = []
    if unmet == ("latency", "memory") and (latency is not None and p.min_latency <= latency * (1 + _RTOL)) and \
            (memory is not None and p.min_memory <= memory):
        parts.append(f"the latency budget {latency:.6g} s and the memory budget {_bytes(memory)} bytes cannot both be "
                     f"met (each alone can: minimum latency {p.min_latency:.6g} s, minimum memory "
                     f"{p.min_memory} bytes)")
    else:
        if "latency" in unmet:
            parts.append(f"the latency budget {latency:.6g} s cannot be met: the minimum achievable latency is "
                         f"{p.min_latency:.6g} s ({100 * (p.min_latency / latency - 1):.3g}% over)")
        if "memory" in unmet:
            parts.append(f"the memory budget {_bytes(memory)} bytes cannot be met: the minimum achievable memory is "
                         f"{p.min_memory} bytes ({100 * (p.min_memory / memory - 1):.3g}% over)")
    closest = [f"latency {sel.latency:.6g} s" + (f" ({100 * (sel.latency / latency - 1):+.3g}%)"
                                                  if latency is not None else ""),
               f"memory {sel.memory} bytes" + (f" ({100 * (sel.memory / memory - 1):+.3g}%)"
                                               if memory is not None else "")]
    message = (f"{_WHERE}: " + "; ".join(parts) + f"; closest configuration {sel.choice}: " + ", ".join(closest)
               + f", drop {sel.drop:.4g}")
    return InfeasibleBudgetError(message, sel, unmet)


# ---------------------------------------------------------------------------------------------------------------
# the latency / drop front


def totals(blocks: Sequence[Sequence[Choice]], choice: Sequence[int], *, base_latency: float = 0.0,
           base_memory: int = 0, current: Optional[Sequence[int]] = None, switch_weight: float = 0.0) -> Selection:
    """The Selection of a given ``choice`` (one index per block): its totals summed as ``select`` sums them
    (block order, base first), with no budget (feasible, nothing binding)."""
    p = _Problem(blocks, base_latency, base_memory, current, switch_weight)
    if len(choice) != p.n or any(isinstance(j, bool) or not isinstance(j, numbers.Integral) or
                                 not 0 <= j < len(blk) for j, blk in zip(choice, p.blocks)):
        raise ValueError(f"{_WHERE}: choice must hold one index per block ({p.n}), each below that block's number "
                         f"of choices, got {tuple(choice)}")
    return p.selection(choice, True, ())


def pareto_front(blocks: Sequence[Sequence[Choice]], *, base_latency: float = 0.0, base_memory: int = 0,
                 max_points: Optional[int] = None, exclude: Iterable[Sequence[int]] = ()) -> List[Selection]:
    """The configurations on the (latency, drop) Pareto front, sorted by latency: no configuration has both a latency
    and a drop <=, one of them <. One configuration per distinct (latency, drop) point (the smallest memory, then the
    lexicographically smallest choice tuple). Exact: the same program over (latency, drop). With ``max_points`` and
    a larger front, ``max_points`` of them spread evenly in latency, both ends included. ``exclude``: choice tuples
    left out, the front of the others (where one is on the front, the others are partitioned as in
    ``select_excluding`` and the fronts of the parts merged: exact)."""
    p = _Problem(blocks, base_latency, base_memory, None, 0.0)
    if max_points is not None:
        if isinstance(max_points, bool) or not isinstance(max_points, numbers.Integral):
            raise TypeError(f"{_WHERE}: max_points must be an int or None, got {type(max_points).__name__}")
        if max_points < 2:
            raise ValueError(f"{_WHERE}: max_points must be >= 2 (the front's two ends), got {max_points}")
    excluded = {tuple(int(j) for j in c) for c in exclude}
    if not excluded:
        front = [p.selection(c, True, ()) for c in _front_choices(p)]
    else:
        candidates = {c: p.selection(c, True, ()) for c in _front_without(p.blocks, base_latency, base_memory,
                                                                             excluded)}
        front = nondominated(list(candidates.values()))
    if max_points is not None and len(front) > max_points:
        front = [front[i] for i in _spread(np.array([s.latency for s in front]), max_points)]
    return front


# Drops closer than this (points) count as equal on a merged front: the same modelled drop summed in another order
# differs in its last bits, and a slower configuration "better" by that is not on the front.
TIE = 1e-9


def nondominated(selections: Sequence[Selection]) -> List[Selection]:
    """The (latency, drop) Pareto front of ``selections``, by latency: one per distinct point, the smallest memory,
    then the lexicographically smallest choice tuple (pareto_front's rule); drops within ``TIE`` count as equal."""
    front: List[Selection] = []
    for sel in sorted(selections, key=lambda s: (s.latency, s.drop, s.memory, s.choice)):
        if not front or sel.drop < front[-1].drop - TIE:
            front.append(sel)
    return front


def _front_choices(p: _Problem) -> List[Tuple[int, ...]]:
    """The choice tuples on p's (latency, drop) front, by latency (pareto_front's program)."""
    lat = np.array([p.base_latency])
    mem = np.array([p.base_memory], dtype=np.int64)
    drop = np.zeros(1)
    layers = _Layers()
    for b in range(p.n):
        k = len(p.lat[b])
        lat = (lat[:, None] + p.lat[b]).ravel()
        mem = (mem[:, None] + p.mem[b]).ravel()
        drop = (drop[:, None] + p.drop[b]).ravel()
        idx = _nondominated2(lat, drop, mem)
        lat, mem, drop = lat[idx], mem[idx], drop[idx]
        layers.add(idx, k)
    return [tuple(int(j) for j in layers.trace(int(i))) for i in np.lexsort((drop, lat))]


def _front_without(blocks: Sequence[Sequence[Choice]], base_latency: float, base_memory: int, excluded: set,
                   allowed: Optional[List[List[int]]] = None) -> List[Tuple[int, ...]]:
    """Choice tuples, none in ``excluded``, among which is every point of the front of the configurations not
    excluded whose block b takes a choice in allowed[b]: that front where none of it is excluded; else, for its
    first excluded configuration c, the same of each part of the rest (first differing from c at block b)."""
    allowed = allowed if allowed is not None else [list(range(len(row))) for row in blocks]
    p = _Problem([[blocks[b][k] for k in ks] for b, ks in enumerate(allowed)], base_latency, base_memory, None, 0.0)
    choices = [tuple(ks[k] for ks, k in zip(allowed, c)) for c in _front_choices(p)]
    hit = next((c for c in choices if c in excluded), None)
    if hit is None:
        return choices
    out: List[Tuple[int, ...]] = []
    for b in range(len(allowed)):
        rest = [k for k in allowed[b] if k != hit[b]]
        if rest:
            out += _front_without(blocks, base_latency, base_memory, excluded,
                                  [[hit[i]] for i in range(b)] + [rest] + allowed[b + 1:])
    return out


def _spread(x: np.ndarray, m: int) -> np.ndarray:
    """m increasing positions into sorted x, the k-th the nearest to the k-th of m evenly spaced targets from x[0] to
    x[-1] among the positions that leave room for the rest (so all are distinct and both ends are in)."""
    n = len(x)
    targets = np.linspace(x[0], x[-1], m)
    out = []
    lo = 0
    for k in range(m):
        hi = n - (m - k)  # last position this pick may take
        i = int(np.searchsorted(x, targets[k]))
        cand = [c for c in (i - 1, i) if lo <= c <= hi] or [min(max(i, lo), hi)]
        c = min(cand, key=lambda c: (abs(x[c] - targets[k]), c))
        out.append(c)
        lo = c + 1
    return np.array(out)
