// CPU kernels of fxeff::shift: forward (float and quantized), input gradient (adjoint) and shift gradient.
//
// Every input is viewed as [N, C, D, H, W] (leading spatial dims are 1 for shift1d/2d), NCDHW or
// channels-last (N, D, H, W, C). A shift is separable: per channel and dim it is a sum of 1-D "taps"
// out[i] += w * x[map(i - t)] (see ShiftPlan), so each output row is a few shifted input rows:
// memcpy in the interior, a lookup table at the edges. Shift gradients reduce per channel in a fixed
// order (one thread owns a channel), so they are bitwise identical at any thread count.
#include "../shift.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/_make_per_tensor_quantized_tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/int_repr.h>
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
#else
bool cpu_has_avx2_fma() { return false; }
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
  std::vector<int64_t> t, lo, hi;  // [c][d][k]; [lo, hi): the interior, where map(i - t) == i - t
  std::vector<double> w;
  std::vector<int32_t> src[kDims];  // [c][k][i] = map(i - t), -1 for zero padding

  int64_t at(int64_t c, int d, int k) const { return (c * kDims + d) * kMaxTaps + k; }
  const int32_t* table(int64_t c, int d, int k) const {
    return src[d].data() + (c * ntaps[d] + k) * size[d];
  }
};

ShiftPlan make_plan(const char* op, const at::Tensor& shifts, at::IntArrayRef spatial, ShiftPadding padding,
                    bool linear) {
  ShiftPlan p;
  const at::Tensor s = shifts.to(at::kDouble).contiguous();
  const double* sp = s.data_ptr<double>();
  const int dims = static_cast<int>(spatial.size());
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
      const int64_t n = p.size[d];
      for (int k = 0; k < p.ntaps[d]; ++k) {
        const int64_t i = p.at(c, d, k), tk = taps[k];
        p.t[i] = tk;
        p.w[i] = d >= p.first_dim ? weights[k] : (k == 0 ? 1.0 : 0.0);
        p.lo[i] = std::min(std::max<int64_t>(tk, 0), n);
        p.hi[i] = std::max(std::min(n + tk, n), p.lo[i]);
        int32_t* tab = p.src[d].data() + (c * p.ntaps[d] + k) * n;
        for (int64_t j = 0; j < n; ++j) tab[j] = static_cast<int32_t>(map_shift_index(j - tk, n, padding));
      }
    }
  }
  return p;
}

int64_t grain_for(int64_t work_per_item) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, work_per_item)); }

// ------------------------------------------------------------------ 1-D row primitives

// The adjoint of one 1-D tap: acc[map(i - t)] += coef * g[i].
template <typename T, typename A>
void scatter_row(A* acc, const T* g, A coef, int64_t n, int64_t t, int64_t lo, int64_t hi, const int32_t* tab) {
  for (int64_t i = 0; i < lo; ++i)
    if (tab[i] >= 0) acc[tab[i]] += coef * static_cast<A>(g[i]);
  A* a = acc - t;
  for (int64_t i = lo; i < hi; ++i) a[i] += coef * static_cast<A>(g[i]);
  for (int64_t i = hi; i < n; ++i)
    if (tab[i] >= 0) acc[tab[i]] += coef * static_cast<A>(g[i]);
}

// sum_i g[i] * row[map(i - t)], with independent partial sums so the interior vectorises.
template <typename T, typename A>
A dot_row(const T* g, const T* row, int64_t n, int64_t t, int64_t lo, int64_t hi, const int32_t* tab) {
  A edge = 0;
  for (int64_t i = 0; i < lo; ++i)
    if (tab[i] >= 0) edge += static_cast<A>(g[i]) * static_cast<A>(row[tab[i]]);
  for (int64_t i = hi; i < n; ++i)
    if (tab[i] >= 0) edge += static_cast<A>(g[i]) * static_cast<A>(row[tab[i]]);
  constexpr int kLanes = 8;
  A part[kLanes] = {};
  const T* r = row - t;
  int64_t i = lo;
  for (; i + kLanes <= hi; i += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += static_cast<A>(g[i + l]) * static_cast<A>(r[i + l]);
  for (; i < hi; ++i) part[0] += static_cast<A>(g[i]) * static_cast<A>(r[i]);
  A total = edge;
  for (int l = 0; l < kLanes; ++l) total += part[l];
  return total;
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
template <typename T, typename A>
void forward_nchw(const T* x, T* out, const ShiftPlan& p, int64_t N, bool linear, T fill) {
  const int64_t C = p.C, H = p.size[1], W = p.size[2], hw = H * W, plane = p.size[0] * hw;
  constexpr int64_t kChunk = 512;
  at::parallel_for(0, N * C, grain_for(plane), [&](int64_t begin, int64_t end) {
    A acc[kChunk];
    SliceTerm terms[8];
    for (int64_t q = begin; q < end; ++q) {
      const int64_t c = q % C;
      const T* xp = x + q * plane;
      for (int64_t z = 0; z < p.size[0]; ++z) {
        T* oz = out + q * plane + z * hw;
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
            for (int64_t b = k0; b < k1; b += kChunk) {
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
        for (int64_t y = 0; y < H; ++y) {
          T* orow = oz + y * W;
          if (y < ylo || y >= yhi) {
            slice_row_lookup<T, A>(orow, xp, p, c, y, 0, W, terms, nterms, linear, fill);
          } else {
            slice_row_lookup<T, A>(orow, xp, p, c, y, 0, xlo, terms, nterms, linear, fill);
            slice_row_lookup<T, A>(orow, xp, p, c, y, xhi, W, terms, nterms, linear, fill);
          }
        }
      }
    }
  });
}

// Channels-last (N, D, H, W, C). Each output row (n, z, y) is W pixels of C channels; every channel
// reads its own shifted source. In the interior (all sources in range) a term is a constant element
// offset per channel, so consecutive channels with the same offset copy as one run.
template <typename T, typename A>
void forward_channels_last(const T* x, T* out, const ShiftPlan& p, int64_t N, bool linear, T fill) {
  const int64_t C = p.C, D = p.size[0], H = p.size[1], W = p.size[2];
  const int64_t row_len = W * C, image = D * H * row_len;
  const int nrow = p.ntaps[0] * p.ntaps[1], nx = p.ntaps[2], nterm = nrow * nx;
  at::parallel_for(0, N * D * H, grain_for(row_len), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> roff(nrow * C), delta(nterm * C);
    std::vector<A> rweight(nrow * C), coef(nterm * C), acc(C);
    std::vector<int64_t> run_start, run_delta;
    // 32-bit offsets for the hardware gathers (4-byte elements in images of < 2^31 elements).
    constexpr bool kFour = sizeof(T) == 4;
    const bool use_gather = kFour && cpu_has_avx2_fma() && image < (int64_t(1) << 31);
    std::vector<int32_t> delta32(use_gather ? nterm * C : 0);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / (D * H), zy = r % (D * H), z = zy / H, y = zy % H;
      const T* xi = x + n * image;
      T* orow = out + r * row_len;
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
      if (use_gather)
        for (int64_t j = 0; j < nterm * C; ++j) delta32[j] = static_cast<int32_t>(delta[j]);
      if (!linear && xhi > xlo) {  // runs of consecutive channels with the same offset
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

template <typename T, typename A>
void adjoint_nchw(const T* g, T* gx, const ShiftPlan& p, int64_t N) {
  const int64_t C = p.C, H = p.size[1], W = p.size[2], plane = p.size[0] * H * W;
  constexpr bool kDirect = std::is_same<T, A>::value;
  at::parallel_for(0, N * C, grain_for(plane), [&](int64_t begin, int64_t end) {
    std::vector<A> buffer(kDirect ? 0 : plane);
    RowTerm terms[4];
    for (int64_t q = begin; q < end; ++q) {
      const int64_t c = q % C;
      A* acc = kDirect ? reinterpret_cast<A*>(gx + q * plane) : buffer.data();
      std::fill(acc, acc + plane, A(0));
      const T* gp = g + q * plane;
      for (int64_t z = 0; z < p.size[0]; ++z) {
        for (int64_t y = 0; y < H; ++y) {
          const T* grow = gp + (z * H + y) * W;
          const int nterms = row_terms(p, c, z, y, terms, false);
          for (int r = 0; r < nterms; ++r) {
            for (int kx = 0; kx < p.ntaps[2]; ++kx) {
              const int64_t i = p.at(c, 2, kx);
              const double coef = terms[r].weight * p.w[i];
              if (coef == 0) continue;
              scatter_row(acc + terms[r].offset, grow, static_cast<A>(coef), W, p.t[i], p.lo[i], p.hi[i],
                          p.table(c, 2, kx));
            }
          }
        }
      }
      if (!kDirect) {
        T* out = gx + q * plane;
        for (int64_t j = 0; j < plane; ++j) out[j] = static_cast<T>(acc[j]);
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
              for (int kx = 0; kx < p.ntaps[2]; ++kx) {
                const int64_t i = p.at(c, 2, kx);
                const double wx = p.w[i], sx = kx == 0 ? -1.0 : 1.0;
                const double cz = p.first_dim <= 0 ? sz * wy * wx : 0.0;
                const double cy = p.first_dim <= 1 ? wz * sy * wx : 0.0;
                const double cx = wz * wy * sx;
                if (cz == 0 && cy == 0 && cx == 0) continue;
                const double dot = static_cast<double>(dot_row<T, A>(grow, xp + terms[r].offset, W, p.t[i], p.lo[i],
                                                                     p.hi[i], p.table(c, 2, kx)));
                acc[0] += cz * dot;
                acc[1] += cy * dot;
                acc[2] += cx * dot;
              }
            }
          }
        }
      }
      for (int d = 0; d < dims; ++d) grad[c * dims + d] = -acc[p.first_dim + d];  // d/ds = -d/dp
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

// The gradients run on NCDHW; channels-last inputs are converted and the result converted back.
at::Tensor shift_input_grad_cpu(const at::Tensor& grad_out, const at::Tensor& shifts, c10::string_view padding,
                                c10::string_view mode) {
  const char* op = "fxeff.shift_input_grad";
  check_shift_args(op, grad_out, shifts, false);
  const ShiftPadding pad = parse_shift_padding(op, padding);
  const bool linear = parse_shift_mode(op, mode) == ShiftMode::Active;
  const ShiftPlan plan = make_plan(op, shifts, grad_out.sizes().slice(2), pad, linear);
  const at::Tensor g = grad_out.contiguous();
  at::Tensor gx = at::empty_like(g);
  if (g.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "fxeff_shift_input_grad", [&] {
      adjoint_nchw<scalar_t, at::opmath_type<scalar_t>>(g.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), plan,
                                                        g.size(0));
    });
  }
  return is_channels_last(grad_out) ? gx.contiguous(channels_last_format(grad_out)) : gx;
}

at::Tensor shift_shifts_grad_cpu(const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& shifts,
                                 c10::string_view padding) {
  const char* op = "fxeff.shift_shifts_grad";
  check_shift_args(op, x_in, shifts, false);
  TORCH_CHECK_VALUE(grad_out.sizes() == x_in.sizes() && grad_out.scalar_type() == x_in.scalar_type(), op,
                    ": grad_out must have x's shape and dtype ", x_in.sizes(), " ", x_in.scalar_type(), ", got ",
                    grad_out.sizes(), " ", grad_out.scalar_type());
  const ShiftPlan plan = make_plan(op, shifts, x_in.sizes().slice(2), parse_shift_padding(op, padding), true);
  const at::Tensor g = grad_out.contiguous(), x = x_in.contiguous();
  at::Tensor grad = at::zeros({shifts.size(0), shifts.size(1)}, shifts.options().dtype(at::kDouble));
  if (g.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "fxeff_shift_shifts_grad", [&] {
      shifts_grad_nchw<scalar_t, at::opmath_type<scalar_t>>(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), plan,
                                                            g.size(0), grad.data_ptr<double>());
    });
  }
  return grad.to(shifts.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fxeff, CPU, m) {
  m.impl("shift", &shift_cpu);
  m.impl("shift_input_grad", &shift_input_grad_cpu);
  m.impl("shift_shifts_grad", &shift_shifts_grad_cpu);
}

TORCH_LIBRARY_IMPL(fxeff, QuantizedCPU, m) {
  m.impl("shift", &shift_quantized_cpu);
}

}  // namespace ops
}  // namespace fxeff
