// CPU kernel of fxeff::narrow_conv2d: a direct conv vectorised over output pixels, for convs with few channels.
//
// oneDNN's (and implicit_gemm.h's micro-kernel's) AVX-512 convs put 16 output channels in a vector: a conv with 3
// outputs runs 16 lanes, 13 of them idle, and costs what the same conv with 16 outputs does. Here a vector holds
// 16 output pixels of one channel instead. Per tile of 16 x PV consecutive output pixels of one image (NCHW,
// flattened over rows) and block of OB output channels, OB x PV accumulators stay in registers; per input channel
// and tap, PV input vectors are loaded once and each output channel's weight is broadcast into OB x PV FMAs. At
// stride 1 with "same" width (2 * padding = dilation * (k - 1) along W), a tap of a run of output pixels is a run
// of input pixels, at one offset: the lanes whose tap falls outside the image (the zero padding, also across row
// ends) are masked off the load, so there is no padded copy and no border case in the loop. Masks and offsets
// depend on the geometry only: built once per shape and cached. Bias, the residual and the clamp are applied
// before the masked store.
//
// Strides: x is first split into its stride phase planes (Plan), so that each tap is again one offset.
//
// It runs for float32 NCHW (channels_last inputs are made contiguous and the result returned channels_last) on a
// CPU with AVX-512, groups 1, where the flattened addressing holds (make_plan: always at stride 1 with same-width
// padding; at larger strides where no tap needs a column past the output's width); anything else runs the
// vendor conv (narrow_conv2d_reference), which computes the same function.
#include "../narrow_conv2d.h"
#include "implicit_gemm.h"  // available(), clamp(), FXEFF_IMPLICIT_GEMM_AVX512

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace fxeff {
namespace ops {

namespace {

int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// A conv's geometry, whatever its batch and channels. Output pixels q in [0, ho * wo) of an image, flattened over
// rows; tap t reads source value q + local[t] of plane slot[t], of the image's channel. At stride 1 with wo == w
// the source is x itself (one plane). Otherwise it is x split into phase planes (stride phase (ry, rx):
// x[ry::sh, rx::sw], cropped or zero-padded to wo columns and `rows` rows), those that taps read, in one buffer
// [phases][n][c][rows][wo]: the tap (dy, dx) = (sh qy + ry, sw qx + rx) of output (oh, ow) reads row oh + qy,
// column ow + qx of plane (ry, rx), at one offset from q for every output pixel.
struct Geometry {
  bool ok = false;                // false where the flattened addressing cannot hold (see geometry())
  int64_t ho = 0, wo = 0, taps = 0, pv = 0, tiles = 0;
  bool planes = false;            // whether the source is the phase planes
  int64_t sh = 1, sw = 1, rows = 0, width = 0;
  std::vector<int64_t> phases;    // the planes that taps read, as ry * sw + rx, in buffer order
  std::vector<int64_t> slot, local;  // [taps]
  std::vector<uint16_t> load;     // [tiles][taps][pv]: lanes whose tap is inside the image
  std::vector<uint16_t> store;    // [tiles][pv]: lanes that are output pixels
};

// The geometry of x [*, *, h, w] under a kh x kw kernel, or ok = false where a tap to the right would need a
// column that the wo-wide planes do not keep.
Geometry make_geometry(int64_t h, int64_t w, int64_t kh, int64_t kw, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t pv) {
  Geometry g;
  if (h + 2 * padding[0] - dilation[0] * (kh - 1) <= 0 || w + 2 * padding[1] - dilation[1] * (kw - 1) <= 0) {
    return g;
  }
  g.sh = stride[0], g.sw = stride[1];
  g.ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) / g.sh + 1;
  g.wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) / g.sw + 1;
  g.planes = !(g.sh == 1 && g.sw == 1 && g.wo == w);
  g.rows = g.planes ? (h + g.sh - 1) / g.sh : h;
  g.width = g.planes ? g.wo : w;
  g.taps = kh * kw, g.pv = pv;
  const int64_t hw = g.ho * g.wo, lanes = 16 * pv;
  g.tiles = (hw + lanes - 1) / lanes;
  g.slot.assign(g.taps, 0);
  g.local.assign(g.taps, 0);
  g.load.assign(g.tiles * g.taps * pv, 0);
  g.store.assign(g.tiles * pv, 0);
  for (int64_t q = 0; q < hw; ++q) g.store[q / 16] |= uint16_t(1u << (q % 16));
  for (int64_t t = 0; t < g.taps; ++t) {
    const int64_t dy = (t / kw) * dilation[0] - padding[0], dx = (t % kw) * dilation[1] - padding[1];
    // plane (ry, rx) of this tap, its row and column offsets, and how many rows and columns of x it holds
    const int64_t qy = g.planes ? floor_div(dy, g.sh) : dy, qx = g.planes ? floor_div(dx, g.sw) : dx;
    const int64_t ry = dy - qy * g.sh, rx = dx - qx * g.sw;
    const int64_t hold_rows = g.planes ? (h - ry + g.sh - 1) / g.sh : h;
    const int64_t hold_cols = g.planes ? std::min((w - rx + g.sw - 1) / g.sw, g.wo) : w;
    if (g.planes && qx > 0 && (w - rx + g.sw - 1) / g.sw > g.wo) return Geometry();
    if (g.planes) {
      const auto found = std::find(g.phases.begin(), g.phases.end(), ry * g.sw + rx);
      g.slot[t] = found - g.phases.begin();
      if (found == g.phases.end()) g.phases.push_back(ry * g.sw + rx);
    }
    g.local[t] = qy * g.width + qx;
    // the valid output rows and, per row, columns of this tap: [y0, y1) x [x0, x1)
    const int64_t y0 = std::max<int64_t>(0, -qy), y1 = std::min(g.ho, hold_rows - qy);
    const int64_t x0 = std::max<int64_t>(0, -qx), x1 = std::min(g.wo, hold_cols - qx);
    uint16_t* masks = g.load.data() + t * pv;
    for (int64_t y = y0; y < y1; ++y) {
      for (int64_t q = y * g.wo + x0; q < y * g.wo + x1; ++q) {
        masks[(q / lanes) * g.taps * pv + (q % lanes) / 16] |= uint16_t(1u << (q % 16));
      }
    }
  }
  g.ok = true;
  return g;
}

// make_geometry, cached: inference calls a conv with the same geometry every time, and building the masks cost
// about what a small conv does (at batch 1 the kernel lost to the vendor's by that much).
std::shared_ptr<const Geometry> geometry(int64_t h, int64_t w, int64_t kh, int64_t kw, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t pv) {
  using Key = std::array<int64_t, 11>;
  static std::mutex mutex;
  static std::map<Key, std::shared_ptr<const Geometry>> cache;
  const Key key{h, w, kh, kw, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], pv};
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto found = cache.find(key);
    if (found != cache.end()) return found->second;
  }
  auto made = std::make_shared<const Geometry>(make_geometry(h, w, kh, kw, stride, padding, dilation, pv));
  std::lock_guard<std::mutex> lock(mutex);
  if (cache.size() >= 1024) cache.clear();  // bounded: a model has a few dozen geometries
  cache.emplace(key, made);
  return made;
}

// One call: the geometry, and the source's strides and each tap's offset for this batch and channel count.
struct Plan {
  const Geometry* g;
  int64_t n, c, o;
  int64_t cstride, nstride, pstride;  // source strides: channel, image, plane
  std::vector<int64_t> off;           // [taps]: slot * pstride + local
};

Plan make_plan(const Geometry& g, int64_t n, int64_t c, int64_t o) {
  Plan p{&g, n, c, o, g.rows * g.width, 0, 0, {}};
  p.nstride = c * p.cstride, p.pstride = n * p.nstride;
  p.off.resize(g.taps);
  for (int64_t t = 0; t < g.taps; ++t) p.off[t] = g.slot[t] * p.pstride + g.local[t];
  return p;
}

// The phase planes of x (NCHW contiguous) that plan p reads: [phases][n][c][rows][wo], zeros past x.
at::Tensor phase_planes(const at::Tensor& x, const Plan& p) {
  const Geometry& g = *p.g;
  const int64_t count = static_cast<int64_t>(g.phases.size()), h = x.size(2), w = x.size(3);
  at::Tensor planes = at::empty({count, p.n, p.c, g.rows, g.wo}, x.options());
  const float* xd = x.const_data_ptr<float>();
  float* pd = planes.mutable_data_ptr<float>();
  at::parallel_for(0, count * p.n * p.c, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t phase = g.phases[i / (p.n * p.c)], ry = phase / g.sw, rx = phase % g.sw;
      const float* src = xd + (i % (p.n * p.c)) * h * w;
      float* dst = pd + i * g.rows * g.wo;
      for (int64_t r = 0; r < g.rows; ++r, dst += g.wo) {
        const int64_t y = r * g.sh + ry;
        int64_t j = 0;
        if (y < h) {
          const float* row = src + y * w + rx;
          for (; j < g.wo && j * g.sw + rx < w; ++j) dst[j] = row[j * g.sw];
        }
        for (; j < g.wo; ++j) dst[j] = 0.0f;
      }
    }
  });
  return planes;
}

#ifdef FXEFF_IMPLICIT_GEMM_AVX512
// One tile (16 PV output pixels from q) x OB output channels of one image. x: the source's image, channel 0; wp: the
// block's packed weight [C][taps][OB]; out: the block's first output channel at pixel 0 of the image.
template <int PV, int OB>
__attribute__((target("avx512f"))) void tile_kernel(const float* x, const Plan& p, int64_t tile, const float* wp,
                                                      const float* bias, float* out, const float* res, float lo,
                                                      float hi) {
  const Geometry& g = *p.g;
  const int64_t hw_out = g.ho * g.wo, q = tile * 16 * PV;
  const uint16_t* masks = g.load.data() + tile * g.taps * PV;
  __m512 acc[OB][PV];
#pragma GCC unroll 12
  for (int o = 0; o < OB; ++o) {
    const __m512 b = _mm512_set1_ps(bias != nullptr ? bias[o] : 0.0f);
#pragma GCC unroll 4
    for (int j = 0; j < PV; ++j) acc[o][j] = b;
  }
  const float* w = wp;
  for (int64_t ci = 0; ci < p.c; ++ci) {
    const float* xc = x + ci * p.cstride + q;
    for (int64_t t = 0; t < g.taps; ++t, w += OB) {
      // a masked-off lane reads nothing, so the address may lie before or after the image
      const float* src = xc + p.off[t];
      __m512 v[PV];
#pragma GCC unroll 4
      for (int j = 0; j < PV; ++j) v[j] = _mm512_maskz_loadu_ps(masks[t * PV + j], src + 16 * j);
#pragma GCC unroll 12
      for (int o = 0; o < OB; ++o) {
        const __m512 b = _mm512_set1_ps(w[o]);
#pragma GCC unroll 4
        for (int j = 0; j < PV; ++j) acc[o][j] = _mm512_fmadd_ps(b, v[j], acc[o][j]);
      }
    }
  }
  const __m512 lov = _mm512_set1_ps(lo), hiv = _mm512_set1_ps(hi);
  const uint16_t* store = g.store.data() + tile * PV;
#pragma GCC unroll 12
  for (int o = 0; o < OB; ++o) {
#pragma GCC unroll 4
    for (int j = 0; j < PV; ++j) {
      const int64_t at = o * hw_out + q + 16 * j;
      const __m512 v = res != nullptr ? _mm512_add_ps(acc[o][j], _mm512_maskz_loadu_ps(store[j], res + at)) : acc[o][j];
      _mm512_mask_storeu_ps(out + at, store[j], implicit_gemm::clamp(v, lov, hiv));
    }
  }
}

using TileFn = void (*)(const float*, const Plan&, int64_t, const float*, const float*, float*, const float*, float,
                       float);

template <int PV, int... OB>
TileFn pick(int ob, std::integer_sequence<int, OB...>) {
  TileFn fn = nullptr;
  ((ob == OB + 1 ? (fn = &tile_kernel<PV, OB + 1>, 0) : 0), ...);
  return fn;
}
#endif

// Output channels per block: at most 12 with 2 pixel vectors, 6 with 4 (24 accumulators), split evenly.
constexpr int64_t kMaxBlock2 = 12, kMaxBlock4 = 6;

// The kernel's result, or an undefined tensor where its plan cannot hold (the caller runs the vendor conv).
at::Tensor run(const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, float lo, float hi,
               const c10::optional<at::Tensor>& residual) {
#ifdef FXEFF_IMPLICIT_GEMM_AVX512
  // the output's format is the vendor conv's: channels_last if x or the weight suggests it
  const bool channels_last = x_in.suggest_memory_format() == at::MemoryFormat::ChannelsLast ||
                             weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous();
  const int64_t o = weight.size(0);
  const int64_t pixels = ((x.size(2) + stride[0] - 1) / stride[0]) * ((x.size(3) + stride[1] - 1) / stride[1]);
  const int64_t pv = o <= kMaxBlock4 && pixels > 32 ? 4 : 2;
  const std::shared_ptr<const Geometry> g = geometry(x.size(2), x.size(3), weight.size(2), weight.size(3), stride,
                                                     padding, dilation, pv);
  if (!g->ok) return at::Tensor();
  const Plan p = make_plan(*g, x.size(0), x.size(1), o);
  RECORD_FUNCTION("fxeff::narrow_conv2d::pixels", std::vector<c10::IValue>());  // the kernel runs (tests look)
  const int64_t most = pv == 4 ? kMaxBlock4 : kMaxBlock2;
  const int64_t blocks = (o + most - 1) / most;
  // block b: outputs [start[b], start[b + 1]), its weight packed [C][taps][size] from start[b] * C * taps
  std::vector<int64_t> start(blocks + 1);
  for (int64_t b = 0; b <= blocks; ++b) start[b] = b * o / blocks;
  std::vector<float> packed(o * p.c * g->taps);
  const at::Tensor w = weight.contiguous();
  const float* wd = w.const_data_ptr<float>();
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t size = start[b + 1] - start[b];
    float* dst = packed.data() + start[b] * p.c * g->taps;
    for (int64_t ci = 0; ci < p.c; ++ci) {
      for (int64_t t = 0; t < g->taps; ++t) {
        for (int64_t k = 0; k < size; ++k) {
          dst[(ci * g->taps + t) * size + k] = wd[((start[b] + k) * p.c + ci) * g->taps + t];
        }
      }
    }
  }
  const at::Tensor bc = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const float* bd = bc.defined() ? bc.const_data_ptr<float>() : nullptr;
  const at::Tensor source = g->planes ? phase_planes(x, p) : x;
  at::Tensor out = at::empty({p.n, o, g->ho, g->wo}, x.options());
  at::Tensor rc;  // the residual, NCHW contiguous
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->sizes() == out.sizes(), "fxeff.narrow_conv2d: residual must have the output's shape ",
                out.sizes(), ", got ", residual->sizes());
    if (residual->scalar_type() != at::kFloat) return at::Tensor();
    rc = residual->contiguous();
  }
  const float* rd = rc.defined() ? rc.const_data_ptr<float>() : nullptr;
  const float* sd = source.const_data_ptr<float>();
  float* od = out.mutable_data_ptr<float>();
  std::vector<TileFn> fns(blocks);
  for (int64_t b = 0; b < blocks; ++b) {
    const int size = static_cast<int>(start[b + 1] - start[b]);
    fns[b] = pv == 4 ? pick<4>(size, std::make_integer_sequence<int, kMaxBlock4>())
                     : pick<2>(size, std::make_integer_sequence<int, kMaxBlock2>());
  }
  const int64_t items = p.n * blocks * g->tiles, hw_out = g->ho * g->wo;
  const int64_t work = p.c * g->taps * (o / blocks + 1) * pv;  // FMAs per item, about
  at::parallel_for(0, items, std::max<int64_t>(1, 8192 / std::max<int64_t>(work, 1)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t tile = i % g->tiles, b = (i / g->tiles) % blocks, n = i / (g->tiles * blocks);
      fns[b](sd + n * p.nstride, p, tile, packed.data() + start[b] * p.c * g->taps,
             bd != nullptr ? bd + start[b] : nullptr, od + (n * o + start[b]) * hw_out,
             rd != nullptr ? rd + (n * o + start[b]) * hw_out : nullptr, lo, hi);
    }
  });
  return channels_last ? out.contiguous(at::MemoryFormat::ChannelsLast) : out;
#else
  return at::Tensor();
#endif
}

at::Tensor narrow_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                             c10::optional<double> clamp_min, c10::optional<double> clamp_max,
                             const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, "fxeff.narrow_conv2d: stride, "
              "padding and dilation must have 2 entries");
  const bool kernel = implicit_gemm::available() && x.dim() == 4 && weight.dim() == 4 &&
                      x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                      (!bias.has_value() || !bias->defined() || bias->scalar_type() == at::kFloat) &&
                      x.size(1) == weight.size(1) && x.size(0) > 0 && x.size(1) > 0 && weight.size(0) > 0 &&
                      stride[0] >= 1 && stride[1] >= 1 && padding[0] >= 0 && padding[1] >= 0 &&
                      dilation[0] >= 1 && dilation[1] >= 1;
  if (kernel) {
    const float inf = std::numeric_limits<float>::infinity();
    at::Tensor out = run(x, weight, bias, stride, padding, dilation,
                         clamp_min.has_value() ? static_cast<float>(*clamp_min) : -inf,
                         clamp_max.has_value() ? static_cast<float>(*clamp_max) : inf, residual);
    if (out.defined()) return out;
  }
  return narrow_conv2d_reference(x, weight, bias, stride, padding, dilation, clamp_min, clamp_max, residual);
}

}  // namespace

TORCH_LIBRARY_IMPL(fxeff, CPU, m) { m.impl("narrow_conv2d", &narrow_conv2d_cpu); }

}  // namespace ops
}  // namespace fxeff
