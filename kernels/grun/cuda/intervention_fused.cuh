#pragma once
// grun/cuda/intervention_fused.cuh — block-cooperative fused kernels for the shipped rank-r
// policies: gate::linear / gate::always × reft::loreft<r> / noreft<r> / direft<r>, r ≤ 32.
// intervention.cuh dispatches here (fused::supported<G, R, O>, storage float / half / bfloat16:
// fused::takes_storage<T>) and keeps the generic per-thread path for every other policy (a user's
// policies) and for double storage.
//
// The math, for one selected row h [d] and module k (U, D [r, d] rows, b [r], gate w [d], c):
//   loreft/noreft (U = R, D = W):   e = D h + b − U h,   Δ = Uᵀ e            (ReFT eq. 2)
//   direft        (U = W2, D = W1): e = D h + b,         Δ = Uᵀ e
//   g = σ(wᵀh + c) (linear) or 1 (always);     h' = h + s Σ_k g_k Δ_k
// so a row needs 2r+1 dots over d, then one axpy pass over d. Backward (x = dout row, δ = s g x):
//   ux_i = U_i·x,  de_i = s g ux_i,  dL/dg = dg_ext + s Σ_i e_i ux_i,  dz = dL/dg · g(1 − g)
//   dh = x + Σ_k [ Σ_i de_i (D_i − [lo] U_i) + dz w ]
//   dU_i += s g e_i x − [lo] de_i h,   dD_i += de_i h,   db += de,   dw += dz h,   dc += dz
// i.e. 3r+1 dots per row and module, then rank-(2r+1) updates of the gradients.
//
// Kernels (one stream, no host round trip; positions gathered on the device):
//   pack_kernel      parameters of the K modules → [K][2r+1 rows of dp | b | c] as stored (T; dp = d
//                    rounded up to 8: every row 16-byte aligned, so vector loads). Small and L2-resident,
//                    but every CTA streams all of it, so it is kept at the storage width: with fp32
//                    packing a bf16 tile of 4 rows pulled 4.5× its own bytes of parameters through L2
//                    (measured on an H200: the forward at 23% of copy bandwidth).
//   forward_kernel   one CTA per tile of ROWS selected rows: 16-byte vector loads of h (bf16/fp16 × 8,
//                    fp32 × 4; scalar when d or the rows are not 16-byte aligned), the 2r+1 dots of every
//                    row of the tile reduced in ONE cub::BlockReduce over a small array type, then the
//                    write of h' in the same kernel. How the tile is read — streamed through registers
//                    and staged in shared memory, held in registers, or copied by cp.async — is a
//                    schedule (forward_schedule below). All K modules of a stack in the same launch.
//   forward_tensor_kernel  the default forward for 16-bit storage (d ≤ 4096, K ≤ 8, sm_80+): tiles
//                    of 8 rows held in registers by 256 threads, the dots on tensor cores (mma.sync,
//                    fp32 accumulate); one module's parameters staged in shared memory by persistent
//                    CTAs, a stack's read in place. See "forward on tensor cores" below. Opt-in
//                    (forward_schedule::tensor_pipelined): one module, one CTA of 512 threads per SM,
//                    its tiles double-buffered in shared memory by cp.async — the same bits.
//   Both forwards can keep e and z of every position for the backward (saved_activations; 16-bit
//   storage): fp32 [K][P][r+1].
//   Positions: when the list selects every row in order, nothing is uploaded (row q is position q).
//   coef_kernel      backward, per tile of rows: the 3r+1 dots of each module reduced like the forward
//                    (h and dout streamed or held in registers: coef_schedule; accumulated in fp64 for
//                    fp32 storage, see the kernel); per-row coefficients (de, dz, s g e) to a small
//                    fp32 buffer [P][K][2r+1]. coef_tensor_kernel: the same on tensor cores (16-bit
//                    storage, one module; opt-in, coef_schedule::tensor).
//                    When the forward kept e = D h + b − [lo] U h and z per position (saved_activations,
//                    16-bit storage), both read dout only and form U·x alone — half their bytes.
//   slot_kernel      backward, grid (slot, column block): each slot is a fixed run of consecutive
//                    positions; a thread owns 4 (or 1) columns, walks the slot's rows, accumulates the
//                    trained module's 2r+1 gradient rows in registers and writes them to the slot's own
//                    partial-sum area, and writes dh for its columns (dout re-read, parameters held in
//                    registers for K = 1, r ≤ 8). slot_tensor_kernel: the same on tensor cores (bf16,
//                    one module; opt-in, slot_schedule::tensor).
//   sum_slots_kernel the deterministic second stage: every gradient entry = Σ over slots in double,
//                    in a grouping fixed by the slot count (8 runs, each in slot order), stored into the
//                    gradient leaves. No atomics anywhere, and the slot size depends only on (P, d, r):
//                    bitwise-repeatable on a given GPU.
#include <cooperative_groups.h>
#include <cooperative_groups/memcpy_async.h>
#include <cuda/barrier>  // cuda::aligned_size_t
#include <cub/block/block_reduce.cuh>
#include <cub/warp/warp_reduce.cuh>

#include <algorithm>
#include <span>
#include <type_traits>
#include <vector>

#include "scratch.cuh"

#include <grun/gate/always.hpp>
#include <grun/gate/linear.hpp>
#include <grun/intervention.hpp>
#include <grun/reft/direft.hpp>
#include <grun/reft/loreft.hpp>

namespace grun::cuda::fused {

// ---- which policies have fused kernels ------------------------------------------------------
template <class G> struct gate_kind { static constexpr int value = -1; };
template <> struct gate_kind<gate::always> { static constexpr int value = 0; };
template <> struct gate_kind<gate::linear> { static constexpr int value = 1; };

/// value: 1 = loreft/noreft (Δ = Uᵀ(D h + b − U h)), 0 = direft (Δ = Uᵀ(D h + b)), −1 = no fused kernel.
template <class R> struct reft_kind { static constexpr int value = -1; static constexpr index_t rank = 0; };
template <index_t r> struct reft_kind<reft::loreft<r>> { static constexpr int value = 1; static constexpr index_t rank = r; };
template <index_t r> struct reft_kind<reft::noreft<r>> { static constexpr int value = 1; static constexpr index_t rank = r; };
template <index_t r> struct reft_kind<reft::direft<r>> { static constexpr int value = 0; static constexpr index_t rank = r; };

/// Largest rank with fused kernels (register arrays are sized by r at compile time).
inline constexpr index_t max_rank = 32;

template <class G, class R, class O>
inline constexpr bool supported = gate_kind<G>::value >= 0 && reft_kind<R>::value >= 0 && reft_kind<R>::rank >= 1 &&
                                  reft_kind<R>::rank <= max_rank && !O::is_parametrization;

/// Storage types the fused kernels take: float, half, bfloat16 (acc_t = float, which is what the
/// kernels compute in). double storage computes in double on exec::host, so it takes the generic
/// path (the policies' own row math in double); the fused kernels would round it to fp32, and their
/// vector widths (slot_kernel's 4 columns per thread = one 16-byte load of float, 8 bytes of
/// half/bfloat16) assume a 16-byte vector holds a multiple of 4 elements, which 2 doubles are not.
template <class T>
inline constexpr bool takes_storage = std::is_same_v<T, float> || std::is_same_v<T, half> || std::is_same_v<T, bfloat16>;

/// The forward's default `keep`: nothing is kept for the backward (it recomputes).
struct keep_nothing {
  float* operator()(index_t) const noexcept { return nullptr; }
};

namespace detail {

inline constexpr int block = 128;  // threads per CTA of every fused kernel

/// How a kernel gets g: none (g ≡ 1), linear (σ(wᵀh + c), computed here), external (g = σ(z) with the
/// logit z given per module and position in fp32 [K][P], e.g. by the mlp gate's GEMMs + head; dL/dz
/// exported).
inline constexpr int gate_none = 0, gate_linear = 1, gate_external = 2;

/// N accumulators reduced as one value by cub::BlockReduce (one reduction for all dots of a tile).
template <int N, class Acc = float>
struct farr {
  Acc v[N];
};
struct farr_sum {
  template <int N, class Acc>
  __device__ __forceinline__ farr<N, Acc> operator()(const farr<N, Acc>& a, const farr<N, Acc>& b) const {
    farr<N, Acc> c;
#pragma unroll
    for (int i = 0; i < N; ++i) c.v[i] = a.v[i] + b.v[i];
    return c;
  }
};
/// a + p·x in the accumulator's precision (the product of two floats is exact in double).
__device__ __forceinline__ float multiply_add(float p, float x, float a) { return fmaf(p, x, a); }
__device__ __forceinline__ double multiply_add(float p, float x, double a) { return fma(double(p), double(x), a); }

/// V consecutive stored elements as one aligned V·sizeof(T)-byte load, and their conversion to
/// float — apart, so that a kernel can issue several loads before it uses the first.
template <class T, int V>
__device__ __forceinline__ vec<T, V> load_raw(const T* p) {
  return *reinterpret_cast<const vec<T, V>*>(p);
}
template <class T, int V>
__device__ __forceinline__ void widen(const vec<T, V>& v, float (&x)[V]) {
#pragma unroll
  for (int e = 0; e < V; ++e) x[e] = dload(&v.v[e]);
}
/// Both at once: V consecutive stored elements → float.
template <class T, int V>
__device__ __forceinline__ void load_row(const T* p, float (&x)[V]) {
  if constexpr (V == 1) x[0] = dload(p);
  else widen<T, V>(load_raw<T, V>(p), x);
}
template <class T, int V>
__device__ __forceinline__ void store_row(T* p, const float (&x)[V]) {
  if constexpr (V == 1) {
    dstore(p, x[0]);
  } else {
    vec<T, V> v;
#pragma unroll
    for (int e = 0; e < V; ++e) dstore(&v.v[e], x[e]);
    *reinterpret_cast<vec<T, V>*>(p) = v;
  }
}
/// V packed parameters → float (read-only path): float4 when V is a multiple of 4 (fp32), one 16- or
/// 8-byte vector of 8 or 4 elements (half / bfloat16) — packed rows are 16-byte aligned.
template <int V, class P>
__device__ __forceinline__ void load_param(const P* __restrict__ p, float (&x)[V]) {
  if constexpr (!std::is_same_v<P, float>) {
    static_assert(sizeof(P) == 2, "packed parameters: float, half or bfloat16");
    constexpr int W = V % 8 == 0 ? 8 : V % 4 == 0 ? 4 : 1;
#pragma unroll
    for (int e = 0; e < V; e += W) {
      float t[W];
      load_row<P, W>(p + e, t);
#pragma unroll
      for (int j = 0; j < W; ++j) x[e + j] = t[j];
    }
  } else if constexpr (V % 4 == 0) {
#pragma unroll
    for (int e = 0; e < V; e += 4) {
      const float4 t = __ldg(reinterpret_cast<const float4*>(p + e));
      x[e] = t.x; x[e + 1] = t.y; x[e + 2] = t.z; x[e + 3] = t.w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) x[e] = __ldg(p + e);
  }
}

__device__ __forceinline__ float dsigmoid(float z) { return grun::sigmoid(z); }

/// Raw pointers of one module's parameters (w, c null for gate::always).
template <class T>
struct src_ptrs {
  const T* U;
  const T* D;
  const T* b;
  const T* w;
  const T* c;
};
/// Up to 8 modules' src_ptrs by value, as a launch parameter: no host → device copy before the
/// kernel (a pageable copy costs the GPU more idle time than the packing it feeds).
inline constexpr int tensor_max_modules = 8;
template <class T>
struct module_ptrs {
  src_ptrs<T> m[tensor_max_modules];
  __host__ __device__ const src_ptrs<T>& operator[](index_t k) const { return m[k]; }
};
template <class T>
struct dst_ptrs {
  T* U;
  T* D;
  T* b;
  T* w;
  T* c;
};

/// Packed layout of one module: rows 0..r−1 = U, r..2r−1 = D, 2r = w (zeros without a gate), each
/// dp floats; then b [r], c at (2r+1)·dp. ms = module stride (a multiple of 8 floats).
GRUN_HD constexpr index_t padded_dim(index_t d) { return (d + 7) / 8 * 8; }
/// Where b starts (c follows it): after the 2r+1 rows.
GRUN_HD constexpr index_t packed_tail(index_t r, index_t dp) { return (2 * r + 1) * dp; }
GRUN_HD constexpr index_t module_stride(index_t r, index_t dp) { return packed_tail(r, dp) + (r + 1 + 7) / 8 * 8; }
/// A packed module (at pm, rows of dp) seen as sources: U, D, w rows dp apart, b and c in the tail.
template <class T>
GRUN_HD src_ptrs<T> packed_sources(const T* pm, index_t r, index_t dp, bool gated) {
  const T* tail = pm + packed_tail(r, dp);
  return {pm, pm + r * dp, tail, gated ? pm + 2 * r * dp : nullptr, gated ? tail + r : nullptr};
}
/// Row `row` < 2r+1 of a module's parameter matrix [U; D; w] (rows of d elements): U_row, D_row−r,
/// or w (null without a gate). The order every layout here keeps.
template <class T>
GRUN_HD const T* param_row(const src_ptrs<T>& m, index_t row, index_t r, index_t d) {
  return row < r ? m.U + row * d : row < 2 * r ? m.D + (row - r) * d : m.w;
}

/// Src: a device array of src_ptrs<T>, or module_ptrs<T> by value (K ≤ tensor_max_modules).
template <class T, class Src>
__global__ void pack_kernel(Src src, index_t K, int r, index_t d, index_t dp, index_t ms, T* __restrict__ out) {
  const index_t n = K * ms;
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += index_t(gridDim.x) * blockDim.x) {
    const index_t k = i / ms, o = i % ms;
    const src_ptrs<T> s = src[k];
    const index_t row = o / dp, j = o % dp;
    T v{};  // zero bits = +0: padding, and w, c without a gate
    if (row < 2 * r + 1) {
      const T* p = param_row(s, row, index_t(r), d);
      if (j < d && p != nullptr) v = p[j];
    } else {
      const index_t t = o - packed_tail(r, dp);
      if (t < r) v = s.b[t];
      else if (t == r && s.c != nullptr) v = *s.c;
    }
    out[i] = v;
  }
}

// ---- shared by the forward and the coefficient kernel ------------------------------------------
/// The row → h-row map of a selected position q: pos[q], or q itself when pos is null (every row
/// selected in order: no position list is uploaded).
__device__ __forceinline__ index_t row_at(const index_t* __restrict__ pos, index_t q) { return pos ? pos[q] : q; }

/// What a forward keeps per position and module for the backward (saved_activations on exec::cuda):
/// {e [R], z}, fp32, [K][P][R + 1].
template <int R>
inline constexpr int kept_width = R + 1;

/// The forward's values of one position and module, from its dots ar = {U·h [R] | D·h [R] | w·h}
/// (in the kernel's accumulator type) and the module's b [R] and c:
///   e_i = D_i·h + b_i − [lo] U_i·h,   z = c + w·h (gated; else 0)
/// Both forward kernels form them here, keep_values keeps them, and the coefficient kernels form
/// them here too when nothing was kept.
template <int R, bool LO, int GM, class T, class Acc>
__device__ __forceinline__ float forward_values(const Acc* ar, const T* b, const T* c, Acc (&e)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) e[i] = ar[R + i] + dload(b + i) - (LO ? ar[i] : Acc(0));
  return GM == gate_linear ? float(dload(c) + ar[2 * R]) : 0.f;
}

/// Position q's e and z for module k into kept [K][P][R + 1] (a forward's, for its backward).
template <int R>
__device__ __forceinline__ void keep_values(float* __restrict__ kept, index_t k, index_t P, index_t q,
                                            const float (&e)[R], float z) {
  float* kr = kept + (k * P + q) * kept_width<R>;
#pragma unroll
  for (int i = 0; i < R; ++i) kr[i] = e[i];
  kr[R] = z;
}

/// The dots of one vector of V columns (starting at column `col`) of every row of a tile, against the
/// packed parameter rows the math needs, accumulated into a (stride S per row):
///   a[rr·S + i]        += P_i · x_rr   for U (i < R, loreft only), D (R ≤ i < 2R), w (i = 2R, gated only)
///   a[rr·S + 2R+1 + i] += U_i · y_rr   (Y: the backward's dout rows; the forward passes Y = false)
/// (X = false: no x rows — a backward from what the forward kept.) Each parameter vector is loaded
/// once for all ROWS rows of the tile.
template <int V, int R, int ROWS, int S, bool LO, bool GATED, bool X, bool Y, class P, class Acc>
__device__ __forceinline__ void accumulate_dots(const P* __restrict__ pm, index_t dp, index_t col,
                                                const float (&x)[ROWS][V], const float (&y)[ROWS][V], Acc* a) {
  constexpr int NP = 2 * R + 1;
#pragma unroll
  for (int i = 0; i < NP; ++i) {
    const bool for_x = X && (LO || i >= R) && (GATED || i < 2 * R), for_y = Y && i < R;
    if (!for_x && !for_y) continue;
    float p[V];
    load_param<V>(pm + i * dp + col, p);
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr)
#pragma unroll
      for (int e = 0; e < V; ++e) {
        if (for_x) a[rr * S + i] = multiply_add(p[e], x[rr][e], a[rr * S + i]);
        if (for_y) a[rr * S + NP + i] = multiply_add(p[e], y[rr][e], a[rr * S + NP + i]);
      }
  }
}

/// o_rr += Σ_k Σ_i coef[k][rr][i] · U_k,i over one vector of V columns: the forward's write of h'.
template <int V, int R, int ROWS, class P>
__device__ __forceinline__ void apply_modules(const P* __restrict__ pk, index_t ms, index_t dp, index_t K, index_t col,
                                              const float* coef, float (&o)[ROWS][V]) {
  for (index_t k = 0; k < K; ++k) {
    const P* pm = pk + k * ms;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      float p[V];
      load_param<V>(pm + i * dp + col, p);
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr) {
        const float c = coef[(k * ROWS + rr) * R + i];
#pragma unroll
        for (int e = 0; e < V; ++e) o[rr][e] = fmaf(c, p[e], o[rr][e]);
      }
    }
  }
}

/// The resident schedules' loads: vectors v = threadIdx.x + c·block (c < RES) of every row of a tile,
/// all issued before any is used (past the row's end the load is clamped to vector 0: made, never used).
template <class T, int V, int RES, int ROWS>
__device__ __forceinline__ void load_resident(const T* const (&rows)[ROWS], index_t nvec, vec<T, V> (&held)[RES][ROWS]) {
#pragma unroll
  for (int c = 0; c < RES; ++c) {
    const index_t v = threadIdx.x + c * block < nvec ? threadIdx.x + c * block : 0;
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr) held[c][rr] = load_raw<T, V>(rows[rr] + v * V);
  }
}

// ---- forward ------------------------------------------------------------------------------------
/// How the forward kernel reads its tile of ROWS rows. A tuning knob for benchmarks and tests (every
/// schedule gives the same bits — each thread sums the same columns in the same order — and the
/// tests check it; bench_cuda times each), not an interface: set it before any call.
///   stream    one 16-byte vector of each row of the tile in flight per thread at a time, the tile
///             copied to shared memory on the way for the write of h' (or re-read when it does not
///             fit). Measured on an H200 (BENCHMARKS.md): 35% of copy bandwidth at d = 4096 bf16,
///             latency-bound (every unit under 60% busy, ~11 cycles per issue).
///   resident  every vector the thread owns (d ≤ max_resident·block·V: 4096 in 16-bit storage, 2048
///             in fp32) loaded at once, up front — ROWS·⌈d/(V·block)⌉ loads in flight per thread,
///             16 at d = 4096 bf16 — and kept in registers for the dots of every module and the
///             write of h': no staging and no second read, at the price of registers (≈190 at
///             d = 4096 bf16: 2 CTAs per SM).
///   staged    the whole tile copied to shared memory by cp.async (cooperative_groups::memcpy_async):
///             all of it in flight at once without holding registers, then the dots and the write
///             read shared memory. Needs the tile in shared memory (ROWS·d·sizeof(T) + coef ≤ 40 KiB).
///   tensor    (the default) the dots on tensor cores (forward_tensor_kernel below), tiles of 8 rows
///             held in registers by 256 threads; one module: its parameters staged in shared memory
///             once per CTA and the CTAs persistent; a stack: parameters read in place (packed when
///             not 16-byte aligned). 16-bit storage, d ≤ 4096, K ≤ 8, sm_80+. Not the same bits as
///             the three above (another summation order; the same bits run to run); the agreement
///             tests hold it to the host like every other path.
/// Calls a schedule cannot take (fp32 storage, rows that are not 16-byte vectors, rows too wide)
/// run `stream`.
///   tensor_apply  tensor, and with one module in bf16 (the staged kernel) the write of h' on tensor
///             cores too (apply_on_tensor_cores); other calls as tensor. Not yet timed on a GPU.
///   tensor_pipelined  tensor, and with one module whose parameters and two tiles fit in shared
///             memory (pipelined_fits) one CTA per SM that double-buffers its tiles by cp.async: the
///             next tile lands while this one is reduced and written. The tensor schedule's bits.
///             Other calls as tensor. Not yet timed on a GPU.
enum class forward_schedule { stream, resident, staged, tensor, tensor_apply, tensor_pipelined };
inline forward_schedule forward_plan = forward_schedule::tensor;

/// Most vectors per thread and row the resident schedule keeps in registers.
inline constexpr int max_resident = 4;

/// One CTA per tile of ROWS consecutive positions. Dynamic shared memory: coef [K][ROWS][R] floats,
/// then (when `stage`) the tile of h as stored, ROWS × d elements. RES > 0: the resident schedule
/// with RES vectors per thread and row; ASYNC: the staged schedule (`stage` must be true).
/// The resident schedule at 3–4 vectors per row asks ptxas for 3 CTAs per SM (≤ 168 registers; it
/// would take ~197 and fit 2): 96 KiB of loads in flight per SM instead of 64, for a 32-byte spill
/// (bf16 loreft<4>, ptxas 13.0). To be confirmed on a GPU with the other schedules. The other
/// instantiations pass 0 (ptxas's own choice, as with no second argument: an explicit 1 made it take
/// 146 registers for the streaming forward instead of 96).
template <class T, int V, int R, int ROWS, bool LO, int GM, int RES, bool ASYNC>
__global__ void __launch_bounds__(block, RES > 2 ? 3 : 0) forward_kernel(const T* __restrict__ pk, index_t ms, index_t dp, index_t K,
                                                        float scale, matrix_view<const T, cuda_space> h,
                                                        const index_t* __restrict__ pos, index_t P,
                                                        matrix_view<T, cuda_space> out, matrix_view<T, cuda_space> gates,
                                                        const float* __restrict__ gext, bool stage, index_t coef_floats,
                                                        float* __restrict__ kept) {
  static_assert(!(RES > 0 && ASYNC), "one schedule at a time");
  constexpr int NP = 2 * R + 1;
  constexpr bool GATED = GM == gate_linear;
  using A = farr<ROWS * NP>;
  using BR = cub::BlockReduce<A, block>;
  __shared__ typename BR::TempStorage tmp;
  extern __shared__ __align__(16) unsigned char smem[];
  float* coef = reinterpret_cast<float*>(smem);
  T* tile = reinterpret_cast<T*>(smem + coef_floats * sizeof(float));

  const index_t d = h.extent(1), nvec = d / V;
  const index_t q0 = index_t(blockIdx.x) * ROWS;
  const int nr = int(P - q0 < ROWS ? P - q0 : ROWS);
  // Row pointers of the tile (rows past the last position repeat the first: loaded, never stored).
  // Streaming schedules take the output rows here too (96 registers, not 128, for bf16 loreft<4>);
  // the resident one after its loads, where they do not compete with the rows it holds.
  const T* hr[ROWS];
  T* dst[ROWS];
#pragma unroll
  for (int rr = 0; rr < ROWS; ++rr) {
    const index_t row = row_at(pos, q0 + (rr < nr ? rr : 0));
    hr[rr] = h.row(row);
    if constexpr (RES == 0) dst[rr] = out.row(row);
  }

  // resident: the thread's vectors v = threadIdx.x + c·block (c < RES) of every row of the tile.
  vec<T, V> held[RES > 0 ? RES : 1][ROWS];
  if constexpr (RES > 0) load_resident<T, V>(hr, nvec, held);
  // staged: the tile lands in shared memory by cp.async; the reads below then come from there.
  if constexpr (ASYNC) {
    namespace cg = cooperative_groups;
    const cg::thread_block cta = cg::this_thread_block();
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr)
      cg::memcpy_async(cta, tile + rr * d, hr[rr], ::cuda::aligned_size_t<16>(std::size_t(d) * sizeof(T)));
    cg::wait(cta);
  }
  const T* xr[ROWS];  // where the dots read row rr
#pragma unroll
  for (int rr = 0; rr < ROWS; ++rr) xr[rr] = ASYNC ? tile + rr * d : hr[rr];

  for (index_t k = 0; k < K; ++k) {
    const T* pm = pk + k * ms;
    A a;
#pragma unroll
    for (int i = 0; i < ROWS * NP; ++i) a.v[i] = 0.f;
    if constexpr (RES > 0) {
#pragma unroll
      for (int c = 0; c < RES; ++c) {
        const index_t v = threadIdx.x + c * block;
        if (v >= nvec) break;
        float x[ROWS][V];
#pragma unroll
        for (int rr = 0; rr < ROWS; ++rr) widen<T, V>(held[c][rr], x[rr]);
        accumulate_dots<V, R, ROWS, NP, LO, GATED, true, false>(pm, dp, v * V, x, x, a.v);
      }
    } else {
      for (index_t v = threadIdx.x; v < nvec; v += block) {
        float x[ROWS][V];
#pragma unroll
        for (int rr = 0; rr < ROWS; ++rr) {
          const vec<T, V> raw = load_raw<T, V>(xr[rr] + v * V);
          widen<T, V>(raw, x[rr]);
          if (!ASYNC && k == 0 && stage) *reinterpret_cast<vec<T, V>*>(tile + rr * d + v * V) = raw;
        }
        accumulate_dots<V, R, ROWS, NP, LO, GATED, true, false>(pm, dp, v * V, x, x, a.v);
      }
    }
    a = BR(tmp).Reduce(a, farr_sum{});
    if (threadIdx.x == 0) {
      const T* sc = pm + packed_tail(R, dp);  // b [R], c
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr) {
        if (rr >= nr) break;
        float e[R];
        const float z = forward_values<R, LO, GM>(a.v + rr * NP, sc, sc + R, e);
        const float g = GATED ? dsigmoid(z) : GM == gate_external ? dsigmoid(gext[k * P + q0 + rr]) : 1.f;
        dstore(&gates(k, q0 + rr), g);
#pragma unroll
        for (int i = 0; i < R; ++i) coef[(k * ROWS + rr) * R + i] = scale * g * e[i];
        if (kept) keep_values<R>(kept, k, P, q0 + rr, e, z);
      }
    }
    __syncthreads();  // coef visible; tmp free for the next module
  }

  if constexpr (RES > 0) {
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr) dst[rr] = out.row(row_at(pos, q0 + (rr < nr ? rr : 0)));
#pragma unroll
    for (int c = 0; c < RES; ++c) {
      const index_t v = threadIdx.x + c * block;
      if (v >= nvec) break;
      float o[ROWS][V];
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr) widen<T, V>(held[c][rr], o[rr]);
      apply_modules<V, R, ROWS>(pk, ms, dp, K, v * V, coef, o);
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr)
        if (rr < nr) store_row<T, V>(dst[rr] + v * V, o[rr]);
    }
  } else {
    const T* src[ROWS];
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr) src[rr] = stage ? tile + rr * d : hr[rr];
    for (index_t v = threadIdx.x; v < nvec; v += block) {
      float o[ROWS][V];
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr) load_row<T, V>(src[rr] + v * V, o[rr]);
      apply_modules<V, R, ROWS>(pk, ms, dp, K, v * V, coef, o);
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr)
        if (rr < nr) store_row<T, V>(dst[rr] + v * V, o[rr]);
    }
  }
}

// ---- forward on tensor cores (16-bit storage) -----------------------------------------------------
// The forward's dots are a skinny GEMM: for a tile of 8 rows, C [2r+1, 8] = P [2r+1, d] · Hᵀ [d, 8]
// (P the parameter rows U, D, w). On CUDA cores they cost 2r+1 FMAs per element of h — at d = 4096
// bf16 loreft<4> more instruction issue than the memory time allows (the stream schedule: 35% of copy
// bandwidth, every unit under 60% busy). mma.sync m16n8k16 (fp32 accumulate; the products of two
// 16-bit values are exact in fp32) does them in 2 instructions per warp and 32 columns of 8 rows.
//
// The sum over k is order-free, so a thread's fragments come from plain 16-byte loads: lane (g, t)
// (g = lane / 4, t = lane % 4) loads 8 consecutive elements of h row g at vector v, and of parameter
// rows g and g + 8 at the same vector; words 2s and 2s + 1 of those vectors are its k = 2t..2t+1 and
// 2t+8..2t+9 registers of mma step s (s = 0, 1). Every lane maps a logical k to the same physical
// column, which is all the product needs.
//
// Parameters travel by value in the launch (up to tensor_max_modules modules): no host → device
// copy before the forward, and no packing kernel unless a stack's rows are not 16-byte aligned.

/// Threads per CTA of the tensor schedule: 8 warps share a tile's columns.
inline constexpr int tensor_block = 256;
/// Rows per tile: the mma's n.
inline constexpr int tensor_rows = 8;
/// Most vectors of 8 elements per thread (held in registers): d ≤ 16 · 4 · 8 warps · 8 = 4096.
inline constexpr int tensor_max_held = 16;

/// c += a · b: one mma.sync.m16n8k16, row-major a (16 × 16), column-major b (16 × 8), fp32 c.
template <class T>
__device__ __forceinline__ void mma_16816(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                          unsigned b0, unsigned b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, bfloat16>)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#elif defined(GRUN_CUDA_EMULATION)
  ::grun_emu::mma_16816<device_type_t<T>>(c, a0, a1, a2, a3, b0, b1);  // tests/emulation: the warp collective
#else
  __trap();  // the host never launches it; sm < 80 never dispatches here (launch_forward_tensor checks)
#endif
}

// Asynchronous copies (cp.async, sm_80+): 16 bytes from global to shared memory without passing
// through registers (.cg: cached in L2, not L1), in groups a thread commits and later waits for.
/// Starts one 16-byte copy (both addresses 16-byte aligned); it lands when a cp_async_wait covers
/// the group it is committed with.
__device__ __forceinline__ void cp_async_16(void* shared_dst, const void* global_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned to = static_cast<unsigned>(__cvta_generic_to_shared(shared_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(to), "l"(global_src) : "memory");
#elif defined(GRUN_CUDA_EMULATION)
  ::grun_emu::cp_async_16(shared_dst, global_src);  // tests/emulation: lands at the wait, poison until then
#else
  __trap();  // never launched below sm_80 (the launches check limits_of_device().mma)
#endif
}
/// Closes the thread's current group of copies (an empty group is a group).
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#elif defined(GRUN_CUDA_EMULATION)
  ::grun_emu::cp_async_commit();
#endif
}
/// Waits until at most N of the thread's committed groups are still in flight. Other threads' copies
/// need a barrier after it.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#elif defined(GRUN_CUDA_EMULATION)
  ::grun_emu::cp_async_wait(N);
#endif
}

/// The two 16-bit elements of a 32-bit word (lower address in the low half) → float.
template <class T>
__device__ __forceinline__ void unpack_pair(unsigned w, float& lo, float& hi) {
  if constexpr (std::is_same_v<T, bfloat16>) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
  } else {
    const __half2 p = *reinterpret_cast<const __half2*>(&w);
    const float2 f = __half22float2(p);
    lo = f.x;
    hi = f.y;
  }
}

/// Word j (0–3) of a 16-byte vector: elements 2j (low half) and 2j + 1 (high) of 16-bit storage.
__device__ __forceinline__ unsigned word_of(const uint4& v, int j) { return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w; }

/// c += A · B over one 16-byte vector per lane (two m16n8k16 steps): lane (g, t) gives rows g, g + 8
/// of A as the vectors a_g, a_g8 and column g of B as b, 8 consecutive k each — the dots' fragments
/// of the forward and the coefficient kernel (the sum over k does not care which physical column a
/// logical k is, so long as every operand maps it the same way).
template <class T>
__device__ __forceinline__ void mma_vector(float (&c)[4], const uint4& a_g, const uint4& a_g8, const uint4& b) {
  mma_16816<T>(c, a_g.x, a_g8.x, a_g.y, a_g8.y, b.x, b.y);
  mma_16816<T>(c, a_g.z, a_g8.z, a_g.w, a_g8.w, b.z, b.w);
}

/// Lane (g, t)'s C fragment of m-tile mt (rows 16mt + g, + 8; columns 2t, 2t + 1) into part[row][column].
template <int COLS>
__device__ __forceinline__ void store_fragment(const float (&c)[4], float (*part)[COLS], int mt, int g, int t) {
  part[16 * mt + g][2 * t] = c[0];
  part[16 * mt + g][2 * t + 1] = c[1];
  part[16 * mt + g + 8][2 * t] = c[2];
  part[16 * mt + g + 8][2 * t + 1] = c[3];
}

// Coefficients as mma operands (bf16): each split into hi + lo, multiplied twice.
/// The bits of bf16(x), rounded to nearest even.
__device__ __forceinline__ unsigned bf16_bits(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
/// Two coefficients (a at the lower k) as bf16 pairs: hi = bf16(a), bf16(b); lo = their remainders.
__device__ __forceinline__ void split_pair(float a, float b, unsigned& hi, unsigned& lo) {
  const unsigned ah = bf16_bits(a), bh = bf16_bits(b);
  hi = ah | bh << 16;
  lo = bf16_bits(a - __uint_as_float(ah << 16)) | bf16_bits(b - __uint_as_float(bh << 16)) << 16;
}

/// An A fragment of m16n8k16 (row-major 16 × 16) from a(row, k) → float, as hi and lo words:
/// lane (g, t) holds rows g, g + 8 at k = 2t, 2t + 1 and 2t + 8, 2t + 9.
template <class Entry>
__device__ __forceinline__ void a_fragment(int g, int t, Entry a, unsigned (&hi)[4], unsigned (&lo)[4]) {
  split_pair(a(g, 2 * t), a(g, 2 * t + 1), hi[0], lo[0]);
  split_pair(a(g + 8, 2 * t), a(g + 8, 2 * t + 1), hi[1], lo[1]);
  split_pair(a(g, 2 * t + 8), a(g, 2 * t + 9), hi[2], lo[2]);
  split_pair(a(g + 8, 2 * t + 8), a(g + 8, 2 * t + 9), hi[3], lo[3]);
}

/// c += (hi + lo) · b.
__device__ __forceinline__ void mma_split(float (&c)[4], const unsigned (&hi)[4], const unsigned (&lo)[4], unsigned b0,
                                          unsigned b1) {
  mma_16816<bfloat16>(c, hi[0], hi[1], hi[2], hi[3], b0, b1);
  mma_16816<bfloat16>(c, lo[0], lo[1], lo[2], lo[3], b0, b1);
}

/// The row stride of every row staged in shared memory for the tensor-core kernels (parameter rows,
/// and the pipelined forward's tile rows): a multiple of 64 elements plus 32, i.e. ≡ 64 bytes mod
/// 128. Their lanes 4g + t read 16-byte vector t + 4·warp (+ a chunk's offset) of row g, so a
/// quarter-warp (the unit of a 16-byte shared load) reads 64 contiguous bytes of each of two rows;
/// 64 bytes apart mod 128, those fill the 32 banks once. (A stride of d + 8 puts the two rows 16
/// bytes apart mod 128: their vectors overlap in 3 of 4 bank groups, a 2-way conflict; d, in all 4.)
GRUN_HD constexpr index_t staged_row_stride(index_t d) { return (d + 63) / 64 * 64 + 32; }

/// The CTA copies module m's 2R+1 parameter rows [U; D; w] (zeros for a null w: no gate) into shared
/// memory, rows lds elements apart, and waits for all of it. d % 8 == 0.
template <class T, int R>
__device__ __forceinline__ void stage_parameter_rows(const src_ptrs<T>& m, index_t d, T* staged, index_t lds) {
  const int nvec = int(d / 8);
#pragma unroll 1
  for (int r = 0; r < 2 * R + 1; ++r) {
    const T* src = param_row(m, r, R, d);
    T* to = staged + r * lds;
    if (src == nullptr) {  // the gate row without a gate: zeros
      for (int v = int(threadIdx.x); v < nvec; v += int(blockDim.x)) reinterpret_cast<uint4*>(to)[v] = make_uint4(0, 0, 0, 0);
    } else if ((reinterpret_cast<std::uintptr_t>(src) & 15u) == 0) {
      for (int v = int(threadIdx.x); v < nvec; v += int(blockDim.x))
        reinterpret_cast<uint4*>(to)[v] = __ldg(reinterpret_cast<const uint4*>(src) + v);
    } else {  // a tensor that starts mid-vector (e.g. after a bias of r elements in one flat buffer)
      for (index_t j = threadIdx.x; j < d; j += blockDim.x) to[j] = src[j];
    }
  }
  __syncthreads();
}

/// The write of h' = h + coef·U for one module (bf16, staged), on tensor cores: per chunk of the
/// warp's 32 columns and per block j of 8 of them, one m16n8k16 product (twice: coef as hi + lo)
///   D [positions, 8 columns] = coef [positions, k = U row] · U [k, 8 columns] + h
/// with positions g on the rows (rows 8–15 and k ≥ r zero; r ≤ 8: one k-half). The columns are mapped as in
/// slot_tensor_kernel: logical column n of block j is physical column 8·⌊n/2⌋ + 2j + n mod 2 of the
/// chunk, so a lane's C/D fragment (position g, logical columns 2t, 2t + 1) is word j of its own held
/// vector: h goes in as C, h' comes out as D. B (k = U row, n = logical column g) takes lane (g, t)
/// U rows 2t, 2t + 1 at element 2j + g mod 2 of vector ⌊g/2⌋ of the chunk: two 16-byte
/// shared-memory loads per chunk, then half-word selects. Against the CUDA-core
/// write (per element: h and r parameters widened, r FMAs, per 8: r shared loads) about a third of
/// the instructions (an estimate: not yet timed on a GPU). coef: [ROWS][R] of this module.
template <int R, int HELD>
__device__ __forceinline__ void apply_on_tensor_cores(const float (&coef)[tensor_rows][R], const bfloat16* staged,
                                                      index_t lds, int nvec, int warp, int g, int t,
                                                      const uint4 (&held)[HELD], bool live, uint4* dst) {
  constexpr int STEP = 4 * (tensor_block / 32);
  unsigned hi[4], lo[4];
  a_fragment(g, t, [&](int q, int k) { return q < tensor_rows && k < R ? coef[q][k] : 0.f; }, hi, lo);
  const int keep_high = g % 2;  // B column g reads the odd (high) or even (low) half-words
  auto b_word = [&](unsigned row_a, unsigned row_b) {  // (U[2t][e], U[2t+1][e]) of one word's pair
    return keep_high ? (row_a >> 16) | (row_b & 0xffff0000u) : (row_a & 0xffffu) | (row_b << 16);
  };
  auto u_vector = [&](int u_row, int vector) -> uint4 {
    return u_row < R && vector < nvec ? *(reinterpret_cast<const uint4*>(staged + u_row * lds) + vector) : make_uint4(0, 0, 0, 0);
  };
#pragma unroll
  for (int c = 0; c < HELD; ++c) {
    const int first = 4 * warp + STEP * c;  // the chunk's first vector (the same for the warp's lanes)
    if (first >= nvec) break;
    const int uv = first + g / 2;  // B column g lies in the chunk's vector g / 2
    const uint4 u0 = u_vector(2 * t, uv), u1 = u_vector(2 * t + 1, uv);
    unsigned o[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float acc[4];
      unpack_pair<bfloat16>(word_of(held[c], j), acc[0], acc[1]);
      acc[2] = acc[3] = 0.f;  // rows 8–15: no positions
      mma_split(acc, hi, lo, b_word(word_of(u0, j), word_of(u1, j)), 0u);  // k ≥ 8: no U rows (r ≤ 8)
      o[j] = bf16_bits(acc[0]) | bf16_bits(acc[1]) << 16;
    }
    if (live && first + t < nvec) __stcs(dst + STEP * c, make_uint4(o[0], o[1], o[2], o[3]));
  }
}

/// forward_tensor_kernel's static shared memory for rank R (part, dots, coef; the kernel asserts it):
/// the staged launch opts in to the device's per-CTA limit less this, and the two must not exceed it.
template <int R>
constexpr std::size_t forward_tensor_static_bytes() {
  constexpr std::size_t MT = (2 * R + 1 + 15) / 16, WARPS = tensor_block / 32;
  return sizeof(float) * (WARPS * MT * 16 * tensor_rows + MT * 16 * tensor_rows + tensor_max_modules * tensor_rows * R);
}

/// h' = h + Σ_k Σ_i coef(k, i) · U_k,i over one 16-byte vector (8 elements of 16-bit storage), on
/// CUDA cores, in fp32 (r FMAs per element and module, k then i in order: the tensor schedules' bits);
/// u(k, i) gives U_k row i's vector at the same columns.
template <class T, int R, class Coef, class URow>
__device__ __forceinline__ uint4 add_modules(const uint4& hx, index_t K, Coef coef, URow u) {
  float o[8];
  unpack_pair<T>(hx.x, o[0], o[1]);
  unpack_pair<T>(hx.y, o[2], o[3]);
  unpack_pair<T>(hx.z, o[4], o[5]);
  unpack_pair<T>(hx.w, o[6], o[7]);
  for (index_t k = 0; k < K; ++k) {
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const uint4 uv = u(k, i);
      const float cf = coef(k, i);
      float p[8];
      unpack_pair<T>(uv.x, p[0], p[1]);
      unpack_pair<T>(uv.y, p[2], p[3]);
      unpack_pair<T>(uv.z, p[4], p[5]);
      unpack_pair<T>(uv.w, p[6], p[7]);
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] = fmaf(cf, p[e], o[e]);
    }
  }
  vec<T, 8> r;
#pragma unroll
  for (int e = 0; e < 8; ++e) dstore(&r.v[e], o[e]);
  return *reinterpret_cast<const uint4*>(&r);
}

/// Threads per CTA of the pipelined tensor schedule: the tensor schedule's 8 warps do the dots (the
/// same fragments, so the same bits), all 16 write h'.
inline constexpr int pipelined_block = 2 * tensor_block;

/// One tile of 8 positions per CTA and iteration; warp w, lane (g, t) holds row g's vectors
/// v = t + 4·(w + 8c), c < HELD (loaded once, streamed past L1, used for the dots of every module and
/// the write of h'). Per module: mma over the held vectors → per-warp partial C [16·MT, 8] → summed
/// over warps in a fixed order (bitwise-repeatable) → g and coef = s·g·e per row → after the last
/// module, h' = h + Σ_k Σ_i coef_k,i U_k,i on CUDA cores (r FMAs per element).
///
/// STAGED (one module): the CTA copies the module's 2r+1 parameter rows into shared memory once
/// and then walks tiles blockIdx.x, + gridDim.x, … (a grid of about 2 CTAs per SM): the dots and the
/// write read parameters from shared memory instead of L1/L2, which per tile of 8 rows (64 KiB of h
/// at d = 4096 bf16) would otherwise stream 72 KiB of parameters through L2 and stall on them.
/// Otherwise one tile per CTA, parameters read through the read-only cache.
/// APPLY (STAGED, bf16, r ≤ 8; forward_schedule::tensor_apply): the write of h' on tensor cores too
/// (apply_on_tensor_cores above). kept (or null): [K][P][R + 1], each position's e and z for a
/// backward that reads them instead of h (saved_activations).
///
/// PIPELINED (STAGED, not APPLY; forward_schedule::tensor_pipelined): one CTA of 512 threads per SM
/// with two tile buffers in shared memory after the parameters. Held in registers, a tile leaves its
/// CTA nothing to load while it is reduced and written, and two CTAs per SM do not cover each other
/// (ncu, run 5: 9 cycles per issued instruction, 45% of DRAM peak). Here tile i + gridDim.x lands in
/// the other buffer by cp.async while tile i is reduced and written: 64 KiB in flight per SM at
/// d = 4096 all the time. Warps 0–7 copy their vectors of the tile from shared memory into the same
/// registers the tensor schedule loads from global memory, so the dots, g, coef and the kept values
/// are its bits; all 16 warps then write h' with thread → (vector, rows) and the same FMA order:
/// h' is the tensor schedule's, bit for bit (the tests check it). Rows staged_row_stride(d) apart.
template <class T, int R, bool LO, int GM, int HELD, bool STAGED, bool APPLY, bool PIPELINED = false>
__global__ void __launch_bounds__(PIPELINED ? pipelined_block : tensor_block, PIPELINED ? 1 : 2)
    forward_tensor_kernel(module_ptrs<T> mods, index_t K, float scale, matrix_view<const T, cuda_space> h,
                          const index_t* __restrict__ pos, index_t P, matrix_view<T, cuda_space> out,
                          matrix_view<T, cuda_space> gates, const float* __restrict__ gext,
                          float* __restrict__ kept) {
  constexpr int NP = 2 * R + 1, MT = (NP + 15) / 16, WARPS = tensor_block / 32, ROWS = tensor_rows;
  constexpr int THREADS = PIPELINED ? pipelined_block : tensor_block;
  constexpr bool GATED = GM == gate_linear;
  static_assert(!APPLY || (STAGED && std::is_same_v<T, bfloat16> && R <= 8), "apply_on_tensor_cores' conditions");
  static_assert(!PIPELINED || (STAGED && !APPLY), "the pipelined schedule stages one module and writes on CUDA cores");
  __shared__ float part[WARPS][MT * 16][ROWS];
  __shared__ float dots[MT * 16][ROWS];
  __shared__ float coef[tensor_max_modules][ROWS][R];
  static_assert(sizeof(part) + sizeof(dots) + sizeof(coef) == forward_tensor_static_bytes<R>());
  extern __shared__ __align__(16) unsigned char smem[];
  T* staged = reinterpret_cast<T*>(smem);  // STAGED: [NP][lds] — U rows, D rows, w (zeros without a gate)

  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, g = lane / 4, t = lane % 4;
  const index_t d = h.extent(1);
  const int nvec = int(d / 8);  // ≤ 512 (launch_forward_tensor checks)
  const index_t lds = staged_row_stride(d);
  T* const buffers = staged + NP * lds;  // PIPELINED: two tiles [2][ROWS][lds] after the parameters
  // The thread's vectors of its row: v = v0 + STEP·c. Chunk c starts at column 8·(4·warp + STEP·c),
  // the same for the warp's lanes: the mma runs on every lane of a chunk with any column left, and
  // lanes past the row's end hold zeros (h and parameters both: no 0 · garbage). 32-bit vector
  // indices and one base pointer per row, so the HELD loads are one register and immediate offsets.
  // Warps past the first 8 (PIPELINED) take no part in the dots.
  constexpr int STEP = 4 * WARPS;
  const int v0 = t + 4 * warp;
  const bool dot_warp = !PIPELINED || warp < WARPS;
  auto chunk_live = [&](int c) { return dot_warp && 4 * warp + STEP * c < nvec; };

  if constexpr (STAGED) stage_parameter_rows<T, R>(mods.m[0], d, staged, lds);
  // Row `row` of module m's parameter matrix [2R+1, d] as the dots use it (null: a row of zeros —
  // direft's e needs no U·h, gate::always no w), as 16-byte vectors from v0 on.
  auto dot_row = [&](const src_ptrs<T>& m, int r) -> const uint4* {
    if ((r < R && !LO) || r >= NP || (r == 2 * R && !GATED)) return nullptr;
    const T* base = STAGED ? staged + r * lds : param_row(m, r, R, d);
    return reinterpret_cast<const uint4*>(base) + v0;
  };

  const index_t tiles = (P + ROWS - 1) / ROWS;
  // PIPELINED: tile → buffer b by cp.async, each thread a strided share of its vectors, one group
  // per tile. Rows past the last position repeat the first (loaded, never stored), as below.
  auto fetch = [&](index_t tile, int b) {
    const index_t q0 = tile * ROWS;
    const int nr = int(P - q0 < ROWS ? P - q0 : ROWS);
    T* to = buffers + b * ROWS * lds;
#pragma unroll 1
    for (int rr = 0; rr < ROWS; ++rr) {
      const T* from = h.row(row_at(pos, q0 + (rr < nr ? rr : 0)));
      for (int v = int(threadIdx.x); v < nvec; v += THREADS) cp_async_16(to + rr * lds + 8 * v, from + 8 * v);
    }
    cp_async_commit();
  };
  // PIPELINED's write of h': thread → vector wv of the tile's rows first, first + groups, … (groups:
  // how many rows the CTA's threads cover at once; nvec ≤ 512).
  const int groups = PIPELINED && nvec > 0 ? (THREADS / nvec < ROWS ? THREADS / nvec : ROWS) : 1;
  const int wv = PIPELINED && nvec > 0 ? int(threadIdx.x) % nvec : 0, first = PIPELINED && nvec > 0 ? int(threadIdx.x) / nvec : 0;
  if constexpr (PIPELINED)
    if (index_t(blockIdx.x) < tiles) fetch(blockIdx.x, 0);

  int buffer = 0;  // PIPELINED: where this iteration's tile lands
  for (index_t tile = blockIdx.x; tile < tiles; tile += STAGED ? index_t(gridDim.x) : tiles, buffer ^= 1) {
    const index_t q0 = tile * ROWS;
    const int nr = int(P - q0 < ROWS ? P - q0 : ROWS);
    const bool live = g < nr;  // rows past the last position repeat the first: loaded, never stored
    const index_t row = row_at(pos, q0 + (live ? g : 0));
    const T* current = buffers + buffer * ROWS * lds;

    uint4 held[HELD];
    if constexpr (PIPELINED) {
      // The next tile starts for the other buffer (which the barrier ending the previous iteration
      // freed); then this tile's copies are waited for: the thread's own, then everyone's. An empty
      // group where there is no next tile keeps "all but the newest group" meaning this tile.
      const index_t next = tile + index_t(gridDim.x);
      if (next < tiles) fetch(next, buffer ^ 1);
      else cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();
      const uint4* hv = reinterpret_cast<const uint4*>(current + g * lds) + v0;
#pragma unroll
      for (int c = 0; c < HELD; ++c) held[c] = dot_warp && v0 + STEP * c < nvec ? hv[STEP * c] : make_uint4(0, 0, 0, 0);
    } else {
      const uint4* hv = reinterpret_cast<const uint4*>(h.row(row)) + v0;
#pragma unroll
      for (int c = 0; c < HELD; ++c) held[c] = v0 + STEP * c < nvec ? __ldcs(hv + STEP * c) : make_uint4(0, 0, 0, 0);
    }

    for (index_t k = 0; k < K; ++k) {
      const src_ptrs<T> m = mods.m[k];
      const uint4* ra[MT];
      const uint4* rb[MT];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        ra[mt] = dot_row(m, 16 * mt + g);
        rb[mt] = dot_row(m, 16 * mt + g + 8);
      }
      float acc[MT][4] = {};
#pragma unroll
      for (int c = 0; c < HELD; ++c) {
        if (!chunk_live(c)) break;
        const bool in = v0 + STEP * c < nvec;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const uint4 zero = make_uint4(0, 0, 0, 0);
          const uint4 pa = in && ra[mt] ? (STAGED ? ra[mt][STEP * c] : __ldg(ra[mt] + STEP * c)) : zero;
          const uint4 pb = in && rb[mt] ? (STAGED ? rb[mt][STEP * c] : __ldg(rb[mt] + STEP * c)) : zero;
          mma_vector<T>(acc[mt], pa, pb, held[c]);
        }
      }
      if (dot_warp) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) store_fragment(acc[mt], part[warp], mt, g, t);
      }
      __syncthreads();  // (also: every thread is past the previous tile's reads of coef)
      for (int i = int(threadIdx.x); i < NP * ROWS; i += THREADS) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) s += part[w][i / ROWS][i % ROWS];
        dots[i / ROWS][i % ROWS] = s;
      }
      __syncthreads();  // dots complete; part free for the next module
      if (threadIdx.x < ROWS) {
        const int n = int(threadIdx.x);
        float ar[NP], e[R];
#pragma unroll
        for (int i = 0; i < NP; ++i) ar[i] = dots[i][n];  // (rows a policy does not use: zero)
        const float z = forward_values<R, LO, GM>(ar, m.b, m.c, e);
        float gv = 1.f;
        if (n < nr) {
          if constexpr (GATED) gv = dsigmoid(z);
          else if constexpr (GM == gate_external) gv = dsigmoid(gext[k * P + q0 + n]);
          dstore(&gates(k, q0 + n), gv);
          if (kept) keep_values<R>(kept, k, P, q0 + n, e, z);
        }
#pragma unroll
        for (int i = 0; i < R; ++i) coef[k][n][i] = scale * gv * e[i];
      }
    }
    __syncthreads();  // every module's coef visible

    auto u_staged = [&](int v) {  // U row i's vector v, staged
      return [=](index_t, int i) { return *(reinterpret_cast<const uint4*>(staged + i * lds) + v); };
    };
    if constexpr (PIPELINED) {
      if (first < groups) {
        const auto u = u_staged(wv);
#pragma unroll 1
        for (int rr = first; rr < nr; rr += groups) {
          const uint4 hx = *(reinterpret_cast<const uint4*>(current + rr * lds) + wv);
          const uint4 o = add_modules<T, R>(hx, 1, [&](index_t, int i) { return coef[0][rr][i]; }, u);
          __stcs(reinterpret_cast<uint4*>(out.row(row_at(pos, q0 + rr))) + wv, o);
        }
      }
      __syncthreads();  // every read of this buffer done before the next iteration refills it
    } else if constexpr (APPLY) {
      uint4* dst = reinterpret_cast<uint4*>(out.row(row)) + v0;
      apply_on_tensor_cores<R, HELD>(coef[0], staged, lds, nvec, warp, g, t, held, live, dst);
    } else {
      uint4* dst = reinterpret_cast<uint4*>(out.row(row)) + v0;
#pragma unroll
      for (int c = 0; c < HELD; ++c) {
        if (!chunk_live(c)) break;
        const int v = v0 + STEP * c;
        if (v >= nvec) continue;
        auto cf = [&](index_t k, int i) { return coef[k][g][i]; };
        uint4 o;
        if constexpr (STAGED) {
          o = add_modules<T, R>(held[c], K, cf, u_staged(v));
        } else {
          // (v0 + STEP·c rather than v: so written, ptxas 13.0 keeps this variant's spill at 4 bytes, not 16)
          o = add_modules<T, R>(held[c], K, cf, [&](index_t k, int i) {
            return __ldg(reinterpret_cast<const uint4*>(mods.m[k].U) + v0 + STEP * c + i * nvec);
          });
        }
        if (live) __stcs(dst + STEP * c, o);
      }
    }
  }
}

// ---- backward -----------------------------------------------------------------------------------
/// How the coefficient kernel reads h and dout (a tuning knob like forward_schedule: same bits, tested
/// and timed; not an interface):
///   stream    one vector of each row of h and of dout in flight per thread at a time (measured on an
///             H200: 121 µs at d = 4096, T = 16384 bf16, 47% of DRAM bandwidth);
///   resident  every vector the thread owns of both (d ≤ max_resident·block·V) loaded up front,
///             2·ROWS·⌈d/(V·block)⌉ loads in flight per thread (16 at d = 4096 bf16), then the dots.
///   tensor    coef_tensor_kernel: the dots on tensor cores as in the forward's tensor schedule, the
///             module's parameter rows staged in shared memory by persistent CTAs, h and dout streamed
///             with the next batch of loads in flight. 16-bit storage, one module, 16-byte vector rows,
///             sm_80+, the rows fitting in shared memory twice per SM; other calls run `stream`. Other
///             bits than stream and resident (summation order), held to the host like them. Not yet
///             timed on a GPU.
enum class coef_schedule { stream, resident, tensor };
inline coef_schedule coef_plan = coef_schedule::stream;

/// How the backward's second kernel forms dh and the slots' gradient rows (a tuning knob like
/// forward_schedule; not an interface):
///   cuda_cores  slot_kernel (measured on an H200: 274 µs at d = 4096, T = 16384 bf16, 36% of DRAM
///               bandwidth, latency-bound at 164 registers);
///   tensor      slot_tensor_kernel: both products on tensor cores, 16 positions per step, larger
///               slots (fewer partial sums to write and add). bf16 storage, one module (the one
///               trained), rows in 16-byte vectors, sm_80+; other calls run cuda_cores. Other bits than
///               cuda_cores (summation order), held to the host like every path. Not yet timed on a GPU.
enum class slot_schedule { cuda_cores, tensor };
inline slot_schedule slot_plan = slot_schedule::cuda_cores;

/// One position q's coefficients for module k (of K) from its forward values e, z (forward_values,
/// or what the forward kept), its dout dots ux = {U·x [R]} and dL/dg from outside (dg_acc:
/// dgates(k, q), or 0):
///   de_i = s g U_i·x,   dL/dg = dg + s Σ_i e_i U_i·x,   dz = dL/dg σ'(z)
/// → cf[q][k], rc[q] when the module is the trained one, and dz to dzext for an external gate.
template <int R, bool LO, int GM, class Acc>
__device__ __forceinline__ void write_coefficients(const Acc (&e_acc)[R], float z, const Acc* ux, float scale,
                                                   Acc dg_acc, index_t k, index_t K, index_t q, index_t P, bool trained,
                                                   const float* __restrict__ gext, float* __restrict__ dzext,
                                                   float* __restrict__ cf, float* __restrict__ rc) {
  constexpr int NP = 2 * R + 1;
  constexpr bool GATED = GM == gate_linear;
  const float zx = GM == gate_external ? gext[k * P + q] : 0.f;  // the external gate's logit
  const float g = GATED ? dsigmoid(z) : GM == gate_external ? dsigmoid(zx) : 1.f;
  float e[R];
#pragma unroll
  for (int i = 0; i < R; ++i) {
    dg_acc += scale * e_acc[i] * ux[i];
    e[i] = float(e_acc[i]);
  }
  const float dg = float(dg_acc);
  // dL/dz of the gate's last pre-activation (g = σ(z) for linear and mlp alike): σ'(z) = σ(z) σ(−z).
  // With z at hand (linear) 1 − g is σ(−z) itself — for a nearly open gate (z ≈ 12) 1 − g in
  // fp32 keeps ~2 digits, and one such row put a bias gradient 3e-5 off the double reference.
  const float dz = GATED ? dg * g * dsigmoid(-z) : GM == gate_external ? dg * g * dsigmoid(-zx) : 0.f;
  if (GM == gate_external) dzext[k * P + q] = dz;
  float* c = cf + (q * K + k) * NP;
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const float de = scale * g * float(ux[i]);
    c[i] = LO ? -de : 0.f;
    c[R + i] = de;
  }
  c[2 * R] = GATED ? dz : 0.f;
  if (trained) {
    float* t = rc + q * NP;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      t[i] = scale * g * e[i];
      t[R + i] = scale * g * float(ux[i]);
    }
    t[2 * R] = GATED ? dz : 0.f;
  }
}

/// write_coefficients for position q of module k from the dots ar = {U·h | D·h | w·h | U·x} — or,
/// KEPT, from the forward's e, z in kept [K][P][R + 1] and the dout dots at ar + 2R + 1 alone.
template <int R, bool LO, int GM, bool KEPT, class T, class Acc>
__device__ __forceinline__ void coefficients_of(const Acc* ar, const T* sc, const float* __restrict__ kept, float scale,
                                                Acc dg_acc, index_t k, index_t K, index_t q, index_t P, bool trained,
                                                const float* __restrict__ gext, float* __restrict__ dzext,
                                                float* __restrict__ cf, float* __restrict__ rc) {
  Acc e[R];
  float z;
  if constexpr (KEPT) {
    const float* kr = kept + (k * P + q) * kept_width<R>;
#pragma unroll
    for (int i = 0; i < R; ++i) e[i] = Acc(kr[i]);
    z = kr[R];
  } else {
    z = forward_values<R, LO, GM>(ar, sc, sc + R, e);
  }
  write_coefficients<R, LO, GM>(e, z, ar + 2 * R + 1, scale, dg_acc, k, K, q, P, trained, gext, dzext, cf, rc);
}

/// Per tile of ROWS positions and every module k: the dots U·h, D·h, w·h, U·x (x = dout row), then
///   cf[q][k] = { −[lo] de (coefficient of U in dh) | de (of D) | dz (of w) }            [2r+1]
///   rc[q]    = { s g e (of x in dU) | de (of h in dD, −[lo]·it in dU) | dz (of h in dw) } [2r+1], trained k
/// RES > 0: the resident schedule with RES vectors per thread and row (launch bounds as the forward's).
/// KEPT: the forward kept e and z per position (kept [K][P][R + 1]): only U·x is summed, h is not read.
///
/// fp32 storage accumulates these dots in fp64. dL/dg = s Σ_i e_i ux_i cancels (e_i = D_i·h + b_i −
/// U_i·h is itself a difference of dots), so every fp32 rounding along a dot over d is magnified in
/// dz and in the gate's gradients: at d = 4096 with fp32 chains they came out 5e-5 from the exact
/// (fp64) result, against the 1e-5 fp32 storage is held to. A product of two floats is exact in
/// double, so fp64 chains leave only the final roundings. Costs 3r+1 DFMA per element and module —
/// at the FP64 rate of an H100/H200 (half the FP32 rate) well under the memory time; 16-bit storage
/// (held to 2e-2, and the fast path) keeps fp32.
template <class T, int V, int R, int ROWS, bool LO, int GM, int RES, bool KEPT, class DG>
__global__ void __launch_bounds__(block, RES > 2 ? 3 : 0) coef_kernel(const T* __restrict__ pk, index_t ms, index_t dp, index_t K,
                                                     index_t trained, float scale, matrix_view<const T, cuda_space> h,
                                                     matrix_view<const T, cuda_space> dout,
                                                     matrix_view<const DG, cuda_space> dgates,
                                                     const index_t* __restrict__ pos, index_t P, float* __restrict__ cf,
                                                     float* __restrict__ rc, const float* __restrict__ gext,
                                                     float* __restrict__ dzext, const float* __restrict__ kept) {
  constexpr int ND = 3 * R + 1;
  constexpr bool GATED = GM == gate_linear;
  using Acc = std::conditional_t<std::is_same_v<T, float>, double, float>;
  using A = farr<ROWS * ND, Acc>;
  // What the block reduces: every dot, or with KEPT the U·x dots alone (ROWS·R of the ROWS·(3R+1):
  // the rest are never summed). A reduction sums each member on its own in a fixed tree, so the
  // members' bits do not depend on which others travel with them.
  using Reduced = farr<ROWS * (KEPT ? R : ND), Acc>;
  using BR = cub::BlockReduce<Reduced, block>;
  __shared__ typename BR::TempStorage tmp;
  const index_t d = h.extent(1), nvec = d / V;
  const index_t q0 = index_t(blockIdx.x) * ROWS;
  const int nr = int(P - q0 < ROWS ? P - q0 : ROWS);
  const bool has_dg = dgates.size() != 0;
  const T* hr[ROWS];
  const T* xr[ROWS];
#pragma unroll
  for (int rr = 0; rr < ROWS; ++rr) {
    const index_t row = row_at(pos, q0 + (rr < nr ? rr : 0));
    hr[rr] = h.row(row);  // (KEPT: never read)
    xr[rr] = dout.row(row);
  }
  // resident: the thread's vectors v = threadIdx.x + c·block (c < RES) of every row of h and dout.
  vec<T, V> held_h[RES > 0 ? RES : 1][ROWS], held_x[RES > 0 ? RES : 1][ROWS];
  if constexpr (RES > 0) {
    if constexpr (!KEPT) load_resident<T, V>(hr, nvec, held_h);
    load_resident<T, V>(xr, nvec, held_x);
  }
  for (index_t k = 0; k < K; ++k) {
    const T* pm = pk + k * ms;
    A a;
#pragma unroll
    for (int i = 0; i < ROWS * ND; ++i) a.v[i] = Acc(0);
    if constexpr (RES > 0) {
#pragma unroll
      for (int c = 0; c < RES; ++c) {
        const index_t v = threadIdx.x + c * block;
        if (v >= nvec) break;
        float x[ROWS][V], y[ROWS][V];
#pragma unroll
        for (int rr = 0; rr < ROWS; ++rr) {
          if constexpr (!KEPT) widen<T, V>(held_h[c][rr], x[rr]);
          widen<T, V>(held_x[c][rr], y[rr]);
        }
        accumulate_dots<V, R, ROWS, ND, LO, GATED, !KEPT, true>(pm, dp, v * V, x, y, a.v);
      }
    } else {
      for (index_t v = threadIdx.x; v < nvec; v += block) {
        float x[ROWS][V], y[ROWS][V];
#pragma unroll
        for (int rr = 0; rr < ROWS; ++rr) {
          if constexpr (!KEPT) load_row<T, V>(hr[rr] + v * V, x[rr]);
          load_row<T, V>(xr[rr] + v * V, y[rr]);
        }
        accumulate_dots<V, R, ROWS, ND, LO, GATED, !KEPT, true>(pm, dp, v * V, x, y, a.v);
      }
    }
    if constexpr (KEPT) {
      Reduced ux;  // U·x of each row: members 2R+1 … 3R of its dots
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr)
#pragma unroll
        for (int i = 0; i < R; ++i) ux.v[rr * R + i] = a.v[rr * ND + 2 * R + 1 + i];
      ux = BR(tmp).Reduce(ux, farr_sum{});
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr)
#pragma unroll
        for (int i = 0; i < R; ++i) a.v[rr * ND + 2 * R + 1 + i] = ux.v[rr * R + i];
    } else {
      a = BR(tmp).Reduce(a, farr_sum{});
    }
    if (threadIdx.x == 0) {
      const T* sc = pm + packed_tail(R, dp);
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr) {
        if (rr >= nr) break;
        const index_t q = q0 + rr;
        coefficients_of<R, LO, GM, KEPT>(a.v + rr * ND, sc, kept, scale, has_dg ? Acc(dload(&dgates(k, q))) : Acc(0), k,
                                         K, q, P, k == trained, gext, dzext, cf, rc);
      }
    }
    __syncthreads();
  }
}

// ---- the coefficient kernel on tensor cores (16-bit storage, one module) ------------------------
// coef_kernel's 3r+1 dots per position are two skinny products like the forward's, for a tile of
// 8 positions: [U·h | D·h | w·h] = Θ·hᵀ and U·x = (Θ's first rows)·xᵀ (x = dout, Θ = [U; D; w]),
// on mma.sync with the forward's fragments (plain 16-byte loads; a lane's k are 8 consecutive
// columns of its row, the same for every operand). Unlike the forward nothing is written back per
// element, so nothing is held: each warp streams its column strip of the tile's h and dout rows, the
// next batch of loads — of this tile, or already of the CTA's next one — in flight while the current
// batch is multiplied. Θ is staged in shared memory once per (persistent) CTA. Per tile the 8 warps'
// partial dots are summed in a fixed order (bitwise-repeatable) and write_coefficients forms cf and
// rc from them as coef_kernel does. run 5 (H200): coef_kernel took 121 µs to read these 256 MiB
// (2.2 TB/s), 47% of DRAM peak, its dots on CUDA cores at 108 registers.

/// Vectors of each row a lane loads per pipeline step (two steps in registers: 64 of them).
inline constexpr int coef_tensor_batch = 4;

/// coef_tensor_kernel's static shared memory for rank R (part, dots; the kernel asserts it).
template <int R>
constexpr std::size_t coef_tensor_static_bytes() {
  constexpr std::size_t MT = (2 * R + 1 + 15) / 16, MU = (R + 15) / 16, WARPS = tensor_block / 32;
  return sizeof(float) * (WARPS * 16 * (MT + MU) * tensor_rows + (3 * R + 1) * tensor_rows);
}

/// Persistent CTAs of tensor_block threads walk tiles blockIdx.x, + gridDim.x, …; pm: the one module,
/// packed (rows dp = d apart: d % 8 == 0 here); dynamic shared memory: staged_bytes<T, R>(d).
/// KEPT: the forward kept e and z (kept [1][P][R + 1]): only dout is read, only U·x multiplied.
template <class T, int R, bool LO, int GM, bool KEPT, class DG>
__global__ void __launch_bounds__(tensor_block, 2)
    coef_tensor_kernel(const T* __restrict__ pm, index_t dp, index_t trained, float scale,
                       matrix_view<const T, cuda_space> h, matrix_view<const T, cuda_space> dout,
                       matrix_view<const DG, cuda_space> dgates, const index_t* __restrict__ pos, index_t P,
                       float* __restrict__ cf, float* __restrict__ rc, const float* __restrict__ gext,
                       float* __restrict__ dzext, const float* __restrict__ kept) {
  constexpr int NP = 2 * R + 1, ND = 3 * R + 1, MT = (NP + 15) / 16, MU = (R + 15) / 16;
  constexpr int WARPS = tensor_block / 32, ROWS = tensor_rows, B = coef_tensor_batch, STEP = 4 * WARPS;
  constexpr bool GATED = GM == gate_linear;
  // part: per warp, the h product's rows [0, 16·MT), then the dout product's [16·MT, 16·(MT + MU)).
  __shared__ float part[WARPS][16 * (MT + MU)][ROWS];
  __shared__ float dots[ND][ROWS];  // per position n: {U·h | D·h | w·h | U·x}, write_coefficients' order
  static_assert(sizeof(part) + sizeof(dots) == coef_tensor_static_bytes<R>());
  extern __shared__ __align__(16) unsigned char smem[];
  T* staged = reinterpret_cast<T*>(smem);  // [NP][staged_row_stride(d)]: U, D rows, w (zeros: no gate)

  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, g = lane / 4, t = lane % 4;
  const index_t d = h.extent(1);
  const int nvec = int(d / 8);
  const index_t tiles = (P + ROWS - 1) / ROWS;
  if (index_t(blockIdx.x) >= tiles) return;  // the whole CTA (the launch makes none such)
  stage_parameter_rows<T, R>(packed_sources<T>(pm, R, dp, GATED), d, staged, staged_row_stride(d));
  // Lane (g, t) of warp w: vectors v0 + STEP·c of row g (c: chunk), as in forward_tensor_kernel.
  const int v0 = t + 4 * warp;
  const int batches = (nvec + STEP * B - 1) / (STEP * B);
  auto chunk_live = [&](int c) { return 4 * warp + STEP * c < nvec; };  // the same for the warp's lanes
  auto in_row = [&](int c) { return v0 + STEP * c < nvec; };
  // The A fragments' parameter rows g and g + 8 of m-tile mt (null past the 2r+1 rows: zeros).
  const uint4* ra[MT];
  const uint4* rb[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int m = 16 * mt + g;
    ra[mt] = m < NP ? reinterpret_cast<const uint4*>(staged + m * staged_row_stride(d)) + v0 : nullptr;
    rb[mt] = m + 8 < NP ? reinterpret_cast<const uint4*>(staged + (m + 8) * staged_row_stride(d)) + v0 : nullptr;
  }
  const T* sc = pm + packed_tail(R, dp);
  const bool has_dg = dgates.size() != 0;

  struct batch {
    uint4 h[B], x[B];
  };
  // Row g of a tile (rows past the last position read the tile's first: loaded, never used).
  auto rows_of = [&](index_t tile, const uint4*& hv, const uint4*& xv) {
    const index_t q0 = tile * ROWS;
    const index_t row = row_at(pos, q0 + (q0 + g < P ? g : 0));
    hv = reinterpret_cast<const uint4*>(h.row(row)) + v0;
    xv = reinterpret_cast<const uint4*>(dout.row(row)) + v0;
  };
  auto load = [&](const uint4* hv, const uint4* xv, int b, batch& to) {
    const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int j = 0; j < B; ++j) {
      const int c = b * B + j;
      if constexpr (!KEPT) to.h[j] = in_row(c) ? __ldcs(hv + STEP * c) : zero;
      to.x[j] = in_row(c) ? __ldcs(xv + STEP * c) : zero;
    }
  };
  float acc_h[MT][4] = {}, acc_x[MU][4] = {};
  auto multiply = [&](int b, const batch& in) {
#pragma unroll
    for (int j = 0; j < B; ++j) {
      const int c = b * B + j;
      if (!chunk_live(c)) break;
      const bool inside = in_row(c);  // past the row's end: parameters zero too (no 0 · garbage)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const uint4 zero = make_uint4(0, 0, 0, 0);
        const uint4 pa = inside && ra[mt] ? ra[mt][STEP * c] : zero;
        const uint4 pb = inside && rb[mt] ? rb[mt][STEP * c] : zero;
        if constexpr (!KEPT) mma_vector<T>(acc_h[mt], pa, pb, in.h[j]);
        // U's rows lie in the first MU m-tiles (the rest of those tiles' products unused)
        if (mt < MU) mma_vector<T>(acc_x[mt], pa, pb, in.x[j]);
      }
    }
  };
  // The tile's dots summed over warps (fixed order), then its positions' coefficients.
  auto finish = [&](index_t tile) {
    if constexpr (!KEPT) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) store_fragment(acc_h[mt], part[warp], mt, g, t);
    }
#pragma unroll
    for (int mt = 0; mt < MU; ++mt) store_fragment(acc_x[mt], part[warp] + 16 * MT, mt, g, t);
    for (auto& a : acc_h) a[0] = a[1] = a[2] = a[3] = 0.f;
    for (auto& a : acc_x) a[0] = a[1] = a[2] = a[3] = 0.f;
    __syncthreads();  // (also: the previous tile's coefficients are written, dots is free)
    for (int i = int(threadIdx.x) + (KEPT ? NP * ROWS : 0); i < ND * ROWS; i += tensor_block) {
      const int m = i / ROWS, n = i % ROWS;
      const int from = m < NP ? m : 16 * MT + (m - NP);
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) s += part[w][from][n];
      dots[m][n] = s;
    }
    __syncthreads();  // dots complete; part free for the next tile
    const index_t q = tile * ROWS + index_t(threadIdx.x);
    if (threadIdx.x < ROWS && q < P) {
      float ar[ND] = {};
#pragma unroll
      for (int i = KEPT ? NP : 0; i < ND; ++i) ar[i] = dots[i][threadIdx.x];
      coefficients_of<R, LO, GM, KEPT>(ar, sc, kept, scale, has_dg ? float(dload(&dgates(0, q))) : 0.f, 0, 1, q, P,
                                       trained == 0, gext, dzext, cf, rc);
    }
  };

  // The pipeline over (tile, batch) pairs: load step i + 1, multiply step i.
  index_t tile = blockIdx.x;
  int b = 0;
  const uint4 *hv, *xv;
  rows_of(tile, hv, xv);
  batch cur;
  load(hv, xv, 0, cur);
  for (;;) {
    index_t next_tile = tile;
    int next_b = b + 1;
    if (next_b == batches) {
      next_b = 0;
      next_tile += gridDim.x;
    }
    const bool more = next_tile < tiles;
    const uint4 *next_hv = hv, *next_xv = xv;
    batch next;
    if (more) {
      if (next_b == 0) rows_of(next_tile, next_hv, next_xv);
      load(next_hv, next_xv, next_b, next);
    }
    multiply(b, cur);
    if (b + 1 == batches) finish(tile);
    if (!more) break;
    cur = next;
    tile = next_tile;
    b = next_b;
    hv = next_hv;
    xv = next_xv;
  }
}

/// db = Σ de and dc = Σ dz over the slot's positions [q0, q1), into the slot's tail (b, c); called by
/// every lane of one warp. Lane ℓ sums positions q0 + ℓ, q0 + ℓ + 32, … in order and cub::WarpReduce
/// adds the lanes' sums (a fixed shuffle pattern: the same bits every run). Before, one thread made
/// all (r+1)·rps loads from L2, a few in flight at a time, while the rest of its warp waited (an
/// estimated tens of µs at the tensor schedule's 128 positions per slot; not measured).
template <int R, bool GATED>
__device__ __forceinline__ void slot_bias_sums(const float* __restrict__ rc, index_t q0, index_t q1, float* tail) {
  constexpr int NP = 2 * R + 1;
  using WR = cub::WarpReduce<float>;
  __shared__ typename WR::TempStorage tmp;
  const int lane = int(threadIdx.x) % 32;
  for (int i = 0; i <= R; ++i) {
    const int column = i < R ? R + i : 2 * R;  // de_i, then dz
    float s = 0.f;
    if (i < R || GATED)
      for (index_t q = q0 + lane; q < q1; q += 32) s += rc[q * NP + column];
    const float total = WR(tmp).Sum(s);
    if (lane == 0) tail[i] = total;
    __syncwarp();  // tmp is reused
  }
}

/// Grid (slot, column block). A thread owns CW columns [col, col + CW) of the slot's rows
/// q ∈ [slot·rps, min(P, (slot+1)·rps)): it accumulates the trained module's gradient rows for those
/// columns into the slot's partial sums (slots + slot·ms, the packed layout) and writes dh.
/// HOLD (K = 1, r ≤ 8): the module's parameter columns stay in registers across the rows.
template <class T, int CW, int R, bool LO, bool GATED, bool HOLD>
__global__ void __launch_bounds__(block) slot_kernel(const T* __restrict__ pk, index_t ms, index_t dp, index_t K,
                                                     matrix_view<const T, cuda_space> h,
                                                     matrix_view<const T, cuda_space> dout,
                                                     const index_t* __restrict__ pos, index_t P, index_t rps,
                                                     const float* __restrict__ cf, const float* __restrict__ rc,
                                                     const float* __restrict__ dhg, matrix_view<T, cuda_space> dh,
                                                     float* __restrict__ slots) {
  constexpr int NP = 2 * R + 1;
  constexpr int G = R < 8 ? R : 8;  // gradient rows of U (and of D) accumulated per pass over the slot
  static_assert(!HOLD || R <= 8);
  const index_t d = h.extent(1);
  const index_t q0 = index_t(blockIdx.x) * rps, q1 = P < q0 + rps ? P : q0 + rps;
  float* slot = slots + index_t(blockIdx.x) * ms;
  if (blockIdx.y == 0 && threadIdx.x < 32) slot_bias_sums<R, GATED>(rc, q0, q1, slot + packed_tail(R, dp));
  const index_t c = index_t(blockIdx.y) * block + threadIdx.x;
  if (c >= d / CW) return;
  const index_t col = c * CW;

  float hu[HOLD ? R : 1][CW], hd[HOLD ? R : 1][CW], hw[CW];
  if constexpr (HOLD) {
#pragma unroll
    for (int i = 0; i < R; ++i) {
      load_param<CW>(pk + i * dp + col, hu[i]);
      load_param<CW>(pk + (R + i) * dp + col, hd[i]);
    }
    if (GATED) load_param<CW>(pk + 2 * R * dp + col, hw);
  }

  for (int i0 = 0; i0 < R; i0 += G) {
    const bool last = i0 + G >= R;  // dh is written in the last pass (dout may alias dh)
    float X[G][CW], Y[G][CW], Z[CW];
#pragma unroll
    for (int gi = 0; gi < G; ++gi)
#pragma unroll
      for (int e = 0; e < CW; ++e) X[gi][e] = Y[gi][e] = 0.f;
#pragma unroll
    for (int e = 0; e < CW; ++e) Z[e] = 0.f;
    // Rows in groups of SU: the group's h and dout loads are all issued before the first is used
    // (one row at a time kept 2 loads in flight per thread: latency-bound). Within a group every
    // row's dout is read before any dh row is written, so dh may alias dout (rows are distinct).
    constexpr int SU = 4;
    for (index_t qb = q0; qb < q1; qb += SU) {
      vec<T, CW> xr[SU], yr[SU];
      index_t rows[SU];
#pragma unroll
      for (int u = 0; u < SU; ++u) {
        rows[u] = row_at(pos, qb + u < q1 ? qb + u : q1 - 1);  // clamped: loaded, not used
        xr[u] = load_raw<T, CW>(h.row(rows[u]) + col);
        yr[u] = load_raw<T, CW>(dout.row(rows[u]) + col);
      }
#pragma unroll
      for (int u = 0; u < SU; ++u) {
        const index_t q = qb + u;
        if (q >= q1) break;
        const index_t row = rows[u];
        float x[CW], y[CW];
        widen<T, CW>(xr[u], x);
        widen<T, CW>(yr[u], y);
        const float* t = rc + q * NP;
#pragma unroll
        for (int gi = 0; gi < G; ++gi) {
          if (i0 + gi >= R) break;
          const float a = __ldg(t + i0 + gi), de = __ldg(t + R + i0 + gi);
#pragma unroll
          for (int e = 0; e < CW; ++e) {
            X[gi][e] = fmaf(a, y[e], X[gi][e]);
            Y[gi][e] = fmaf(de, x[e], Y[gi][e]);
          }
        }
        if (GATED && i0 == 0) {
          const float dz = __ldg(t + 2 * R);
#pragma unroll
          for (int e = 0; e < CW; ++e) Z[e] = fmaf(dz, x[e], Z[e]);
        }
        if (last) {
          float o[CW];
#pragma unroll
          for (int e = 0; e < CW; ++e) o[e] = y[e];
          if (dhg != nullptr) {  // a gate path computed elsewhere (mlp: Σ_k dZ1_k W1_k) [P, d] fp32
            float gp[CW];
            load_param<CW>(dhg + q * d + col, gp);
#pragma unroll
            for (int e = 0; e < CW; ++e) o[e] += gp[e];
          }
          for (index_t k = 0; k < (HOLD ? 1 : K); ++k) {
            const float* ck = cf + (q * K + k) * NP;
            const T* pm = pk + k * ms;
#pragma unroll
            for (int i = 0; i < R; ++i) {
              float pu[CW], pd[CW];
              if constexpr (HOLD) {
#pragma unroll
                for (int e = 0; e < CW; ++e) { pu[e] = hu[i][e]; pd[e] = hd[i][e]; }
              } else {
                if (LO) load_param<CW>(pm + i * dp + col, pu);
                load_param<CW>(pm + (R + i) * dp + col, pd);
              }
              const float cu = __ldg(ck + i), cd = __ldg(ck + R + i);
#pragma unroll
              for (int e = 0; e < CW; ++e) {
                if (LO) o[e] = fmaf(cu, pu[e], o[e]);
                o[e] = fmaf(cd, pd[e], o[e]);
              }
            }
            if (GATED) {
              float pw[CW];
              if constexpr (HOLD) {
#pragma unroll
                for (int e = 0; e < CW; ++e) pw[e] = hw[e];
              } else {
                load_param<CW>(pm + 2 * R * dp + col, pw);
              }
              const float cz = __ldg(ck + 2 * R);
#pragma unroll
              for (int e = 0; e < CW; ++e) o[e] = fmaf(cz, pw[e], o[e]);
            }
          }
          store_row<T, CW>(dh.row(row) + col, o);
        }
      }
    }
#pragma unroll
    for (int gi = 0; gi < G; ++gi) {
      if (i0 + gi >= R) break;
#pragma unroll
      for (int e = 0; e < CW; ++e) {
        slot[(i0 + gi) * dp + col + e] = X[gi][e] - (LO ? Y[gi][e] : 0.f);
        slot[(R + i0 + gi) * dp + col + e] = Y[gi][e];
      }
    }
    if (i0 == 0)
#pragma unroll
      for (int e = 0; e < CW; ++e) slot[2 * R * dp + col + e] = Z[e];
  }
}

// ---- the slot kernel on tensor cores (bf16, one module) ---------------------------------------------
// Both halves of the slot kernel's work are products with a thin side of 2r+1 ≤ 32 rows
// (Θ = [U; D; w] as packed, cf [P][2r+1] = { −[lo] de | de | dz }, rc [P][2r+1] = { s g e | … }):
//   dh[q, :] = dout[q, :] + Σ_m cf[q][m] Θ[m, :]                       positions × (2r+1) · (2r+1) × columns
//   G[m, :] += Σ_q cf[q][m] h[q, :] + [m < r] rc[q][m] dout[q, :]        (2r+1) × positions · positions × columns
// (G: the slot's gradient rows dU, dD, dw — the same sums slot_kernel forms on CUDA cores), so both
// run as mma.sync m16n8k16, 16 positions per step. The second has positions along k, but a 16-byte
// load puts 8 columns of one position in a lane: movmatrix (an 8 × 8 transpose across the warp)
// makes the loaded tile the B fragment. As in the forward, which physical column a logical column n
// of an 8-column block j is may be chosen freely so long as every operand agrees. Here
//   lane (g, t) loads columns c0 + 8t … c0 + 8t + 7 of positions g and g + 8;
//   block j (0..3), logical column n  ↔  physical column c0 + 8·⌊n/2⌋ + 2j + n mod 2,
// so that a lane's C/D fragment of block j (positions g, g+8; logical columns 2t, 2t+1) is word j
// of its own 16-byte vectors: dout goes in as C, dh comes out as D, and the gradient rows are
// written, without a shuffle. The parameters' B fragments (k = parameter row, n = logical column)
// are gathered once per warp.
//
// Coefficients enter the mma as bf16, each split into hi + lo (bf16(c) and bf16(c − hi): ~16
// significant bits) and multiplied twice; h, dout and the parameters are bf16 already, so every
// product is exact in the fp32 accumulators and the coefficients' rounding is the only new one,
// ~2⁻¹⁷ relative. (fp16 storage keeps slot_kernel: a mean loss's coefficients, ~1e-7, fall below
// fp16's normal range, where hi + lo would keep a few bits.)

/// Storage and ranks slot_tensor_kernel takes: bf16, the U rows within the first 16 parameter rows.
template <class T, int R>
inline constexpr bool slot_tensor_takes = std::is_same_v<T, bfloat16> && R <= 16;

/// Threads per CTA of slot_tensor_kernel: 8 warps, each owning a strip of 32 columns.
inline constexpr int slot_tensor_block = 256;
/// Positions per mma step: the k of the gradient product.
inline constexpr int slot_tensor_step = 16;

/// M^T of an 8 × 8 matrix of 16-bit elements spread over the warp (lane 4g + t holds M[g][2t..2t+1],
/// the lower column in the low half; it gets M^T[g][2t..2t+1]). Every lane of the warp calls it.
__device__ __forceinline__ unsigned transpose_8x8(unsigned a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  unsigned d;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(d) : "r"(a));
  return d;
#elif defined(GRUN_CUDA_EMULATION)
  return ::grun_emu::movmatrix_trans(a);
#else
  __trap();  // never dispatched below sm_80 (backward_impl checks)
  return a;
#endif
}

/// The A fragment of the transposed 16 × 16 matrix, from a's: its 8 × 8 blocks swap places across the
/// diagonal (a1, rows 8–15 × k 0–7, and a2, rows 0–7 × k 8–15) and each is transposed.
__device__ __forceinline__ void transpose_a(const unsigned (&a)[4], unsigned (&t)[4]) {
  t[0] = transpose_8x8(a[0]);
  t[1] = transpose_8x8(a[2]);
  t[2] = transpose_8x8(a[1]);
  t[3] = transpose_8x8(a[3]);
}


/// Grid (slot, group of 256 columns), one module (K = 1), rows of h, dout, dh in 16-byte vectors.
/// Warp w owns columns [c0, c0 + 32), c0 = 256·blockIdx.y + 32w; per step of 16 positions it loads
/// its lanes' vectors of h and dout (the next step's loads issued before this step's math), then
/// per block j: the gradient rows G += cf^T·h + rc^T·dout and dh = dout (+ the external gate's path)
/// + cf·Θ, all on tensor cores. Positions past the slot read its last row and get zero coefficients.
template <int R>
__global__ void __launch_bounds__(slot_tensor_block) slot_tensor_kernel(
    const bfloat16* __restrict__ pk, index_t ms, index_t dp, matrix_view<const bfloat16, cuda_space> h,
    matrix_view<const bfloat16, cuda_space> dout, const index_t* __restrict__ pos, index_t P, index_t rps,
    const float* __restrict__ cf, const float* __restrict__ rc, const float* __restrict__ dhg,
    matrix_view<bfloat16, cuda_space> dh, float* __restrict__ slots) {
  constexpr int NP = 2 * R + 1, MT = (NP + 15) / 16, STEP = slot_tensor_step;
  static_assert(R <= 16, "the U rows (rc's s·g·e coefficients of dout) lie in the first tile of 16 rows");
  const index_t d = h.extent(1);
  const index_t q0 = index_t(blockIdx.x) * rps, q1 = P < q0 + rps ? P : q0 + rps;
  float* slot = slots + index_t(blockIdx.x) * ms;
  // The trained module is the only one: its gate's bias gradient is Σ dz whether or not it has a gate
  // (rc's dz column is 0 without one).
  if (blockIdx.y == 0 && threadIdx.x < 32) slot_bias_sums<R, true>(rc, q0, q1, slot + packed_tail(R, dp));
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, g = lane / 4, t = lane % 4;
  const index_t c0 = index_t(blockIdx.y) * slot_tensor_block + 32 * warp;
  if (c0 >= d) return;  // the whole warp: its strip lies past the row's end
  const index_t col = c0 + 8 * t;  // this lane's vector
  const bool live = col < d;       // d % 8 == 0: a vector is wholly in or out

  // The parameters as dh's B fragments: k = parameter row (tile kt), n = logical column g of block j.
  unsigned pb[MT][4][2];
  {
    const auto* bits = reinterpret_cast<const unsigned short*>(pk);
    const index_t pc0 = c0 + 8 * (g / 2) + (g % 2);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const index_t pc = pc0 + 2 * j;
      auto p = [&](int m) -> unsigned { return m < NP && pc < d ? unsigned(bits[index_t(m) * dp + pc]) : 0u; };
#pragma unroll
      for (int kt = 0; kt < MT; ++kt) {
        const int m = 16 * kt + 2 * t;
        pb[kt][j][0] = p(m) | p(m + 1) << 16;
        pb[kt][j][1] = p(m + 8) | p(m + 9) << 16;
      }
    }
  }

  // The position a lane reads for slot position q (the slot's last past its end: read, not used).
  auto in_slot = [&](index_t q) { return q < q1 ? q : q1 - 1; };
  // v[0], v[1]: h at positions qs + g, qs + g + 8; v[2], v[3]: dout there (zeros past the row's end).
  auto load_step = [&](index_t qs, uint4 (&v)[4]) {
    const index_t ra = row_at(pos, in_slot(qs + g)), rb = row_at(pos, in_slot(qs + g + 8));
    const uint4 zero = make_uint4(0, 0, 0, 0);
    v[0] = live ? __ldcs(reinterpret_cast<const uint4*>(h.row(ra) + col)) : zero;
    v[1] = live ? __ldcs(reinterpret_cast<const uint4*>(h.row(rb) + col)) : zero;
    v[2] = live ? __ldcs(reinterpret_cast<const uint4*>(dout.row(ra) + col)) : zero;
    v[3] = live ? __ldcs(reinterpret_cast<const uint4*>(dout.row(rb) + col)) : zero;
  };

  float grad[MT][4][4] = {};
  uint4 cur[4], next[4] = {};  // = {}: a slot of one step copies next without having loaded it
  load_step(q0, cur);
  for (index_t qs = q0; qs < q1; qs += STEP) {
    if (qs + STEP < q1) load_step(qs + STEP, next);
    // The step's coefficients (zero past the slot): cf as dh's A (rows = positions, k = parameter
    // rows of tile mt) and, transposed, as the gradient's (rows = parameter rows, k = positions);
    // rc's s·g·e as the dout part of the U rows.
    unsigned gh[MT][4], gl[MT][4], dh_hi[MT][4], dh_lo[MT][4], yh[4], yl[4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      a_fragment(
          g, t, [&](int q, int k) { return qs + q < q1 && 16 * mt + k < NP ? __ldg(cf + (qs + q) * NP + 16 * mt + k) : 0.f; },
          dh_hi[mt], dh_lo[mt]);
      transpose_a(dh_hi[mt], gh[mt]);
      transpose_a(dh_lo[mt], gl[mt]);
    }
    a_fragment(g, t, [&](int m, int k) { return m < R && qs + k < q1 ? __ldg(rc + (qs + k) * NP + m) : 0.f; }, yh, yl);

    unsigned o0[4], o1[4];  // dh at positions g, g + 8 (word j: block j)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const unsigned xw0 = word_of(cur[0], j), xw1 = word_of(cur[1], j), yw0 = word_of(cur[2], j), yw1 = word_of(cur[3], j);
      // Gradient rows: B = the step's 16 positions × block j (k = position), by transposing.
      const unsigned bx0 = transpose_8x8(xw0), bx1 = transpose_8x8(xw1);
      const unsigned by0 = transpose_8x8(yw0), by1 = transpose_8x8(yw1);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) mma_split(grad[mt][j], gh[mt], gl[mt], bx0, bx1);
      mma_split(grad[0][j], yh, yl, by0, by1);
      // dh = dout + cf · Θ for positions g, g + 8 and logical columns 2t, 2t + 1 of block j.
      float c[4];
      unpack_pair<bfloat16>(yw0, c[0], c[1]);
      unpack_pair<bfloat16>(yw1, c[2], c[3]);
      if (dhg != nullptr && live) {  // the mlp gate's path [P, d] fp32, computed elsewhere
        const float2 ga = *reinterpret_cast<const float2*>(dhg + in_slot(qs + g) * d + col + 2 * j);
        const float2 gb = *reinterpret_cast<const float2*>(dhg + in_slot(qs + g + 8) * d + col + 2 * j);
        c[0] += ga.x;
        c[1] += ga.y;
        c[2] += gb.x;
        c[3] += gb.y;
      }
#pragma unroll
      for (int kt = 0; kt < MT; ++kt) mma_split(c, dh_hi[kt], dh_lo[kt], pb[kt][j][0], pb[kt][j][1]);
      o0[j] = bf16_bits(c[0]) | bf16_bits(c[1]) << 16;
      o1[j] = bf16_bits(c[2]) | bf16_bits(c[3]) << 16;
    }
    if (live && qs + g < q1)
      __stcs(reinterpret_cast<uint4*>(dh.row(row_at(pos, qs + g)) + col), make_uint4(o0[0], o0[1], o0[2], o0[3]));
    if (live && qs + g + 8 < q1)
      __stcs(reinterpret_cast<uint4*>(dh.row(row_at(pos, qs + g + 8)) + col), make_uint4(o1[0], o1[1], o1[2], o1[3]));
#pragma unroll
    for (int i = 0; i < 4; ++i) cur[i] = next[i];
  }
  // The slot's gradient rows: lane (g, t) holds rows 16mt + g, + 8 at logical columns 2t, 2t + 1 of
  // block j = physical columns col + 2j, + 1.
  if (!live) return;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int m = 16 * mt + g;
      if (m < NP) *reinterpret_cast<float2*>(slot + index_t(m) * dp + col + 2 * j) = make_float2(grad[mt][j][0], grad[mt][j][1]);
      if (m + 8 < NP)
        *reinterpret_cast<float2*>(slot + index_t(m + 8) * dp + col + 2 * j) = make_float2(grad[mt][j][2], grad[mt][j][3]);
    }
  }
}

/// Threads per CTA of the second stage: 8 warps per 32 gradient entries.
inline constexpr int sum_block = 256;

/// Second stage: every gradient entry = Σ_b slots[b] in double, stored into the gradient leaves
/// (overwritten); with no slots (P = 0) the gradients become zero. A CTA takes 32 consecutive
/// entries (a warp reads 128 contiguous bytes of a slot); warp w sums its fixed run of slots
/// [w·n/8, (w+1)·n/8) in slot order and the 8 runs are added in warp order, so the grouping depends
/// on the slot count only: bitwise-repeatable. (One thread per entry walking all 512 slots kept a
/// few loads in flight per thread over ~37k threads at d = 4096, r = 4 — ~0.6 MB in flight for the
/// 75 MB of partial sums; this keeps 8× the threads, each with its loads unrolled.)
template <class T, int R, bool GATED>
__global__ void __launch_bounds__(sum_block) sum_slots_kernel(const float* __restrict__ slots, index_t nslots,
                                                              index_t ms, index_t dp, index_t d, dst_ptrs<T> dst) {
  constexpr int NP = 2 * R + 1, WARPS = sum_block / 32;
  __shared__ double part[WARPS][32];
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const index_t n = NP * d + R + 1;
  const index_t i = index_t(blockIdx.x) * 32 + lane;
  // Entry i → its offset in the packed layout and its destination (null: nothing to store).
  index_t off = 0;
  T* p = nullptr;
  if (i < 2 * R * d) {
    const index_t rw = i / d, j = i % d;
    off = rw * dp + j;
    p = rw < R ? dst.U + i : dst.D + (i - R * d);
  } else if (i < NP * d) {
    off = 2 * R * dp + (i - 2 * R * d);
    p = GATED ? dst.w + (i - 2 * R * d) : nullptr;
  } else if (i < NP * d + R) {
    off = packed_tail(R, dp) + (i - NP * d);
    p = dst.b + (i - NP * d);
  } else if (i < n) {
    off = packed_tail(R, dp) + R;
    p = GATED ? dst.c : nullptr;
  }
  double s = 0;
  if (p != nullptr) {
    const index_t b0 = nslots * warp / WARPS, b1 = nslots * (warp + 1) / WARPS;
#pragma unroll 8
    for (index_t b = b0; b < b1; ++b) s += double(slots[b * ms + off]);
  }
  part[warp][lane] = s;
  __syncthreads();
  if (warp == 0 && p != nullptr) {
    double t = 0;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) t += part[w][lane];
    *p = store<T>(t);
  }
}

template <int R> constexpr int forward_rows() { return 2 * R + 1 <= 9 ? 4 : 2 * R + 1 <= 17 ? 2 : 1; }
template <int R> constexpr int backward_rows() { return 3 * R + 1 <= 13 ? 2 : 1; }  // x and dout rows both in registers

inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }
/// A view whose rows can be read with 16-byte vectors of V elements.
template <class T, class View>
bool vector_rows(const View& v, int V) {
  return v.extent(1) % V == 0 && aligned16(v.data()) && (v.stride(0) * index_t(sizeof(T))) % 16 == 0;
}

/// The position list on the device for the fused kernels: nothing at all when it selects every row
/// in order (ptr() null; the kernels then read row q for position q — no upload, no host round trip
/// at the common "every token" call), else a stream-ordered copy of it.
class device_positions {
 public:
  device_positions(const positions& pos, index_t n, cudaStream_t s)
      : list_(cuda::detail::selects_every_row(pos, n) ? 0 : pos.size(), s) {
    if (list_.ptr != nullptr)
      GRUN_CUDA_CHECK(cudaMemcpyAsync(list_.ptr, pos.data(), sizeof(index_t) * std::size_t(pos.size()),
                                      cudaMemcpyHostToDevice, s));
  }
  const index_t* ptr() const { return list_.ptr; }

 private:
  cuda::detail::stream_scratch<index_t> list_;
};

/// Where one module's parameters live (w, c null for gate::always).
template <class I, class T>
src_ptrs<T> sources_of(const module_params<I, T, cuda_space>& m) {
  src_ptrs<T> p{m.reft.rotate_layer.data, m.reft.weight.data, m.reft.bias.data, nullptr, nullptr};
  if constexpr (gate_kind<typename I::gate_type>::value == 1) {
    p.w = m.gate.weight.data;
    p.c = m.gate.bias.data;
  }
  return p;
}

/// Packs K modules' parameters (as stored, rows padded to dp) into `packed` [K][ms]. Up to
/// tensor_max_modules modules, their sources travel by value in the launch; a larger stack's go
/// host → device first.
template <class I, class T>
void pack(std::span<const module_params<I, T, cuda_space>> modules, index_t d, index_t dp, index_t ms, T* packed,
          cudaStream_t s) {
  constexpr int R = int(I::rank);
  const index_t K = index_t(modules.size());
  const unsigned grid = unsigned(std::min<index_t>(cuda::ceil_div(K * ms, 256), 4096));
  if (K <= tensor_max_modules) {
    module_ptrs<T> mods{};
    for (index_t k = 0; k < K; ++k) mods.m[k] = sources_of<I, T>(modules[std::size_t(k)]);
    pack_kernel<T><<<grid, 256, 0, s>>>(mods, K, R, d, dp, ms, packed);
  } else {
    std::vector<src_ptrs<T>> host(static_cast<std::size_t>(K));
    for (index_t k = 0; k < K; ++k) host[std::size_t(k)] = sources_of<I, T>(modules[std::size_t(k)]);
    cuda::detail::stream_scratch<src_ptrs<T>> srcs(K, s);
    GRUN_CUDA_CHECK(cudaMemcpyAsync(srcs.ptr, host.data(), sizeof(src_ptrs<T>) * host.size(), cudaMemcpyHostToDevice, s));
    pack_kernel<T><<<grid, 256, 0, s>>>(static_cast<const src_ptrs<T>*>(srcs.ptr), K, R, d, dp, ms, packed);
  }
  GRUN_CUDA_CHECK_LAUNCH();
}

/// Storage and ranks the tensor schedule takes: 16-bit storage (mma.sync's operands), 2r + 1 ≤ 32
/// parameter rows (two m16 tiles).
template <class T, int R>
inline constexpr bool tensor_takes = (std::is_same_v<T, half> || std::is_same_v<T, bfloat16>) && 2 * R + 1 <= 32;

/// What the tensor schedule asks of the current device, asked once per device: compute capability
/// ≥ 8.0 (mma.sync m16n8k16 on 16-bit operands), its shared memory limits and SM count.
struct device_limits {
  bool mma = false;
  int smem_per_block_optin = 48 * 1024, smem_per_sm = 0, sms = 1;
};
inline device_limits limits_of_device() {
  return per_device<device_limits>([](int dev) {
    device_limits l;
    int major = 0;
    GRUN_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    l.mma = major >= 8;
    GRUN_CUDA_CHECK(cudaDeviceGetAttribute(&l.smem_per_block_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    GRUN_CUDA_CHECK(cudaDeviceGetAttribute(&l.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev));
    GRUN_CUDA_CHECK(cudaDeviceGetAttribute(&l.sms, cudaDevAttrMultiProcessorCount, dev));
    return l;
  });
}

/// The staged tensor kernel's dynamic shared memory for dimension d, and whether a device takes it
/// with 2 CTAs per SM (else the unstaged kernel runs).
template <class T, int R>
std::size_t staged_bytes(index_t d) {
  return std::size_t(2 * R + 1) * std::size_t(staged_row_stride(d)) * sizeof(T);
}
/// Whether the current device runs a staged tensor kernel — the 2r+1 parameter rows (staged_bytes) in
/// dynamic shared memory beside `fixed` bytes of static shared memory (the kernel's own) — with 2 CTAs
/// per SM (1 KiB per CTA is the system's).
template <class T, int R>
bool staged_fits(index_t d, const device_limits& lim, std::size_t fixed) {
  const std::size_t bytes = staged_bytes<T, R>(d);
  return bytes + fixed <= std::size_t(lim.smem_per_block_optin) && 2 * (bytes + fixed + 1024) <= std::size_t(lim.smem_per_sm);
}
/// The pipelined tensor forward's dynamic shared memory: the 2r+1 parameter rows and two tiles of
/// tensor_rows rows, staged_row_stride(d) apart.
template <class T, int R>
std::size_t pipelined_bytes(index_t d) {
  return std::size_t(2 * R + 1 + 2 * tensor_rows) * std::size_t(staged_row_stride(d)) * sizeof(T);
}
/// Whether the current device runs the pipelined tensor forward (one CTA per SM) beside `fixed` bytes
/// of static shared memory: at d = 4096, loreft<4> bf16, 206 KiB of an H100's or H200's 227; not an
/// A100's 163 (those calls run the tensor schedule).
template <class T, int R>
bool pipelined_fits(index_t d, const device_limits& lim, std::size_t fixed) {
  const std::size_t bytes = pipelined_bytes<T, R>(d);
  return bytes + fixed <= std::size_t(lim.smem_per_block_optin) && bytes + fixed + 1024 <= std::size_t(lim.smem_per_sm);
}
/// Opts Kernel, whose static shared memory is `fixed` bytes, in to all the dynamic shared memory a CTA
/// can have beside it, once per device (an attribute of the function on the current device). The
/// driver refuses a value that, with the static part, passes the device's per-CTA opt-in limit.
template <auto Kernel>
void allow_large_shared_memory(const device_limits& lim, std::size_t fixed) {
  (void)per_device<bool>([&](int) {
    GRUN_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(Kernel), cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         lim.smem_per_block_optin - int(fixed)));
    return true;
  });
}

/// The tensor schedule's launch, when the call is one it takes (16-byte vector rows of h and out,
/// d ≤ 4096, at most tensor_max_modules modules, an sm_80+ device); false, having done nothing,
/// otherwise. One module whose parameter rows fit in shared memory twice per SM: the staged,
/// persistent kernel (any alignment of the parameters). Else one CTA per tile, parameters read in
/// place when their rows are 16-byte vectors, packed first when not.
template <class I, class T, int GM, class Keep>
bool launch_forward_tensor(std::span<const module_params<I, T, cuda_space>> modules, double scale,
                           matrix_view<const T, cuda_space> h, const positions& pos, matrix_view<T, cuda_space> out,
                           matrix_view<T, cuda_space> gates, const float* gext, Keep&& keep, cudaStream_t s) {
  constexpr int R = int(I::rank);
  constexpr bool LO = reft_kind<typename I::reft_type>::value == 1;
  const index_t d = h.extent(1), P = pos.size(), K = index_t(modules.size());
  const index_t nvec = d / 8, per_thread = cuda::ceil_div(nvec, index_t(tensor_block / 8));
  if (K > tensor_max_modules || !vector_rows<T>(h, 8) || !vector_rows<T>(out, 8) || per_thread > tensor_max_held)
    return false;
  const device_limits lim = limits_of_device();
  if (!lim.mma) return false;
  float* const kept = keep(index_t(kept_width<R>));  // the call is taken: where to keep e and z (or null)
  module_ptrs<T> mods{};
  bool aligned = true;
  for (index_t k = 0; k < K; ++k) {
    const src_ptrs<T> p = sources_of<I, T>(modules[std::size_t(k)]);
    aligned = aligned && aligned16(p.U) && aligned16(p.D) && (p.w == nullptr || aligned16(p.w));
    mods.m[k] = p;
  }
  const device_positions dpos(pos, h.extent(0), s);
  const index_t tiles = cuda::ceil_div(P, index_t(tensor_rows));
  const std::size_t staged = staged_bytes<T, R>(d);
  const bool stage = K == 1 && tiles > 1 && staged_fits<T, R>(d, lim, forward_tensor_static_bytes<R>());
  auto launch = [&](auto held, auto staged_kernel, auto apply_on_tensor_cores, auto pipelined_kernel) {
    constexpr bool S = decltype(staged_kernel)::value, PL = decltype(pipelined_kernel)::value;
    constexpr auto kernel =
        forward_tensor_kernel<T, R, LO, GM, decltype(held)::value, S, decltype(apply_on_tensor_cores)::value, PL>;
    if constexpr (PL) {  // one CTA per SM
      allow_large_shared_memory<kernel>(lim, forward_tensor_static_bytes<R>());
      const unsigned grid = unsigned(std::min<index_t>(tiles, index_t(lim.sms)));
      kernel<<<grid, pipelined_block, pipelined_bytes<T, R>(d), s>>>(mods, K, float(scale), h, dpos.ptr(), P, out,
                                                                     gates, gext, kept);
    } else if constexpr (S) {
      allow_large_shared_memory<kernel>(lim, forward_tensor_static_bytes<R>());
      const unsigned grid = unsigned(std::min<index_t>(tiles, index_t(2) * lim.sms));
      kernel<<<grid, tensor_block, staged, s>>>(mods, K, float(scale), h, dpos.ptr(), P, out, gates, gext, kept);
    } else {
      kernel<<<unsigned(tiles), tensor_block, 0, s>>>(mods, K, float(scale), h, dpos.ptr(), P, out, gates, gext, kept);
    }
  };
  using small = std::integral_constant<int, 4>;
  using large = std::integral_constant<int, tensor_max_held>;
  using yes = std::true_type;
  using no = std::false_type;
  // forward_schedule::tensor_pipelined: one module, the tile double-buffered in shared memory.
  if (forward_plan == forward_schedule::tensor_pipelined && K == 1 && tiles > 1 && d > 0 &&
      pipelined_fits<T, R>(d, lim, forward_tensor_static_bytes<R>())) {
    per_thread <= 4 ? launch(small{}, yes{}, no{}, yes{}) : launch(large{}, yes{}, no{}, yes{});
    GRUN_CUDA_CHECK_LAUNCH();
    return true;
  }
  if (stage) {
    // forward_schedule::tensor_apply: the write of h' on tensor cores too (bf16, r ≤ 8).
    bool applied = false;
    if constexpr (std::is_same_v<T, bfloat16> && R <= 8)
      if (forward_plan == forward_schedule::tensor_apply) {
        per_thread <= 4 ? launch(small{}, yes{}, yes{}, no{}) : launch(large{}, yes{}, yes{}, no{});
        applied = true;
      }
    if (!applied) per_thread <= 4 ? launch(small{}, yes{}, no{}, no{}) : launch(large{}, yes{}, no{}, no{});
    GRUN_CUDA_CHECK_LAUNCH();
    return true;
  }
  // Parameter rows read in place when they are 16-byte vectors (d % 8 == 0 here, so when each
  // tensor starts aligned); else packed first (one small kernel, the sources by value) — e.g. one
  // flat buffer per module, where the tensors after a bias of r elements start mid-vector.
  const index_t ms = module_stride(R, d);
  cuda::detail::stream_scratch<T> packed(aligned ? 0 : K * ms, s);
  if (!aligned) {
    pack<I, T>(modules, d, d, ms, packed.ptr, s);
    for (index_t k = 0; k < K; ++k) mods.m[k] = packed_sources<T>(packed.ptr + k * ms, R, d, mods.m[k].w != nullptr);
  }
  per_thread <= 4 ? launch(small{}, no{}, no{}, no{}) : launch(large{}, no{}, no{}, no{});
  GRUN_CUDA_CHECK_LAUNCH();
  return true;
}

/// coef_tensor_kernel's launch for one packed module (pm, rows dp apart), when the call is one it
/// takes (h and dout in 16-byte vector rows, an sm_80+ device that holds the staged parameter rows
/// twice per SM); false, having done nothing, otherwise.
template <class T, int R, bool LO, int GM, class DG>
bool launch_coef_tensor(const T* pm, index_t dp, index_t trained, float scale, matrix_view<const T, cuda_space> h,
                        matrix_view<const T, cuda_space> dout, matrix_view<const DG, cuda_space> dgates,
                        const index_t* pos, index_t P, float* cf, float* rc, const float* gext, float* dz,
                        const float* kept, cudaStream_t s) {
  static_assert(tensor_takes<T, R>);
  const index_t d = h.extent(1);
  if (!vector_rows<T>(h, 8) || !vector_rows<T>(dout, 8) || P < 1) return false;
  const device_limits lim = limits_of_device();
  if (!lim.mma || !staged_fits<T, R>(d, lim, coef_tensor_static_bytes<R>())) return false;
  const index_t tiles = cuda::ceil_div(P, index_t(tensor_rows));
  const unsigned grid = unsigned(std::min<index_t>(tiles, index_t(2) * lim.sms));
  auto launch_as = [&](auto from_kept) {
    constexpr auto kernel = coef_tensor_kernel<T, R, LO, GM, decltype(from_kept)::value, DG>;
    allow_large_shared_memory<kernel>(lim, coef_tensor_static_bytes<R>());
    kernel<<<grid, tensor_block, staged_bytes<T, R>(d), s>>>(pm, dp, trained, scale, h, dout, dgates, pos, P, cf, rc,
                                                             gext, dz, kept);
  };
  kept ? launch_as(std::true_type{}) : launch_as(std::false_type{});
  GRUN_CUDA_CHECK_LAUNCH();
  return true;
}

}  // namespace detail

/// Fused forward core for gate mode GM (gext: [K][P] fp32 gate logits when GM = gate_external).
/// Returns false, having done nothing, when this call is not one the fused kernels take (rows not
/// contiguous, too many modules for shared memory); the caller then runs the generic path.
template <class I, class T, int GM, class Keep = keep_nothing>
bool forward_impl(const exec::cuda_t& ex, std::span<const module_params<I, T, cuda_space>> modules, double scale,
                  matrix_view<const T, cuda_space> h, const positions& pos, matrix_view<T, cuda_space> out,
                  matrix_view<T, cuda_space> gates, const float* gext, Keep&& keep = {}) {
  using Rf = typename I::reft_type;
  static_assert(reft_kind<Rf>::value >= 0 && I::rank <= max_rank);
  static_assert(takes_storage<T>, "grun::cuda::fused: float, half or bfloat16 storage (double takes the generic path)");
  constexpr int R = int(I::rank);
  constexpr bool LO = reft_kind<Rf>::value == 1;
  constexpr int ROWS = detail::forward_rows<R>();
  const index_t N = h.extent(0), d = h.extent(1), P = pos.size(), K = index_t(modules.size());
  const index_t coef_floats = (K * ROWS * R + 3) / 4 * 4;
  if (h.stride(1) != 1 || out.stride(1) != 1 || coef_floats * index_t(sizeof(float)) > 32 * 1024) return false;
  if (N == 0) return true;
  require_device("gated_intervention::forward");
  const cudaStream_t s = stream_of(ex);
  if (!cuda::detail::selects_every_row(pos, N)) cuda::detail::copy_rows<T>(h, out, s);
  if (P == 0 || K == 0) return true;

  if constexpr (detail::tensor_takes<T, R>) {
    if ((detail::forward_plan == detail::forward_schedule::tensor ||
         detail::forward_plan == detail::forward_schedule::tensor_apply ||
         detail::forward_plan == detail::forward_schedule::tensor_pipelined) &&
        detail::launch_forward_tensor<I, T, GM>(modules, scale, h, pos, out, gates, gext, keep, s))
      return true;
  }

  const index_t dp = detail::padded_dim(d), ms = detail::module_stride(R, dp);
  cuda::detail::stream_scratch<T> packed(K * ms, s);
  detail::pack<I, T>(modules, d, dp, ms, packed.ptr, s);
  const detail::device_positions dpos(pos, N, s);
  // e and z kept for the backward: 16-bit storage only (fp32's coefficient kernel forms them from
  // fp64 dots, which this forward's fp32 dots would not match — see coef_kernel).
  float* kept = nullptr;
  if constexpr (!std::is_same_v<T, float>) kept = keep(index_t(detail::kept_width<R>));

  constexpr int VW = vec_width<T>;
  const bool vec = detail::vector_rows<T>(h, VW) && detail::vector_rows<T>(out, VW);
  const index_t per_thread = cuda::ceil_div(d / VW, index_t(detail::block));  // vectors per thread and row
  const index_t tile_bytes = index_t(ROWS) * d * index_t(sizeof(T));
  const bool fits = coef_floats * index_t(sizeof(float)) + tile_bytes <= 40 * 1024;
  const auto plan = detail::forward_plan;
  const bool resident = plan == detail::forward_schedule::resident && vec && per_thread <= detail::max_resident;
  const bool staged = plan == detail::forward_schedule::staged && vec && fits;
  const bool stage = !resident && fits;
  const std::size_t smem = std::size_t(coef_floats * index_t(sizeof(float)) + (stage ? tile_bytes : 0));
  const unsigned grid = unsigned(cuda::ceil_div(P, ROWS));
  auto launch = [&](auto vw, auto res, auto async) {
    const auto kernel = detail::forward_kernel<T, decltype(vw)::value, R, ROWS, LO, GM, decltype(res)::value,
                                               decltype(async)::value>;
    kernel<<<grid, detail::block, smem, s>>>(packed.ptr, ms, dp, K, float(scale), h, dpos.ptr(), P, out, gates, gext,
                                             stage, coef_floats, kept);
  };
  using vw = std::integral_constant<int, VW>;
  using none = std::integral_constant<int, 0>;
  if (resident) {
    if (per_thread == 1) launch(vw{}, std::integral_constant<int, 1>{}, std::false_type{});
    else if (per_thread == 2) launch(vw{}, std::integral_constant<int, 2>{}, std::false_type{});
    else launch(vw{}, std::integral_constant<int, detail::max_resident>{}, std::false_type{});  // 3 or 4
  } else if (staged) {
    launch(vw{}, none{}, std::true_type{});
  } else {
    vec ? launch(vw{}, none{}, std::false_type{}) : launch(std::integral_constant<int, 1>{}, none{}, std::false_type{});
  }
  GRUN_CUDA_CHECK_LAUNCH();
  return true;
}

/// Fused forward (see the file comment) for gate::linear / gate::always.
/// keep(width) → float*: called (16-bit storage) once a fused forward kernel takes the call, with the
/// scalars a position and module it can keep (e and z); returns where ([K][P][width] fp32, device),
/// or null for nothing.
template <class I, class T, class Keep = keep_nothing>
bool forward(const exec::cuda_t& ex, std::span<const module_params<I, T, cuda_space>> modules, double scale,
             matrix_view<const T, cuda_space> h, const positions& pos, matrix_view<T, cuda_space> out,
             matrix_view<T, cuda_space> gates, Keep&& keep = {}) {
  using G = typename I::gate_type;
  static_assert(supported<G, typename I::reft_type, typename I::ortho_type>);
  constexpr int GM = gate_kind<G>::value == 1 ? detail::gate_linear : detail::gate_none;
  return forward_impl<I, T, GM>(ex, modules, scale, h, pos, out, gates, nullptr, keep);
}

/// Fused backward core for gate mode GM: dh and the ReFT (and linear gate) gradients of module
/// `trained` (overwritten). With gate_external, gext [K][P] holds the logits z, and after the coefficient
/// kernel `mid(dz)` runs with dz [K][P] = dL/dz (the gate's last pre-activation, device fp32); it
/// returns a device [P, d] fp32 gate path added to dh (or nullptr). kept: null, or what the forward
/// kept ([K][P][R + 1] fp32: e and z; 16-bit storage) — then the coefficient kernel reads dout only. Returns false, having done nothing, when the call is not one the fused kernels take.
template <class I, class T, int GM, class DG, class Mid>
bool backward_impl(const exec::cuda_t& ex, std::span<const module_params<I, T, cuda_space>> modules, double scale,
                   index_t trained, matrix_view<const T, cuda_space> h, const positions& pos,
                   matrix_view<const T, cuda_space> dout, matrix_view<const DG, cuda_space> dgates,
                   matrix_view<T, cuda_space> dh, const module_params<I, T, cuda_space>& grads, const float* gext,
                   Mid&& mid, const float* kept = nullptr) {
  using Rf = typename I::reft_type;
  static_assert(reft_kind<Rf>::value >= 0 && I::rank <= max_rank);
  static_assert(takes_storage<T>, "grun::cuda::fused: float, half or bfloat16 storage (double takes the generic path)");
  // The vector path reads rows in VW-element vectors (d % VW == 0, rows 16-byte aligned) and the slot
  // kernel then gives each thread 4 columns: 4 | VW keeps those columns inside d and their loads aligned.
  static_assert(vec_width<T> % 4 == 0);
  constexpr int R = int(I::rank);
  constexpr bool LO = reft_kind<Rf>::value == 1, GATED = GM == detail::gate_linear;
  constexpr int ROWS = detail::backward_rows<R>();
  constexpr int NP = 2 * R + 1;
  const index_t N = h.extent(0), d = h.extent(1), P = pos.size(), K = index_t(modules.size());
  if (h.stride(1) != 1 || dout.stride(1) != 1 || dh.stride(1) != 1 || K < 1) return false;
  const cudaStream_t s = stream_of(ex);
  require_device("gated_intervention::backward");
  if (!cuda::detail::selects_every_row(pos, N)) cuda::detail::copy_rows<T>(dout, dh, s);

  const index_t dp = detail::padded_dim(d), ms = detail::module_stride(R, dp);
  constexpr int VW = vec_width<T>;
  const bool vec = detail::vector_rows<T>(h, VW) && detail::vector_rows<T>(dout, VW) && detail::vector_rows<T>(dh, VW);
  bool tensor_slots = false;
  if constexpr (detail::slot_tensor_takes<T, R>)
    tensor_slots = detail::slot_plan == detail::slot_schedule::tensor && K == 1 && trained == 0 && vec &&
                   detail::limits_of_device().mma;
  // Slots: runs of rps consecutive positions; their number and size depend on (P, d, r) and the
  // schedule only. The tensor schedule's hold whole steps of 16 positions, at least 4 of them, and
  // are at most 128 (the slot kernel on CUDA cores: up to 512, for parallelism).
  const index_t max_slots =
      std::clamp<index_t>((index_t(256) << 20) / (ms * index_t(sizeof(float))), 1, tensor_slots ? 128 : 512);
  const index_t rps = tensor_slots ? std::max<index_t>(64, cuda::ceil_div(cuda::ceil_div(P, max_slots), 16) * 16)
                                   : std::max<index_t>(16, cuda::ceil_div(P, max_slots));
  const index_t nslots = P > 0 ? cuda::ceil_div(P, rps) : 0;

  detail::dst_ptrs<T> dst{grads.reft.rotate_layer.data, grads.reft.weight.data, grads.reft.bias.data, nullptr, nullptr};
  if constexpr (GATED) {
    dst.w = grads.gate.weight.data;
    dst.c = grads.gate.bias.data;
  }
  cuda::detail::stream_scratch<float> slots(nslots * ms, s);
  if (P > 0) {
    cuda::detail::stream_scratch<T> packed(K * ms, s);
    detail::pack<I, T>(modules, d, dp, ms, packed.ptr, s);
    const detail::device_positions dpos(pos, N, s);
    cuda::detail::stream_scratch<float> cf(P * K * NP, s), rc(P * NP, s), dz(GM == detail::gate_external ? K * P : 0, s);
    // rc rows of a trained index outside [0, K) stay unset: make them zero (no gradient).
    GRUN_CUDA_CHECK(cudaMemsetAsync(rc.ptr, 0, sizeof(float) * std::size_t(P * NP), s));

    const unsigned grid1 = unsigned(cuda::ceil_div(P, ROWS));
    const index_t per_thread = cuda::ceil_div(d / VW, index_t(detail::block));  // vectors per thread and row
    const bool resident = detail::coef_plan == detail::coef_schedule::resident && vec && per_thread <= detail::max_resident;
    bool tensor_coefs = false;
    if constexpr (detail::tensor_takes<T, R>)
      tensor_coefs = detail::coef_plan == detail::coef_schedule::tensor && K == 1 &&
                     detail::launch_coef_tensor<T, R, LO, GM, DG>(packed.ptr, dp, trained, float(scale), h, dout, dgates,
                                                                  dpos.ptr(), P, cf.ptr, rc.ptr, gext, dz.ptr, kept, s);
    auto coefs = [&](auto vw, auto res) {
      auto launch_as = [&](auto from_kept) {
        const auto kernel =
            detail::coef_kernel<T, decltype(vw)::value, R, ROWS, LO, GM, decltype(res)::value, decltype(from_kept)::value, DG>;
        kernel<<<grid1, detail::block, 0, s>>>(packed.ptr, ms, dp, K, trained, float(scale), h, dout, dgates,
                                               dpos.ptr(), P, cf.ptr, rc.ptr, gext, dz.ptr, kept);
      };
      if constexpr (std::is_same_v<T, float>) launch_as(std::false_type{});  // (fp32: never kept)
      else kept ? launch_as(std::true_type{}) : launch_as(std::false_type{});
    };
    using vw = std::integral_constant<int, VW>;
    if (!tensor_coefs) {
      if (resident) {
        if (per_thread == 1) coefs(vw{}, std::integral_constant<int, 1>{});
        else if (per_thread == 2) coefs(vw{}, std::integral_constant<int, 2>{});
        else coefs(vw{}, std::integral_constant<int, detail::max_resident>{});  // 3 or 4
      } else {
        vec ? coefs(vw{}, std::integral_constant<int, 0>{}) : coefs(std::integral_constant<int, 1>{}, std::integral_constant<int, 0>{});
      }
      GRUN_CUDA_CHECK_LAUNCH();
    }
    const float* dhg = mid(static_cast<const float*>(dz.ptr));

    auto launch_tensor = [&] {
      if constexpr (detail::slot_tensor_takes<T, R>) {
        const dim3 grid(unsigned(nslots), unsigned(cuda::ceil_div(d, index_t(detail::slot_tensor_block))));
        detail::slot_tensor_kernel<R><<<grid, detail::slot_tensor_block, 0, s>>>(
            packed.ptr, ms, dp, h, dout, dpos.ptr(), P, rps, cf.ptr, rc.ptr, dhg, dh, slots.ptr);
      }
    };
    const bool hold = K == 1 && R <= 8;
    const int CW = vec ? 4 : 1;
    const dim3 grid2(unsigned(nslots), unsigned(std::max<index_t>(1, cuda::ceil_div(d / CW, detail::block))));
    auto launch = [&](auto cw, auto hd) {
      constexpr int C = decltype(cw)::value;
      constexpr bool H = decltype(hd)::value && R <= 8;
      detail::slot_kernel<T, C, R, LO, GATED, H><<<grid2, detail::block, 0, s>>>(
          packed.ptr, ms, dp, K, h, dout, dpos.ptr(), P, rps, cf.ptr, rc.ptr, dhg, dh, slots.ptr);
    };
    if (tensor_slots) {
      launch_tensor();
    } else if (vec) {
      if (hold) launch(std::integral_constant<int, 4>{}, std::true_type{});
      else launch(std::integral_constant<int, 4>{}, std::false_type{});
    } else {
      if (hold) launch(std::integral_constant<int, 1>{}, std::true_type{});
      else launch(std::integral_constant<int, 1>{}, std::false_type{});
    }
    GRUN_CUDA_CHECK_LAUNCH();
  }
  const index_t nout = NP * d + R + 1;
  detail::sum_slots_kernel<T, R, GATED><<<unsigned(cuda::ceil_div(nout, 32)), detail::sum_block, 0, s>>>(
      slots.ptr, nslots, ms, dp, d, dst);
  GRUN_CUDA_CHECK_LAUNCH();
  return true;
}

/// Fused backward (see the file comment) for gate::linear / gate::always: dh and the trained
/// module's gradients (overwritten).
template <class I, class T, class DG>
bool backward(const exec::cuda_t& ex, std::span<const module_params<I, T, cuda_space>> modules, double scale,
              index_t trained, matrix_view<const T, cuda_space> h, const positions& pos,
              matrix_view<const T, cuda_space> dout, matrix_view<const DG, cuda_space> dgates,
              matrix_view<T, cuda_space> dh, const module_params<I, T, cuda_space>& grads,
              const float* kept = nullptr) {
  using G = typename I::gate_type;
  static_assert(supported<G, typename I::reft_type, typename I::ortho_type>);
  constexpr int GM = gate_kind<G>::value == 1 ? detail::gate_linear : detail::gate_none;
  return backward_impl<I, T, GM>(ex, modules, scale, trained, h, pos, dout, dgates, dh, grads, nullptr,
                                 [](const float*) -> const float* { return nullptr; }, kept);
}

}  // namespace grun::cuda::fused
