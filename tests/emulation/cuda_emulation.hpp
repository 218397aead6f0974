#pragma once
// tests/emulation/cuda_emulation.hpp — runs grun's CUDA kernels on the CPU, for machines without a GPU.
//
// Force-included (g++ -include) before every source of an emulated test. The CUDA toolkit's own
// headers supply the runtime's types, enums and prototypes (and the host halves of __half and
// __nv_bfloat16); runtime.cpp defines the runtime functions over host memory, and this header
// turns the device dialect into host C++:
//
//   - a launch `k<<<grid, block, smem, stream>>>(args)` is rewritten by rewrite_launches.py into a
//     call of ::grun_emu::launch(grid, block, smem, stream); each CTA then runs as blockDim fibers
//     (ucontext, each with its own stack) on the launching thread, CTAs one after another, the
//     fibers of a CTA in thread order — deterministic, and a barrier costs a context switch, not
//     a wake-up of blockDim OS threads;
//   - __syncthreads() parks the fiber until every fiber of the CTA has parked or returned (a thread
//     that returns stops counting for the CTA's barriers, as an exited thread does for bar.sync);
//     __syncwarp() and the steps of a warp collective park it until the 32 lanes of its warp have
//     arrived (a lane that returned first, or barriers that can never open, stop the emulation);
//   - __shared__ is `static`: every thread of the CTA sees one object, and CTAs never overlap;
//     dynamic shared memory (extern __shared__ x[]) is a per-CTA buffer filled with 0xFF bytes
//     (NaN for every float type), so a read before a write shows;
//   - cub::BlockReduce, cub::WarpReduce, cub::DeviceReduce (Sum, Max), cooperative_groups::memcpy_async,
//     thrust::device_vector and thrust::transform_iterator are the small shims under include/,
//     and cublaslt.cpp is cuBLASLt's matmul, all written to the same contracts (the result of a
//     block or warp reduction is only defined in thread or lane 0;
//     memcpy_async checks the alignment its aligned_size_t promises; a device-wide sum checks that
//     its temporary, input and output are device memory; a matmul checks its operands' memory,
//     shapes, types and the alignment its algorithm was chosen for);
//   - atomics are plain read-modify-writes (no fiber is preempted between barriers);
//   - events record host time (so bench_cuda runs, its timings meaningless).
//
// What it checks that a CPU test of the host path cannot: the kernels' indexing, tiling, launch
// shapes (grid and block limits, 48 KiB of dynamic shared memory, an empty grid is an error as
// on the device), barriers, the host-side scratch and copies, and — under AddressSanitizer —
// every out-of-bounds access to device memory. What it cannot: timing, races inside a warp
// (its lanes run one after another between barriers), memory-model races between CTAs, and the
// device's own float rounding of fused operations and of cuBLASLt's summation order.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstddef>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- the device dialect as host C++ ------------------------------------------------------------
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __constant__
#undef __launch_bounds__
#undef __forceinline__
#undef __noinline__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __constant__ static
#define __launch_bounds__(...)
#define __forceinline__ inline
#define __noinline__

namespace grun_emu {

/// Where a thread stands in the launch: the built-in variables and the CTA's dynamic shared memory.
struct thread_context {
  uint3 thread{0, 0, 0};
  uint3 block{0, 0, 0};
  dim3 block_dim{1, 1, 1};
  dim3 grid_dim{1, 1, 1};
  unsigned char* dynamic_shared = nullptr;
};
/// The running fiber's: the scheduler sets it before it switches to a fiber.
inline thread_local thread_context context;

/// A broken device-side promise (a misaligned async copy, a block reduction over the wrong CTA
/// size): the device would fault or compute garbage, so the emulation stops, naming the thread.
[[noreturn]] void fail_device(const char* what);

/// Whether [p, p + bytes) lies inside one live device allocation (runtime.cpp's table).
bool in_device_memory(const void* p, std::size_t bytes);

/// __syncthreads(): parks the calling fiber until the CTA's barrier opens (runtime.cpp).
void sync_cta();
/// A full-warp barrier (__syncwarp(), the steps of a warp collective): parks the calling fiber until
/// every lane of its warp (32 consecutive thread ranks) has arrived.
void sync_warp();
inline unsigned char* dynamic_shared() { return context.dynamic_shared; }

/// Linear rank of the calling thread in its CTA (x fastest, as on the device).
inline unsigned thread_rank() {
  const auto& c = context;
  return c.thread.x + c.block_dim.x * (c.thread.y + c.block_dim.y * c.thread.z);
}
inline unsigned cta_size() { return context.block_dim.x * context.block_dim.y * context.block_dim.z; }

struct launch_config {
  dim3 grid;
  dim3 block;
  std::size_t dynamic_shared_bytes = 0;
  cudaStream_t stream = nullptr;
};

/// Runs body() on every thread of every CTA of the grid (defined in runtime.cpp). A bad
/// configuration runs nothing and becomes the runtime's last error, as a failed launch does.
void run_grid(const launch_config& config, void (*body)(void*), void* closure);

/// `launch(grid, block, smem, stream)(body, args...)`: the arguments are evaluated once and
/// copied to every thread, which calls body(its copies...) — body calls the kernel, whose by-value
/// parameters then get their own copies, as kernel parameters are.
struct launcher {
  launch_config config;
  template <class Body, class... Args>
  void operator()(Body body, Args&&... args) const {
    struct closure_t {
      Body body;
      std::tuple<std::decay_t<Args>...> args;
    } closure{body, std::tuple<std::decay_t<Args>...>(std::forward<Args>(args)...)};
    run_grid(
        config, [](void* p) { auto& c = *static_cast<closure_t*>(p); std::apply(c.body, std::as_const(c.args)); },
        &closure);
  }
};

inline launcher launch(dim3 grid, dim3 block, std::size_t dynamic_shared_bytes = 0, cudaStream_t stream = nullptr) {
  return {{grid, block, dynamic_shared_bytes, stream}};
}

}  // namespace grun_emu

#define threadIdx (::grun_emu::context.thread)
#define blockIdx (::grun_emu::context.block)
#define blockDim (::grun_emu::context.block_dim)
#define gridDim (::grun_emu::context.grid_dim)

inline void __syncthreads() { ::grun_emu::sync_cta(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) ::grun_emu::fail_device("__syncwarp with a partial mask is not emulated");
  ::grun_emu::sync_warp();
}

/// Atomics: a fiber is never preempted between two barriers, and CTAs run one after another, so a
/// plain read-modify-write is indivisible here. Each returns the old value, as the device's do.
template <class T, class U>
inline T atomicAdd(T* p, U x) {
  const T old = *p;
  *p = T(old + x);
  return old;
}
template <class T, class U>
inline T atomicMin(T* p, U x) {
  const T old = *p;
  if (T(x) < old) *p = T(x);
  return old;
}
template <class T, class U>
inline T atomicMax(T* p, U x) {
  const T old = *p;
  if (old < T(x)) *p = T(x);
  return old;
}

// The device's math library names its classification functions in the global namespace.
using std::isfinite;
using std::isinf;
using std::isnan;

/// The read-only data cache is an optimisation; the value is the load's.
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
