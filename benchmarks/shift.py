"""Shift layers vs the 3x3 depthwise conv they replace, and vs x.clone() (the memcpy floor).

Per shape and memory format, side by side in one run (medians of repeats): x.clone(), nn.Conv2d 3x3
depthwise (padding 1, no bias), fxeff.ops.shift in modes sparse / grouped / active, and the pure-PyTorch
reference (tests/_shift_reference.py). Forward, and forward+backward (input and weight/shift gradients).
Shifts: uniform(-1, 1) per channel (a fresh Shift2d's range) for sparse/active; for grouped the
9 offsets of the 3x3 neighbourhood on consecutive channel groups. With --models, whole torchvision
MobileNetV2 at 224 before/after the Shift pass: eager latency and MACs.

With --device cuda everything runs on the GPU, against cuDNN's depthwise conv and issue 6's GPU targets
(fxeff's sparse forward >= 80% of x.clone()'s device-to-device bandwidth and >= 3x the depthwise conv,
forward+backward >= 2x); extra columns give the achieved bandwidth of the sparse forward and of x.clone() in
GB/s (bytes read + written / time) and their ratio. The pure-PyTorch reference is CPU-only: skipped on CUDA.

    python benchmarks/shift.py [--quick] [--threads 2] [--device cpu|cuda] [--models] [--json out.json]
        [--markdown out.md]
"""
import argparse
import os
import sys
from typing import Callable, Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
import fxeff  # noqa: E402
from _shift_reference import shift_reference  # noqa: E402
from fxeff.bench import script_parser, write_markdown, measure, model_before_after, report  # noqa: E402

SHAPES = [(8, 64, 56, 56), (8, 256, 28, 28), (1, 32, 112, 112)]
# The targets: (quantity, bound); checked per row and printed with the table.
TARGETS = {
    "sparse / clone": ("<=", 1.5), "grouped / clone": ("<=", 1.5), "dw / sparse": (">=", 4.0),
    "dw / grouped": (">=", 4.0), "dw / active": (">=", 1.5), "dw fb / sparse fb": (">=", 2.0),
}
# On CUDA (issue 6): the forward at >= 80% of the copy bandwidth, >= 3x cuDNN's depthwise conv; fwd+bwd >= 2x.
CUDA_TARGETS = {"sparse % of copy bw": (">=", 80.0), "dw / sparse": (">=", 3.0), "dw fb / sparse fb": (">=", 2.0)}


def grouped_shifts(channels: int) -> torch.Tensor:
    """Wu et al.'s grouped shift: consecutive channel groups on the 9 offsets of the 3x3 neighbourhood."""
    offsets = torch.tensor([[i, j] for i in (-1, 0, 1) for j in (-1, 0, 1)], dtype=torch.float32)
    per = channels // 9
    s = torch.zeros(channels, 2)
    s[:per * 9] = offsets.repeat_interleave(per, 0)
    return s


def forward_backward(fn: Callable[[], torch.Tensor], grad: torch.Tensor) -> Callable[[], None]:
    return lambda: fn().backward(grad)


def bench_shape(shape, channels_last: bool, min_run_time: float, with_reference: bool,
                device: torch.device = torch.device("cpu")) -> Dict[str, object]:
    n, c, h, w = shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(*shape).to(device).contiguous(memory_format=fmt)
    gen = torch.Generator().manual_seed(0)
    s = (torch.rand(c, 2, generator=gen) * 2 - 1).to(device)
    sg = grouped_shifts(c).to(device)
    conv = torch.nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False).to(device, memory_format=fmt)
    shift = fxeff.ops.shift
    t: Dict[str, float] = {}
    with torch.no_grad():
        t["clone"] = measure(lambda: x.clone(), min_run_time)
        t["dw"] = measure(lambda: conv(x), min_run_time)
        t["sparse"] = measure(lambda: shift(x, s, "zeros", "sparse"), min_run_time)
        t["grouped"] = measure(lambda: shift(x, sg, "zeros", "grouped"), min_run_time)
        t["active"] = measure(lambda: shift(x, s, "zeros", "active"), min_run_time)
        if with_reference:
            t["reference"] = measure(lambda: shift_reference(x, s, "zeros", "sparse"), min_run_time)
    xg = x.clone().requires_grad_()
    sr = s.clone().requires_grad_()
    g = torch.randn_like(x)
    t["dw fb"] = measure(forward_backward(lambda: conv(xg), g), min_run_time)
    t["sparse fb"] = measure(forward_backward(lambda: shift(xg, sr, "zeros", "sparse"), g), min_run_time)
    t["active fb"] = measure(forward_backward(lambda: shift(xg, sr, "zeros", "active"), g), min_run_time)
    row: Dict[str, object] = {"shape": "x".join(map(str, shape)), "format": "channels_last" if channels_last else "NCHW"}
    row.update({f"{k} ms": v * 1e3 for k, v in t.items()})
    row["sparse / clone"] = t["sparse"] / t["clone"]
    row["grouped / clone"] = t["grouped"] / t["clone"]
    row["dw / sparse"] = t["dw"] / t["sparse"]
    row["dw / grouped"] = t["dw"] / t["grouped"]
    row["dw / active"] = t["dw"] / t["active"]
    row["dw fb / sparse fb"] = t["dw fb"] / t["sparse fb"]
    row["dw fb / active fb"] = t["dw fb"] / t["active fb"]
    if with_reference:
        row["reference / sparse"] = t["reference"] / t["sparse"]
    if device.type == "cuda":  # achieved bandwidth: the bytes read (x) + written (out) per call / time
        moved = 2 * x.numel() * x.element_size()
        row["sparse GB/s"] = moved / t["sparse"] / 1e9
        row["clone GB/s"] = moved / t["clone"] / 1e9
        row["sparse % of copy bw"] = 100 * t["clone"] / t["sparse"]
    targets = CUDA_TARGETS if device.type == "cuda" else TARGETS
    missed = [k for k, (op, bound) in targets.items()
              if not (row[k] <= bound if op == "<=" else row[k] >= bound)]
    row["targets missed"] = ", ".join(missed) if missed else "none"
    return row


def bench_models(runs: int, device: torch.device = torch.device("cpu")) -> List[Dict[str, object]]:
    """Whole MobileNetV2 at 224 (random weights, eval): eager latency and MACs before/after the Shift pass."""
    import torchvision

    from fxeff.passes import Shift

    model = torchvision.models.mobilenet_v2().eval().to(device)
    x = torch.rand(1, 3, 224, 224).to(device)
    return [model_before_after("mobilenet_v2", model, fxeff.transform(model, x, passes=[Shift()]), x, runs)]


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="one shape, shorter timing")
    parser.add_argument("--models", action="store_true", help="also whole MobileNetV2 before/after the Shift pass")
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) pure-PyTorch reference")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    device = args.device
    torch.set_num_threads(args.threads)
    min_run_time = 0.2 if args.quick else 0.6
    shapes = SHAPES[:1] if args.quick else SHAPES
    with_reference = not args.no_reference and device.type == "cpu"
    if device.type == "cuda" and not args.no_reference:
        print("shift.py: on CUDA the pure-PyTorch reference (CPU-only) is skipped", flush=True)
    rows = [bench_shape(shape, cl, min_run_time, with_reference, device) for shape in shapes for cl in (False, True)]
    columns = ["shape", "format", "clone ms", "dw ms", "sparse ms", "grouped ms", "active ms", "sparse / clone",
               "grouped / clone", "dw / sparse", "dw / grouped", "dw / active", "dw fb ms", "sparse fb ms",
               "dw fb / sparse fb", "dw fb / active fb"] + (["reference / sparse"] if with_reference else [])
    if device.type == "cuda":
        columns += ["sparse GB/s", "clone GB/s", "sparse % of copy bw"]
    columns.append("targets missed")
    text = report(f"fxeff.ops.shift vs 3x3 depthwise conv, float32, {device.type}", rows, columns,
                  args.json.replace(".json", "_layers.json") if args.json else "", device)
    if args.models:
        model_rows = bench_models(10 if args.quick else 30, device)
        text += "\n\n" + report(f"Whole model at 224, eager, {device.type}, before/after the Shift pass", model_rows,
                                list(model_rows[0].keys()),
                                args.json.replace(".json", "_models.json") if args.json else "", device)
    write_markdown(args.markdown, text)


if __name__ == "__main__":
    main()
