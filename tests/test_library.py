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


def test_autograd_lives_in_the_library():
    """The ops' autograd is C++ (csrc/ops/autograd.cpp): loaded without fxeff's Python, as a libtorch program loads
    it, the library alone trains: gradients of focused_conv2d, shift and tile_conv2d against F.conv2d's."""
    code = """
import torch, sys, torch.nn.functional as F
torch.ops.load_library(sys.argv[1])
x = torch.randn(2, 3, 6, 6, requires_grad=True); w = torch.randn(4, 3, 3, 3, requires_grad=True)
mask = torch.ones(2, 6, 6, dtype=torch.bool)
torch.ops.fxeff.focused_conv2d(x, w, None, mask, [1, 1], [1, 1], [1, 1], 1).sum().backward()
gx, gw = x.grad.clone(), w.grad.clone(); x.grad = w.grad = None
F.conv2d(x, w, None, 1, 1).sum().backward()
assert torch.allclose(gx, x.grad, atol=1e-5) and torch.allclose(gw, w.grad, atol=1e-4)
x.grad = w.grad = None
torch.ops.fxeff.tile_conv2d(x, w, None, [1, 1], [1, 1], 1).sum().backward()
gx, gw = x.grad.clone(), w.grad.clone(); x.grad = w.grad = None
F.conv2d(x, w).sum().backward()
assert torch.allclose(gx, x.grad, atol=1e-5) and torch.allclose(gw, w.grad, atol=1e-4)
s = torch.zeros(3, 2, requires_grad=True)
torch.ops.fxeff.shift(x, s, "zeros", "active").sum().backward()
assert s.grad is not None and s.grad.shape == (3, 2)
"""
    subprocess.run([sys.executable, "-c", code, fxeff.library_path()], check=True)


def test_library_has_no_python_dependency():
    # A libtorch C++ program must be able to dlopen the library: no libpython/libtorch_python needed.
    out = subprocess.run(["ldd", fxeff.library_path()], capture_output=True, text=True).stdout
    assert "libtorch_python" not in out and "libpython" not in out, out
