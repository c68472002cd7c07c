// Argument parsing and checks of fxeff::shift, shared by its CPU and CUDA kernels.
#include "shift.h"

#include <c10/util/Exception.h>

namespace fxeff {
namespace ops {

ShiftPadding parse_shift_padding(const char* op, c10::string_view padding) {
  if (padding == "zeros") return ShiftPadding::Zeros;
  if (padding == "border") return ShiftPadding::Border;
  if (padding == "periodic") return ShiftPadding::Periodic;
  if (padding == "reflect") return ShiftPadding::Reflect;
  if (padding == "symmetric") return ShiftPadding::Symmetric;
  TORCH_CHECK_VALUE(false, op, ": padding must be one of \"zeros\", \"border\", \"periodic\", \"reflect\", "
                    "\"symmetric\", got \"", padding, "\"");
}

ShiftMode parse_shift_mode(const char* op, c10::string_view mode) {
  if (mode == "sparse") return ShiftMode::Sparse;
  if (mode == "active") return ShiftMode::Active;
  if (mode == "grouped") return ShiftMode::Grouped;
  TORCH_CHECK_VALUE(false, op, ": mode must be one of \"sparse\", \"active\", \"grouped\", got \"", mode, "\"");
}

void check_shift_args(const char* op, const at::Tensor& x, const at::Tensor& shifts, bool allow_quantized) {
  TORCH_CHECK_VALUE(x.dim() >= 3 && x.dim() <= 5, op, ": x must be 3-D, 4-D or 5-D [N, C, *spatial] "
                    "(shift1d/2d/3d), got ", x.dim(), "-D ", x.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()) || (allow_quantized && x.is_quantized()), op,
                    ": x must be floating point", allow_quantized ? " or quantized (quint8/qint8)" : "", ", got ",
                    x.scalar_type());
  const int64_t dims = x.dim() - 2;
  TORCH_CHECK_VALUE(shifts.dim() == 2 && shifts.size(0) == x.size(1) && shifts.size(1) == dims, op,
                    ": shifts must be [C, dims] = [", x.size(1), ", ", dims, "] for x of shape ", x.sizes(),
                    ", got ", shifts.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(shifts.scalar_type()), op, ": shifts must be floating point, got ",
                    shifts.scalar_type());
  TORCH_CHECK_VALUE(shifts.device() == x.device(), op, ": shifts must be on x's device ", x.device(), ", got ",
                    shifts.device());
}

}  // namespace ops
}  // namespace fxeff
