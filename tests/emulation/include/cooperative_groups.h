#pragma once
// Emulation shim for <cooperative_groups.h> (tests/emulation): the thread block group.
#include <cuda_emulation.hpp>

namespace cooperative_groups {

class thread_block {
 public:
  void sync() const { __syncthreads(); }
  unsigned thread_rank() const { return ::grun_emu::thread_rank(); }
  unsigned size() const { return ::grun_emu::cta_size(); }
  unsigned num_threads() const { return size(); }
  dim3 group_index() const { return dim3(blockIdx.x, blockIdx.y, blockIdx.z); }
  dim3 thread_index() const { return dim3(threadIdx.x, threadIdx.y, threadIdx.z); }
};

inline thread_block this_thread_block() { return {}; }

}  // namespace cooperative_groups
