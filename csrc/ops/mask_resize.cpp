// Schema of the mask resampler: "any active" to a coarser grid, nearest to a finer one.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fxeff, m) {
  m.set_python_module("fxeff.ops.mask_resize");  // the module that calls register_fake for these ops
  m.def("mask_resize(Tensor mask, int[2] size) -> Tensor");
}
