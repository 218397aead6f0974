#pragma once
// grun/cuda/scratch.cuh — call-scoped device scratch and row copies shared by the intervention
// paths (generic and fused). Stream-ordered: nothing here synchronizes the device.
#include "check.cuh"

#include <algorithm>
#include <cstdint>
#include <vector>

#include <grun/positions.hpp>

namespace grun::cuda {

/// grun's pool for call-scoped device scratch on the current device (and for saved activations'
/// device blocks, which outlive a call: cuda::detail::allocate_saved): stream-ordered allocations
/// whose memory stays mapped between calls. The device's default pool has a release threshold of 0,
/// so it hands its memory back to the driver at every stream / event / device synchronization —
/// and a training step synchronizes (a loss read back), after which every call re-mapped its
/// scratch. On an H200 that cost more than the kernels: ~0.2 ms per fused forward at d = 4096,
/// T = 16384 (0.06 ms of memory traffic), ~0.6 ms per forward + backward.
inline cudaMemPool_t scratch_pool() {
  return per_device<cudaMemPool_t>([](int device) {
    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    cudaMemPool_t pool = nullptr;
    GRUN_CUDA_CHECK(cudaMemPoolCreate(&pool, &props));
    std::uint64_t keep = ~std::uint64_t{0};
    GRUN_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
    return pool;
  });
}

/// Returns the scratch pool's unused memory on the current device to the driver, keeping at most
/// `keep_bytes` (the pool otherwise keeps what its largest call needed, for the next call). Blocks
/// still held — a saved_activations alive — stay.
inline void release_scratch(std::size_t keep_bytes = 0) {
  GRUN_CUDA_CHECK(cudaMemPoolTrimTo(scratch_pool(), keep_bytes));
}

}  // namespace grun::cuda

namespace grun::cuda::detail {

/// Device scratch that lives for one call, allocated stream-ordered from scratch_pool() (no
/// device-wide sync, no re-mapping after the application synchronizes).
template <class T>
struct stream_scratch {
  T* ptr = nullptr;
  cudaStream_t stream = nullptr;
  stream_scratch(index_t n, cudaStream_t s) : stream(s) {
    if (n > 0)
      GRUN_CUDA_CHECK(cudaMallocFromPoolAsync(reinterpret_cast<void**>(&ptr), sizeof(T) * std::size_t(n), scratch_pool(), s));
  }
  ~stream_scratch() { if (ptr) (void)cudaFreeAsync(ptr, stream); }
  T* data() const { return ptr; }
  stream_scratch(const stream_scratch&) = delete;
  stream_scratch& operator=(const stream_scratch&) = delete;
};

/// Runs one of CUB's two-phase device algorithms on stream s: `algorithm(temp, bytes)` is called
/// once with a null temp to learn the size of the temporary storage, then with that storage from
/// the scratch pool. At least one byte: a null temporary would make the second call a size query again.
template <class Algorithm>
void run_with_cub_scratch(cudaStream_t s, Algorithm&& algorithm) {
  std::size_t bytes = 0;
  GRUN_CUDA_CHECK(algorithm(static_cast<void*>(nullptr), bytes));
  stream_scratch<unsigned char> temp(std::max<index_t>(index_t(bytes), 1), s);
  GRUN_CUDA_CHECK(algorithm(static_cast<void*>(temp.ptr), bytes));
}

/// A small struct a kernel reports to the host (a status, a census, a reduction's totals): a
/// device slot set to `initial` on the stream before the launch, read back after it with one
/// copy and one stream synchronization — the library's only kind of sync inside a call.
template <class S>
class device_report {
 public:
  device_report(cudaStream_t s, const S& initial) : slot_(1, s) {
    // From pageable host memory the copy is staged before the call returns: `initial` may go.
    GRUN_CUDA_CHECK(cudaMemcpyAsync(slot_.ptr, &initial, sizeof(S), cudaMemcpyHostToDevice, s));
  }
  S* device() const noexcept { return slot_.ptr; }
  /// Waits for the stream and returns what the kernels left in the slot.
  S read() const {
    S out{};
    GRUN_CUDA_CHECK(cudaMemcpyAsync(&out, slot_.ptr, sizeof(S), cudaMemcpyDeviceToHost, slot_.stream));
    GRUN_CUDA_CHECK(cudaStreamSynchronize(slot_.stream));
    return out;
  }

 private:
  stream_scratch<S> slot_;
};

/// dst(i, j) = src(i, j) element by element: the copy of rows that overlap in memory.
template <class T>
__global__ void copy_overlapping_rows_kernel(matrix_view<const T, cuda_space> src, matrix_view<T, cuda_space> dst) {
  const index_t d = src.extent(1), n = src.extent(0) * d;
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += index_t(gridDim.x) * blockDim.x)
    dst(i / d, i % d) = src(i / d, i % d);
}

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
  if (src.stride(0) < src.extent(1)) {
    // Rows that overlap (a broadcast row, stride 0): cudaMemcpy2D refuses a pitch below the width.
    constexpr int threads = 256;
    const index_t blocks = std::min<index_t>((src.size() + threads - 1) / threads, 65535);
    copy_overlapping_rows_kernel<T><<<unsigned(blocks), threads, 0, s>>>(src, dst);
    GRUN_CUDA_CHECK_LAUNCH();
    return;
  }
  GRUN_CUDA_CHECK(cudaMemcpy2DAsync(dst.data(), sizeof(T) * std::size_t(dst.stride(0)), src.data(),
                                    sizeof(T) * std::size_t(src.stride(0)), width, std::size_t(src.extent(0)),
                                    cudaMemcpyDeviceToDevice, s));
}

/// True when the position list is 0, 1, …, N−1 (every row selected, in order): the rows that
/// pass through unchanged are then none, and the copy of h into out can be skipped.
inline bool selects_every_row(const positions& pos, index_t n) { return pos.size() == n && pos.in_order(); }

}  // namespace grun::cuda::detail
