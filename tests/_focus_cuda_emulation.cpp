// The CUDA Focus kernels' per-element and host-side code (csrc/ops/cuda/focus_elements.cuh) compiled for the host
// and run in plain loops, registered as fxeff_focus_emu::* for tests/test_cuda_kernels.py: checks the device
// code's index arithmetic (aoi_mask's strided channel reduction, mask_resize's cells, the tile flags, the
// scan-and-compact tile list, the halo gather, the masked scatter, the inactive-output zeroing and the
// masked gradient) and the tile choice against the CPU kernels on machines without a GPU. What it does not
// cover: launch geometry, at::cumsum and cuDNN on the device.
#include "../csrc/ops/cuda/focus_elements.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

namespace {

using namespace fxeff::ops;
using namespace fxeff::ops::focus_device;

at::Tensor aoi_mask(const at::Tensor& x, double threshold, bool mean) {
  at::Tensor out = at::empty({x.size(0), x.size(2), x.size(3)}, x.options().dtype(at::kBool));
  bool* op = out.mutable_data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "emu_aoi_mask", [&] {
    using A = at::opmath_type<scalar_t>;
    for (int64_t p = 0; p < out.numel(); ++p)
      op[p] = aoi_element<scalar_t, A>(x.const_data_ptr<scalar_t>(), x.size(1), x.size(2), x.size(3), x.stride(0),
                                       x.stride(1), x.stride(2), x.stride(3), p, static_cast<A>(threshold), mean);
  });
  return out;
}

at::Tensor mask_resize(const at::Tensor& mask_in, int64_t ho, int64_t wo) {
  const at::Tensor mask = mask_in.contiguous();
  at::Tensor out = at::empty({mask.size(0), ho, wo}, mask.options());
  bool* op = out.mutable_data_ptr<bool>();
  for (int64_t e = 0; e < out.numel(); ++e)
    op[e] = resize_element(mask.const_data_ptr<bool>(), mask.size(1), mask.size(2), ho, wo, e);
  return out;
}

// The geometry as check_focused_conv2d_args computes it (that function lives in the fxeff library, which this
// one does not link; the arguments are valid in the tests).
ConvGeometry geometry(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                      at::IntArrayRef dilation, int64_t groups) {
  ConvGeometry g{};
  g.n = x.size(0); g.c = x.size(1); g.h = x.size(2); g.w = x.size(3);
  g.o = weight.size(0); g.kh = weight.size(2); g.kw = weight.size(3);
  g.sh = stride[0]; g.sw = stride[1]; g.ph = padding[0]; g.pw = padding[1];
  g.dh = dilation[0]; g.dw = dilation[1]; g.groups = groups;
  g.ho = (g.h + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.wo = (g.w + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  return g;
}

// The tile list of side t as the device builds it: flags, inclusive scan, compaction.
std::vector<int64_t> tile_list(const bool* m, const ConvGeometry& g, int64_t t) {
  const FocusGeometry d = make_focus_geometry(g, t, false);
  const int64_t tiles = g.n * d.th * d.tw;
  at::Tensor flags = at::empty({tiles}, at::kInt);
  int32_t* fp = flags.mutable_data_ptr<int32_t>();
  for (int64_t i = 0; i < tiles; ++i) fp[i] = tile_active(m, d, i) ? 1 : 0;
  const at::Tensor scan = at::cumsum(flags, 0, at::kLong);
  const int64_t* sp = scan.const_data_ptr<int64_t>();
  std::vector<int64_t> list(tiles, -1);
  for (int64_t i = 0; i < tiles; ++i) {
    const int64_t slot = tile_slot(fp, sp, i);
    if (slot >= 0) list[slot] = i;
  }
  list.resize(tiles > 0 ? sp[tiles - 1] : 0);
  return list;
}

// The tiles strategy with side t (t = 0: the kernel's choice; returns that side too), and the tile list.
std::tuple<at::Tensor, at::Tensor, int64_t, bool> tiles(const at::Tensor& x_in, const at::Tensor& weight,
                                                        const c10::optional<at::Tensor>& bias,
                                                        const at::Tensor& mask_in, at::IntArrayRef stride,
                                                        at::IntArrayRef padding, at::IntArrayRef dilation,
                                                        int64_t groups, int64_t tile) {
  const ConvGeometry g = geometry(x_in, weight, stride, padding, dilation, groups);
  const at::MemoryFormat fmt = x_in.suggest_memory_format();
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(fmt), mask = mask_in.contiguous();
  const bool* m = mask.const_data_ptr<bool>();
  const std::vector<int64_t> sizes = tile_sides(tile);
  std::vector<std::vector<int64_t>> lists;
  std::vector<int64_t> counts;
  for (int64_t t : sizes) {
    lists.push_back(tile_list(m, g, t));
    counts.push_back(static_cast<int64_t>(lists.back().size()));
  }
  bool cheaper = false;
  const size_t best = choose_tile(g, sizes, counts.data(), cheaper);
  const int64_t t = sizes[best];
  const std::vector<int64_t>& list = lists[best];
  const FocusGeometry d = make_focus_geometry(g, t, cl);
  const int64_t count = static_cast<int64_t>(list.size());
  at::Tensor out = at::empty({g.n, g.o, g.ho, g.wo}, x.options().memory_format(fmt)).zero_();
  at::Tensor patches = at::empty({count, g.c, d.wh, d.ww}, x.options().memory_format(fmt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "emu_gather", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* pp = patches.mutable_data_ptr<scalar_t>();
    for (int64_t e = 0; e < patches.numel(); ++e) {
      const int64_t src = gather_source(d, list.data(), e);
      pp[e] = src < 0 ? scalar_t(0) : xp[src];
    }
  });
  const std::array<int64_t, 2> s{g.sh, g.sw}, no_padding{0, 0}, dl{g.dh, g.dw};
  const at::Tensor res = at::conv2d(patches, weight.contiguous(cl ? fmt : at::MemoryFormat::Contiguous), bias, s,
                                    no_padding, dl, g.groups).contiguous(fmt);
  TORCH_CHECK(res.size(2) == t && res.size(3) == t, "tile conv gave ", res.sizes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "emu_scatter", [&] {
    const scalar_t* rp = res.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for (int64_t e = 0; e < res.numel(); ++e) {
      const int64_t dst = scatter_target(d, list.data(), m, e);
      if (dst >= 0) op[dst] = rp[e];
    }
  });
  at::Tensor list_t = at::empty({count}, at::kLong);
  std::copy(list.begin(), list.end(), list_t.mutable_data_ptr<int64_t>());
  return {out, list_t, t, cheaper};
}

// The dense strategy's zeroing (in a copy of `out`) and the backward's masked gradient: both keep `out` where the
// mask is set and write 0 elsewhere, in out's layout.
at::Tensor keep_active(const at::Tensor& out_in, const at::Tensor& mask_in) {
  const at::MemoryFormat fmt = out_in.suggest_memory_format();
  at::Tensor out = out_in.contiguous(fmt).clone(fmt);
  const at::Tensor mask = mask_in.contiguous();
  ConvGeometry g{};
  g.n = out.size(0); g.o = out.size(1); g.ho = out.size(2); g.wo = out.size(3);
  g.sh = g.sw = g.dh = g.dw = g.kh = g.kw = 1;
  const FocusGeometry d = make_focus_geometry(g, 1, fmt == at::MemoryFormat::ChannelsLast);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "emu_keep_active", [&] {
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for (int64_t e = 0; e < out.numel(); ++e)
      if (!output_active(d, mask.const_data_ptr<bool>(), e)) op[e] = scalar_t(0);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(fxeff_focus_emu, m) {
  m.def("aoi_mask(Tensor x, float threshold, bool mean) -> Tensor", &aoi_mask);
  m.def("mask_resize(Tensor mask, int h, int w) -> Tensor", &mask_resize);
  m.def("tiles(Tensor x, Tensor weight, Tensor? bias, Tensor mask, int[2] stride, int[2] padding, int[2] dilation, "
        "int groups, int tile) -> (Tensor, Tensor, int, bool)",
        &tiles);
  m.def("keep_active(Tensor out, Tensor mask) -> Tensor", &keep_active);
}
