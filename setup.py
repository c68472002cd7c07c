"""Builds fxeff's operator library (C++ CPU kernels, CUDA kernels when enabled).

FXEFF_CUDA=auto (default): compile csrc/ops/cuda/*.cu when nvcc and a CUDA build of torch are
present; 0: never; 1: always (fails when CUDA is not usable). DEBUG=1 builds -O0 -g.
The library is a plain shared object with no Python symbols: Python loads it with
torch.ops.load_library, and a libtorch C++ program can dlopen it.
"""
import glob
import os

if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def use_cuda(cuda_sources):
    flag = os.environ.get("FXEFF_CUDA", "auto").lower()
    if flag not in ("auto", "0", "1"):
        raise ValueError(f"FXEFF_CUDA must be auto, 0 or 1, got {flag!r}")
    usable = bool(torch.version.cuda) and CUDA_HOME is not None and os.path.exists(
        os.path.join(CUDA_HOME, "bin", "nvcc"))
    if flag == "1" and not usable:
        raise RuntimeError(f"FXEFF_CUDA=1 but CUDA is not usable: torch.version.cuda={torch.version.cuda}, "
                           f"CUDA_HOME={CUDA_HOME}")
    return flag != "0" and usable and bool(cuda_sources)


def cuda_runpath():
    """Link flags that let the library find libc10_cuda/libtorch_cuda and torch's libcudart by itself: a libtorch
    C++ program that dlopens it has loaded only libc10/libtorch_cpu (Python's torch has loaded all of them), and
    a program's own RUNPATH does not apply to a dlopened library's dependencies. Both the paths relative to an
    installed fxeff/ (site-packages/torch, site-packages/nvidia/*) and this build's absolute ones (in-place builds)."""
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    site = os.path.dirname(os.path.dirname(torch.__file__))
    cudart_dirs = sorted({os.path.dirname(p) for p in glob.glob(os.path.join(site, "nvidia", "*", "lib", "libcudart.so*"))})
    dirs = ["$ORIGIN/../torch/lib", torch_lib]
    for d in cudart_dirs:
        dirs += ["$ORIGIN/../" + os.path.relpath(d, site), d]
    return ["-Wl,-rpath," + ":".join(dirs)]


def extension():
    debug = os.environ.get("DEBUG", "0") == "1"
    sources = sorted(glob.glob("csrc/ops/*.cpp") + glob.glob("csrc/ops/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/ops/cuda/*.cu"))
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-fopenmp"]
    kwargs = dict(
        name="fxeff._C",
        extra_link_args=["-fopenmp"],
        py_limited_api=True,  # no libtorch_python: the library loads without Python
    )
    if use_cuda(cuda_sources):
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        kwargs["extra_link_args"] = kwargs["extra_link_args"] + cuda_runpath()
        return CUDAExtension(sources=sources + cuda_sources,
                             extra_compile_args={"cxx": cxx + ["-DFXEFF_WITH_CUDA"],
                                                 "nvcc": ["-O3", "-DFXEFF_WITH_CUDA"]}, **kwargs)
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
