// The 1-D launch shape shared by fxeff's CUDA kernels: kThreads threads per block, at most kMaxBlocks
// blocks (the kernels use grid-stride loops, so larger problems loop instead of growing the grid).
#pragma once

#include <algorithm>
#include <cstdint>

namespace fxeff {
namespace ops {
namespace cuda_launch {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

// Blocks for `total` grid-stride elements: at least 1 (a launch with 0 blocks is an error), at most kMaxBlocks.
inline int64_t blocks_for(int64_t total) {
  return std::max<int64_t>(1, std::min(kMaxBlocks, (total + kThreads - 1) / kThreads));
}

}  // namespace cuda_launch
}  // namespace ops
}  // namespace fxeff
