// The per-element index arithmetic of the CUDA kernels of the Focus ops (aoi_mask_kernel.cu,
// mask_resize_kernel.cu, focused_conv2d_kernel.cu), host-and-device so that the same code also compiles as plain
// C++: tests/_focus_cuda_emulation.cpp runs it on the CPU (tests/test_cuda_kernels.py) against the CPU kernels, a
// check of the device code's logic on machines without a GPU (launch geometry, cuDNN and the device scan are not
// covered there).
#pragma once

#include "../focused_conv2d.h"

#include <c10/macros/Macros.h>

#include <cstdint>
#include <limits>
#include <vector>

namespace fxeff {
namespace ops {
namespace focus_device {

// ---- mask_resize -------------------------------------------------------------------------------------------

// [begin, end) of the input indices feeding output index i along one dimension: the cell
// [floor(i*in/out), ceil((i+1)*in/out)) when shrinking (out <= in), the single input floor(i*in/out) when growing.
// The same formula as cpu/mask_resize_kernel.cpp's source_ranges.
C10_HOST_DEVICE inline void resize_range(int64_t i, int64_t in, int64_t out, int64_t& begin, int64_t& end) {
  begin = (i * in) / out;
  end = out <= in ? ((i + 1) * in + out - 1) / out : begin + 1;
}

// Output element e (row-major [N, Ho, Wo]) of mask_resize: any input in its cell. src is contiguous [N, Hi, Wi].
C10_HOST_DEVICE inline bool resize_element(const bool* src, int64_t hi, int64_t wi, int64_t ho, int64_t wo,
                                           int64_t e) {
  const int64_t j = e % wo, i = (e / wo) % ho, b = e / (wo * ho);
  int64_t y0, y1, x0, x1;
  resize_range(i, hi, ho, y0, y1);
  resize_range(j, wi, wo, x0, x1);
  const bool* plane = src + b * hi * wi;
  for (int64_t y = y0; y < y1; ++y) {
    for (int64_t x = x0; x < x1; ++x) {
      if (plane[y * wi + x]) return true;
    }
  }
  return false;
}

// ---- aoi_mask ----------------------------------------------------------------------------------------------

// Pixel p (row-major [N, H, W]) of aoi_mask: the channel sum (or mean = sum / C) accumulated in A (float for
// half/bfloat16/float, double for double) in channel order, compared in A with the threshold cast to A (as
// at::ge(float tensor, double scalar) does). A NaN sum compares false: NaN is never in the AoI. x is read through
// its strides (NCHW, channels_last or any view).
template <typename T, typename A>
C10_HOST_DEVICE inline bool aoi_element(const T* x, int64_t c, int64_t h, int64_t w, int64_t sn, int64_t sc,
                                        int64_t sh, int64_t sw, int64_t p, A threshold, bool mean) {
  const int64_t xw = p % w, yh = (p / w) % h, n = p / (w * h);
  const T* px = x + n * sn + yh * sh + xw * sw;
  A acc = A(0);
  for (int64_t k = 0; k < c; ++k) acc += static_cast<A>(px[k * sc]);
  if (mean) acc = acc / static_cast<A>(c);
  return acc >= threshold;
}

// ---- focused_conv2d ----------------------------------------------------------------------------------------

// What the focused conv's kernels need of its geometry, by value.
struct FocusGeometry {
  int64_t n, c, h, w;  // input
  int64_t o, ho, wo;   // output channels and size
  int64_t sh, sw, ph, pw;
  int64_t t;           // tile side (outputs)
  int64_t th, tw;      // tiles per image: ceil(ho / t), ceil(wo / t)
  int64_t wh, ww;      // input window of a tile: (t - 1) * s + d * (k - 1) + 1
  bool channels_last;  // x, patches, conv results and out all share this layout
};

// Offset of element (n, c, y, x) of a dense [N, C, H, W] tensor in NCHW or channels_last.
C10_HOST_DEVICE inline int64_t offset4(bool cl, int64_t C, int64_t H, int64_t W, int64_t n, int64_t c, int64_t y,
                                       int64_t x) {
  return cl ? ((n * H + y) * W + x) * C + c : ((n * C + c) * H + y) * W + x;
}

// Element e of a dense [N, C, H, W] tensor (memory order of its layout) -> (n, c, y, x).
C10_HOST_DEVICE inline void coords4(bool cl, int64_t C, int64_t H, int64_t W, int64_t e, int64_t& n, int64_t& c,
                                    int64_t& y, int64_t& x) {
  if (cl) {
    c = e % C; e /= C;
    x = e % W; e /= W;
    y = e % H; n = e / H;
  } else {
    x = e % W; e /= W;
    y = e % H; e /= H;
    c = e % C; n = e / C;
  }
}

// The geometry of a call with tile side t (host side; t = 1 where no tiles are involved).
inline FocusGeometry make_focus_geometry(const ConvGeometry& g, int64_t t, bool cl) {
  FocusGeometry d{};
  d.n = g.n; d.c = g.c; d.h = g.h; d.w = g.w;
  d.o = g.o; d.ho = g.ho; d.wo = g.wo;
  d.sh = g.sh; d.sw = g.sw; d.ph = g.ph; d.pw = g.pw;
  d.t = t;
  d.th = (g.ho + t - 1) / t; d.tw = (g.wo + t - 1) / t;
  d.wh = g.window_h(t); d.ww = g.window_w(t);
  d.channels_last = cl;
  return d;
}

// The CUDA kernel's choice (host side): the tile sides it tries, and which of them runs. counts[i] is the
// number of active tiles of side sizes[i]. Returns the index of the cheapest side, cost
//   counts[i] * (T^2 * kmac + window_h(T) * window_w(T) * C * kCopyMacs)     (kmac = O * C/groups * kh * kw),
// and sets use_tiles when that cost is below kTilesFraction * N * Ho * Wo * kmac (the dense conv's MACs).
// kCopyMacs and kTilesFraction are placeholders until measured on a GPU.
constexpr double kCopyMacs = 16.0;      // a gathered input element, in MACs (unmeasured)
constexpr double kTilesFraction = 0.5;  // tiles when they cost below this share of dense (unmeasured)

inline std::vector<int64_t> tile_sides(int64_t forced_tile) {
  return forced_tile > 0 ? std::vector<int64_t>{forced_tile} : std::vector<int64_t>{8, 16, 32};
}

inline size_t choose_tile(const ConvGeometry& g, const std::vector<int64_t>& sizes, const int64_t* counts,
                          bool& use_tiles) {
  const double kmac = static_cast<double>(g.o) * (g.c / g.groups) * g.kh * g.kw;
  size_t best = 0;
  double best_cost = std::numeric_limits<double>::infinity();
  for (size_t i = 0; i < sizes.size(); ++i) {
    const int64_t t = sizes[i];
    const double cost = static_cast<double>(counts[i]) *
                        (static_cast<double>(t * t) * kmac +
                         static_cast<double>(g.window_h(t)) * g.window_w(t) * g.c * kCopyMacs);
    if (cost < best_cost) { best_cost = cost; best = i; }
  }
  use_tiles = best_cost < kTilesFraction * static_cast<double>(g.n * g.ho * g.wo) * kmac;
  return best;
}

// Whether tile (ty, tx) of image n holds an active output (tiles overhanging the output are clipped).
C10_HOST_DEVICE inline bool tile_active(const bool* mask, const FocusGeometry& g, int64_t tile) {
  const int64_t tx = tile % g.tw, ty = (tile / g.tw) % g.th, n = tile / (g.tw * g.th);
  const int64_t y0 = ty * g.t, x0 = tx * g.t;
  const int64_t y1 = y0 + g.t < g.ho ? y0 + g.t : g.ho, x1 = x0 + g.t < g.wo ? x0 + g.t : g.wo;
  const bool* plane = mask + n * g.ho * g.wo;
  for (int64_t y = y0; y < y1; ++y) {
    for (int64_t x = x0; x < x1; ++x) {
      if (plane[y * g.wo + x]) return true;
    }
  }
  return false;
}

// The compaction step: after an inclusive prefix sum `scan` of the tile flags, the active tile i goes to list
// position scan[i] - 1 (image-major raster order, like the CPU's tile list). Returns -1 for an inactive tile.
C10_HOST_DEVICE inline int64_t tile_slot(const int32_t* flags, const int64_t* scan, int64_t i) {
  return flags[i] ? scan[i] - 1 : -1;
}

// Patch element e (memory order of patches [R, C, wh, ww] in the layout) of the r-th listed tile: the input it
// copies (its offset in x), or -1 where the window leaves the image (the conv's zero padding).
C10_HOST_DEVICE inline int64_t gather_source(const FocusGeometry& g, const int64_t* tiles, int64_t e) {
  int64_t r, c, py, px;
  coords4(g.channels_last, g.c, g.wh, g.ww, e, r, c, py, px);
  const int64_t tile = tiles[r];
  const int64_t tx = tile % g.tw, ty = (tile / g.tw) % g.th, n = tile / (g.tw * g.th);
  const int64_t iy = ty * g.t * g.sh - g.ph + py, ix = tx * g.t * g.sw - g.pw + px;
  if (iy < 0 || iy >= g.h || ix < 0 || ix >= g.w) return -1;
  return offset4(g.channels_last, g.c, g.h, g.w, n, c, iy, ix);
}

// Result element e (memory order of the conv of the patches, [R, O, t, t] in the layout) of the r-th listed tile:
// its offset in out, or -1 where it overhangs the output or the mask is not set there (never written back).
C10_HOST_DEVICE inline int64_t scatter_target(const FocusGeometry& g, const int64_t* tiles, const bool* mask,
                                              int64_t e) {
  int64_t r, o, i, j;
  coords4(g.channels_last, g.o, g.t, g.t, e, r, o, i, j);
  const int64_t tile = tiles[r];
  const int64_t tx = tile % g.tw, ty = (tile / g.tw) % g.th, n = tile / (g.tw * g.th);
  const int64_t y = ty * g.t + i, x = tx * g.t + j;
  if (y >= g.ho || x >= g.wo || !mask[(n * g.ho + y) * g.wo + x]) return -1;
  return offset4(g.channels_last, g.o, g.ho, g.wo, n, o, y, x);
}

// Output element e (memory order of out [N, O, Ho, Wo] in the layout): whether the mask is set there.
C10_HOST_DEVICE inline bool output_active(const FocusGeometry& g, const bool* mask, int64_t e) {
  int64_t n, o, y, x;
  coords4(g.channels_last, g.o, g.ho, g.wo, e, n, o, y, x);
  return mask[(n * g.ho + y) * g.wo + x];
}

}  // namespace focus_device
}  // namespace ops
}  // namespace fxeff
