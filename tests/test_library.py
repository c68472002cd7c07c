"""The operator library loads the documented ways and registers the fxeff namespace."""
import os
import subprocess
import sys

import torch

import fxeff


def test_library_path_exists():
    assert os.path.isfile(fxeff.library_path())


def test_ops_registered():
    for name in ("aoi_mask", "mask_resize", "focused_conv2d", "focused_conv2d_backward"):
        assert hasattr(torch.ops.fxeff, name), name


def test_load_library_without_import_fxeff():
    code = (
        "import torch, sys; torch.ops.load_library(sys.argv[1]); "
        "m = torch.ops.fxeff.aoi_mask(torch.ones(1, 2, 3, 3), 1.5, 'sum'); "
        "assert m.dtype == torch.bool and bool(m.all())"
    )
    subprocess.run([sys.executable, "-c", code, fxeff.library_path()], check=True)


def test_library_has_no_python_dependency():
    # A libtorch C++ program must be able to dlopen the library: no libpython/libtorch_python needed.
    out = subprocess.run(["ldd", fxeff.library_path()], capture_output=True, text=True).stdout
    assert "libtorch_python" not in out and "libpython" not in out, out
