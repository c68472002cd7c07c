// CUDA kernels of fxeff::shift: forward, fused shift_pool (shift + ATen pad/pool), input gradient (adjoint)
// and shift gradient. Same semantics as cpu/shift_kernel.cpp (read that file's header first).
//
// Every input is viewed as [N, C, D, H, W] (leading spatial dims 1 for shift1d/2d), NCDHW or channels-last,
// dense in its own layout; output element e is the thread's element e in memory order, so reads and writes
// of the output are coalesced in either layout. The per-element arithmetic lives in shift_elements.cuh
// (host-and-device, so tests also run it on the CPU). The per-channel taps (shift t and weight w per dim) are
// computed on the host by the CPU kernel's arithmetic (so the rounding of sparse/grouped shifts is identical by
// construction) and uploaded: this costs one small device-to-host copy of `shifts` (a synchronisation) per
// call, which also lets the "shifts must be finite" check raise like the CPU's.
//
// Determinism: no atomics anywhere. The adjoint is a gather (each input-gradient element sums the output
// gradients that read it, in a fixed order); the shift gradient reduces per channel in two fixed-order passes
// (blocks of a channel write partial sums, a second kernel adds them in order), so results are bitwise
// reproducible run to run for a given shape.
#include "launch.cuh"
#include "shift_elements.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/avg_pool1d.h>
#include <ATen/ops/avg_pool2d.h>
#include <ATen/ops/avg_pool3d.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace fxeff {
namespace ops {
namespace {

using namespace shift_device;

using namespace cuda_launch;

// The plan on x's device (see shift_elements.cuh), from a host copy of the shifts: the one synchronisation.
at::Tensor make_device_plan(const char* op, const at::Tensor& shifts, at::IntArrayRef spatial, bool linear,
                            Geometry& g) {
  const at::Tensor s = shifts.to(at::kCPU, at::kDouble).contiguous();
  at::Tensor plan = at::empty({shifts.size(0), kPlanStride}, s.options());
  fill_plan(op, s.const_data_ptr<double>(), shifts.size(0), spatial, linear, g, plan.mutable_data_ptr<double>());
  return plan.to(shifts.device());
}


template <typename T, typename A, bool kLinear>
__global__ void shift_forward_kernel(const T* __restrict__ x, T* __restrict__ out, const double* __restrict__ plan,
                                     Geometry g, int64_t total) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(blockDim.x) * gridDim.x)
    out[e] = forward_element<T, A, kLinear>(x, plan, g, e);
}

// A gather: each input-gradient element sums the output gradients that read it (no scatter, no atomics).
template <typename T, typename A>
__global__ void shift_adjoint_kernel(const T* __restrict__ g, T* __restrict__ gx, const double* __restrict__ plan,
                                     Geometry geo, int64_t total) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(blockDim.x) * gridDim.x)
    gx[e] = adjoint_element<T, A>(g, plan, geo, e);
}

// Block b handles channel b / splits, elements [split * per_split, ...) of that channel (images x pixels), and
// writes partial[b][d]: its elements' sums accumulated per thread in double, then reduced over the block by a
// fixed-order tree in shared memory.
template <typename T>
__global__ void shifts_grad_partial_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                           const double* __restrict__ plan, Geometry geo, int64_t splits,
                                           int64_t per_split, double* __restrict__ partial) {
  __shared__ double buf[kDims][kThreads];
  const int64_t c = blockIdx.x / splits, split = blockIdx.x % splits;
  const int64_t per_channel = geo.N * geo.plane();
  const int64_t begin = split * per_split, end = begin + per_split < per_channel ? begin + per_split : per_channel;
  double acc[kDims] = {0, 0, 0};
  for (int64_t q = begin + threadIdx.x; q < end; q += blockDim.x) shifts_grad_element<T>(g, x, plan, geo, c, q, acc);
  for (int d = 0; d < kDims; ++d) buf[d][threadIdx.x] = acc[d];
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride)
      for (int d = 0; d < kDims; ++d) buf[d][threadIdx.x] += buf[d][threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0)
    for (int d = 0; d < kDims; ++d) partial[blockIdx.x * kDims + d] = buf[d][0];
}

// grad[c][d] = -sum over the channel's splits (in order) of partial: d/ds = -d/dp.
__global__ void shifts_grad_finish_kernel(const double* __restrict__ partial, double* __restrict__ grad, int64_t C,
                                          int64_t splits, int first_dim) {
  const int dims = kDims - first_dim;
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= C * dims) return;
  const int64_t c = i / dims;
  const int d = static_cast<int>(i % dims) + first_dim;
  double sum = 0;
  for (int64_t s = 0; s < splits; ++s) sum += partial[(c * splits + s) * kDims + d];
  grad[i] = -sum;
}

// ------------------------------------------------------------------ entry points

bool is_channels_last(const at::Tensor& t) {
  const auto fmt = t.suggest_memory_format();
  return (t.dim() == 4 && fmt == at::MemoryFormat::ChannelsLast) ||
         (t.dim() == 5 && fmt == at::MemoryFormat::ChannelsLast3d);
}

at::MemoryFormat own_format(const at::Tensor& t) {
  if (!is_channels_last(t)) return at::MemoryFormat::Contiguous;
  return t.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
}

Geometry geometry(const char* op, const at::Tensor& x, const at::Tensor& shifts, c10::string_view padding,
                  bool linear, at::Tensor& plan) {
  Geometry g;
  g.padding = parse_shift_padding(op, padding);
  plan = make_device_plan(op, shifts, x.sizes().slice(2), linear, g);
  g.N = x.size(0);
  g.channels_last = is_channels_last(x);
  return g;
}

void run_forward(const at::Tensor& x, at::Tensor& out, const at::Tensor& plan, const Geometry& g, bool linear) {
  const int64_t total = x.numel();
  if (total == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fxeff_shift_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    if (linear)
      shift_forward_kernel<scalar_t, A, true><<<blocks_for(total), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), plan.const_data_ptr<double>(), g, total);
    else
      shift_forward_kernel<scalar_t, A, false><<<blocks_for(total), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), plan.const_data_ptr<double>(), g, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor shift_cuda(const at::Tensor& x_in, const at::Tensor& shifts, c10::string_view padding,
                      c10::string_view mode) {
  const char* op = "fxeff.shift";
  check_shift_args(op, x_in, shifts, false);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool linear = parse_shift_mode(op, mode) == ShiftMode::Active;
  at::Tensor plan;
  const Geometry g = geometry(op, x_in, shifts, padding, linear, plan);
  const at::Tensor x = x_in.contiguous(own_format(x_in));
  at::Tensor out = at::empty_like(x);
  run_forward(x, out, plan, g, linear);
  return out;
}

// shift, then F.pad(pad) (negative = crop), then avg_pool(kernel = stride = pool, ceil_mode): the shift kernel
// and ATen's CUDA pad and pooling (the CPU kernel's unfused path).
at::Tensor shift_pool_cuda(const at::Tensor& x_in, const at::Tensor& shifts, c10::string_view padding,
                           c10::string_view mode, at::IntArrayRef pad, at::IntArrayRef pool) {
  const char* op = "fxeff.shift_pool";
  check_shift_args(op, x_in, shifts, false);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t dims = x_in.dim() - 2;
  TORCH_CHECK_VALUE(static_cast<int64_t>(pad.size()) == 2 * dims, op, ": pad must have 2 * dims = ", 2 * dims,
                    " entries (F.pad order: last dim first), got ", pad);
  TORCH_CHECK_VALUE(static_cast<int64_t>(pool.size()) == dims, op, ": pool must have dims = ", dims,
                    " entries, got ", pool);
  std::vector<int64_t> kernel(dims);
  for (int64_t d = 0; d < dims; ++d) {
    const int64_t before = pad[2 * (dims - 1 - d)], after = pad[2 * (dims - 1 - d) + 1];
    const int64_t len = x_in.size(2 + d) + before + after;
    TORCH_CHECK_VALUE(len >= 1, op, ": input size ", x_in.size(2 + d), " along spatial dim ", d,
                      " is too small for the emulated depthwise conv (size after pad ", len, " < 1)");
    TORCH_CHECK_VALUE(pool[d] >= 1, op, ": pool must be >= 1, got ", pool);
    kernel[d] = std::min(pool[d], len);
  }
  const bool linear = parse_shift_mode(op, mode) == ShiftMode::Active;
  at::Tensor plan;
  const Geometry g = geometry(op, x_in, shifts, padding, linear, plan);
  const at::Tensor x = x_in.contiguous(own_format(x_in));
  at::Tensor shifted = at::empty_like(x);
  run_forward(x, shifted, plan, g, linear);
  if (std::any_of(pad.begin(), pad.end(), [](int64_t v) { return v != 0; })) shifted = at::constant_pad_nd(shifted, pad, 0);
  if (std::all_of(pool.begin(), pool.end(), [](int64_t v) { return v == 1; })) return shifted;
  if (dims == 1) return at::avg_pool1d(shifted, kernel, pool, {0}, true, true);
  if (dims == 2) return at::avg_pool2d(shifted, kernel, pool, {0, 0}, true, true);
  return at::avg_pool3d(shifted, kernel, pool, {0, 0, 0}, true, true);
}

at::Tensor shift_input_grad_cuda(const at::Tensor& grad_out, const at::Tensor& shifts, c10::string_view padding,
                                 c10::string_view mode) {
  const char* op = "fxeff.shift_input_grad";
  check_shift_args(op, grad_out, shifts, false);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const bool linear = parse_shift_mode(op, mode) == ShiftMode::Active;
  at::Tensor plan;
  const Geometry geo = geometry(op, grad_out, shifts, padding, linear, plan);
  const at::Tensor g = grad_out.contiguous(own_format(grad_out));
  at::Tensor gx = at::empty_like(g);
  const int64_t total = g.numel();
  if (total == 0) return gx;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "fxeff_shift_input_grad_cuda", [&] {
    shift_adjoint_kernel<scalar_t, at::opmath_type<scalar_t>><<<blocks_for(total), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(), plan.const_data_ptr<double>(), geo, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

at::Tensor shift_shifts_grad_cuda(const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& shifts,
                                  c10::string_view padding) {
  const char* op = "fxeff.shift_shifts_grad";
  check_shift_args(op, x_in, shifts, false);
  TORCH_CHECK_VALUE(grad_out.sizes() == x_in.sizes() && grad_out.scalar_type() == x_in.scalar_type(), op,
                    ": grad_out must have x's shape and dtype ", x_in.sizes(), " ", x_in.scalar_type(), ", got ",
                    grad_out.sizes(), " ", grad_out.scalar_type());
  TORCH_CHECK_VALUE(grad_out.device() == x_in.device(), op, ": grad_out must be on x's device ", x_in.device(),
                    ", got ", grad_out.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor plan;
  const Geometry geo = geometry(op, x_in, shifts, padding, true, plan);
  const at::MemoryFormat fmt = own_format(x_in);
  const at::Tensor x = x_in.contiguous(fmt), g = grad_out.contiguous(fmt);
  const int64_t dims = x_in.dim() - 2;
  at::Tensor grad = at::empty({shifts.size(0), dims}, shifts.options().dtype(at::kDouble));
  if (grad.numel() == 0) return grad.to(shifts.scalar_type());
  // Splits per channel depend on the shape only, so the summation order (and result) does too.
  const int64_t per_channel = geo.N * geo.plane();
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(64, per_channel / (kThreads * 16)));
  const int64_t per_split = (per_channel + splits - 1) / splits;
  at::Tensor partial = at::empty({geo.C * splits, kDims}, grad.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "fxeff_shift_shifts_grad_cuda", [&] {
    shifts_grad_partial_kernel<scalar_t><<<geo.C * splits, kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), plan.const_data_ptr<double>(), geo, splits,
        per_split, partial.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const int64_t outputs = geo.C * dims;
  shifts_grad_finish_kernel<<<(outputs + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      partial.const_data_ptr<double>(), grad.mutable_data_ptr<double>(), geo.C, splits, geo.first_dim);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad.to(shifts.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fxeff, CUDA, m) {
  m.impl("shift", &shift_cuda);
  m.impl("shift_pool", &shift_pool_cuda);
  m.impl("shift_input_grad", &shift_input_grad_cuda);
  m.impl("shift_shifts_grad", &shift_shifts_grad_cuda);
}

}  // namespace ops
}  // namespace fxeff
