// Device-independent parts of fxeff::focused_conv2d: argument checks and strategy controls.
#include "focused_conv2d.h"
#include "cpu/implicit_gemm.h"

#include <ATen/core/List.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <mutex>
#include <vector>

namespace fxeff {
namespace ops {

namespace {

std::mutex config_mutex;
FocusConfig config{"auto", 0};
std::array<std::atomic<int64_t>, kNumFocusStrategies> counters{};

void check_pair(const char* op, const char* name, at::IntArrayRef v, int64_t min_value) {
  TORCH_CHECK_VALUE(v.size() == 2, "fxeff.", op, ": ", name, " must have 2 elements, got ", v);
  TORCH_CHECK_VALUE(v[0] >= min_value && v[1] >= min_value, "fxeff.", op, ": ", name,
              " must be >= ", min_value, ", got ", v);
}

std::string set_strategy(c10::string_view strategy, int64_t tile) {
  TORCH_CHECK_VALUE(strategy == "auto" || strategy == "dense" || strategy == "crop" || strategy == "tiles" ||
                  strategy == "pixels" || strategy == "direct",
              "fxeff._focused_conv2d_set_strategy: strategy must be one of auto, dense, crop, tiles, pixels, direct, "
              "got \"",
              strategy, "\"");
  TORCH_CHECK_VALUE(tile == 0 || tile >= 2, "fxeff._focused_conv2d_set_strategy: tile must be 0 (auto) or >= 2, got ",
              tile);
  std::lock_guard<std::mutex> lock(config_mutex);
  std::string previous = config.strategy;
  config = FocusConfig{std::string(strategy), tile};
  return previous;
}

std::vector<int64_t> read_counters(bool reset) {
  std::vector<int64_t> out(kNumFocusStrategies);
  for (int i = 0; i < kNumFocusStrategies; ++i) {
    out[i] = reset ? counters[i].exchange(0) : counters[i].load();
  }
  return out;
}

}  // namespace

const char* focus_strategy_name(FocusStrategy s) {
  switch (s) {
    case FocusStrategy::Empty: return "empty";
    case FocusStrategy::Dense: return "dense";
    case FocusStrategy::Crop: return "crop";
    case FocusStrategy::Tiles: return "tiles";
    case FocusStrategy::Pixels: return "pixels";
    case FocusStrategy::Direct: return "direct";
  }
  return "?";
}

void check_focused_conv2d_fill(const char* op, const c10::optional<at::Tensor>& fill, const at::Tensor& x,
                               const ConvGeometry& g) {
  if (!fill.has_value() || !fill->defined()) return;
  TORCH_CHECK_VALUE(fill->numel() == g.o, "fxeff.", op, ": fill must hold one value per output channel (", g.o,
                    "), got ", fill->sizes());
  TORCH_CHECK_VALUE(fill->scalar_type() == x.scalar_type(), "fxeff.", op, ": fill dtype must equal x dtype ",
                    x.scalar_type(), ", got ", fill->scalar_type());
  TORCH_CHECK_VALUE(fill->device() == x.device(), "fxeff.", op, ": fill must be on x's device ", x.device(),
                    ", got ", fill->device());
}

void check_focused_conv2d_clamp(const char* op, c10::optional<double> clamp_min, c10::optional<double> clamp_max) {
  TORCH_CHECK_VALUE(!clamp_min.has_value() || !std::isnan(*clamp_min), "fxeff.", op, ": clamp_min must not be NaN");
  TORCH_CHECK_VALUE(!clamp_max.has_value() || !std::isnan(*clamp_max), "fxeff.", op, ": clamp_max must not be NaN");
  TORCH_CHECK_VALUE(!clamp_min.has_value() || !clamp_max.has_value() || *clamp_min <= *clamp_max, "fxeff.", op,
                    ": clamp_min must be <= clamp_max, got ", *clamp_min, " > ", *clamp_max);
}

void check_focused_conv2d_residual(const char* op, const c10::optional<at::Tensor>& residual, const at::Tensor& x,
                                   const ConvGeometry& g) {
  if (!residual.has_value() || !residual->defined()) return;
  TORCH_CHECK_VALUE(residual->dim() == 4 && residual->size(0) == g.n && residual->size(1) == g.o &&
                        residual->size(2) == g.ho && residual->size(3) == g.wo,
                    "fxeff.", op, ": residual must be the output's shape [", g.n, ", ", g.o, ", ", g.ho, ", ", g.wo,
                    "], got ", residual->sizes());
  TORCH_CHECK_VALUE(residual->scalar_type() == x.scalar_type(), "fxeff.", op, ": residual dtype must equal x dtype ",
                    x.scalar_type(), ", got ", residual->scalar_type());
  TORCH_CHECK_VALUE(residual->device() == x.device(), "fxeff.", op, ": residual must be on x's device ", x.device(),
                    ", got ", residual->device());
}

at::MemoryFormat conv_output_format(const at::Tensor& x, const at::Tensor& weight) {
  const bool cl = x.suggest_memory_format() == at::MemoryFormat::ChannelsLast ||
                  weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  return cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

FocusConfig focus_config() {
  std::lock_guard<std::mutex> lock(config_mutex);
  return config;
}

void count_focus_strategy(FocusStrategy s) { counters[static_cast<int>(s)].fetch_add(1); }

ConvGeometry check_focused_conv2d_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                       const c10::optional<at::Tensor>& bias, const at::Tensor& mask,
                                       at::IntArrayRef stride, at::IntArrayRef padding,
                                       at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK_VALUE(x.dim() == 4, "fxeff.", op, ": x must be 4-D [N, C, H, W], got ", x.dim(), "-D ", x.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()), "fxeff.", op, ": x must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 4, "fxeff.", op, ": weight must be 4-D [O, C/groups, kH, kW], got ",
              weight.dim(), "-D ", weight.sizes());
  TORCH_CHECK_VALUE(weight.scalar_type() == x.scalar_type(), "fxeff.", op, ": weight dtype must equal x dtype ",
              x.scalar_type(), ", got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == x.device(), "fxeff.", op, ": weight must be on x's device ", x.device(),
              ", got ", weight.device());
  check_pair(op, "stride", stride, 1);
  check_pair(op, "padding", padding, 0);
  check_pair(op, "dilation", dilation, 1);
  TORCH_CHECK_VALUE(groups >= 1, "fxeff.", op, ": groups must be >= 1, got ", groups);
  ConvGeometry g{};
  g.n = x.size(0); g.c = x.size(1); g.h = x.size(2); g.w = x.size(3);
  g.o = weight.size(0); g.kh = weight.size(2); g.kw = weight.size(3);
  g.sh = stride[0]; g.sw = stride[1]; g.ph = padding[0]; g.pw = padding[1];
  g.dh = dilation[0]; g.dw = dilation[1]; g.groups = groups;
  TORCH_CHECK_VALUE(g.c % groups == 0 && g.o % groups == 0, "fxeff.", op,
              ": groups must divide the input and output channels, got groups=", groups, " with ", g.c,
              " input and ", g.o, " output channels");
  TORCH_CHECK_VALUE(weight.size(1) * groups == g.c, "fxeff.", op, ": weight must be [", g.o, ", ", g.c / groups,
              ", kH, kW] for ", g.c, " input channels and groups=", groups, ", got ", weight.sizes());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == g.o, "fxeff.", op, ": bias must be [", g.o,
                "], got ", bias->sizes());
    TORCH_CHECK_VALUE(bias->scalar_type() == x.scalar_type(), "fxeff.", op, ": bias dtype must equal x dtype ",
                x.scalar_type(), ", got ", bias->scalar_type());
  }
  g.ho = (g.h + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.wo = (g.w + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK_VALUE(g.h + 2 * g.ph >= g.dh * (g.kh - 1) + 1 && g.w + 2 * g.pw >= g.dw * (g.kw - 1) + 1, "fxeff.",
              op, ": padded input ", g.h + 2 * g.ph, "x", g.w + 2 * g.pw, " is smaller than the dilated kernel ",
              g.dh * (g.kh - 1) + 1, "x", g.dw * (g.kw - 1) + 1);
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kBool && mask.dim() == 3 && mask.size(0) == g.n &&
                  mask.size(1) == g.ho && mask.size(2) == g.wo,
              "fxeff.", op, ": mask must be bool [N, Hout, Wout] = [", g.n, ", ", g.ho, ", ", g.wo, "], got ",
              mask.sizes(), " ", mask.scalar_type());
  TORCH_CHECK_VALUE(mask.device() == x.device(), "fxeff.", op, ": mask must be on x's device ", x.device(), ", got ",
              mask.device());
  return g;
}

// Execution-strategy controls: forcing a strategy (benchmarks, tests), reading how often each ran, indexed as
// [empty, dense, crop, tiles, pixels, direct], and whether this CPU runs the direct strategy. They take no tensors,
// so they are catch-all kernels.
TORCH_LIBRARY_FRAGMENT(fxeff, m) {
  m.def("_focused_conv2d_set_strategy(str strategy, int tile) -> str", &set_strategy);
  m.def("_focused_conv2d_counters(bool reset) -> int[]", &read_counters);
  m.def("_focused_conv2d_direct_available() -> bool", [] { return implicit_gemm::available(); });
}

}  // namespace ops
}  // namespace fxeff
