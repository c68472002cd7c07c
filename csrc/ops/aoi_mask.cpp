// Schema of the Area-of-Interest threshold: one bool mask per image.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fxeff, m) {
  m.set_python_module("fxeff.ops.aoi_mask");  // the module that calls register_fake for these ops
  m.def("aoi_mask(Tensor x, float threshold, str reduce=\"sum\") -> Tensor");
}
