// Shared by the CPU and CUDA kernels of fxeff::shift: argument parsing and checks, index mapping.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdint>

namespace fxeff {
namespace ops {

enum class ShiftPadding : int { Zeros, Border, Periodic, Reflect, Symmetric };
enum class ShiftMode : int { Sparse, Active, Grouped };

ShiftPadding parse_shift_padding(const char* op, c10::string_view padding);
ShiftMode parse_shift_mode(const char* op, c10::string_view mode);

// Validates x (3-D, 4-D or 5-D; floating, or quantized when allow_quantized) and shifts
// ([C, x.dim() - 2], floating, same device); errors name the op, the argument, expected vs got.
void check_shift_args(const char* op, const at::Tensor& x, const at::Tensor& shifts, bool allow_quantized);

// Round half away from zero: the same rule on every device (std::round and CUDA's round agree).
inline double round_shift(double s) { return std::round(s); }

// The source index of integer position j in a dim of size n under `padding`; -1 means "zero".
// Host and device (the CUDA kernels call it per element).
C10_HOST_DEVICE inline int64_t map_shift_index(int64_t j, int64_t n, ShiftPadding padding) {
  if (j >= 0 && j < n) return j;
  switch (padding) {
    case ShiftPadding::Zeros:
      return -1;
    case ShiftPadding::Border:
      return j < 0 ? 0 : n - 1;
    case ShiftPadding::Periodic: {
      int64_t m = j % n;
      return m < 0 ? m + n : m;
    }
    case ShiftPadding::Reflect: {  // edge not repeated: period 2n - 2
      if (n == 1) return 0;
      const int64_t period = 2 * n - 2;
      int64_t m = j % period;
      if (m < 0) m += period;
      return m < n ? m : period - m;
    }
    case ShiftPadding::Symmetric: {  // edge repeated: period 2n
      const int64_t period = 2 * n;
      int64_t m = j % period;
      if (m < 0) m += period;
      return m < n ? m : period - 1 - m;
    }
  }
  return -1;
}

}  // namespace ops
}  // namespace fxeff
