"""Shift layers vs the 3x3 depthwise conv they replace, and vs x.clone() (the memcpy floor).

Per shape and memory format, side by side in one run (medians of repeats): x.clone(), nn.Conv2d 3x3
depthwise (padding 1, no bias), fxeff.ops.shift in modes sparse / grouped / active, and the pure-PyTorch
reference (tests/_shift_reference.py). Forward, and forward+backward (input and weight/shift gradients). On the
CPU also a MobileNet block's tail, inference: depthwise conv -> BatchNorm -> ReLU6 -> 1x1 conv to C/4 channels,
the same with the sparse shift in place of the conv, and fxeff.ops.shift_conv1x1 (all four in one op).
Shifts: uniform(-1, 1) per channel (a fresh Shift2d's range) for sparse/active; for grouped the
9 offsets of the 3x3 neighbourhood on consecutive channel groups. With --models, whole models (MobileNetV2,
MobileNetV3-Large, EfficientNet-Lite0 at 224 with every depthwise conv shifted; the fine-tuned reference MobileNetV2
on Cluttered Fashion-MNIST) at batch 1 and 8 in NCHW and channels_last: the original, the shift network, and the
shift network after FuseShift (the shift, its BatchNorm, ReLU6 and the 1x1 conv in one fxeff::shift_conv1x1), timed
in turn.

With --device cuda everything runs on the GPU, against cuDNN's depthwise conv and issue 6's GPU targets
(fxeff's sparse forward >= 80% of x.clone()'s device-to-device bandwidth and >= 3x the depthwise conv,
forward+backward >= 2x); extra columns give the achieved bandwidth of the sparse forward and of x.clone() in
GB/s (bytes read + written / time) and their ratio. The pure-PyTorch reference is CPU-only: skipped on CUDA.

    python benchmarks/shift.py [--quick] [--threads 2] [--device cpu|cuda] [--models] [--model-names a,b]
        [--batches 1,8] [--formats nchw,channels_last] [--runs N] [--json out.json] [--markdown out.md]
"""
import argparse
import os
import sys
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
import fxeff  # noqa: E402
from _shift_reference import shift_reference  # noqa: E402
from fxeff.bench import (add_malloc_option, apply_malloc_option, interleaved, measure, report,  # noqa: E402
                         script_parser, write_markdown)

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
        if device.type == "cpu":  # the MobileNet block tail: dw, BatchNorm, ReLU6, 1x1 conv to c/4 vs the fused op
            bn = torch.nn.BatchNorm2d(c).eval()
            pw = torch.nn.Conv2d(c, c // 4, 1, bias=False).to(memory_format=fmt)
            scale = bn.weight / (bn.running_var + bn.eps).sqrt()
            offset = bn.bias - bn.running_mean * scale
            t["dw+bn+relu6+1x1"] = measure(lambda: pw(F.relu6(bn(conv(x)))), min_run_time)
            t["shift+bn+relu6+1x1"] = measure(lambda: pw(F.relu6(bn(shift(x, s, "zeros", "sparse")))), min_run_time)
            t["fused"] = measure(lambda: fxeff.ops.shift_conv1x1(x, s, "zeros", "sparse", [0] * 4, [1, 1], scale,
                                                                 offset, 0.0, 6.0, pw.weight, None), min_run_time)
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
    if "fused" in t:
        row["dw block / fused"] = t["dw+bn+relu6+1x1"] / t["fused"]
        row["shift block / fused"] = t["shift+bn+relu6+1x1"] / t["fused"]
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


MODELS = ("mobilenet_v2", "mobilenet_v3_large", "efficientnet-lite0", "reference:mobilenetv2")
REFERENCE_DATASET = "cluttered-fashion-mnist"
MODEL_TARGET = 0.85  # the bound on fused / dense latency at batch 1 and 8


def _model_and_input(name: str, batch: int, device: torch.device):
    """(original, shifted, input): a torchvision model / EfficientNet-Lite0 (real weights when installed) at 224,
    every depthwise conv shifted (lstsq on the input), or ``reference:mobilenetv2``, fxeff's trained MobileNetV2 and
    its committed fine-tuned sparse-shift model on the first ``batch`` test images of Cluttered Fashion-MNIST."""
    from fxeff import models, reference
    from fxeff.passes import Shift

    if name.startswith("reference:"):
        arch = name.split(":", 1)[1]
        test = reference.dataset(REFERENCE_DATASET, "test", limit=batch)
        x = torch.stack([test[i][0] for i in range(len(test))]).to(device)
        return (reference.load(arch, REFERENCE_DATASET).eval().to(device),
                reference.load_finetuned(arch, REFERENCE_DATASET, "shift sparse").eval().to(device), x)
    model = models.load_model(name if name == models.EFFICIENTNET_LITE0 else f"torchvision:{name}").eval().to(device)
    x = torch.rand(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    return model, fxeff.transform(model, x, passes=[Shift()]).eval(), x


def bench_models(names, batches, formats, runs: int, device: torch.device = torch.device("cpu")
                 ) -> List[Dict[str, object]]:
    """Per model, batch and memory format, timed in turn (medians of ``runs``): the original, the shift network
    (every depthwise conv a shift) and the shift network after FuseShift (shift + BatchNorm + clamp + 1x1 conv in
    one op); and both deployed alike, with every other BatchNorm folded into its conv (fxeff.FoldBatchNorm): the
    original folded against the fused network folded, the fair ratio (folding removes from the original the
    BatchNorm passes that fusing removes from the shift network). The fused and unfused shift networks are checked
    to agree first."""
    from fxeff.passes import FoldBatchNorm, FuseShift

    rows = []
    for name in names:
        for batch in batches:
            model, shifted, x = _model_and_input(name, batch, device)
            fused = fxeff.transform(shifted, x, passes=[FuseShift()])
            report_ = fused.fxeff_report
            for fmt in formats:
                memory_format = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}[fmt]
                m, s, f = (k.to(memory_format=memory_format) for k in (model, shifted, fused))
                xf = x.contiguous(memory_format=memory_format)
                # folded after the conversion: the folded weights keep the format's strides
                mb, fb = (fxeff.transform(k, xf, passes=[FoldBatchNorm()]).eval() for k in (m, f))
                with torch.no_grad():
                    want, got = s(xf), f(xf)
                error = float((got - want).norm() / want.norm().clamp_min(1e-30))
                if error > 1e-4:
                    raise RuntimeError(f"shift.py: {name} fused differs from the shift network by {error:.3g}")
                dense, unfused, fused_t, dense_fb, fused_fb = interleaved(
                    [lambda: m(xf), lambda: s(xf), lambda: f(xf), lambda: mb(xf), lambda: fb(xf)], runs)
                rows.append({"model": name, "batch": batch, "format": fmt, "dense ms": dense * 1e3,
                             "shifted ms": unfused * 1e3, "fused ms": fused_t * 1e3,
                             "shifted / dense": unfused / dense, "fused / dense": fused_t / dense,
                             "fused sites": f"{len(report_.rewritten)}/{len(report_.sites)}",
                             "fused vs shifted error": error,
                             f"met (<= {MODEL_TARGET})": "yes" if fused_t / dense <= MODEL_TARGET else "no",
                             "dense folded ms": dense_fb * 1e3, "fused folded ms": fused_fb * 1e3,
                             "folded: fused / dense": fused_fb / dense_fb,
                             f"folded met (<= {MODEL_TARGET})": "yes" if fused_fb / dense_fb <= MODEL_TARGET else "no"})
                print(rows[-1], flush=True)
    return rows


def layer_table(args, shapes, min_run_time: float, with_reference: bool, device: torch.device) -> str:
    """The one-layer table: the shift ops against the 3x3 depthwise conv and x.clone()."""
    rows = [bench_shape(shape, cl, min_run_time, with_reference, device) for shape in shapes for cl in (False, True)]
    columns = ["shape", "format", "clone ms", "dw ms", "sparse ms", "grouped ms", "active ms", "sparse / clone",
               "grouped / clone", "dw / sparse", "dw / grouped", "dw / active", "dw fb ms", "sparse fb ms",
               "dw fb / sparse fb", "dw fb / active fb"] + (["reference / sparse"] if with_reference else [])
    if device.type == "cpu":
        columns += ["dw+bn+relu6+1x1 ms", "shift+bn+relu6+1x1 ms", "fused ms", "dw block / fused",
                    "shift block / fused"]
    if device.type == "cuda":
        columns += ["sparse GB/s", "clone GB/s", "sparse % of copy bw"]
    columns.append("targets missed")
    return report(f"fxeff.ops.shift vs 3x3 depthwise conv, float32, {device.type}", rows, columns,
                  args.json.replace(".json", "_layers.json") if args.json else "", device)


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="one shape, shorter timing")
    parser.add_argument("--models", action="store_true",
                        help="also whole models: original, shift network and shift network fused (FuseShift)")
    parser.add_argument("--model-names", default=",".join(MODELS),
                        help=f"with --models: comma list of {', '.join(MODELS)} (default: all)")
    parser.add_argument("--batches", default="1,8", help="with --models: batch sizes (default 1,8)")
    parser.add_argument("--formats", default="nchw,channels_last", help="with --models: memory formats")
    parser.add_argument("--runs", type=int, default=0, help="with --models: timed rounds (default 30, 10 --quick)")
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) pure-PyTorch reference")
    parser.add_argument("--skip-layers", action="store_true", help="with --models: only the whole-model table")
    add_malloc_option(parser)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    device = args.device
    torch.set_num_threads(args.threads)
    apply_malloc_option(args)
    min_run_time = 0.2 if args.quick else 0.6
    shapes = SHAPES[:1] if args.quick else SHAPES
    with_reference = not args.no_reference and device.type == "cpu"
    if device.type == "cuda" and not args.no_reference:
        print("shift.py: on CUDA the pure-PyTorch reference (CPU-only) is skipped", flush=True)
    text = ""
    if not (args.models and args.skip_layers):
        text = layer_table(args, shapes, min_run_time, with_reference, device)
    if args.models:
        names = [n for n in args.model_names.split(",") if n]
        unknown = [n for n in names if n not in MODELS]
        if unknown:
            raise SystemExit(f"shift.py: --model-names takes {', '.join(MODELS)}; got {unknown}")
        model_rows = bench_models(names, [int(b) for b in args.batches.split(",")], args.formats.split(","),
                                  args.runs or (10 if args.quick else 30), device)
        text += "\n\n" + report(f"Whole models, eager, {device.type}: original vs shift network vs shift network "
                                f"fused, "
                                f"then the original and the fused network with their BatchNorms folded (torchvision / "
                                f"EfficientNet-Lite0 at 224, the reference model on test images)",
                                model_rows, list(model_rows[0].keys()),
                                args.json.replace(".json", "_models.json") if args.json else "", device)
    write_markdown(args.markdown, text)


if __name__ == "__main__":
    main()
