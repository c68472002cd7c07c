// Shared by the kernels of fxeff::narrow_conv2d: the vendor conv that computes its function (every backend's
// kernel where the CPU one does not run).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace fxeff {
namespace ops {

at::Tensor narrow_conv2d_reference(const at::Tensor& x, const at::Tensor& weight,
                                   const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation,
                                   c10::optional<double> clamp_min, c10::optional<double> clamp_max,
                                   const c10::optional<at::Tensor>& residual);

}  // namespace ops
}  // namespace fxeff
