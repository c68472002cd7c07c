// Schemas of the focused convolution and its backward. Kernels live in cpu/ and cuda/.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fxeff, m) {
  m.set_python_module("fxeff.ops.focused_conv2d");  // the module that calls register_fake for these ops
  m.def(
      "focused_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor mask, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, Tensor? fill=None, float? clamp_min=None, "
      "float? clamp_max=None, Tensor? residual=None) -> Tensor");
  m.def(
      "focused_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor mask, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups) -> (Tensor, Tensor, Tensor)");
}
