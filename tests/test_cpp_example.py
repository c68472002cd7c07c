"""examples/cpp: a libtorch program built with CMake dlopens fxeff's op library (no Python symbols),
loads a traced focused model with torch::jit::load, and reproduces the Python outputs."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import fxeff
import fxeff.export
from _deploy_model import CONFIGS, INPUT_A_CORNER, INPUT_B_CORNER, bright_square, focus_config, make_model

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "cpp")
MISSING = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]


def _run(command, **kwargs):
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, command))} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_op_library_needs_no_python():
    """The library a C++ program dlopens links libtorch's C++ libraries only (no libtorch_python, no libpython)."""
    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) is not installed")
    dynamic = _run(["readelf", "-d", fxeff.library_path()])
    needed = [line.split("[", 1)[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert "libtorch_cpu.so" in needed and "libc10.so" in needed
    assert not [lib for lib in needed if "python" in lib], needed


@pytest.fixture(scope="module")
def fxeff_run(tmp_path_factory):
    """The example built into a temp dir (about 30 s on 2 cores)."""
    if MISSING:
        pytest.skip(f"building examples/cpp needs {' and '.join(MISSING)}, not found on PATH")
    build = tmp_path_factory.mktemp("cpp-build")
    _run(["cmake", "-S", EXAMPLE, "-B", build, f"-DPython3_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release"])
    _run(["cmake", "--build", build, "--parallel", "2"], timeout=600)
    return build / "fxeff_run"


@pytest.mark.parametrize("execution", sorted(CONFIGS))
def test_cpp_program_runs_traced_focused_model(fxeff_run, tmp_path, execution):
    model = make_model()
    a, b = bright_square(INPUT_A_CORNER), bright_square(INPUT_B_CORNER)
    gm = fxeff.transform(model, (a,), [CONFIGS[execution]()])
    # traced on a alone; per-image AoIs in a new batch
    stdout = _traced_in_cpp(fxeff_run, tmp_path, gm, a, torch.cat([b, a]))
    assert "input [2, 3, 32, 32] -> output [2, 4, 16, 16]" in stdout


def _traced_in_cpp(fxeff_run, tmp_path, model, example, batch, require_fxeff_ops=True) -> str:
    """``model`` traced on ``example`` and run by the C++ program on ``batch``: its output equals Python's; the
    program's stdout."""
    fxeff.export.trace(model, (example,), tmp_path / "model.pt", require_fxeff_ops=require_fxeff_ops)
    torch.save(batch, tmp_path / "input.pt")
    stdout = _run([fxeff_run, fxeff.library_path(), tmp_path / "model.pt", tmp_path / "input.pt",
                   tmp_path / "output.pt"], timeout=120)
    with torch.no_grad():
        expected = model(batch)
    torch.testing.assert_close(torch.load(tmp_path / "output.pt"), expected, rtol=1e-5, atol=1e-5)
    return stdout


def test_cpp_program_needs_the_op_library(fxeff_run, tmp_path):
    """Loading another library instead of fxeff's leaves the model's fxeff ops unknown to torch::jit::load
    (so the passing run above really used the dlopened ops); a wrong path is reported by dlopen."""
    gm = fxeff.transform(make_model(), (bright_square(INPUT_A_CORNER),), [focus_config()])
    fxeff.export.trace(gm, (bright_square(INPUT_A_CORNER),), tmp_path / "model.pt")
    torch.save(bright_square(INPUT_B_CORNER), tmp_path / "input.pt")
    other = os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so")
    done = subprocess.run([fxeff_run, other, tmp_path / "model.pt", tmp_path / "input.pt", tmp_path / "out.pt"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "fxeff::" in done.stderr, done.stderr
    done = subprocess.run([fxeff_run, tmp_path / "missing.so", "m.pt", "i.pt", "o.pt"], capture_output=True, text=True)
    assert done.returncode == 3 and "dlopen(" in done.stderr and "missing.so" in done.stderr


def test_cpp_program_runs_a_chosen_block_configuration(fxeff_run, tmp_path):
    """fxeff.blocks: the fastest configuration on the front (its pruned convs are fxeff::narrow_conv2d calls where
    the CPU has AVX-512) traced and run by the C++ program, equal to Python's."""
    from fxeff import blocks, reference
    from fxeff.ops.focused_conv2d import direct_strategy_available

    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(reference.dataset("fashion-mnist", "test", limit=32), batch_size=16)
    scalable = blocks.build(reference.load("resnet20", "fashion-mnist").eval(), data, data,
                            sparsities=(0.0, 0.8), epochs=1, progress=False)
    fastest = scalable.series()[0]
    scalable.scale(fastest.choice)
    x = reference.first_images("fashion-mnist", "test", 4)
    stdout = _traced_in_cpp(fxeff_run, tmp_path, scalable.gm, x, x, require_fxeff_ops=direct_strategy_available())
    assert "input [4, 1, 28, 28] -> output [4, 10]" in stdout
