// Autograd of fxeff's trainable ops, in C++ (TORCH_LIBRARY_IMPL(fxeff, Autograd)).
//
// Registered in Python (torch.library.register_autograd), every call entered Python at the Autograd key, with
// or without grad: 4-9 us per call before any work, more than a small conv costs. Here a call under no_grad, or
// on inputs that need no grad, costs what an ATen op's autograd layer costs. Each backward calls the ops and
// ATen functions the Python one called, in the same order, so gradients are the same bit for bit.
#include "hetconv2d.h"

#include <ATen/TensorOperators.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/clamp.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/logical_not.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <initializer_list>
#include <vector>

namespace fxeff {
namespace ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

std::vector<int64_t> ints(const c10::IValue& value) { return value.toIntVector(); }

// Whether a call must record a backward: grad mode on and an input that requires grad. When not (inference),
// the op runs below autograd at once, without a graph node or saved tensors.
bool records(std::initializer_list<const at::Tensor*> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : inputs) {
    if (t->defined() && t->requires_grad()) return true;
  }
  return false;
}

const at::Tensor& or_undefined(const c10::optional<at::Tensor>& t) {
  static const at::Tensor undefined;
  return t.has_value() ? *t : undefined;
}

// ---------------------------------------------------------------- focused_conv2d

using FocusedConv2dSig = at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                    const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                                    const c10::optional<at::Tensor>&, c10::optional<double>, c10::optional<double>,
                                    const c10::optional<at::Tensor>&);
using FocusedConv2dBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
    at::IntArrayRef, int64_t);

class FocusedConv2dFunction : public torch::autograd::Function<FocusedConv2dFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& mask, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                            const c10::optional<at::Tensor>& fill, c10::optional<double> clamp_min,
                            c10::optional<double> clamp_max, const c10::optional<at::Tensor>& residual) {
    static auto op = op_handle<FocusedConv2dSig>("fxeff::focused_conv2d");
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out =
        op.call(x, weight, bias, mask, stride, padding, dilation, groups, fill, clamp_min, clamp_max, residual);
    ctx->saved_data["residual_grad"] = residual.has_value() && residual->defined() && residual->requires_grad();
    const bool clamped = clamp_min.has_value() || clamp_max.has_value();
    ctx->save_for_backward({x, weight, mask, clamped ? out : at::Tensor()});
    ctx->saved_data["clamp_min"] = clamp_min.has_value() ? c10::IValue(*clamp_min) : c10::IValue();
    ctx->saved_data["clamp_max"] = clamp_max.has_value() ? c10::IValue(*clamp_max) : c10::IValue();
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    const bool fill_grad = fill.has_value() && fill->defined() && fill->requires_grad();
    ctx->saved_data["fill_sizes"] = fill_grad ? fill->sizes().vec() : std::vector<int64_t>{};
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<FocusedConv2dBackwardSig>("fxeff::focused_conv2d_backward");
    const auto saved = ctx->get_saved_variables();
    // The epilogue's gradient, from the output as torch.clamp's (hardtanh's) from its input: it passes where the
    // value lies strictly inside the given bounds (clamp(v) is inside exactly where v is).
    at::Tensor grad = grads[0];
    if (saved[3].defined()) {
      const c10::IValue lo = ctx->saved_data["clamp_min"], hi = ctx->saved_data["clamp_max"];
      at::Tensor inside = lo.isNone() ? saved[3].lt(hi.toDouble()) : saved[3].gt(lo.toDouble());
      if (!lo.isNone() && !hi.isNone()) inside = inside.logical_and(saved[3].lt(hi.toDouble()));
      grad = grad.mul(inside);
    }
    auto [grad_x, grad_w, grad_b] =
        op.call(grad, saved[0], saved[1], saved[2], ints(ctx->saved_data["stride"]),
                ints(ctx->saved_data["padding"]), ints(ctx->saved_data["dilation"]), ctx->saved_data["groups"].toInt());
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // The fill is each inactive output's value: its gradient sums grad_out there, per channel.
    const std::vector<int64_t> fill_sizes = ints(ctx->saved_data["fill_sizes"]);
    at::Tensor grad_fill;
    if (!fill_sizes.empty()) {
      grad_fill = grad.mul(at::logical_not(saved[2]).unsqueeze(1)).sum({0, 2, 3}).view(fill_sizes);
    }
    // The residual is added to every output: its gradient is grad_out through the clamp.
    const at::Tensor grad_residual = ctx->saved_data["residual_grad"].toBool() ? grad : at::Tensor();
    return {grad_x, grad_w, has_bias ? grad_b : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), grad_fill, at::Tensor(), at::Tensor(), grad_residual};
  }
};

at::Tensor focused_conv2d_autograd(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                   const at::Tensor& mask, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, int64_t groups, const c10::optional<at::Tensor>& fill,
                                   c10::optional<double> clamp_min, c10::optional<double> clamp_max,
                                   const c10::optional<at::Tensor>& residual) {
  if (!records({&x, &weight, &or_undefined(bias), &or_undefined(fill), &or_undefined(residual)})) {
    static auto op = op_handle<FocusedConv2dSig>("fxeff::focused_conv2d");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, weight, bias, mask, stride, padding, dilation, groups, fill, clamp_min, clamp_max, residual);
  }
  return FocusedConv2dFunction::apply(x, weight, bias, mask, stride, padding, dilation, groups, fill, clamp_min,
                                      clamp_max, residual);
}

// ---------------------------------------------------------------- shift and shift_pool

using ShiftSig = at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, c10::string_view);
using ShiftPoolSig = at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, c10::string_view,
                                at::IntArrayRef, at::IntArrayRef);
using ShiftInputGradSig = at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, c10::string_view);
using ShiftShiftsGradSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view);

// Whether the shifts' gradient will be needed (it reads x, which is then saved): decided before apply, since a
// Function's forward runs without grad mode and, under no_grad, without the edges needs_input_grad reads.
bool needs_shift_grad(const at::Tensor& shifts, c10::string_view mode) {
  return mode != "grouped" && at::GradMode::is_enabled() && shifts.requires_grad();
}

void save_shift(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& shifts, c10::string_view padding,
                c10::string_view mode, bool shift_grad) {
  ctx->save_for_backward({shift_grad ? x : at::Tensor(), shifts});
  ctx->saved_data["padding"] = std::string(padding);
  ctx->saved_data["mode"] = std::string(mode);
}

// grad_x, grad_shifts of a shift from the gradient of its (unpooled) output.
std::pair<at::Tensor, at::Tensor> shift_grads(AutogradContext* ctx, const at::Tensor& grad) {
  static auto input_grad = op_handle<ShiftInputGradSig>("fxeff::shift_input_grad");
  static auto shifts_grad = op_handle<ShiftShiftsGradSig>("fxeff::shift_shifts_grad");
  const auto saved = ctx->get_saved_variables();
  const std::string padding = ctx->saved_data["padding"].toStringRef();
  const std::string mode = ctx->saved_data["mode"].toStringRef();
  at::Tensor grad_x, grad_shifts;
  if (ctx->needs_input_grad(0)) grad_x = input_grad.call(grad, saved[1], padding, mode);
  if (saved[0].defined()) grad_shifts = shifts_grad.call(grad, saved[0], saved[1], padding);
  return {grad_x, grad_shifts};
}

class ShiftFunction : public torch::autograd::Function<ShiftFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& shifts,
                            c10::string_view padding, c10::string_view mode, bool shift_grad) {
    static auto op = op_handle<ShiftSig>("fxeff::shift");
    at::AutoDispatchBelowADInplaceOrView guard;
    save_shift(ctx, x, shifts, padding, mode, shift_grad);
    return op.call(x, shifts, padding, mode);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto [grad_x, grad_shifts] = shift_grads(ctx, grads[0]);
    return {grad_x, grad_shifts, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor shift_autograd(const at::Tensor& x, const at::Tensor& shifts, c10::string_view padding,
                          c10::string_view mode) {
  if (!records({&x, &shifts})) {
    static auto op = op_handle<ShiftSig>("fxeff::shift");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, shifts, padding, mode);
  }
  return ShiftFunction::apply(x, shifts, padding, mode, needs_shift_grad(shifts, mode));
}

// The adjoint of shift_pool's window mean: each element of the padded signal gets its window's gradient divided
// by the window's element count (the last window clipped, as avg_pool's ceil_mode).
at::Tensor window_mean_adjoint(at::Tensor grad, const std::vector<c10::SymInt>& lengths,
                               const std::vector<int64_t>& pool) {
  for (size_t d = 0; d < pool.size(); ++d) {
    const c10::SymInt& n = lengths[d];
    const int64_t s = pool[d];
    if (s == 1) continue;
    const int64_t axis = 2 + static_cast<int64_t>(d);
    at::Tensor counts = at::arange(c10::Scalar(grad.sym_size(axis)), grad.options().dtype(at::kLong))
                            .mul(-s)
                            .add(c10::Scalar(n))
                            .clamp_max(s);
    std::vector<int64_t> shape(grad.dim(), 1);
    shape[axis] = -1;
    grad = grad.div(counts.to(grad.scalar_type()).reshape(shape))
               .repeat_interleave(s, axis)
               .narrow_symint(axis, 0, n);
  }
  return grad;
}

class ShiftPoolFunction : public torch::autograd::Function<ShiftPoolFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& shifts,
                            c10::string_view padding, c10::string_view mode, at::IntArrayRef pad,
                            at::IntArrayRef pool, bool shift_grad) {
    static auto op = op_handle<ShiftPoolSig>("fxeff::shift_pool");
    at::AutoDispatchBelowADInplaceOrView guard;
    save_shift(ctx, x, shifts, padding, mode, shift_grad);
    ctx->saved_data["pad"] = pad.vec();
    ctx->saved_data["pool"] = pool.vec();
    ctx->saved_data["sizes"] = x.sym_sizes().slice(2);  // SymInts: export and dynamic shapes do not specialize
    return op.call(x, shifts, padding, mode, pad, pool);
  }

  // The adjoints in reverse: window mean, F.pad (its adjoint is the pad with negated amounts), shift.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto pad = ints(ctx->saved_data["pad"]);
    const auto pool = ints(ctx->saved_data["pool"]);
    const auto sizes = ctx->saved_data["sizes"].toSymIntVector();
    const size_t dims = sizes.size();
    std::vector<c10::SymInt> lengths(dims);
    for (size_t d = 0; d < dims; ++d) lengths[d] = sizes[d] + pad[2 * (dims - 1 - d)] + pad[2 * (dims - 1 - d) + 1];
    at::Tensor grad = window_mean_adjoint(grads[0], lengths, pool);
    bool padded = false;
    std::vector<int64_t> unpad(pad.size());
    for (size_t i = 0; i < pad.size(); ++i) {
      unpad[i] = -pad[i];
      padded = padded || pad[i] != 0;
    }
    if (padded) grad = at::constant_pad_nd(grad, unpad, 0);
    grad = grad.contiguous(grads[0].suggest_memory_format());
    auto [grad_x, grad_shifts] = shift_grads(ctx, grad);
    return {grad_x, grad_shifts, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor shift_pool_autograd(const at::Tensor& x, const at::Tensor& shifts, c10::string_view padding,
                               c10::string_view mode, at::IntArrayRef pad, at::IntArrayRef pool) {
  if (!records({&x, &shifts})) {
    static auto op = op_handle<ShiftPoolSig>("fxeff::shift_pool");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, shifts, padding, mode, pad, pool);
  }
  return ShiftPoolFunction::apply(x, shifts, padding, mode, pad, pool, needs_shift_grad(shifts, mode));
}

// shift_conv1x1 is the inference form of shift -> BatchNorm -> clamp -> 1x1 conv (fxeff.passes.FuseShift makes it
// from an eval-mode graph). A call that records a backward runs as its composition (shift_pool, the per-channel
// affine, clamp, conv2d), each op with its own autograd: the same function, differentiable in every input.
using ShiftConv1x1Sig = at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, c10::string_view,
                                   at::IntArrayRef, at::IntArrayRef, const c10::optional<at::Tensor>&,
                                   const c10::optional<at::Tensor>&, c10::optional<double>, c10::optional<double>,
                                   const at::Tensor&, const c10::optional<at::Tensor>&);

at::Tensor shift_conv1x1_autograd(const at::Tensor& x, const at::Tensor& shifts, c10::string_view padding,
                                  c10::string_view mode, at::IntArrayRef pad, at::IntArrayRef pool,
                                  const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& offset,
                                  c10::optional<double> clamp_min, c10::optional<double> clamp_max,
                                  const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  if (!records({&x, &shifts, &or_undefined(scale), &or_undefined(offset), &weight, &or_undefined(bias)})) {
    static auto op = op_handle<ShiftConv1x1Sig>("fxeff::shift_conv1x1");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, shifts, padding, mode, pad, pool, scale, offset, clamp_min, clamp_max, weight, bias);
  }
  const bool has_scale = scale.has_value() && scale->defined(), has_offset = offset.has_value() && offset->defined();
  TORCH_CHECK_VALUE(has_scale == has_offset, "fxeff.shift_conv1x1: scale and offset go together (a folded "
                    "BatchNorm), got ", has_scale ? "scale without offset" : "offset without scale");
  static auto shift_pool = op_handle<ShiftPoolSig>("fxeff::shift_pool");
  at::Tensor z = shift_pool.call(x, shifts, padding, mode, pad, pool);
  if (has_scale) z = z * scale->view({1, -1, 1, 1}) + offset->view({1, -1, 1, 1});
  if (clamp_min.has_value() || clamp_max.has_value()) {
    const c10::optional<at::Scalar> lo = clamp_min.has_value() ? c10::optional<at::Scalar>(*clamp_min) : c10::nullopt;
    const c10::optional<at::Scalar> hi = clamp_max.has_value() ? c10::optional<at::Scalar>(*clamp_max) : c10::nullopt;
    z = at::clamp(z, lo, hi);
  }
  return at::conv2d(z, weight, bias);
}

// ---------------------------------------------------------------- hetconv2d

using HetConv2dSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const c10::optional<at::Tensor>&, int64_t, at::IntArrayRef, at::IntArrayRef,
                                at::IntArrayRef);

// Column indices into [N, M]: each filter's own block [N, M/P] and the other channels [N, M - M/P], in order.
std::pair<at::Tensor, at::Tensor> block_columns(int64_t n_filters, int64_t channels, int64_t part,
                                                const at::TensorOptions& options) {
  const int64_t mb = channels / part, ob = n_filters / part;
  const auto longs = options.dtype(at::kLong);
  at::Tensor block = at::arange(n_filters, longs).floor_divide(ob).unsqueeze(1);
  at::Tensor own = block * mb + at::arange(mb, longs);
  at::Tensor rest = at::arange(channels - mb, longs).unsqueeze(0);
  at::Tensor other = rest + mb * (rest >= block * mb).to(at::kLong);
  return {own, other};
}

class HetConv2dFunction : public torch::autograd::Function<HetConv2dFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight_kxk,
                            const at::Tensor& weight_1x1, const c10::optional<at::Tensor>& bias, int64_t part,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
    static auto op = op_handle<HetConv2dSig>("fxeff::hetconv2d");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, weight_kxk, weight_1x1});
    ctx->saved_data["part"] = part;
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    HetConvRecording recording;  // trained weights: the CPU kernel packs them per call
    return op.call(x, weight_kxk, weight_1x1, bias, part, stride, padding, dilation);
  }

  // The vendor conv backward of the two pieces: a 1x1 conv on the centre samples with the centre matrix, and the
  // grouped KxK conv with the centre taps zeroed; weight gradients gathered back into the compact weights.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight_kxk = saved[1], &weight_1x1 = saved[2];
    const int64_t part = ctx->saved_data["part"].toInt();
    const auto stride = ints(ctx->saved_data["stride"]);
    const auto padding = ints(ctx->saved_data["padding"]);
    const auto dilation = ints(ctx->saved_data["dilation"]);
    const int64_t n = weight_kxk.size(0), mb = weight_kxk.size(1), k = weight_kxk.size(2), c = k / 2;
    const bool need_x = ctx->needs_input_grad(0), need_wk = ctx->needs_input_grad(1);
    const bool need_w1 = ctx->needs_input_grad(2);
    const bool need_b = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3);
    const at::Tensor grad_out = grads[0].contiguous(x.suggest_memory_format());
    at::Tensor grad_x, grad_wk, grad_w1, grad_b;
    // Piece 1: 1x1 conv with the centre matrix [N, M] on x cropped (or padded) to the centre samples.
    auto [own, other] = block_columns(n, mb * part, part, weight_kxk.options());
    at::Tensor centre = weight_kxk.select(3, c).select(2, c);
    at::Tensor wc = at::zeros({n, mb * part}, weight_kxk.options()).scatter(1, other, weight_1x1).scatter(1, own, centre);
    wc = wc.unsqueeze(-1).unsqueeze(-1);
    std::vector<int64_t> crop(2), conv_pad(2);
    for (int d = 0; d < 2; ++d) {
      const int64_t p = padding[d] - dilation[d] * c;  // the 1x1 conv's padding; < 0 means cropping
      crop[d] = std::max<int64_t>(0, -p);
      conv_pad[d] = std::max<int64_t>(0, p);
    }
    at::Tensor xcv = x;
    if (crop[0] || crop[1]) {
      xcv = x.narrow_symint(2, crop[0], x.sym_size(2) - 2 * crop[0]).narrow_symint(3, crop[1], x.sym_size(3) - 2 * crop[1]);
    }
    auto [gx1, gwc, unused1] = at::convolution_backward(grad_out, xcv, wc, c10::nullopt, stride, conv_pad, {1, 1},
                                                        false, {0, 0}, 1, {need_x, need_wk || need_w1, false});
    // Piece 2: the grouped KxK conv (groups = part) with the centre taps zeroed.
    at::Tensor gx2, gwk;
    if (k > 1) {
      at::Tensor w_off = weight_kxk.clone();
      w_off.select(3, c).select(2, c).zero_();
      std::tie(gx2, gwk, std::ignore) = at::convolution_backward(grad_out, x, w_off, c10::nullopt, stride, padding,
                                                                 dilation, false, {0, 0}, part,
                                                                 {need_x, need_wk, false});
    } else if (need_wk) {
      gwk = at::zeros_like(weight_kxk);
    }
    if (need_x) {
      if (crop[0] || crop[1]) gx1 = at::constant_pad_nd(gx1, {crop[1], crop[1], crop[0], crop[0]}, 0);
      grad_x = gx2.defined() ? gx1 + gx2 : gx1;
      grad_x = grad_x.contiguous(x.suggest_memory_format());
    }
    if (need_wk || need_w1) {
      gwc = gwc.reshape({n, mb * part});
      if (need_wk) {
        grad_wk = gwk.clone();
        grad_wk.select(3, c).select(2, c).copy_(gwc.gather(1, own));
      }
      if (need_w1) grad_w1 = gwc.gather(1, other);
    }
    if (need_b) grad_b = grad_out.sum({0, 2, 3});
    return {grad_x, grad_wk, grad_w1, grad_b, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor hetconv2d_autograd(const at::Tensor& x, const at::Tensor& weight_kxk, const at::Tensor& weight_1x1,
                              const c10::optional<at::Tensor>& bias, int64_t part, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation) {
  if (!records({&x, &weight_kxk, &weight_1x1, &or_undefined(bias)})) {
    static auto op = op_handle<HetConv2dSig>("fxeff::hetconv2d");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, weight_kxk, weight_1x1, bias, part, stride, padding, dilation);
  }
  return HetConv2dFunction::apply(x, weight_kxk, weight_1x1, bias, part, stride, padding, dilation);
}

// ---------------------------------------------------------------- tile_conv2d

using TileConv2dSig = at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                 at::IntArrayRef, at::IntArrayRef, int64_t);

class TileConv2dFunction : public torch::autograd::Function<TileConv2dFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& tiles, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef dilation,
                            int64_t groups) {
    static auto op = op_handle<TileConv2dSig>("fxeff::tile_conv2d");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({tiles, weight});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return op.call(tiles, weight, bias, stride, dilation, groups);
  }

  // The vendor conv backward with padding 0 (the tiles carry their halo).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const int64_t out_channels = saved[1].size(0);
    auto [grad_x, grad_w, grad_b] = at::convolution_backward(
        grads[0].contiguous(saved[0].suggest_memory_format()), saved[0], saved[1],
        has_bias ? c10::OptionalIntArrayRef(at::IntArrayRef{out_channels}) : c10::nullopt,
        ints(ctx->saved_data["stride"]), {0, 0}, ints(ctx->saved_data["dilation"]), false, {0, 0},
        ctx->saved_data["groups"].toInt(),
        {ctx->needs_input_grad(0), ctx->needs_input_grad(1), has_bias && ctx->needs_input_grad(2)});
    return {grad_x, grad_w, has_bias ? grad_b : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor tile_conv2d_autograd(const at::Tensor& tiles, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                at::IntArrayRef dilation, int64_t groups) {
  if (!records({&tiles, &weight, &or_undefined(bias)})) {
    static auto op = op_handle<TileConv2dSig>("fxeff::tile_conv2d");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(tiles, weight, bias, stride, dilation, groups);
  }
  return TileConv2dFunction::apply(tiles, weight, bias, stride, dilation, groups);
}

// ---------------------------------------------------------------- narrow_conv2d

using NarrowConv2dSig = at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                   at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, c10::optional<double>,
                                   c10::optional<double>, const c10::optional<at::Tensor>&);

class NarrowConv2dFunction : public torch::autograd::Function<NarrowConv2dFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, c10::optional<double> clamp_min,
                            c10::optional<double> clamp_max, const c10::optional<at::Tensor>& residual) {
    static auto op = op_handle<NarrowConv2dSig>("fxeff::narrow_conv2d");
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = op.call(x, weight, bias, stride, padding, dilation, clamp_min, clamp_max, residual);
    // needs_input_grad counts only some of the arguments: whether the residual wants a gradient is kept here
    ctx->saved_data["residual_grad"] = residual.has_value() && residual->defined() && residual->requires_grad();
    ctx->save_for_backward({x, weight, out});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["clamp_min"] = clamp_min.has_value() ? c10::IValue(*clamp_min) : c10::IValue();
    ctx->saved_data["clamp_max"] = clamp_max.has_value() ? c10::IValue(*clamp_max) : c10::IValue();
    return out;
  }

  // The clamp passes the gradient where the conv's value (plus the residual) lies strictly inside (clamp_min,
  // clamp_max), which is where the output does (as hardtanh_backward and threshold_backward decide); that is the
  // residual's gradient, and the vendor conv backward takes it on.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &out = saved[2];
    at::Tensor grad = grads[0];
    const c10::IValue lo = ctx->saved_data["clamp_min"], hi = ctx->saved_data["clamp_max"];
    if (!lo.isNone()) grad = grad * (out > lo.toDouble());
    if (!hi.isNone()) grad = grad * (out < hi.toDouble());
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const int64_t out_channels = weight.size(0);
    auto [grad_x, grad_w, grad_b] = at::convolution_backward(
        grad.contiguous(x.suggest_memory_format()), x, weight,
        has_bias ? c10::OptionalIntArrayRef(at::IntArrayRef{out_channels}) : c10::nullopt,
        ints(ctx->saved_data["stride"]), ints(ctx->saved_data["padding"]), ints(ctx->saved_data["dilation"]), false,
        {0, 0}, 1, {ctx->needs_input_grad(0), ctx->needs_input_grad(1), has_bias && ctx->needs_input_grad(2)});
    return {grad_x, grad_w, has_bias ? grad_b : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), ctx->saved_data["residual_grad"].toBool() ? grad : at::Tensor()};
  }
};

at::Tensor narrow_conv2d_autograd(const at::Tensor& x, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation,
                                  c10::optional<double> clamp_min, c10::optional<double> clamp_max,
                                  const c10::optional<at::Tensor>& residual) {
  if (!records({&x, &weight, &or_undefined(bias), &or_undefined(residual)})) {
    static auto op = op_handle<NarrowConv2dSig>("fxeff::narrow_conv2d");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, weight, bias, stride, padding, dilation, clamp_min, clamp_max, residual);
  }
  return NarrowConv2dFunction::apply(x, weight, bias, stride, padding, dilation, clamp_min, clamp_max, residual);
}

}  // namespace

TORCH_LIBRARY_IMPL(fxeff, Autograd, m) {
  m.impl("narrow_conv2d", &narrow_conv2d_autograd);
  m.impl("tile_conv2d", &tile_conv2d_autograd);
  m.impl("focused_conv2d", &focused_conv2d_autograd);
  m.impl("shift", &shift_autograd);
  m.impl("shift_pool", &shift_pool_autograd);
  m.impl("shift_conv1x1", &shift_conv1x1_autograd);
  m.impl("hetconv2d", &hetconv2d_autograd);
}

}  // namespace ops
}  // namespace fxeff
