// Schemas of the shift family (shift1d/2d/3d by the input's rank) and its two backward halves.
// Kernels live in cpu/ (float and quantized) and cuda/.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fxeff, m) {
  m.set_python_module("fxeff.ops.shift");  // the module that calls register_fake for these ops
  m.def("shift(Tensor x, Tensor shifts, str padding, str mode) -> Tensor");
  // A shift layer emulating a depthwise conv's geometry: shift, F.pad(pad) (negative = crop), then
  // avg_pool(kernel = stride = pool, ceil_mode), fused (shift layers with a stride or a crop use it).
  m.def("shift_pool(Tensor x, Tensor shifts, str padding, str mode, int[] pad, int[] pool) -> Tensor");
  // Inference only: conv2d(clamp(shift_pool(x) * scale + offset, clamp_min, clamp_max), weight [O, C, 1, 1], bias)
  // in one op (a shift layer, its folded BatchNorm and clamp activation, and the 1x1 conv reading them; 2-D).
  m.def("shift_conv1x1(Tensor x, Tensor shifts, str padding, str mode, int[] pad, int[] pool, Tensor? scale, "
        "Tensor? offset, float? clamp_min, float? clamp_max, Tensor weight, Tensor? bias) -> Tensor");
  // Adjoint of the forward w.r.t. x (grad_out has x's shape: a shift keeps the shape).
  m.def("shift_input_grad(Tensor grad_out, Tensor shifts, str padding, str mode) -> Tensor");
  // d loss / d shifts of the linear-interpolation forward at the real shifts ([C, dims], shifts' dtype).
  m.def("shift_shifts_grad(Tensor grad_out, Tensor x, Tensor shifts, str padding) -> Tensor");
}
