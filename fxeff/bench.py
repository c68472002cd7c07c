"""The one benchmark helper: side-by-side timings as medians of repeats, tables as markdown + JSON.

Every benchmark (benchmarks/*.py, ``fxeff demo``/``bench``) times its candidates here in one process,
reports ratios against a baseline measured in the same run, and prints ``environment()`` with the
table: the machines are shared, so absolute times move and ratios are what the tables claim.
"""
import argparse
import json
import platform
import statistics
import time
from typing import Callable, Dict, List, Sequence, Tuple, Union

import torch
import torch.utils.benchmark as tbench

Column = Union[str, Tuple[str, str]]  # a row key, or (row key, header)


def device_arg(text: str) -> torch.device:
    """``--device`` of every benchmark script (argparse ``type=``): cpu or cuda[:i]; cuda without a GPU is a clear
    error (argparse prints it and exits with status 2)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"fxeff bench: --device must be cpu or cuda, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"fxeff bench: --device must be cpu or cuda, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                "fxeff bench: --device cuda needs a GPU; torch.cuda.is_available() is False")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"fxeff bench: --device {text}: only {torch.cuda.device_count()} GPU(s) visible")
    return device


def script_parser(doc: str) -> argparse.ArgumentParser:
    """The argument parser every benchmark script starts from (its module docstring as the help), with the
    options they share: ``--threads``, ``--json``, ``--markdown`` and ``--device cpu|cuda``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--json", default="", help="write the rows and the environment as JSON here")
    parser.add_argument("--markdown", default="", help="write the markdown tables here")
    parser.add_argument("--device", type=device_arg, default="cpu",
                        help="cpu (default) or cuda: where every tensor and model of the run lives")
    return parser


def add_malloc_option(parser: argparse.ArgumentParser) -> None:
    """``--default-malloc`` of the whole-model benchmarks: by default they call ``keep_freed_memory`` first
    (``apply_malloc_option``), so that the models' latencies do not depend on what the process freed before."""
    parser.add_argument("--default-malloc", action="store_true",
                        help="time with glibc's default malloc (by default it keeps freed memory: "
                             "fxeff.bench.keep_freed_memory; the environment line says which)")


def apply_malloc_option(args: argparse.Namespace) -> None:
    if not args.default_malloc:
        keep_freed_memory()


def write_markdown(path: str, text: str) -> None:
    """``--markdown``: the tables a script printed, to a file (nothing when ``path`` is empty)."""
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")


def _on_cuda(device: Union[str, torch.device, None]) -> bool:
    if device is None:  # unspecified: whether this process has put work on a GPU
        return torch.cuda.is_available() and torch.cuda.is_initialized()
    return torch.device(device).type == "cuda"


def _sync() -> None:
    """Waits for queued GPU work, if this process has any (a CPU-only run never initializes CUDA: no-op)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def environment(device: Union[str, torch.device, None] = None) -> Dict[str, object]:
    """What the numbers depend on: printed with every table. The GPU name and CUDA version are listed only
    when the run is on CUDA (``device`` cuda, or no device given and this process has used a GPU)."""
    env: Dict[str, object] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    if _KEEP_FREED_MEMORY:
        env["malloc"] = "freed memory kept"
    if _on_cuda(device):
        index = torch.device(device).index if device is not None else None
        env.update(device="cuda", gpu=torch.cuda.get_device_name(index), cuda=torch.version.cuda)
    return env


_KEEP_FREED_MEMORY = False
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def keep_freed_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Tells glibc's malloc to keep the memory freed in this process instead of returning it to the OS (``mallopt``
    M_MMAP_THRESHOLD and M_TRIM_THRESHOLD: what ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...:
    glibc.malloc.trim_threshold=...`` does at start-up). By default a block above the mmap threshold (128 KiB until
    a larger block is freed) is mapped for each allocation and page-faulted in on first touch (about 2.5 us per 4 KiB
    page here), so a model's activations cost page faults on every call, more or less depending on what the process
    freed before: the same reference ResNet-20 measured 4.9 or 7.3 ms per batch in one process. Whole-model latencies
    are then a property of the allocator's history; with this they are not. It applies to every model timed after it
    alike; ``environment()`` says so. Returns whether it applied (False where the C library is not glibc)."""
    global _KEEP_FREED_MEMORY
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    applied = bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(
        mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
    _KEEP_FREED_MEMORY = _KEEP_FREED_MEMORY or applied
    return applied


def measure(fn: Callable[[], object], min_run_time: float = 0.5, repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` blocked_autorange runs, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync()
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    medians = sorted(timer.blocked_autorange(min_run_time=min_run_time / repeats).median for _ in range(repeats))
    return medians[len(medians) // 2]


def interleaved(fns: Sequence[Callable[[], object]], runs: int, warmup: int = 2) -> List[float]:
    """Median seconds per call of each fn, the fns run in turn in every round (under no_grad) so that the
    machine's noise hits them alike; for whole models, where one call is long. Round r starts at fn r mod len(fns),
    so each fn follows each other one equally often: a call measured 5-20% slower right after a large model's call
    (whose freed buffers glibc hands back to the OS) than after a small one, which a fixed order charged to one fn.
    When the process has GPU work (CUDA initialized), the GPU is synchronized before starting and before stopping
    each call's clock, so a call's time includes its kernels; on a CPU-only run nothing changes."""
    times: List[List[float]] = [[] for _ in fns]
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns:
                fn()
        for r in range(runs):
            for k in range(len(fns)):
                i = (r + k) % len(fns)
                fn = fns[i]
                _sync()
                start = time.perf_counter()
                fn()
                _sync()
                times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def interleaved_in_fresh_process(modules: Sequence[torch.nn.Module], x: torch.Tensor, runs: int, warmup: int = 2,
                                 keep_freed: bool = True, timeout: float = 1800.0) -> List[float]:
    """``interleaved`` over ``module(x)`` for each module, run in a new Python process (this interpreter, this
    process's thread count): the modules and ``x`` are saved with ``torch.save`` to a temporary directory and timed
    there, after ``keep_freed_memory()`` when ``keep_freed``. Nothing the caller ran before (other models and their
    caches, the allocator's state, thread pools of other libraries) is in that process: the modules are timed as a
    deployment runs them, alone. It does not shield from the machine itself (docs/benchmarks.md, fifteenth session:
    spells of slower runs on a shared VM; repeat and take the median). Costs a process start (a few seconds:
    importing torch and fxeff). The modules must pickle (``nn.Module``s and fx ``GraphModule``s of fxeff's passes
    do). Raises RuntimeError with the child's error output when it fails."""
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fxeff-bench-") as folder:
        path = os.path.join(folder, "timed.pt")
        torch.save({"modules": list(modules), "x": x.detach(), "runs": int(runs), "warmup": int(warmup),
                    "keep_freed": bool(keep_freed), "threads": torch.get_num_threads()}, path)
        code = "import sys, fxeff.bench as b; b._time_saved(sys.argv[1])"
        done = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=timeout)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"fxeff.bench.interleaved_in_fresh_process: the timing process failed (exit "
                           f"{done.returncode}):\n{done.stderr[-3000:]}")
    return [float(t) for t in json.loads(lines[-1])["seconds"]]


def _time_saved(path: str) -> None:
    """The child of ``interleaved_in_fresh_process``: times what ``path`` holds, prints {"seconds": [...]}."""
    import importlib

    importlib.import_module("fxeff")  # registers the ops the saved modules call
    spec = torch.load(path, weights_only=False)
    torch.set_num_threads(spec["threads"])
    if spec["keep_freed"] and not keep_freed_memory():
        raise RuntimeError("fxeff.bench: keep_freed_memory needs glibc's mallopt, which this C library lacks")
    x = spec["x"]
    fns = [(lambda m=m: m(x)) for m in spec["modules"]]
    print(json.dumps({"seconds": interleaved(fns, spec["runs"], spec["warmup"])}), flush=True)


def macs(fn: Callable[[], object]) -> int:
    """MACs of one call of ``fn`` from torch.utils.flop_counter (FLOPs / 2; fxeff's ops count what they
    compute: focused_conv2d only its active outputs, hetconv2d its KxK and 1x1 parts)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops() // 2


def peak_memory(fn: Callable[[], object]) -> int:
    """Bytes of the CPU tensors alive at once at the peak of one call of ``fn`` (no_grad): parameters, inputs and
    intermediates, as torch.profiler's memory timeline attributes the allocator's events to tensors (its CPU
    timeline has no successor yet: torch deprecates it in favour of CUDA-only snapshots). Measured, where
    fxeff.blocks' peak_activation_bytes is the graph's liveness."""
    import os
    import tempfile
    import warnings

    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                                  with_stack=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            prof.export_memory_timeline(path, device="cpu")
        with open(path) as f:
            _, sizes = json.load(f)
    finally:
        os.remove(path)
    return max((sum(s) for s in sizes), default=0)


def markdown_table(rows: Sequence[Dict[str, object]], columns: Sequence[Column]) -> str:
    """Rows of dicts as a markdown table; floats with 3 significant digits, booleans as yes/NO."""
    def cell(v):
        if isinstance(v, bool):
            return "yes" if v else "NO"
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    pairs = [(c, c) if isinstance(c, str) else c for c in columns]
    lines = ["| " + " | ".join(h for _, h in pairs) + " |", "|" + "---|" * len(pairs)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k, _ in pairs) + " |" for r in rows]
    return "\n".join(lines)


def report(title: str, rows: List[Dict[str, object]], columns: Sequence[Column], json_path: str = "",
           device: Union[str, torch.device, None] = None) -> str:
    """Prints (and returns) the environment line (``environment(device)``) and the table; writes rows +
    environment as JSON if asked."""
    env = environment(device)
    text = f"### {title}\n\n" + ", ".join(f"{k} {v}" for k, v in env.items()) + "\n\n" + markdown_table(rows, columns)
    print(text, flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"title": title, "environment": env, "rows": rows}, f, indent=1)
    return text


def model_before_after(name: str, model: torch.nn.Module, rewritten: torch.nn.Module, x: torch.Tensor,
                       runs: int) -> Dict[str, object]:
    """One table row for a whole model and its rewrite by fxeff (``rewritten.fxeff_report``): latencies timed
    in turn (medians of ``runs``), MACs before/after, and efficiency = speedup / (MACs before / MACs after)."""
    rep = rewritten.fxeff_report
    before, after = interleaved([lambda: model(x), lambda: rewritten(x)], runs)
    ratio = rep.model_macs_after / rep.model_macs_before
    return {"model": name, "input": "x".join(map(str, x.shape)), "dense ms": before * 1e3,
            "fxeff ms": after * 1e3, "speedup": before / after, "MACs before (G)": rep.model_macs_before / 1e9,
            "MACs after (G)": rep.model_macs_after / 1e9, "MAC ratio": ratio, "efficiency": before / after * ratio,
            "rewritten": len(rep.rewritten), "skipped": len(rep.skipped)}


def run_parts(parser: argparse.ArgumentParser, parts: Dict[str, Callable], argv=None) -> Dict[str, object]:
    """The main of a benchmark script made of parts (``--parts``, a comma list of ``parts``' keys; each part
    takes the parsed arguments and returns (title, rows, columns)): runs them in turn at ``--threads``, prints each
    table (``report``), writes the JSON (``--json``: the environment and every part's rows) and the markdown
    (``--markdown``). Returns the parts' results by name."""
    args = parser.parse_args(argv)
    names = [p for p in args.parts.split(",") if p]
    for name in names:
        if name not in parts:
            parser.error(f"--parts takes {', '.join(parts)}; got {name!r}")
    torch.set_num_threads(args.threads)
    texts, results = [], {}
    for name in names:
        title, rows, columns = parts[name](args)
        texts.append(report(title, rows, columns))
        results[name] = {"title": title, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "parts": results}, f, indent=1)
    write_markdown(args.markdown, "\n\n".join(texts))
    return results
