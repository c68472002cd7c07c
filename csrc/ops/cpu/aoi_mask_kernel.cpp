// CPU kernels of fxeff::aoi_mask, mask[n, h, w] = reduce_c(x[n, c, h, w]) >= threshold, and fxeff::dilate_mask.
//
// One channel (an image split, as the reference models'): the comparison in one pass over x (at::sum then at::ge
// took ~60 us on a 16 x 1 x 64 x 64 input, mostly in their own set-up and the intermediate tensor). More channels:
// at::sum (or at::mean) then at::ge, whose order of summation a threshold taken from at::sum's values relies on.
#include "mask_rows.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ge.h>
#include <ATen/ops/mean.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace fxeff {
namespace ops {
namespace {

// One channel: mask[p] = x[p] >= threshold (the sum and the mean of one channel are the value), compared in the
// accumulation type as at::sum's result would be.
template <typename scalar_t>
void threshold_one_channel(const at::Tensor& x, at::Tensor& out, double threshold) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  bool* d = out.mutable_data_ptr<bool>();
  const acc_t t = static_cast<acc_t>(threshold);
  at::parallel_for(0, out.numel(), 16384, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) d[p] = static_cast<acc_t>(xp[p]) >= t;
  });
}

at::Tensor aoi_mask_cpu(const at::Tensor& x_in, double threshold, c10::string_view reduce) {
  TORCH_CHECK_VALUE(x_in.dim() == 4, "fxeff.aoi_mask: x must be 4-D [N, C, H, W], got ", x_in.dim(),
              "-D ", x_in.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(x_in.scalar_type()),
              "fxeff.aoi_mask: x must be floating point, got ", x_in.scalar_type());
  TORCH_CHECK_VALUE(!std::isnan(threshold), "fxeff.aoi_mask: threshold must be a number, got nan");
  TORCH_CHECK_VALUE(reduce == "sum" || reduce == "mean",
              "fxeff.aoi_mask: reduce must be \"sum\" or \"mean\", got \"", reduce, "\"");
  // Half/bfloat16 accumulate in float, so the threshold compares a precise channel sum.
  const auto acc = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (x_in.size(1) != 1) {
    // at::sum's own order of summation (vectorised, its partial sums depend on the layout), so that a threshold
    // taken from at::sum's values (a quantile of them) selects the same pixels, ties included
    const at::Tensor r = reduce == "sum" ? at::sum(x_in, {1}, false, acc) : at::mean(x_in, {1}, false, acc);
    return at::ge(r, threshold).contiguous();
  }
  const at::Tensor x = x_in.contiguous();  // one channel: NCHW and channels_last are the same memory
  at::Tensor out = at::empty({x.size(0), x.size(2), x.size(3)}, x.options().dtype(at::kBool));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fxeff_aoi_mask", [&] {
    threshold_one_channel<scalar_t>(x, out, threshold);
  });
  return out;
}

// The mask grown by halo pixels: out[n, y, x] = any mask[n, y', x'] with |y' - y| <= halo and |x' - x| <= halo
// (inside the image). Separable: per row the OR of halo shifted copies each way, then per output row the OR of
// the 2 halo + 1 rows around it; byte loops (vectorised), one image per task. (The ATen-op version, pad and ORs of
// shifted views, took ~70 us on a 16 x 64 x 64 mask, most of it per-op overhead.)
at::Tensor dilate_mask_cpu(const at::Tensor& mask_in, int64_t halo) {
  TORCH_CHECK_VALUE(mask_in.dim() == 3 && mask_in.scalar_type() == at::kBool, "fxeff.dilate_mask: mask must be bool "
                    "[N, H, W], got ", mask_in.dim(), "-D ", mask_in.sizes(), " ", mask_in.scalar_type());
  TORCH_CHECK_VALUE(halo >= 0, "fxeff.dilate_mask: halo must be >= 0, got ", halo);
  const at::Tensor mask = mask_in.contiguous();
  at::Tensor out = at::empty(mask.sizes(), mask.options());
  const int64_t n = mask.size(0), h = mask.size(1), w = mask.size(2);
  if (out.numel() == 0) return out;
  const uint8_t* src = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
  uint8_t* dst = reinterpret_cast<uint8_t*>(out.mutable_data_ptr<bool>());
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> rows(h * w);  // each row dilated along x
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* plane = src + b * h * w;
      for (int64_t y = 0; y < h; ++y) {
        const uint8_t* row = plane + y * w;
        uint8_t* r = rows.data() + y * w;
        std::copy_n(row, w, r);
        for (int64_t k = 1; k <= halo && k < w; ++k) {
          or_rows(r, row + k, w - k);
          or_rows(r + k, row, w - k);
        }
      }
      uint8_t* o = dst + b * h * w;
      for (int64_t y = 0; y < h; ++y) {
        const int64_t y0 = std::max<int64_t>(0, y - halo), y1 = std::min<int64_t>(h - 1, y + halo);
        uint8_t* orow = o + y * w;
        std::copy_n(rows.data() + y0 * w, w, orow);
        for (int64_t yy = y0 + 1; yy <= y1; ++yy) or_rows(orow, rows.data() + yy * w, w);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fxeff, CPU, m) {
  m.impl("aoi_mask", &aoi_mask_cpu);
  m.impl("dilate_mask", &dilate_mask_cpu);
}

}  // namespace ops
}  // namespace fxeff
