// The CUDA shift kernels' per-element code (csrc/ops/cuda/shift_elements.cuh) compiled for the host and run in
// plain loops, registered as fxeff_emu::* for tests/test_cuda_kernels.py: checks the device code's arithmetic
// against the CPU kernel on machines without a GPU (the launch geometry and the block reduction are not covered).
#include "../csrc/ops/cuda/shift_elements.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <vector>

namespace {

using namespace fxeff::ops;
using namespace fxeff::ops::shift_device;

bool is_channels_last(const at::Tensor& t) {
  const auto fmt = t.suggest_memory_format();
  return (t.dim() == 4 && fmt == at::MemoryFormat::ChannelsLast) ||
         (t.dim() == 5 && fmt == at::MemoryFormat::ChannelsLast3d);
}

at::MemoryFormat own_format(const at::Tensor& t) {
  if (!is_channels_last(t)) return at::MemoryFormat::Contiguous;
  return t.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
}

// padding: the index in fxeff.ops.SHIFT_PADDINGS (the ShiftPadding order).
std::vector<double> plan_of(const at::Tensor& x, const at::Tensor& shifts, int64_t padding, bool linear, Geometry& g) {
  const at::Tensor s = shifts.to(at::kDouble).contiguous();
  std::vector<double> plan(shifts.size(0) * kPlanStride);
  fill_plan("fxeff_emu", s.const_data_ptr<double>(), shifts.size(0), x.sizes().slice(2), linear, g, plan.data());
  g.N = x.size(0);
  g.padding = static_cast<ShiftPadding>(padding);
  g.channels_last = is_channels_last(x);
  return plan;
}

at::Tensor shift(const at::Tensor& x_in, const at::Tensor& shifts, int64_t padding, bool linear) {
  Geometry g;
  const std::vector<double> plan = plan_of(x_in, shifts, padding, linear, g);
  const at::Tensor x = x_in.contiguous(own_format(x_in));
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "emu_shift", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for (int64_t e = 0; e < x.numel(); ++e)
      op[e] = linear ? forward_element<scalar_t, A, true>(xp, plan.data(), g, e)
                     : forward_element<scalar_t, A, false>(xp, plan.data(), g, e);
  });
  return out;
}

at::Tensor input_grad(const at::Tensor& g_in, const at::Tensor& shifts, int64_t padding, bool linear) {
  Geometry geo;
  const std::vector<double> plan = plan_of(g_in, shifts, padding, linear, geo);
  const at::Tensor g = g_in.contiguous(own_format(g_in));
  at::Tensor gx = at::empty_like(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "emu_input_grad", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* op = gx.mutable_data_ptr<scalar_t>();
    for (int64_t e = 0; e < g.numel(); ++e) op[e] = adjoint_element<scalar_t, at::opmath_type<scalar_t>>(gp, plan.data(), geo, e);
  });
  return gx;
}

at::Tensor shifts_grad(const at::Tensor& g_in, const at::Tensor& x_in, const at::Tensor& shifts, int64_t padding) {
  Geometry geo;
  const std::vector<double> plan = plan_of(x_in, shifts, padding, true, geo);
  const at::Tensor x = x_in.contiguous(own_format(x_in)), g = g_in.contiguous(own_format(x_in));
  const int64_t dims = x.dim() - 2;
  at::Tensor grad = at::empty({shifts.size(0), dims}, shifts.options().dtype(at::kDouble));
  double* out = grad.mutable_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "emu_shifts_grad", [&] {
    for (int64_t c = 0; c < geo.C; ++c) {
      double acc[kDims] = {0, 0, 0};
      for (int64_t q = 0; q < geo.N * geo.plane(); ++q)
        shifts_grad_element<scalar_t>(g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), plan.data(), geo, c,
                                      q, acc);
      for (int64_t d = 0; d < dims; ++d) out[c * dims + d] = -acc[geo.first_dim + d];
    }
  });
  return grad.to(shifts.scalar_type());
}

}  // namespace

TORCH_LIBRARY(fxeff_emu, m) {
  m.def("shift(Tensor x, Tensor shifts, int padding, bool linear) -> Tensor", &shift);
  m.def("input_grad(Tensor grad_out, Tensor shifts, int padding, bool linear) -> Tensor", &input_grad);
  m.def("shifts_grad(Tensor grad_out, Tensor x, Tensor shifts, int padding) -> Tensor", &shifts_grad);
}
