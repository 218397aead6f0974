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
//     (each with its own stack; on x86-64 a switch saves the callee-saved registers and swaps
//     stack pointers — runtime.cpp's switch_stack —, else ucontext) on the launching thread, CTAs one after another, the
//     ready fibers of a CTA in rounds between barrier openings — each round in thread order or in
//     reverse, alternating by CTA and round (run_order.hpp: GRUN_EMU_ORDER pins or shuffles it),
//     so a race's two outcomes both occur; deterministic, and a barrier costs a context switch,
//     not a wake-up of blockDim OS threads;
//   - __syncthreads() parks the fiber until every fiber of the CTA has parked or returned (a thread
//     that returns stops counting for the CTA's barriers, as an exited thread does for bar.sync);
//     __syncwarp() and the steps of a warp collective park it until the 32 lanes of its warp have
//     arrived (a lane that returned first, or barriers that can never open, stop the emulation);
//   - __shared__ is `static`: every thread of the CTA sees one object, and CTAs never overlap;
//     rewrite_launches.py marks each such variable of a kernel (GRUN_EMU_SHARED_REGION), and the
//     first thread of every CTA to reach its declaration fills it with 0xFF bytes — so a CTA that
//     reads what it did not write sees NaN, not the values its predecessor left there;
//     dynamic shared memory (extern __shared__ x[]) is a per-CTA buffer filled with 0xFF bytes
//     (NaN for every float type), so a read before a write shows;
//   - cub::BlockReduce, cub::WarpReduce, cub::DeviceReduce (Sum, Max), cooperative_groups::memcpy_async,
//     thrust::device_vector and thrust::transform_iterator are the small shims under include/,
//     and cublaslt.cpp is cuBLASLt's matmul, all written to the same contracts (the result of a
//     block or warp reduction is only defined in thread or lane 0;
//     memcpy_async checks the alignment its aligned_size_t promises; a device-wide sum checks that
//     its temporary, input and output are device memory; a matmul checks its operands' memory,
//     shapes, types and the alignment its algorithm was chosen for);
//   - cp.async lands at the cp.async.wait_group that covers it; its destination reads as 0xFF until then;
//   - atomics are plain read-modify-writes (no fiber is preempted between barriers);
//   - events record host time (so bench_cuda runs, its timings meaningless);
//   - work on a stream — the legacy default stream or one made by cudaStreamCreateWithFlags
//     (kernels, async copies and memsets, cudaFreeAsync, event waits, cub::DeviceReduce,
//     cublasLtMatmul) — waits in that stream's line until something waits for the stream: its
//     synchronization, the device's, an event's, a stream waiting for one of its events, a copy
//     from it to host memory, cudaMalloc and cudaFree (destroying the stream does not: its work runs
//     later, as a device finishes it). What no one waits for runs when the thread that issued work
//     ends — the main thread: at exit, so a faulting kernel nobody waited for still fails the
//     run. So work a program leaves unordered
//     runs late: a kernel that reads memory freed before it ran is an AddressSanitizer report, a
//     copy to the host before the kernel that writes it has run reads 0xFF. The legacy stream's
//     implicit synchronization is kept: its work follows what the blocking streams (created
//     without cudaStreamNonBlocking) held when it was issued, and theirs what it held.
//
// What it checks that a CPU test of the host path cannot: the kernels' indexing, tiling, launch
// shapes (grid and block limits, 48 KiB of dynamic shared memory, an empty grid is an error as
// on the device), barriers — a missing one shows when a reader can run before its writer (or a
// writer before the last reader), which the alternating order makes happen whichever thread
// ranks they have —, the host-side scratch and copies, and — under AddressSanitizer — every
// out-of-bounds access to device memory. What it cannot: timing, a race whose outcomes are equal
// (the same value written twice), what the memory model allows beyond interleavings (a store seen
// late by another CTA, reordered accesses without a fence), and the device's own float rounding of
// fused operations and of cuBLASLt's summation order.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstring>
#include <cstddef>
#include <functional>
#include <memory>
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
  unsigned long long cta = 0;  // the CTA's serial number in this process, from 1 (shared_region)
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

/// A kernel's static __shared__ variable: the first thread of each CTA to reach its declaration fills
/// it with 0xFF bytes. (No thread of a CTA can touch it before one has reached the declaration, so
/// that is as good as filling it as the CTA starts — which the runtime once did for every variable
/// of every kernel seen so far, 3–7% of an emulated test's time.)
struct shared_region {
  void* where;
  std::size_t bytes;
  mutable unsigned long long filled_for = 0;  // the CTA it was last filled for
  void reached() const {
    if (filled_for == context.cta) return;
    std::memset(where, 0xFF, bytes);
    filled_for = context.cta;
  }
};
#define GRUN_EMU_SHARED_REGION(name)                                                                 \
  static const ::grun_emu::shared_region grun_emu_shared_region_##name{&(name), sizeof(name)}; \
  grun_emu_shared_region_##name.reached()

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
/// Whether the device takes a launch of this shape; if not, false and the runtime's last error.
bool launch_allowed(const launch_config& config);
/// Issues work on `stream` in stream order (runtime.cpp): a stream made by cudaStreamCreateWithFlags
/// keeps it until something waits for that stream (so work a program leaves unordered runs as late
/// as a device may run it); the legacy default stream runs it now, after the blocking streams' work.
void issue(cudaStream_t stream, std::function<void()> work);

/// `launch(grid, block, smem, stream)(body, args...)`: the arguments are evaluated once (at the
/// launch, as the device takes them) and copied to every thread, which calls body(its copies...) —
/// body calls the kernel, whose by-value parameters then get their own copies, as kernel parameters
/// are. The grid runs in its stream's order (issue).
struct launcher {
  launch_config config;
  template <class Body, class... Args>
  void operator()(Body body, Args&&... args) const {
    struct closure_t {
      Body body;
      std::tuple<std::decay_t<Args>...> args;
    };
    if (!launch_allowed(config)) return;
    auto closure = std::make_shared<closure_t>(closure_t{body, std::tuple<std::decay_t<Args>...>(std::forward<Args>(args)...)});
    issue(config.stream, [config = config, closure] {
      run_grid(
          config, [](void* p) { auto& c = *static_cast<closure_t*>(p); std::apply(c.body, std::as_const(c.args)); },
          closure.get());
    });
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
/// So are the streaming (evict-first) loads and stores.
template <class T>
inline T __ldcs(const T* p) {
  return *p;
}
template <class T>
inline void __stcs(T* p, T v) {
  *p = v;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

/// Kernels reach the warp collectives the emulation defines for their inline PTX through this.
#define GRUN_CUDA_EMULATION 1

namespace grun_emu {

/// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16} as the warp collective it is: every lane posts
/// its fragments (PTX ISA's layout: lane = 4g + t; a0 = A[g][2t..2t+1], a1 = A[g+8][2t..],
/// a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]; b0 = B[2t..2t+1][g], b1 = B[2t+8..][g]; c = C[g][2t],
/// C[g][2t+1], C[g+8][2t], C[g+8][2t+1]), waits for its warp, and takes its four sums of
/// C + A·B (k in order, fp32 fused multiply-adds — the device's order and rounding differ).
template <class T>
void mma_16816(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
  struct posted {
    unsigned a[4], b[2];
  };
  static thread_local posted warps[32][32];  // [warp of the CTA][lane]: CTAs run one after another
  const unsigned rank = thread_rank(), lane = rank % 32, g = lane / 4, t = lane % 4;
  posted* warp = warps[rank / 32];
  warp[lane] = {{a0, a1, a2, a3}, {b0, b1}};
  sync_warp();
  auto half_of = [](unsigned w, int hi) {
    const unsigned short bits = static_cast<unsigned short>(hi ? w >> 16 : w & 0xffffu);
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      const unsigned u = unsigned(bits) << 16;
      float f;
      std::memcpy(&f, &u, sizeof f);
      return f;
    } else {
      __half_raw r;
      r.x = bits;
      return __half2float(__half(r));
    }
  };
  auto A = [&](unsigned m, unsigned k) {  // the lane holding A[m][k], its register and half
    const unsigned owner = 4 * (m % 8) + (k % 8) / 2, reg = (m >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    return half_of(warp[owner].a[reg], int(k % 2));
  };
  auto B = [&](unsigned k, unsigned n) {
    const unsigned owner = 4 * n + (k % 8) / 2;
    return half_of(warp[owner].b[k >= 8 ? 1 : 0], int(k % 2));
  };
  const unsigned rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
  float out[4];
  for (int i = 0; i < 4; ++i) {
    float acc = c[i];
    for (unsigned k = 0; k < 16; ++k) acc = std::fma(A(rows[i], k), B(k, cols[i]), acc);
    out[i] = acc;
  }
  sync_warp();  // every lane has read the posted fragments before any posts again
  for (int i = 0; i < 4; ++i) c[i] = out[i];
}

/// cp.async.cg.shared.global (16 bytes), cp.async.commit_group and cp.async.wait_group n of the
/// calling thread, as the asynchronous copies they are (runtime.cpp): a copy lands when a wait
/// covers its group, and until then its destination reads as 0xFF bytes (NaN) — so a read before the
/// wait, or a refill of a buffer another thread still reads, shows in the results. The source must be
/// device memory, the destination the CTA's dynamic shared memory, both 16-byte aligned; a copy still
/// in flight when its thread returns stops the emulation (an empty group is fine).
void cp_async_16(void* shared_dst, const void* global_src);
void cp_async_commit();
void cp_async_wait(int pending);

/// movmatrix.sync.aligned.m8n8.trans.b16 as a warp collective: lane 4g + t posts a = M[g][2t..2t+1]
/// (16-bit elements, the lower column in the low half) and takes M^T[g][2t..2t+1] = M[2t][g], M[2t+1][g].
inline unsigned movmatrix_trans(unsigned a) {
  static thread_local unsigned warps[32][32];  // [warp of the CTA][lane]
  const unsigned rank = thread_rank(), lane = rank % 32, g = lane / 4, t = lane % 4;
  unsigned* warp = warps[rank / 32];
  warp[lane] = a;
  sync_warp();
  auto element = [&](unsigned row, unsigned col) {  // M[row][col]: lane 4·row + col/2, half col % 2
    const unsigned w = warp[4 * row + col / 2];
    return col % 2 ? w >> 16 : w & 0xffffu;
  };
  const unsigned d = element(2 * t, g) | element(2 * t + 1, g) << 16;
  sync_warp();  // every lane has read before any posts again
  return d;
}

}  // namespace grun_emu
