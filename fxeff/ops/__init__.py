"""Python faces of fxeff's operators: checked wrappers (fx leaves), fake kernels, autograd, FLOP formulas."""
from . import flops  # noqa: F401
from .aoi_mask import aoi_mask, dilate_mask
from .focused_conv2d import direct_strategy_available, focused_conv2d, forced_strategy, strategy_counters
from .hetconv2d import hetconv2d, hetconv2d_pack_cache, hetconv_dense_weight
from .mask_resize import mask_resize
from .narrow_conv2d import narrow_conv2d
from .shift import SHIFT_MODES, SHIFT_PADDINGS, shift, shift_conv1x1, shift_pool
from .tile_conv2d import tile_conv2d

__all__ = ["aoi_mask", "dilate_mask", "mask_resize", "focused_conv2d", "direct_strategy_available", "forced_strategy",
           "strategy_counters", "shift", "shift_pool", "shift_conv1x1", "SHIFT_MODES", "SHIFT_PADDINGS", "hetconv2d",
           "hetconv2d_pack_cache", "hetconv_dense_weight", "tile_conv2d", "narrow_conv2d"]
