// Implicit-GEMM conv over a list of output pixels, fp32, AVX-512 (the "direct" strategy of fxeff::focused_conv2d).
//
// The conv at output pixel p is sum over taps t and channels c of x[pixel(p, t), c] * w[o, c, t]. With x in
// channels_last, the C inputs of one (pixel, tap) are contiguous, so no im2col is needed: a micro-kernel keeps an
// MR pixels x NR outputs block in registers and, per tap and input channel, broadcasts one input value per pixel
// and multiplies it by NR packed weights (NR / 16 vectors). The pixels of a block are given as one pointer per
// (tap, pixel): they may come from any runs of the mask, and a tap that falls outside the image points at a row
// of zeros (the conv's zero padding), so borders, strides and dilations need no special case in the inner loop.
//
// The work tracks the active outputs exactly (no tile overhang, no halo recomputation) and nothing is copied but
// the weight (packed once per weight: focused_conv2d_kernel.cpp's packed_weight caches it) and the results.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FXEFF_IMPLICIT_GEMM_AVX512 1
#include <immintrin.h>
#endif

namespace fxeff {
namespace ops {
namespace implicit_gemm {

// Whether this CPU runs the AVX-512 micro-kernel (checked once).
inline bool available() {
#ifdef FXEFF_IMPLICIT_GEMM_AVX512
  static const bool ok = __builtin_cpu_supports("avx512f") != 0;
  return ok;
#else
  return false;
#endif
}

// Output channels per packed block: 64 where O fills it (4 vectors), else 32 or 16.
inline int64_t block_outputs(int64_t o) { return o >= 64 ? 64 : (o > 16 ? 32 : 16); }

// Pixels per micro-kernel block for a given block_outputs: 24 accumulators at NR 64, 16 below (the pointer array
// of one block must stay in registers too).
inline int64_t block_pixels(int64_t nr) { return nr == 64 ? 6 : 8; }

// w [O, C, kh, kw] (any strides: ws = its strides) packed as [ceil(O / nr)][kh * kw][C][nr], zeros past O.
inline void pack_weight(const float* w, const int64_t* ws, float* packed, int64_t o, int64_t c, int64_t kh,
                        int64_t kw, int64_t nr) {
  const int64_t blocks = (o + nr - 1) / nr, taps = kh * kw;
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t t = 0; t < taps; ++t) {
      const float* wt = w + (t / kw) * ws[2] + (t % kw) * ws[3];
      for (int64_t ci = 0; ci < c; ++ci) {
        float* dst = packed + ((b * taps + t) * c + ci) * nr;
        for (int64_t j = 0; j < nr; ++j) {
          const int64_t oi = b * nr + j;
          dst[j] = oi < o ? wt[oi * ws[0] + ci * ws[1]] : 0.0f;
        }
      }
    }
  }
}

#ifdef FXEFF_IMPLICIT_GEMM_AVX512
// v clamped to [lo, hi] with NaN kept (as torch.clamp): max_ps / min_ps return their second operand where either is
// NaN.
__attribute__((target("avx512f"))) inline __m512 clamp(__m512 v, __m512 lo, __m512 hi) {
  return _mm512_min_ps(hi, _mm512_max_ps(lo, v));
}

// One step of the reduction for MR pixels x 16 NV outputs: acc[i, 0:16 NV] = (add ? r[i, :] : 0) + sum over taps
// t < nt and channels c0 <= ci < c0 + nc of a[t * MR + i][ci] * wp[(t * c + ci - c0)][0:16 NV]. Stored to r (row
// stride ldr), or, on the last step where dst is given, plus bias[0:16 NV], plus res[i][0:no] where res is given (a
// residual), clamped to [lo, hi] (the activation epilogue; +-inf: none), to dst[i][0:no] (the outputs' own rows).
template <int MR, int NV>
__attribute__((target("avx512f"))) void micro_kernel(const float* const* a, int64_t nt, int64_t c0, int64_t nc,
                                                       int64_t c, const float* wp, float* r, int64_t ldr, bool add,
                                                       float* const* dst, const float* bias, int64_t no,
                                                       const float* const* res, float lo, float hi) {
  constexpr int NR = 16 * NV;
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] = add ? _mm512_loadu_ps(r + i * ldr + 16 * j) : _mm512_setzero_ps();
  }
  for (int64_t t = 0; t < nt; ++t) {
    const float* at[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) at[i] = a[t * MR + i] + c0;
    const float* w = wp + t * c * NR;
    for (int64_t ci = 0; ci < nc; ++ci, w += NR) {
      __m512 wv[NV];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) wv[j] = _mm512_loadu_ps(w + 16 * j);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m512 b = _mm512_set1_ps(at[i][ci]);
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_fmadd_ps(b, wv[j], acc[i][j]);
      }
    }
  }
  if (dst == nullptr) {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) _mm512_storeu_ps(r + i * ldr + 16 * j, acc[i][j]);
    }
    return;
  }
  __mmask16 k[NV];
  __m512 bv[NV];
  const __m512 lov = _mm512_set1_ps(lo), hiv = _mm512_set1_ps(hi);
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) {
    const int64_t left = no - 16 * j;
    k[j] = left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1u);
    bv[j] = bias != nullptr ? _mm512_loadu_ps(bias + 16 * j) : _mm512_setzero_ps();
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      __m512 v = _mm512_add_ps(acc[i][j], bv[j]);
      if (res != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k[j], res[i] + 16 * j));
      _mm512_mask_storeu_ps(dst[i] + 16 * j, k[j], clamp(v, lov, hiv));
    }
  }
}

// blocks * MR pixels (block_pixels(nr) each; a[b * taps * MR + t * MR + i] is where pixel i of block b reads tap t)
// against output block ob of the packed weight. The results go to r[q, 0:nr] (row stride nr), or, where dst is
// given, plus bias[0:nr], plus res[q][0:no] where res is given, clamped to [lo, hi], to dst[q][0:no] (pixel q's
// outputs; the padding pixels' dst may all point at one scratch row of nr floats, their res at a row of zeros).
// The reduction over taps x channels is cut into steps whose weight rows (at most 32 KiB: a tap's channels, a slice
// of them, or several taps) stay in L1 while every block of pixels uses them; the partial sums of all but the last
// step go through r (in L1/L2). Without the steps each block of 6-8 pixels streamed the whole weight of the output
// block (taps * C * nr floats, over 1 MiB at 512 channels) from L2 or beyond.
inline void blocks_times_weight(const float* const* a, int64_t blocks, int64_t taps, int64_t c, const float* wp,
                                int64_t ob, int64_t nr, float* r, float* const* dst, const float* bias, int64_t no,
                                const float* const* res, float lo, float hi) {
  const int64_t mr = block_pixels(nr);
  const float* w = wp + ob * taps * c * nr;
  const int64_t rows = 8192 / nr;  // weight rows of nr floats in 32 KiB (measured best among 8, 16, 32, 40 KiB)
  const int64_t c_step = c <= rows ? c : (c + (c + rows - 1) / rows - 1) / ((c + rows - 1) / rows);
  const int64_t t_step = c <= rows ? std::max<int64_t>(1, rows / c) : 1;
  for (int64_t t0 = 0; t0 < taps; t0 += t_step) {
    const int64_t nt = std::min(t_step, taps - t0);
    for (int64_t c0 = 0; c0 < c; c0 += c_step) {
      const int64_t nc = std::min(c_step, c - c0);
      const float* ws = w + (t0 * c + c0) * nr;
      const bool add = t0 > 0 || c0 > 0, last = t0 + nt == taps && c0 + nc == c;
      for (int64_t b = 0; b < blocks; ++b) {
        const float* const* ab = a + b * taps * mr + t0 * mr;
        float* rb = r + b * mr * nr;
        float* const* db = last && dst != nullptr ? dst + b * mr : nullptr;
        const float* const* rs = res != nullptr ? res + b * mr : nullptr;
        if (nr == 64) micro_kernel<6, 4>(ab, nt, c0, nc, c, ws, rb, nr, add, db, bias, no, rs, lo, hi);
        else if (nr == 32) micro_kernel<8, 2>(ab, nt, c0, nc, c, ws, rb, nr, add, db, bias, no, rs, lo, hi);
        else micro_kernel<8, 1>(ab, nt, c0, nc, c, ws, rb, nr, add, db, bias, no, rs, lo, hi);
      }
    }
  }
}
// Depthwise (groups == C == O), P output pixels at once: out[i][c] = bias[c] (0 if null) + sum over taps t of
// a[t * P + i][c] * wt[t * c_total + c] (wt packed [taps][C]), plus res[i][c] where res is given, clamped to
// [lo, hi]. Per vector of 16 channels, each
// tap's weights are loaded once for the P pixels, whose P accumulators are independent FMA chains; lanes past C are
// masked off (a masked-off load reads nothing). (One pixel at a time loaded a weight vector per FMA: loads, not FMAs,
// bound it.)
template <int P>
__attribute__((target("avx512f"))) void depthwise_pixels(const float* const* a, int64_t taps, const float* wt,
                                                           const float* bias, float* const* out, int64_t c,
                                                           const float* const* res, float lo, float hi) {
  const __m512 lov = _mm512_set1_ps(lo), hiv = _mm512_set1_ps(hi);
  for (int64_t c0 = 0; c0 < c; c0 += 16) {
    const int64_t left = c - c0;
    const __mmask16 k = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
    const __m512 b = bias != nullptr ? _mm512_maskz_loadu_ps(k, bias + c0) : _mm512_setzero_ps();
    __m512 acc[P];
#pragma GCC unroll 8
    for (int i = 0; i < P; ++i) acc[i] = b;
    for (int64_t t = 0; t < taps; ++t) {
      const __m512 wv = _mm512_maskz_loadu_ps(k, wt + t * c + c0);
      const float* const* at = a + t * P;
#pragma GCC unroll 8
      for (int i = 0; i < P; ++i) acc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, at[i] + c0), wv, acc[i]);
    }
#pragma GCC unroll 8
    for (int i = 0; i < P; ++i) {
      const __m512 v = res != nullptr ? _mm512_add_ps(acc[i], _mm512_maskz_loadu_ps(k, res[i] + c0)) : acc[i];
      _mm512_mask_storeu_ps(out[i] + c0, k, clamp(v, lov, hiv));
    }
  }
}
#else
template <int P>
void depthwise_pixels(const float* const*, int64_t, const float*, const float*, float* const*, int64_t,
                      const float* const*, float, float) {
  TORCH_CHECK(false, "fxeff.focused_conv2d: the direct strategy needs an x86-64 build with AVX-512");
}
inline void blocks_times_weight(const float* const*, int64_t, int64_t, int64_t, const float*, int64_t, int64_t,
                                float*, float* const*, const float*, int64_t, const float* const*, float, float) {
  TORCH_CHECK(false, "fxeff.focused_conv2d: the direct strategy needs an x86-64 build with AVX-512");
}
#endif

}  // namespace implicit_gemm
}  // namespace ops
}  // namespace fxeff
