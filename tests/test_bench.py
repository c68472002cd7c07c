"""fxeff.bench and the benchmark scripts' --device flag (fast: no benchmark is run without a GPU)."""
import argparse
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import fxeff
from fxeff import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["focus", "focus_models", "shift", "hetconv", "hetconv_models"]
NO_GPU = "fxeff bench: --device cuda needs a GPU; torch.cuda.is_available() is False"
# The quickest settings of each script, for the GPU run.
QUICK = {"focus": ["--quick", "--formats", "nchw"], "focus_models": ["--quick", "--models", "resnet50"],
         "shift": ["--quick"], "hetconv": ["--quick"],
         "hetconv_models": ["--reference-images", "0", "--models", "vgg16", "--size", "64", "--runs", "2"]}
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_script_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_interleaved_cpu_positive_medians():
    a = torch.randn(64, 64)
    times = bench.interleaved([lambda: a @ a, lambda: a + a], runs=3, warmup=1)
    assert len(times) == 2 and all(t > 0 for t in times)


def test_interleaved_rotates_the_order_every_round():
    # Each fn follows each other fn equally often, so a slow-after-a-large-call effect is spread over all of them.
    calls = []
    fns = [lambda i=i: calls.append(i) for i in range(3)]
    bench.interleaved(fns, runs=3, warmup=1)
    rounds = [calls[3 + 3 * r:6 + 3 * r] for r in range(3)]
    assert calls[:3] == [0, 1, 2] and rounds == [[0, 1, 2], [1, 2, 0], [2, 0, 1]]


def test_device_arg():
    assert bench.device_arg("cpu") == torch.device("cpu")
    with pytest.raises(argparse.ArgumentTypeError, match="cpu or cuda"):
        bench.device_arg("meta")
    with pytest.raises(argparse.ArgumentTypeError, match="cpu or cuda"):
        bench.device_arg("gpu0")
    assert "gpu" not in bench.environment("cpu")


@needs_no_gpu
def test_device_arg_cuda_without_gpu():
    with pytest.raises(argparse.ArgumentTypeError) as info:
        bench.device_arg("cuda")
    assert str(info.value) == NO_GPU


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_parser_shared_options(name):
    parser = _script(name).build_parser()
    defaults = parser.parse_args([])
    assert (defaults.device, defaults.threads, defaults.json, defaults.markdown) == (torch.device("cpu"), 2, "", "")
    args = parser.parse_args(["--device", "cpu", "--threads", "1", "--json", "a.json", "--markdown", "a.md"])
    assert (args.device, args.threads, args.json, args.markdown) == (torch.device("cpu"), 1, "a.json", "a.md")


def test_write_markdown(tmp_path):
    path = tmp_path / "table.md"
    bench.write_markdown(str(path), "| a |\n|---|")
    assert path.read_text() == "| a |\n|---|\n"
    bench.write_markdown("", "not written")  # --markdown not given
    assert list(tmp_path.iterdir()) == [path]


@needs_no_gpu
@pytest.mark.parametrize("name", SCRIPTS)
def test_script_rejects_cuda_without_gpu(name, capsys):
    argv = ["--device", "cuda"] + (["--quick"] if name != "hetconv_models" else [])
    with pytest.raises(SystemExit) as info:
        _script(name).main(argv)
    assert info.value.code == 2
    assert NO_GPU in capsys.readouterr().err


@needs_no_gpu
def test_script_cli_rejects_cuda_without_gpu():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "shift.py"), "--device", "cuda",
                           "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert NO_GPU in proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", SCRIPTS)
def test_script_runs_on_cuda(name):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", f"{name}.py"), "--device", "cuda",
                           *QUICK[name]], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu " in proc.stdout and "cuda " in proc.stdout  # environment() names the GPU and the CUDA version


def test_peak_memory_sees_the_tensors_alive_at_once():
    from fxeff.bench import peak_memory

    x = torch.randn(64, 1024)  # 256 KiB
    size = x.numel() * 4

    def three_kept():
        a = x * 2
        b = a + 1
        return a, b, b * 3  # x, a, b and the product alive at once

    def two_at_a_time():
        return ((x * 2).relu_() + 1).relu_()  # x, the product, the sum; then in place

    more, fewer = peak_memory(three_kept), peak_memory(two_at_a_time)
    assert more >= 4 * size
    assert 3 * size <= fewer < more


def test_hetconv_rows_time_each_strategy_forced_and_restore_the_auto_pick():
    hetconv = _script("hetconv")
    row = hetconv.bench_row(16, 8, 1, 4, 3, False, False, 0.01, 1, strategies=True)
    assert all(row[f"{s} ms"] > 0 for s in hetconv.STRATEGIES) and row["fastest"] in hetconv.STRATEGIES
    assert row["max abs err"] < 1e-4
    row = hetconv.bench_row(16, 8, 1, 4, 3, True, False, 0.01, 1, strategies=True)
    assert all(row[f"{s} ms"] > 0 for s in hetconv.STRATEGIES)  # direct runs channels_last too (its own kernel)
    assert row["max abs err"] < 1e-4
    assert torch.ops.fxeff._hetconv2d_set_strategy("auto", 0) == "auto"  # each forced run restored the pick


def test_hetconv_models_latency_rows_time_reference_models_in_a_memory_format():
    models = _script("hetconv_models")
    rows = models.latency_rows(["reference:resnet20"], 4, 224, 1, memory_format="channels_last", reference_batch=2)
    (row,) = rows
    assert row["model"] == "reference:resnet20" and row["input"] == "2x1x64x64" and row["format"] == "channels_last"
    assert 0.3 < row["MAC ratio"] < 0.45 and row["rewritten"] > 0 and row["dense ms"] > 0 and row["fxeff ms"] > 0
    assert row["BatchNorms"] == "as trained"
    (folded,) = models.latency_rows(["reference:resnet20"], 4, 224, 1, memory_format="channels_last",
                                    reference_batch=2, fold_batch_norm=True)
    assert folded["BatchNorms"] == "folded" and folded["MAC ratio"] == row["MAC ratio"]
    assert folded["rewritten"] == row["rewritten"]


def test_shift_models_rows_time_the_fused_shift_network():
    """benchmarks/shift.py --models: the fine-tuned reference MobileNetV2, its shift network fused (every depthwise
    layer), checked against the unfused one and timed side by side in the asked memory format."""
    shift = _script("shift")
    rows = shift.bench_models(["reference:mobilenetv2"], [2], ["channels_last"], runs=1)
    (row,) = rows
    assert row["model"] == "reference:mobilenetv2" and row["batch"] == 2 and row["format"] == "channels_last"
    fused, total = (int(v) for v in row["fused sites"].split("/"))
    assert fused == total > 0 and row["fused vs shifted error"] < 1e-4
    assert row["dense ms"] > 0 and row["shifted ms"] > 0 and row["fused ms"] > 0
    assert row["dense folded ms"] > 0 and row["fused folded ms"] > 0 and row["folded: fused / dense"] > 0


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="mallopt is glibc's")
def test_keep_freed_memory_applies_and_is_reported(monkeypatch):
    """keep_freed_memory sets glibc's thresholds (mallopt) and the environment line says so; the scripts' option
    applies it unless --default-malloc."""
    monkeypatch.setattr(bench, "_KEEP_FREED_MEMORY", False)
    assert "malloc" not in bench.environment()
    parser = argparse.ArgumentParser()
    bench.add_malloc_option(parser)
    bench.apply_malloc_option(parser.parse_args(["--default-malloc"]))
    assert "malloc" not in bench.environment()
    bench.apply_malloc_option(parser.parse_args([]))
    assert bench.environment()["malloc"] == "freed memory kept"
    assert bench.keep_freed_memory() is True


def test_interleaved_in_fresh_process_times_pickled_modules():
    """Two modules (a plain one and an fx GraphModule of a pass) timed in a child process: two positive medians;
    a module that fails there raises with the child's error."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    x = torch.randn(1, 3, 8, 8)
    folded = fxeff.transform(model, x, passes=[fxeff.FoldBatchNorm()])
    times = bench.interleaved_in_fresh_process([model, folded], x, runs=3)
    assert len(times) == 2 and all(t > 0 for t in times)
    with pytest.raises(RuntimeError, match="the timing process failed"):
        bench.interleaved_in_fresh_process([torch.nn.Linear(5, 5)], x, runs=1)
