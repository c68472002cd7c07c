// CPU kernel of fxeff::focused_conv2d. Per call it reads the mask and picks the cheapest of:
//   empty  - no active output: zeros, no conv;
//   dense  - the vendor conv over the whole image, then zero outside the mask;
//   crop   - per image, the bounding box of its active outputs: gather the input window with its
//            receptive-field halo (zeros where it leaves the image, i.e. the conv's padding), one
//            conv, scatter the active outputs;
//   tiles  - SBNet-style: the active T x T output tiles of the whole batch, their input windows
//            gathered into one batch, one vendor conv, active outputs scattered back;
//   pixels - im2col of the active outputs only (no tile or box overhang), one GEMM per chunk of them, written
//            straight into the output: the work tracks the active count however scattered the mask is.
// After a strategy wrote the active outputs, each inactive output is written once with zero (no zero-fill of
// the whole output beforehand). The strategy that ran is counted and recorded for the profiler as
// "fxeff::focused_conv2d::<strategy>".
// Results equal F.conv2d at every active output because each window holds exactly the inputs
// (padding included) that the dense conv reads there.
#include "../focused_conv2d.h"
#include "implicit_gemm.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/record_function.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/clamp.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/logical_not.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/ops/flip.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <deque>
#include <mutex>
#include <type_traits>
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

// A run of active outputs: image n, output row y, columns [x0, x1).
struct Run {
  int64_t n, y, x0, x1;
};

// What the strategies need to know about a mask, from one pass over it.
struct MaskSummary {
  int64_t active = 0;
  std::vector<Run> runs;                      // raster order
  std::vector<int64_t> row_begin;             // runs of output row r = n * Ho + y: [row_begin[r], row_begin[r + 1])
  std::vector<std::array<int64_t, 4>> boxes;  // per image: y0, y1, x0, x1 (exclusive ends); y0 == y1 if none
};

MaskSummary summarise(const bool* m, const ConvGeometry& g) {
  MaskSummary s;
  s.boxes.assign(g.n, {0, 0, 0, 0});
  s.row_begin.reserve(g.n * g.ho + 1);
  for (int64_t n = 0; n < g.n; ++n) {
    int64_t y0 = g.ho, y1 = 0, x0 = g.wo, x1 = 0;
    const bool* plane = m + n * g.ho * g.wo;
    for (int64_t y = 0; y < g.ho; ++y) {
      s.row_begin.push_back(static_cast<int64_t>(s.runs.size()));
      // Runs found with memchr (bool is one byte, 0 or 1): a few SIMD scans per row instead of a branch per pixel.
      const char* row = reinterpret_cast<const char*>(plane + y * g.wo);
      for (int64_t x = 0; x < g.wo;) {
        const void* on = std::memchr(row + x, 1, g.wo - x);
        if (on == nullptr) break;
        const int64_t start = static_cast<const char*>(on) - row;
        const void* off = std::memchr(row + start, 0, g.wo - start);
        x = off == nullptr ? g.wo : static_cast<const char*>(off) - row;
        s.runs.push_back({n, y, start, x});
        s.active += x - start;
        y0 = std::min(y0, y); y1 = y + 1;
        x0 = std::min(x0, start); x1 = std::max(x1, x);
      }
    }
    if (y1 > y0) s.boxes[n] = {y0, y1, x0, x1};
  }
  s.row_begin.push_back(static_cast<int64_t>(s.runs.size()));
  return s;
}

// The activation epilogue: outputs clamped to [lo, hi] (-inf / inf where a bound is not given), NaN kept as
// torch.clamp keeps it.
struct Clamp {
  double lo = -std::numeric_limits<double>::infinity(), hi = std::numeric_limits<double>::infinity();
  bool on() const {
    return lo > -std::numeric_limits<double>::infinity() || hi < std::numeric_limits<double>::infinity();
  }
};

// m ? a : b as a bitwise blend of the two values' bits (no branch, no conditional store), so a loop of selects
// vectorises: GCC turns `d[i] = m[i] ? d[i] : f` into a branch per value and a conditional store (measured: the NCHW
// fill ran one value at a time, 38% of a one-channel conv's focused call). NaN bits pass unchanged.
template <typename T>
inline T select_bits(bool m, T a, T b) {
  using U = std::conditional_t<sizeof(T) == 8, uint64_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;
  static_assert(sizeof(T) == sizeof(U), "select_bits: 2-, 4- or 8-byte values");
  U ua, ub;
  std::memcpy(&ua, &a, sizeof(T));
  std::memcpy(&ub, &b, sizeof(T));
  const U keep = U(0) - static_cast<U>(m);
  const U r = static_cast<U>((ua & keep) | (ub & static_cast<U>(~keep)));
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}

// The epilogue over n values of one plane or run, d[i] = clamp(v (+ r[i])) with v = m[i] ? d[i] : f (kSelect) or
// d[i]; clamped to [lo, hi] (kClamp). A function of restrict pointers and by-value bounds, so its loop vectorises:
// written inline in the parallel body, the bounds were reloaded per value (they might alias the stores) and each
// value took a scalar maxss/minss. Where the fill is pre-clamped (no residual), clamp(m ? d : f) = m ? clamp(d) : f.
template <typename scalar_t, bool kSelect, bool kResidual, bool kClamp>
void epilogue_span(scalar_t* __restrict__ d, const bool* __restrict__ m, const scalar_t* __restrict__ r, int64_t n,
                   scalar_t f, at::opmath_type<scalar_t> lo, at::opmath_type<scalar_t> hi) {
  using A = at::opmath_type<scalar_t>;
  for (int64_t i = 0; i < n; ++i) {
    A v = static_cast<A>(kSelect ? select_bits(m[i], d[i], f) : d[i]);
    if constexpr (kResidual) v += static_cast<A>(r[i]);
    if constexpr (kClamp) {
      v = v < lo ? lo : v;  // NaN passes, as torch.clamp lets it
      v = v > hi ? hi : v;
    }
    d[i] = static_cast<scalar_t>(v);
  }
}

#ifdef FXEFF_IMPLICIT_GEMM_AVX512
// epilogue_span for float, 16 values per step (the build targets baseline x86-64, where GCC left the loop scalar:
// it does not widen the mask's bytes to lanes there). The mask's 16 bytes widened to a lane mask choose between the
// value and the fill; the tail runs the scalar loop.
template <bool kSelect, bool kResidual, bool kClamp>
__attribute__((target("avx512f"))) void epilogue_span_avx512(float* d, const bool* m, const float* r, int64_t n,
                                                              float f, float lo, float hi) {
  const __m512 fv = _mm512_set1_ps(f), lov = _mm512_set1_ps(lo), hiv = _mm512_set1_ps(hi);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 v = _mm512_loadu_ps(d + i);
    if constexpr (kSelect) {
      const __m512i lanes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m + i)));
      v = _mm512_mask_blend_ps(_mm512_test_epi32_mask(lanes, lanes), fv, v);
    }
    if constexpr (kResidual) v = _mm512_add_ps(v, _mm512_loadu_ps(r + i));
    if constexpr (kClamp) v = implicit_gemm::clamp(v, lov, hiv);
    _mm512_storeu_ps(d + i, v);
  }
  epilogue_span<float, kSelect, kResidual, kClamp>(d + i, kSelect ? m + i : nullptr, kResidual ? r + i : nullptr,
                                                   n - i, f, lo, hi);
}
#endif

// epilogue_span with its flags chosen at run time (the AVX-512 loop for float where the CPU has it).
template <typename scalar_t, bool kSelect, bool kResidual, bool kClamp>
void epilogue_span_on_cpu(scalar_t* d, const bool* m, const scalar_t* r, int64_t n, scalar_t f,
                          at::opmath_type<scalar_t> lo, at::opmath_type<scalar_t> hi) {
#ifdef FXEFF_IMPLICIT_GEMM_AVX512
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (implicit_gemm::available()) return epilogue_span_avx512<kSelect, kResidual, kClamp>(d, m, r, n, f, lo, hi);
  }
#endif
  epilogue_span<scalar_t, kSelect, kResidual, kClamp>(d, m, r, n, f, lo, hi);
}

// epilogue_span with its residual and clamp chosen at run time (r null: no residual).
template <typename scalar_t, bool kSelect>
void epilogue_span(scalar_t* d, const bool* m, const scalar_t* r, int64_t n, scalar_t f, bool clamped,
                   at::opmath_type<scalar_t> lo, at::opmath_type<scalar_t> hi) {
  if (r != nullptr) {
    if (clamped) epilogue_span_on_cpu<scalar_t, kSelect, true, true>(d, m, r, n, f, lo, hi);
    else epilogue_span_on_cpu<scalar_t, kSelect, true, false>(d, m, r, n, f, lo, hi);
  } else if (clamped) {
    epilogue_span_on_cpu<scalar_t, kSelect, false, true>(d, m, r, n, f, lo, hi);
  } else if (kSelect) {
    epilogue_span_on_cpu<scalar_t, kSelect, false, false>(d, m, r, n, f, lo, hi);
  }
}

// Writes every inactive output after a strategy wrote the active ones (whatever the strategy left there is
// overwritten): its channel's fill (fill[o], or zero where fill is null), plus, given `res` (a tensor of out's
// shape and layout), the residual there, clamped by `clamp`. Where `finish_active`, the active outputs get the same
// epilogue in the same pass (the residual added, then clamped); else the strategy applied it. Without a residual
// the caller passes the fill already clamped. channels_last: the inactive positions run by run (the fill's O values
// copied in doubling runs); NCHW: a branch-free select over each plane (vectorised), measured ~10x faster than
// filling the gaps between runs when the mask is fragmented.
template <typename scalar_t>
void fill_inactive(at::Tensor& out, const bool* m, const MaskSummary& s, const ConvGeometry& g, bool channels_last,
                   const scalar_t* fill = nullptr, const Clamp& clamp = Clamp(), const scalar_t* res = nullptr,
                   bool finish_active = true) {
  using A = at::opmath_type<scalar_t>;
  scalar_t* base = out.mutable_data_ptr<scalar_t>();
  const int64_t O = g.o, Ho = g.ho, Wo = g.wo;
  const bool clamped = clamp.on();
  const A lo = static_cast<A>(clamp.lo), hi = static_cast<A>(clamp.hi);
  // The channels_last gaps' epilogue with a residual (clamp(fill + residual)); lo and hi by value (see epilogue_span)
  auto epilogue = [lo, hi](A v) {
    v = v < lo ? lo : v;
    return static_cast<scalar_t>(v > hi ? hi : v);
  };
  if (channels_last) {
    auto gap = [&](int64_t offset, int64_t positions) {
      scalar_t* at = base + offset;
      if (res != nullptr) {
        const scalar_t* r = res + offset;
        for (int64_t i = 0; i < positions; ++i) {
          for (int64_t o = 0; o < O; ++o) {
            const A f = fill == nullptr ? A(0) : static_cast<A>(fill[o]);
            at[i * O + o] = epilogue(f + static_cast<A>(r[i * O + o]));
          }
        }
      } else if (fill == nullptr) {
        std::fill_n(at, positions * O, scalar_t(0));
      } else if (positions > 0) {  // the first position's O values, then the written part copied onto what follows
        std::copy_n(fill, O, at);
        for (int64_t done = 1; done < positions;) {
          const int64_t n = std::min(done, positions - done);
          std::memcpy(at + done * O, at, n * O * sizeof(scalar_t));
          done += n;
        }
      }
    };
    auto run = [&](int64_t offset, int64_t count) {
      if (!finish_active) return;
      epilogue_span<scalar_t, false>(base + offset, nullptr, res == nullptr ? nullptr : res + offset, count,
                                     scalar_t(0), clamped, lo, hi);
    };
    at::parallel_for(0, g.n * Ho, 8, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t row = r * Wo * O;
        int64_t x = 0;
        for (int64_t k = s.row_begin[r]; k < s.row_begin[r + 1]; ++k) {
          gap(row + x * O, s.runs[k].x0 - x);
          run(row + s.runs[k].x0 * O, (s.runs[k].x1 - s.runs[k].x0) * O);
          x = s.runs[k].x1;
        }
        gap(row + x * O, Wo - x);
      }
    });
  } else {
    TORCH_INTERNAL_ASSERT(finish_active, "fxeff.focused_conv2d: an NCHW output gets its epilogue in the fill pass");
    const int64_t plane = Ho * Wo;
    at::parallel_for(0, g.n * O, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const scalar_t f = fill == nullptr ? scalar_t(0) : fill[p % O];
        const scalar_t* r = res == nullptr ? nullptr : res + p * plane;
        epilogue_span<scalar_t, true>(base + p * plane, m + (p / O) * plane, r, plane, f, clamped, lo, hi);
      }
    });
  }
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

// ---- pixels: im2col of the active outputs only, one GEMM per chunk of them ----------------------------

// The active outputs split into chunks of at most `chunk` pixels; a chunk is a list of run pieces.
struct PixelChunks {
  std::vector<Run> pieces;
  std::vector<int64_t> begin;   // chunk i = pieces[begin[i], begin[i + 1])
  std::vector<int64_t> pixels;  // pixels in chunk i
};

PixelChunks split_runs(const std::vector<Run>& runs, int64_t chunk) {
  PixelChunks c;
  c.begin.push_back(0);
  int64_t filled = 0;
  for (Run r : runs) {
    while (r.x1 > r.x0) {
      const int64_t take = std::min(r.x1 - r.x0, chunk - filled);
      c.pieces.push_back({r.n, r.y, r.x0, r.x0 + take});
      r.x0 += take;
      filled += take;
      if (filled == chunk) {
        c.begin.push_back(static_cast<int64_t>(c.pieces.size()));
        c.pixels.push_back(filled);
        filled = 0;
      }
    }
  }
  if (filled > 0) {
    c.begin.push_back(static_cast<int64_t>(c.pieces.size()));
    c.pixels.push_back(filled);
  }
  return c;
}

// channels_last x: cols[q, :] = the receptive field of the q-th pixel, columns ordered (group, ky, kx, c) so
// that each tap of each group is one contiguous copy of C/groups channels.
template <typename scalar_t>
void gather_pixels_cl(const scalar_t* x, scalar_t* cols, const Run* pieces, int64_t count, const ConvGeometry& g) {
  const int64_t C = g.c, H = g.h, W = g.w, cg = g.c / g.groups, taps = g.kh * g.kw, kg = taps * cg;
  const int64_t K = g.groups * kg;
  scalar_t* row = cols;
  for (int64_t i = 0; i < count; ++i) {
    const Run& p = pieces[i];
    const int64_t iy0 = p.y * g.sh - g.ph;
    for (int64_t xo = p.x0; xo < p.x1; ++xo, row += K) {
      const int64_t ix0 = xo * g.sw - g.pw;
      for (int64_t ky = 0; ky < g.kh; ++ky) {
        const int64_t iy = iy0 + ky * g.dh;
        const bool y_in = iy >= 0 && iy < H;
        for (int64_t kx = 0; kx < g.kw; ++kx) {
          const int64_t ix = ix0 + kx * g.dw;
          const int64_t t = ky * g.kw + kx;
          if (y_in && ix >= 0 && ix < W) {
            const scalar_t* src = x + ((p.n * H + iy) * W + ix) * C;
            for (int64_t gi = 0; gi < g.groups; ++gi) {
              std::memcpy(row + gi * kg + t * cg, src + gi * cg, cg * sizeof(scalar_t));
            }
          } else {
            for (int64_t gi = 0; gi < g.groups; ++gi) {
              std::fill_n(row + gi * kg + t * cg, cg, scalar_t(0));
            }
          }
        }
      }
    }
  }
}


// NCHW x: input row iy of image n, columns [ixs, ixs + Ws), transposed into a pixel-major staging tile [Ws, C]
// (zeros at columns outside the image; 8 channels at a time, so its writes are 32-byte runs).
template <typename scalar_t>
void stage_row_nchw(const scalar_t* x, scalar_t* stage, int64_t n, int64_t iy, int64_t ixs, int64_t Ws,
                    const ConvGeometry& g) {
  const int64_t C = g.c, H = g.h, W = g.w;
  // Staged columns [jlo, jhi) lie inside the image (input column ixs + j).
  const int64_t jlo = std::clamp<int64_t>(-ixs, 0, Ws);
  const int64_t jhi = std::clamp<int64_t>(W - ixs, jlo, Ws);
  std::fill_n(stage, jlo * C, scalar_t(0));
  std::fill_n(stage + jhi * C, (Ws - jhi) * C, scalar_t(0));
  const int64_t nj = jhi - jlo;
  const scalar_t* src = x + (n * C * H + iy) * W + (ixs + jlo);  // channel 0, first staged column in image
  scalar_t* st = stage + jlo * C;
  const int64_t plane = H * W;
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    const scalar_t* s0 = src + c * plane;
    const scalar_t* s1 = s0 + plane; const scalar_t* s2 = s1 + plane; const scalar_t* s3 = s2 + plane;
    const scalar_t* s4 = s3 + plane; const scalar_t* s5 = s4 + plane; const scalar_t* s6 = s5 + plane;
    const scalar_t* s7 = s6 + plane;
    scalar_t* d = st + c;
    for (int64_t j = 0; j < nj; ++j, d += C) {
      d[0] = s0[j]; d[1] = s1[j]; d[2] = s2[j]; d[3] = s3[j];
      d[4] = s4[j]; d[5] = s5[j]; d[6] = s6[j]; d[7] = s7[j];
    }
  }
  for (; c < C; ++c) {
    const scalar_t* s0 = src + c * plane;
    scalar_t* d = st + c;
    for (int64_t j = 0; j < nj; ++j, d += C) *d = s0[j];
  }
}

// NCHW x: the same cols [P, K] as gather_pixels_cl. Per run piece and kernel row ky, the input window
// x[n, :, iy, ixs : ixs + Ws] (all channels, the run's columns plus the kernel's halo) is first staged
// (stage_row_nchw), then each pixel's taps are contiguous copies of C/groups channels out of it. This reads each
// input value once per (run, ky) instead of once per (run, ky, kx) and replaces kh*kw*C short row copies per run
// with kh*C strided reads plus P*kh*kw long copies.
template <typename scalar_t>
void gather_pixels_nchw(const scalar_t* x, scalar_t* cols, scalar_t* stage, const Run* pieces, int64_t count,
                        const ConvGeometry& g) {
  const int64_t C = g.c, H = g.h, cg = g.c / g.groups, taps = g.kh * g.kw, kg = taps * cg;
  const int64_t K = g.groups * kg;
  scalar_t* row0 = cols;
  for (int64_t i = 0; i < count; ++i) {
    const Run& p = pieces[i];
    const int64_t L = p.x1 - p.x0;
    const int64_t ixs = p.x0 * g.sw - g.pw;
    const int64_t Ws = (L - 1) * g.sw + (g.kw - 1) * g.dw + 1;
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      const int64_t iy = p.y * g.sh - g.ph + ky * g.dh;
      if (iy < 0 || iy >= H) {
        for (int64_t q = 0; q < L; ++q) {
          scalar_t* row = row0 + q * K;
          for (int64_t kx = 0; kx < g.kw; ++kx) {
            const int64_t t = ky * g.kw + kx;
            for (int64_t gi = 0; gi < g.groups; ++gi) std::fill_n(row + gi * kg + t * cg, cg, scalar_t(0));
          }
        }
        continue;
      }
      stage_row_nchw<scalar_t>(x, stage, p.n, iy, ixs, Ws, g);
      for (int64_t q = 0; q < L; ++q) {
        scalar_t* row = row0 + q * K;
        for (int64_t kx = 0; kx < g.kw; ++kx) {
          const int64_t t = ky * g.kw + kx;
          const scalar_t* tp = stage + (q * g.sw + kx * g.dw) * C;
          for (int64_t gi = 0; gi < g.groups; ++gi) {
            std::memcpy(row + gi * kg + t * cg, tp + gi * cg, cg * sizeof(scalar_t));
          }
        }
      }
    }
    row0 += L * K;
  }
}

// Whether the pixels and direct strategies read x as channels_last (in place); else NCHW through staged rows. One
// channel: NCHW and channels_last are the same memory, so in place.
bool reads_channels_last(const at::Tensor& x, const ConvGeometry& g) {
  return x.suggest_memory_format() == at::MemoryFormat::ChannelsLast || g.c == 1;
}

// Channels_last x: where tap t of output (n, y, xo) reads its C channels, or `zeros` (a row of C zeros) where the
// tap falls outside the image (the conv's zero padding).
inline const float* tap_input(const float* x, const float* zeros, const ConvGeometry& g, int64_t n, int64_t y,
                              int64_t xo, int64_t t) {
  const int64_t iy = y * g.sh - g.ph + (t / g.kw) * g.dh, ix = xo * g.sw - g.pw + (t % g.kw) * g.dw;
  return iy >= 0 && iy < g.h && ix >= 0 && ix < g.w ? x + ((n * g.h + iy) * g.w + ix) * g.c : zeros;
}

// Channels_last x: tap t of an output whose window lies inside the image reads its top-left tap's input plus
// offsets[t] (tap_inputs).
std::vector<int64_t> tap_offsets(const ConvGeometry& g) {
  std::vector<int64_t> offsets(g.kh * g.kw);
  for (int64_t t = 0; t < g.kh * g.kw; ++t) offsets[t] = ((t / g.kw) * g.dh * g.w + (t % g.kw) * g.dw) * g.c;
  return offsets;
}

// Channels_last x: where each tap t of output (n, y, xo) reads its C channels, written to a[t * stride]: one base plus
// fixed offsets where the whole window lies inside the image, else per tap (tap_input: the zero row outside).
inline void tap_inputs(const float* x, const float* zeros, const ConvGeometry& g, const int64_t* offsets, int64_t n,
                       int64_t y, int64_t xo, const float** a, int64_t stride) {
  const int64_t taps = g.kh * g.kw, iy0 = y * g.sh - g.ph, ix0 = xo * g.sw - g.pw;
  if (iy0 >= 0 && iy0 + (g.kh - 1) * g.dh < g.h && ix0 >= 0 && ix0 + (g.kw - 1) * g.dw < g.w) {
    const float* base = x + ((n * g.h + iy0) * g.w + ix0) * g.c;
    for (int64_t t = 0; t < taps; ++t) a[t * stride] = base + offsets[t];
  } else {
    for (int64_t t = 0; t < taps; ++t) a[t * stride] = tap_input(x, zeros, g, n, y, xo, t);
  }
}

// The direct strategy's packed weight (implicit_gemm::pack_weight), cached per weight: inference calls a conv with
// the same weight every time, and packing it cost up to a fifth of a small focused conv (measured on the reference
// models). An entry serves a weight with the same storage (held weakly: a freed storage's entry is dropped and its
// address cannot be reused while the entry exists), data pointer, sizes, strides and version (an in-place update
// such as an optimizer step bumps it). Inference tensors have no version: they are packed on every call. At most 64
// entries, the oldest dropped first.
at::Tensor packed_weight(const at::Tensor& w, int64_t nr) {
  const int64_t o = w.size(0), blocks = (o + nr - 1) / nr;
  auto pack = [&] {
    at::Tensor packed = at::empty({blocks * w.size(2) * w.size(3) * w.size(1) * nr}, w.options());
    implicit_gemm::pack_weight(w.const_data_ptr<float>(), w.strides().data(), packed.mutable_data_ptr<float>(), o,
                               w.size(1), w.size(2), w.size(3), nr);
    return packed;
  };
  if (w.is_inference() || !w.has_storage()) return pack();
  struct Entry {
    c10::weak_intrusive_ptr<c10::StorageImpl> storage;
    const void* data;
    std::vector<int64_t> sizes, strides;
    int64_t version;
    int64_t nr;
    at::Tensor packed;
  };
  static std::mutex mutex;
  static std::deque<Entry> cache;
  c10::StorageImpl* storage = w.storage().unsafeGetStorageImpl();
  const int64_t version = w._version();
  std::lock_guard<std::mutex> lock(mutex);
  cache.erase(std::remove_if(cache.begin(), cache.end(), [](const Entry& e) { return e.storage.expired(); }),
              cache.end());
  for (const Entry& e : cache) {
    if (e.storage._unsafe_get_target() == storage && e.data == w.const_data_ptr() && e.version == version &&
        e.nr == nr && w.sizes().equals(e.sizes) && w.strides().equals(e.strides)) {
      return e.packed;
    }
  }
  if (cache.size() >= 64) cache.pop_front();
  cache.push_back(Entry{w.storage().getWeakStorageImpl(),
                        w.const_data_ptr(), w.sizes().vec(), w.strides().vec(), version, nr, pack()});
  return cache.back().packed;
}

// Runs the pixels strategy: per chunk of active outputs (one chunk per task, on the task's own buffers), gather
// their receptive fields, one GEMM per group against the weight, and write the results (plus bias) into out.
// cl: out is channels_last (else NCHW); x may be either.
template <typename scalar_t>
void run_pixels(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                at::Tensor& out, const MaskSummary& s, const ConvGeometry& g, bool cl, int64_t chunk) {
  using acc_t = at::opmath_type<scalar_t>;
  const PixelChunks chunks = split_runs(s.runs, chunk);
  const int64_t nchunks = static_cast<int64_t>(chunks.pixels.size());
  const int64_t O = g.o, Ho = g.ho, Wo = g.wo;
  const int64_t og = g.o / g.groups, kg = g.c / g.groups * g.kh * g.kw, K = g.groups * kg;
  // channels_last x is gathered pixel by pixel (one copy per tap) into cols [P, K]; NCHW x into the same cols
  // through a per-run staging tile (gather_pixels_nchw), which saves converting x (measured: the conversion cost
  // more than the whole gather). The weight as [O, kg] with columns in the gather's order.
  const bool cl_in = reads_channels_last(x, g);
  const at::Tensor xin = x.contiguous(cl_in ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const at::Tensor wmat = weight.permute({0, 2, 3, 1}).contiguous().view({O, kg});
  std::vector<acc_t> b(O, acc_t(0));
  if (bias.has_value() && bias->defined()) {
    const at::Tensor bc = bias->contiguous();
    const scalar_t* bp = bc.const_data_ptr<scalar_t>();
    for (int64_t o = 0; o < O; ++o) b[o] = static_cast<acc_t>(bp[o]);
  }
  const int64_t threads = at::get_num_threads();
  // Per thread: cols [chunk, K], then (NCHW x) the staging tile [Ws, C] for a run of up to chunk pixels.
  const int64_t stage_len = cl_in ? 0 : ((chunk - 1) * g.sw + (g.kw - 1) * g.dw + 1) * g.c;
  at::Tensor cols_buf = at::empty({threads, chunk * K + stage_len},
                                  x.options().memory_format(at::MemoryFormat::Contiguous));
  // Per thread: R [chunk, O], then (NCHW out) its transpose.
  at::Tensor res_buf = at::empty({threads, chunk * O + (cl ? 0 : chunk * O)},
                                 x.options().memory_format(at::MemoryFormat::Contiguous));
  const scalar_t* xp = xin.const_data_ptr<scalar_t>();
  scalar_t* outp = out.mutable_data_ptr<scalar_t>();
  // Chunks are handed out one at a time (not split statically), so a thread that the OS delays does not hold
  // the others up.
  std::atomic<int64_t> next_chunk{0};
  at::parallel_for(0, std::min(threads, nchunks), 1, [&](int64_t, int64_t) {
    at::AutoDispatchBelowADInplaceOrView guard;  // the GEMMs are internal: no autograd on worker threads
    const int64_t tid = at::get_thread_num();
    at::Tensor cols_t = cols_buf.select(0, tid), res_t = res_buf.select(0, tid);
    scalar_t* colsp = cols_t.mutable_data_ptr<scalar_t>();
    const scalar_t* resp = res_t.const_data_ptr<scalar_t>();
    for (int64_t ci = next_chunk++; ci < nchunks; ci = next_chunk++) {
      const Run* pieces = chunks.pieces.data() + chunks.begin[ci];
      const int64_t count = chunks.begin[ci + 1] - chunks.begin[ci];
      const int64_t P = chunks.pixels[ci];
      // A: the chunk's im2col as [P, K], columns (group, ky, kx, c) for either layout of x.
      if (cl_in) {
        gather_pixels_cl<scalar_t>(xp, colsp, pieces, count, g);
      } else {
        gather_pixels_nchw<scalar_t>(xp, colsp, colsp + chunk * K, pieces, count, g);
      }
      const at::Tensor A = cols_t.narrow(0, 0, P * K).view({P, K});
      // R [P, O] = A @ wmat^T: MKL runs this form ~10% faster than R^T = wmat @ A^T at these shapes (measured).
      at::Tensor R = res_t.narrow(0, 0, P * O).view({P, O});
      for (int64_t gi = 0; gi < g.groups; ++gi) {
        at::Tensor r = R.narrow(1, gi * og, og);
        at::mm_out(r, A.narrow(1, gi * kg, kg), wmat.narrow(0, gi * og, og).t());
      }
      if (cl) {  // each pixel's O outputs are contiguous in out as in R
        const scalar_t* src = resp;
        for (int64_t i = 0; i < count; ++i) {
          const Run& p = pieces[i];
          scalar_t* dst = outp + ((p.n * Ho + p.y) * Wo + p.x0) * O;
          for (int64_t j = 0; j < p.x1 - p.x0; ++j, dst += O, src += O) {
            for (int64_t o = 0; o < O; ++o) dst[o] = static_cast<scalar_t>(static_cast<acc_t>(src[o]) + b[o]);
          }
        }
      } else {  // NCHW: transpose R in cache (16 x 16 blocks), then write each channel's runs contiguously
        scalar_t* rt = res_t.mutable_data_ptr<scalar_t>() + chunk * O;
        for (int64_t o0 = 0; o0 < O; o0 += 16) {
          for (int64_t q0 = 0; q0 < P; q0 += 16) {
            const int64_t o1 = std::min(O, o0 + 16), q1 = std::min(P, q0 + 16);
            for (int64_t q = q0; q < q1; ++q) {
              for (int64_t o = o0; o < o1; ++o) rt[o * P + q] = resp[q * O + o];
            }
          }
        }
        for (int64_t o = 0; o < O; ++o) {
          const scalar_t* src = rt + o * P;
          const acc_t bo = b[o];
          for (int64_t i = 0; i < count; ++i) {
            const Run& p = pieces[i];
            const int64_t len = p.x1 - p.x0;
            scalar_t* dst = outp + ((p.n * O + o) * Ho + p.y) * Wo + p.x0;
            for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<scalar_t>(static_cast<acc_t>(src[j]) + bo);
            src += len;
          }
        }
      }
    }
  });
}

// Pixels per chunk of the direct strategy: about 256 (the weight rows of a reduction step, loaded into L1 once, serve
// every pixel of the chunk; 256 pixels of 64 partial sums are 64 KiB), fewer where that leaves under 4 work items
// (chunk, output block) per thread, but not under 32.
int64_t direct_chunk(int64_t active, int64_t o_blocks) {
  const int64_t threads = at::get_num_threads();
  int64_t chunks = (active + 255) / 256;
  const int64_t wanted = (4 * threads + o_blocks - 1) / o_blocks;
  chunks = std::max(chunks, std::min(wanted, (active + 31) / 32));
  return std::max<int64_t>(1, (active + chunks - 1) / chunks);
}

// The direct strategy (fp32, groups 1, implicit_gemm::available()): no im2col. First, per chunk of active pixels
// (in parallel), where each pixel reads each tap: in channels_last x itself, or (NCHW x) in the chunk's staged input
// rows. Then the work items (chunk, block of nr output channels) are handed out one at a time (a thread that the OS
// delays does not hold the others up): per item the implicit-GEMM micro-kernel (implicit_gemm::blocks_times_weight)
// writes R [P, nr], and its results plus bias go to out. cl: out is channels_last, and the results get the
// epilogue as they are stored: plus the residual `res` (out's shape and layout; null: none), clamped to `clamp`
// (NCHW out: neither, the fill pass applies them).
void run_direct(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, at::Tensor& out,
                const MaskSummary& s, const ConvGeometry& g, bool cl, int64_t chunk, const Clamp& clamp,
                const float* res) {
  const int64_t O = g.o, Ho = g.ho, Wo = g.wo, taps = g.kh * g.kw;
  const int64_t nr = implicit_gemm::block_outputs(O), mr = implicit_gemm::block_pixels(nr);
  const int64_t o_blocks = (O + nr - 1) / nr;
  if (chunk <= 0) chunk = direct_chunk(s.active, o_blocks);
  const PixelChunks chunks = split_runs(s.runs, chunk);
  const int64_t nchunks = static_cast<int64_t>(chunks.pixels.size()), items = nchunks * o_blocks;
  const bool cl_in = reads_channels_last(x, g);
  const at::Tensor xin = x.contiguous(cl_in ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const at::Tensor wpacked = packed_weight(weight, nr);
  const std::vector<float> zero_row(g.c, 0.0f);  // taps outside the image read it
  const std::vector<int64_t> offsets = tap_offsets(g);
  std::vector<float> b(o_blocks * nr, 0.0f);
  if (bias.has_value() && bias->defined()) {
    const at::Tensor bc = bias->contiguous();
    std::copy_n(bc.const_data_ptr<float>(), O, b.begin());
  }
  const float* xp = xin.const_data_ptr<float>();
  const float* wp = wpacked.const_data_ptr<float>();
  float* outp = out.mutable_data_ptr<float>();
  const float lo = static_cast<float>(clamp.lo), hi = static_cast<float>(clamp.hi);
  // Per chunk: its blocks of mr pixels (the last block's missing pixels read zeros; their rows are unused), where
  // its pointers start (per block, per tap, per pixel) and (NCHW x) where its staged rows start (per piece, kh rows
  // of its window, zeros at columns outside the image).
  std::vector<int64_t> ptr_at(nchunks + 1, 0), stage_at(chunks.pieces.size() + 1, 0);
  for (int64_t ci = 0; ci < nchunks; ++ci) ptr_at[ci + 1] = ptr_at[ci] + (chunks.pixels[ci] + mr - 1) / mr * mr * taps;
  if (!cl_in) {
    for (size_t i = 0; i < chunks.pieces.size(); ++i) {
      stage_at[i + 1] = stage_at[i] + g.kh * g.window_w(chunks.pieces[i].x1 - chunks.pieces[i].x0) * g.c;
    }
  }
  std::vector<const float*> ptrs(ptr_at[nchunks]);
  std::vector<float> staged(stage_at.back());
  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ci = begin; ci < end; ++ci) {
      const int64_t first = chunks.begin[ci], count = chunks.begin[ci + 1] - first, P = chunks.pixels[ci];
      const Run* pieces = chunks.pieces.data() + first;
      if (!cl_in) {
        for (int64_t i = 0; i < count; ++i) {
          const Run& p = pieces[i];
          const int64_t ws = g.window_w(p.x1 - p.x0);
          for (int64_t ky = 0; ky < g.kh; ++ky) {
            const int64_t iy = p.y * g.sh - g.ph + ky * g.dh;
            if (iy < 0 || iy >= g.h) continue;
            stage_row_nchw<float>(xp, staged.data() + stage_at[first + i] + ky * ws * g.c, p.n, iy,
                                  p.x0 * g.sw - g.pw, ws, g);
          }
        }
      }
      int64_t piece = 0, xo = count > 0 ? pieces[0].x0 : 0;
      const int64_t padded = (P + mr - 1) / mr * mr;
      for (int64_t q = 0; q < padded; ++q) {
        const bool real = q < P;
        const Run& p = pieces[real ? piece : 0];
        const float** bp = ptrs.data() + ptr_at[ci] + (q / mr) * taps * mr + q % mr;
        if (real && cl_in) {
          tap_inputs(xp, zero_row.data(), g, offsets.data(), p.n, p.y, xo, bp, mr);
        } else {
          for (int64_t t = 0; t < taps; ++t) {
            const int64_t ky = t / g.kw, kx = t % g.kw;
            const int64_t iy = p.y * g.sh - g.ph + ky * g.dh;
            if (!real || iy < 0 || iy >= g.h) {
              bp[t * mr] = zero_row.data();
            } else {  // NCHW x: the staged row holds the zeros of columns outside the image
              const int64_t ws = g.window_w(p.x1 - p.x0);
              bp[t * mr] = staged.data() + stage_at[first + piece] + (ky * ws + (xo - p.x0) * g.sw + kx * g.dw) * g.c;
            }
          }
        }
        if (real && ++xo == p.x1 && ++piece < count) xo = pieces[piece].x0;
      }
    }
  });
  std::atomic<int64_t> next_item{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), items), 1, [&](int64_t, int64_t) {
    std::vector<float> r;        // R [P rounded up to whole blocks, nr]: partial sums (NCHW out: the results)
    std::vector<float*> dst;     // channels_last out: where each pixel's nr outputs go
    std::vector<const float*> rdst;  // ... and where its residual is read
    std::vector<float> scratch;  // ... for the padding pixels of the last block
    for (int64_t item = next_item++; item < items; item = next_item++) {
      const int64_t ci = item / o_blocks, ob = item % o_blocks;
      const Run* pieces = chunks.pieces.data() + chunks.begin[ci];
      const int64_t count = chunks.begin[ci + 1] - chunks.begin[ci];
      const int64_t blocks = (chunks.pixels[ci] + mr - 1) / mr;
      const int64_t o0 = ob * nr, no = std::min(nr, O - o0);
      r.resize(blocks * mr * nr);
      if (cl) {  // the last reduction step writes each pixel's outputs (plus bias) in place: a pixel's are contiguous
        scratch.assign(2 * nr, 0.0f);  // [0, nr): the padding pixels' outputs; [nr, 2 nr): their residual (zeros)
        dst.assign(blocks * mr, scratch.data());
        rdst.assign(res != nullptr ? blocks * mr : 0, scratch.data() + nr);
        int64_t q = 0;
        for (int64_t i = 0; i < count; ++i) {
          const Run& p = pieces[i];
          const int64_t at = ((p.n * Ho + p.y) * Wo + p.x0) * O + o0;
          for (int64_t xo = p.x0; xo < p.x1; ++xo, ++q) {
            dst[q] = outp + at + (xo - p.x0) * O;
            if (res != nullptr) rdst[q] = res + at + (xo - p.x0) * O;
          }
        }
        implicit_gemm::blocks_times_weight(ptrs.data() + ptr_at[ci], blocks, taps, g.c, wp, ob, nr, r.data(),
                                           dst.data(), b.data() + o0, no, res != nullptr ? rdst.data() : nullptr, lo,
                                           hi);
        continue;
      }
      // NCHW out: R, then each channel's run written contiguously, plus bias.
      implicit_gemm::blocks_times_weight(ptrs.data() + ptr_at[ci], blocks, taps, g.c, wp, ob, nr, r.data(), nullptr,
                                         nullptr, nr, nullptr, lo, hi);
      const float* src = r.data();
      for (int64_t i = 0; i < count; ++i) {
        const Run& p = pieces[i];
        const int64_t len = p.x1 - p.x0;
        for (int64_t o = 0; o < no; ++o) {
          float* d = outp + ((p.n * O + o0 + o) * Ho + p.y) * Wo + p.x0;
          const float bo = b[o0 + o];
          for (int64_t j = 0; j < len; ++j) d[j] = src[j * nr + o] + bo;
        }
        src += len * nr;
      }
    }
  });
}

// The direct strategy for a depthwise conv (groups == C == O), channels_last x and out, fp32: the active outputs of
// each run 8 at a time (implicit_gemm::depthwise_pixels; a short last group is padded with pixels that read the zero
// row and write a scratch row), the input read in place (a tap outside the image reads a row of zeros; tap_inputs);
// runs split over the threads. The results get the epilogue as they are stored: plus the residual `res` (out's
// shape and layout; null: none), clamped to `clamp`.
void run_direct_depthwise(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          at::Tensor& out, const MaskSummary& s, const ConvGeometry& g, const Clamp& clamp,
                          const float* res) {
  constexpr int64_t P = 8;
  const int64_t C = g.c, taps = g.kh * g.kw;
  std::vector<float> wt(taps * C);  // [taps][C]
  const float* w = weight.const_data_ptr<float>();
  const auto ws = weight.strides();
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t t = 0; t < taps; ++t) wt[t * C + c] = w[c * ws[0] + (t / g.kw) * ws[2] + (t % g.kw) * ws[3]];
  }
  const std::vector<int64_t> offsets = tap_offsets(g);
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  const std::vector<float> zero_row(C, 0.0f);
  const float* xp = x.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(s.runs.size()), 4, [&](int64_t begin, int64_t end) {
    std::vector<const float*> a(taps * P);
    std::vector<float*> dst(P);
    std::vector<const float*> rdst(P);
    std::vector<float> scratch(2 * C, 0.0f);  // [0, C): padding pixels' outputs; [C, 2 C): their residual (zeros)
    for (int64_t r = begin; r < end; ++r) {
      const Run& run = s.runs[r];
      for (int64_t x0 = run.x0; x0 < run.x1; x0 += P) {
        for (int64_t i = 0; i < P; ++i) {
          const int64_t xo = x0 + i;
          if (xo >= run.x1) {  // padding pixel
            for (int64_t t = 0; t < taps; ++t) a[t * P + i] = zero_row.data();
            dst[i] = scratch.data();
            rdst[i] = scratch.data() + C;
            continue;
          }
          dst[i] = op + ((run.n * g.ho + run.y) * g.wo + xo) * C;
          rdst[i] = res != nullptr ? res + ((run.n * g.ho + run.y) * g.wo + xo) * C : nullptr;
          tap_inputs(xp, zero_row.data(), g, offsets.data(), run.n, run.y, xo, a.data() + i, P);
        }
        implicit_gemm::depthwise_pixels<P>(a.data(), taps, wt.data(), bp, dst.data(), C,
                                           res != nullptr ? rdst.data() : nullptr, static_cast<float>(clamp.lo),
                                           static_cast<float>(clamp.hi));
      }
    }
  });
}

// Cost model, in relative units (one MAC of oneDNN's dense conv = 0.005). The strategies split the work over the
// threads alike, so per-core ratios decide. Measured on a 2-core AMD EPYC (AVX-512) for the first constants and on a
// 2-core Xeon (AVX-512) for direct_mac, direct_dw_mac and result, torch 2.14, fp32, with benchmarks/focus.py and
// single-op timings; the ratios between strategies, not the absolute speeds, carried over between the two:
//   dense_mac  oneDNN's dense conv per multiply-accumulate (~115 GFLOP/s per core; NCHW and channels_last within
//              10% at 2 threads);
//   gemm_mac   the pixels GEMMs per MAC: MKL sgemm on [chunk x K] @ [K x O] runs ~98 GFLOP/s per core, 1.2x the
//              dense conv's cost per MAC;
//   copy       one gathered input value (im2col of pixels, windows of crop/tiles): ~20 dense MACs;
//   call       one vendor conv call or the set-up of the pixels GEMMs (~70 us);
//   direct_mac the direct strategy's micro-kernel per MAC (measured on a 2-core Xeon with AVX-512 and AMX,
//              forced direct at a full mask, channels_last: 0.93-1.03x of oneDNN's dense conv at 128-256 channels,
//              0.87-0.91x at 32-64, 1.0-1.45x at 512; the same constant as dense, so that on compact blobs, where
//              crop ran 10-30% slower than direct, direct wins ties);
//   direct_dw_mac  the depthwise direct kernel per MAC, its channels counted in whole vectors of 16: 0.88-1.07x
//              oneDNN's depthwise conv at a full mask (32-960 channels; both memory-bound there), 1.1x its cost;
//   dw_scale   oneDNN's depthwise conv per MAC over its full conv's (4.6x: memory-bound);
//   result     one output value staged and written by pixels or direct (R, then out; measured on a 1-channel
//              input, where writing 32 outputs per pixel costs more than its 9 MACs each and dense wins).
// Writing the output costs the same for every strategy, so it is left out. What this gives (one 3x3 conv,
// 128 or 256 channels): a compact blob -> crop (its halo is thin); scattered blobs or pixels -> pixels (no
// overhang at all); AoI above ~70-80% -> dense. Tiles (8, 16 or 32, the cheapest by the model) win only where
// pixels cannot run cheaply, i.e. grouped/depthwise convs with a few mid-sized blobs.
struct CostModel {
  double dense_mac = 0.0050, gemm_mac = 0.0060, direct_mac = 0.0050, direct_dw_mac = 0.025, copy = 0.10,
         result = 0.2, call = 2.0e4;
  double dw_scale = 4.6;
  double kmac = 0;  // MACs per output position: O * C/groups * kh * kw
  double o = 0;     // output channels
  // A vendor conv over `outputs` positions of gathered windows (`inputs` values), its results scattered back.
  double conv(double outputs, double inputs) const {
    return outputs * (kmac * dense_mac + o * result) + inputs * copy + call;
  }
};

// Pixels per GEMM chunk: its im2col block (chunk x K) stays within about 1 MiB (a core's L2; 1 MiB measured
// best among 256 KiB .. 4 MiB), and the chunks are at least as many as the threads.
int64_t pixel_chunk(const ConvGeometry& g, int64_t active, int64_t element_size) {
  const int64_t K = g.c * g.kh * g.kw;
  int64_t chunk = std::clamp<int64_t>((1024 * 1024) / (K * element_size), 16, 1024);
  const int64_t threads = at::get_num_threads();
  return std::max<int64_t>(1, std::min(chunk, (active + threads - 1) / threads));
}

at::Tensor focused_conv2d_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                              const c10::optional<at::Tensor>& bias, const at::Tensor& mask_in,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups, const c10::optional<at::Tensor>& fill_in,
                              c10::optional<double> clamp_min, c10::optional<double> clamp_max,
                              const c10::optional<at::Tensor>& residual_in) {
  const ConvGeometry g =
      check_focused_conv2d_args("focused_conv2d", x_in, weight_in, bias, mask_in, stride, padding, dilation, groups);
  check_focused_conv2d_fill("focused_conv2d", fill_in, x_in, g);
  check_focused_conv2d_clamp("focused_conv2d", clamp_min, clamp_max);
  check_focused_conv2d_residual("focused_conv2d", residual_in, x_in, g);
  const bool has_res = residual_in.has_value() && residual_in->defined();
  Clamp clamp;
  if (clamp_min.has_value()) clamp.lo = *clamp_min;
  if (clamp_max.has_value()) clamp.hi = *clamp_max;
  // The value of the inactive outputs, O contiguous values (none: zeros): the fill, clamped with the epilogue (with
  // a residual the fill pass adds it first, then clamps).
  at::Tensor fill =
      fill_in.has_value() && fill_in->defined() ? fill_in->reshape({-1}).contiguous() : at::Tensor();
  if (!has_res && clamp.on() && (fill.defined() || clamp.lo > 0.0 || clamp.hi < 0.0)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    fill = (fill.defined() ? fill : at::zeros({g.o}, x_in.options())).clamp(clamp_min, clamp_max);
  }
  const at::MemoryFormat fmt = conv_output_format(x_in, weight_in);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor& weight = weight_in;  // any strides: the vendor conv takes them, the GEMM paths pack it
  const at::Tensor mask = mask_in.contiguous();
  const bool* m = mask.const_data_ptr<bool>();
  const FocusConfig cfg = focus_config();
  const MaskSummary s = summarise(m, g);
  const int64_t outputs = g.n * g.ho * g.wo;
  const at::Tensor res = has_res ? residual_in->contiguous(fmt) : at::Tensor();

  // After a strategy wrote the active outputs: the inactive ones, and the epilogue (residual, clamp) where the
  // strategy did not apply it (in_kernel: it did).
  auto fill_rest = [&](at::Tensor& out, bool in_kernel) {
    if (s.active == outputs && (in_kernel || (!clamp.on() && !has_res))) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "focused_conv2d_fill", [&] {
      fill_inactive<scalar_t>(out, m, s, g, cl, fill.defined() ? fill.const_data_ptr<scalar_t>() : nullptr,
                              has_res || !in_kernel ? clamp : Clamp(),
                              has_res ? res.const_data_ptr<scalar_t>() : nullptr, !in_kernel);
    });
  };
  if (s.active == 0 && cfg.strategy != "dense") {
    RECORD_FUNCTION("fxeff::focused_conv2d::empty", c10::ArrayRef<const c10::IValue>{});
    count_focus_strategy(FocusStrategy::Empty);
    // at::zeros ignores memory_format: allocate in the input's format, then fill
    at::Tensor out = at::empty({g.n, g.o, g.ho, g.wo}, x.options().memory_format(fmt));
    if (!has_res) return fill.defined() ? out.copy_(fill.view({1, g.o, 1, 1}).expand_as(out)) : out.zero_();
    fill_rest(out, false);
    return out;
  }

  const bool depthwise = g.groups > 1 && g.groups == g.c && g.o == g.c;
  CostModel cost;
  cost.kmac = static_cast<double>(g.o) * (g.c / g.groups) * g.kh * g.kw;
  cost.o = static_cast<double>(g.o);
  if (depthwise) cost.dense_mac *= cost.dw_scale;
  double crop_cost = 0.0;
  for (const auto& b : s.boxes) {
    const int64_t bh = b[1] - b[0], bw = b[3] - b[2];
    if (bh > 0) crop_cost += cost.conv(static_cast<double>(bh) * bw, static_cast<double>(g.window_h(bh)) * g.window_w(bw) * g.c);
  }
  const double dense_cost = static_cast<double>(outputs) * cost.kmac * cost.dense_mac + cost.call;
  // Pixels runs one GEMM per group and chunk: only worth it for full (groups == 1) convs.
  const double pixels_cost = g.groups == 1
      ? static_cast<double>(s.active) *
                (cost.kmac * cost.gemm_mac + static_cast<double>(g.c) * g.kh * g.kw * cost.copy + g.o * cost.result) +
            cost.call
      : std::numeric_limits<double>::infinity();
  // direct: the implicit-GEMM micro-kernel (fp32, groups 1, an AVX-512 CPU); no copies but the results and, for
  // NCHW x, each run's kh input rows.
  // A depthwise conv (channels_last only) runs its own direct kernel (run_direct_depthwise), priced per MAC as
  // measured against oneDNN's depthwise conv, which costs dw_scale times a full conv's MAC (memory-bound).
  const bool direct_possible = (g.groups == 1 || (depthwise && cl)) && x.scalar_type() == at::kFloat &&
                               implicit_gemm::available();
  const double direct_cost = !direct_possible ? std::numeric_limits<double>::infinity()
      : depthwise ? static_cast<double>(s.active) * (static_cast<double>((g.c + 15) / 16 * 16) * g.kh * g.kw *
                                                     cost.direct_dw_mac + g.o * cost.result) + cost.call
      : static_cast<double>(s.active) * (cost.kmac * cost.direct_mac + (cl ? 0.0 : g.kh * g.c * cost.copy) +
                                         g.o * cost.result) + cost.call;
  const double best_other = std::min({dense_cost, crop_cost, pixels_cost, direct_cost});
  // Tile sizes tried by the auto strategy (the best one depends on how scattered the mask is); skipped when even
  // tiles without overhang, halo or gather (cost >= the active outputs' conv) could not beat the others.
  const std::vector<int64_t> tile_sizes =
      cfg.tile > 0 ? std::vector<int64_t>{cfg.tile} : std::vector<int64_t>{8, 16, 32};
  const bool want_tiles = cfg.strategy == "tiles" ||
                          (cfg.strategy == "auto" && cost.conv(static_cast<double>(s.active), 0.0) < best_other);
  int64_t best_tile = tile_sizes[0];
  std::vector<Region> best_tiles;
  double tiles_cost = std::numeric_limits<double>::infinity();
  for (int64_t t : want_tiles ? tile_sizes : std::vector<int64_t>{}) {
    std::vector<Region> tiles = active_tiles(m, g, s, t);
    const double count = static_cast<double>(tiles.size());
    const double c = cost.conv(count * t * t, count * g.window_h(t) * g.window_w(t) * g.c);
    if (c < tiles_cost) { tiles_cost = c; best_tile = t; best_tiles = std::move(tiles); }
  }

  FocusStrategy pick;
  if (cfg.strategy == "dense") pick = FocusStrategy::Dense;
  else if (cfg.strategy == "crop") pick = FocusStrategy::Crop;
  else if (cfg.strategy == "tiles") pick = FocusStrategy::Tiles;
  else if (cfg.strategy == "pixels") pick = FocusStrategy::Pixels;
  else if (cfg.strategy == "direct") {
    TORCH_CHECK_NOT_IMPLEMENTED(direct_possible, "fxeff.focused_conv2d: the direct strategy runs fp32 convs with "
                                "groups == 1 (or depthwise ones on channels_last inputs) on an AVX-512 CPU; got ",
                                x.scalar_type(), ", groups ", g.groups, depthwise && !cl ? ", NCHW" : "",
                                implicit_gemm::available() ? "" : ", a CPU without AVX-512");
    pick = FocusStrategy::Direct;
  } else {
    pick = FocusStrategy::Dense;
    double best = dense_cost;
    if (crop_cost < best) { best = crop_cost; pick = FocusStrategy::Crop; }
    if (tiles_cost < best) { best = tiles_cost; pick = FocusStrategy::Tiles; }
    if (pixels_cost < best) { best = pixels_cost; pick = FocusStrategy::Pixels; }
    if (direct_cost < best) { best = direct_cost; pick = FocusStrategy::Direct; }
  }

  if (pick == FocusStrategy::Dense) {
    RECORD_FUNCTION("fxeff::focused_conv2d::dense", c10::ArrayRef<const c10::IValue>{});
    count_focus_strategy(FocusStrategy::Dense);
    at::Tensor out = at::conv2d(x, weight, bias, stride, padding, dilation, groups).contiguous(fmt);
    fill_rest(out, false);
    return out;
  }
  at::Tensor out = at::empty({g.n, g.o, g.ho, g.wo}, x.options().memory_format(fmt));
  if (pick == FocusStrategy::Crop) {
    RECORD_FUNCTION("fxeff::focused_conv2d::crop", c10::ArrayRef<const c10::IValue>{});
    count_focus_strategy(FocusStrategy::Crop);
    for (int64_t n = 0; n < g.n; ++n) {
      const auto& b = s.boxes[n];
      if (b[1] <= b[0]) continue;
      run_regions(x, weight, bias, m, out, {Region{n, b[0], b[2]}}, g, b[1] - b[0], b[3] - b[2], fmt);
    }
  } else if (pick == FocusStrategy::Tiles) {
    RECORD_FUNCTION("fxeff::focused_conv2d::tiles", c10::ArrayRef<const c10::IValue>{});
    count_focus_strategy(FocusStrategy::Tiles);
    run_regions(x, weight, bias, m, out, best_tiles, g, best_tile, best_tile, fmt);
  } else if (pick == FocusStrategy::Pixels) {
    RECORD_FUNCTION("fxeff::focused_conv2d::pixels", c10::ArrayRef<const c10::IValue>{});
    count_focus_strategy(FocusStrategy::Pixels);
    const int64_t chunk = cfg.tile > 0 ? cfg.tile : pixel_chunk(g, s.active, x.element_size());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "focused_conv2d_pixels", [&] {
      run_pixels<scalar_t>(x, weight, bias, out, s, g, cl, chunk);
    });
  } else {
    RECORD_FUNCTION("fxeff::focused_conv2d::direct", c10::ArrayRef<const c10::IValue>{});
    count_focus_strategy(FocusStrategy::Direct);
    const float* rp = has_res ? res.const_data_ptr<float>() : nullptr;
    if (depthwise) {
      run_direct_depthwise(x, weight, bias, out, s, g, clamp, rp);
    } else {
      run_direct(x, weight, bias, out, s, g, cl, cfg.tile, clamp, rp);
    }
  }
  // direct applies the epilogue to channels_last outputs as it stores them
  fill_rest(out, pick == FocusStrategy::Direct && cl);
  return out;
}

// ---- backward ------------------------------------------------------------------------------------------

// Input positions that some active output reads (stride 1): input (iy, ix) feeds output (iy + ph - ky * dh,
// ix + pw - kx * dw) for every tap. Outside this set the input gradient is exactly zero.
at::Tensor read_positions(const bool* m, const ConvGeometry& g) {
  at::Tensor out = at::zeros({g.n, g.h, g.w}, at::TensorOptions().dtype(at::kBool));
  bool* d = out.mutable_data_ptr<bool>();
  at::parallel_for(0, g.n * g.h, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / g.h, iy = r % g.h;
      bool* row = d + r * g.w;
      for (int64_t ky = 0; ky < g.kh; ++ky) {
        const int64_t y = iy + g.ph - ky * g.dh;
        if (y < 0 || y >= g.ho) continue;
        const bool* mrow = m + (n * g.ho + y) * g.wo;
        for (int64_t kx = 0; kx < g.kw; ++kx) {
          const int64_t off = g.pw - kx * g.dw;  // output column of input column ix: ix + off
          const int64_t lo = std::max<int64_t>(0, -off), hi = std::min<int64_t>(g.w, g.wo - off);
          for (int64_t ix = lo; ix < hi; ++ix) row[ix] |= mrow[ix + off];
        }
      }
    }
  });
  return out;
}

// grad_w (as [O, kh*kw*C], the gather's column order) and grad_b: sums over the active outputs only of
// grad_out[p]^T x im2col(x)[p], one GEMM per chunk accumulated in per-thread buffers.
template <typename scalar_t>
std::pair<at::Tensor, at::Tensor> pixels_weight_grad(const at::Tensor& xcl, const at::Tensor& gcl,
                                                     const MaskSummary& s, const ConvGeometry& g, int64_t chunk) {
  const PixelChunks chunks = split_runs(s.runs, chunk);
  const int64_t nchunks = static_cast<int64_t>(chunks.pixels.size());
  const int64_t O = g.o, K = g.c * g.kh * g.kw;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), nchunks);
  const auto opts = xcl.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor gw_acc = at::zeros({threads, O, K}, opts), gb_acc = at::zeros({threads, O}, opts);
  at::Tensor cols_buf = at::empty({threads, chunk * K}, opts), g_buf = at::empty({threads, chunk * O}, opts);
  const scalar_t* xp = xcl.const_data_ptr<scalar_t>();
  const scalar_t* gp = gcl.const_data_ptr<scalar_t>();
  std::atomic<int64_t> next_chunk{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const int64_t tid = at::get_thread_num();
    at::Tensor cols_t = cols_buf.select(0, tid), g_t = g_buf.select(0, tid), gw_t = gw_acc.select(0, tid);
    scalar_t* colsp = cols_t.mutable_data_ptr<scalar_t>();
    scalar_t* gq = g_t.mutable_data_ptr<scalar_t>();
    scalar_t* gb = gb_acc.select(0, tid).mutable_data_ptr<scalar_t>();
    for (int64_t ci = next_chunk++; ci < nchunks; ci = next_chunk++) {
      const Run* pieces = chunks.pieces.data() + chunks.begin[ci];
      const int64_t count = chunks.begin[ci + 1] - chunks.begin[ci];
      const int64_t P = chunks.pixels[ci];
      gather_pixels_cl<scalar_t>(xp, colsp, pieces, count, g);
      scalar_t* d = gq;
      for (int64_t i = 0; i < count; ++i) {
        const Run& p = pieces[i];
        const int64_t len = (p.x1 - p.x0) * O;
        std::memcpy(d, gp + ((p.n * g.ho + p.y) * g.wo + p.x0) * O, len * sizeof(scalar_t));
        d += len;
      }
      for (int64_t q = 0; q < P; ++q) {
        for (int64_t o = 0; o < O; ++o) gb[o] += gq[q * O + o];
      }
      const at::Tensor G = g_t.narrow(0, 0, P * O).view({P, O});
      at::addmm_out(gw_t, gw_t, G.t(), cols_t.narrow(0, 0, P * K).view({P, K}));
    }
  });
  return {gw_acc.sum(0), gb_acc.sum(0)};
}

// Gradients of out = mask * (conv(x, w) + b). Outputs outside the mask are constant zero and contribute
// nothing, so only the active outputs' gradients flow back:
//   pixels - (groups 1, stride 1, fp32/fp64, when the cost model says it is cheaper) grad_w and grad_b from
//            the active outputs' im2col (chunked GEMMs); grad_x as the conv of the masked grad_out with the
//            flipped, transposed weight, computed by the forward's pixels machinery at the input positions
//            that active outputs read (zero elsewhere);
//   dense  - the masked grad_out through the vendor conv's backward.
// Profiler records "fxeff::focused_conv2d_backward::<empty|dense|pixels>" say which ran.
std::tuple<at::Tensor, at::Tensor, at::Tensor> focused_conv2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask_in,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvGeometry g = check_focused_conv2d_args("focused_conv2d_backward", x, weight, c10::nullopt, mask_in,
                                                   stride, padding, dilation, groups);
  TORCH_CHECK_VALUE(grad_out.dim() == 4 && grad_out.size(0) == g.n && grad_out.size(1) == g.o &&
                  grad_out.size(2) == g.ho && grad_out.size(3) == g.wo,
              "fxeff.focused_conv2d_backward: grad_out must be [", g.n, ", ", g.o, ", ", g.ho, ", ", g.wo,
              "], got ", grad_out.sizes());
  TORCH_CHECK_VALUE(grad_out.scalar_type() == x.scalar_type(), "fxeff.focused_conv2d_backward: grad_out dtype must "
                    "equal x dtype ", x.scalar_type(), ", got ", grad_out.scalar_type());
  const at::MemoryFormat fmt = x.suggest_memory_format();
  const at::Tensor mask = mask_in.contiguous();
  const bool* m = mask.const_data_ptr<bool>();
  const MaskSummary s = summarise(m, g);
  if (s.active == 0) {
    RECORD_FUNCTION("fxeff::focused_conv2d_backward::empty", c10::ArrayRef<const c10::IValue>{});
    return {at::zeros_like(x, fmt), at::zeros_like(weight, at::MemoryFormat::Contiguous),
            at::zeros({g.o}, weight.options())};
  }
  const int64_t outputs = g.n * g.ho * g.wo;
  const bool pixels_possible = g.groups == 1 && g.sh == 1 && g.sw == 1 && g.ph <= g.dh * (g.kh - 1) &&
                               g.pw <= g.dw * (g.kw - 1) &&
                               (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble);
  at::Tensor reads;
  MaskSummary sr;
  bool use_pixels = false;
  if (pixels_possible) {
    reads = read_positions(m, g);
    ConvGeometry input_grid{};  // summarise reads n, ho, wo: here the input's grid
    input_grid.n = g.n; input_grid.ho = g.h; input_grid.wo = g.w;
    sr = summarise(reads.const_data_ptr<bool>(), input_grid);
    CostModel cost;
    cost.kmac = static_cast<double>(g.o) * g.c * g.kh * g.kw;
    const double per_pixel = cost.kmac * cost.gemm_mac + static_cast<double>(g.c) * g.kh * g.kw * cost.copy;
    const double dense_cost = 2.0 * static_cast<double>(outputs) * cost.kmac * cost.dense_mac;
    use_pixels = static_cast<double>(s.active + sr.active) * per_pixel + 2 * cost.call < dense_cost;
  }
  if (!use_pixels) {
    RECORD_FUNCTION("fxeff::focused_conv2d_backward::dense", c10::ArrayRef<const c10::IValue>{});
    const at::Tensor masked =
        s.active == outputs ? grad_out : grad_out.masked_fill(at::logical_not(mask).unsqueeze(1), 0);
    const std::array<int64_t, 1> bias_sizes{g.o};
    const std::array<int64_t, 2> output_padding{0, 0};
    auto grads = at::convolution_backward(masked, x, weight, at::IntArrayRef(bias_sizes), stride, padding, dilation,
                                          false, output_padding, groups, {true, true, true});
    return {std::get<0>(grads).contiguous(fmt), std::get<1>(grads).contiguous(), std::get<2>(grads)};
  }
  RECORD_FUNCTION("fxeff::focused_conv2d_backward::pixels", c10::ArrayRef<const c10::IValue>{});
  const at::Tensor xcl = x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor gcl = grad_out.contiguous(at::MemoryFormat::ChannelsLast);
  // grad_out with the inactive outputs zeroed (its own copy: grad_out itself is not ours to change).
  at::Tensor masked = gcl.is_same(grad_out) ? gcl.clone(at::MemoryFormat::ChannelsLast) : gcl;
  // grad_x = conv(masked, weight^T flipped), stride 1, padding d*(k-1)-p: its geometry and read positions.
  const at::Tensor wflip = weight.transpose(0, 1).flip({2, 3}).contiguous();
  const std::array<int64_t, 2> one{1, 1}, pad_t{g.dh * (g.kh - 1) - g.ph, g.dw * (g.kw - 1) - g.pw};
  const ConvGeometry gt = check_focused_conv2d_args("focused_conv2d_backward", masked, wflip, c10::nullopt, reads,
                                                    one, pad_t, dilation, 1);
  at::Tensor grad_x = at::empty({g.n, g.c, g.h, g.w}, x.options().memory_format(fmt));
  at::Tensor grad_w, grad_b;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "focused_conv2d_backward_pixels", [&] {
    fill_inactive<scalar_t>(masked, m, s, g, true);
    auto wb = pixels_weight_grad<scalar_t>(xcl, masked, s, g, pixel_chunk(g, s.active, x.element_size()));
    grad_w = wb.first.view({g.o, g.kh, g.kw, g.c}).permute({0, 3, 1, 2}).contiguous();
    grad_b = wb.second;
    run_pixels<scalar_t>(masked, wflip, c10::nullopt, grad_x, sr, gt, fmt == at::MemoryFormat::ChannelsLast,
                         pixel_chunk(gt, sr.active, x.element_size()));
    fill_inactive<scalar_t>(grad_x, reads.const_data_ptr<bool>(), sr, gt, fmt == at::MemoryFormat::ChannelsLast);
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(fxeff, CPU, m) {
  m.impl("focused_conv2d", &focused_conv2d_cpu);
  m.impl("focused_conv2d_backward", &focused_conv2d_backward_cpu);
}

}  // namespace ops
}  // namespace fxeff
