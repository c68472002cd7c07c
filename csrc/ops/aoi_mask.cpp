// Schemas of the Area-of-Interest threshold (one bool mask per image) and of its halo (the mask grown by a max
// filter). dilate_mask's kernel for devices without their own (CUDA, ...) is here, made of ATen ops; the CPU one is
// in cpu/aoi_mask_kernel.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/constant_pad_nd.h>
#include <torch/library.h>

namespace fxeff {
namespace ops {
namespace {

// OR over every window of k along dim (length L -> L - k + 1), by doubling: about log2(k) + 1 ORs of shifted views.
at::Tensor window_any(const at::Tensor& mask, int64_t dim, int64_t k) {
  int64_t span = 1;
  at::Tensor cur = mask;
  while (2 * span <= k) {
    cur = cur.narrow(dim, 0, cur.size(dim) - span).logical_or(cur.narrow(dim, span, cur.size(dim) - span));
    span *= 2;
  }
  if (span == k) return cur;
  const int64_t out = mask.size(dim) - k + 1;
  return cur.narrow(dim, 0, out).logical_or(cur.narrow(dim, k - span, out));
}

at::Tensor dilate_mask_composite(const at::Tensor& mask, int64_t halo) {
  TORCH_CHECK_VALUE(mask.dim() == 3 && mask.scalar_type() == at::kBool, "fxeff.dilate_mask: mask must be bool "
                    "[N, H, W], got ", mask.dim(), "-D ", mask.sizes(), " ", mask.scalar_type());
  TORCH_CHECK_VALUE(halo >= 0, "fxeff.dilate_mask: halo must be >= 0, got ", halo);
  if (halo == 0) return mask.clone();
  const at::Tensor padded = at::constant_pad_nd(mask, {halo, halo, halo, halo}, 0);
  return window_any(window_any(padded, 2, 2 * halo + 1), 1, 2 * halo + 1).contiguous();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fxeff, m) {
  m.set_python_module("fxeff.ops.aoi_mask");  // the module that calls register_fake for these ops
  m.def("aoi_mask(Tensor x, float threshold, str reduce=\"sum\") -> Tensor");
  m.def("dilate_mask(Tensor mask, int halo) -> Tensor");
}

TORCH_LIBRARY_IMPL(fxeff, CompositeExplicitAutograd, m) {
  m.impl("dilate_mask", &dilate_mask_composite);
}

}  // namespace ops
}  // namespace fxeff
