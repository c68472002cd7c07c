"""HetConv layer: fxeff.ops.hetconv2d vs the dense KxK conv it replaces and vs the seed's form.

Per row (channels, size, batch, part P; K=3, stride 1, padding 1, float32), side by side in one run (medians of
repeats, the best of a few rounds taken in turn): dense F.conv2d with the full KxK kernel; the seed's form (grouped KxK conv, groups=P, plus a full 1x1
conv with the block diagonal zeroed, added); fxeff.ops.hetconv2d. MAC ratio = 1/P + (1 - 1/P)/K^2; the issue's
targets: speedup dense/fxeff >= 0.8 x (1 / MAC ratio) at batch 1 and >= 0.7 x at batch 8, and fxeff faster than
the seed in every row. The machine may be shared: ratios are measured side by side, absolute times move.

With --device cuda every tensor lives on the GPU (dense = cuDNN), the rows are at batch 1 and 32, and the target
is issue 6's GPU one: efficiency >= 0.7 x the MAC-ratio speedup at both batches.

    python benchmarks/hetconv.py [--quick] [--small] [--threads 2] [--device cpu|cuda] [--channels-last] [--backward]
                                 [--json out.json] [--markdown out.md]
"""
import argparse
import os
import sys
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fxeff  # noqa: E402,F401
from fxeff.bench import script_parser, write_markdown, measure, report  # noqa: E402
from fxeff.ops import hetconv2d, hetconv_dense_weight  # noqa: E402

SHAPES = [(256, 56), (128, 28)]  # (channels in = out, spatial size)
BATCHES = [1, 8]
# --small: the reference models' layers (fxeff.reference on 64x64 canvases, stride-2 stem: 32 channels at 32x32, 64
# at 16x16, 128 at 8x8), at batch 1 and 16 (docs/accuracy.md's latency batch); issue 17
SMALL_SHAPES = [(32, 32), (64, 16), (128, 8)]
SMALL_BATCHES = [1, 16]
PARTS = [2, 4, 8, 16]
TARGET = {1: 0.8, 8: 0.7}  # required fraction of the MAC-ratio speedup, per batch
CUDA_BATCHES = [1, 32]
CUDA_TARGET = {1: 0.7, 32: 0.7}  # issue 6 on the GPU: >= 0.7 x the MAC-ratio speedup over cuDNN dense


def mac_ratio(part: int, k: int) -> float:
    return 1 / part + (1 - 1 / part) / k ** 2


def seed_weights(wk: torch.Tensor, w1: torch.Tensor, part: int):
    """The seed's weights: the grouped KxK kernel and a full 1x1 kernel whose block diagonal is zero."""
    dense = hetconv_dense_weight(wk, w1, part)
    k = wk.shape[2]
    one = dense[:, :, k // 2, k // 2].clone()
    n, m = one.shape
    for b in range(part):
        one[b * n // part:(b + 1) * n // part, b * m // part:(b + 1) * m // part] = 0
    return wk.contiguous(), one[:, :, None, None].contiguous()


def best_of_rounds(fns: Dict[str, Callable[[], object]], min_run_time: float, rounds: int) -> Dict[str, float]:
    """Each candidate timed with ``measure`` in turn, ``rounds`` times; the fastest round of each. The machine is
    shared: another process on a core stalls a 2-thread run for whole scheduler slices, so a round's median can be
    several times the quiet time; the best round is the closest to it, and taking turns exposes every candidate to
    the same noise."""
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], measure(fn, min_run_time / rounds))
    return best


STRATEGIES = ("gemm", "grouped", "direct", "direct_cl")  # the CPU kernel's (csrc/ops/cpu/hetconv2d_kernel.cpp)


def forced(strategy: str, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with the CPU kernel's strategy forced (torch.ops.fxeff._hetconv2d_set_strategy), then restored."""
    def run():
        previous = torch.ops.fxeff._hetconv2d_set_strategy(strategy, 0)
        try:
            return fn()
        finally:
            torch.ops.fxeff._hetconv2d_set_strategy(previous, 0)
    return run


def bench_row(c: int, size: int, batch: int, part: int, k: int, channels_last: bool, backward: bool,
              min_run_time: float, rounds: int, device: torch.device = torch.device("cpu"),
              strategies: bool = False) -> Dict[str, object]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, c, size, size).to(device).contiguous(memory_format=fmt)
    wk = (torch.randn(c, c // part, k, k) * 0.1).to(device)
    w1 = (torch.randn(c, c - c // part) * 0.1).to(device)
    bias = torch.randn(c).to(device)
    dense_w = hetconv_dense_weight(wk, w1, part).contiguous(memory_format=fmt)
    seed_k, seed_1 = seed_weights(wk, w1, part)
    seed_k, seed_1 = seed_k.contiguous(memory_format=fmt), seed_1.contiguous(memory_format=fmt)
    pad = k // 2

    def dense():
        return F.conv2d(x, dense_w, bias, 1, pad)

    def seed():
        return F.conv2d(x, seed_k, bias, 1, pad, 1, part) + F.conv2d(x, seed_1)

    def ours():
        return hetconv2d(x, wk, w1, bias, part, 1, pad)

    fns = {"dense": dense, "seed": seed, "fxeff": ours}
    if strategies and device.type == "cpu":  # direct: float32 with AVX-512 (else the kernel runs gemm)
        fns.update({s: forced(s, ours) for s in STRATEGIES})
    with torch.no_grad():
        err = float((ours() - dense()).abs().max())
        t = best_of_rounds(fns, min_run_time, rounds)
    ratio = mac_ratio(part, k)
    row: Dict[str, object] = {
        "layer": f"{c}ch@{size}x{size}", "batch": batch, "P": part,
        "dense ms": t["dense"] * 1e3, "seed ms": t["seed"] * 1e3, "fxeff ms": t["fxeff"] * 1e3,
        "MAC ratio": ratio, "speedup": t["dense"] / t["fxeff"],
        "efficiency": t["dense"] / t["fxeff"] * ratio, "seed speedup": t["dense"] / t["seed"],
        "seed efficiency": t["dense"] / t["seed"] * ratio, "max abs err": err,
    }
    for s in STRATEGIES:
        if s in t:
            row[f"{s} ms"] = t[s] * 1e3
    if any(s in t for s in STRATEGIES):
        row["fastest"] = min((s for s in STRATEGIES if s in t), key=t.get)
    target = CUDA_TARGET if device.type == "cuda" else TARGET
    row["targets met"] = bool(row["efficiency"] >= target.get(batch, 0.7) and t["fxeff"] < t["seed"])
    if backward:
        xg = x.clone().requires_grad_()
        wkg, w1g, bg = wk.clone().requires_grad_(), w1.clone().requires_grad_(), bias.clone().requires_grad_()
        dwg = dense_w.clone().requires_grad_()
        g = torch.randn_like(dense())
        fb = best_of_rounds({"dense": lambda: F.conv2d(xg, dwg, bg, 1, pad).backward(g),
                             "fxeff": lambda: hetconv2d(xg, wkg, w1g, bg, part, 1, pad).backward(g)},
                            min_run_time, rounds)
        fb_dense, fb_ours = fb["dense"], fb["fxeff"]
        row.update({"dense fb ms": fb_dense * 1e3, "fxeff fb ms": fb_ours * 1e3, "fb speedup": fb_dense / fb_ours})
    return row


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="P 4 and 16 only, shorter timing")
    parser.add_argument("--small", action="store_true", help="the reference models' small layers (32/64/128 "
                        "channels at 32x32/16x16/8x8) at batch 1 and 16 instead of the VGG/ResNet-50 ones")
    parser.add_argument("--channels-last", action="store_true", help="also the channels_last rows")
    parser.add_argument("--backward", action="store_true", help="also forward+backward (dense vs fxeff)")
    parser.add_argument("--strategies", action="store_true", help="CPU: also each of the kernel's strategies "
                        "forced (gemm, grouped, direct), and the fastest: the data of the auto pick's rule")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    device = args.device
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    min_run_time = 0.3 if args.quick else 1.5
    rounds = 2 if args.quick else 5
    parts = [4, 16] if args.quick else PARTS
    batches = CUDA_BATCHES if device.type == "cuda" else SMALL_BATCHES if args.small else BATCHES
    shapes = SMALL_SHAPES if args.small else SHAPES
    text = ""
    for channels_last in ([False, True] if args.channels_last else [False]):
        rows: List[Dict[str, object]] = [
            bench_row(c, size, batch, part, 3, channels_last, args.backward, min_run_time, rounds, device,
                      args.strategies)
            for c, size in shapes for batch in batches for part in parts]
        columns = ["layer", "batch", "P", "dense ms", "seed ms", "fxeff ms", "MAC ratio", ("speedup", "dense/fxeff"),
                   ("efficiency", "speedup / (1/MAC ratio)"), "seed speedup", ("seed efficiency", "seed / (1/MAC)"),
                   "targets met"]
        if args.backward:
            columns += ["dense fb ms", "fxeff fb ms", "fb speedup"]
        if args.strategies:
            columns += [f"{s} ms" for s in STRATEGIES] + ["fastest"]
        name = "channels_last" if channels_last else "NCHW"
        path = args.json.replace(".json", f"_{name}.json") if args.json else ""
        text += report(f"HetConv layer, K=3 pad 1, float32, {name}, {device.type}: dense vs seed vs "
                       "fxeff.ops.hetconv2d", rows, columns, path, device) + "\n\n"
    write_markdown(args.markdown, text)


if __name__ == "__main__":
    main()
