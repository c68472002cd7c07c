// Byte-row helpers shared by the CPU kernels of the AoI mask ops (dilate_mask, mask_resize).
#pragma once

#include <cstdint>

namespace fxeff {
namespace ops {

// d[0:n] |= s[0:n] over bool bytes (distinct arrays: the loop vectorises).
inline void or_rows(uint8_t* __restrict d, const uint8_t* __restrict s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] |= s[i];
}

}  // namespace ops
}  // namespace fxeff
