// CPU kernels of fxeff::shift: forward (float and quantized), input gradient (adjoint) and shift gradient.
//
// Every input is viewed as [N, C, D, H, W] (leading spatial dims are 1 for shift1d/2d), NCDHW or
// channels-last (N, D, H, W, C). A shift is separable: per channel and dim it is a sum of 1-D "taps"
// out[i] += w * x[map(i - t)] (see ShiftPlan), so each output row is a few shifted input rows:
// memcpy in the interior, a lookup table at the edges. Shift gradients reduce per channel in a fixed
// order (one thread owns a channel), so they are bitwise identical at any thread count.
#include "../shift.h"
#include "thread_buffer.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/_make_per_tensor_quantized_tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/avg_pool1d.h>
#include <ATen/ops/avg_pool2d.h>
#include <ATen/ops/avg_pool3d.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/int_repr.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FXEFF_SHIFT_AVX2 1
#include <immintrin.h>
#endif

namespace fxeff {
namespace ops {
namespace {

// ------------------------------------------------------------------ channels-last gathers
// In channels-last every channel reads its own offset, so the interior of a row is a gather. The
// portable loop below is the reference path; on x86 with AVX2 (checked at run time, the build
// itself targets baseline x86-64) 32-bit elements use hardware gathers, 8 channels per instruction.

#ifdef FXEFF_SHIFT_AVX2
bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

// out[c] = base[delta[c]] for 32-bit elements.
__attribute__((target("avx2"))) void gather_copy32_avx2(int32_t* out, const int32_t* base, const int32_t* delta,
                                                        int64_t C) {
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    const __m256i idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(delta + c));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c), _mm256_i32gather_epi32(base, idx, 4));
  }
  for (; c < C; ++c) out[c] = base[delta[c]];
}

// acc[c] += coef[c] * base[delta[c]] for float.
__attribute__((target("avx2,fma"))) void gather_axpy_f32_avx2(float* acc, const float* base, const int32_t* delta,
                                                              const float* coef, int64_t C) {
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    const __m256i idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(delta + c));
    const __m256 v = _mm256_i32gather_ps(base, idx, 4);
    _mm256_storeu_ps(acc + c, _mm256_fmadd_ps(_mm256_loadu_ps(coef + c), v, _mm256_loadu_ps(acc + c)));
  }
  for (; c < C; ++c) acc[c] += coef[c] * base[delta[c]];
}

// out[j] = sum_k weight[k] * src[k][offset + j], j < n (the interior block of an interpolated shift).
__attribute__((target("avx2,fma"))) void weighted_sum_f32_avx2(float* out, const float* const* src,
                                                               const float* weight, int nterms, int64_t n,
                                                               int64_t offset) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 acc = _mm256_mul_ps(_mm256_set1_ps(weight[0]), _mm256_loadu_ps(src[0] + offset + j));
    for (int k = 1; k < nterms; ++k)
      acc = _mm256_fmadd_ps(_mm256_set1_ps(weight[k]), _mm256_loadu_ps(src[k] + offset + j), acc);
    _mm256_storeu_ps(out + j, acc);
  }
  for (; j < n; ++j) {
    float acc = weight[0] * src[0][offset + j];
    for (int k = 1; k < nterms; ++k) acc += weight[k] * src[k][offset + j];
    out[j] = acc;
  }
}
#else
bool cpu_has_avx2_fma() { return false; }
#endif

// Faster still (AVX-512F): in a block of 16 channels the shifts take few distinct values (at most 9 for
// |s| <= 1, often 1-2 after sparse training or in grouped shifts), so a block is assembled from one
// masked vector load per distinct source offset instead of 16 gathered lanes.
struct LaneGroups {
  int count = 0;
  int64_t rel[16];     // source offset relative to the block's first channel at the current pixel
  uint16_t mask[16];   // the lanes that read it
};

// groups[b] for the blocks of 16 of `delta` (per-channel offsets that include the channel index).
void build_lane_groups(const int64_t* delta, int64_t C, LaneGroups* groups) {
  for (int64_t b = 0; b * 16 < C; ++b) {
    LaneGroups& g = groups[b];
    g.count = 0;
    const int64_t c0 = b * 16, n = std::min<int64_t>(16, C - c0);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t rel = delta[c0 + j] - (c0 + j);
      int k = 0;
      while (k < g.count && g.rel[k] != rel) ++k;
      if (k == g.count) {
        g.rel[k] = rel;
        g.mask[k] = 0;
        ++g.count;
      }
      g.mask[k] |= static_cast<uint16_t>(1u << j);
    }
  }
}

#ifdef FXEFF_SHIFT_AVX2
bool cpu_has_avx512f() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

// Two independent chains of merge-masked loads (their lanes are disjoint), joined by one OR: a block with 4-9
// distinct shifts waits for half as many load latencies in a row as with one chain.
__attribute__((target("avx512f"))) inline __m512 select_lanes(const float* base, const LaneGroups& g) {
  __m512 v = _mm512_setzero_ps(), u = v;
  int k = 0;
  for (; k + 1 < g.count; k += 2) {
    v = _mm512_mask_loadu_ps(v, g.mask[k], base + g.rel[k]);
    u = _mm512_mask_loadu_ps(u, g.mask[k + 1], base + g.rel[k + 1]);
  }
  if (k < g.count) v = _mm512_mask_loadu_ps(v, g.mask[k], base + g.rel[k]);
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(v), _mm512_castps_si512(u)));
}

inline __mmask16 lanes_of(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// Interior pixels [xlo, xhi) of one channels-last output row: sum_term coef * x[src_term] (or the copy).
__attribute__((target("avx512f"))) void select_row_f32_avx512(float* orow, const float* xi, int64_t xlo, int64_t xhi,
                                                              int64_t C, const LaneGroups* groups, int nterm,
                                                              const float* coef, bool linear) {
  const int64_t nblocks = (C + 15) / 16;
  for (int64_t xo = xlo; xo < xhi; ++xo) {
    const float* base = xi + xo * C;
    float* o = orow + xo * C;
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t c0 = b * 16;
      const __mmask16 valid = lanes_of(C - c0);
      __m512 v;
      if (!linear) {
        v = select_lanes(base + c0, groups[b]);
      } else {
        v = _mm512_setzero_ps();
        for (int term = 0; term < nterm; ++term) {
          const __m512 cf = _mm512_maskz_loadu_ps(valid, coef + term * C + c0);
          v = _mm512_fmadd_ps(cf, select_lanes(base + c0, groups[term * nblocks + b]), v);
        }
      }
      _mm512_mask_storeu_ps(o + c0, valid, v);
    }
  }
}

// row_dot[term][j] += sum over pixels [xlo, xhi) of g[pixel, c0 + j] * x[src_term(pixel), c0 + j], one block.
__attribute__((target("avx512f"))) void select_dot_f32_avx512(float* row_dot, const float* g, const float* xi,
                                                              int64_t xlo, int64_t xhi, int64_t C, int64_t nc,
                                                              const LaneGroups* groups, int nterm) {
  const __mmask16 valid = lanes_of(nc);
  __m512 acc[8];
  for (int term = 0; term < nterm; ++term) acc[term] = _mm512_setzero_ps();
  for (int64_t xo = xlo; xo < xhi; ++xo) {
    const __m512 gv = _mm512_maskz_loadu_ps(valid, g + xo * C);
    const float* base = xi + xo * C;
    for (int term = 0; term < nterm; ++term) acc[term] = _mm512_fmadd_ps(gv, select_lanes(base, groups[term]), acc[term]);
  }
  for (int term = 0; term < nterm; ++term) {
    float lanes[16];
    _mm512_storeu_ps(lanes, acc[term]);
    for (int64_t j = 0; j < nc; ++j) row_dot[term * nc + j] += lanes[j];
  }
}
#else
bool cpu_has_avx512f() { return false; }
#endif

constexpr int kDims = 3;      // D, H, W
constexpr int kMaxTaps = 2;   // per dim
constexpr int64_t kGrainElements = 16384;

// The taps of every channel and dim. Rounded plan (sparse/grouped forward and adjoint): one tap
// t = round(s), weight 1. Linear plan (active, and every shift gradient): taps t0 = ceil(s) with
// weight 1 - a and t0 - 1 with weight a, a = ceil(s) - s: x interpolated at i - s.
struct ShiftPlan {
  int64_t C = 0;
  int64_t size[kDims] = {1, 1, 1};
  int ntaps[kDims] = {1, 1, 1};
  int first_dim = 0;  // kDims - dims: the real spatial dims are first_dim..2
  bool zero_padding = false;  // every source outside the input reads 0 (no lookups needed there)
  std::vector<int64_t> t, lo, hi;  // [c][d][k]; [lo, hi): the interior, where map(i - t) == i - t
  std::vector<double> w;
  std::vector<int32_t> src[kDims];  // [c][k][i] = map(i - t), -1 for zero padding

  int64_t at(int64_t c, int d, int k) const { return (c * kDims + d) * kMaxTaps + k; }
  const int32_t* table(int64_t c, int d, int k) const {
    return src[d].data() + (c * ntaps[d] + k) * size[d];
  }
};

// lo/hi and the lookup tables of every tap, from its shift t.
void fill_tables(ShiftPlan& p, ShiftPadding padding) {
  p.zero_padding = padding == ShiftPadding::Zeros;
  for (int64_t c = 0; c < p.C; ++c) {
    for (int d = 0; d < kDims; ++d) {
      const int64_t n = p.size[d];
      for (int k = 0; k < p.ntaps[d]; ++k) {
        const int64_t i = p.at(c, d, k), tk = p.t[i];
        p.lo[i] = std::min(std::max<int64_t>(tk, 0), n);
        p.hi[i] = std::max(std::min(n + tk, n), p.lo[i]);
        int32_t* tab = p.src[d].data() + (c * p.ntaps[d] + k) * n;
        for (int64_t j = 0; j < n; ++j) tab[j] = static_cast<int32_t>(map_shift_index(j - tk, n, padding));
      }
    }
  }
}

ShiftPlan make_plan(const char* op, const at::Tensor& shifts, at::IntArrayRef spatial, ShiftPadding padding,
                    bool linear) {
  ShiftPlan p;
  // The shifts as doubles, read in place (a dtype conversion would be a dispatcher call per forward).
  const int dims = static_cast<int>(spatial.size());
  std::vector<double> sp(shifts.size(0) * dims);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, shifts.scalar_type(), "fxeff_shift_plan", [&] {
    const scalar_t* data = shifts.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < shifts.size(0); ++c)
      for (int d = 0; d < dims; ++d)
        sp[c * dims + d] = static_cast<double>(data[c * shifts.stride(0) + d * shifts.stride(1)]);
  });
  p.C = shifts.size(0);
  p.first_dim = kDims - dims;
  for (int d = 0; d < dims; ++d) p.size[p.first_dim + d] = spatial[d];
  for (int d = 0; d < kDims; ++d) p.ntaps[d] = (linear && d >= p.first_dim) ? 2 : 1;
  p.t.assign(p.C * kDims * kMaxTaps, 0);
  p.lo = p.hi = p.t;
  p.w.assign(p.C * kDims * kMaxTaps, 0.0);
  for (int d = 0; d < kDims; ++d) p.src[d].resize(p.C * p.ntaps[d] * p.size[d]);
  for (int64_t c = 0; c < p.C; ++c) {
    for (int d = 0; d < kDims; ++d) {
      const double v = d >= p.first_dim ? sp[c * dims + d - p.first_dim] : 0.0;
      TORCH_CHECK_VALUE(std::isfinite(v) && std::abs(v) < 1e12, op, ": shifts must be finite (|s| < 1e12), got ",
                        v, " at [", c, ", ", d - p.first_dim, "]");
      int64_t taps[kMaxTaps];
      double weights[kMaxTaps];
      if (linear) {
        const double ce = std::ceil(v);
        taps[0] = static_cast<int64_t>(ce);
        weights[0] = 1.0 - (ce - v);
        taps[1] = taps[0] - 1;
        weights[1] = ce - v;
      } else {
        taps[0] = static_cast<int64_t>(round_shift(v));
        weights[0] = 1.0;
      }
      for (int k = 0; k < p.ntaps[d]; ++k) {
        p.t[p.at(c, d, k)] = taps[k];
        p.w[p.at(c, d, k)] = d >= p.first_dim ? weights[k] : (k == 0 ? 1.0 : 0.0);
      }
    }
  }
  fill_tables(p, padding);
  return p;
}

// The plan of the adjoint's gather part: taps negated, zero padding. Where every source of the forward
// is in range, the adjoint of out[i] += w x[i - t] is gx[j] += w g[j + t]: a forward with taps -t.
ShiftPlan negated_zero_plan(const ShiftPlan& forward) {
  ShiftPlan p = forward;
  for (auto& t : p.t) t = -t;
  fill_tables(p, ShiftPadding::Zeros);
  return p;
}

int64_t grain_for(int64_t work_per_item) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, work_per_item)); }

// ------------------------------------------------------------------ 1-D row primitives

// Both x taps of a linear plan at once (t0 and t0 - 1): d[k] = sum_i g[i] * row[map_k(i)], with
// independent partial sums so the interior vectorises; the two taps read neighbouring elements.
template <typename T, typename A>
void dot2_interior(const T* g, const T* r, int64_t lo, int64_t hi, A* d0, A* d1) {
  constexpr int kLanes = 8;
  A p0[kLanes] = {}, p1[kLanes] = {};
  int64_t i = lo;
  for (; i + kLanes <= hi; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const A gv = static_cast<A>(g[i + l]);
      p0[l] += gv * static_cast<A>(r[i + l]);
      p1[l] += gv * static_cast<A>(r[i + l + 1]);
    }
  }
  for (; i < hi; ++i) {
    p0[0] += static_cast<A>(g[i]) * static_cast<A>(r[i]);
    p1[0] += static_cast<A>(g[i]) * static_cast<A>(r[i + 1]);
  }
  for (int l = 0; l < kLanes; ++l) {
    *d0 += p0[l];
    *d1 += p1[l];
  }
}

#ifdef FXEFF_SHIFT_AVX2
__attribute__((target("avx2,fma"))) void dot2_interior_f32_avx2(const float* g, const float* r, int64_t lo, int64_t hi,
                                                                float* d0, float* d1) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t i = lo;
  for (; i + 8 <= hi; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    a0 = _mm256_fmadd_ps(gv, _mm256_loadu_ps(r + i), a0);
    a1 = _mm256_fmadd_ps(gv, _mm256_loadu_ps(r + i + 1), a1);
  }
  float l0[8], l1[8];
  _mm256_storeu_ps(l0, a0);
  _mm256_storeu_ps(l1, a1);
  float s0 = 0, s1 = 0;
  for (int l = 0; l < 8; ++l) {
    s0 += l0[l];
    s1 += l1[l];
  }
  for (; i < hi; ++i) {
    s0 += g[i] * r[i];
    s1 += g[i] * r[i + 1];
  }
  *d0 += s0;
  *d1 += s1;
}
#endif

// d[k] = sum_i g[i] * row[map(i - t_k)] for the two x taps of a linear plan (t_1 = t_0 - 1).
template <typename T, typename A>
void dot_row2(const T* g, const T* row, const ShiftPlan& p, int64_t c, A* d) {
  const int64_t n = p.size[2], i0 = p.at(c, 2, 0), i1 = p.at(c, 2, 1);
  const int64_t lo = std::max(p.lo[i0], p.lo[i1]), hi = std::max(std::min(p.hi[i0], p.hi[i1]), lo);
  const int32_t* tab[2] = {p.table(c, 2, 0), p.table(c, 2, 1)};
  for (int k = 0; k < 2; ++k) {
    A edge = 0;
    for (int64_t i = 0; i < lo; ++i)
      if (tab[k][i] >= 0) edge += static_cast<A>(g[i]) * static_cast<A>(row[tab[k][i]]);
    for (int64_t i = hi; i < n; ++i)
      if (tab[k][i] >= 0) edge += static_cast<A>(g[i]) * static_cast<A>(row[tab[k][i]]);
    d[k] = edge;
  }
  if (hi <= lo) return;
  const T* r = row - p.t[i0];  // r[i] = row[i - t0]; r[i + 1] = row[i - t1]
#ifdef FXEFF_SHIFT_AVX2
  if constexpr (std::is_same<T, float>::value && std::is_same<A, float>::value) {
    if (cpu_has_avx2_fma()) {
      dot2_interior_f32_avx2(g, r, lo, hi, &d[0], &d[1]);
      return;
    }
  }
#endif
  dot2_interior<T, A>(g, r, lo, hi, &d[0], &d[1]);
}

// ------------------------------------------------------------------ forward

// One output row (z, y) of channel c in NCDHW: the (at most 4) source rows and their weights.
struct RowTerm {
  int64_t offset;  // of the source row within the plane
  double weight;
  int kz, ky;
};

int row_terms(const ShiftPlan& p, int64_t c, int64_t z, int64_t y, RowTerm* terms, bool keep_zero_weights) {
  int count = 0;
  for (int kz = 0; kz < p.ntaps[0]; ++kz) {
    const double wz = p.w[p.at(c, 0, kz)];
    const int32_t iz = p.table(c, 0, kz)[z];
    if (iz < 0 || (wz == 0 && !keep_zero_weights)) continue;
    for (int ky = 0; ky < p.ntaps[1]; ++ky) {
      const double wy = p.w[p.at(c, 1, ky)];
      const int32_t iy = p.table(c, 1, ky)[y];
      if (iy < 0 || (wy == 0 && !keep_zero_weights)) continue;
      terms[count++] = {(iz * p.size[1] + iy) * p.size[2], wz * wy, kz, ky};
    }
  }
  return count;
}

// One term of an output slice (z fixed) of channel c: a source slice, a weight and its y/x taps.
struct SliceTerm {
  int64_t offset;  // of the source slice within the plane
  double weight;
  int ky, kx;
};

int slice_terms(const ShiftPlan& p, int64_t c, int64_t z, SliceTerm* terms) {
  const int64_t hw = p.size[1] * p.size[2];
  int count = 0;
  for (int kz = 0; kz < p.ntaps[0]; ++kz) {
    const double wz = p.w[p.at(c, 0, kz)];
    const int32_t iz = p.table(c, 0, kz)[z];
    if (iz < 0 || wz == 0) continue;
    for (int ky = 0; ky < p.ntaps[1]; ++ky) {
      const double wy = p.w[p.at(c, 1, ky)];
      if (wy == 0) continue;
      for (int kx = 0; kx < p.ntaps[2]; ++kx) {
        const double wx = p.w[p.at(c, 2, kx)];
        if (wx != 0) terms[count++] = {iz * hw, wz * wy * wx, ky, kx};
      }
    }
  }
  return count;
}

// Output row y, columns [x0, x1), of one slice through the lookup tables (edges and small maps).
template <typename T, typename A>
void slice_row_lookup(T* orow, const T* plane, const ShiftPlan& p, int64_t c, int64_t y, int64_t x0, int64_t x1,
                      const SliceTerm* terms, int nterms, bool linear, T fill) {
  const int64_t W = p.size[2];
  if (!linear) {
    const int32_t iy = p.table(c, 1, 0)[y];
    const int32_t* tx = p.table(c, 2, 0);
    const T* src = plane + terms[0].offset + iy * W;
    for (int64_t x = x0; x < x1; ++x) orow[x] = (iy < 0 || tx[x] < 0) ? fill : src[tx[x]];
    return;
  }
  for (int64_t x = x0; x < x1; ++x) {
    A sum = 0;
    for (int k = 0; k < nterms; ++k) {
      const int32_t iy = p.table(c, 1, terms[k].ky)[y], ix = p.table(c, 2, terms[k].kx)[x];
      if (iy >= 0 && ix >= 0) sum += static_cast<A>(terms[k].weight) * static_cast<A>(plane[terms[k].offset + iy * W + ix]);
    }
    orow[x] = static_cast<T>(sum);
  }
}

// NCDHW: per output slice, the block of rows and columns where every term reads inside the source is,
// in flattened indices, out[k] = sum_t w_t src_t[k - (ty_t W + tx_t)]: one memcpy (rounded shifts) or
// one fused loop (interpolation) over [Ylo W + Xlo, (Yhi - 1) W + Xhi). The columns that flattening
// wraps and the rows outside the block are then written through the lookup tables.
constexpr int64_t kChunk = 512;

// One plane (channel c of one image): xp -> op, both [D, H, W] contiguous.
template <typename T, typename A>
void shift_plane(const T* xp, T* op, const ShiftPlan& p, int64_t c, bool linear, T fill) {
  const int64_t H = p.size[1], W = p.size[2], hw = H * W;
  A acc[kChunk];
  SliceTerm terms[8];
      for (int64_t z = 0; z < p.size[0]; ++z) {
        T* oz = op + z * hw;
        const int nterms = slice_terms(p, c, z, terms);
        if (nterms == 0) {
          std::fill(oz, oz + hw, fill);
          continue;
        }
        int64_t ylo = 0, yhi = H, xlo = 0, xhi = W;
        for (int k = 0; k < nterms; ++k) {
          const int64_t iy = p.at(c, 1, terms[k].ky), ix = p.at(c, 2, terms[k].kx);
          ylo = std::max(ylo, p.lo[iy]);
          yhi = std::min(yhi, p.hi[iy]);
          xlo = std::max(xlo, p.lo[ix]);
          xhi = std::min(xhi, p.hi[ix]);
        }
        if (yhi <= ylo || xhi <= xlo) ylo = yhi = 0;  // no block: every row through the tables
        if (yhi > ylo) {
          const int64_t k0 = ylo * W + xlo, k1 = (yhi - 1) * W + xhi;
          const T* src[8];
          A weight[8];
          for (int k = 0; k < nterms; ++k) {
            const int64_t off = p.t[p.at(c, 1, terms[k].ky)] * W + p.t[p.at(c, 2, terms[k].kx)];
            src[k] = xp + terms[k].offset - off;
            weight[k] = static_cast<A>(terms[k].weight);
          }
          if (!linear) {
            std::memcpy(oz + k0, src[0] + k0, (k1 - k0) * sizeof(T));
          } else {
            bool done = false;
#ifdef FXEFF_SHIFT_AVX2
            if constexpr (std::is_same<T, float>::value && std::is_same<A, float>::value) {
              if (cpu_has_avx2_fma()) {
                weighted_sum_f32_avx2(oz + k0, src, weight, nterms, k1 - k0, k0);
                done = true;
              }
            }
#endif
            for (int64_t b = k0; b < k1 && !done; b += kChunk) {
              const int64_t len = std::min(kChunk, k1 - b);
              const T* s0 = src[0] + b;
              for (int64_t j = 0; j < len; ++j) acc[j] = weight[0] * static_cast<A>(s0[j]);
              for (int k = 1; k < nterms; ++k) {
                const T* sk = src[k] + b;
                const A wk = weight[k];
                for (int64_t j = 0; j < len; ++j) acc[j] += wk * static_cast<A>(sk[j]);
              }
              T* o = oz + b;
              for (int64_t j = 0; j < len; ++j) o[j] = static_cast<T>(acc[j]);
            }
          }
        }
        if (!linear && p.zero_padding) {  // outside the block everything is the fill value: no lookups
          for (int64_t y = 0; y < ylo; ++y) std::fill(oz + y * W, oz + (y + 1) * W, fill);
          if (xlo > 0 || xhi < W)
            for (int64_t y = ylo; y < yhi; ++y) {
              std::fill(oz + y * W, oz + y * W + xlo, fill);
              std::fill(oz + y * W + xhi, oz + (y + 1) * W, fill);
            }
          std::fill(oz + std::max(yhi, ylo) * W, oz + hw, fill);
          continue;
        }
        if (!linear) {  // the one term's lookups, inline: edge work is a few elements per row
          const int32_t *ty = p.table(c, 1, 0), *tx = p.table(c, 2, 0);
          const T* src = xp + terms[0].offset;
          auto lookup = [&](int64_t y, int64_t x0, int64_t x1) {
            T* orow = oz + y * W;
            for (int64_t xo = x0; xo < x1; ++xo) orow[xo] = (ty[y] < 0 || tx[xo] < 0) ? fill : src[ty[y] * W + tx[xo]];
          };
          for (int64_t y = 0; y < ylo; ++y) lookup(y, 0, W);
          if (xlo > 0 || xhi < W)
            for (int64_t y = ylo; y < yhi; ++y) {
              lookup(y, 0, xlo);
              lookup(y, xhi, W);
            }
          for (int64_t y = std::max(yhi, ylo); y < H; ++y) lookup(y, 0, W);
          continue;
        }
        for (int64_t y = 0; y < H; ++y) {
          T* orow = oz + y * W;
          if (y < ylo || y >= yhi) {
            slice_row_lookup<T, A>(orow, xp, p, c, y, 0, W, terms, nterms, linear, fill);
          } else if (xlo > 0 || xhi < W) {
            slice_row_lookup<T, A>(orow, xp, p, c, y, 0, xlo, terms, nterms, linear, fill);
            slice_row_lookup<T, A>(orow, xp, p, c, y, xhi, W, terms, nterms, linear, fill);
          }
        }
      }
}

template <typename T, typename A>
void forward_nchw(const T* x, T* out, const ShiftPlan& p, int64_t N, bool linear, T fill) {
  const int64_t plane = p.size[0] * p.size[1] * p.size[2];
  at::parallel_for(0, N * p.C, grain_for(plane), [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) shift_plane<T, A>(x + q * plane, out + q * plane, p, q % p.C, linear, fill);
  });
}

// The depthwise-conv emulation of a strided/cropped shift layer: per spatial dim the shifted signal is
// cropped (or zero-padded) to [begin, begin + len) and averaged over windows of `stride` (the last
// window clipped, as avg_pool with ceil_mode).
struct PoolGeometry {
  int64_t begin[kDims] = {0, 0, 0};
  int64_t len[kDims] = {1, 1, 1};
  int64_t stride[kDims] = {1, 1, 1};
  int64_t out[kDims] = {1, 1, 1};
};

// Output columns whose window lies inside the shifted row and is whole: [lo, hi), summed without checks.
struct PoolColumns {
  int64_t lo = 0, hi = 0;
};

PoolColumns pool_columns(const PoolGeometry& g, int64_t W) {
  const int64_t sx = g.stride[2], bx = g.begin[2];
  PoolColumns cols;
  cols.lo = bx >= 0 ? 0 : (-bx + sx - 1) / sx;
  const int64_t inside = std::min(g.len[2], W - bx);  // padded columns backed by the shifted row
  cols.hi = inside >= sx ? std::max(cols.lo, std::min(g.out[2], (inside - sx) / sx + 1)) : cols.lo;
  return cols;
}

// acc[ox] += the window sums of one shifted row (columns of the crop/pad, windows of g.stride[2], clipped).
template <typename T, typename A>
void pool_row_add(const T* shifted, A* acc, const PoolGeometry& g, PoolColumns cols, int64_t W) {
  const int64_t sx = g.stride[2], bx = g.begin[2];
  const T* row = shifted + bx;  // row[u] = shifted value at padded column u
  if (sx == 2) {
    for (int64_t ox = cols.lo; ox < cols.hi; ++ox)
      acc[ox] += static_cast<A>(row[2 * ox]) + static_cast<A>(row[2 * ox + 1]);
  } else {
    for (int64_t ox = cols.lo; ox < cols.hi; ++ox)
      for (int64_t u = ox * sx; u < ox * sx + sx; ++u) acc[ox] += static_cast<A>(row[u]);
  }
  auto edge = [&](int64_t ox) {
    const int64_t x0 = ox * sx, x1 = std::min(x0 + sx, g.len[2]);
    for (int64_t u = x0; u < x1; ++u)
      if (u + bx >= 0 && u + bx < W) acc[ox] += static_cast<A>(row[u]);
  };
  for (int64_t ox = 0; ox < cols.lo; ++ox) edge(ox);
  for (int64_t ox = cols.hi; ox < g.out[2]; ++ox) edge(ox);
}

// The window of output index o along pooled dim d: [o * stride, min(o * stride + stride, len)).
inline std::pair<int64_t, int64_t> pool_window(const PoolGeometry& g, int d, int64_t o) {
  const int64_t a = o * g.stride[d];
  return {a, std::min(a + g.stride[d], g.len[d])};
}

// NCDHW: each plane is shifted into a thread-local scratch plane, then cropped and averaged into the
// output, so the full-resolution shift never goes to memory.
template <typename T, typename A>
void shift_pool_nchw(const T* x, T* out, const ShiftPlan& p, int64_t N, bool linear, const PoolGeometry& g) {
  const int64_t D = p.size[0], H = p.size[1], W = p.size[2], plane = D * H * W;
  const int64_t out_plane = g.out[0] * g.out[1] * g.out[2];
  const PoolColumns cols = pool_columns(g, W);
  at::parallel_for(0, N * p.C, grain_for(plane), [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(plane);
    std::vector<A> acc(g.out[2]);
    for (int64_t q = begin; q < end; ++q) {
      shift_plane<T, A>(x + q * plane, scratch.data(), p, q % p.C, linear, T(0));
      T* o = out + q * out_plane;
      for (int64_t oz = 0; oz < g.out[0]; ++oz) {
        const auto [z0, z1] = pool_window(g, 0, oz);
        for (int64_t oy = 0; oy < g.out[1]; ++oy, o += g.out[2]) {
          const auto [y0, y1] = pool_window(g, 1, oy);
          std::fill(acc.begin(), acc.end(), A(0));
          for (int64_t z = z0; z < z1; ++z) {
            const int64_t sz = z + g.begin[0];
            if (sz < 0 || sz >= D) continue;  // zero padding
            for (int64_t y = y0; y < y1; ++y) {
              const int64_t sy = y + g.begin[1];
              if (sy >= 0 && sy < H) pool_row_add<T, A>(scratch.data() + (sz * H + sy) * W, acc.data(), g, cols, W);
            }
          }
          const A rows = static_cast<A>((z1 - z0) * (y1 - y0));
          for (int64_t ox = 0; ox < g.out[2]; ++ox) {
            const auto [x0, x1] = pool_window(g, 2, ox);
            o[ox] = static_cast<T>(acc[ox] / (rows * static_cast<A>(x1 - x0)));
          }
        }
      }
    }
  });
}

// Channels-last with rounded shifts: per block of 16 channels the distinct shifts, each with the lanes that take it
// and a channel whose lookup tables it shares (the tables depend only on the shift).
struct ShiftGroups {
  int count = 0;
  int64_t channel[16];
  int64_t ty[16], tx[16];  // the shift (rounded), for zero padding: sources checked by comparison, no tables
  uint16_t mask[16];
  LaneGroups lanes;  // the same groups as loads at fixed offsets from the pixel, where every source is in range
};

std::vector<ShiftGroups> shift_groups(const ShiftPlan& p) {
  std::vector<ShiftGroups> blocks((p.C + 15) / 16);
  for (int64_t c = 0; c < p.C; ++c) {
    ShiftGroups& b = blocks[c / 16];
    const int64_t ty = p.t[p.at(c, 1, 0)], tx = p.t[p.at(c, 2, 0)];
    int k = 0;
    while (k < b.count && (p.t[p.at(b.channel[k], 1, 0)] != ty || p.t[p.at(b.channel[k], 2, 0)] != tx)) ++k;
    if (k == b.count) {
      b.channel[b.count] = c;
      b.ty[b.count] = ty;
      b.tx[b.count] = tx;
      b.mask[b.count++] = 0;
    }
    b.mask[k] |= static_cast<uint16_t>(1u << (c % 16));
  }
  for (ShiftGroups& b : blocks) {
    b.lanes.count = b.count;
    for (int k = 0; k < b.count; ++k) {
      b.lanes.rel[k] = -(b.ty[k] * p.size[2] + b.tx[k]) * p.C;
      b.lanes.mask[k] = b.mask[k];
    }
  }
  return blocks;
}

#ifdef FXEFF_SHIFT_AVX2
// A pixel's block of 16 channels: one masked load per distinct shift whose source is in range (zeros elsewhere).
__attribute__((target("avx512f"))) inline __m512 gather_block(const float* xn, const ShiftPlan& p,
                                                              const ShiftGroups& b, int64_t c0, int64_t y, int64_t x) {
  const int64_t C = p.C, H = p.size[1], W = p.size[2];
  __m512 v = _mm512_setzero_ps();
  if (p.zero_padding) {  // three independent chains of merge-masked loads (disjoint lanes), then one OR
    __m512 u = v, w = v;
    for (int k = 0; k < b.count; ++k) {
      const int64_t iy = y - b.ty[k], ix = x - b.tx[k];
      if (static_cast<uint64_t>(iy) >= static_cast<uint64_t>(H) ||
          static_cast<uint64_t>(ix) >= static_cast<uint64_t>(W))
        continue;
      const float* src = xn + (iy * W + ix) * C + c0;
      if (k % 3 == 0)
        v = _mm512_mask_loadu_ps(v, b.mask[k], src);
      else if (k % 3 == 1)
        u = _mm512_mask_loadu_ps(u, b.mask[k], src);
      else
        w = _mm512_mask_loadu_ps(w, b.mask[k], src);
    }
    const __m512i bits = _mm512_or_si512(_mm512_castps_si512(v),
                                         _mm512_or_si512(_mm512_castps_si512(u), _mm512_castps_si512(w)));
    return _mm512_castsi512_ps(bits);
  }
  for (int k = 0; k < b.count; ++k) {
    const int32_t iy = p.table(b.channel[k], 1, 0)[y], ix = p.table(b.channel[k], 2, 0)[x];
    if (iy >= 0 && ix >= 0) v = _mm512_mask_loadu_ps(v, b.mask[k], xn + (iy * W + ix) * C + c0);
  }
  return v;
}

// Output pixels [xo0, xo1) of row y (a 2-D plan) with every source checked: gather_block per block of 16 channels.
__attribute__((target("avx512f"))) void gather_pixels_avx512(float* orow, const float* xi, const ShiftPlan& p,
                                                             const std::vector<ShiftGroups>& groups, int64_t y,
                                                             int64_t xo0, int64_t xo1) {
  const int64_t C = p.C;
  for (int64_t xo = xo0; xo < xo1; ++xo)
    for (int64_t b = 0; b * 16 < C; ++b)
      _mm512_mask_storeu_ps(orow + xo * C + b * 16, lanes_of(C - b * 16),
                            gather_block(xi, p, groups[b], b * 16, y, xo));
}
#endif

constexpr int64_t kEdgeBlockLoads = 8;  // distinct shifts per block of 16 up to which edges gather block by block

// Channels-last (N, D, H, W, C). Each output row (n, z, y) is W pixels of C channels; every channel
// reads its own shifted source. In the interior (all sources in range) a term is a constant element
// offset per channel, so consecutive channels with the same offset copy as one run.
template <typename T, typename A>
void forward_channels_last(const T* x, T* out, const ShiftPlan& p, int64_t N, bool linear, T fill) {
  const int64_t C = p.C, D = p.size[0], H = p.size[1], W = p.size[2];
  const int64_t row_len = W * C, image = D * H * row_len;
  const int nrow = p.ntaps[0] * p.ntaps[1], nx = p.ntaps[2], nterm = nrow * nx;
  const bool use_select = std::is_same<T, float>::value && std::is_same<A, float>::value && cpu_has_avx512f();
  const int64_t nblocks = (C + 15) / 16;
  // Rounded shifts on the AVX-512 path: every row whose sources are all in range (any padding) gathers with the
  // same offsets relative to its own pixels, so that plan is built once per call instead of per row (the per-row
  // set-up below is O(C) scalar work, which cost more than the row itself on 7x7 and 14x14 maps).
  const bool rel_rows = use_select && !linear;
  // 2-D with few distinct shifts per block: the other rows and the edge pixels gather block by block, each
  // source checked, instead of channel by channel through the tables after the per-row set-up (measured, 2 threads:
  // shifts in [-1, 1], at most 9 per block, 1.2-1.3x faster at 14x14; shifts in [-2, 2], about 12 per block, 1.2x
  // slower at 7x7, where most pixels are edges)
  const std::vector<ShiftGroups> edge_groups = rel_rows && D == 1 ? shift_groups(p) : std::vector<ShiftGroups>();
  int64_t loads = 0;
  for (const ShiftGroups& b : edge_groups) loads += b.count;
  const bool edge_blocks = !edge_groups.empty() && loads <= kEdgeBlockLoads * nblocks;
  std::vector<LaneGroups> rel_groups(rel_rows ? nblocks : 0);
  std::vector<int64_t> rel_row(rel_rows ? C : 0);  // channel c's source row relative to the output row
  int64_t zlo = 0, zhi = 0, ylo = 0, yhi = 0, rxlo = 0, rxhi = 0;
  if (rel_rows) {
    int64_t tmin[kDims] = {0, 0, 0}, tmax[kDims] = {0, 0, 0};
    std::vector<int64_t> rel(C);
    for (int64_t c = 0; c < C; ++c) {
      int64_t t[kDims];
      for (int d = 0; d < kDims; ++d) {
        t[d] = p.t[p.at(c, d, 0)];
        tmin[d] = std::min(tmin[d], t[d]), tmax[d] = std::max(tmax[d], t[d]);
      }
      rel_row[c] = -(t[0] * H + t[1]) * row_len;
      rel[c] = rel_row[c] - t[2] * C + c;
    }
    build_lane_groups(rel.data(), C, rel_groups.data());
    zlo = std::max<int64_t>(0, tmax[0]), zhi = std::min(D, D + tmin[0]);
    ylo = std::max<int64_t>(0, tmax[1]), yhi = std::min(H, H + tmin[1]);
    rxlo = std::min(W, std::max<int64_t>(0, tmax[2])), rxhi = std::max(rxlo, std::min(W, W + tmin[2]));
  }
  at::parallel_for(0, N * D * H, grain_for(row_len), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> roff(nrow * C), delta(nterm * C);
    std::vector<A> rweight(nrow * C), coef(nterm * C), acc(C);
    std::vector<int64_t> run_start, run_delta;
    // 32-bit offsets for the hardware gathers (4-byte elements in images of < 2^31 elements).
    constexpr bool kFour = sizeof(T) == 4;
    const bool use_gather = kFour && cpu_has_avx2_fma() && image < (int64_t(1) << 31);
    std::vector<int32_t> delta32(use_gather ? nterm * C : 0);
    std::vector<LaneGroups> groups(use_select ? nterm * nblocks : 0);
    std::vector<float> coef32(use_select ? nterm * C : 0);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / (D * H), zy = r % (D * H), z = zy / H, y = zy % H;
      const T* xi = x + n * image;
      T* orow = out + r * row_len;
#ifdef FXEFF_SHIFT_AVX2
      if constexpr (std::is_same<T, float>::value && std::is_same<A, float>::value) {
        const bool inside = rel_rows && z >= zlo && z < zhi && y >= ylo && y < yhi;
        if (edge_blocks && !inside) {
          gather_pixels_avx512(orow, xi, p, edge_groups, y, 0, W);
          continue;
        }
        if (inside) {
          const T* src = xi + (z * H + y) * row_len;  // the output row's own position in the input
          if (rxhi > rxlo) select_row_f32_avx512(orow, src, rxlo, rxhi, C, rel_groups.data(), 1, nullptr, false);
          if (edge_blocks) {
            gather_pixels_avx512(orow, xi, p, edge_groups, y, 0, rxlo);
            gather_pixels_avx512(orow, xi, p, edge_groups, y, rxhi, W);
            continue;
          }
          auto edge = [&](int64_t xo) {  // a column out of range for some channel: the lookup tables
            T* o = orow + xo * C;
            for (int64_t c = 0; c < C; ++c) {
              const int32_t sx = p.table(c, 2, 0)[xo];
              o[c] = sx < 0 ? fill : src[rel_row[c] + sx * C + c];
            }
          };
          for (int64_t xo = 0; xo < rxlo; ++xo) edge(xo);
          for (int64_t xo = rxhi; xo < W; ++xo) edge(xo);
          continue;
        }
      }
#endif
      bool rows_valid = true;  // every term with a non-zero weight has its source row in range
      int64_t xlo = 0, xhi = W;
      for (int64_t c = 0; c < C; ++c) {
        for (int kz = 0; kz < p.ntaps[0]; ++kz) {
          for (int ky = 0; ky < p.ntaps[1]; ++ky) {
            const int k = kz * p.ntaps[1] + ky;
            const int32_t iz = p.table(c, 0, kz)[z], iy = p.table(c, 1, ky)[y];
            const double wgt = p.w[p.at(c, 0, kz)] * p.w[p.at(c, 1, ky)];
            const bool valid = iz >= 0 && iy >= 0;
            roff[k * C + c] = valid ? (iz * H + iy) * row_len : -1;
            rweight[k * C + c] = valid ? static_cast<A>(wgt) : A(0);
            rows_valid = rows_valid && (valid || wgt == 0);
          }
        }
        for (int kx = 0; kx < nx; ++kx) {
          const int64_t i = p.at(c, 2, kx);
          if (p.w[i] == 0) continue;
          xlo = std::max(xlo, p.lo[i]);
          xhi = std::min(xhi, p.hi[i]);
        }
      }
      if (!rows_valid || xhi < xlo) xlo = xhi = 0;  // no interior: every pixel takes the lookup path
      // Interior terms: source element = x * C + c + delta (the output row's own pixel offset is x * C).
      for (int k = 0; k < nrow; ++k) {
        for (int kx = 0; kx < nx; ++kx) {
          const int term = k * nx + kx;
          for (int64_t c = 0; c < C; ++c) {
            const int64_t i = p.at(c, 2, kx);
            const A cf = rweight[k * C + c] * static_cast<A>(p.w[i]);
            coef[term * C + c] = cf;
            delta[term * C + c] = (roff[k * C + c] >= 0 && cf != A(0)) ? roff[k * C + c] - p.t[i] * C + c : c;
          }
        }
      }
      bool selected = false;
#ifdef FXEFF_SHIFT_AVX2
      if constexpr (std::is_same<T, float>::value && std::is_same<A, float>::value) {
        if (use_select && xhi > xlo) {
          for (int term = 0; term < nterm; ++term) build_lane_groups(delta.data() + term * C, C, &groups[term * nblocks]);
          for (int64_t j = 0; j < nterm * C; ++j) coef32[j] = static_cast<float>(coef[j]);
          select_row_f32_avx512(orow, xi, xlo, xhi, C, groups.data(), nterm, coef32.data(), linear);
          selected = true;
        }
      }
#endif
      if (use_gather && !selected)
        for (int64_t j = 0; j < nterm * C; ++j) delta32[j] = static_cast<int32_t>(delta[j]);
      if (!linear && xhi > xlo && !selected) {  // runs of consecutive channels with the same offset
        run_start.clear();
        run_delta.clear();
        for (int64_t c = 0; c < C; ++c) {
          const int64_t d = delta[c] - c;
          if (c == 0 || d != run_delta.back()) {
            run_start.push_back(c);
            run_delta.push_back(d);
          }
        }
        run_start.push_back(C);
      }
      for (int64_t xo = 0; xo < W; ++xo) {
        T* o = orow + xo * C;
        if (xo >= xlo && xo < xhi) {
          if (selected) continue;
          const T* base = xi + xo * C;
          if (!linear) {
            const size_t runs = run_delta.size();
            if (runs * 4 <= static_cast<size_t>(C)) {
              for (size_t k = 0; k < runs; ++k)
                std::memcpy(o + run_start[k], base + run_start[k] + run_delta[k],
                            (run_start[k + 1] - run_start[k]) * sizeof(T));
            } else if (use_gather) {
#ifdef FXEFF_SHIFT_AVX2
              gather_copy32_avx2(reinterpret_cast<int32_t*>(o), reinterpret_cast<const int32_t*>(base),
                                 delta32.data(), C);
#endif
            } else {
              const int64_t* dl = delta.data();
              for (int64_t c = 0; c < C; ++c) o[c] = base[dl[c]];
            }
          } else {
            std::fill(acc.begin(), acc.end(), A(0));
            for (int term = 0; term < nterm; ++term) {
              const A* cf = coef.data() + term * C;
#ifdef FXEFF_SHIFT_AVX2
              if constexpr (std::is_same<T, float>::value && std::is_same<A, float>::value) {
                if (use_gather) {
                  gather_axpy_f32_avx2(acc.data(), base, delta32.data() + term * C, cf, C);
                  continue;
                }
              }
#endif
              const int64_t* dl = delta.data() + term * C;
              for (int64_t c = 0; c < C; ++c) acc[c] += cf[c] * static_cast<A>(base[dl[c]]);
            }
            for (int64_t c = 0; c < C; ++c) o[c] = static_cast<T>(acc[c]);
          }
          continue;
        }
        for (int64_t c = 0; c < C; ++c) {  // edge pixel: lookup tables
          if (!linear) {
            const int32_t s = p.table(c, 2, 0)[xo];
            o[c] = (roff[c] < 0 || s < 0) ? fill : xi[roff[c] + s * C + c];
            continue;
          }
          A sum = 0;
          for (int k = 0; k < nrow; ++k) {
            if (roff[k * C + c] < 0) continue;
            for (int kx = 0; kx < nx; ++kx) {
              const int32_t s = p.table(c, 2, kx)[xo];
              const A cf = coef[(k * nx + kx) * C + c];
              if (s >= 0 && cf != A(0)) sum += cf * static_cast<A>(xi[roff[k * C + c] + s * C + c]);
            }
          }
          o[c] = static_cast<T>(sum);
        }
      }
    }
  });
}

// ------------------------------------------------------------------ backward

// Element offset of (n, c, pixel) in NCDHW or channels-last.
struct Layout {
  int64_t C, plane;
  bool channels_last;
  int64_t operator()(int64_t n, int64_t c, int64_t pix) const {
    return channels_last ? (n * plane + pix) * C + c : (n * C + c) * plane + pix;
  }
};

// The part of the adjoint the negated gather misses (paddings other than zeros): every output whose
// source lies outside the input in some dim sends its gradient to the element the padding maps it to.
// One thread owns a channel, so the scatter-adds neither race nor depend on the thread count.
template <typename T, typename A>
void adjoint_edges(const T* g, T* gx, const ShiftPlan& p, int64_t N, bool channels_last) {
  const int64_t C = p.C, D = p.size[0], H = p.size[1], W = p.size[2];
  const Layout at_{C, D * H * W, channels_last};
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      for (int kz = 0; kz < p.ntaps[0]; ++kz) {
        for (int ky = 0; ky < p.ntaps[1]; ++ky) {
          for (int kx = 0; kx < p.ntaps[2]; ++kx) {
            const int64_t iz = p.at(c, 0, kz), iy = p.at(c, 1, ky), ix = p.at(c, 2, kx);
            const A w = static_cast<A>(p.w[iz] * p.w[iy] * p.w[ix]);
            if (w == A(0)) continue;
            const int32_t *tz = p.table(c, 0, kz), *ty = p.table(c, 1, ky), *tx = p.table(c, 2, kx);
            for (int64_t n = 0; n < N; ++n) {
              for (int64_t z = 0; z < D; ++z) {
                const bool zin = z >= p.lo[iz] && z < p.hi[iz];
                for (int64_t y = 0; y < H; ++y) {
                  const bool inside = zin && y >= p.lo[iy] && y < p.hi[iy];
                  const int64_t row = (z * H + y) * W, src_row = (tz[z] * H + ty[y]) * W;
                  auto send = [&](int64_t x0, int64_t x1) {
                    for (int64_t x = x0; x < x1; ++x) {
                      T& dst = gx[at_(n, c, src_row + tx[x])];
                      dst = static_cast<T>(static_cast<A>(dst) + w * static_cast<A>(g[at_(n, c, row + x)]));
                    }
                  };
                  if (inside) {
                    send(0, p.lo[ix]);
                    send(p.hi[ix], W);
                  } else {
                    send(0, W);
                  }
                }
              }
            }
          }
        }
      }
    }
  });
}

// grad[c][d] = -sum g * d(interpolation)/dp_d: for each source-row term and x tap, one dot product
// g_row . x_row(shifted) weighted by the derivative of that tap's weight in each dim (-1 for tap 0,
// +1 for tap 1) times the other dims' weights.
template <typename T, typename A>
void shifts_grad_nchw(const T* g, const T* x, const ShiftPlan& p, int64_t N, double* grad) {
  const int64_t C = p.C, H = p.size[1], W = p.size[2], plane = p.size[0] * H * W;
  const int dims = kDims - p.first_dim;
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    RowTerm terms[4];
    for (int64_t c = begin; c < end; ++c) {
      double acc[kDims] = {0, 0, 0};
      for (int64_t n = 0; n < N; ++n) {
        const T* gp = g + (n * C + c) * plane;
        const T* xp = x + (n * C + c) * plane;
        for (int64_t z = 0; z < p.size[0]; ++z) {
          for (int64_t y = 0; y < H; ++y) {
            const T* grow = gp + (z * H + y) * W;
            const int nterms = row_terms(p, c, z, y, terms, true);
            for (int r = 0; r < nterms; ++r) {
              const double wz = p.w[p.at(c, 0, terms[r].kz)], wy = p.w[p.at(c, 1, terms[r].ky)];
              const double sz = terms[r].kz == 0 ? -1.0 : 1.0, sy = terms[r].ky == 0 ? -1.0 : 1.0;
              A dots[2];
              dot_row2<T, A>(grow, xp + terms[r].offset, p, c, dots);
              for (int kx = 0; kx < 2; ++kx) {
                const double wx = p.w[p.at(c, 2, kx)], sx = kx == 0 ? -1.0 : 1.0;
                const double dot = static_cast<double>(dots[kx]);
                if (p.first_dim <= 0) acc[0] += sz * wy * wx * dot;
                if (p.first_dim <= 1) acc[1] += wz * sy * wx * dot;
                acc[2] += wz * wy * sx * dot;
              }
            }
          }
        }
      }
      for (int d = 0; d < dims; ++d) grad[c * dims + d] = -acc[p.first_dim + d];  // d/ds = -d/dp
    }
  });
}

// Channels-last: dot[term][c] = sum over images and pixels of g[pix, c] * x[src_term(pix), c], vectorised
// across channels (gathers in the interior, tables at the edges); then the same weighting as above.
// Threads own blocks of 16 channels (one cache line of floats), so each channel's sum has one order.
template <typename T, typename A>
void shifts_grad_channels_last(const T* g, const T* x, const ShiftPlan& p, int64_t N, double* grad) {
  const int64_t C = p.C, D = p.size[0], H = p.size[1], W = p.size[2], image = D * H * W * C;
  const int dims = kDims - p.first_dim;
  const int nterm = p.ntaps[0] * p.ntaps[1] * p.ntaps[2];
  constexpr int64_t kBlock = 16;
  at::parallel_for(0, (C + kBlock - 1) / kBlock, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t c0 = blk * kBlock, nc = std::min(kBlock, C - c0);
      std::vector<double> dot(nterm * nc, 0.0);
      std::vector<A> row_dot(nterm * nc);
      std::vector<int64_t> roff(nterm * nc), delta(nterm * nc);
      const bool use_gather = sizeof(T) == 4 && cpu_has_avx2_fma() && image < (int64_t(1) << 31);
      std::vector<int32_t> delta32(use_gather ? nterm * nc : 0);
      const bool use_select = std::is_same<T, float>::value && std::is_same<A, float>::value && cpu_has_avx512f();
      std::vector<LaneGroups> groups(use_select ? nterm : 0);
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t z = 0; z < D; ++z) {
          for (int64_t y = 0; y < H; ++y) {
            std::fill(row_dot.begin(), row_dot.end(), A(0));
            // Source row of every term and channel (-1: zero padding), and the common x interior.
            int64_t xlo = 0, xhi = W;
            bool rows_valid = true;
            for (int term = 0; term < nterm; ++term) {
              const int kz = term / (p.ntaps[1] * p.ntaps[2]), ky = (term / p.ntaps[2]) % p.ntaps[1];
              const int kx = term % p.ntaps[2];
              for (int64_t j = 0; j < nc; ++j) {
                const int64_t c = c0 + j;
                const int32_t iz = p.table(c, 0, kz)[z], iy = p.table(c, 1, ky)[y];
                roff[term * nc + j] = (iz < 0 || iy < 0) ? -1 : (iz * H + iy) * W;
                rows_valid = rows_valid && iz >= 0 && iy >= 0;
                xlo = std::max(xlo, p.lo[p.at(c, 2, kx)]);
                xhi = std::min(xhi, p.hi[p.at(c, 2, kx)]);
              }
            }
            if (!rows_valid || xhi < xlo) xlo = xhi = 0;
            const T* gi = g + n * image;
            const T* xi = x + n * image;
            const int64_t row = (z * H + y) * W;
            // Interior offsets per term and channel (r < 0 only happens outside the interior).
            for (int term = 0; term < nterm; ++term) {
              const int kx = term % p.ntaps[2];
              for (int64_t j = 0; j < nc; ++j) {
                const int64_t c = c0 + j, r = roff[term * nc + j];
                delta[term * nc + j] = r < 0 ? j : r * C - p.t[p.at(c, 2, kx)] * C + j;
                if (use_gather) delta32[term * nc + j] = static_cast<int32_t>(delta[term * nc + j]);
              }
            }
            bool selected = false;
#ifdef FXEFF_SHIFT_AVX2
            if constexpr (std::is_same<T, float>::value && std::is_same<A, float>::value) {
              if (use_select && xhi > xlo) {
                for (int term = 0; term < nterm; ++term) build_lane_groups(delta.data() + term * nc, nc, &groups[term]);
                select_dot_f32_avx512(row_dot.data(), gi + row * C + c0, xi + c0, xlo, xhi, C, nc, groups.data(),
                                      nterm);
                selected = true;
              }
            }
#endif
            for (int64_t xo = 0; xo < W; ++xo) {
              const T* gp = gi + (row + xo) * C + c0;
              if (xo >= xlo && xo < xhi) {
                if (selected) continue;
                const T* base = xi + xo * C + c0;  // base[delta] = x[(r + xo - t) * C + c]
                for (int term = 0; term < nterm; ++term) {
                  A* acc = row_dot.data() + term * nc;
#ifdef FXEFF_SHIFT_AVX2
                  if constexpr (std::is_same<T, float>::value && std::is_same<A, float>::value) {
                    if (use_gather) {
                      gather_axpy_f32_avx2(acc, base, delta32.data() + term * nc, gp, nc);
                      continue;
                    }
                  }
#endif
                  const int64_t* dl = delta.data() + term * nc;
                  for (int64_t j = 0; j < nc; ++j) acc[j] += static_cast<A>(gp[j]) * static_cast<A>(base[dl[j]]);
                }
                continue;
              }
              for (int term = 0; term < nterm; ++term) {
                const int kx = term % p.ntaps[2];
                A* acc = row_dot.data() + term * nc;
                for (int64_t j = 0; j < nc; ++j) {
                  const int64_t c = c0 + j, r = roff[term * nc + j];
                  const int32_t sx = p.table(c, 2, kx)[xo];
                  if (r >= 0 && sx >= 0) acc[j] += static_cast<A>(gp[j]) * static_cast<A>(xi[(r + sx) * C + c]);
                }
              }
            }
            for (int64_t k = 0; k < nterm * nc; ++k) dot[k] += static_cast<double>(row_dot[k]);
          }
        }
      }
      for (int64_t j = 0; j < nc; ++j) {
        const int64_t c = c0 + j;
        double acc[kDims] = {0, 0, 0};
        for (int term = 0; term < nterm; ++term) {
          const int kz = term / (p.ntaps[1] * p.ntaps[2]), ky = (term / p.ntaps[2]) % p.ntaps[1];
          const int kx = term % p.ntaps[2];
          const double wz = p.w[p.at(c, 0, kz)], wy = p.w[p.at(c, 1, ky)], wx = p.w[p.at(c, 2, kx)];
          const double sz = kz == 0 ? -1.0 : 1.0, sy = ky == 0 ? -1.0 : 1.0, sx = kx == 0 ? -1.0 : 1.0;
          const double d = dot[term * nc + j];
          acc[0] += sz * wy * wx * d;
          acc[1] += wz * sy * wx * d;
          acc[2] += wz * wy * sx * d;
        }
        for (int d = 0; d < dims; ++d) grad[c * dims + d] = -acc[p.first_dim + d];
      }
    }
  });
}

// ------------------------------------------------------------------ entry points

bool is_channels_last(const at::Tensor& t) {
  const auto fmt = t.suggest_memory_format();
  return (t.dim() == 4 && fmt == at::MemoryFormat::ChannelsLast) ||
         (t.dim() == 5 && fmt == at::MemoryFormat::ChannelsLast3d);
}

at::MemoryFormat channels_last_format(const at::Tensor& t) {
  return t.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
}

template <typename T, typename A>
void run_forward(const at::Tensor& x, at::Tensor& out, const ShiftPlan& plan, bool linear, T fill) {
  if (is_channels_last(x))
    forward_channels_last<T, A>(x.data_ptr<T>(), out.data_ptr<T>(), plan, x.size(0), linear, fill);
  else
    forward_nchw<T, A>(x.data_ptr<T>(), out.data_ptr<T>(), plan, x.size(0), linear, fill);
}

// x made dense in its own layout (channels-last stays channels-last), and an output like it.
at::Tensor dense(const at::Tensor& x) {
  return x.contiguous(is_channels_last(x) ? channels_last_format(x) : at::MemoryFormat::Contiguous);
}

at::Tensor shift_cpu(const at::Tensor& x_in, const at::Tensor& shifts, c10::string_view padding,
                     c10::string_view mode) {
  const char* op = "fxeff.shift";
  check_shift_args(op, x_in, shifts, false);
  const ShiftPadding pad = parse_shift_padding(op, padding);
  const bool linear = parse_shift_mode(op, mode) == ShiftMode::Active;
  const ShiftPlan plan = make_plan(op, shifts, x_in.sizes().slice(2), pad, linear);
  const at::Tensor x = dense(x_in);
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fxeff_shift", [&] {
    run_forward<scalar_t, at::opmath_type<scalar_t>>(x, out, plan, linear, scalar_t(0));
  });
  return out;
}

// The crop/pad and window geometry of shift_pool (pad in F.pad order, negative = crop; windows = strides = pool,
// the last clipped) for x's spatial sizes; kernel (where given) gets avg_pool's kernel per dim (the window, at most
// the length).
PoolGeometry pool_geometry(const char* op, const at::Tensor& x, at::IntArrayRef pad, at::IntArrayRef pool,
                           std::vector<int64_t>* kernel = nullptr) {
  const int64_t dims = x.dim() - 2;
  TORCH_CHECK_VALUE(static_cast<int64_t>(pad.size()) == 2 * dims, op, ": pad must have 2 * dims = ", 2 * dims,
                    " entries (F.pad order: last dim first), got ", pad);
  TORCH_CHECK_VALUE(static_cast<int64_t>(pool.size()) == dims, op, ": pool must have dims = ", dims,
                    " entries, got ", pool);
  PoolGeometry g;
  const int first = kDims - static_cast<int>(dims);
  if (kernel != nullptr) kernel->assign(dims, 1);
  for (int64_t d = 0; d < dims; ++d) {
    const int64_t before = pad[2 * (dims - 1 - d)], after = pad[2 * (dims - 1 - d) + 1];
    const int64_t len = x.size(2 + d) + before + after;
    TORCH_CHECK_VALUE(len >= 1, op, ": input size ", x.size(2 + d), " along spatial dim ", d,
                      " is too small for the emulated depthwise conv (size after pad ", len, " < 1)");
    TORCH_CHECK_VALUE(pool[d] >= 1, op, ": pool must be >= 1, got ", pool);
    g.begin[first + d] = -before;
    g.len[first + d] = len;
    g.stride[first + d] = pool[d];
    g.out[first + d] = (len + pool[d] - 1) / pool[d];
    if (kernel != nullptr) (*kernel)[d] = std::min(pool[d], len);
  }
  return g;
}

// ------------------------------------------------------------------ shift_conv1x1: the shift fused into a 1x1 conv
// conv1x1(clamp(scale * shift_pool(x) + offset), weight, bias): a shift layer, its BatchNorm (folded to a per-channel
// scale and offset) and a clamp activation, read by a pointwise conv. Work items are bands of output rows of one
// image; a thread builds its band's shifted (pooled, scaled, clamped) map in an L2-sized tile, in the layout the
// GEMM reads ([C, pixels] for NCHW, [pixels, C] for channels-last), and multiplies it into the output rows with one
// GEMM (ATen's, single-threaded inside the parallel region). The shifted map never reaches memory.

// v = clamp(v * scale + offset, lo, hi); NaN stays NaN (as torch.clamp). scale null: no affine.
template <typename T>
struct Epilogue {
  const T* scale = nullptr;
  const T* offset = nullptr;
  T lo = 0, hi = 0;
  bool has_lo = false, has_hi = false;

  T apply(T v, int64_t c) const {
    if (scale != nullptr) v = v * scale[c] + offset[c];
    if (has_lo) v = v < lo ? lo : v;
    if (has_hi) v = v > hi ? hi : v;
    return v;
  }

  // One channel's run of n values (an NCHW tile row).
  void run(T* v, int64_t n, int64_t c) const {
    if (scale != nullptr) {
      const T a = scale[c], b = offset[c];
      for (int64_t i = 0; i < n; ++i) v[i] = v[i] * a + b;
    }
    if (has_lo)
      for (int64_t i = 0; i < n; ++i) v[i] = v[i] < lo ? lo : v[i];
    if (has_hi)
      for (int64_t i = 0; i < n; ++i) v[i] = v[i] > hi ? hi : v[i];
  }
};

// Shifted row y (2-D plan, z = 0) of channel c into dst[W]: sources through the lookup tables, out of range = 0;
// the interior of a rounded shift is one memcpy.
template <typename T, typename A>
void shifted_row(const T* plane, T* dst, const ShiftPlan& p, int64_t c, int64_t y, bool linear,
                 const SliceTerm* terms, int nterms) {
  const int64_t W = p.size[2];
  if (nterms == 0 || (!linear && p.table(c, 1, 0)[y] < 0)) {
    std::fill(dst, dst + W, T(0));
    return;
  }
  if (linear) {
    slice_row_lookup<T, A>(dst, plane, p, c, y, 0, W, terms, nterms, true, T(0));
    return;
  }
  const int32_t iy = p.table(c, 1, 0)[y];
  const int64_t i = p.at(c, 2, 0), lo = p.lo[i], hi = std::max(p.hi[i], lo);
  if (hi > lo) std::memcpy(dst + lo, plane + iy * W + lo - p.t[i], (hi - lo) * sizeof(T));
  slice_row_lookup<T, A>(dst, plane, p, c, y, 0, lo, terms, nterms, false, T(0));
  slice_row_lookup<T, A>(dst, plane, p, c, y, hi, W, terms, nterms, false, T(0));
}

// Per output column of a pooled row: the window's width (the last window clipped), as the divisor's factor.
template <typename A>
std::vector<A> pool_widths(const PoolGeometry& g) {
  std::vector<A> widths(g.out[2]);
  for (int64_t ox = 0; ox < g.out[2]; ++ox) {
    const auto [x0, x1] = pool_window(g, 2, ox);
    widths[ox] = static_cast<A>(x1 - x0);
  }
  return widths;
}

// Pooled output row oy of channel c for a rounded shift (ty, tx) with zero padding, straight from the input plane:
// the shifted value at (sy, sx) is plane[sy - ty][sx - tx] where both are in range, else 0. Interior windows (every
// column inside the map and the source) sum without checks; acc: Wo.
template <typename T, typename A>
void pooled_row_rounded(const T* plane, T* dst, const ShiftPlan& p, int64_t c, const PoolGeometry& g, int64_t oy,
                        const A* widths, A* acc) {
  const int64_t H = p.size[1], W = p.size[2], Wo = g.out[2], s = g.stride[2], bx = g.begin[2];
  const int64_t ty = p.t[p.at(c, 1, 0)], tx = p.t[p.at(c, 2, 0)];
  // interior: every u of the window has 0 <= u + bx < W and 0 <= u + bx - tx < W, and the window is whole
  const int64_t first = std::max<int64_t>(0, tx) - bx, last = std::min(W, W + tx) - bx;  // u in [first, last)
  const int64_t end = std::min(last, g.len[2]);
  const int64_t ox_lo = std::min(Wo, first <= 0 ? int64_t(0) : (first + s - 1) / s);
  const int64_t ox_hi = end >= s ? std::max(ox_lo, std::min(Wo, (end - s) / s + 1)) : ox_lo;
  std::fill(acc, acc + Wo, A(0));
  const auto [y0, y1] = pool_window(g, 1, oy);
  for (int64_t y = y0; y < y1; ++y) {
    const int64_t sy = y + g.begin[1], iy = sy - ty;
    if (sy < 0 || sy >= H || iy < 0 || iy >= H) continue;
    const T* r = plane + iy * W + bx - tx;  // r[u] = the shifted row at padded column u
    if (s == 1) {  // a crop or pad without pooling (EfficientNet's explicit "same" padding)
      for (int64_t ox = ox_lo; ox < ox_hi; ++ox) acc[ox] += static_cast<A>(r[ox]);
    } else if (s == 2) {
      for (int64_t ox = ox_lo; ox < ox_hi; ++ox) acc[ox] += static_cast<A>(r[2 * ox]) + static_cast<A>(r[2 * ox + 1]);
    } else {
      for (int64_t ox = ox_lo; ox < ox_hi; ++ox)
        for (int64_t u = ox * s; u < ox * s + s; ++u) acc[ox] += static_cast<A>(r[u]);
    }
    auto edge = [&](int64_t ox) {
      const int64_t u0 = ox * s, u1 = std::min(u0 + s, g.len[2]);
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t sx = u + bx, ix = sx - tx;
        if (sx >= 0 && sx < W && ix >= 0 && ix < W) acc[ox] += static_cast<A>(r[u]);
      }
    };
    for (int64_t ox = 0; ox < ox_lo; ++ox) edge(ox);
    for (int64_t ox = ox_hi; ox < Wo; ++ox) edge(ox);
  }
  if (y1 - y0 == 1 && s == 1) {  // windows of one: no division
    for (int64_t ox = 0; ox < Wo; ++ox) dst[ox] = static_cast<T>(acc[ox]);
    return;
  }
  const A rows = static_cast<A>(y1 - y0);
  for (int64_t ox = 0; ox < Wo; ++ox) dst[ox] = static_cast<T>(acc[ox] / (rows * widths[ox]));
}

// NCHW tile: rows [oy0, oy1) of the output grid of channels [c0, c1), tile[c - c0][(oy - oy0) * Wo + ox].
template <typename T, typename A>
void fill_tile_nchw(const T* xn, T* tile, const ShiftPlan& p, const PoolGeometry& g, bool pooled, bool linear,
                    const Epilogue<T>& epi, int64_t oy0, int64_t oy1, int64_t c0, int64_t c1, T* row, A* acc,
                    const A* widths) {
  const int64_t H = p.size[1], W = p.size[2], Wo = g.out[2], np = (oy1 - oy0) * Wo;
  const PoolColumns cols = pool_columns(g, W);
  const bool direct = pooled && !linear && p.zero_padding;
  SliceTerm terms[8];
  for (int64_t c = c0; c < c1; ++c) {
    const T* plane = xn + c * H * W;
    T* t = tile + (c - c0) * np;
    const int nterms = slice_terms(p, c, 0, terms);
    for (int64_t oy = oy0; oy < oy1; ++oy) {
      T* dst = t + (oy - oy0) * Wo;
      if (!pooled) {
        shifted_row<T, A>(plane, dst, p, c, oy, linear, terms, nterms);
        continue;
      }
      if (direct) {
        pooled_row_rounded<T, A>(plane, dst, p, c, g, oy, widths, acc);
        continue;
      }
      std::fill(acc, acc + Wo, A(0));
      const auto [y0, y1] = pool_window(g, 1, oy);
      for (int64_t y = y0; y < y1; ++y) {
        const int64_t sy = y + g.begin[1];
        if (sy < 0 || sy >= H) continue;  // zero padding
        shifted_row<T, A>(plane, row, p, c, sy, linear, terms, nterms);
        pool_row_add<T, A>(row, acc, g, cols, W);
      }
      const A rows = static_cast<A>(y1 - y0);
      for (int64_t ox = 0; ox < Wo; ++ox) dst[ox] = static_cast<T>(acc[ox] / (rows * widths[ox]));
    }
    epi.run(t, np, c);
  }
}

// Channels-last, any mode and padding, through the lookup tables: the shifted value of channel c at (y, x).
template <typename T, typename A>
T shifted_value_cl(const T* xn, const ShiftPlan& p, int64_t c, int64_t y, int64_t x) {
  const int64_t C = p.C, W = p.size[2];
  A sum = 0;
  for (int ky = 0; ky < p.ntaps[1]; ++ky) {
    const int32_t iy = p.table(c, 1, ky)[y];
    const double wy = p.w[p.at(c, 1, ky)];
    if (iy < 0 || wy == 0) continue;
    for (int kx = 0; kx < p.ntaps[2]; ++kx) {
      const int32_t ix = p.table(c, 2, kx)[x];
      const double wx = p.w[p.at(c, 2, kx)];
      if (ix >= 0 && wx != 0) sum += static_cast<A>(wy * wx) * static_cast<A>(xn[(iy * W + ix) * C + c]);
    }
  }
  return static_cast<T>(sum);
}

// Channels-last tile: output pixels of rows [oy0, oy1), tile[(oy - oy0) * Wo + ox][c] (the portable path).
template <typename T, typename A>
void fill_tile_cl(const T* xn, T* tile, const ShiftPlan& p, const PoolGeometry& g, bool pooled,
                  const Epilogue<T>& epi, int64_t oy0, int64_t oy1) {
  const int64_t C = p.C, H = p.size[1], W = p.size[2], Wo = g.out[2];
  for (int64_t oy = oy0; oy < oy1; ++oy)
    for (int64_t ox = 0; ox < Wo; ++ox) {
      T* dst = tile + ((oy - oy0) * Wo + ox) * C;
      if (!pooled) {
        for (int64_t c = 0; c < C; ++c) dst[c] = epi.apply(shifted_value_cl<T, A>(xn, p, c, oy, ox), c);
        continue;
      }
      const auto [y0, y1] = pool_window(g, 1, oy);
      const auto [x0, x1] = pool_window(g, 2, ox);
      const A count = static_cast<A>((y1 - y0) * (x1 - x0));
      for (int64_t c = 0; c < C; ++c) {
        A sum = 0;
        for (int64_t y = y0; y < y1; ++y) {
          const int64_t sy = y + g.begin[1];
          if (sy < 0 || sy >= H) continue;
          for (int64_t x = x0; x < x1; ++x) {
            const int64_t sx = x + g.begin[2];
            if (sx >= 0 && sx < W) sum += static_cast<A>(shifted_value_cl<T, A>(xn, p, c, sy, sx));
          }
        }
        dst[c] = epi.apply(static_cast<T>(sum / count), c);
      }
    }
}

// The channels-last tile by the AVX-512 kernel below where it applies (float32; the caller checks the CPU and that
// the shifts are rounded); false: the caller uses fill_tile_cl.
template <typename T>
bool fill_tile_cl_fast(const T*, T*, const ShiftPlan&, const std::vector<ShiftGroups>&, const PoolGeometry&, bool,
                       const Epilogue<T>&, int64_t, int64_t, bool) {
  return false;
}

#ifdef FXEFF_SHIFT_AVX2
// The interior of the output grid along one dim: the outputs [lo, hi) whose window (of the pooled, cropped or padded
// grid; the output itself without pooling) reads only sources in range for every channel's shift in [tmin, tmax].
std::pair<int64_t, int64_t> interior_outputs(const PoolGeometry& g, int d, int64_t n, int64_t tmin, int64_t tmax) {
  const int64_t first = std::max<int64_t>(0, tmax), last = std::min(n, n + tmin);  // sources s - t in range
  int64_t lo = 0, hi = 0;
  for (int64_t o = 0; o < g.out[d]; ++o) {
    const auto [u0, u1] = pool_window(g, d, o);
    const bool inside = u1 > u0 && u0 + g.begin[d] >= first && u1 + g.begin[d] <= last;
    if (inside && hi == lo) lo = o, hi = o + 1;
    else if (inside && hi == o) hi = o + 1;
  }
  return {lo, hi};
}

constexpr int64_t kPrefetchBytes = 3072;  // how far ahead in a source row (measured: 1.5-6 KiB alike)

// A block's epilogue: v (a pooled sum: times `inv`, or divided by `count`), the affine, the clamp, stored to dst + c0.
__attribute__((target("avx512f"))) inline void finish_block(__m512 v, float* dst, int64_t c0, int64_t C, bool pooled,
                                                           bool divide, __m512 count, __m512 inv,
                                                           const Epilogue<float>& epi) {
  const __mmask16 valid = lanes_of(C - c0);
  if (pooled) v = divide ? _mm512_div_ps(v, count) : _mm512_mul_ps(v, inv);
  if (epi.scale != nullptr)
    v = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(valid, epi.scale + c0), _mm512_maskz_loadu_ps(valid, epi.offset + c0));
  if (epi.has_lo) v = _mm512_max_ps(_mm512_set1_ps(epi.lo), v);  // max(lo, NaN) = NaN: the second operand wins
  if (epi.has_hi) v = _mm512_min_ps(_mm512_set1_ps(epi.hi), v);
  _mm512_mask_storeu_ps(dst + c0, valid, v);
}

__attribute__((target("avx512f"))) void fill_tile_cl_avx512(const float* xn, float* tile, const ShiftPlan& p,
                                                            const std::vector<ShiftGroups>& groups,
                                                            const PoolGeometry& g, bool pooled,
                                                            const Epilogue<float>& epi, int64_t oy0, int64_t oy1,
                                                            bool prefetch) {
  const int64_t C = p.C, H = p.size[1], W = p.size[2], Wo = g.out[2], nblocks = (C + 15) / 16;
  int64_t tymin = 0, tymax = 0, txmin = 0, txmax = 0;
  for (const ShiftGroups& b : groups)
    for (int k = 0; k < b.count; ++k) {
      tymin = std::min(tymin, b.ty[k]), tymax = std::max(tymax, b.ty[k]);
      txmin = std::min(txmin, b.tx[k]), txmax = std::max(txmax, b.tx[k]);
    }
  const auto [iy_lo, iy_hi] = interior_outputs(g, 1, H, tymin, tymax);
  const auto [ix_lo, ix_hi] = interior_outputs(g, 2, W, txmin, txmax);
  // An input larger than the L3 streams from memory, and the hardware prefetcher does not keep up with the rows a
  // pixel reads (the first load of a pixel stalled for 59% of the kernel's samples on MobileNetV2's 96-channel
  // 112x112 pooled layer at batch 8): the source rows' next pixels are prefetched about kPrefetchBytes ahead.
  const int64_t ahead = prefetch ? std::max<int64_t>(1, kPrefetchBytes / (C * static_cast<int64_t>(sizeof(float)))) : 0;
  // pixel by pixel, every block of 16 channels of a pixel in turn: the pixel's sources stay in L1
  for (int64_t oy = oy0; oy < oy1; ++oy) {
    const auto [y0, y1] = pool_window(g, 1, oy);
    const bool row_inside = oy >= iy_lo && oy < iy_hi;
    // the source rows this output row reads (every shift), for the prefetch
    const int64_t r0 = y0 + g.begin[1] - tymax, r1 = y1 + g.begin[1] - tymin;
    for (int64_t ox = 0; ox < Wo; ++ox) {
      float* dst = tile + ((oy - oy0) * Wo + ox) * C;
      const auto [x0, x1] = pool_window(g, 2, ox);
      const int64_t n = (y1 - y0) * (x1 - x0);
      // a window of 1, 2, 4, ... pixels: the mean is a product by the exact reciprocal (as the division)
      const bool divide = (n & (n - 1)) != 0;
      const __m512 count = _mm512_set1_ps(static_cast<float>(n)), inv = _mm512_set1_ps(1.0f / static_cast<float>(n));
      if (row_inside && ox >= ix_lo && ox < ix_hi) {
        // every source in range: each distinct shift of a block is one masked load at a fixed offset, no checks
        const float* base = xn + ((y0 + g.begin[1]) * W + x0 + g.begin[2]) * C;
        const int64_t wy = y1 - y0, wx = x1 - x0;
        if (ahead > 0 && x0 + g.begin[2] + ahead + wx <= W) {
          const float* next = xn + (r0 * W + x0 + g.begin[2] + ahead) * C;
          for (int64_t r = r0; r < r1; ++r, next += W * C)
            for (int64_t e = 0; e < wx * C; e += 16) _mm_prefetch(reinterpret_cast<const char*>(next + e), _MM_HINT_T0);
        }
        for (int64_t b = 0; b < nblocks; ++b) {
          const int64_t c0 = b * 16;
          __m512 v = select_lanes(base + c0, groups[b].lanes);
          for (int64_t j = 1; j < wy * wx; ++j)
            v = _mm512_add_ps(v, select_lanes(base + ((j / wx) * W + j % wx) * C + c0, groups[b].lanes));
          finish_block(v, dst, c0, C, pooled, divide, count, inv, epi);
        }
        continue;
      }
      for (int64_t b = 0; b < nblocks; ++b) {
        const int64_t c0 = b * 16;
        const ShiftGroups& grp = groups[b];
        __m512 v;
        if (!pooled) {
          v = gather_block(xn, p, grp, c0, oy, ox);
        } else {
          v = _mm512_setzero_ps();
          for (int64_t y = y0; y < y1; ++y) {
            const int64_t sy = y + g.begin[1];
            if (sy < 0 || sy >= H) continue;
            for (int64_t x = x0; x < x1; ++x) {
              const int64_t sx = x + g.begin[2];
              if (sx >= 0 && sx < W) v = _mm512_add_ps(v, gather_block(xn, p, grp, c0, sy, sx));
            }
          }
        }
        finish_block(v, dst, c0, C, pooled, divide, count, inv, epi);
      }
    }
  }
}

template <>
bool fill_tile_cl_fast<float>(const float* xn, float* tile, const ShiftPlan& p, const std::vector<ShiftGroups>& groups,
                              const PoolGeometry& g, bool pooled, const Epilogue<float>& epi, int64_t oy0,
                              int64_t oy1, bool prefetch) {
  fill_tile_cl_avx512(xn, tile, p, groups, g, pooled, epi, oy0, oy1, prefetch);
  return true;
}
#endif

constexpr int64_t kFusedTileBytes = 512 * 1024;  // one band's shifted map, with the GEMM's panels in the 1 MiB L2
constexpr int64_t kImagePixels = 1024;  // maps up to 32x32 run whole images (see shift_conv1x1_cpu)
constexpr int64_t kImageTileBytes = 1024 * 1024;
// Inputs above this size are prefetched by the channels-last gather (measured at MobileNetV2's sizes: batch 8's
// 14.5-38.5 MB inputs 1.4-1.6x faster; batch 1's 4.8 MB ones, which the L3 still holds, 5-10% slower).
constexpr int64_t kPrefetchInputBytes = 8 * 1024 * 1024;

// Whether a shift_pool geometry crops, pads or pools (else it is the plain shift).
bool pads_or_pools(at::IntArrayRef pad, at::IntArrayRef pool) {
  return std::any_of(pad.begin(), pad.end(), [](int64_t v) { return v != 0; }) ||
         std::any_of(pool.begin(), pool.end(), [](int64_t v) { return v != 1; });
}

// shift, then F.pad(pad) (negative = crop), then avg_pool(kernel = stride = pool, ceil_mode): the geometry of a
// depthwise conv emulated by a shift layer. NCDHW inputs run fused (shift_pool_nchw); channels-last float32 2-D
// inputs with rounded shifts are pooled straight into the output by the gather of shift_conv1x1 (fill_tile_cl_fast);
// the rest run the shift kernel, then ATen's pad and pooling.
at::Tensor shift_pool_cpu(const at::Tensor& x_in, const at::Tensor& shifts, c10::string_view padding,
                          c10::string_view mode, at::IntArrayRef pad, at::IntArrayRef pool) {
  const char* op = "fxeff.shift_pool";
  check_shift_args(op, x_in, shifts, false);
  const int64_t dims = x_in.dim() - 2;
  const int first = kDims - static_cast<int>(dims);
  std::vector<int64_t> kernel;
  const PoolGeometry g = pool_geometry(op, x_in, pad, pool, &kernel);
  const ShiftPadding pad_mode = parse_shift_padding(op, padding);
  const bool linear = parse_shift_mode(op, mode) == ShiftMode::Active;
  const ShiftPlan plan = make_plan(op, shifts, x_in.sizes().slice(2), pad_mode, linear);
  const at::Tensor x = dense(x_in);
  if (!is_channels_last(x) && x.numel() > 0) {
    std::vector<int64_t> sizes = {x.size(0), x.size(1)};
    for (int64_t d = 0; d < dims; ++d) sizes.push_back(g.out[first + d]);
    at::Tensor out = at::empty(sizes, x.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fxeff_shift_pool", [&] {
      shift_pool_nchw<scalar_t, at::opmath_type<scalar_t>>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), plan,
                                                           x.size(0), linear, g);
    });
    return out;
  }
  if (dims == 2 && !linear && x.scalar_type() == at::kFloat && cpu_has_avx512f() && x.numel() > 0) {
    // channels-last float32, rounded shifts: the fused op's gather builds the pooled map straight into the output
    // (before: the whole shifted map, then ATen's pad and avg_pool over it; MobileNetV3's strided layers at batch 8
    // took 3-6x their depthwise conv's time)
    const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Ho = g.out[1], Wo = g.out[2];
    at::Tensor out = at::empty({N, C, Ho, Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
    if (out.numel() == 0) return out;
    const std::vector<ShiftGroups> groups = shift_groups(plan);
    const bool pooled = pads_or_pools(pad, pool);
    const bool prefetch = x.numel() * static_cast<int64_t>(sizeof(float)) > kPrefetchInputBytes;
    const float* xp = x.const_data_ptr<float>();
    float* op_ = out.data_ptr<float>();
    const Epilogue<float> identity;
    at::parallel_for(0, N * Ho, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, Wo * C)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end;) {  // the rows of one image at a time
        const int64_t n = r / Ho, oy0 = r % Ho, oy1 = std::min(Ho, oy0 + (end - r));
        fill_tile_cl_fast<float>(xp + n * C * H * W, op_ + r * Wo * C, plan, groups, g, pooled, identity, oy0, oy1,
                                 prefetch);
        r += oy1 - oy0;
      }
    });
    return out;
  }
  at::Tensor shifted = at::empty_like(x);
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fxeff_shift_pool", [&] {
      run_forward<scalar_t, at::opmath_type<scalar_t>>(x, shifted, plan, linear, scalar_t(0));
    });
  }
  if (std::any_of(pad.begin(), pad.end(), [](int64_t v) { return v != 0; }))
    shifted = at::constant_pad_nd(shifted, pad, 0);
  if (std::all_of(pool.begin(), pool.end(), [](int64_t v) { return v == 1; })) return shifted;
  if (dims == 1) return at::avg_pool1d(shifted, kernel, pool, {0}, true, true);
  if (dims == 2) return at::avg_pool2d(shifted, kernel, pool, {0, 0}, true, true);
  return at::avg_pool3d(shifted, kernel, pool, {0, 0, 0}, true, true);
}

at::Tensor shift_conv1x1_cpu(const at::Tensor& x_in, const at::Tensor& shifts, c10::string_view padding,
                             c10::string_view mode, at::IntArrayRef pad, at::IntArrayRef pool,
                             const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& offset,
                             c10::optional<double> clamp_min, c10::optional<double> clamp_max,
                             const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const char* op = "fxeff.shift_conv1x1";
  TORCH_CHECK_VALUE(x_in.dim() == 4, op, ": x must be 4-D [N, C, H, W] (a 2-D shift read by a 1x1 conv2d), got ",
                    x_in.dim(), "-D ", x_in.sizes());
  check_shift_args(op, x_in, shifts, false);
  TORCH_CHECK_NOT_IMPLEMENTED(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble, op,
                              ": CPU kernel for float32 and float64 only, got ", x_in.scalar_type(),
                              " (run the unfused shift, batch_norm and conv2d for other dtypes)");
  const int64_t N = x_in.size(0), C = x_in.size(1);
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(1) == C && weight.size(2) == 1 && weight.size(3) == 1, op,
                    ": weight must be [O, C, 1, 1] with C = ", C, ", got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.scalar_type() == x_in.scalar_type() && weight.device() == x_in.device(), op,
                    ": weight must be ", x_in.scalar_type(), " on ", x_in.device(), ", got ", weight.scalar_type(),
                    " on ", weight.device());
  const int64_t O = weight.size(0);
  auto check_vector = [&](const c10::optional<at::Tensor>& t, const char* name, int64_t n) {
    if (!t.has_value() || !t->defined()) return false;
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == n && t->scalar_type() == x_in.scalar_type() &&
                      t->device() == x_in.device(), op, ": ", name, " must be [", n, "] ", x_in.scalar_type(),
                      " on ", x_in.device(), ", got ", t->sizes(), " ", t->scalar_type(), " on ", t->device());
    return true;
  };
  const bool has_bias = check_vector(bias, "bias", O);
  const bool has_scale = check_vector(scale, "scale", C), has_offset = check_vector(offset, "offset", C);
  TORCH_CHECK_VALUE(has_scale == has_offset, op, ": scale and offset go together (a folded BatchNorm), got ",
                    has_scale ? "scale without offset" : "offset without scale");
  const PoolGeometry g = pool_geometry(op, x_in, pad, pool);
  const bool pooled = pads_or_pools(pad, pool);
  const bool linear = parse_shift_mode(op, mode) == ShiftMode::Active;
  const ShiftPlan plan = make_plan(op, shifts, x_in.sizes().slice(2), parse_shift_padding(op, padding), linear);
  const at::Tensor x = dense(x_in);
  const bool cl = is_channels_last(x);
  const int64_t H = x.size(2), W = x.size(3), Ho = g.out[1], Wo = g.out[2], P = Ho * Wo;
  at::Tensor out = at::empty({N, O, Ho, Wo}, x.options().memory_format(cl ? at::MemoryFormat::ChannelsLast
                                                                          : at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  // Detached: the GEMMs run in the parallel region's worker threads, whose grad mode and dispatch state are their
  // own (the caller's below-autograd guard does not reach them), and they must not see tensors that require grad.
  const at::Tensor w2 = weight.detach().reshape({O, C}).contiguous();
  const at::Tensor sc = has_scale ? scale->detach().contiguous() : at::Tensor();
  const at::Tensor of = has_offset ? offset->detach().contiguous() : at::Tensor();
  const at::Tensor b = has_bias ? bias->detach().contiguous() : at::Tensor();
  // Small maps (at most kImagePixels outputs, the whole shifted image within kImageTileBytes) in a batch too small to
  // give every thread images: per image the whole tile, built by all threads, then one GEMM that ATen runs on all
  // threads (bands of a 7x7 or 14x14 map would be GEMMs of a few dozen columns, each reading the whole weight).
  // Otherwise: bands of output rows as fit the tile budget, at least two per thread where the map allows, each
  // thread building its band and running its GEMM.
  const int64_t elt = static_cast<int64_t>(x.element_size());
  const bool image_mode = P <= kImagePixels && C * P * elt <= kImageTileBytes && N < 2 * at::get_num_threads();
  // channels-last bands run over the batch's rows (N * Ho, images back to back as the output stores them), so one
  // GEMM may cover several small images; NCHW bands stay within an image (its output is [O, pixels] per image).
  const int64_t row_bytes = std::max<int64_t>(1, Wo * C * elt), span = cl ? N * Ho : Ho;  // C may be 0
  int64_t rows = image_mode ? Ho : std::max<int64_t>(1, std::min<int64_t>(span, kFusedTileBytes / row_bytes));
  const int64_t threads = at::get_num_threads(), want = 2 * threads;
  if (!image_mode && (cl ? 1 : N) * ((span + rows - 1) / rows) < want)
    rows = std::max<int64_t>(1, (N * Ho + want - 1) / want);
  rows = std::min(rows, span);
  if (!image_mode) {  // a whole number of items per thread where the rows allow (5 items on 2 threads idle one 20%)
    const int64_t per = cl ? 1 : N, items = per * ((span + rows - 1) / rows);
    const int64_t target = (items + threads - 1) / threads * threads, bands_wanted = (target + per - 1) / per;
    rows = std::max<int64_t>(1, (span + bands_wanted - 1) / bands_wanted);
  }
  const int64_t bands = (span + rows - 1) / rows;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fxeff_shift_conv1x1", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    Epilogue<T> epi;
    if (has_scale) {
      epi.scale = sc.const_data_ptr<T>();
      epi.offset = of.const_data_ptr<T>();
    }
    epi.has_lo = clamp_min.has_value();
    epi.has_hi = clamp_max.has_value();
    if (epi.has_lo) epi.lo = static_cast<T>(*clamp_min);
    if (epi.has_hi) epi.hi = static_cast<T>(*clamp_max);
    const T* xp = x.const_data_ptr<T>();
    T* outp = out.data_ptr<T>();
    const auto options = x.options();
    // the AVX-512 gather for float32 rounded shifts in channels-last
    const bool fast_cl = cl && !linear && std::is_same<T, float>::value && cpu_has_avx512f();
    const std::vector<ShiftGroups> groups = fast_cl ? shift_groups(plan) : std::vector<ShiftGroups>();
    const bool prefetch = x.numel() * elt > kPrefetchInputBytes;
    const std::vector<A> widths = pool_widths<A>(g);
    // The band [oy0, oy1) (channels [c0, c1) in NCHW) of image n into tile.
    auto fill = [&](const T* xn, T* tile, int64_t oy0, int64_t oy1, int64_t c0, int64_t c1, T* row, A* acc) {
      if (!cl) {
        fill_tile_nchw<T, A>(xn, tile, plan, g, pooled, linear, epi, oy0, oy1, c0, c1, row, acc, widths.data());
        return;
      }
      if (!(fast_cl && fill_tile_cl_fast<T>(xn, tile, plan, groups, g, pooled, epi, oy0, oy1, prefetch)))
        fill_tile_cl<T, A>(xn, tile, plan, g, pooled, epi, oy0, oy1);
    };
    // out's rows [oy0, oy1) of image n = the GEMM of the band's tile (+ bias).
    auto gemm = [&](int64_t n, T* tile, int64_t oy0, int64_t oy1) {
      const int64_t np = (oy1 - oy0) * Wo, p0 = oy0 * Wo;
      if (!cl) {  // out[n][:, p0:p0 + np] (row stride P) = W [O, C] @ tile [C, np]
        at::Tensor o = at::from_blob(outp + n * O * P + p0, {O, np}, {P, 1}, options);
        const at::Tensor z = at::from_blob(tile, {C, np}, options);
        if (has_bias)
          at::addmm_out(o, b.view({O, 1}), w2, z);
        else
          at::mm_out(o, w2, z);
        return;
      }
      // out[n][p0:p0 + np, :] = tile [np, C] @ W^T [C, O]
      at::Tensor o = at::from_blob(outp + (n * P + p0) * O, {np, O}, options);
      const at::Tensor z = at::from_blob(tile, {np, C}, options);
      if (has_bias)
        at::addmm_out(o, b, z, w2.t());
      else
        at::mm_out(o, z, w2.t());
    };
    if (image_mode) {
      T* tile = thread_buffer<T>(kShiftTile, C * P);  // the caller's; shared with the workers by pointer
      for (int64_t n = 0; n < N; ++n) {
        const T* xn = xp + n * C * H * W;
        if (!cl) {
          at::parallel_for(0, C, std::max<int64_t>(1, kGrainElements / P), [&](int64_t c0, int64_t c1) {
            fill(xn, tile + c0 * P, 0, Ho, c0, c1, thread_buffer<T>(kShiftRow, W), thread_buffer<A>(kShiftAcc, Wo));
          });
        } else {
          at::parallel_for(0, Ho, 1, [&](int64_t y0, int64_t y1) {
            fill(xn, tile + y0 * Wo * C, y0, y1, 0, C, nullptr, nullptr);
          });
        }
        gemm(n, tile, 0, Ho);
      }
      return;
    }
    if (cl) {  // bands of the batch's rows [r0, r1): each image's part filled in turn, then one GEMM
      at::parallel_for(0, bands, 1, [&](int64_t begin, int64_t end) {
        T* tile = thread_buffer<T>(kShiftTile, rows * Wo * C);  // each worker's own
        for (int64_t item = begin; item < end; ++item) {
          const int64_t r0 = item * rows, r1 = std::min(span, r0 + rows);
          for (int64_t r = r0; r < r1;) {
            const int64_t n = r / Ho, oy0 = r % Ho, oy1 = std::min(Ho, oy0 + (r1 - r));
            fill(xp + n * C * H * W, tile + (r - r0) * Wo * C, oy0, oy1, 0, C, nullptr, nullptr);
            r += oy1 - oy0;
          }
          gemm(0, tile, r0, r1);  // image 0's rows r0.. run on into the next images: out is [N * Ho * Wo, O]
        }
      });
      return;
    }
    at::parallel_for(0, N * bands, 1, [&](int64_t begin, int64_t end) {
      T* tile = thread_buffer<T>(kShiftTile, rows * Wo * C);  // each worker's own
      T* row = thread_buffer<T>(kShiftRow, W);
      A* acc = thread_buffer<A>(kShiftAcc, Wo);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / bands, oy0 = (item % bands) * rows, oy1 = std::min(Ho, oy0 + rows);
        fill(xp + n * C * H * W, tile, oy0, oy1, 0, C, row, acc);
        gemm(n, tile, oy0, oy1);
      }
    });
  });
  return out;
}

// Quantized sparse/grouped shift: the integer shift of the stored integers, zero padding with the
// zero point, so the result equals the float shift quantized with the same scale and zero point.
at::Tensor shift_quantized_cpu(const at::Tensor& x_in, const at::Tensor& shifts, c10::string_view padding,
                               c10::string_view mode) {
  const char* op = "fxeff.shift";
  check_shift_args(op, x_in, shifts, true);
  const ShiftPadding pad = parse_shift_padding(op, padding);
  TORCH_CHECK_VALUE(parse_shift_mode(op, mode) != ShiftMode::Active, op,
                    ": mode \"active\" interpolates and needs floating point x, got quantized ", x_in.scalar_type(),
                    "; use mode \"sparse\" or \"grouped\" (integer shifts) or dequantize first");
  TORCH_CHECK_VALUE(x_in.qscheme() == at::kPerTensorAffine, op,
                    ": quantized x must be per-tensor affine, got qscheme ", toString(x_in.qscheme()));
  const ShiftPlan plan = make_plan(op, shifts, x_in.sizes().slice(2), pad, false);
  const at::Tensor repr = dense(at::int_repr(x_in));
  at::Tensor out = at::empty_like(repr);
  const int64_t zero_point = x_in.q_zero_point();
  if (repr.numel() > 0) {
    if (repr.scalar_type() == at::kByte)
      run_forward<uint8_t, float>(repr, out, plan, false, static_cast<uint8_t>(zero_point));
    else if (repr.scalar_type() == at::kChar)
      run_forward<int8_t, float>(repr, out, plan, false, static_cast<int8_t>(zero_point));
    else
      TORCH_CHECK_VALUE(false, op, ": quantized x must be quint8 or qint8, got ", x_in.scalar_type());
  }
  return at::_make_per_tensor_quantized_tensor(out, x_in.q_scale(), zero_point);
}

// The adjoint = the forward kernels run with negated taps and zero padding (same fast paths, either
// layout), plus the edge scatter of the other paddings.
at::Tensor shift_input_grad_cpu(const at::Tensor& grad_out, const at::Tensor& shifts, c10::string_view padding,
                                c10::string_view mode) {
  const char* op = "fxeff.shift_input_grad";
  check_shift_args(op, grad_out, shifts, false);
  const ShiftPadding pad = parse_shift_padding(op, padding);
  const bool linear = parse_shift_mode(op, mode) == ShiftMode::Active;
  const ShiftPlan plan = make_plan(op, shifts, grad_out.sizes().slice(2), pad, linear);
  const ShiftPlan gather = negated_zero_plan(plan);
  const at::Tensor g = dense(grad_out);
  at::Tensor gx = at::empty_like(g);
  if (g.numel() == 0) return gx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "fxeff_shift_input_grad", [&] {
    using A = at::opmath_type<scalar_t>;
    run_forward<scalar_t, A>(g, gx, gather, linear, scalar_t(0));
    if (pad != ShiftPadding::Zeros)
      adjoint_edges<scalar_t, A>(g.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), plan, g.size(0),
                                 is_channels_last(g));
  });
  return gx;
}

at::Tensor shift_shifts_grad_cpu(const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& shifts,
                                 c10::string_view padding) {
  const char* op = "fxeff.shift_shifts_grad";
  check_shift_args(op, x_in, shifts, false);
  TORCH_CHECK_VALUE(grad_out.sizes() == x_in.sizes() && grad_out.scalar_type() == x_in.scalar_type(), op,
                    ": grad_out must have x's shape and dtype ", x_in.sizes(), " ", x_in.scalar_type(), ", got ",
                    grad_out.sizes(), " ", grad_out.scalar_type());
  const ShiftPlan plan = make_plan(op, shifts, x_in.sizes().slice(2), parse_shift_padding(op, padding), true);
  const at::Tensor x = dense(x_in);
  const bool cl = is_channels_last(x);
  const at::Tensor g = grad_out.contiguous(cl ? channels_last_format(x) : at::MemoryFormat::Contiguous);
  at::Tensor grad = at::zeros({shifts.size(0), shifts.size(1)}, shifts.options().dtype(at::kDouble));
  if (g.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "fxeff_shift_shifts_grad", [&] {
      using A = at::opmath_type<scalar_t>;
      if (cl)
        shifts_grad_channels_last<scalar_t, A>(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), plan, g.size(0),
                                               grad.data_ptr<double>());
      else
        shifts_grad_nchw<scalar_t, A>(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), plan, g.size(0),
                                      grad.data_ptr<double>());
    });
  }
  return grad.to(shifts.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fxeff, CPU, m) {
  m.impl("shift", &shift_cpu);
  m.impl("shift_pool", &shift_pool_cpu);
  m.impl("shift_conv1x1", &shift_conv1x1_cpu);
  m.impl("shift_input_grad", &shift_input_grad_cpu);
  m.impl("shift_shifts_grad", &shift_shifts_grad_cpu);
}

TORCH_LIBRARY_IMPL(fxeff, QuantizedCPU, m) {
  m.impl("shift", &shift_quantized_cpu);
}

}  // namespace ops
}  // namespace fxeff
