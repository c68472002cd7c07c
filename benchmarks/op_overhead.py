"""Per-call overhead of fxeff's ops: the cost of a call before any work, on the smallest inputs.

Issue 13's target: below 2 us per call on the no-grad path (it was about 6.5 us, the Python autograd
registration that every call entered). Each op is called under no_grad on 1-4 element tensors, normally and
below the autograd key (``torch._C._AutoDispatchBelowAutograd``, the kernel alone); the difference is what the
autograd layer costs. aten.conv2d is the yardstick. Medians of --repeats blocked_autorange runs.

    .venv/bin/python benchmarks/op_overhead.py [--json out.json] [--markdown out.md]
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fxeff.bench import measure, report, script_parser, write_markdown  # noqa: E402

import fxeff  # noqa: E402,F401  (loads the ops)

COLUMNS = ["op", "no_grad us", "kernel alone us", "autograd layer us", "target met"]


def cases():
    x = torch.randn(1, 1, 2, 2)
    w = torch.randn(1, 1, 1, 1)
    mask = torch.ones(1, 2, 2, dtype=torch.bool)
    shifts = torch.zeros(1, 2)
    xh, wk, w1 = torch.randn(1, 4, 3, 3), torch.randn(4, 1, 3, 3), torch.randn(4, 3)
    ops = torch.ops.fxeff
    return {
        "aten.conv2d (yardstick)": lambda: torch.ops.aten.conv2d.default(x, w),
        "fxeff.focused_conv2d": lambda: ops.focused_conv2d.default(x, w, None, mask, [1, 1], [0, 0], [1, 1], 1),
        "fxeff.shift": lambda: ops.shift.default(x, shifts, "zeros", "sparse"),
        "fxeff.shift_pool": lambda: ops.shift_pool.default(x, shifts, "zeros", "sparse", [0, 0, 0, 0], [2, 2]),
        "fxeff.hetconv2d": lambda: ops.hetconv2d.default(xh, wk, w1, None, 4, [1, 1], [1, 1], [1, 1]),
        "fxeff.aoi_mask": lambda: ops.aoi_mask.default(x, 0.0, "sum"),
        "fxeff.mask_resize": lambda: ops.mask_resize.default(mask, [1, 1]),
    }


def main():
    parser = script_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with torch.no_grad():
        for name, fn in cases().items():
            normal = measure(fn, min_run_time=1.0, repeats=args.repeats, warmup=200) * 1e6
            with torch._C._AutoDispatchBelowAutograd():
                alone = measure(fn, min_run_time=1.0, repeats=args.repeats, warmup=200) * 1e6
            rows.append({"op": name, "no_grad us": normal, "kernel alone us": alone,
                         "autograd layer us": normal - alone, "target met": normal - alone < 2.0})
    text = report("Per-call overhead of fxeff's ops (no_grad, smallest inputs)", rows, COLUMNS, args.json)
    write_markdown(args.markdown, text)


if __name__ == "__main__":
    main()
