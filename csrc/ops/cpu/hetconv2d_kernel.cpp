// CPU kernel of fxeff::hetconv2d: F.conv2d (groups=1) with the HetConv-masked kernel. Two strategies (the profiler
// records "fxeff::hetconv2d::<strategy>"; _hetconv2d_set_strategy forces one):
//
// gemm - at the HetConv MAC count exactly:
//   out = Wc @ x_centre  +  for each block b: Wk_b @ im2col_b(x)   (+ bias)
//   Wc [N, M] is the whole centre-tap matrix (weight_1x1 on the other blocks' channels, weight_kxk's centre tap on
//   the own block): one dense GEMM over all M channels. x_centre is the input sampled at every output's centre tap;
//   for stride 1 and padding = dilation * (K / 2) it is x itself (no copy). Wk_b [N/P, M/P * (K*K - 1)] holds block
//   b's KxK taps other than the centre; im2col_b gathers those taps of block b's M/P channels only. MACs:
//   N * Ho * Wo * (M + M/P * (K*K - 1)).
//     NCHW:          per (image, chunk of output rows): out_chunk = bias + Wc @ x_chunk, then per block the chunk's
//                    im2col (in cache) and out_chunk[block rows] += Wk_b @ cols (GEMMs write into out's views).
//     channels_last: pixels as rows: out [B*Ho*Wo, N] = x_centre [.., M] @ Wc^T + bias for the whole batch in one
//                    GEMM, then per chunk of pixels one gather of every block's off-centre taps and per block
//                    out[chunk, block cols] += cols_b @ Wk_b^T.
//   Chunks are handed out one at a time to the pool's threads (a thread the OS delays does not hold the others up);
//   the GEMMs inside a chunk run single-threaded.
// grouped - the vendor grouped KxK conv (groups = P) + the 1x1 part as one in-place GEMM (see run_grouped).
// direct  - float32, AVX-512. NCHW (stride 1): the 1x1 part as in gemm, the off-centre taps by a register-blocked
//           direct convolution over a zero-padded tile of the block's input rows (see run_direct). channels_last
//           (any stride, AVX-512VL): the whole HetConv in one register-blocked pass with output channels as vector
//           lanes, from padded bands of the input (see run_direct_cl).
//
// The per-block GEMMs of "gemm" have only N/P rows, where BLAS runs at about half its speed; the vendor grouped
// conv runs the same work much faster, so "grouped" wins except where re-reading a large NCHW output costs more
// (use_grouped).
#include "../hetconv2d.h"
#include "thread_buffer.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/record_function.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FXEFF_HETCONV_X86 1
#endif

namespace fxeff {
namespace ops {
namespace {

// Forced strategy (0 auto, 1 gemm, 2 grouped, 3 direct, 4 direct_cl: NCHW through the channels-last direct kernel)
// and pixels per chunk (0 = the kernel's pick): tests and benchmarks.
std::atomic<int> forced_strategy{0};
std::atomic<int64_t> forced_chunk{0};
const char* const kStrategies[] = {"auto", "gemm", "grouped", "direct", "direct_cl"};
constexpr int kNumStrategies = 5;

std::string set_strategy(c10::string_view strategy, int64_t chunk) {
  int index = -1;
  for (int i = 0; i < kNumStrategies; ++i) {
    if (strategy == kStrategies[i]) index = i;
  }
  TORCH_CHECK_VALUE(index >= 0, "fxeff._hetconv2d_set_strategy: strategy must be one of auto, gemm, grouped, direct, "
                    "direct_cl, got \"", strategy, "\"");
  TORCH_CHECK_VALUE(chunk >= 0, "fxeff._hetconv2d_set_strategy: chunk must be >= 0 (0 = auto), got ", chunk);
  forced_chunk.store(chunk);
  return kStrategies[forced_strategy.exchange(index)];
}

// Pixels per chunk: 1024 (measured: wider chunks are faster up to ~1024 pixels whatever the im2col's size, the
// GEMM width matters more than keeping the chunk's im2col in L2), fewer when needed to give every thread
// about 4 chunks, at least 32.
int64_t pick_chunk(int64_t total_pixels) {
  const int64_t forced = forced_chunk.load();
  if (forced > 0) return forced;
  int64_t chunk = 1024;
  const int64_t threads = at::get_num_threads();
  const int64_t want = threads > 1 ? 4 * threads : 1;
  if (total_pixels / chunk < want) chunk = std::max<int64_t>(32, total_pixels / want);
  return std::max<int64_t>(1, std::min(chunk, total_pixels));
}

// Wc [O, M]: weight_1x1 at the other blocks' channels, weight_kxk's centre tap at the own block (or zero there:
// the "grouped" strategy's Wc0).
template <typename T>
void fill_centre_matrix(const T* wk, const T* w1, T* wc, const HetGeometry& g, bool with_own_block) {
  const int64_t kk = g.k * g.k, c = g.centre_tap(), rest = g.m - g.mb;
  for (int64_t j = 0; j < g.o; ++j) {
    const int64_t b = j / g.ob;
    T* row = wc + j * g.m;
    const T* r1 = w1 + j * rest;
    std::copy(r1, r1 + b * g.mb, row);
    for (int64_t i = 0; i < g.mb; ++i) row[b * g.mb + i] = with_own_block ? wk[(j * g.mb + i) * kk + c] : T(0);
    std::copy(r1 + b * g.mb, r1 + rest, row + (b + 1) * g.mb);
  }
}

// The off-centre taps as [O, M/P * taps]: columns (channel, tap) for NCHW (tap_major false) or (tap, channel) for
// channels_last (tap_major true), matching the gathers below.
template <typename T>
void fill_offcentre_matrix(const T* wk, T* wo, const HetGeometry& g, bool tap_major) {
  const int64_t kk = g.k * g.k, taps = g.taps();
  for (int64_t j = 0; j < g.o; ++j) {
    for (int64_t i = 0; i < g.mb; ++i) {
      const T* src = wk + (j * g.mb + i) * kk;
      for (int64_t t = 0; t < taps; ++t) {
        const int64_t q = g.kernel_tap(t);
        wo[j * g.mb * taps + (tap_major ? t * g.mb + i : i * taps + t)] = src[q];
      }
    }
  }
}

// Output columns [lo, hi) whose tap at kernel column kx reads inside the input (the rest read padding).
struct ColRange {
  int64_t lo, hi, off;  // input column of output column xo: xo * sw + off
};

ColRange valid_cols(int64_t kx, int64_t dil, int64_t pad, int64_t stride, int64_t in, int64_t out) {
  const int64_t off = kx * dil - pad;
  int64_t lo = off >= 0 ? 0 : (-off + stride - 1) / stride;
  int64_t hi = in - 1 - off >= 0 ? std::min(out, (in - 1 - off) / stride + 1) : 0;
  lo = std::min(lo, out);
  hi = std::max(hi, lo);
  return {lo, hi, off};
}

// im2col of block b's off-centre taps for output rows [y0, y1) of image n (NCHW x): cols [mb * taps, np], row
// (channel, tap), np = (y1 - y0) * wo.
template <typename T>
void gather_block_nchw(const T* x, T* cols, const HetGeometry& g, const std::vector<ColRange>& cr, int64_t n,
                       int64_t b, int64_t y0, int64_t y1) {
  const int64_t taps = g.taps(), np = (y1 - y0) * g.wo;
  for (int64_t i = 0; i < g.mb; ++i) {
    const T* plane = x + ((n * g.m) + b * g.mb + i) * g.h * g.w;
    for (int64_t t = 0; t < taps; ++t) {
      const int64_t q = g.kernel_tap(t), ky = q / g.k;
      const ColRange& r = cr[q % g.k];
      T* dst = cols + (i * taps + t) * np;
      for (int64_t y = y0; y < y1; ++y, dst += g.wo) {
        const int64_t iy = y * g.sh - g.ph + ky * g.dh;
        if (iy < 0 || iy >= g.h) {
          std::fill_n(dst, g.wo, T(0));
          continue;
        }
        const T* src = plane + iy * g.w + r.off;
        std::fill_n(dst, r.lo, T(0));
        if (g.sw == 1) {
          std::memcpy(dst + r.lo, src + r.lo, (r.hi - r.lo) * sizeof(T));
        } else {
          for (int64_t xo = r.lo; xo < r.hi; ++xo) dst[xo] = src[xo * g.sw];
        }
        std::fill_n(dst + r.hi, g.wo - r.hi, T(0));
      }
    }
  }
}

// The "grouped" strategy: the vendor grouped KxK conv (groups = P, centre taps included, bias) writes out, then
// out += Wc0 @ x_centre in place, Wc0 = weight_1x1 scattered with the block diagonal zero. N * M/P more MACs than the
// HetConv count (the zeros), but the vendor's grouped conv runs the small per-block products far better than
// BLAS does at these shapes (measured), and no im2col is materialised.
at::Tensor run_grouped(const at::Tensor& x, const at::Tensor& xc, const at::Tensor& wk, const at::Tensor& wc0,
                       const c10::optional<at::Tensor>& bias, const HetGeometry& g, at::MemoryFormat fmt,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const std::array<int64_t, 2> no_output_padding{0, 0};
  at::Tensor out = at::convolution(x, cl ? wk.contiguous(fmt) : wk, bias, stride, padding, dilation, false,
                                   no_output_padding, g.part).contiguous(fmt);
  const int64_t hw = g.ho * g.wo;
  if (cl) {
    at::Tensor out2 = out.permute({0, 2, 3, 1}).view({g.n * hw, g.o});
    at::addmm_out(out2, out2, xc.permute({0, 2, 3, 1}).reshape({g.n * hw, g.m}), wc0.t());
  } else {
    at::Tensor out3 = out.view({g.n, g.o, hw});
    const at::Tensor xc3 = xc.view({g.n, g.m, hw});
    for (int64_t n = 0; n < g.n; ++n) {
      at::Tensor o = out3.select(0, n);
      at::addmm_out(o, o, wc0, xc3.select(0, n));
    }
  }
  return out;
}


// ---- direct: float32 NCHW stride 1 (AVX-512). The 1x1 part as in "gemm" (one GEMM per chunk into out), the
// off-centre taps as a direct convolution from a zero-padded copy of the block's input rows (no im2col, no BLAS
// packing): 8 filters x 48 pixels of accumulators in registers, one broadcast weight and 3 input loads per
// (channel, tap). BLAS runs the per-block products of "gemm" at about half speed because their N/P rows give each
// packed input element only N/P uses; here each loaded input vector feeds 8 FMAs straight from the tile.
#ifdef FXEFF_HETCONV_X86
bool cpu_has_avx512f() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

bool cpu_has_avx512vl() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  return has;
}

// out rows [OT] (row stride ostride) at pixels [x0, x0 + 48) of one output row += the taps over the tile.
// tile: [mb][rows][tstride]; row0 points at the tile row of this output row's first tap row; w: [(c, tap), OT].
template <int OT>
__attribute__((target("avx512f"))) void direct_block48(float* out, int64_t ostride, const float* tile, int64_t cstride,
                                                       const int64_t* tap_offset, int64_t taps, int64_t mb,
                                                       const float* w, int64_t count) {
  const __mmask16 m0 = count >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << count) - 1);
  const __mmask16 m1 = count >= 32 ? 0xFFFF : count <= 16 ? 0 : static_cast<__mmask16>((1u << (count - 16)) - 1);
  const __mmask16 m2 = count >= 48 ? 0xFFFF : count <= 32 ? 0 : static_cast<__mmask16>((1u << (count - 32)) - 1);
  __m512 acc[OT][3];
  for (int o = 0; o < OT; ++o) {
    acc[o][0] = _mm512_maskz_loadu_ps(m0, out + o * ostride);
    acc[o][1] = _mm512_maskz_loadu_ps(m1, out + o * ostride + 16);
    acc[o][2] = _mm512_maskz_loadu_ps(m2, out + o * ostride + 32);
  }
  for (int64_t c = 0; c < mb; ++c) {
    const float* tc = tile + c * cstride;
    for (int64_t t = 0; t < taps; ++t, w += OT) {
      const float* src = tc + tap_offset[t];
      const __m512 a = _mm512_loadu_ps(src), b = _mm512_loadu_ps(src + 16), d = _mm512_loadu_ps(src + 32);
      for (int o = 0; o < OT; ++o) {
        const __m512 wv = _mm512_set1_ps(w[o]);
        acc[o][0] = _mm512_fmadd_ps(wv, a, acc[o][0]);
        acc[o][1] = _mm512_fmadd_ps(wv, b, acc[o][1]);
        acc[o][2] = _mm512_fmadd_ps(wv, d, acc[o][2]);
      }
    }
  }
  for (int o = 0; o < OT; ++o) {
    _mm512_mask_storeu_ps(out + o * ostride, m0, acc[o][0]);
    _mm512_mask_storeu_ps(out + o * ostride + 16, m1, acc[o][1]);
    _mm512_mask_storeu_ps(out + o * ostride + 32, m2, acc[o][2]);
  }
}
#else
bool cpu_has_avx512f() { return false; }
bool cpu_has_avx512vl() { return false; }
#endif

// The 1x1 part of every filter for pixels [p0, p0 + np) of image n, one GEMM into the NCHW output
// ([N, O, H*W] view): out = wc @ x_centre (+ bias).
void centre_gemm(const at::Tensor& out2, const at::Tensor& xc2, const at::Tensor& wc,
                 const c10::optional<at::Tensor>& bias_col, int64_t n, int64_t p0, int64_t np) {
  at::Tensor o = out2.select(0, n).narrow(1, p0, np);
  const at::Tensor xv = xc2.select(0, n).narrow(1, p0, np);
  if (bias_col.has_value()) {
    at::addmm_out(o, *bias_col, wc, xv);
  } else {
    at::mm_out(o, wc, xv);
  }
}

// NCHW: stride 1 (AVX-512F); channels_last: any stride (AVX-512F and VL).
bool direct_possible(const HetGeometry& g, bool cl, at::ScalarType dtype) {
  if (dtype != at::kFloat || g.k == 1) return false;
  return cl ? cpu_has_avx512vl() : cpu_has_avx512f() && g.sh == 1 && g.sw == 1;
}

#ifdef FXEFF_HETCONV_X86
// Off-centre weights for the direct kernel: per block, tiles of OT filters as [(c, tap), OT]; then single filters.
std::vector<float> direct_weights(const float* wk, const HetGeometry& g) {
  const int64_t kk = g.k * g.k, taps = g.taps();
  std::vector<float> out(static_cast<size_t>(g.o * g.mb * taps));
  for (int64_t b = 0; b < g.part; ++b) {
    float* dst = out.data() + b * g.ob * g.mb * taps;
    for (int64_t j0 = 0; j0 < g.ob;) {
      const int64_t ot = g.ob - j0 >= 8 ? 8 : 1;
      for (int64_t c = 0; c < g.mb; ++c) {
        for (int64_t t = 0; t < taps; ++t) {
          const int64_t q = g.kernel_tap(t);
          for (int64_t o = 0; o < ot; ++o) {
            dst[j0 * g.mb * taps + (c * taps + t) * ot + o] = wk[((b * g.ob + j0 + o) * g.mb + c) * kk + q];
          }
        }
      }
      j0 += ot;
    }
  }
  return out;
}

void run_direct(const at::Tensor& x, const at::Tensor& xc, const at::Tensor& wc, const std::vector<float>& wd,
                const c10::optional<at::Tensor>& bias_col, at::Tensor& out, const HetGeometry& g) {
  const int64_t taps = g.taps(), hw = g.ho * g.wo;
  // Tile of one block: mb channels x (rows + dilated kernel - 1) rows x tstride columns, zero outside the image;
  // rows per chunk such that the tile stays in L2 (~256 KiB) while every filter of the block reads it.
  const int64_t span_w = g.dw * (g.k - 1), span_h = g.dh * (g.k - 1);
  const int64_t tstride = (g.wo + 47) / 48 * 48 + span_w + 16;
  const int64_t l2_rows = (256 << 10) / (4 * g.mb * tstride) - span_h;
  const int64_t rows_per_chunk = std::max<int64_t>(
      1, std::min({g.ho, l2_rows, (pick_chunk(g.n * hw) + g.wo / 2) / g.wo}));
  const int64_t chunks_per_image = (g.ho + rows_per_chunk - 1) / rows_per_chunk, items = g.n * chunks_per_image;
  const int64_t trows = rows_per_chunk + span_h;
  const int64_t cstride = trows * tstride;
  std::vector<int64_t> tap_offset(taps);
  for (int64_t t = 0; t < taps; ++t) {
    const int64_t q = g.kernel_tap(t);
    tap_offset[t] = (q / g.k) * g.dh * tstride + (q % g.k) * g.dw;
  }
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), items);
  const at::Tensor out2 = out.view({g.n, g.o, hw}), xc2 = xc.view({g.n, g.m, hw});
  const float* xp = x.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    at::AutoDispatchBelowADInplaceOrView guard;
    // Each worker's own tile (allocated here, not indexed by thread number: called inside an outer parallel
    // region, this runs inline on a thread whose number may exceed the pool size asked for here).
    std::vector<float> tile(static_cast<size_t>(g.mb * cstride), 0.f);
    for (int64_t item = next++; item < items; item = next++) {
      const int64_t n = item / chunks_per_image, y0 = (item % chunks_per_image) * rows_per_chunk;
      const int64_t y1 = std::min(g.ho, y0 + rows_per_chunk), np = (y1 - y0) * g.wo;
      centre_gemm(out2, xc2, wc, bias_col, n, y0 * g.wo, np);
      const int64_t nrows = y1 - y0 + span_h;
      for (int64_t b = 0; b < g.part; ++b) {
        // Tile rows r <-> input row y0 - ph + r; columns j <-> input column j - pw (zeros outside; the zero
        // columns past the image stay zero from the first assign because every row writes the same columns).
        for (int64_t c = 0; c < g.mb; ++c) {
          const float* plane = xp + ((n * g.m) + b * g.mb + c) * g.h * g.w;
          float* tc = tile.data() + c * cstride;
          for (int64_t r = 0; r < nrows; ++r) {
            float* trow = tc + r * tstride;
            const int64_t iy = y0 - g.ph + r;
            if (iy < 0 || iy >= g.h) {
              std::fill_n(trow, tstride, 0.f);
              continue;
            }
            const int64_t lo = std::min<int64_t>(g.pw, tstride), cols = std::min<int64_t>(g.w, tstride - lo);
            std::fill_n(trow, lo, 0.f);
            std::memcpy(trow + lo, plane + iy * g.w, cols * sizeof(float));
            std::fill_n(trow + lo + cols, tstride - lo - cols, 0.f);
          }
        }
        const float* wb = wd.data() + b * g.ob * g.mb * taps;
        for (int64_t j0 = 0; j0 < g.ob;) {
          const int64_t ot = g.ob - j0 >= 8 ? 8 : 1;
          const float* w = wb + j0 * g.mb * taps;
          for (int64_t y = y0; y < y1; ++y) {
            float* orow = op + ((n * g.o + b * g.ob + j0) * g.ho + y) * g.wo;
            const float* trow = tile.data() + (y - y0) * tstride;
            for (int64_t x0 = 0; x0 < g.wo; x0 += 48) {
              const int64_t count = std::min<int64_t>(48, g.wo - x0);
              if (ot == 8) {
                direct_block48<8>(orow + x0, hw, trow + x0, cstride, tap_offset.data(), taps, g.mb, w, count);
              } else {
                direct_block48<1>(orow + x0, hw, trow + x0, cstride, tap_offset.data(), taps, g.mb, w, count);
              }
            }
          }
          j0 += ot;
        }
      }
    }
  });
}

// ---- direct, channels_last (float32, AVX-512; any stride / padding / dilation): the whole HetConv, the 1x1 part
// included, as one register-blocked direct convolution with output channels as vector lanes, from a zero-padded
// copy of the input (no bounds checks, no im2col, no BLAS packing, the output written once). A vector holds 16 / G
// filters of each of G blocks (G = 1 with >= 16 filters per block, 4 with >= 4, 8 with >= 2, else 16; halved while
// above P: 2 for P = 2): the padded copy stores each pixel's channels as (group of G blocks, channel in block, block
// in group), so a broadcast of G consecutive values gives every lane its own block's input at an off-centre tap; the
// centre tap (every filter reads every channel there) broadcasts one value to all lanes. Missing blocks and filters
// are zero lanes; the lanes go back to channel order when stored. Per vector and pixel: taps * M/P + M multiply-adds,
// the HetConv count.
// Why: the vendor grouped conv and the per-block GEMMs both run blocks of 4-16 channels at a fraction of their dense
// speed (issue 17's profile: the grouped conv took 0.58 of the dense layers' time for 0.25 of their KxK MACs).
struct ClDirect {
  int64_t lanes_g;  // G: blocks per vector
  int64_t per;      // filters of each block per vector: 16 / G
  int64_t groups;   // groups of G blocks: ceil(P / G)
  int64_t jvs;      // vectors per group: ceil(ob / per)
  int64_t cx;       // channels per pixel of the padded copy: groups * mb * G
  int64_t hp, wp;   // padded size
  int64_t wblock;   // floats of one vector's weights: (taps * mb + cx) * 16
};

ClDirect plan_cl_direct(const HetGeometry& g) {
  ClDirect p;
  // (G = 2 for 8-15 filters per block, a 64-bit broadcast: measured slower than G = 4 at 32ch@32x32 P4, 0.54 vs
  // 0.44 of dense's time, more loads per multiply-add.)
  p.lanes_g = g.ob >= 16 ? 1 : g.ob >= 4 ? 4 : g.ob >= 2 ? 8 : 16;
  // No more blocks per vector than there are blocks: with P = 2 and 8 filters per block (ResNet-20's 16-channel
  // layers), G = 4 left half of every vector's lanes empty; G = 2 (a 64-bit broadcast) fills them.
  while (p.lanes_g > 1 && p.lanes_g > g.part) p.lanes_g /= 2;
  p.per = 16 / p.lanes_g;
  p.groups = (g.part + p.lanes_g - 1) / p.lanes_g;
  p.jvs = (g.ob + p.per - 1) / p.per;
  p.cx = p.groups * g.mb * p.lanes_g;
  p.hp = g.h + 2 * g.ph;
  p.wp = g.w + 2 * g.pw;
  p.wblock = (g.taps() * g.mb + p.cx) * 16;
  return p;
}

// Per (group, vector): the off-centre taps as [tap][channel in block][16 lanes], then the centre tap as [channel of
// the padded copy][16 lanes]; lane = filter * G + block in group. Zero lanes for missing blocks / filters. Also
// the bias per (group, vector) as 16 lanes.
void cl_direct_weights(const float* wk, const float* w1, const float* bias, const HetGeometry& g, const ClDirect& p,
                       std::vector<float>& wd, std::vector<float>& bd) {
  const int64_t kk = g.k * g.k, c0 = g.centre_tap(), taps = g.taps(), G = p.lanes_g, rest = g.m - g.mb;
  wd.assign(static_cast<size_t>(p.groups * p.jvs * p.wblock), 0.f);
  bd.assign(static_cast<size_t>(p.groups * p.jvs * 16), 0.f);
  // Written row by row (16 lanes at a time), the vectors' blocks shared among the threads. (Filter by filter, or
  // lane by lane within a block, measured up to 2x slower.)
  at::parallel_for(0, p.groups * p.jvs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t v = begin; v < end; ++v) {
      const int64_t gi = v / p.jvs, jv = v % p.jvs;
      const float* src[16];  // each lane's weight_kxk filter (nullptr: a zero lane)
      const float* r1[16];   // its weight_1x1 row
      int64_t blk[16];
      float* dst = wd.data() + v * p.wblock;
      for (int64_t lane = 0; lane < 16; ++lane) {
        const int64_t b = gi * G + lane % G, j = jv * p.per + lane / G, filter = b * g.ob + j;
        const bool real = b < g.part && j < g.ob;
        src[lane] = real ? wk + filter * g.mb * kk : nullptr;
        r1[lane] = real ? w1 + filter * rest : nullptr;
        blk[lane] = b;
        if (real && bias != nullptr) bd[v * 16 + lane] = bias[filter];
      }
      for (int64_t t = 0; t < taps; ++t) {
        const int64_t q = g.kernel_tap(t);
        for (int64_t c = 0; c < g.mb; ++c, dst += 16) {
          for (int64_t lane = 0; lane < 16; ++lane) {
            if (src[lane] != nullptr) dst[lane] = src[lane][c * kk + q];
          }
        }
      }
      // centre: channel c of block bb at each padded channel; the own block from weight_kxk's centre tap
      for (int64_t cc = 0; cc < p.cx; ++cc, dst += 16) {
        const int64_t bb = (cc / (g.mb * G)) * G + cc % G, c = (cc / G) % g.mb;
        if (bb >= g.part) continue;
        for (int64_t lane = 0; lane < 16; ++lane) {
          if (src[lane] == nullptr) continue;
          const int64_t b = blk[lane];
          dst[lane] = bb == b ? src[lane][c * kk + c0] : r1[lane][(bb < b ? bb : bb - 1) * g.mb + c];
        }
      }
    }
  });
}

// One pixel's channels (G = 4, every block present, mb a multiple of 4) into the plan's order: per 4 channels of
// 4 blocks, a 4x4 transpose in one permute.
__attribute__((target("avx512f"))) void interleave4_pixel(const float* s, float* d, int64_t mb, int64_t groups) {
  const __m512i idx = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  for (int64_t gi = 0; gi < groups; ++gi, s += 4 * mb, d += 4 * mb) {
    for (int64_t c = 0; c < mb; c += 4) {
      __m512 v = _mm512_castps128_ps512(_mm_loadu_ps(s + c));
      v = _mm512_insertf32x4(v, _mm_loadu_ps(s + mb + c), 1);
      v = _mm512_insertf32x4(v, _mm_loadu_ps(s + 2 * mb + c), 2);
      v = _mm512_insertf32x4(v, _mm_loadu_ps(s + 3 * mb + c), 3);
      _mm512_storeu_ps(d + c * 4, _mm512_permutexvar_ps(idx, v));
    }
  }
}

// Padded rows [r0, r1) of image n (padded coordinates) with channels in the plan's order: [rows][wp][cx], zero
// outside the image.
void cl_direct_pad_rows(const float* x, float* dst, const HetGeometry& g, const ClDirect& p, int64_t n, int64_t r0,
                        int64_t r1) {
  const int64_t G = p.lanes_g;
  for (int64_t row = r0; row < r1; ++row, dst += p.wp * p.cx) {
    const int64_t iy = row - g.ph;
    if (iy < 0 || iy >= g.h) {
      std::fill_n(dst, p.wp * p.cx, 0.f);
      continue;
    }
    std::fill_n(dst, g.pw * p.cx, 0.f);
    std::fill_n(dst + (g.pw + g.w) * p.cx, g.pw * p.cx, 0.f);
    const float* src = x + (n * g.h + iy) * g.w * g.m;
    if (G == 1) {
      std::memcpy(dst + g.pw * p.cx, src, g.w * g.m * sizeof(float));
      continue;
    }
    if (G == 4 && g.mb % 4 == 0 && g.part % 4 == 0) {
      for (int64_t ix = 0; ix < g.w; ++ix) interleave4_pixel(src + ix * g.m, dst + (g.pw + ix) * p.cx, g.mb, p.groups);
      continue;
    }
    for (int64_t ix = 0; ix < g.w; ++ix) {
      const float* s = src + ix * g.m;
      float* d = dst + (g.pw + ix) * p.cx;
      for (int64_t gi = 0; gi < p.groups; ++gi, d += g.mb * G) {
        const int64_t blocks = std::min(G, g.part - gi * G);
        for (int64_t l = 0; l < blocks; ++l) {
          const float* sb = s + (gi * G + l) * g.mb;
          for (int64_t c = 0; c < g.mb; ++c) d[c * G + l] = sb[c];
        }
        for (int64_t l = blocks; l < G; ++l) {
          for (int64_t c = 0; c < g.mb; ++c) d[c * G + l] = 0.f;
        }
      }
    }
  }
}

// Where one vector of accumulators goes, relative to the pixel's output channels. dense (every block of the group
// present and ob == 16 / G): the lanes, put in channel order by perm, are 16 consecutive channels from channel.
// Otherwise G = 1: 16 lanes at channel (mask: the filters that exist); G = 4: 4 segments of 4 filters at channel
// + s * ob (segs: blocks that exist, mask4: filters); G = 2, 8, 16: scattered to channel + idx[lane] (mask).
struct ClStore {
  int64_t channel, ob, segs;
  bool dense;
  __mmask16 mask;
  __mmask8 mask4;
  int32_t idx[16], perm[16];
};

template <int G>
__attribute__((target("avx512f,avx512vl"))) inline void cl_store(float* o, __m512 acc, const ClStore& s) {
  o += s.channel;
  if (G == 1) {
    _mm512_mask_storeu_ps(o, s.mask, acc);
  } else if (s.dense) {
    _mm512_storeu_ps(o, _mm512_permutexvar_ps(_mm512_loadu_si512(s.perm), acc));
  } else if (G == 4) {
    const __m512 a = _mm512_permutexvar_ps(_mm512_loadu_si512(s.perm), acc);
    _mm_mask_storeu_ps(o, s.mask4, _mm512_extractf32x4_ps(a, 0));
    if (s.segs > 1) _mm_mask_storeu_ps(o + s.ob, s.mask4, _mm512_extractf32x4_ps(a, 1));
    if (s.segs > 2) _mm_mask_storeu_ps(o + 2 * s.ob, s.mask4, _mm512_extractf32x4_ps(a, 2));
    if (s.segs > 3) _mm_mask_storeu_ps(o + 3 * s.ob, s.mask4, _mm512_extractf32x4_ps(a, 3));
  } else {
    _mm512_mask_i32scatter_ps(o, s.mask, _mm512_loadu_si512(s.idx), acc, 4);
  }
}

template <int G>
__attribute__((target("avx512f,avx512vl,avx512dq"))) inline __m512 cl_broadcast(const float* p) {
  if (G == 1) return _mm512_set1_ps(*p);
  if (G == 2) {
    double pair;
    std::memcpy(&pair, p, sizeof(pair));
    return _mm512_castpd_ps(_mm512_set1_pd(pair));
  }
  if (G == 4) return _mm512_broadcast_f32x4(_mm_loadu_ps(p));
  if (G == 8) return _mm512_broadcast_f32x8(_mm256_loadu_ps(p));
  return _mm512_loadu_ps(p);
}

// R output pixels (input pixel step istep, output pixel step ostep) x NV vectors of lanes, the whole HetConv:
// in points at the first pixel's group channels at tap (0, 0), centre at its channel 0 at the centre tap; w at the
// first vector's weights (the next at + wblock), bias at its 16 lanes (the next at + 16).
template <int G, int NV, int R>
__attribute__((target("avx512f,avx512vl,avx512dq"))) void cl_direct_block(
    float* out, int64_t ostep, const float* in, const float* centre, int64_t istep, const int64_t* tap_offset,
    int64_t taps, int64_t mb, int64_t cx, const float* w, int64_t wblock, const float* bias, const ClStore* store) {
  __m512 acc[NV][R];
  for (int v = 0; v < NV; ++v) {
    const __m512 b = _mm512_loadu_ps(bias + v * 16);
    for (int r = 0; r < R; ++r) acc[v][r] = b;
  }
  for (int64_t t = 0; t < taps; ++t) {
    const float* src = in + tap_offset[t];
    const float* wt = w + t * mb * 16;
    for (int64_t c = 0; c < mb; ++c) {
      __m512 wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_ps(wt + v * wblock + c * 16);
      for (int r = 0; r < R; ++r) {
        const __m512 xv = cl_broadcast<G>(src + r * istep + c * G);
        for (int v = 0; v < NV; ++v) acc[v][r] = _mm512_fmadd_ps(wv[v], xv, acc[v][r]);
      }
    }
  }
  const float* wc = w + taps * mb * 16;
  for (int64_t c = 0; c < cx; ++c) {
    __m512 wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_ps(wc + v * wblock + c * 16);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(centre[r * istep + c]);
      for (int v = 0; v < NV; ++v) acc[v][r] = _mm512_fmadd_ps(wv[v], xv, acc[v][r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) cl_store<G>(out + r * ostep, acc[v][r], store[v]);
  }
}

struct ClRowArgs {
  int64_t ostep, istep, taps, mb, cx, wblock;
  const int64_t* tap_offset;
  int64_t centre_offset;  // from a pixel's group channels at tap (0, 0) to its channel 0 at the centre tap
};

// One output row of count pixels in ceil(count / kR) register blocks of nearly equal size (8 pixels as 4 + 4, not
// 6 + 2: a block of few pixels loads its weights for few multiply-adds).
template <int G, int NV>
void cl_direct_row(float* out, const float* in, const float* w, const float* bias, const ClStore* store,
                   int64_t count, const ClRowArgs& a) {
  constexpr int kR = NV == 1 ? 12 : 6;
  const int64_t blocks = (count + kR - 1) / kR, small = count / blocks, larger = count % blocks;
  int64_t x0 = 0;
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t r = small + (i >= blocks - larger ? 1 : 0);
#define FXEFF_CL_BLOCK(R)                                                                                          \
  case R:                                                                                                          \
    if constexpr (R <= kR) {                                                                                       \
      cl_direct_block<G, NV, R>(out + x0 * a.ostep, a.ostep, in + x0 * a.istep, in + x0 * a.istep + a.centre_offset, \
                                a.istep, a.tap_offset, a.taps, a.mb, a.cx, w, a.wblock, bias, store);              \
    }                                                                                                              \
    break;
    switch (r) {
      FXEFF_CL_BLOCK(1) FXEFF_CL_BLOCK(2) FXEFF_CL_BLOCK(3) FXEFF_CL_BLOCK(4) FXEFF_CL_BLOCK(5) FXEFF_CL_BLOCK(6)
      FXEFF_CL_BLOCK(7) FXEFF_CL_BLOCK(8) FXEFF_CL_BLOCK(9) FXEFF_CL_BLOCK(10) FXEFF_CL_BLOCK(11) FXEFF_CL_BLOCK(12)
      default: break;
    }
#undef FXEFF_CL_BLOCK
    x0 += r;
  }
}

template <int G>
void cl_direct_row_nv(int nv, float* out, const float* in, const float* w, const float* bias, const ClStore* store,
                      int64_t count, const ClRowArgs& a) {
  if (nv == 2) {
    cl_direct_row<G, 2>(out, in, w, bias, store, count, a);
  } else {
    cl_direct_row<G, 1>(out, in, w, bias, store, count, a);
  }
}

// The weights of the channels-last direct strategy in its packed order, kept between calls: inference calls a layer
// with the same weights every time, and packing them took 41 of 173 us of a batch-1 call at 128ch@8x8 (about 4 of
// VGG16's 86 ms at 224). An entry is keyed by the weight tensors as passed: each one's storage (held by a weak
// reference, so a freed weight's storage is never mistaken for a new one at the same address), data pointer, sizes,
// strides and version counter (an in-place update -- an optimiser step, load_state_dict, copy_ -- packs again and
// replaces the entry). Only inference calls use it: a call that records for autograd (training) packs per call, as
// do inference tensors (no version counter). A change made through .data bypasses the version counter: clear the
// cache after one (fxeff.ops.hetconv2d_pack_cache(clear=True)). The least recently used entries are dropped beyond
// the byte limit: FXEFF_HETCONV_PACK_CACHE_MB (default 256; 0 turns the cache off), or _hetconv2d_pack_cache.
struct PackedWeights {
  std::vector<float> wd, bd;
  size_t bytes() const { return (wd.size() + bd.size()) * sizeof(float); }
};

struct TensorStamp {
  std::optional<c10::weak_intrusive_ptr<c10::StorageImpl>> storage;  // none: an undefined (absent) tensor
  const void* data = nullptr;
  std::vector<int64_t> sizes, strides;
  uint32_t version = 0;

  static TensorStamp of(const at::Tensor& t) {
    TensorStamp s;
    if (!t.defined()) return s;
    s.storage = t.storage().getWeakStorageImpl();
    s.data = t.const_data_ptr();
    s.sizes = t.sizes().vec();
    s.strides = t.strides().vec();
    s.version = t._version();
    return s;
  }
  // The same tensor (storage, place, shape) as t, whatever its version.
  bool same_tensor(const at::Tensor& t) const {
    if (!t.defined() || !storage.has_value()) return !t.defined() && !storage.has_value();
    return !storage->expired() && storage->_unsafe_get_target() == t.storage().unsafeGetStorageImpl() &&
           data == t.const_data_ptr() && t.sizes().equals(sizes) && t.strides().equals(strides);
  }
};

struct PackCacheEntry {
  TensorStamp stamp[3];  // weight_kxk, weight_1x1, bias
  std::shared_ptr<const PackedWeights> packed;
  bool expired() const {
    for (const TensorStamp& s : stamp) {
      if (s.storage.has_value() && s.storage->expired()) return true;
    }
    return false;
  }
};

class PackCache {
 public:
  PackCache() {
    const char* env = std::getenv("FXEFF_HETCONV_PACK_CACHE_MB");
    if (env != nullptr) limit_ = static_cast<size_t>(std::max(0L, std::strtol(env, nullptr, 10))) << 20;
  }

  // The packed weights of (wk, w1, bias) for plan p, from the cache or packed now (and kept).
  std::shared_ptr<const PackedWeights> get(const at::Tensor& wk, const at::Tensor& w1, const at::Tensor& bias,
                                           const HetGeometry& g, const ClDirect& p) {
    const at::Tensor* t[3] = {&wk, &w1, &bias};
    const bool cacheable = !hetconv2d_recording() &&
                           !(wk.is_inference() || w1.is_inference() || (bias.defined() && bias.is_inference()));
    if (cacheable) {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = entries_.begin(); it != entries_.end();) {
        if (it->expired()) {  // a freed weight: its packing is dead memory
          bytes_ -= it->packed->bytes();
          it = entries_.erase(it);
          continue;
        }
        bool same = true, current = true;
        for (int i = 0; i < 3 && same; ++i) {
          same = it->stamp[i].same_tensor(*t[i]);
          current = current && (!t[i]->defined() || it->stamp[i].version == t[i]->_version());
        }
        if (!same) {
          ++it;
          continue;
        }
        if (current) {
          entries_.splice(entries_.begin(), entries_, it);  // most recently used first
          ++hits_;
          return it->packed;
        }
        bytes_ -= it->packed->bytes();  // updated in place since: packed again below
        entries_.erase(it);
        break;
      }
      ++misses_;
    }
    auto packed = std::make_shared<PackedWeights>();
    {
      RECORD_FUNCTION("fxeff::hetconv2d::direct::weights", c10::ArrayRef<const c10::IValue>{});
      const at::Tensor wkc = wk.contiguous(), w1c = w1.contiguous();
      const at::Tensor bc = bias.defined() ? bias.contiguous() : at::Tensor();
      cl_direct_weights(wkc.const_data_ptr<float>(), w1c.const_data_ptr<float>(),
                        bc.defined() ? bc.const_data_ptr<float>() : nullptr, g, p, packed->wd, packed->bd);
    }
    if (cacheable) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (packed->bytes() <= limit_) {
        entries_.push_front(PackCacheEntry{{TensorStamp::of(wk), TensorStamp::of(w1), TensorStamp::of(bias)}, packed});
        bytes_ += packed->bytes();
        trim();
      }
    }
    return packed;
  }

  // Sets the limit (bytes; < 0 keeps it), dropping entries beyond it (every entry with clear); returns {entries,
  // bytes, hits, misses, limit}.
  std::vector<int64_t> configure(int64_t limit_bytes, bool clear) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (limit_bytes >= 0) limit_ = static_cast<size_t>(limit_bytes);
    if (clear) {
      entries_.clear();
      bytes_ = 0;
    }
    trim();
    return {static_cast<int64_t>(entries_.size()), static_cast<int64_t>(bytes_), hits_, misses_,
            static_cast<int64_t>(limit_)};
  }

 private:
  void trim() {  // caller holds mutex_
    while (bytes_ > limit_ && !entries_.empty()) {
      bytes_ -= entries_.back().packed->bytes();
      entries_.pop_back();
    }
  }

  std::mutex mutex_;
  std::list<PackCacheEntry> entries_;
  size_t bytes_ = 0, limit_ = size_t(256) << 20;
  int64_t hits_ = 0, misses_ = 0;
};

PackCache& pack_cache() {
  static PackCache cache;
  return cache;
}

void run_direct_cl(const at::Tensor& x, const at::Tensor& weight_kxk, const at::Tensor& weight_1x1,
                   const at::Tensor& bias, at::Tensor& out, const HetGeometry& g) {
  const ClDirect p = plan_cl_direct(g);
  const std::shared_ptr<const PackedWeights> packed = pack_cache().get(weight_kxk, weight_1x1, bias, g, p);
  const float* wd = packed->wd.data();
  const float* bd = packed->bd.data();
  const int64_t taps = g.taps(), G = p.lanes_g;
  std::vector<int64_t> tap_offset(taps);
  for (int64_t t = 0; t < taps; ++t) {
    const int64_t q = g.kernel_tap(t);
    tap_offset[t] = ((q / g.k) * g.dh * p.wp + (q % g.k) * g.dw) * p.cx;
  }
  // Each vector's store: its output channels, masks, and (G >= 8) scatter offsets.
  std::vector<ClStore> stores(static_cast<size_t>(p.groups * p.jvs));
  for (int64_t gi = 0; gi < p.groups; ++gi) {
    for (int64_t jv = 0; jv < p.jvs; ++jv) {
      ClStore& s = stores[gi * p.jvs + jv];
      const int64_t j = jv * p.per, filters = std::min(p.per, g.ob - j), blocks = std::min(G, g.part - gi * G);
      s.channel = gi * G * g.ob + j;
      s.ob = g.ob;
      s.segs = blocks;
      s.mask4 = static_cast<__mmask8>((1u << filters) - 1);
      s.dense = G > 1 && blocks == G && g.ob == p.per;
      s.mask = 0;
      for (int64_t lane = 0; lane < 16; ++lane) {
        const int64_t l = lane % G, jj = lane / G;
        s.idx[lane] = static_cast<int32_t>(l * g.ob + jj);
        s.perm[l * p.per + jj] = static_cast<int32_t>(lane);  // channel order (block, filter) <- lane (filter, block)
        if (l < blocks && jj < filters) s.mask = static_cast<__mmask16>(s.mask | (1u << lane));
      }
    }
  }
  const ClRowArgs a{g.o, g.sw * p.cx, taps, g.mb, p.cx, p.wblock, tap_offset.data(),
                    ((g.k / 2) * g.dh * p.wp + (g.k / 2) * g.dw) * p.cx};
  // Work items: (image, band of output rows). A worker pads the band's input rows into its own buffer, which stays
  // in L2 while every vector of filters runs over it: padding the whole input first (one pass out to memory and one
  // back) measured as much as a third of the layer's time at the reference models' sizes. Bands of rows whose
  // padded input takes <= 256 KiB, fewer rows where that gives the threads fewer than 4 items each; the rows read by
  // two bands (dilated kernel height - stride) are padded twice.
  const int64_t span_h = g.dh * (g.k - 1), row_floats = p.wp * p.cx;
  const int64_t threads_wanted = std::max<int64_t>(1, at::get_num_threads());
  int64_t band = std::max<int64_t>(1, ((256 << 10) / (4 * row_floats) - span_h) / g.sh);
  band = std::min(band, std::max<int64_t>(1, g.n * g.ho / (4 * threads_wanted)));
  band = std::min(band, g.ho);
  const int64_t bands = (g.ho + band - 1) / band, items = g.n * bands;
  const int64_t threads = std::min<int64_t>(threads_wanted, items);
  const int64_t in_rows = (band - 1) * g.sh + span_h + 1;
  const float* xp = x.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    // The worker's band buffer, kept between calls (thread_buffer): allocated per call, a band over glibc's mmap
    // threshold was mapped and page-faulted in on every call whenever the threshold had not been raised by an
    // earlier free, which moved the reference ResNet-20 between 4.9 and 7.3 ms per batch in one process.
    float* const buffer = thread_buffer<float>(kHetconvBand, in_rows * row_floats);
    for (int64_t item = next++; item < items; item = next++) {
      const int64_t n = item / bands, y0 = (item % bands) * band, y1 = std::min(g.ho, y0 + band);
      {
        RECORD_FUNCTION("fxeff::hetconv2d::direct::pad", c10::ArrayRef<const c10::IValue>{});
        cl_direct_pad_rows(xp, buffer, g, p, n, y0 * g.sh, (y1 - 1) * g.sh + span_h + 1);
      }
      for (int64_t gi = 0; gi < p.groups; ++gi) {
        ClRowArgs ra = a;
        ra.centre_offset = a.centre_offset - gi * g.mb * G;  // the centre reads every channel from channel 0
        for (int64_t jv = 0; jv < p.jvs;) {
          const int nv = p.jvs - jv >= 2 ? 2 : 1;
          const float* w = wd + (gi * p.jvs + jv) * p.wblock;
          const float* b = bd + (gi * p.jvs + jv) * 16;
          const ClStore* s = stores.data() + gi * p.jvs + jv;
          for (int64_t y = y0; y < y1; ++y) {
            const float* in = buffer + (y - y0) * g.sh * row_floats + gi * g.mb * G;
            float* orow = op + (n * g.ho + y) * g.wo * g.o;
            switch (G) {
              case 1: cl_direct_row_nv<1>(nv, orow, in, w, b, s, g.wo, ra); break;
              case 2: cl_direct_row_nv<2>(nv, orow, in, w, b, s, g.wo, ra); break;
              case 4: cl_direct_row_nv<4>(nv, orow, in, w, b, s, g.wo, ra); break;
              case 8: cl_direct_row_nv<8>(nv, orow, in, w, b, s, g.wo, ra); break;
              default: cl_direct_row_nv<16>(nv, orow, in, w, b, s, g.wo, ra); break;
            }
          }
          jv += nv;
        }
      }
    }
  });
}
#endif

// The auto pick between the strategies, from side-by-side measurements on 2 threads (AVX-512 EPYC, shared machine;
// not re-tuned on the Xeon hosts since) at 256ch@56x56 and 128ch@28x28, batch 1 and 8, P 2..16:
//   direct  - NCHW float32 stride 1 with M/P <= 16 channels per block, and rows of >= 40 outputs (the 48-pixel
//             register blocks mostly full) or >= 4096 outputs per channel over the batch: fastest at 256ch@56x56
//             P16 and 128ch@28x28 batch 8 P8/P16;
//   gemm    - other NCHW layers with a large output (> 1 MiB over the batch): its chunks write each output once
//             while in cache, where "grouped" re-reads the output that the grouped conv wrote;
//   grouped - small NCHW outputs (128ch@28x28 batch 1), and channels_last where direct cannot run.
// channels_last float32: direct whenever it can run. Measured side by side on the 2-core AVX-512 EPYC (issue 17),
// speedup over dense as a fraction of the MAC-ratio speedup at P=4, direct vs grouped: 32ch@32x32 0.80 / 0.53
// (batch 16), 0.82 / 0.39 (batch 1); 64ch@16x16 0.89 / 0.75, 0.81 / 0.39; 128ch@8x8 0.81 / 0.61; ResNet-20's
// 16-channel layer at 64x64, batch 16: 0.57 / 1.12 of dense's time; 256ch@56x56 and 128ch@28x28 at batch 1 and 8
// even with grouped (0.82-0.86 both).
// NCHW float32 where the channels-last kernel runs (AVX-512VL) and the copies pay (use_direct_via_cl): direct_cl, the
// input copied to channels_last and the output back; the rules above for the other NCHW cases.
// K = 1 has no KxK part: "gemm" is then a single 1x1 GEMM.
bool use_direct(const HetGeometry& g, bool cl) {
  if (cl) return true;
  return g.mb <= 16 && (g.wo >= 40 || g.n * g.ho * g.wo >= 4096);
}

// NCHW float32 through the channels-last direct kernel (the input copied to channels_last, the output back) where the
// copies are cheap against the convolution: inputs up to 1 MiB, or up to 4 MiB with P <= 4 and >= 64 channels.
// Measured, every strategy forced side by side (issue 17, fourteenth session, docs/benchmarks.md): fastest or
// within 5% in all 12 reference-size rows but 32ch@32x32 batch 16 (NCHW direct 1.34 / 0.75 ms against 1.53 / 1.20,
// 2 MiB of 32 channels) and at P = 4 at 128ch@28x28 batch 8 and 256ch@56x56 batch 1 (3.2 MiB: 4.04 / 6.89 ms
// against 4.31 / 7.38 for the best NCHW strategy); slower at P = 16 there (2.80 / 7.38 against 2.43 / 4.11) and at
// 256ch@56x56 batch 8 (25 MiB: 80.7 against 57.4 ms), where the copies cost more than the kernel saves.
bool use_direct_via_cl(const HetGeometry& g) {
  const int64_t bytes = g.n * g.m * g.h * g.w * static_cast<int64_t>(sizeof(float));
  return bytes <= (int64_t(1) << 20) || (bytes <= (int64_t(4) << 20) && g.part <= 4 && g.m >= 64);
}

bool use_grouped(const HetGeometry& g, bool cl, int64_t elem) {
  if (g.k == 1) return false;
  if (cl) return true;
  return g.n * g.o * g.ho * g.wo * elem <= (1 << 20);
}

// Every block's off-centre taps for output pixels [p0, p0 + np) of the batch (channels_last x): cols [np, P, taps,
// mb], so block b's matrix is the [np, taps * mb] slice at column b * taps * mb (row stride taps * M).
template <typename T>
void gather_pixels_cl(const T* x, T* cols, const HetGeometry& g, int64_t p0, int64_t np) {
  const int64_t taps = g.taps(), row = taps * g.m, hw = g.ho * g.wo;
  for (int64_t p = 0; p < np; ++p) {
    const int64_t pix = p0 + p, n = pix / hw, y = (pix % hw) / g.wo, xo = pix % g.wo;
    T* dst = cols + p * row;
    for (int64_t t = 0; t < taps; ++t) {
      const int64_t q = g.kernel_tap(t);
      const int64_t iy = y * g.sh - g.ph + (q / g.k) * g.dh, ix = xo * g.sw - g.pw + (q % g.k) * g.dw;
      if (iy < 0 || iy >= g.h || ix < 0 || ix >= g.w) {
        for (int64_t b = 0; b < g.part; ++b) std::fill_n(dst + b * taps * g.mb + t * g.mb, g.mb, T(0));
        continue;
      }
      const T* src = x + ((n * g.h + iy) * g.w + ix) * g.m;
      for (int64_t b = 0; b < g.part; ++b) {
        std::memcpy(dst + b * taps * g.mb + t * g.mb, src + b * g.mb, g.mb * sizeof(T));
      }
    }
  }
}

// The input at every output's centre tap: x itself for stride 1 and "same" padding, else a strided crop/pad.
at::Tensor centre_samples(const at::Tensor& x, const HetGeometry& g, at::MemoryFormat fmt) {
  if (g.centre_is_x()) return x;
  const int64_t rows = (g.ho - 1) * g.sh + 1, cols = (g.wo - 1) * g.sw + 1;
  const int64_t top = -g.ch(), left = -g.cw();
  const std::array<int64_t, 4> pad{left, cols - (g.w + left), top, rows - (g.h + top)};
  return at::constant_pad_nd(x, pad, 0).slice(2, 0, rows, g.sh).slice(3, 0, cols, g.sw).contiguous(fmt);
}

template <typename T>
void run_nchw(const at::Tensor& x, const at::Tensor& xc, const at::Tensor& wc, const at::Tensor& woff,
              const c10::optional<at::Tensor>& bias_col, at::Tensor& out, const HetGeometry& g) {
  const int64_t taps = g.taps(), hw = g.ho * g.wo;
  const int64_t chunk = pick_chunk(g.n * hw);
  const int64_t rows_per_chunk = std::max<int64_t>(1, std::min(g.ho, (chunk + g.wo / 2) / g.wo));
  const int64_t chunks_per_image = (g.ho + rows_per_chunk - 1) / rows_per_chunk, items = g.n * chunks_per_image;
  std::vector<ColRange> cr(g.k);
  for (int64_t kx = 0; kx < g.k; ++kx) cr[kx] = valid_cols(kx, g.dw, g.pw, g.sw, g.w, g.wo);
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), items);
  const int64_t buf_len = taps > 0 ? g.mb * taps * rows_per_chunk * g.wo : 1;
  const auto buf_opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  const at::Tensor out2 = out.view({g.n, g.o, hw}), xc2 = xc.view({g.n, g.m, hw});
  const T* xp = x.const_data_ptr<T>();
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    at::AutoDispatchBelowADInplaceOrView guard;  // internal GEMMs: no autograd on worker threads
    at::Tensor cols_t = at::empty({buf_len}, buf_opts);  // this worker's im2col buffer
    T* colsp = cols_t.mutable_data_ptr<T>();
    for (int64_t item = next++; item < items; item = next++) {
      const int64_t n = item / chunks_per_image, y0 = (item % chunks_per_image) * rows_per_chunk;
      const int64_t y1 = std::min(g.ho, y0 + rows_per_chunk), np = (y1 - y0) * g.wo;
      centre_gemm(out2, xc2, wc, bias_col, n, y0 * g.wo, np);
      if (taps == 0) continue;
      const at::Tensor cols = cols_t.narrow(0, 0, g.mb * taps * np).view({g.mb * taps, np});
      const at::Tensor o = out2.select(0, n).narrow(1, y0 * g.wo, np);
      for (int64_t b = 0; b < g.part; ++b) {
        gather_block_nchw<T>(xp, colsp, g, cr, n, b, y0, y1);
        at::Tensor ob = o.narrow(0, b * g.ob, g.ob);
        at::addmm_out(ob, ob, woff.narrow(0, b * g.ob, g.ob), cols);
      }
    }
  });
}

template <typename T>
void run_cl(const at::Tensor& x, const at::Tensor& xc, const at::Tensor& wc, const at::Tensor& woff,
            const c10::optional<at::Tensor>& bias, at::Tensor& out, const HetGeometry& g) {
  const int64_t taps = g.taps(), total = g.n * g.ho * g.wo;
  at::Tensor out2 = out.permute({0, 2, 3, 1}).view({total, g.o});
  const at::Tensor xc2 = xc.permute({0, 2, 3, 1}).reshape({total, g.m});
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    if (bias.has_value()) {
      at::addmm_out(out2, *bias, xc2, wc.t());
    } else {
      at::mm_out(out2, xc2, wc.t());
    }
  }
  if (taps == 0) return;
  const int64_t chunk = pick_chunk(total);
  const int64_t items = (total + chunk - 1) / chunk;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), items);
  const auto buf_opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  const at::Tensor woff_t = woff.t();  // [taps * mb, O]
  const T* xp = x.const_data_ptr<T>();
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor cols_t = at::empty({chunk * taps * g.m}, buf_opts);  // this worker's gather buffer
    T* colsp = cols_t.mutable_data_ptr<T>();
    for (int64_t item = next++; item < items; item = next++) {
      const int64_t p0 = item * chunk, np = std::min(chunk, total - p0);
      gather_pixels_cl<T>(xp, colsp, g, p0, np);
      const at::Tensor cols = cols_t.narrow(0, 0, np * taps * g.m).view({np, taps * g.m});
      at::Tensor o = out2.narrow(0, p0, np);
      for (int64_t b = 0; b < g.part; ++b) {
        at::Tensor ob = o.narrow(1, b * g.ob, g.ob);
        at::addmm_out(ob, ob, cols.narrow(1, b * taps * g.mb, taps * g.mb),
                      woff_t.narrow(1, b * g.ob, g.ob));
      }
    }
  });
}

at::Tensor hetconv2d_cpu(const at::Tensor& x_in, const at::Tensor& weight_kxk, const at::Tensor& weight_1x1,
                         const c10::optional<at::Tensor>& bias, int64_t part, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation) {
  const HetGeometry g =
      check_hetconv2d_args("hetconv2d", x_in, weight_kxk, weight_1x1, bias, part, stride, padding, dilation);
  const at::MemoryFormat fmt = x_in.suggest_memory_format();
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(fmt);
  if (x.numel() == 0 || g.o == 0) {  // nothing to multiply: the output (if any) is the bias
    at::Tensor out = at::empty({g.n, g.o, g.ho, g.wo}, x.options().memory_format(fmt));
    if (out.numel() > 0 && bias.has_value() && bias->defined()) {
      out.copy_(bias->view({1, g.o, 1, 1}).expand_as(out));
    } else if (out.numel() > 0) {
      out.zero_();
    }
    return out;
  }
  const at::Tensor wk = weight_kxk.contiguous(), w1 = weight_1x1.contiguous();
  const auto wopts = wk.options().memory_format(at::MemoryFormat::Contiguous);
  const bool has_bias = bias.has_value() && bias->defined();
  const int forced = forced_strategy.load();
  // direct_cl on a channels_last input is direct itself
  const bool direct = direct_possible(g, cl, x.scalar_type()) &&
                      (forced == 3 || (forced == 4 && cl) || (forced == 0 && use_direct(g, cl)));
  const bool via_cl = !cl && direct_possible(g, true, x.scalar_type()) &&
                      (forced == 4 || (forced == 0 && use_direct_via_cl(g)));
  const bool grouped = !direct && !via_cl && (forced == 2 || (forced == 0 && use_grouped(g, cl, x.element_size())));
  at::Tensor out;
#ifdef FXEFF_HETCONV_X86
  if (via_cl) {
    RECORD_FUNCTION("fxeff::hetconv2d::direct_cl", c10::ArrayRef<const c10::IValue>{});
    const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
    out = at::empty({g.n, g.o, g.ho, g.wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
    run_direct_cl(xc, weight_kxk, weight_1x1, has_bias ? *bias : at::Tensor(), out, g);
    return out.contiguous();  // the op keeps x's memory format
  }
  if (direct) {
    RECORD_FUNCTION("fxeff::hetconv2d::direct", c10::ArrayRef<const c10::IValue>{});
    out = at::empty({g.n, g.o, g.ho, g.wo}, x.options().memory_format(fmt));
    if (cl) {
      run_direct_cl(x, weight_kxk, weight_1x1, has_bias ? *bias : at::Tensor(), out, g);
      return out;
    }
    const at::Tensor xc = centre_samples(x, g, fmt);
    at::Tensor wc = at::empty({g.o, g.m}, wopts);
    fill_centre_matrix<float>(wk.const_data_ptr<float>(), w1.const_data_ptr<float>(), wc.mutable_data_ptr<float>(), g,
                              true);
    run_direct(x, xc, wc, direct_weights(wk.const_data_ptr<float>(), g),
               has_bias ? c10::optional<at::Tensor>(bias->contiguous().view({g.o, 1})) : c10::nullopt, out, g);
    return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hetconv2d", [&] {
    const at::Tensor xc = centre_samples(x, g, fmt);
    at::Tensor wc = at::empty({g.o, g.m}, wopts);
    fill_centre_matrix<scalar_t>(wk.const_data_ptr<scalar_t>(), w1.const_data_ptr<scalar_t>(),
                                 wc.mutable_data_ptr<scalar_t>(), g, /*with_own_block=*/!grouped);
    if (grouped) {
      RECORD_FUNCTION("fxeff::hetconv2d::grouped", c10::ArrayRef<const c10::IValue>{});
      out = run_grouped(x, xc, wk, wc, has_bias ? c10::optional<at::Tensor>(*bias) : c10::nullopt, g, fmt, stride,
                        padding, dilation);
      return;
    }
    RECORD_FUNCTION("fxeff::hetconv2d::gemm", c10::ArrayRef<const c10::IValue>{});
    out = at::empty({g.n, g.o, g.ho, g.wo}, x.options().memory_format(fmt));
    at::Tensor woff = at::empty({g.o, std::max<int64_t>(1, g.mb * g.taps())}, wopts);
    if (g.taps() > 0) fill_offcentre_matrix<scalar_t>(wk.const_data_ptr<scalar_t>(), woff.mutable_data_ptr<scalar_t>(), g, cl);
    if (cl) {
      run_cl<scalar_t>(x, xc, wc, woff, has_bias ? c10::optional<at::Tensor>(bias->contiguous()) : c10::nullopt, out, g);
    } else {
      run_nchw<scalar_t>(x, xc, wc, woff,
                         has_bias ? c10::optional<at::Tensor>(bias->contiguous().view({g.o, 1})) : c10::nullopt,
                         out, g);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fxeff, m) {
  // Forces a strategy ("auto", "gemm", "grouped") and the gemm strategy's pixels per chunk (0 = the kernel's pick);
  // returns the previous strategy. For tests and benchmarks; process-wide.
  m.def("_hetconv2d_set_strategy(str strategy, int chunk) -> str", &set_strategy);
  // Whether this CPU runs the "direct" strategy in that layout (float32; the checks the kernel itself makes).
  m.def("_hetconv2d_direct_available(bool channels_last) -> bool",
        [](bool channels_last) { return channels_last ? cpu_has_avx512vl() : cpu_has_avx512f(); });
  // The channels-last direct strategy's cache of packed weights (PackCache): sets its byte limit (< 0 keeps it; 0
  // empties and turns it off), empties it with clear, and returns [entries, bytes, hits, misses, limit].
  m.def("_hetconv2d_pack_cache(int limit_bytes, bool clear) -> int[]", [](int64_t limit_bytes, bool clear) {
#ifdef FXEFF_HETCONV_X86
    return pack_cache().configure(limit_bytes, clear);
#else
    return std::vector<int64_t>{0, 0, 0, 0, 0};
#endif
  });
}

TORCH_LIBRARY_IMPL(fxeff, CPU, m) { m.impl("hetconv2d", &hetconv2d_cpu); }

}  // namespace ops
}  // namespace fxeff
