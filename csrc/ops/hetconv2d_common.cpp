// Device-independent part of fxeff::hetconv2d: argument checks.
#include "hetconv2d.h"

namespace fxeff {
namespace ops {

namespace {

void check_pair(const char* op, const char* name, at::IntArrayRef v, int64_t min_value) {
  TORCH_CHECK_VALUE(v.size() == 2, "fxeff.", op, ": ", name, " must have 2 elements, got ", v);
  TORCH_CHECK_VALUE(v[0] >= min_value && v[1] >= min_value, "fxeff.", op, ": ", name, " must be >= ", min_value,
                    ", got ", v);
}

void check_like_x(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.scalar_type() == x.scalar_type(), "fxeff.", op, ": ", name, " dtype must equal x dtype ",
                    x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), "fxeff.", op, ": ", name, " must be on x's device ", x.device(),
                    ", got ", t.device());
}

}  // namespace

HetGeometry check_hetconv2d_args(const char* op, const at::Tensor& x, const at::Tensor& weight_kxk,
                                 const at::Tensor& weight_1x1, const c10::optional<at::Tensor>& bias, int64_t part,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK_VALUE(x.dim() == 4, "fxeff.", op, ": x must be 4-D [N, M, H, W], got ", x.dim(), "-D ", x.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()), "fxeff.", op, ": x must be floating point, got ",
                    x.scalar_type());
  TORCH_CHECK_VALUE(part >= 1, "fxeff.", op, ": part must be >= 1, got ", part);
  const int64_t m = x.size(1);
  TORCH_CHECK_VALUE(m % part == 0, "fxeff.", op, ": part must divide the input channels, got part=", part, " with ",
                    m, " input channels");
  TORCH_CHECK_VALUE(weight_kxk.dim() == 4, "fxeff.", op, ": weight_kxk must be 4-D [N, M/part, K, K], got ",
                    weight_kxk.dim(), "-D ", weight_kxk.sizes());
  const int64_t o = weight_kxk.size(0), k = weight_kxk.size(2);
  TORCH_CHECK_VALUE(weight_kxk.size(1) == m / part && weight_kxk.size(3) == k, "fxeff.", op,
                    ": weight_kxk must be [N, M/part, K, K] = [", o, ", ", m / part, ", K, K] for ", m,
                    " input channels and part=", part, ", got ", weight_kxk.sizes());
  TORCH_CHECK_VALUE(k % 2 == 1, "fxeff.", op, ": the kernel size K must be odd (a centre tap), got weight_kxk ",
                    weight_kxk.sizes());
  TORCH_CHECK_VALUE(o % part == 0, "fxeff.", op, ": part must divide the output channels (filters), got part=",
                    part, " with ", o, " filters");
  TORCH_CHECK_VALUE(weight_1x1.dim() == 2 && weight_1x1.size(0) == o && weight_1x1.size(1) == m - m / part, "fxeff.",
                    op, ": weight_1x1 must be [N, M - M/part] = [", o, ", ", m - m / part, "], got ",
                    weight_1x1.sizes());
  check_like_x(op, "weight_kxk", weight_kxk, x);
  check_like_x(op, "weight_1x1", weight_1x1, x);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == o, "fxeff.", op, ": bias must be [", o, "], got ",
                      bias->sizes());
    check_like_x(op, "bias", *bias, x);
  }
  check_pair(op, "stride", stride, 1);
  check_pair(op, "padding", padding, 0);
  check_pair(op, "dilation", dilation, 1);
  HetGeometry g{};
  g.n = x.size(0); g.m = m; g.h = x.size(2); g.w = x.size(3);
  g.o = o; g.k = k; g.part = part; g.mb = m / part; g.ob = o / part;
  g.sh = stride[0]; g.sw = stride[1]; g.ph = padding[0]; g.pw = padding[1]; g.dh = dilation[0]; g.dw = dilation[1];
  TORCH_CHECK_VALUE(g.h + 2 * g.ph >= g.dh * (k - 1) + 1 && g.w + 2 * g.pw >= g.dw * (k - 1) + 1, "fxeff.", op,
                    ": padded input ", g.h + 2 * g.ph, "x", g.w + 2 * g.pw, " is smaller than the dilated kernel ",
                    g.dh * (k - 1) + 1, "x", g.dw * (k - 1) + 1);
  g.ho = (g.h + 2 * g.ph - g.dh * (k - 1) - 1) / g.sh + 1;
  g.wo = (g.w + 2 * g.pw - g.dw * (k - 1) - 1) / g.sw + 1;
  return g;
}

namespace {
thread_local bool recording = false;
}  // namespace

bool hetconv2d_recording() { return recording; }

HetConvRecording::HetConvRecording() : previous_(recording) { recording = true; }

HetConvRecording::~HetConvRecording() { recording = previous_; }

}  // namespace ops
}  // namespace fxeff
