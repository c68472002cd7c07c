// The per-element arithmetic of the CUDA shift kernels (shift_kernel.cu), host-and-device so that the same code
// also compiles as plain C++: tests/test_cuda_kernels.py runs it on the CPU (test_cuda_element_code_on_the_host)
// against the CPU kernel, a check of the device code's logic on machines without a GPU.
#pragma once

#include "../shift.h"

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

namespace fxeff {
namespace ops {
namespace shift_device {

constexpr int kDims = 3;     // D, H, W
constexpr int kMaxTaps = 2;  // per dim

// The shape, layout and padding of one call, passed to the kernels by value.
struct Geometry {
  int64_t N = 0, C = 0;
  int64_t size[kDims] = {1, 1, 1};
  int ntaps[kDims] = {1, 1, 1};
  int first_dim = 0;  // kDims - dims: the real spatial dims are first_dim..2
  bool channels_last = false;
  ShiftPadding padding = ShiftPadding::Zeros;

  C10_HOST_DEVICE int64_t plane() const { return size[0] * size[1] * size[2]; }
  C10_HOST_DEVICE int64_t offset(int64_t n, int64_t c, int64_t z, int64_t y, int64_t x) const {
    const int64_t pix = (z * size[1] + y) * size[2] + x;
    return channels_last ? (n * plane() + pix) * C + c : (n * C + c) * plane() + pix;
  }
  // Element e (memory order of a dense tensor in this layout) -> n, c, (z, y, x).
  C10_HOST_DEVICE void coords(int64_t e, int64_t& n, int64_t& c, int64_t* pos) const {
    int64_t pix;
    if (channels_last) {
      c = e % C;
      const int64_t r = e / C;
      pix = r % plane();
      n = r / plane();
    } else {
      pix = e % plane();
      const int64_t r = e / plane();
      c = r % C;
      n = r / C;
    }
    pos[2] = pix % size[2];
    pos[1] = (pix / size[2]) % size[1];
    pos[0] = pix / (size[2] * size[1]);
  }
};

// Plan layout: double [C][kDims][kMaxTaps][2] = (tap t, weight w), as the CPU kernel's ShiftPlan: rounded plan
// one tap t = round(s), weight 1; linear plan taps ceil(s) (weight 1 - a) and ceil(s) - 1 (weight a),
// a = ceil(s) - s. Dims that are not spatial dims of x have one tap 0 with weight 1.
constexpr int kPlanStride = kDims * kMaxTaps * 2;
C10_HOST_DEVICE inline int plan_index(int d, int k) { return (d * kMaxTaps + k) * 2; }

// Host: fills g's channel count, sizes and taps, and plan [C * kPlanStride], from the shifts as doubles
// (sp [C, dims] row-major); the same arithmetic (and error) as the CPU kernel's make_plan.
inline void fill_plan(const char* op, const double* sp, int64_t channels, at::IntArrayRef spatial, bool linear,
                      Geometry& g, double* plan) {
  const int dims = static_cast<int>(spatial.size());
  g.C = channels;
  g.first_dim = kDims - dims;
  for (int d = 0; d < kDims; ++d) {
    g.size[d] = d >= g.first_dim ? spatial[d - g.first_dim] : 1;
    g.ntaps[d] = (linear && d >= g.first_dim) ? 2 : 1;
  }
  for (int64_t c = 0; c < g.C; ++c) {
    for (int d = 0; d < kDims; ++d) {
      const double v = d >= g.first_dim ? sp[c * dims + d - g.first_dim] : 0.0;
      TORCH_CHECK_VALUE(std::isfinite(v) && std::abs(v) < 1e12, op, ": shifts must be finite (|s| < 1e12), got ",
                        v, " at [", c, ", ", d - g.first_dim, "]");
      double taps[kMaxTaps] = {0, 0}, weights[kMaxTaps] = {1, 0};
      if (d >= g.first_dim) {
        if (linear) {
          const double ce = std::ceil(v);
          taps[0] = ce;
          weights[0] = 1.0 - (ce - v);
          taps[1] = ce - 1;
          weights[1] = ce - v;
        } else {
          taps[0] = round_shift(v);
        }
      }
      for (int k = 0; k < kMaxTaps; ++k) {
        plan[c * kPlanStride + plan_index(d, k)] = taps[k];
        plan[c * kPlanStride + plan_index(d, k) + 1] = weights[k];
      }
    }
  }
}

C10_HOST_DEVICE inline int64_t tap(const double* pc, int d, int k) { return static_cast<int64_t>(pc[plan_index(d, k)]); }
C10_HOST_DEVICE inline double weight(const double* pc, int d, int k) { return pc[plan_index(d, k) + 1]; }

// ------------------------------------------------------------------ forward

// x[map(pos - t)] (rounded) or the sum over tap combinations of w * x[map(pos - t)] (linear; terms in the CPU
// kernel's order kz, ky, kx, zero-weight terms and zero-padded sources skipped, weights multiplied in double).
template <typename T, typename A, bool kLinear>
C10_HOST_DEVICE T forward_element(const T* x, const double* plan, const Geometry& g, int64_t e) {
  int64_t n, c, pos[kDims];
  g.coords(e, n, c, pos);
  const double* pc = plan + c * kPlanStride;
  if (!kLinear) {
    int64_t src[kDims];
    bool inside = true;
    for (int d = 0; d < kDims; ++d) {
      src[d] = map_shift_index(pos[d] - tap(pc, d, 0), g.size[d], g.padding);
      inside = inside && src[d] >= 0;
    }
    return inside ? x[g.offset(n, c, src[0], src[1], src[2])] : T(0);
  }
  A sum = A(0);
  for (int kz = 0; kz < g.ntaps[0]; ++kz) {
    const double wz = weight(pc, 0, kz);
    const int64_t iz = map_shift_index(pos[0] - tap(pc, 0, kz), g.size[0], g.padding);
    if (iz < 0 || wz == 0) continue;
    for (int ky = 0; ky < g.ntaps[1]; ++ky) {
      const double wy = weight(pc, 1, ky);
      const int64_t iy = map_shift_index(pos[1] - tap(pc, 1, ky), g.size[1], g.padding);
      if (iy < 0 || wy == 0) continue;
      for (int kx = 0; kx < g.ntaps[2]; ++kx) {
        const double wx = weight(pc, 2, kx);
        const int64_t ix = map_shift_index(pos[2] - tap(pc, 2, kx), g.size[2], g.padding);
        if (ix < 0 || wx == 0) continue;
        sum += static_cast<A>(wz * wy * wx) * static_cast<A>(x[g.offset(n, c, iz, iy, ix)]);
      }
    }
  }
  return static_cast<T>(sum);
}

// ------------------------------------------------------------------ adjoint (input gradient)

// The output positions i in [0, L) of one dim whose source map(i - t) is j: at most two ranges. Every padding but
// border has at most two such i (the window i - t, L long, meets each residue class of the index map's period,
// 2L - 2 or 2L or L, at most once); border sends whole runs to the edges.
struct Preimage {
  int64_t lo[2] = {0, 0}, hi[2] = {0, 0};
  int count = 0;
  C10_HOST_DEVICE void point(int64_t i, int64_t L) {
    if (i >= 0 && i < L) {
      lo[count] = i;
      hi[count] = i + 1;
      ++count;
    }
  }
  C10_HOST_DEVICE void range(int64_t a, int64_t b) {
    if (b > a) {
      lo[count] = a;
      hi[count] = b;
      ++count;
    }
  }
};

C10_HOST_DEVICE inline int64_t pos_mod(int64_t v, int64_t m) {
  const int64_t r = v % m;
  return r < 0 ? r + m : r;
}

C10_HOST_DEVICE inline int64_t clamp_to(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

C10_HOST_DEVICE inline Preimage preimage(int64_t j, int64_t L, int64_t t, ShiftPadding padding) {
  Preimage p;
  switch (padding) {
    case ShiftPadding::Zeros:
      p.point(j + t, L);
      break;
    case ShiftPadding::Border:
      if (L == 1) {
        p.point(0, L);
      } else if (j == 0) {  // every source index <= 0
        p.range(0, clamp_to(t + 1, 0, L));
      } else if (j == L - 1) {  // every source index >= L - 1
        p.range(clamp_to(L - 1 + t, 0, L), L);
      } else {
        p.point(j + t, L);
      }
      break;
    case ShiftPadding::Periodic:
      p.point(pos_mod(j + t, L), L);
      break;
    case ShiftPadding::Reflect: {  // sources u = j or u = -j (mod 2L - 2); one class at the edges
      if (L == 1) {
        p.point(0, L);
        break;
      }
      const int64_t period = 2 * L - 2;
      p.point(pos_mod(j + t, period), L);
      if (j != 0 && j != L - 1) p.point(pos_mod(t - j, period), L);
      break;
    }
    case ShiftPadding::Symmetric: {  // sources u = j or u = -1 - j (mod 2L)
      const int64_t period = 2 * L;
      p.point(pos_mod(j + t, period), L);
      p.point(pos_mod(t - 1 - j, period), L);
      break;
    }
  }
  return p;
}

// gx[e] = sum over tap combinations of w * (sum of g over the output positions whose source is e's position).
template <typename T, typename A>
C10_HOST_DEVICE T adjoint_element(const T* g, const double* plan, const Geometry& geo, int64_t e) {
  int64_t n, c, pos[kDims];
  geo.coords(e, n, c, pos);
  const double* pc = plan + c * kPlanStride;
  Preimage pre[kDims][kMaxTaps];
  for (int d = 0; d < kDims; ++d)
    for (int k = 0; k < geo.ntaps[d]; ++k) pre[d][k] = preimage(pos[d], geo.size[d], tap(pc, d, k), geo.padding);
  A acc = A(0);
  for (int kz = 0; kz < geo.ntaps[0]; ++kz) {
    for (int ky = 0; ky < geo.ntaps[1]; ++ky) {
      for (int kx = 0; kx < geo.ntaps[2]; ++kx) {
        const A w = static_cast<A>(weight(pc, 0, kz) * weight(pc, 1, ky) * weight(pc, 2, kx));
        if (w == A(0)) continue;
        const Preimage &pz = pre[0][kz], &py = pre[1][ky], &px = pre[2][kx];
        A sum = A(0);
        for (int rz = 0; rz < pz.count; ++rz)
          for (int64_t iz = pz.lo[rz]; iz < pz.hi[rz]; ++iz)
            for (int ry = 0; ry < py.count; ++ry)
              for (int64_t iy = py.lo[ry]; iy < py.hi[ry]; ++iy)
                for (int rx = 0; rx < px.count; ++rx)
                  for (int64_t ix = px.lo[rx]; ix < px.hi[rx]; ++ix)
                    sum += static_cast<A>(g[geo.offset(n, c, iz, iy, ix)]);
        acc += w * sum;
      }
    }
  }
  return static_cast<T>(acc);
}

// ------------------------------------------------------------------ shift gradient

// acc[d] += g * d(interpolation)/dp_d at element q (image x pixel) of channel c: the CPU kernel's formula (the
// derivative of tap 0's weight is -1, of tap 1's +1, times the other dims' weights), in double.
template <typename T>
C10_HOST_DEVICE void shifts_grad_element(const T* g, const T* x, const double* plan, const Geometry& geo, int64_t c,
                                         int64_t q, double* acc) {
  const double* pc = plan + c * kPlanStride;
  const int64_t n = q / geo.plane(), pix = q % geo.plane();
  const int64_t z = pix / (geo.size[1] * geo.size[2]), y = (pix / geo.size[2]) % geo.size[1], xo = pix % geo.size[2];
  const double gv = static_cast<double>(g[geo.offset(n, c, z, y, xo)]);
  for (int kz = 0; kz < geo.ntaps[0]; ++kz) {
    const int64_t iz = map_shift_index(z - tap(pc, 0, kz), geo.size[0], geo.padding);
    if (iz < 0) continue;
    const double wz = weight(pc, 0, kz), sz = kz == 0 ? -1.0 : 1.0;
    for (int ky = 0; ky < geo.ntaps[1]; ++ky) {
      const int64_t iy = map_shift_index(y - tap(pc, 1, ky), geo.size[1], geo.padding);
      if (iy < 0) continue;
      const double wy = weight(pc, 1, ky), sy = ky == 0 ? -1.0 : 1.0;
      for (int kx = 0; kx < geo.ntaps[2]; ++kx) {
        const int64_t ix = map_shift_index(xo - tap(pc, 2, kx), geo.size[2], geo.padding);
        if (ix < 0) continue;
        const double wx = weight(pc, 2, kx), sx = kx == 0 ? -1.0 : 1.0;
        const double v = gv * static_cast<double>(x[geo.offset(n, c, iz, iy, ix)]);
        acc[0] += sz * wy * wx * v;
        acc[1] += wz * sy * wx * v;
        acc[2] += wz * wy * sx * v;
      }
    }
  }
}

}  // namespace shift_device
}  // namespace ops
}  // namespace fxeff
