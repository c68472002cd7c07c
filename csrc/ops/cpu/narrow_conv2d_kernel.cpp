// CPU kernel of fxeff::narrow_conv2d: a direct conv vectorised over output pixels, for convs with few channels.
//
// oneDNN's (and implicit_gemm.h's) AVX-512 convs put 16 output channels in a vector: a conv with 3 outputs runs
// 16 lanes, 13 of them idle, and costs what the same conv with 16 outputs does. Here a vector holds 16 output
// pixels of one channel instead. Per tile of 16 x PV consecutive output pixels of one image (NCHW, flattened over
// rows) and block of OB output channels, OB x PV accumulators stay in registers; per input channel and tap, PV
// input vectors are loaded once and each output channel's weight is broadcast into OB x PV FMAs. At stride 1 with
// "same" width (2 * padding = dilation * (k - 1) along W), a tap of a run of output pixels is a run of input
// pixels, at one offset: the lanes whose tap falls outside the image (the zero padding, also across row ends)
// are masked off the load, so there is no padded copy and no border case in the loop. Masks and offsets depend
// on the geometry only: built once per call. Bias and the clamp are applied before the masked store.
//
// Strides: x is first split into its stride phase planes (Plan), so that each tap is again one offset.
//
// It runs for float32 NCHW (channels_last inputs are made contiguous and the result returned channels_last) on a
// CPU with AVX-512, groups 1, where the flattened addressing holds (make_plan: always at stride 1 with same-width
// padding; at larger strides where no tap needs a column past the output's width); anything else runs the
// vendor conv (narrow_conv2d_reference), which computes the same function.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FXEFF_NARROW_AVX512 1
#include <immintrin.h>
#endif

namespace fxeff {
namespace ops {

at::Tensor narrow_conv2d_reference(const at::Tensor& x, const at::Tensor& weight,
                                   const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation,
                                   c10::optional<double> clamp_min, c10::optional<double> clamp_max);

namespace {

bool avx512() {
#ifdef FXEFF_NARROW_AVX512
  static const bool ok = __builtin_cpu_supports("avx512f") != 0;
  return ok;
#else
  return false;
#endif
}

int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// The call's geometry. Output pixels q in [0, ho * wo) of an image, flattened over rows; tap t reads source
// value q + off[t] of the image's channel. At stride 1 with wo == w the source is x itself. Otherwise it is x
// split into phase planes (stride phase (ry, rx): x[ry::sh, rx::sw], cropped or zero-padded to wo columns and
// rows rows), those that taps read in one buffer [phases][n][c][rows][wo]: the tap (dy, dx) = (sh qy + ry, sw qx + rx) of output
// (oh, ow) reads row oh + qy, column ow + qx of plane (ry, rx), at one offset from q for every output pixel.
struct Plan {
  int64_t n, c, o, ho, wo, taps, pv, tiles;
  bool planes = false;            // whether the source is the phase planes
  int64_t sh = 1, sw = 1, rows = 0;
  int64_t cstride = 0, nstride = 0, pstride = 0;  // source strides: channel, image, plane
  std::vector<int64_t> phases;    // the planes that taps read, as ry * sw + rx, in buffer order
  std::vector<int64_t> off;       // [taps]
  std::vector<uint16_t> load;     // [tiles][taps][pv]: lanes whose tap is inside the image
  std::vector<uint16_t> store;    // [tiles][pv]: lanes that are output pixels
};

// The plan, or false where the flattened addressing cannot hold: a tap to the right would need a column that
// the wo-wide planes do not keep.
bool make_plan(Plan& p, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t pv) {
  p.n = x.size(0), p.c = x.size(1), p.o = weight.size(0);
  const int64_t h = x.size(2), w = x.size(3), kh = weight.size(2), kw = weight.size(3);
  p.sh = stride[0], p.sw = stride[1];
  p.ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) / p.sh + 1;
  p.wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) / p.sw + 1;
  if (h + 2 * padding[0] - dilation[0] * (kh - 1) <= 0 || w + 2 * padding[1] - dilation[1] * (kw - 1) <= 0) {
    return false;
  }
  p.planes = !(p.sh == 1 && p.sw == 1 && p.wo == w);
  p.rows = p.planes ? (h + p.sh - 1) / p.sh : h;
  const int64_t width = p.planes ? p.wo : w;
  p.cstride = p.rows * width, p.nstride = p.c * p.cstride, p.pstride = p.n * p.nstride;
  p.taps = kh * kw, p.pv = pv;
  const int64_t hw = p.ho * p.wo, lanes = 16 * pv;
  p.tiles = (hw + lanes - 1) / lanes;
  p.off.resize(p.taps);
  p.load.assign(p.tiles * p.taps * pv, 0);
  p.store.assign(p.tiles * pv, 0);
  for (int64_t t = 0; t < p.taps; ++t) {
    const int64_t dy = (t / kw) * dilation[0] - padding[0], dx = (t % kw) * dilation[1] - padding[1];
    // plane (ry, rx) of this tap, its row and column offsets, and how many rows and columns of x it holds
    const int64_t qy = p.planes ? floor_div(dy, p.sh) : dy, qx = p.planes ? floor_div(dx, p.sw) : dx;
    const int64_t ry = dy - qy * p.sh, rx = dx - qx * p.sw;
    const int64_t hold_rows = p.planes ? (h - ry + p.sh - 1) / p.sh : h;
    const int64_t hold_cols = p.planes ? std::min((w - rx + p.sw - 1) / p.sw, p.wo) : w;
    if (p.planes && qx > 0 && (w - rx + p.sw - 1) / p.sw > p.wo) return false;
    int64_t slot = 0;
    if (p.planes) {
      const auto found = std::find(p.phases.begin(), p.phases.end(), ry * p.sw + rx);
      slot = found - p.phases.begin();
      if (found == p.phases.end()) p.phases.push_back(ry * p.sw + rx);
    }
    p.off[t] = slot * p.pstride + qy * width + qx;
    for (int64_t tile = 0; tile < p.tiles; ++tile) {
      for (int64_t l = 0; l < lanes; ++l) {
        const int64_t q = tile * lanes + l;
        if (q >= hw) break;
        const int64_t iy = q / p.wo + qy, ix = q % p.wo + qx;
        if (t == 0) p.store[tile * pv + l / 16] |= uint16_t(1u << (l % 16));
        if (iy >= 0 && iy < hold_rows && ix >= 0 && ix < hold_cols) {
          p.load[(tile * p.taps + t) * pv + l / 16] |= uint16_t(1u << (l % 16));
        }
      }
    }
  }
  return true;
}

// The phase planes of x (NCHW contiguous) that plan p reads: [phases][n][c][rows][wo], zeros past x.
at::Tensor phase_planes(const at::Tensor& x, const Plan& p) {
  const int64_t count = static_cast<int64_t>(p.phases.size()), h = x.size(2), w = x.size(3);
  at::Tensor planes = at::empty({count, p.n, p.c, p.rows, p.wo}, x.options());
  const float* xd = x.const_data_ptr<float>();
  float* pd = planes.mutable_data_ptr<float>();
  at::parallel_for(0, count * p.n * p.c, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t phase = p.phases[i / (p.n * p.c)], ry = phase / p.sw, rx = phase % p.sw;
      const float* src = xd + (i % (p.n * p.c)) * h * w;
      float* dst = pd + i * p.rows * p.wo;
      for (int64_t r = 0; r < p.rows; ++r, dst += p.wo) {
        const int64_t y = r * p.sh + ry;
        int64_t j = 0;
        if (y < h) {
          const float* row = src + y * w + rx;
          for (; j < p.wo && j * p.sw + rx < w; ++j) dst[j] = row[j * p.sw];
        }
        for (; j < p.wo; ++j) dst[j] = 0.0f;
      }
    }
  });
  return planes;
}

#ifdef FXEFF_NARROW_AVX512
// One tile (16 PV output pixels from q) x OB output channels of one image. x: the source's image, channel 0; wp: the
// block's packed weight [C][taps][OB]; out: the block's first output channel at pixel 0 of the image.
template <int PV, int OB>
__attribute__((target("avx512f"))) void tile_kernel(const float* x, const Plan& p, int64_t tile, const float* wp,
                                                      const float* bias, float* out, float lo, float hi) {
  const int64_t hw_out = p.ho * p.wo, q = tile * 16 * PV;
  const uint16_t* masks = p.load.data() + tile * p.taps * PV;
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
    for (int64_t t = 0; t < p.taps; ++t, w += OB) {
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
  const uint16_t* store = p.store.data() + tile * PV;
#pragma GCC unroll 12
  for (int o = 0; o < OB; ++o) {
#pragma GCC unroll 4
    for (int j = 0; j < PV; ++j) {
      // max/min return their second operand where either is NaN: NaN is kept, as torch.clamp keeps it
      const __m512 v = _mm512_min_ps(hiv, _mm512_max_ps(lov, acc[o][j]));
      _mm512_mask_storeu_ps(out + o * hw_out + q + 16 * j, store[j], v);
    }
  }
}

using TileFn = void (*)(const float*, const Plan&, int64_t, const float*, const float*, float*, float, float);

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
               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, float lo, float hi) {
#ifdef FXEFF_NARROW_AVX512
  // the output's format is the vendor conv's: channels_last if x or the weight suggests it
  const bool channels_last = x_in.suggest_memory_format() == at::MemoryFormat::ChannelsLast ||
                             weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous();
  const int64_t o = weight.size(0);
  Plan p;
  const int64_t pixels = ((x.size(2) + stride[0] - 1) / stride[0]) * ((x.size(3) + stride[1] - 1) / stride[1]);
  const int64_t pv = o <= kMaxBlock4 && pixels > 32 ? 4 : 2;
  if (!make_plan(p, x, weight, stride, padding, dilation, pv)) return at::Tensor();
  RECORD_FUNCTION("fxeff::narrow_conv2d::pixels", std::vector<c10::IValue>());  // the kernel runs (tests look)
  const int64_t most = pv == 4 ? kMaxBlock4 : kMaxBlock2;
  const int64_t blocks = (o + most - 1) / most;
  // block b: outputs [start[b], start[b + 1]), its weight packed [C][taps][size] from start[b] * C * taps
  std::vector<int64_t> start(blocks + 1);
  for (int64_t b = 0; b <= blocks; ++b) start[b] = b * o / blocks;
  std::vector<float> packed(o * p.c * p.taps);
  const at::Tensor w = weight.contiguous();
  const float* wd = w.const_data_ptr<float>();
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t size = start[b + 1] - start[b];
    float* dst = packed.data() + start[b] * p.c * p.taps;
    for (int64_t ci = 0; ci < p.c; ++ci) {
      for (int64_t t = 0; t < p.taps; ++t) {
        for (int64_t k = 0; k < size; ++k) {
          dst[(ci * p.taps + t) * size + k] = wd[((start[b] + k) * p.c + ci) * p.taps + t];
        }
      }
    }
  }
  const at::Tensor bc = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const float* bd = bc.defined() ? bc.const_data_ptr<float>() : nullptr;
  const at::Tensor source = p.planes ? phase_planes(x, p) : x;
  at::Tensor out = at::empty({p.n, o, p.ho, p.wo}, x.options());
  const float* sd = source.const_data_ptr<float>();
  float* od = out.mutable_data_ptr<float>();
  std::vector<TileFn> fns(blocks);
  for (int64_t b = 0; b < blocks; ++b) {
    const int size = static_cast<int>(start[b + 1] - start[b]);
    fns[b] = pv == 4 ? pick<4>(size, std::make_integer_sequence<int, kMaxBlock4>())
                     : pick<2>(size, std::make_integer_sequence<int, kMaxBlock2>());
  }
  const int64_t items = p.n * blocks * p.tiles, hw_out = p.ho * p.wo;
  const int64_t work = p.c * p.taps * (o / blocks + 1) * pv;  // FMAs per item, about
  at::parallel_for(0, items, std::max<int64_t>(1, 8192 / std::max<int64_t>(work, 1)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t tile = i % p.tiles, b = (i / p.tiles) % blocks, n = i / (p.tiles * blocks);
      fns[b](sd + n * p.nstride, p, tile, packed.data() + start[b] * p.c * p.taps,
             bd != nullptr ? bd + start[b] : nullptr, od + (n * o + start[b]) * hw_out, lo, hi);
    }
  });
  return channels_last ? out.contiguous(at::MemoryFormat::ChannelsLast) : out;
#else
  return at::Tensor();
#endif
}

at::Tensor narrow_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                             c10::optional<double> clamp_min, c10::optional<double> clamp_max) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, "fxeff.narrow_conv2d: stride, "
              "padding and dilation must have 2 entries");
  const bool kernel = avx512() && x.dim() == 4 && weight.dim() == 4 && x.scalar_type() == at::kFloat &&
                      weight.scalar_type() == at::kFloat &&
                      (!bias.has_value() || !bias->defined() || bias->scalar_type() == at::kFloat) &&
                      x.size(1) == weight.size(1) && x.size(0) > 0 && x.size(1) > 0 && weight.size(0) > 0 &&
                      stride[0] >= 1 && stride[1] >= 1 && padding[0] >= 0 && padding[1] >= 0 &&
                      dilation[0] >= 1 && dilation[1] >= 1;
  if (kernel) {
    const float inf = std::numeric_limits<float>::infinity();
    at::Tensor out = run(x, weight, bias, stride, padding, dilation,
                         clamp_min.has_value() ? static_cast<float>(*clamp_min) : -inf,
                         clamp_max.has_value() ? static_cast<float>(*clamp_max) : inf);
    if (out.defined()) return out;
  }
  return narrow_conv2d_reference(x, weight, bias, stride, padding, dilation, clamp_min, clamp_max);
}

}  // namespace

TORCH_LIBRARY_IMPL(fxeff, CPU, m) { m.impl("narrow_conv2d", &narrow_conv2d_cpu); }

}  // namespace ops
}  // namespace fxeff
