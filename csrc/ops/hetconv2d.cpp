// Schema of the HetConv convolution (REFERENCE.md section 3). Kernels live in cpu/ (and cuda/ later).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fxeff, m) {
  m.set_python_module("fxeff.ops.hetconv2d");  // the module that calls register_fake for this op
  // F.conv2d (groups=1) with the HetConv-masked kernel, its weights stored compactly: filter j keeps its KxK
  // taps on channel block g = j * part / N (weight_kxk [N, M/part, K, K]) and only the centre tap on the other
  // channels (weight_1x1 [N, M - M/part], in channel order with its own block removed).
  m.def(
      "hetconv2d(Tensor x, Tensor weight_kxk, Tensor weight_1x1, Tensor? bias, int part, int[2] stride, "
      "int[2] padding, int[2] dilation) -> Tensor");
}
