// Shared by the CPU and CUDA kernels of fxeff::focused_conv2d: argument checks, the output
// geometry, and the strategy controls.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <array>
#include <cstdint>
#include <string>

namespace fxeff {
namespace ops {

// A conv's shape, normalised once per call.
struct ConvGeometry {
  int64_t n, c, h, w;        // input
  int64_t o, kh, kw;         // weight [o, c/groups, kh, kw]
  int64_t ho, wo;            // output
  int64_t sh, sw, ph, pw, dh, dw, groups;
  // Input window feeding an output block of oh x ow positions.
  int64_t window_h(int64_t oh) const { return (oh - 1) * sh + dh * (kh - 1) + 1; }
  int64_t window_w(int64_t ow) const { return (ow - 1) * sw + dw * (kw - 1) + 1; }
};

// Validates every argument (naming the op, the argument, expected vs got) and returns the geometry.
ConvGeometry check_focused_conv2d_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                       const c10::optional<at::Tensor>& bias, const at::Tensor& mask,
                                       at::IntArrayRef stride, at::IntArrayRef padding,
                                       at::IntArrayRef dilation, int64_t groups);

// Validates the forward's optional fill (per output channel, the value of the inactive outputs): O elements of x's
// dtype on x's device.
void check_focused_conv2d_fill(const char* op, const c10::optional<at::Tensor>& fill, const at::Tensor& x,
                               const ConvGeometry& g);

// Validates the forward's activation epilogue (out = clamp(out, clamp_min, clamp_max), inactive outputs included):
// each bound a number (not NaN), clamp_min <= clamp_max where both are given.
void check_focused_conv2d_clamp(const char* op, c10::optional<double> clamp_min, c10::optional<double> clamp_max);

// Validates the forward's residual (added to every output before the clamp): [N, O, Hout, Wout] of x's dtype on x's
// device, any layout.
void check_focused_conv2d_residual(const char* op, const c10::optional<at::Tensor>& residual, const at::Tensor& x,
                                   const ConvGeometry& g);

// The forward's output format, as ATen's convolutions pick it: channels_last if x or the weight suggests it (so a
// model converted with .to(memory_format=torch.channels_last) stays channels_last even where x has one channel and
// its strides say both), else contiguous. x is converted to it.
at::MemoryFormat conv_output_format(const at::Tensor& x, const at::Tensor& weight);

// Strategies of the forward kernel; the index is the position in the counters.
enum class FocusStrategy : int { Empty = 0, Dense = 1, Crop = 2, Tiles = 3, Pixels = 4, Direct = 5 };
constexpr int kNumFocusStrategies = 6;
const char* focus_strategy_name(FocusStrategy s);

// The forced strategy ("auto" unless a benchmark or test set one) and the forced tile size (0 = auto).
struct FocusConfig {
  std::string strategy;
  int64_t tile;
};
FocusConfig focus_config();
void count_focus_strategy(FocusStrategy s);

}  // namespace ops
}  // namespace fxeff
