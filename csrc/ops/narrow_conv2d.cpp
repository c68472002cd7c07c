// Schema of fxeff::narrow_conv2d: F.conv2d (groups 1), plus an optional residual (a tensor of the output's shape),
// then an optional clamp (ReLU: clamp_min 0): a residual block's last conv, add and ReLU in one op. For convs with
// few input or output channels, such as the pruned convs of fxeff.blocks' descendants. The vendor's AVX-512 convs
// block output channels by 16, so a conv with 3 of them costs what one with 16 does (docs/benchmarks.md, "Block
// scaling, seventh session"); the CPU kernel (cpu/narrow_conv2d_kernel.cpp) vectorises over output pixels instead.
// Other backends run the vendor conv here (CompositeExplicitAutograd); autograd is in autograd.cpp.
#include "narrow_conv2d.h"

#include <ATen/ops/clamp.h>
#include <ATen/ops/conv2d.h>
#include <torch/library.h>

namespace fxeff {
namespace ops {

at::Tensor narrow_conv2d_reference(const at::Tensor& x, const at::Tensor& weight,
                                   const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation,
                                   c10::optional<double> clamp_min, c10::optional<double> clamp_max,
                                   const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, "fxeff.narrow_conv2d: x and weight must be 4-D, got ", x.dim(),
              "-D and ", weight.dim(), "-D");
  TORCH_CHECK(x.size(1) == weight.size(1), "fxeff.narrow_conv2d: groups must be 1: x has ", x.size(1),
              " channels, weight takes ", weight.size(1));
  at::Tensor out = at::conv2d(x, weight, bias, stride, padding, dilation, 1);
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->sizes() == out.sizes(), "fxeff.narrow_conv2d: residual must have the output's shape ",
                out.sizes(), ", got ", residual->sizes());
    out.add_(*residual);
  }
  if (clamp_min.has_value() || clamp_max.has_value()) {
    out.clamp_(clamp_min.has_value() ? c10::optional<at::Scalar>(*clamp_min) : c10::nullopt,
               clamp_max.has_value() ? c10::optional<at::Scalar>(*clamp_max) : c10::nullopt);
  }
  return out;
}

}  // namespace ops
}  // namespace fxeff

TORCH_LIBRARY_FRAGMENT(fxeff, m) {
  m.set_python_module("fxeff.ops.narrow_conv2d");  // the module that calls register_fake for this op
  m.def("narrow_conv2d(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "
        "float? clamp_min=None, float? clamp_max=None, Tensor? residual=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(fxeff, CompositeExplicitAutograd, m) {
  m.impl("narrow_conv2d", &fxeff::ops::narrow_conv2d_reference);
}
