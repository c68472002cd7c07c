// Shared by the CPU (and future CUDA) kernels of fxeff::hetconv2d: argument checks and the geometry.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>

namespace fxeff {
namespace ops {

// A HetConv's shape, normalised once per call.
struct HetGeometry {
  int64_t n, m, h, w;   // input [n, m, h, w]
  int64_t o, k, part;   // o filters, k x k kernel, part P
  int64_t mb, ob;       // channels per block (m / part), filters per block (o / part)
  int64_t ho, wo;       // output
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t taps() const { return k * k - 1; }  // KxK taps other than the centre
  int64_t centre_tap() const { return (k / 2) * k + k / 2; }  // its index in the row-major KxK kernel
  // The kernel index (row-major, ky * k + kx) of off-centre tap t in [0, taps()): the centre skipped.
  int64_t kernel_tap(int64_t t) const { return t < centre_tap() ? t : t + 1; }
  // The centre tap of output (yo, xo) reads input (yo * sh + ch, xo * sw + cw): ch = dh * (k / 2) - ph.
  int64_t ch() const { return dh * (k / 2) - ph; }
  int64_t cw() const { return dw * (k / 2) - pw; }
  // Stride 1 and "same" padding: the centre samples are x itself.
  bool centre_is_x() const { return sh == 1 && sw == 1 && ch() == 0 && cw() == 0; }
};

// Validates every argument (naming the op, the argument, expected vs got) and returns the geometry.
HetGeometry check_hetconv2d_args(const char* op, const at::Tensor& x, const at::Tensor& weight_kxk,
                                 const at::Tensor& weight_1x1, const c10::optional<at::Tensor>& bias, int64_t part,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation);

// Whether this thread runs fxeff::hetconv2d for autograd (a call that records a graph: its weights are being
// trained), set by HetConvRecording in the autograd kernel; the CPU kernel keeps no packed weights for such calls.
bool hetconv2d_recording();

struct HetConvRecording {
  HetConvRecording();
  ~HetConvRecording();
  HetConvRecording(const HetConvRecording&) = delete;
  HetConvRecording& operator=(const HetConvRecording&) = delete;

 private:
  bool previous_;
};

}  // namespace ops
}  // namespace fxeff
