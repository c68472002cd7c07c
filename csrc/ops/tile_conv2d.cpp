// fxeff::tile_conv2d: a conv without padding over a batch of tiles that carry their own halo (region execution,
// docs/regions.md). Output contiguous in the input's memory format, whatever the batch size.
//
// Why an op and not aten.convolution: the tile count is data-dependent (nonzero over the active tiles), and at
// such an unbacked batch size inductor mispredicts the vendor conv's output strides (torch 2.14.1: a stride
// assertion under torch.compile, wrong values under AOTInductor). As an op whose fake kernel states the layout,
// inductor keeps it opaque and exact; the ops around it (gather, activations, scatter) stay ordinary and fusable.
// One kernel for every backend (CompositeExplicitAutograd: the vendor conv of the device); autograd in autograd.cpp.
#include <ATen/ops/conv2d.h>
#include <torch/library.h>

#include <string>

namespace fxeff {
namespace ops {
namespace {

at::Tensor tile_conv2d(const at::Tensor& tiles, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       at::IntArrayRef stride, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(tiles.dim() == 4, "fxeff.tile_conv2d: tiles must be 4-D [T, C, h, w], got ", tiles.dim(), "-D");
  TORCH_CHECK(weight.dim() == 4, "fxeff.tile_conv2d: weight must be 4-D [O, C/groups, kh, kw], got ", weight.dim(),
              "-D");
  TORCH_CHECK(stride.size() == 2 && dilation.size() == 2, "fxeff.tile_conv2d: stride and dilation must have 2 "
              "entries, got ", stride.size(), " and ", dilation.size());
  TORCH_CHECK(groups >= 1 && tiles.size(1) == weight.size(1) * groups, "fxeff.tile_conv2d: tiles must have "
              "weight.size(1) * groups = ", weight.size(1) * groups, " channels, got ", tiles.size(1));
  const at::MemoryFormat fmt = tiles.suggest_memory_format();
  const int64_t no_padding[2] = {0, 0};
  return at::conv2d(tiles, weight, bias, stride, at::IntArrayRef(no_padding), dilation, groups).contiguous(fmt);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fxeff, m) {
  m.set_python_module("fxeff.ops.tile_conv2d");  // the module that calls register_fake for this op
  m.def("tile_conv2d(Tensor tiles, Tensor weight, Tensor? bias, int[2] stride, int[2] dilation, int groups) -> Tensor");
}

TORCH_LIBRARY_IMPL(fxeff, CompositeExplicitAutograd, m) { m.impl("tile_conv2d", &tile_conv2d); }

}  // namespace ops
}  // namespace fxeff
