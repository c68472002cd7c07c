// CUDA kernel of fxeff::hetconv2d: the CPU kernel's "grouped" strategy on the vendor libraries (see
// cpu/hetconv2d_kernel.cpp): the grouped KxK conv (groups = P, centre taps and bias included; cuDNN) writes the
// output, then out += Wc0 @ x_centre in place (cuBLAS), Wc0 = weight_1x1 scattered to [O, M] with each filter's
// own channel block zero. N * M/P more MACs than the HetConv count (the zeros of Wc0) in exchange for two vendor
// calls and no im2col. _hetconv2d_set_strategy does not apply here (CPU only). Backward: the Python autograd
// (fxeff/ops/hetconv2d.py) uses the vendor conv backward, which runs on CUDA as is.
#include "launch.cuh"
#include "../hetconv2d.h"

#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>

namespace fxeff {
namespace ops {
namespace {

using namespace cuda_launch;

// wc0 [O, M]: weight_1x1 [O, M - M/P] at the other blocks' channels, zero at the filter's own block
// (filter j's block is j / (O/P)).
template <typename T>
__global__ void centre_matrix_kernel(const T* __restrict__ w1, T* __restrict__ wc0, int64_t o, int64_t m, int64_t mb,
                                     int64_t ob) {
  const int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (e >= o * m) return;
  const int64_t j = e / m, i = e % m, b = j / ob;
  const int64_t block = i / mb;
  wc0[e] = block == b ? T(0) : w1[j * (m - mb) + (block < b ? i : i - mb)];
}

// The input at every output's centre tap: x itself for stride 1 and "same" padding, else a strided crop/pad.
at::Tensor centre_samples(const at::Tensor& x, const HetGeometry& g, at::MemoryFormat fmt) {
  if (g.centre_is_x()) return x;
  const int64_t rows = (g.ho - 1) * g.sh + 1, cols = (g.wo - 1) * g.sw + 1;
  const int64_t top = -g.ch(), left = -g.cw();
  const std::array<int64_t, 4> pad{left, cols - (g.w + left), top, rows - (g.h + top)};
  return at::constant_pad_nd(x, pad, 0).slice(2, 0, rows, g.sh).slice(3, 0, cols, g.sw).contiguous(fmt);
}

at::Tensor hetconv2d_cuda(const at::Tensor& x_in, const at::Tensor& weight_kxk, const at::Tensor& weight_1x1,
                          const c10::optional<at::Tensor>& bias, int64_t part, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation) {
  const HetGeometry g =
      check_hetconv2d_args("hetconv2d", x_in, weight_kxk, weight_1x1, bias, part, stride, padding, dilation);
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::MemoryFormat fmt = x_in.suggest_memory_format();
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(fmt);
  const bool has_bias = bias.has_value() && bias->defined();
  if (x.numel() == 0 || g.o == 0) {  // nothing to multiply: the output (if any) is the bias
    at::Tensor out = at::empty({g.n, g.o, g.ho, g.wo}, x.options().memory_format(fmt));
    if (out.numel() > 0 && has_bias) {
      out.copy_(bias->view({1, g.o, 1, 1}).expand_as(out));
    } else if (out.numel() > 0) {
      out.zero_();
    }
    return out;
  }
  const at::Tensor wk = weight_kxk.contiguous(), w1 = weight_1x1.contiguous();
  at::Tensor wc0 = at::empty({g.o, g.m}, wk.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t elements = g.o * g.m;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fxeff_hetconv2d_cuda", [&] {
    centre_matrix_kernel<scalar_t><<<(elements + kThreads - 1) / kThreads, kThreads, 0,
                                     c10::cuda::getCurrentCUDAStream()>>>(
        w1.const_data_ptr<scalar_t>(), wc0.mutable_data_ptr<scalar_t>(), g.o, g.m, g.mb, g.ob);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const std::array<int64_t, 2> no_output_padding{0, 0};
  at::Tensor out = at::convolution(x, cl ? wk.contiguous(fmt) : wk, has_bias ? c10::optional<at::Tensor>(*bias)
                                                                             : c10::nullopt,
                                   stride, padding, dilation, false, no_output_padding, g.part)
                       .contiguous(fmt);
  const at::Tensor xc = centre_samples(x, g, fmt);
  const int64_t hw = g.ho * g.wo;
  if (cl) {  // pixels as rows: one GEMM over the batch
    at::Tensor out2 = out.permute({0, 2, 3, 1}).view({g.n * hw, g.o});
    at::addmm_out(out2, out2, xc.permute({0, 2, 3, 1}).reshape({g.n * hw, g.m}), wc0.t());
  } else {  // one batched GEMM, the weight broadcast over the images (batch stride 0)
    at::Tensor out3 = out.view({g.n, g.o, hw});
    at::baddbmm_out(out3, out3, wc0.unsqueeze(0).expand({g.n, g.o, g.m}), xc.view({g.n, g.m, hw}));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fxeff, CUDA, m) { m.impl("hetconv2d", &hetconv2d_cuda); }

}  // namespace ops
}  // namespace fxeff
