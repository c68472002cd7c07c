// CPU kernel of fxeff::mask_resize. Per dimension, output cell i covers the input range
// [floor(i*in/out), ceil((i+1)*in/out)) when shrinking (so no active pixel is lost: the cell is
// active if any input in its range is) and the single input floor(i*in/out) when growing
// (nearest, as F.interpolate(mode="nearest")).
#include "mask_rows.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fxeff {
namespace ops {
namespace {

// [begin, end) of input indices feeding each output index along one dimension.
std::vector<std::pair<int64_t, int64_t>> source_ranges(int64_t in, int64_t out) {
  std::vector<std::pair<int64_t, int64_t>> r(out);
  for (int64_t i = 0; i < out; ++i) {
    const int64_t b = (i * in) / out;
    const int64_t e = out <= in ? ((i + 1) * in + out - 1) / out : b + 1;
    r[i] = {b, e};
  }
  return r;
}

at::Tensor mask_resize_cpu(const at::Tensor& mask, at::IntArrayRef size) {
  TORCH_CHECK_VALUE(mask.dim() == 3 && mask.scalar_type() == at::kBool,
              "fxeff.mask_resize: mask must be bool [N, H, W], got ", mask.dim(), "-D ",
              mask.sizes(), " ", mask.scalar_type());
  TORCH_CHECK_VALUE(size.size() == 2 && size[0] > 0 && size[1] > 0,
              "fxeff.mask_resize: size must be two positive ints [H, W], got ", size);
  const int64_t n = mask.size(0), hi = mask.size(1), wi = mask.size(2);
  const int64_t ho = size[0], wo = size[1];
  TORCH_CHECK_VALUE(hi > 0 && wi > 0, "fxeff.mask_resize: mask must not be empty, got ", mask.sizes());
  const at::Tensor src = mask.contiguous();
  at::Tensor out = at::empty({n, ho, wo}, mask.options());
  if (n == 0) return out;
  const auto rows = source_ranges(hi, ho);
  const auto cols = source_ranges(wi, wo);
  const bool* s = src.data_ptr<bool>();
  bool* d = out.data_ptr<bool>();
  // A task reads at least ~32 KiB of mask: a whole VGG-sized mask is a few microseconds of work,
  // less than waking a second thread.
  const int64_t bytes_per_row = std::max<int64_t>(1, wi * ((hi + ho - 1) / ho));
  const int64_t grain = std::max<int64_t>(1, int64_t{32768} / bytes_per_row);
  at::parallel_for(0, n * ho, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> any_row(wi);  // OR of the input rows of an output row (a byte loop: vectorised)
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / ho, i = t % ho;
      const uint8_t* plane = reinterpret_cast<const uint8_t*>(s) + b * hi * wi;
      std::copy_n(plane + rows[i].first * wi, wi, any_row.data());
      for (int64_t y = rows[i].first + 1; y < rows[i].second; ++y) or_rows(any_row.data(), plane + y * wi, wi);
      for (int64_t j = 0; j < wo; ++j) {
        uint8_t any = 0;
        for (int64_t x = cols[j].first; x < cols[j].second; ++x) any |= any_row[x];
        d[t * wo + j] = any != 0;
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fxeff, CPU, m) {
  m.impl("mask_resize", &mask_resize_cpu);
}

}  // namespace ops
}  // namespace fxeff
