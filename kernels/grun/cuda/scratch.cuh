#pragma once
// grun/cuda/scratch.cuh — call-scoped device scratch and row copies shared by the intervention
// paths (generic and fused). Stream-ordered: nothing here synchronizes the device.
#include "check.cuh"

#include <grun/positions.hpp>

namespace grun::cuda::detail {

/// Device scratch that lives for one call, allocated stream-ordered (no device-wide sync).
template <class T>
struct stream_scratch {
  T* ptr = nullptr;
  cudaStream_t stream = nullptr;
  stream_scratch(index_t n, cudaStream_t s) : stream(s) {
    if (n > 0) GRUN_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&ptr), sizeof(T) * std::size_t(n), s));
  }
  ~stream_scratch() { if (ptr) (void)cudaFreeAsync(ptr, stream); }
  T* data() const { return ptr; }
  stream_scratch(const stream_scratch&) = delete;
  stream_scratch& operator=(const stream_scratch&) = delete;
};

/// Copies every row of src [N, d] to dst unless they are the same tensor (rows contiguous).
template <class T>
void copy_rows(matrix_view<const T, cuda_space> src, matrix_view<T, cuda_space> dst, cudaStream_t s) {
  if (src.size() == 0) return;
  if (static_cast<const void*>(src.data()) == static_cast<const void*>(dst.data()) && src.stride(0) == dst.stride(0)) return;
  const std::size_t width = sizeof(T) * std::size_t(src.extent(1));
  if (src.extent(0) == 1) {
    // One row: its stride is never stepped and may be anything (torch keeps any stride on a size-1
    // dimension, e.g. a transposed [d, 1]), while cudaMemcpy2D refuses a pitch below the width.
    GRUN_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), width, cudaMemcpyDeviceToDevice, s));
    return;
  }
  GRUN_CUDA_CHECK(cudaMemcpy2DAsync(dst.data(), sizeof(T) * std::size_t(dst.stride(0)), src.data(),
                                    sizeof(T) * std::size_t(src.stride(0)), width, std::size_t(src.extent(0)),
                                    cudaMemcpyDeviceToDevice, s));
}

/// True when the position list is 0, 1, …, N−1 (every row selected, in order): the rows that
/// pass through unchanged are then none, and the copy of h into out can be skipped.
inline bool selects_every_row(const positions& pos, index_t n) {
  if (pos.size() != n) return false;
  for (index_t q = 0; q < n; ++q)
    if (pos[q] != q) return false;
  return true;
}

}  // namespace grun::cuda::detail
