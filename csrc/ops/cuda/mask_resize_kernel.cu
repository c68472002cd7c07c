// CUDA kernel of fxeff::mask_resize, one thread per output cell: "any active" over the cell
// [floor(i*in/out), ceil((i+1)*in/out)) per dimension when shrinking, the nearest input floor(i*in/out) when
// growing (F.interpolate(mode="nearest")). Same semantics and checks as cpu/mask_resize_kernel.cpp; the per-cell
// code is focus_elements.cuh's resize_element (also run on the CPU by tests/_focus_cuda_emulation.cpp). Pure
// boolean logic: bitwise equal to the CPU kernel.
#include "launch.cuh"
#include "focus_elements.cuh"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

namespace fxeff {
namespace ops {
namespace {

using namespace focus_device;

using namespace cuda_launch;

__global__ void mask_resize_kernel(const bool* __restrict__ src, bool* __restrict__ out, int64_t hi, int64_t wi,
                                   int64_t ho, int64_t wo, int64_t total) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(blockDim.x) * gridDim.x)
    out[e] = resize_element(src, hi, wi, ho, wo, e);
}

at::Tensor mask_resize_cuda(const at::Tensor& mask, at::IntArrayRef size) {
  TORCH_CHECK_VALUE(mask.dim() == 3 && mask.scalar_type() == at::kBool,
                    "fxeff.mask_resize: mask must be bool [N, H, W], got ", mask.dim(), "-D ", mask.sizes(), " ",
                    mask.scalar_type());
  TORCH_CHECK_VALUE(size.size() == 2 && size[0] > 0 && size[1] > 0,
                    "fxeff.mask_resize: size must be two positive ints [H, W], got ", size);
  const int64_t n = mask.size(0), hi = mask.size(1), wi = mask.size(2);
  const int64_t ho = size[0], wo = size[1];
  TORCH_CHECK_VALUE(hi > 0 && wi > 0, "fxeff.mask_resize: mask must not be empty, got ", mask.sizes());
  const c10::cuda::CUDAGuard guard(mask.device());
  const at::Tensor src = mask.contiguous();
  at::Tensor out = at::empty({n, ho, wo}, mask.options());
  const int64_t total = n * ho * wo;
  if (total == 0) return out;
  const int64_t blocks = blocks_for(total);
  mask_resize_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      src.const_data_ptr<bool>(), out.mutable_data_ptr<bool>(), hi, wi, ho, wo, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fxeff, CUDA, m) { m.impl("mask_resize", &mask_resize_cuda); }

}  // namespace ops
}  // namespace fxeff
