// CPU kernel of fxeff::aoi_mask: mask[n, h, w] = reduce_c(x[n, c, h, w]) >= threshold.
#include <ATen/core/Tensor.h>
#include <ATen/ops/ge.h>
#include <ATen/ops/mean.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <cmath>

namespace fxeff {
namespace ops {
namespace {

at::Tensor aoi_mask_cpu(const at::Tensor& x, double threshold, c10::string_view reduce) {
  TORCH_CHECK_VALUE(x.dim() == 4, "fxeff.aoi_mask: x must be 4-D [N, C, H, W], got ", x.dim(),
              "-D ", x.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()),
              "fxeff.aoi_mask: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK_VALUE(!std::isnan(threshold), "fxeff.aoi_mask: threshold must be a number, got nan");
  TORCH_CHECK_VALUE(reduce == "sum" || reduce == "mean",
              "fxeff.aoi_mask: reduce must be \"sum\" or \"mean\", got \"", reduce, "\"");
  // Accumulate half/bfloat16 in float so the threshold compares a precise channel sum.
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor r = reduce == "sum" ? at::sum(x, {1}, false, acc) : at::mean(x, {1}, false, acc);
  return at::ge(r, threshold).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(fxeff, CPU, m) {
  m.impl("aoi_mask", &aoi_mask_cpu);
}

}  // namespace ops
}  // namespace fxeff
