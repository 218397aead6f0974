#pragma once
// grun/cuda/intervention_mlp.cuh — gate::mlp<H1, H2> × reft::loreft / noreft / direft (r ≤ 32) on
// exec::cuda, with the first gate layer as a real GEMM on tensor cores (cuBLASLt).
//
//   g(h) = σ(w3ᵀ a2 + b3),  a2 = relu(W2 a1 + b2),  a1 = relu(W1 h + b1)     (gate/mlp.hpp)
//
// Forward, per module k:
//   Z1 [P, H1] = Hs W1ᵀ             cuBLASLt: bf16/fp16 inputs on tensor cores, fp32 accumulate and
//                                   output; fp32 inputs with CUBLAS_COMPUTE_32F (true fp32, no TF32, so the
//                                   fp32 agreement with the host holds at 1e-5) and k summed in
//                                   chunks of 256 (fp32_k_chunk: every fp32 matmul here)
//   a1 = relu(Z1 + b1)              elementwise (bias_relu_kernel)
//   Z2 [P, H2] = A1 W2ᵀ             cuBLASLt, fp32 (16-bit W2 widened to fp32 once per call: 16K elements)
//   head_out_kernel                 one warp per row: a2 = relu(Z2 + b2), z3 = w3·a2 + b3 (cub::WarpReduce)
//   then the fused ReFT kernel (intervention_fused.cuh) with the gate's logits given (gate_external:
//   g = σ(z3), and σ'(z3) = σ(z3)σ(−z3) in the backward — not g(1 − g), zero once g rounds to 1).
//   (The first version computed W2 a1 in a warp-per-row loop whose lanes each walked their own row
//   of W2 — uncoalesced: 1.5 ms for T = 16384 on an H200, where the GEMM is microseconds.)
// Backward: the fused coefficient kernel yields dz3 = dL/d(w3·a2 + b3) per module and row; then
//   dz2 = [a2 > 0] dz3 w3           elementwise
//   dA1 = dZ2 W2                    cuBLASLt, fp32;  dz1 = [a1 > 0] dA1 elementwise (fp32, and as T;
//                                   fp16 scaled by a power of two first: fp16_scale)
//   DHg [P, d] = Σ_k dZ1_k W1_k     cuBLASLt, written in T (the gate path of dh, which the fused slot
//                                   kernel adds before dh's rounding: in 16-bit storage dh's gate path
//                                   is rounded twice, once here, as eager autograd rounds each
//                                   product; the fp32 buffer it replaced moved 512 MiB at T = 16384,
//                                   d = 4096 where bf16 moves 256; beta = 1 adds module k > 0 in T)
//   dW1 = dZ1ᵀ Hs, dW2 = dZ2ᵀ A1    cuBLASLt (trained module only)
//   db1, db2, dw3, db3              column sums in double: fixed slices of 256 rows in parallel, then
//                                   the slices in order (column_sums)
// Hs is h itself when every row is selected in order, else the selected rows gathered once.
// With a saved_activations (16-bit storage) the forward writes every module's a1, a2 and z3 where
// they are kept (detail::kept_regions), beside the ReFT's e, and the backward reads them instead of
// running the gate's forward again — as exec::host does with its saved form of gate::mlp.
//
// Determinism: cuBLASLt returns the same bits for the same algorithm, problem and workspace on
// the same GPU; the algorithm is the first heuristic answer for a fixed workspace size (asked once
// per problem and kept with its descriptors: kept_matmuls), and with exec::cuda_t::deterministic
// split-K reductions are restricted to CUBLASLT_REDUCTION_SCHEME_NONE.
// Everything else here is fixed-order. Users of this header link CUDA::cublasLt.
#include <cublasLt.h>

#include <cub/device/device_reduce.cuh>
#include <cub/warp/warp_reduce.cuh>
#include <thrust/iterator/transform_iterator.h>

#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include "intervention_fused.cuh"

#include <grun/gate/mlp.hpp>

namespace grun::cuda::mlp_gate {

template <class G> struct mlp_kind { static constexpr bool value = false; };
template <index_t H1, index_t H2> struct mlp_kind<gate::mlp<H1, H2>> {
  static constexpr bool value = true;
  static constexpr int h1 = int(H1), h2 = int(H2);
};

template <class G, class R, class O>
inline constexpr bool supported = mlp_kind<G>::value && fused::reft_kind<R>::value >= 0 &&
                                  fused::reft_kind<R>::rank >= 1 && fused::reft_kind<R>::rank <= fused::max_rank &&
                                  !O::is_parametrization;

namespace detail {

inline void check_lt(cublasStatus_t status, const char* call, const char* file, int line) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  fail<error>("cuBLASLt call failed: ", call, " at ", file, ":", line, ": ", cublasLtGetStatusName(status), " (",
              int(status), ")");
}
#define GRUN_CUBLASLT_CHECK(call) ::grun::cuda::mlp_gate::detail::check_lt((call), #call, __FILE__, __LINE__)

/// One cuBLASLt handle per device (a handle belongs to the device current when it was created),
/// created on first use there and never destroyed. cuBLASLt handles may be shared across threads.
inline cublasLtHandle_t lt_handle() {
  return per_device<cublasLtHandle_t>([](int) {
    cublasLtHandle_t h = nullptr;
    GRUN_CUBLASLT_CHECK(cublasLtCreate(&h));
    return h;
  });
}

template <class T> constexpr cudaDataType_t data_type() {
  if constexpr (std::is_same_v<T, float>) return CUDA_R_32F;
  else if constexpr (std::is_same_v<T, half>) return CUDA_R_16F;
  else if constexpr (std::is_same_v<T, bfloat16>) return CUDA_R_16BF;
  else static_assert(sizeof(T) == 0, "grun::cuda::mlp_gate: storage type without a cuBLASLt data type");
}

/// Workspace handed to every matmul (fixed, so the chosen algorithm does not depend on free memory).
inline constexpr std::size_t workspace_bytes = std::size_t(32) << 20;

/// dZ1 goes to the tensor-core matmuls as T. As fp16 it is stored scaled by 2^s, s chosen on the
/// device from max |dZ1| so that the largest lands in [2^14, 2^15): the gradient of a mean loss over
/// many tokens puts dZ1 near 1e-7, below fp16's normal range (from 6.1e-5), where unscaled it would
/// keep a few of its 11 bits or flush to zero (with upstream gradients of 3e-6 at P = 600, dW1 came
/// 4.1% and dh 2.2% off the exact result; scaled, 0.11% and 0.26%), and a large dZ1 would overflow. Powers of two scale exactly; the
/// matmuls that read dZ1 take alpha = 2^-s from device memory (cuBLASLt's device pointer mode, so
/// no host round trip), and their fp32 results are the unscaled ones. bf16 has fp32's exponent
/// range and is stored as it is, as is fp32. The maximum is order-free: still bitwise-repeatable.
struct fp16_scale {
  float amax;       // max |dZ1| (cub::DeviceReduce::Max)
  float unscale;    // 2^-s: alpha of the matmuls that read the scaled dZ1
  float zero, one;  // their beta: the device pointer mode reads alpha and beta from device memory
};
template <class T>
inline constexpr bool scaled_dz1 = std::is_same_v<T, half>;

/// s with amax 2^s in [2^14, 2^15); 0 for a zero or non-finite amax (nothing to gain, or NaN/inf to pass on).
__host__ __device__ inline int fp16_scale_exponent(float amax) {
  if (!(amax > 0.f) || !(amax <= 3.40282347e+38f)) return 0;  // zero, NaN or inf
  int e = 0;
  (void)frexpf(amax, &e);  // amax = f 2^e, f in [0.5, 1)
  const int s = 15 - e;
  return s < -100 ? -100 : s > 100 ? 100 : s;  // 2^±s stay normal fp32 (only a subnormal amax is clamped)
}

/// D (column-major [m, n], fp32 unless dt says otherwise, leading dimension ldd) = op(A) op(B) + beta D;
/// fp32 compute (a 16-bit D, whose type must be A's, is rounded once from it: cuBLASLt's epilogue).
/// With `scaled`, one operand was stored times 2^s: D = 2^-s op(A) op(B) + beta D, alpha and beta
/// (0 or 1) read from the fp16_scale in device memory.
struct gemm_args {
  cublasOperation_t ta, tb;
  index_t m, n, k;
  const void* A;
  cudaDataType_t at;
  index_t lda;
  const void* B;
  cudaDataType_t bt;
  index_t ldb;
  float beta;
  void* D;
  index_t ldd;
  const fp16_scale* scaled = nullptr;
  bool chunk_fp32_k = true;  // false: the result is rounded to 16 bits anyway (see fp32_k_chunk)
  cudaDataType_t dt = CUDA_R_32F;
};

/// Largest power of two ≤ 256 dividing both the address and the row pitch (ld · element size): the
/// alignment cuBLASLt may assume (its heuristics default to 256 bytes, which user views need not meet).
inline std::uint32_t alignment_of(const void* p, index_t ld, std::size_t elem) {
  std::uint64_t a = std::uint64_t(reinterpret_cast<std::uintptr_t>(p)) | (std::uint64_t(ld) * elem) | 256u;
  return std::uint32_t(a & (~a + 1));  // lowest set bit
}
inline std::size_t size_of(cudaDataType_t t) { return t == CUDA_R_32F ? 4 : 2; }

inline void gemm(const gemm_args& g, void* workspace, cudaStream_t s, bool deterministic);

/// The same, arguments spelled out (a braced gemm_args inside a device-launching lambda trips cudafe++).
inline void gemm(cublasOperation_t ta, cublasOperation_t tb, index_t m, index_t n, index_t k, const void* A,
                 cudaDataType_t at, index_t lda, const void* B, cudaDataType_t bt, index_t ldb, float beta, void* D,
                 index_t ldd, void* workspace, cudaStream_t s, bool deterministic,
                 const fp16_scale* scaled = nullptr, bool chunk_fp32_k = true, cudaDataType_t dt = CUDA_R_32F) {
  gemm_args g;
  g.ta = ta; g.tb = tb; g.m = m; g.n = n; g.k = k;
  g.A = A; g.at = at; g.lda = lda;
  g.B = B; g.bt = bt; g.ldb = ldb;
  g.beta = beta; g.D = D; g.ldd = ldd;
  g.scaled = scaled;
  g.chunk_fp32_k = chunk_fp32_k;
  g.dt = dt;
  gemm(g, workspace, s, deterministic);
}

/// One cuBLASLt matmul for the whole problem.
inline void gemm_once(const gemm_args& g, void* workspace, cudaStream_t s, bool deterministic);

/// What one of gemm_once's matmul plans depends on: every attribute gemm_once sets on its
/// descriptors and preference (the workspace size is a constant), and the device.
struct matmul_key {
  int device, ta, tb, at, bt, dt;
  index_t m, n, k, lda, ldb, ldd;
  std::uint32_t align_a, align_b, align_d;
  bool deterministic, device_scalars;
  auto fields() const {
    return std::tie(device, ta, tb, at, bt, dt, m, n, k, lda, ldb, ldd, align_a, align_b, align_d, deterministic,
                    device_scalars);
  }
  friend bool operator<(const matmul_key& x, const matmul_key& y) { return x.fields() < y.fields(); }
};

/// Everything gemm_once hands cuBLASLt for one problem besides its pointers and scalars: the
/// device's handle, the descriptors (held by value and initialised in place, so there is nothing to
/// destroy) and the algorithm the heuristic chose. Built in place and never moved: cuBLASLt's
/// descriptors are initialised where they live.
struct matmul_plan {
  cublasLtHandle_t handle = nullptr;
  cublasLtMatmulDescOpaque_t op{};
  cublasLtMatrixLayoutOpaque_t a{}, b{}, d{};
  cublasLtMatmulAlgo_t algo{};
};

/// The plans of the problems seen, kept for the life of the process. Planning creates four
/// descriptors and runs cuBLASLt's heuristic, a search of its kernels on the host; a fwd+bwd issues
/// up to eight matmuls per module, each a few tens of µs on the device at T = 16384, so planned every
/// time the device may wait for the host. A plan depends on its key alone: a kept one is what a new
/// plan would be, and results keep their bits. A server meets a new token count P with most
/// batches, a few problems each: past `capacity` problems (~0.6 KB each) new ones are planned per
/// call and not kept. Shared by the host threads, as the handle is: planning runs under the mutex
/// (once per problem), and a kept plan is only read after.
struct kept_matmuls {
  static constexpr std::size_t default_capacity = 4096;
  explicit kept_matmuls(std::size_t capacity = default_capacity) : capacity(capacity) {}

  static kept_matmuls& instance() {
    static kept_matmuls kept;
    return kept;
  }
  /// The plan kept under `key`, made by `make(plan&)` in place if there is none and room for it;
  /// nullptr when full. A make that throws keeps nothing (the next call plans again). Not const
  /// (cuBLASLt takes its descriptors as non-const handles) but only read once made: cublasLtMatmul
  /// reads its descriptors.
  template <class Make>
  matmul_plan* find_or_make(const matmul_key& key, Make&& make) {
    const std::lock_guard lock(guard);
    if (const auto it = plans.find(key); it != plans.end()) return &it->second;
    if (plans.size() >= capacity) return nullptr;
    const auto it = plans.try_emplace(key).first;  // map nodes never move: the plan stays where it is made
    try {
      make(it->second);
    } catch (...) {
      plans.erase(it);
      throw;
    }
    return &it->second;
  }
  std::size_t size() {
    const std::lock_guard lock(guard);
    return plans.size();
  }

 private:
  std::size_t capacity;
  std::mutex guard;
  std::map<matmul_key, matmul_plan> plans;
};

/// fp32 inputs sum over k in chunks of this many products, each chunk a matmul whose result the
/// next one adds to (beta = 1). A dot product summed in one fp32 sequence — what cuBLASLt does with
/// CUBLASLT_REDUCTION_SCHEME_NONE, which deterministic mode asks for, and what its heuristics pick
/// for many shapes — is ~√k ε off: at d = 2048 the gate's b3 gradient came 1.8e-5 off the exact
/// one (the CPU emulation sums that way; tolerance 1e-5). Chunks bring that to ~(√chunk + √(k/chunk)) ε,
/// in a fixed order, so still bitwise-repeatable. 16-bit inputs run on tensor cores in one call:
/// their rounding, not the sum's, bounds their error. So does a 16-bit module's fp32 product that
/// is rounded to 16 bits (dW2 over k = P): one call (chunk_fp32_k = false), not P/256 — 64 at
/// P = 16384, each with its own cuBLASLt descriptors and heuristic query on the host.
inline constexpr index_t fp32_k_chunk = 256;

inline void gemm(const gemm_args& g, void* workspace, cudaStream_t s, bool deterministic) {
  if (g.at != CUDA_R_32F || g.k <= fp32_k_chunk || !g.chunk_fp32_k) return gemm_once(g, workspace, s, deterministic);
  // Chunk c of op(A) [m, k] is columns [c·chunk, …) of op(A): rows of A as stored when A is transposed.
  const index_t a_step = g.ta == CUBLAS_OP_N ? fp32_k_chunk * g.lda : fp32_k_chunk;
  const index_t b_step = g.tb == CUBLAS_OP_N ? fp32_k_chunk : fp32_k_chunk * g.ldb;
  for (index_t k0 = 0, c = 0; k0 < g.k; k0 += fp32_k_chunk, ++c) {
    gemm_args part = g;
    part.k = std::min(fp32_k_chunk, g.k - k0);
    part.A = static_cast<const float*>(g.A) + c * a_step;
    part.B = static_cast<const float*>(g.B) + c * b_step;
    part.beta = c == 0 ? g.beta : 1.f;
    gemm_once(part, workspace, s, deterministic);
  }
}

inline void gemm_once(const gemm_args& g, void* workspace, cudaStream_t s, bool deterministic) {
  if (g.m == 0 || g.n == 0) return;
  if (g.k == 0) {
    if (g.beta == 0.f)
      GRUN_CUDA_CHECK(cudaMemset2DAsync(g.D, size_of(g.dt) * std::size_t(g.ldd), 0, size_of(g.dt) * std::size_t(g.m),
                                        std::size_t(g.n), s));
    return;
  }
  const float host_alpha = 1.f;
  const float *alpha = &host_alpha, *beta = &g.beta;
  if (g.scaled != nullptr) {
    require<error>(g.beta == 0.f || g.beta == 1.f, "gate::mlp on exec::cuda: a scaled matmul takes beta 0 or 1, got ", g.beta);
    alpha = &g.scaled->unscale;
    beta = g.beta == 0.f ? &g.scaled->zero : &g.scaled->one;
  }
  const std::uint32_t align_a = alignment_of(g.A, g.lda, size_of(g.at)), align_b = alignment_of(g.B, g.ldb, size_of(g.bt)),
                      align_d = alignment_of(g.D, g.ldd, size_of(g.dt));
  int device = 0;
  GRUN_CUDA_CHECK(cudaGetDevice(&device));
  const matmul_key key{device, int(g.ta), int(g.tb), int(g.at), int(g.bt), int(g.dt),
                       g.m, g.n, g.k, g.lda, g.ldb, g.ldd,
                       align_a, align_b, align_d, deterministic, g.scaled != nullptr};
  const auto make = [&](matmul_plan& plan) {
    plan.handle = lt_handle();
    GRUN_CUBLASLT_CHECK(cublasLtMatmulDescInit(&plan.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    GRUN_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(&plan.op, CUBLASLT_MATMUL_DESC_TRANSA, &g.ta, sizeof(g.ta)));
    GRUN_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(&plan.op, CUBLASLT_MATMUL_DESC_TRANSB, &g.tb, sizeof(g.tb)));
    if (g.scaled != nullptr) {
      const std::int32_t mode = CUBLASLT_POINTER_MODE_DEVICE;
      GRUN_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(&plan.op, CUBLASLT_MATMUL_DESC_POINTER_MODE, &mode, sizeof(mode)));
    }
    const bool an = g.ta == CUBLAS_OP_N, bn = g.tb == CUBLAS_OP_N;
    GRUN_CUBLASLT_CHECK(cublasLtMatrixLayoutInit(&plan.a, g.at, std::uint64_t(an ? g.m : g.k),
                                                 std::uint64_t(an ? g.k : g.m), std::int64_t(g.lda)));
    GRUN_CUBLASLT_CHECK(cublasLtMatrixLayoutInit(&plan.b, g.bt, std::uint64_t(bn ? g.k : g.n),
                                                 std::uint64_t(bn ? g.n : g.k), std::int64_t(g.ldb)));
    GRUN_CUBLASLT_CHECK(cublasLtMatrixLayoutInit(&plan.d, g.dt, std::uint64_t(g.m), std::uint64_t(g.n), std::int64_t(g.ldd)));
    cublasLtMatmulPreferenceOpaque_t pref{};
    GRUN_CUBLASLT_CHECK(cublasLtMatmulPreferenceInit(&pref));
    const std::uint64_t ws = workspace_bytes;
    GRUN_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(&pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    GRUN_CUBLASLT_CHECK(
        cublasLtMatmulPreferenceSetAttribute(&pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a, sizeof(align_a)));
    GRUN_CUBLASLT_CHECK(
        cublasLtMatmulPreferenceSetAttribute(&pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b, sizeof(align_b)));
    GRUN_CUBLASLT_CHECK(
        cublasLtMatmulPreferenceSetAttribute(&pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_d, sizeof(align_d)));
    GRUN_CUBLASLT_CHECK(
        cublasLtMatmulPreferenceSetAttribute(&pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_d, sizeof(align_d)));
    if (deterministic) {
      const std::uint32_t mask = CUBLASLT_REDUCTION_SCHEME_NONE;
      GRUN_CUBLASLT_CHECK(
          cublasLtMatmulPreferenceSetAttribute(&pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &mask, sizeof(mask)));
    }
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    // "No algorithm" comes back either as NOT_SUPPORTED or as success with zero results: both are
    // reported as one grun::error naming the problem (and nothing is kept: the next call asks
    // again); any other failure is a cuBLASLt error.
    const cublasStatus_t heuristic =
        cublasLtMatmulAlgoGetHeuristic(plan.handle, &plan.op, &plan.a, &plan.b, &plan.d, &plan.d, &pref, 1, &result, &found);
    if (heuristic != CUBLAS_STATUS_NOT_SUPPORTED) GRUN_CUBLASLT_CHECK(heuristic);
    require<error>(heuristic == CUBLAS_STATUS_SUCCESS && found > 0, "gate::mlp on exec::cuda: cuBLASLt has no algorithm for a ",
                   g.m, " × ", g.n, " × ", g.k, " matmul (", g.at == CUDA_R_32F ? "fp32" : "16-bit", " inputs, alignment A/B/D ",
                   align_a, "/", align_b, "/", align_d, " bytes)",
                   deterministic ? " without split-K reduction (deterministic mode)" : "");
    plan.algo = result.algo;
  };
  std::optional<matmul_plan> unkept;  // planned here only when kept_matmuls is full (a kept plan costs no fill)
  matmul_plan* plan = kept_matmuls::instance().find_or_make(key, make);
  if (plan == nullptr) {
    plan = &unkept.emplace();
    make(*plan);
  }
  GRUN_CUBLASLT_CHECK(cublasLtMatmul(plan->handle, &plan->op, alpha, g.A, &plan->a, g.B, &plan->b, beta, g.D, &plan->d,
                                     g.D, &plan->d, &plan->algo, workspace, workspace_bytes, s));
}

/// out [P, ld] (ld ≥ d) = the rows of h at pos.
template <class T>
__global__ void gather_rows_kernel(matrix_view<const T, cuda_space> h, const index_t* __restrict__ pos, index_t P,
                                   T* __restrict__ out, index_t ld) {
  const index_t d = h.extent(1), n = P * d;
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += index_t(gridDim.x) * blockDim.x)
    out[(i / d) * ld + i % d] = h.row(pos[i / d])[i % d];
}

/// Operands of the tensor-core GEMMs are kept 16-byte aligned (address and row pitch), so cuBLASLt
/// never has to fall back for odd d or odd views: 2-byte types are padded to 8 elements per row.
inline bool aligned_rows(const void* p, index_t ld, std::size_t elem) {
  return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0 && (std::size_t(ld) * elem) % 16 == 0;
}

inline constexpr int head_rows = 4;  // rows (warps) per CTA of the head kernel

/// x = relu(x + b) over [P, H] fp32 in place (b [H] broadcast over rows).
template <class T>
__global__ void bias_relu_kernel(float* __restrict__ x, index_t P, index_t H, const T* __restrict__ b) {
  const index_t n = P * H;
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += index_t(gridDim.x) * blockDim.x)
    x[i] = fmaxf(x[i] + dload(b + i % H), 0.f);
}

/// a2 = relu(z2 + b2) in place over z2 [P, H2], g = σ(w3·a2 + b3). One warp per row.
template <class T, int H2>
__global__ void __launch_bounds__(32 * head_rows) head_out_kernel(float* __restrict__ a2, const T* __restrict__ b2,
                                                                  const T* __restrict__ w3, const T* __restrict__ b3,
                                                                  index_t P, float* __restrict__ z) {
  using WR = cub::WarpReduce<float>;
  __shared__ typename WR::TempStorage tmp[head_rows];
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const index_t q = index_t(blockIdx.x) * head_rows + warp;
  if (q >= P) return;  // whole warps leave; no block-wide barrier below
  float part = 0.f;
  for (int o = lane; o < H2; o += 32) {
    const float v = fmaxf(a2[q * H2 + o] + dload(b2 + o), 0.f);
    a2[q * H2 + o] = v;
    part = fmaf(dload(w3 + o), v, part);
  }
  const float z3 = WR(tmp[warp]).Sum(part);
  if (lane == 0) z[q] = dload(b3) + z3;  // the gate's logit: the fused kernels take g = σ(z), σ'(z) = σ(z)σ(−z)
}

/// Blocks for a grid-stride loop over n elements.
inline unsigned grid_for(index_t n, int threads) {
  return unsigned(std::clamp<index_t>(cuda::ceil_div(n, threads), 1, 65535));
}

/// dz2 = [a2 > 0] dz3 w3 over [P, H2] fp32.
template <class T>
__global__ void dz2_kernel(const float* __restrict__ a2, const float* __restrict__ dz3, const T* __restrict__ w3,
                           index_t P, index_t H2, float* __restrict__ dz2) {
  const index_t n = P * H2;
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += index_t(gridDim.x) * blockDim.x)
    dz2[i] = a2[i] > 0.f ? dz3[i / H2] * dload(w3 + i % H2) : 0.f;
}

/// dz1 = [a1 > 0] dA1, in place over dA1 [P, H1] fp32, and as T (row pitch ld1) for the tensor-core
/// GEMMs unless dz1 is null (fp16: stored scaled by scaled_dz1_kernel once its maximum is known).
template <class T>
__global__ void dz1_kernel(const float* __restrict__ a1, float* __restrict__ dz1f, index_t P, index_t H1,
                           T* __restrict__ dz1, index_t ld1) {
  const index_t n = P * H1;
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += index_t(gridDim.x) * blockDim.x) {
    const float v = a1[i] > 0.f ? dz1f[i] : 0.f;
    dz1f[i] = v;
    if (dz1 != nullptr) dstore(dz1 + (i / H1) * ld1 + i % H1, v);
  }
}

/// dz1 [P, ld1] as T = dz1f 2^s, s from scale->amax (fp16_scale_exponent); the first thread writes
/// the matmuls' alpha = 2^-s and betas.
template <class T>
__global__ void scaled_dz1_kernel(const float* __restrict__ dz1f, index_t P, index_t H1, fp16_scale* scale,
                                  T* __restrict__ dz1, index_t ld1) {
  const int e = fp16_scale_exponent(scale->amax);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    scale->unscale = ldexpf(1.f, -e);
    scale->zero = 0.f;
    scale->one = 1.f;
  }
  const index_t n = P * H1;
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += index_t(gridDim.x) * blockDim.x)
    dstore(dz1 + (i / H1) * ld1 + i % H1, ldexpf(dz1f[i], e));
}

struct magnitude {
  __host__ __device__ float operator()(float x) const { return fabsf(x); }
};

/// dZ1 as fp16, scaled (see fp16_scale): scale->amax = max |dz1f| with cub::DeviceReduce::Max, then
/// the scaled store.
template <class T>
void store_scaled_dz1(const float* dz1f, index_t P, index_t H1, fp16_scale* scale, T* dz1, index_t ld1, cudaStream_t s) {
  const auto magnitudes = thrust::make_transform_iterator(dz1f, magnitude{});
  cuda::detail::run_with_cub_scratch(s, [&](void* temp, std::size_t& bytes) {
    return cub::DeviceReduce::Max(temp, bytes, magnitudes, &scale->amax, P * H1, s);
  });
  scaled_dz1_kernel<T><<<grid_for(P * H1, 256), 256, 0, s>>>(dz1f, P, H1, scale, dz1, ld1);
  GRUN_CUDA_CHECK_LAUNCH();
}

/// Rows per partial column sum: fixed, so the result does not depend on the launch.
inline constexpr index_t colsum_slice = 256;

/// partial[s][c] = Σ_{r in slice s} w[r] · x[r, c] (w ≡ 1 when null), rows in order, in double.
/// (A template, as every kernel in grun's headers is: a plain __global__ function defined in a header
/// is defined again in each .cu file that includes it, and two of them do not link into one program.)
template <index_t Slice>
__global__ void colsum_partial_kernel(const float* __restrict__ x, index_t rows, index_t cols, index_t ld,
                                      const float* __restrict__ weight, double* __restrict__ partial) {
  const index_t c = index_t(blockIdx.x) * blockDim.x + threadIdx.x, slice = blockIdx.y;
  if (c >= cols) return;
  const index_t r0 = slice * Slice, r1 = rows < r0 + Slice ? rows : r0 + Slice;
  double acc = 0;
  for (index_t r = r0; r < r1; ++r) acc += double(weight ? weight[r] : 1.f) * double(x[r * ld + c]);
  partial[slice * cols + c] = acc;
}

/// out[c] = Σ_s partial[s][c], slices in order.
template <class T>
__global__ void colsum_final_kernel(const double* __restrict__ partial, index_t slices, index_t cols, T* __restrict__ out) {
  const index_t c = index_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  double acc = 0;
  for (index_t s = 0; s < slices; ++s) acc += partial[s * cols + c];
  out[c] = store<T>(acc);
}

/// out[c] = Σ_r w[r] · x[r, c] over rows ≥ 1 (a bias or w3 gradient): slices of colsum_slice rows in
/// parallel, then the slices in order — a serial sum over every row ran one thread per column and
/// took milliseconds at P = 16384.
template <class T>
void column_sums(const float* x, index_t rows, index_t cols, index_t ld, const float* weight, T* out, cudaStream_t s) {
  const index_t slices = cuda::ceil_div(rows, colsum_slice);
  require<shape_error>(slices <= 65535, "gate::mlp on exec::cuda: at most ", 65535 * colsum_slice, " selected rows, got ", rows);
  cuda::detail::stream_scratch<double> partial(slices * cols, s);
  const dim3 grid(unsigned(cuda::ceil_div(cols, 128)), unsigned(slices));
  colsum_partial_kernel<colsum_slice><<<grid, 128, 0, s>>>(x, rows, cols, ld, weight, partial.ptr);
  colsum_final_kernel<T><<<unsigned(cuda::ceil_div(cols, 128)), 128, 0, s>>>(partial.ptr, slices, cols, out);
  GRUN_CUDA_CHECK_LAUNCH();
}

template <class T>
__global__ void convert_kernel(const float* __restrict__ x, index_t n, T* __restrict__ out) {
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += index_t(gridDim.x) * blockDim.x)
    out[i] = store<T>(x[i]);
}
template <class T>
__global__ void widen_kernel(const T* __restrict__ x, index_t n, float* __restrict__ out) {
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += index_t(gridDim.x) * blockDim.x)
    out[i] = dload(x + i);
}

/// The selected rows of h as one [P, d] matrix with 16-byte aligned rows: h itself when every row is
/// selected in order and h's rows are aligned, else the rows gathered once (row pitch d rounded up to 8).
template <class T>
struct selected_rows {
  cuda::detail::stream_scratch<T> gathered;
  cuda::detail::stream_scratch<index_t> dpos;
  const T* data = nullptr;
  index_t ld = 0;
  /// cuBLASLt needs ld ≥ d: rows that overlap (a broadcast row, stride 0, or any stride(0) < d) are
  /// gathered like an unaligned h.
  static bool direct(matrix_view<const T, cuda_space> h, const positions& pos) {
    return cuda::detail::selects_every_row(pos, h.extent(0)) && h.stride(0) >= h.extent(1) &&
           aligned_rows(h.data(), h.stride(0), sizeof(T));
  }
  selected_rows(matrix_view<const T, cuda_space> h, const positions& pos, cudaStream_t s)
      : gathered(direct(h, pos) ? 0 : pos.size() * fused::detail::padded_dim(h.extent(1)), s),
        dpos(gathered.ptr ? pos.size() : 0, s) {
    if (gathered.ptr == nullptr) {
      data = h.data();
      ld = h.stride(0);
      return;
    }
    const index_t P = pos.size(), d = h.extent(1);
    ld = fused::detail::padded_dim(d);
    GRUN_CUDA_CHECK(cudaMemcpyAsync(dpos.ptr, pos.data(), sizeof(index_t) * std::size_t(P), cudaMemcpyHostToDevice, s));
    gather_rows_kernel<T><<<grid_for(P * d, 256), 256, 0, s>>>(h, dpos.ptr, P, gathered.ptr, ld);
    GRUN_CUDA_CHECK_LAUNCH();
    data = gathered.ptr;
  }
};

/// W1 [H1, d] with 16-byte aligned rows: the parameter itself, or a padded copy (pitch d rounded up to 8).
template <class T>
struct aligned_w1 {
  cuda::detail::stream_scratch<T> copy;
  const T* data = nullptr;
  index_t ld = 0;
  aligned_w1(const T* w1, index_t h1, index_t d, cudaStream_t s)
      : copy(aligned_rows(w1, d, sizeof(T)) ? 0 : h1 * fused::detail::padded_dim(d), s) {
    if (copy.ptr == nullptr) {
      data = w1;
      ld = d;
      return;
    }
    ld = fused::detail::padded_dim(d);
    GRUN_CUDA_CHECK(cudaMemcpy2DAsync(copy.ptr, sizeof(T) * std::size_t(ld), w1, sizeof(T) * std::size_t(d),
                                      sizeof(T) * std::size_t(d), std::size_t(h1), cudaMemcpyDeviceToDevice, s));
    data = copy.ptr;
  }
};

/// Every module's W2 [H2, H1] in fp32, as the second layer's matmuls take it (they multiply the
/// fp32 activations, and cuBLASLt does not mix input types): fp32 parameters as they are, 16-bit
/// ones widened once per call into scratch (16K elements per module), which the backward's forward
/// recompute and its gate path then share.
template <class T>
class fp32_w2s {
 public:
  template <class Modules>
  fp32_w2s(const Modules& modules, index_t n, cudaStream_t s)
      : copy_(std::is_same_v<T, float> ? 0 : index_t(modules.size()) * n, s) {
    for (std::size_t k = 0; k < modules.size(); ++k) {
      const T* w2 = modules[k].gate.w2.data;
      if constexpr (std::is_same_v<T, float>) {
        w2s_.push_back(w2);
      } else {
        float* wide = copy_.ptr + index_t(k) * n;
        widen_kernel<T><<<grid_for(n, 256), 256, 0, s>>>(w2, n, wide);
        GRUN_CUDA_CHECK_LAUNCH();
        w2s_.push_back(wide);
      }
    }
  }
  const float* operator[](index_t k) const { return w2s_[std::size_t(k)]; }

 private:
  cuda::detail::stream_scratch<float> copy_;
  std::vector<const float*> w2s_;
};

/// The gate's forward for one module: a1s [P, H1], a2s [P, H2], the logits z3 [P] (g = σ(z3)).
///   Z1 = Hs W1ᵀ (cuBLASLt, tensor cores for 16-bit h), a1 = relu(Z1 + b1),
///   Z2 = A1 W2ᵀ (cuBLASLt, fp32), a2 = relu(Z2 + b2), g = σ(w3·a2 + b3) (one warp per row).
template <class T, int H1, int H2, class GP>
void gate_forward(const GP& gp, const float* w2, const T* hs, index_t ldh, index_t P, index_t d, float* a1s, float* a2s,
                  float* g, void* ws, cudaStream_t s, bool deterministic) {
  // Row-major Z1 [P, H1] is column-major [H1, P] = op_T(W1 as column-major [d, H1]) · (Hs as column-major [d, P]).
  const aligned_w1<T> w1(gp.w1.data, H1, d, s);
  gemm(CUBLAS_OP_T, CUBLAS_OP_N, H1, P, d, w1.data, data_type<T>(), w1.ld, hs, data_type<T>(), ldh, 0.f, a1s, H1, ws, s,
       deterministic);
  bias_relu_kernel<T><<<grid_for(P * H1, 256), 256, 0, s>>>(a1s, P, H1, gp.b1.data);
  GRUN_CUDA_CHECK_LAUNCH();
  // Z2 [P, H2] row-major = column-major [H2, P] = op_T(W2 as column-major [H1, H2]) · (A1 as column-major [H1, P]).
  gemm(CUBLAS_OP_T, CUBLAS_OP_N, H2, P, H1, w2, CUDA_R_32F, H1, a1s, CUDA_R_32F, H1, 0.f, a2s, H2, ws, s,
       deterministic);
  head_out_kernel<T, H2><<<unsigned(cuda::ceil_div(P, head_rows)), 32 * head_rows, 0, s>>>(a2s, gp.b2.data, gp.w3.data,
                                                                                         gp.b3.data, P, g);
  GRUN_CUDA_CHECK_LAUNCH();
}

/// What the forward keeps for its backward (saved_activations, 16-bit storage), one device block of
/// width floats per position and module: the ReFT's e and z [K][P][R + 1] (fused::detail::keep_values;
/// the coefficient kernel then reads dout only), then the gate's a1 [K][P][H1], a2 [K][P][H2] and
/// logits z3 [K][P] (the backward then skips the gate's forward: its first-layer GEMM over P × d × H1).
template <int R, int H1, int H2, class F>
struct kept_regions {
  static constexpr index_t width = R + 1 + H1 + H2 + 1;
  F *e = nullptr, *a1 = nullptr, *a2 = nullptr, *z3 = nullptr;
  kept_regions(F* base, index_t K, index_t P) {
    if (!base) return;
    e = base;
    a1 = e + K * P * (R + 1);
    a2 = a1 + K * P * H1;
    z3 = a2 + K * P * H2;
  }
};

template <class I, class T, class View>
bool applicable(const View& h, index_t K) {
  constexpr int R = int(I::rank);
  const index_t coef_floats = (K * fused::detail::forward_rows<R>() * R + 3) / 4 * 4;
  return h.stride(1) == 1 && K >= 1 && coef_floats * index_t(sizeof(float)) <= 32 * 1024;
}

}  // namespace detail

/// Forward (see the file comment). Returns false, having done nothing, when the call is not one
/// these kernels take (the caller runs the generic path). keep(width) → float*: as for
/// fused::forward — with 16-bit storage, where to keep detail::kept_regions (or null).
template <class I, class T, class Keep = fused::keep_nothing>
bool forward(const exec::cuda_t& ex, std::span<const module_params<I, T, cuda_space>> modules, double scale,
             matrix_view<const T, cuda_space> h, const positions& pos, matrix_view<T, cuda_space> out,
             matrix_view<T, cuda_space> gates, Keep&& keep = {}) {
  using G = typename I::gate_type;
  static_assert(supported<G, typename I::reft_type, typename I::ortho_type>);
  constexpr int H1 = mlp_kind<G>::h1, H2 = mlp_kind<G>::h2, R = int(I::rank);
  using regions = detail::kept_regions<R, H1, H2, float>;
  const index_t N = h.extent(0), d = h.extent(1), P = pos.size(), K = index_t(modules.size());
  if (!detail::applicable<I, T>(h, K) || out.stride(1) != 1) return false;
  if (N == 0 || P == 0)
    return fused::forward_impl<I, T, fused::detail::gate_external>(ex, modules, scale, h, pos, out, gates, nullptr);
  require_device("gated_intervention::forward");
  const cudaStream_t s = stream_of(ex);
  // 16-bit storage: the gate's activations go straight to where they are kept (every module's);
  // otherwise to scratch, one module at a time.
  float* base = nullptr;
  if constexpr (!std::is_same_v<T, float>) base = keep(regions::width);
  const regions kept(base, K, P);
  detail::selected_rows<T> hs(h, pos, s);
  cuda::detail::stream_scratch<float> a1s(base ? 0 : P * H1, s), a2s(base ? 0 : P * H2, s), g(base ? 0 : K * P, s);
  float* const z3 = base ? kept.z3 : g.ptr;
  cuda::detail::stream_scratch<unsigned char> ws(index_t(detail::workspace_bytes), s);
  const detail::fp32_w2s<T> w2s(modules, index_t(H2) * H1, s);
  for (index_t k = 0; k < K; ++k)
    detail::gate_forward<T, H1, H2>(modules[std::size_t(k)].gate, w2s[k], hs.data, hs.ld, P, d,
                                    base ? kept.a1 + k * P * H1 : a1s.ptr, base ? kept.a2 + k * P * H2 : a2s.ptr,
                                    z3 + k * P, ws.ptr, s, ex.deterministic);
  return fused::forward_impl<I, T, fused::detail::gate_external>(ex, modules, scale, h, pos, out, gates, z3,
                                                                 [&](index_t) { return kept.e; });
}

/// Backward (see the file comment): dh and the trained module's gradients (gate and ReFT, overwritten).
/// kept: null, or what the forward kept (detail::kept_regions): the gate's forward is not recomputed
/// and the coefficient kernel reads dout only.
template <class I, class T, class DG>
bool backward(const exec::cuda_t& ex, std::span<const module_params<I, T, cuda_space>> modules, double scale,
              index_t trained, matrix_view<const T, cuda_space> h, const positions& pos,
              matrix_view<const T, cuda_space> dout, matrix_view<const DG, cuda_space> dgates,
              matrix_view<T, cuda_space> dh, const module_params<I, T, cuda_space>& grads,
              const float* kept_base = nullptr) {
  using G = typename I::gate_type;
  static_assert(supported<G, typename I::reft_type, typename I::ortho_type>);
  constexpr int H1 = mlp_kind<G>::h1, H2 = mlp_kind<G>::h2, R = int(I::rank);
  const index_t d = h.extent(1), P = pos.size(), K = index_t(modules.size());
  if (!detail::applicable<I, T>(h, K) || dout.stride(1) != 1 || dh.stride(1) != 1) return false;
  require_device("gated_intervention::backward");
  const cudaStream_t s = stream_of(ex);
  auto no_gate_path = [](const float*) { return fused::detail::gate_path<T>{}; };
  if (P == 0) {
    // No rows: dh = dout, every gradient zero.
    const bool ok = fused::backward_impl<I, T, fused::detail::gate_external>(ex, modules, scale, trained, h, pos, dout,
                                                                              dgates, dh, grads, nullptr, no_gate_path);
    const auto& gg = grads.gate;
    for (const auto* leaf : {&gg.w1, &gg.b1, &gg.w2, &gg.b2, &gg.w3, &gg.b3})
      if (leaf->size() > 0) GRUN_CUDA_CHECK(cudaMemsetAsync(leaf->data, 0, sizeof(T) * std::size_t(leaf->size()), s));
    return ok;
  }
  detail::selected_rows<T> hs(h, pos, s);  // (dW1 = dZ1ᵀ Hs needs it either way)
  const detail::kept_regions<R, H1, H2, const float> kept(kept_base, K, P);
  const index_t recompute = kept_base ? 0 : 1;
  cuda::detail::stream_scratch<float> a1s(recompute * K * P * H1, s), a2s(recompute * K * P * H2, s),
      g(recompute * K * P, s);
  cuda::detail::stream_scratch<unsigned char> ws(index_t(detail::workspace_bytes), s);
  const detail::fp32_w2s<T> w2s(modules, index_t(H2) * H1, s);
  if (recompute)
    for (index_t k = 0; k < K; ++k)
      detail::gate_forward<T, H1, H2>(modules[std::size_t(k)].gate, w2s[k], hs.data, hs.ld, P, d, a1s.ptr + k * P * H1,
                                      a2s.ptr + k * P * H2, g.ptr + k * P, ws.ptr, s, ex.deterministic);
  const float* const a1_all = kept_base ? kept.a1 : a1s.ptr;
  const float* const a2_all = kept_base ? kept.a2 : a2s.ptr;
  const float* const z3 = kept_base ? kept.z3 : g.ptr;
  constexpr index_t H1p = (H1 + 7) / 8 * 8;  // dZ1's row pitch as T (16-byte aligned rows)
  cuda::detail::stream_scratch<T> dz1(P * H1p, s);
  cuda::detail::stream_scratch<float> dz1f(P * H1, s), dz2(P * H2, s), dw1(H1 * d, s), dw2(H2 * H1, s);
  // The gate's path of dh in T (fp32 storage: fp32), rows padded to 16 bytes (fused::detail::gate_path).
  const index_t ldg = cuda::ceil_div(d, index_t(16 / sizeof(T))) * index_t(16 / sizeof(T));
  cuda::detail::stream_scratch<T> dhg(P * ldg, s);
  constexpr bool scaled = detail::scaled_dz1<T>;
  cuda::detail::stream_scratch<detail::fp16_scale> dz1_scale(scaled ? 1 : 0, s);  // reused by each module, in stream order
  auto gate_path = [&](const float* dz3) {
    for (index_t k = 0; k < K; ++k) {
      const auto& gp = modules[std::size_t(k)].gate;
      const float* a1k = a1_all + k * P * H1;
      const float* a2k = a2_all + k * P * H2;
      // dz2 = [a2 > 0] dz3 w3;  dA1 = dZ2 W2: row-major [P, H1] = column-major [H1, P] = (W2 as column-major
      // [H1, H2]) · (dZ2 as column-major [H2, P]);  dz1 = [a1 > 0] dA1 (fp32, and as T for the GEMMs below:
      // fp16 scaled by 2^s, which they take back through alpha).
      detail::dz2_kernel<T><<<detail::grid_for(P * H2, 256), 256, 0, s>>>(a2k, dz3 + k * P, gp.w3.data, P, H2, dz2.ptr);
      GRUN_CUDA_CHECK_LAUNCH();
      detail::gemm(CUBLAS_OP_N, CUBLAS_OP_N, H1, P, H2, w2s[k], CUDA_R_32F, H1, dz2.ptr, CUDA_R_32F, H2, 0.f, dz1f.ptr,
                   H1, ws.ptr, s, ex.deterministic);
      detail::dz1_kernel<T><<<detail::grid_for(P * H1, 256), 256, 0, s>>>(a1k, dz1f.ptr, P, H1, scaled ? nullptr : dz1.ptr, H1p);
      GRUN_CUDA_CHECK_LAUNCH();
      if constexpr (scaled) detail::store_scaled_dz1<T>(dz1f.ptr, P, H1, dz1_scale.ptr, dz1.ptr, H1p, s);
      // DHg (+)= dZ1 W1: row-major [P, d] = column-major [d, P] = (W1 as column-major [d, H1]) · (dZ1 as column-major [H1, P]),
      // rounded to T as it is written.
      const detail::aligned_w1<T> w1(gp.w1.data, H1, d, s);
      detail::gemm(CUBLAS_OP_N, CUBLAS_OP_N, d, P, H1, w1.data, detail::data_type<T>(), w1.ld, dz1.ptr,
                   detail::data_type<T>(), H1p, k == 0 ? 0.f : 1.f, dhg.ptr, ldg, ws.ptr, s, ex.deterministic,
                   dz1_scale.ptr, true, detail::data_type<T>());
      if (k != trained) continue;
      const auto& gg = grads.gate;
      // dW1 = dZ1ᵀ Hs: row-major [H1, d] = column-major [d, H1] = (Hs as column-major [d, P]) · op_T(dZ1 as column-major [H1, P]).
      detail::gemm(CUBLAS_OP_N, CUBLAS_OP_T, d, H1, P, hs.data, detail::data_type<T>(), hs.ld, dz1.ptr,
                   detail::data_type<T>(), H1p, 0.f, dw1.ptr, d, ws.ptr, s, ex.deterministic, dz1_scale.ptr);
      // dW2 = dZ2ᵀ A1: row-major [H2, H1] = column-major [H1, H2] = (A1 as column-major [H1, P]) · op_T(dZ2 as column-major [H2, P]).
      detail::gemm(CUBLAS_OP_N, CUBLAS_OP_T, H1, H2, P, a1k, CUDA_R_32F, H1, dz2.ptr, CUDA_R_32F, H2, 0.f, dw2.ptr, H1,
                   ws.ptr, s, ex.deterministic, nullptr, std::is_same_v<T, float>);
      detail::convert_kernel<T><<<detail::grid_for(H1 * d, 256), 256, 0, s>>>(dw1.ptr, H1 * d, gg.w1.data);
      detail::convert_kernel<T><<<detail::grid_for(H2 * H1, 256), 256, 0, s>>>(dw2.ptr, H2 * H1, gg.w2.data);
      detail::column_sums<T>(dz1f.ptr, P, H1, H1, nullptr, gg.b1.data, s);
      detail::column_sums<T>(dz2.ptr, P, H2, H2, nullptr, gg.b2.data, s);
      detail::column_sums<T>(a2k, P, H2, H2, dz3 + k * P, gg.w3.data, s);
      detail::column_sums<T>(dz3 + k * P, P, 1, 1, nullptr, gg.b3.data, s);
    }
    return fused::detail::gate_path<T>{dhg.ptr, ldg, !std::is_same_v<T, float>};
  };
  return fused::backward_impl<I, T, fused::detail::gate_external>(ex, modules, scale, trained, h, pos, dout, dgates, dh,
                                                                   grads, z3, gate_path, kept.e);
}

}  // namespace grun::cuda::mlp_gate
