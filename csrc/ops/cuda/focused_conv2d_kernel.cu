// CUDA kernels of fxeff::focused_conv2d and fxeff::focused_conv2d_backward. Same contract as
// cpu/focused_conv2d_kernel.cpp: F.conv2d of x at the active outputs of the per-image mask, exactly 0 elsewhere; any
// stride/padding/dilation/groups; float64/float32/float16/bfloat16; the output keeps x's memory format (NCHW or
// channels_last). Strategies:
//   empty - no active output: zeros, no conv;
//   dense - at::conv2d (cuDNN) over the whole batch, then one elementwise kernel zeroes the inactive outputs. No
//           host synchronisation at all;
//   tiles - SBNet-style: the T x T output tiles holding an active output are found on the GPU (one thread per tile
//           sets a flag, at::cumsum scans the flags, a kernel compacts the active tiles into a list in image-major
//           raster order, deterministic, no atomics); their input windows with the receptive-field halo (zeros
//           outside the image, i.e. the conv's padding) are gathered into one batch, at::conv2d (cuDNN) runs on it
//           without padding, and the active outputs are scattered into a zero-initialised output.
// The tile count sizes the gathered batch, so "tiles" and "auto" copy the counts (one int64 per tried tile size,
// in one transfer) to the host: one device-to-host synchronisation per call. Forced "dense" has none.
// Choice ("auto"; focus_elements.cuh's choose_tile): for each tried tile side T (8, 16, 32, or the forced tile) the cost is
//   count_T * (T^2 * kmac + window_h(T) * window_w(T) * C * kCopyMacs)     (kmac = O * C/groups * kh * kw)
// and the cheapest T runs if that is below kTilesFraction * N * Ho * Wo * kmac (the dense conv's MACs), else dense:
// tiles must save enough MACs to pay for the gather/scatter and for cuDNN's lower efficiency on a batch of small
// tiles. kCopyMacs and kTilesFraction are placeholders until measured on a GPU (issue 6). No "crop" or "pixels"
// strategy on CUDA: forcing either (or "tiles") runs tiles (counted as tiles); the tile side is the forced tile,
// else the cheapest as above. The counters and profiler records ("fxeff::focused_conv2d::<strategy>") are the CPU
// kernel's.
// Backward: grad_out * mask (one elementwise kernel) through at::convolution_backward (cuDNN), correct for every
// case and without a host synchronisation (so an all-empty mask still runs the conv backward, unlike the CPU).
// The index arithmetic of every kernel here is focus_elements.cuh's (also run on the CPU by
// tests/_focus_cuda_emulation.cpp).
#include "launch.cuh"
#include "../focused_conv2d.h"
#include "focus_elements.cuh"

#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/record_function.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/clamp.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/logical_not.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <vector>

namespace fxeff {
namespace ops {
namespace {

using namespace focus_device;

using namespace cuda_launch;


#define FXEFF_GRID_STRIDE(e, total) \
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < (total); e += int64_t(blockDim.x) * gridDim.x)

// out[e] = 0 where the mask is not set (in place).
template <typename T>
__global__ void zero_inactive_kernel(T* __restrict__ out, const bool* __restrict__ mask, FocusGeometry g,
                                     int64_t total) {
  FXEFF_GRID_STRIDE(e, total) {
    if (!output_active(g, mask, e)) out[e] = T(0);
  }
}

// dst[e] = src[e] where the mask is set, else 0.
template <typename T>
__global__ void masked_copy_kernel(const T* __restrict__ src, T* __restrict__ dst, const bool* __restrict__ mask,
                                   FocusGeometry g, int64_t total) {
  FXEFF_GRID_STRIDE(e, total) { dst[e] = output_active(g, mask, e) ? src[e] : T(0); }
}

__global__ void tile_flags_kernel(const bool* __restrict__ mask, FocusGeometry g, int32_t* __restrict__ flags,
                                  int64_t tiles) {
  FXEFF_GRID_STRIDE(i, tiles) { flags[i] = tile_active(mask, g, i) ? 1 : 0; }
}

__global__ void compact_tiles_kernel(const int32_t* __restrict__ flags, const int64_t* __restrict__ scan,
                                     int64_t* __restrict__ list, int64_t tiles) {
  FXEFF_GRID_STRIDE(i, tiles) {
    const int64_t slot = tile_slot(flags, scan, i);
    if (slot >= 0) list[slot] = i;
  }
}

template <typename T>
__global__ void gather_kernel(const T* __restrict__ x, T* __restrict__ patches, FocusGeometry g,
                              const int64_t* __restrict__ tiles, int64_t total) {
  FXEFF_GRID_STRIDE(e, total) {
    const int64_t src = gather_source(g, tiles, e);
    patches[e] = src < 0 ? T(0) : x[src];
  }
}

template <typename T>
__global__ void scatter_kernel(const T* __restrict__ res, T* __restrict__ out, const bool* __restrict__ mask,
                               FocusGeometry g, const int64_t* __restrict__ tiles, int64_t total) {
  FXEFF_GRID_STRIDE(e, total) {
    const int64_t dst = scatter_target(g, tiles, mask, e);
    if (dst >= 0) out[dst] = res[e];
  }
}

FocusGeometry device_geometry(const ConvGeometry& g, int64_t t, bool cl) { return make_focus_geometry(g, t, cl); }

// The active tiles of side t on the device: the list (int64 tile indices, image-major; only the first `count`
// entries are meaningful) and the count as a 1-element device tensor (no synchronisation here).
struct TileList {
  int64_t t;
  at::Tensor list, count;
};

TileList active_tiles(const at::Tensor& mask, const ConvGeometry& g, int64_t t) {
  const FocusGeometry d = device_geometry(g, t, false);
  const int64_t tiles = g.n * d.th * d.tw;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor flags = at::empty({tiles}, mask.options().dtype(at::kInt));
  tile_flags_kernel<<<blocks_for(tiles), kThreads, 0, stream>>>(mask.const_data_ptr<bool>(), d,
                                                                flags.mutable_data_ptr<int32_t>(), tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor scan = at::cumsum(flags, 0, at::kLong);
  at::Tensor list = at::empty({tiles}, mask.options().dtype(at::kLong));
  compact_tiles_kernel<<<blocks_for(tiles), kThreads, 0, stream>>>(
      flags.const_data_ptr<int32_t>(), scan.const_data_ptr<int64_t>(), list.mutable_data_ptr<int64_t>(), tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {t, list, scan.narrow(0, tiles - 1, 1)};
}

void zero_inactive(at::Tensor& out, const at::Tensor& mask, const ConvGeometry& g, bool cl) {
  const FocusGeometry d = device_geometry(g, 1, cl);
  const int64_t total = out.numel();
  if (total == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fxeff_focused_conv2d_zero", [&] {
    zero_inactive_kernel<scalar_t><<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        out.mutable_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(), d, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor run_tiles(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                     const at::Tensor& mask, const ConvGeometry& g, const TileList& tl, int64_t count,
                     at::MemoryFormat fmt) {
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const FocusGeometry d = device_geometry(g, tl.t, cl);
  // empty + zero_, not at::zeros: at::zeros ignores the options' memory format (the output would be NCHW).
  at::Tensor out = at::empty({g.n, g.o, g.ho, g.wo}, x.options().memory_format(fmt)).zero_();
  at::Tensor patches = at::empty({count, g.c, d.wh, d.ww}, x.options().memory_format(fmt));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t gathered = patches.numel();
  if (gathered > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fxeff_focused_conv2d_gather", [&] {
      gather_kernel<scalar_t><<<blocks_for(gathered), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), patches.mutable_data_ptr<scalar_t>(), d, tl.list.const_data_ptr<int64_t>(),
          gathered);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const std::array<int64_t, 2> stride{g.sh, g.sw}, no_padding{0, 0}, dilation{g.dh, g.dw};
  const at::Tensor res = at::conv2d(patches, weight, bias, stride, no_padding, dilation, g.groups).contiguous(fmt);
  TORCH_INTERNAL_ASSERT(res.size(2) == tl.t && res.size(3) == tl.t, "fxeff.focused_conv2d: tile conv gave ",
                        res.sizes(), " for tile ", tl.t);
  const int64_t results = res.numel();
  if (results > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fxeff_focused_conv2d_scatter", [&] {
      scatter_kernel<scalar_t><<<blocks_for(results), kThreads, 0, stream>>>(
          res.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(), d,
          tl.list.const_data_ptr<int64_t>(), results);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return out;
}

// The strategies write zeros at the inactive outputs; a fill (per output channel) is then added there in place:
// out + fill * !mask (one elementwise pass on the GPU). g: the checked geometry of the arguments.
at::Tensor focused_conv2d_cuda_zeros(const ConvGeometry& g, const at::Tensor& x_in, const at::Tensor& weight_in,
                                     const c10::optional<at::Tensor>& bias, const at::Tensor& mask_in,
                                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                     int64_t groups);

at::Tensor focused_conv2d_cuda(const at::Tensor& x_in, const at::Tensor& weight_in,
                               const c10::optional<at::Tensor>& bias, const at::Tensor& mask_in,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups, const c10::optional<at::Tensor>& fill,
                               c10::optional<double> clamp_min, c10::optional<double> clamp_max,
                               const c10::optional<at::Tensor>& residual) {
  const ConvGeometry g =
      check_focused_conv2d_args("focused_conv2d", x_in, weight_in, bias, mask_in, stride, padding, dilation, groups);
  check_focused_conv2d_fill("focused_conv2d", fill, x_in, g);
  check_focused_conv2d_clamp("focused_conv2d", clamp_min, clamp_max);
  check_focused_conv2d_residual("focused_conv2d", residual, x_in, g);
  at::Tensor out = focused_conv2d_cuda_zeros(g, x_in, weight_in, bias, mask_in, stride, padding, dilation, groups);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (fill.has_value() && fill->defined()) {
    out.add_(fill->reshape({1, g.o, 1, 1}).mul(at::logical_not(mask_in).unsqueeze(1)));
  }
  // The epilogue, elementwise passes over the whole output: the residual added, then the clamp.
  if (residual.has_value() && residual->defined()) out.add_(*residual);
  if (clamp_min.has_value() || clamp_max.has_value()) {
    out.clamp_(clamp_min.has_value() ? c10::optional<at::Scalar>(*clamp_min) : c10::nullopt,
               clamp_max.has_value() ? c10::optional<at::Scalar>(*clamp_max) : c10::nullopt);
  }
  return out;
}

at::Tensor focused_conv2d_cuda_zeros(const ConvGeometry& g, const at::Tensor& x_in, const at::Tensor& weight_in,
                                     const c10::optional<at::Tensor>& bias, const at::Tensor& mask_in,
                                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                     int64_t groups) {
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::MemoryFormat fmt = conv_output_format(x_in, weight_in);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor weight = weight_in.contiguous(cl ? fmt : at::MemoryFormat::Contiguous);
  const at::Tensor mask = mask_in.contiguous();
  const FocusConfig cfg = focus_config();
  const int64_t outputs = g.n * g.ho * g.wo;

  auto empty = [&]() {
    RECORD_FUNCTION("fxeff::focused_conv2d::empty", c10::ArrayRef<const c10::IValue>{});
    count_focus_strategy(FocusStrategy::Empty);
    return at::empty({g.n, g.o, g.ho, g.wo}, x.options().memory_format(fmt)).zero_();
  };
  auto dense = [&]() {
    RECORD_FUNCTION("fxeff::focused_conv2d::dense", c10::ArrayRef<const c10::IValue>{});
    count_focus_strategy(FocusStrategy::Dense);
    at::Tensor out = at::conv2d(x, weight, bias, stride, padding, dilation, groups).contiguous(fmt);
    zero_inactive(out, mask, g, cl);
    return out;
  };
  if (cfg.strategy == "dense") return dense();
  if (outputs == 0) return empty();

  const std::vector<int64_t> sizes = tile_sides(cfg.tile);
  std::vector<TileList> lists;
  std::vector<at::Tensor> counts_dev;
  for (int64_t t : sizes) {
    lists.push_back(active_tiles(mask, g, t));
    counts_dev.push_back(lists.back().count);
  }
  // The one device-to-host copy (a synchronisation): the active-tile counts, which size the gathered batch.
  const at::Tensor counts = at::cat(counts_dev).to(at::kCPU, at::kLong);
  const int64_t* cp = counts.const_data_ptr<int64_t>();
  if (cp[0] == 0) return empty();  // no tile of any size is active: no active output

  bool cheaper_than_dense = false;
  const size_t best = choose_tile(g, sizes, cp, cheaper_than_dense);
  if (cfg.strategy == "auto" && !cheaper_than_dense) return dense();
  RECORD_FUNCTION("fxeff::focused_conv2d::tiles", c10::ArrayRef<const c10::IValue>{});
  count_focus_strategy(FocusStrategy::Tiles);
  return run_tiles(x, weight, bias, mask, g, lists[best], cp[best], fmt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> focused_conv2d_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& mask_in,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvGeometry g = check_focused_conv2d_args("focused_conv2d_backward", x_in, weight, c10::nullopt, mask_in,
                                                   stride, padding, dilation, groups);
  TORCH_CHECK_VALUE(grad_out.dim() == 4 && grad_out.size(0) == g.n && grad_out.size(1) == g.o &&
                        grad_out.size(2) == g.ho && grad_out.size(3) == g.wo,
                    "fxeff.focused_conv2d_backward: grad_out must be [", g.n, ", ", g.o, ", ", g.ho, ", ", g.wo,
                    "], got ", grad_out.sizes());
  TORCH_CHECK_VALUE(grad_out.scalar_type() == x_in.scalar_type(), "fxeff.focused_conv2d_backward: grad_out dtype "
                    "must equal x dtype ", x_in.scalar_type(), ", got ", grad_out.scalar_type());
  TORCH_CHECK_VALUE(grad_out.device() == x_in.device(), "fxeff.focused_conv2d_backward: grad_out must be on x's "
                    "device ", x_in.device(), ", got ", grad_out.device());
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  RECORD_FUNCTION("fxeff::focused_conv2d_backward::dense", c10::ArrayRef<const c10::IValue>{});
  const at::MemoryFormat fmt = x_in.suggest_memory_format();
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor mask = mask_in.contiguous();
  const at::Tensor go = grad_out.contiguous(fmt);
  at::Tensor masked = at::empty(go.sizes(), go.options().memory_format(fmt));
  const int64_t total = masked.numel();
  if (total > 0) {
    const FocusGeometry d = device_geometry(g, 1, cl);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "fxeff_focused_conv2d_mask_grad",
                                    [&] {
      masked_copy_kernel<scalar_t><<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          go.const_data_ptr<scalar_t>(), masked.mutable_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(), d,
          total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const std::array<int64_t, 1> bias_sizes{g.o};
  const std::array<int64_t, 2> output_padding{0, 0};
  auto grads = at::convolution_backward(masked, x, weight.contiguous(cl ? fmt : at::MemoryFormat::Contiguous),
                                        at::IntArrayRef(bias_sizes), stride, padding, dilation, false, output_padding,
                                        groups, {true, true, true});
  return {std::get<0>(grads).contiguous(fmt), std::get<1>(grads).contiguous(), std::get<2>(grads)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fxeff, CUDA, m) {
  m.impl("focused_conv2d", &focused_conv2d_cuda);
  m.impl("focused_conv2d_backward", &focused_conv2d_backward_cuda);
}

}  // namespace ops
}  // namespace fxeff
