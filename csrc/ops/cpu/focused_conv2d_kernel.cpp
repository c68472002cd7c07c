// CPU kernel of fxeff::focused_conv2d. Per call it reads the mask and picks the cheapest of:
//   empty  - no active output: zeros, no conv;
//   dense  - the vendor conv over the whole image, then zero outside the mask;
//   crop   - per image, the bounding box of its active outputs: gather the input window with its
//            receptive-field halo (zeros where it leaves the image, i.e. the conv's padding), one
//            conv, scatter the active outputs;
//   tiles  - SBNet-style: the active T x T output tiles of the whole batch, their input windows
//            gathered into one batch, one vendor conv, active outputs scattered back.
// Results equal F.conv2d at every active output because each window holds exactly the inputs
// (padding included) that the dense conv reads there.
#include "../focused_conv2d.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/logical_not.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

namespace fxeff {
namespace ops {
namespace {

// An output block [y, y + oh) x [x, x + ow) of image n (it may overhang the output; the overhang is
// computed from zeros and never written back).
struct Region {
  int64_t n, y, x;
};

// What the strategy choice needs to know about a mask.
struct MaskSummary {
  int64_t active = 0;
  std::vector<std::array<int64_t, 4>> boxes;  // per image: y0, y1, x0, x1 (exclusive ends); y0 == y1 if none
};

MaskSummary summarise(const bool* m, const ConvGeometry& g) {
  MaskSummary s;
  s.boxes.assign(g.n, {0, 0, 0, 0});
  for (int64_t n = 0; n < g.n; ++n) {
    int64_t y0 = g.ho, y1 = 0, x0 = g.wo, x1 = 0;
    const bool* plane = m + n * g.ho * g.wo;
    for (int64_t y = 0; y < g.ho; ++y) {
      const bool* row = plane + y * g.wo;
      int64_t first = -1, last = -1;
      for (int64_t x = 0; x < g.wo; ++x) {
        if (row[x]) {
          if (first < 0) first = x;
          last = x;
          ++s.active;
        }
      }
      if (first >= 0) {
        y0 = std::min(y0, y); y1 = y + 1;
        x0 = std::min(x0, first); x1 = std::max(x1, last + 1);
      }
    }
    if (y1 > y0) s.boxes[n] = {y0, y1, x0, x1};
  }
  return s;
}

// Active T x T tiles of the whole batch, in image-major order.
std::vector<Region> active_tiles(const bool* m, const ConvGeometry& g, const MaskSummary& s, int64_t t) {
  std::vector<Region> tiles;
  for (int64_t n = 0; n < g.n; ++n) {
    const auto& b = s.boxes[n];
    if (b[1] <= b[0]) continue;
    const bool* plane = m + n * g.ho * g.wo;
    for (int64_t ty = b[0] / t * t; ty < b[1]; ty += t) {
      for (int64_t tx = b[2] / t * t; tx < b[3]; tx += t) {
        bool any = false;
        for (int64_t y = ty; y < std::min(ty + t, g.ho) && !any; ++y) {
          const bool* row = plane + y * g.wo;
          for (int64_t x = tx; x < std::min(tx + t, g.wo); ++x) {
            if (row[x]) { any = true; break; }
          }
        }
        if (any) tiles.push_back({n, ty, tx});
      }
    }
  }
  return tiles;
}

// Copies the input window of each region's oh x ow output block into patches[r] (NCHW or NHWC like x),
// writing zeros where the window leaves the image.
template <typename scalar_t>
void gather_windows(const at::Tensor& x, at::Tensor& patches, const std::vector<Region>& regions,
                    const ConvGeometry& g, int64_t wh, int64_t ww, bool channels_last) {
  const scalar_t* src = x.const_data_ptr<scalar_t>();
  scalar_t* dst = patches.mutable_data_ptr<scalar_t>();
  const int64_t C = g.c, H = g.h, W = g.w;
  const int64_t rows = static_cast<int64_t>(regions.size()) * wh;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / wh, py = item % wh;
      const Region& reg = regions[r];
      const int64_t iy = reg.y * g.sh - g.ph + py;
      const int64_t ix0 = reg.x * g.sw - g.pw;
      // Columns [lo, hi) of this window row lie inside the image.
      const int64_t lo = std::clamp<int64_t>(-ix0, 0, ww), hi = std::clamp<int64_t>(W - ix0, lo, ww);
      const bool row_inside = iy >= 0 && iy < H;
      if (channels_last) {
        scalar_t* d = dst + ((r * wh + py) * ww) * C;
        if (!row_inside) { std::fill(d, d + ww * C, scalar_t(0)); continue; }
        std::fill(d, d + lo * C, scalar_t(0));
        const scalar_t* s = src + ((reg.n * H + iy) * W + ix0 + lo) * C;
        std::memcpy(d + lo * C, s, (hi - lo) * C * sizeof(scalar_t));
        std::fill(d + hi * C, d + ww * C, scalar_t(0));
      } else {
        for (int64_t c = 0; c < C; ++c) {
          scalar_t* d = dst + ((r * C + c) * wh + py) * ww;
          if (!row_inside) { std::fill(d, d + ww, scalar_t(0)); continue; }
          std::fill(d, d + lo, scalar_t(0));
          const scalar_t* s = src + ((reg.n * C + c) * H + iy) * W + ix0 + lo;
          std::memcpy(d + lo, s, (hi - lo) * sizeof(scalar_t));
          std::fill(d + hi, d + ww, scalar_t(0));
        }
      }
    }
  });
}

// Writes res[r] (an oh x ow block per region) into out at the region, only where the mask is set.
template <typename scalar_t>
void scatter_active(const at::Tensor& res, at::Tensor& out, const bool* m, const std::vector<Region>& regions,
                    const ConvGeometry& g, int64_t oh, int64_t ow, bool channels_last) {
  const scalar_t* src = res.const_data_ptr<scalar_t>();
  scalar_t* dst = out.mutable_data_ptr<scalar_t>();
  const int64_t O = g.o, Ho = g.ho, Wo = g.wo;
  const int64_t rows = static_cast<int64_t>(regions.size()) * oh;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / oh, i = item % oh;
      const Region& reg = regions[r];
      const int64_t y = reg.y + i;
      if (y >= Ho) continue;
      const int64_t jn = std::min(ow, Wo - reg.x);
      const bool* mrow = m + (reg.n * Ho + y) * Wo + reg.x;
      if (channels_last) {
        for (int64_t j = 0; j < jn; ++j) {
          if (!mrow[j]) continue;
          std::memcpy(dst + ((reg.n * Ho + y) * Wo + reg.x + j) * O, src + ((r * oh + i) * ow + j) * O,
                      O * sizeof(scalar_t));
        }
      } else {
        for (int64_t o = 0; o < O; ++o) {
          const scalar_t* s = src + ((r * O + o) * oh + i) * ow;
          scalar_t* d = dst + ((reg.n * O + o) * Ho + y) * Wo + reg.x;
          for (int64_t j = 0; j < jn; ++j) {
            if (mrow[j]) d[j] = s[j];
          }
        }
      }
    }
  });
}

// Runs the conv on the windows of equally sized regions (one batch) and scatters the active outputs.
void run_regions(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                 const bool* m, at::Tensor& out, const std::vector<Region>& regions, const ConvGeometry& g,
                 int64_t oh, int64_t ow, at::MemoryFormat fmt) {
  if (regions.empty()) return;
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const int64_t wh = g.window_h(oh), ww = g.window_w(ow);
  const int64_t r = static_cast<int64_t>(regions.size());
  at::Tensor patches = at::empty({r, g.c, wh, ww}, x.options().memory_format(fmt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "focused_conv2d_gather", [&] {
    gather_windows<scalar_t>(x, patches, regions, g, wh, ww, cl);
  });
  const std::array<int64_t, 2> stride{g.sh, g.sw}, no_padding{0, 0}, dilation{g.dh, g.dw};
  at::Tensor res = at::conv2d(patches, weight, bias, stride, no_padding, dilation, g.groups).contiguous(fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "focused_conv2d_scatter", [&] {
    scatter_active<scalar_t>(res, out, m, regions, g, oh, ow, cl);
  });
}

// Cost model, in units of one output position of the dense conv. Tiles and crops pay for every
// output they compute (active or not), for gathering their input windows (memory traffic, cheap
// next to the conv's MACs except for depthwise convs), and a fixed cost per conv call.
struct CostModel {
  double per_output_mac;  // MACs per output position
  double gather_weight;   // cost of gathering one input pixel (C values), in MACs
  double call_overhead;   // one conv call, in MACs
  double region_cost(int64_t count, int64_t oh, int64_t ow, const ConvGeometry& g) const {
    const double outputs = static_cast<double>(count) * oh * ow;
    const double window = static_cast<double>(count) * g.window_h(oh) * g.window_w(ow);
    return outputs * per_output_mac + window * g.c * gather_weight;
  }
};

at::Tensor focused_conv2d_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                              const c10::optional<at::Tensor>& bias, const at::Tensor& mask_in,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups) {
  const ConvGeometry g =
      check_focused_conv2d_args("focused_conv2d", x_in, weight_in, bias, mask_in, stride, padding, dilation, groups);
  const at::MemoryFormat fmt = x_in.suggest_memory_format();
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor mask = mask_in.contiguous();
  const bool* m = mask.const_data_ptr<bool>();
  const FocusConfig cfg = focus_config();
  const MaskSummary s = summarise(m, g);

  auto zeros = [&] { return at::empty({g.n, g.o, g.ho, g.wo}, x.options().memory_format(fmt)).zero_(); };
  auto dense = [&] {
    RECORD_FUNCTION("fxeff::focused_conv2d::dense", c10::ArrayRef<const c10::IValue>{});
    count_focus_strategy(FocusStrategy::Dense);
    at::Tensor out = at::conv2d(x, weight, bias, stride, padding, dilation, groups).contiguous(fmt);
    out.masked_fill_(at::logical_not(mask).unsqueeze(1), 0);
    return out;
  };
  if (s.active == 0 && cfg.strategy != "dense") {
    RECORD_FUNCTION("fxeff::focused_conv2d::empty", c10::ArrayRef<const c10::IValue>{});
    count_focus_strategy(FocusStrategy::Empty);
    return zeros();
  }

  const CostModel cost{static_cast<double>(g.c / g.groups * g.kh * g.kw), 2.0, 2.0e5};
  // Tile sizes tried by the auto strategy: several, since the best one depends on how scattered the mask is.
  std::vector<int64_t> tile_sizes = cfg.tile > 0 ? std::vector<int64_t>{cfg.tile} : std::vector<int64_t>{8, 16, 32};
  int64_t best_tile = tile_sizes[0];
  std::vector<Region> best_tiles;
  double tiles_cost = std::numeric_limits<double>::infinity();
  if (cfg.strategy == "auto" || cfg.strategy == "tiles") {
    for (int64_t t : tile_sizes) {
      std::vector<Region> tiles = active_tiles(m, g, s, t);
      const double c = cost.region_cost(static_cast<int64_t>(tiles.size()), t, t, g) + cost.call_overhead;
      if (c < tiles_cost) { tiles_cost = c; best_tile = t; best_tiles = std::move(tiles); }
    }
  }
  double crop_cost = 0.0;
  for (const auto& b : s.boxes) {
    if (b[1] > b[0]) crop_cost += cost.region_cost(1, b[1] - b[0], b[3] - b[2], g) + cost.call_overhead;
  }
  const double dense_cost = static_cast<double>(g.n) * g.ho * g.wo * cost.per_output_mac + cost.call_overhead;

  FocusStrategy pick;
  if (cfg.strategy == "dense") pick = FocusStrategy::Dense;
  else if (cfg.strategy == "crop") pick = FocusStrategy::Crop;
  else if (cfg.strategy == "tiles") pick = FocusStrategy::Tiles;
  else if (dense_cost <= std::min(crop_cost, tiles_cost)) pick = FocusStrategy::Dense;
  else pick = crop_cost <= tiles_cost ? FocusStrategy::Crop : FocusStrategy::Tiles;

  if (pick == FocusStrategy::Dense) return dense();
  at::Tensor out = zeros();
  if (pick == FocusStrategy::Crop) {
    RECORD_FUNCTION("fxeff::focused_conv2d::crop", c10::ArrayRef<const c10::IValue>{});
    count_focus_strategy(FocusStrategy::Crop);
    for (int64_t n = 0; n < g.n; ++n) {
      const auto& b = s.boxes[n];
      if (b[1] <= b[0]) continue;
      run_regions(x, weight, bias, m, out, {Region{n, b[0], b[2]}}, g, b[1] - b[0], b[3] - b[2], fmt);
    }
  } else {
    RECORD_FUNCTION("fxeff::focused_conv2d::tiles", c10::ArrayRef<const c10::IValue>{});
    count_focus_strategy(FocusStrategy::Tiles);
    run_regions(x, weight, bias, m, out, best_tiles, g, best_tile, best_tile, fmt);
  }
  return out;
}

// Gradients of out = mask * (conv(x, w) + b): the masked output gradient through the vendor conv's
// backward. Outputs outside the mask are constant zero, so they contribute nothing.
std::tuple<at::Tensor, at::Tensor, at::Tensor> focused_conv2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvGeometry g = check_focused_conv2d_args("focused_conv2d_backward", x, weight, c10::nullopt, mask,
                                                   stride, padding, dilation, groups);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == g.n && grad_out.size(1) == g.o &&
                  grad_out.size(2) == g.ho && grad_out.size(3) == g.wo,
              "fxeff.focused_conv2d_backward: grad_out must be [", g.n, ", ", g.o, ", ", g.ho, ", ", g.wo,
              "], got ", grad_out.sizes());
  const at::Tensor masked = grad_out.masked_fill(at::logical_not(mask).unsqueeze(1), 0);
  const std::array<int64_t, 1> bias_sizes{g.o};
  const std::array<int64_t, 2> output_padding{0, 0};
  return at::convolution_backward(masked, x, weight, at::IntArrayRef(bias_sizes), stride, padding, dilation,
                                  false, output_padding, groups, {true, true, true});
}

}  // namespace

TORCH_LIBRARY_IMPL(fxeff, CPU, m) {
  m.impl("focused_conv2d", &focused_conv2d_cpu);
  m.impl("focused_conv2d_backward", &focused_conv2d_backward_cpu);
}

}  // namespace ops
}  // namespace fxeff
