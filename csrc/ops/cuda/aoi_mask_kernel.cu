// CUDA kernel of fxeff::aoi_mask: mask[n, h, w] = reduce_c(x[n, c, h, w]) >= threshold, one thread per pixel.
// Same semantics as cpu/aoi_mask_kernel.cpp: the reduction accumulates in float (double for double) and "mean"
// is the sum divided by C; the threshold is cast to that type before the compare (as at::ge does); a NaN sum
// is never in the AoI. x is read through its strides (NCHW, channels_last or any view), no copy. The per-pixel
// code is focus_elements.cuh's aoi_element (also run on the CPU by tests/_focus_cuda_emulation.cpp). The
// CPU's sum may add the channels in another order than this kernel's sequential loop, so the two agree
// bitwise except where a pixel's sum lies within rounding of the threshold.
#include "launch.cuh"
#include "focus_elements.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace fxeff {
namespace ops {
namespace {

using namespace focus_device;

using namespace cuda_launch;

template <typename T, typename A>
__global__ void aoi_mask_kernel(const T* __restrict__ x, bool* __restrict__ out, int64_t c, int64_t h, int64_t w,
                                int64_t sn, int64_t sc, int64_t sh, int64_t sw, int64_t total, A threshold,
                                bool mean) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < total; p += int64_t(blockDim.x) * gridDim.x)
    out[p] = aoi_element<T, A>(x, c, h, w, sn, sc, sh, sw, p, threshold, mean);
}

at::Tensor aoi_mask_cuda(const at::Tensor& x, double threshold, c10::string_view reduce) {
  TORCH_CHECK_VALUE(x.dim() == 4, "fxeff.aoi_mask: x must be 4-D [N, C, H, W], got ", x.dim(), "-D ", x.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()), "fxeff.aoi_mask: x must be floating point, got ",
                    x.scalar_type());
  TORCH_CHECK_VALUE(!std::isnan(threshold), "fxeff.aoi_mask: threshold must be a number, got nan");
  TORCH_CHECK_VALUE(reduce == "sum" || reduce == "mean",
                    "fxeff.aoi_mask: reduce must be \"sum\" or \"mean\", got \"", reduce, "\"");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  at::Tensor out = at::empty({n, h, w}, x.options().dtype(at::kBool));
  const int64_t total = n * h * w;
  if (total == 0) return out;
  const bool mean = reduce == "mean";
  const int64_t blocks = blocks_for(total);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fxeff_aoi_mask_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // float for half/bfloat16/float, double for double
    aoi_mask_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<bool>(), c, h, w, x.stride(0), x.stride(1), x.stride(2),
        x.stride(3), total, static_cast<acc_t>(threshold), mean);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fxeff, CUDA, m) { m.impl("aoi_mask", &aoi_mask_cuda); }

}  // namespace ops
}  // namespace fxeff
