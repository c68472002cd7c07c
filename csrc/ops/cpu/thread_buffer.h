// Per-thread scratch buffers shared by the CPU kernels.
#pragma once

#include <cstdint>
#include <vector>

namespace fxeff {
namespace ops {

// Slots of thread_buffer, one per use (a kernel's uses must not share one while both are live).
enum ThreadBufferSlot : int {
  kShiftTile = 0,      // shift_conv1x1: a band's tile
  kShiftRow = 1,       // shift_conv1x1: a shifted source row
  kShiftAcc = 2,       // shift_conv1x1: a pooled row's accumulators
  kHetconvBand = 3,    // hetconv2d's direct channels-last strategy: a worker's padded band of input rows
  kThreadBufferSlots = 4,
};

// A buffer of n elements owned by the calling thread and kept between calls, so that a kernel's scratch does not
// take fresh pages from the allocator on every call: glibc's malloc serves blocks above its mmap threshold (128 KiB
// until a larger block is freed) with mmap, and each call then page-faults its buffer back in (about 2.5 us per 4
// KiB page here, 160 us for a 256 KiB band). A parallel region's worker calls it for its own buffer; a pointer from
// the calling thread's may be shared with the workers, its name may not.
template <typename T>
T* thread_buffer(int slot, int64_t n) {
  thread_local std::vector<double> buffers[kThreadBufferSlots];
  std::vector<double>& b = buffers[slot];
  const size_t want = static_cast<size_t>((n * static_cast<int64_t>(sizeof(T)) + 7) / 8);
  if (b.size() < want) b.resize(want);
  return reinterpret_cast<T*>(b.data());
}

}  // namespace ops
}  // namespace fxeff
