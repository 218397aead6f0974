#pragma once
// grun/cuda/fused/common.cuh — what every fused intervention kernel shares: which policies have
// fused kernels (public: fused::supported, fused::takes_storage), the packed parameter layout and
// its packing kernel, vector loads and stores, the forward values e and z and what a forward keeps
// of them, and the CUDA-core dot and axpy loops. Part of intervention_fused.cuh (include that).

#include <type_traits>

#include "../check.cuh"  // first: exec::host_t before exec/cuda.hpp

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
/// exported), value (g itself given, fp32 [K][P], e.g. by a gate of the user's on the row path —
/// intervention_row_gate.cuh; dL/dg exported).
inline constexpr int gate_none = 0, gate_linear = 1, gate_external = 2, gate_value = 3;

/// Whether gate mode GM takes g (or its logit) from outside, in fp32 [K][P], and exports its gradient.
template <int GM>
inline constexpr bool gate_from_outside = GM == gate_external || GM == gate_value;

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

/// The gate's path of dL/dh, [P, ld] row q per selected position, that a gate computed outside the
/// fused kernels hands the slot kernels; they add it to dh before dh's rounding. Its elements are
/// fp32 (a user's gate on the row path sums Σ_k into them per row) or the storage type T (the mlp
/// gate: cuBLASLt rounds Σ_k dZ1_k W1_k to T in its epilogue; bf16 moves half the bytes of fp32,
/// 256 MiB fewer at T = 16384, d = 4096). One type for both producers, so a slot kernel is compiled
/// once per storage type whichever feeds it; `narrow` is the same for every thread of a launch.
/// Row pitch: a multiple of the widest load (4 fp32 or 8 16-bit elements) where rows are vectors.
template <class T>
struct gate_path {
  const void* data = nullptr;  // null: no gate path (a linear gate, or none)
  index_t ld = 0;              // elements per row
  bool narrow = false;         // elements are T (else float)

  /// x[e] += the path's element col + e of row q, e < V (one load of V elements: col and ld are
  /// multiples of V).
  template <int V>
  __device__ __forceinline__ void add_to(index_t q, index_t col, float* x) const {
    float g[V];
    if (narrow) load_row<T, V>(static_cast<const T*>(data) + q * ld + col, g);
    else load_row<float, V>(static_cast<const float*>(data) + q * ld + col, g);
#pragma unroll
    for (int e = 0; e < V; ++e) x[e] += g[e];
  }
};

__device__ __forceinline__ float dsigmoid(float z) { return grun::sigmoid(z); }

/// g of a gate given from outside, from gext[i]: σ(z) for an external logit, the value itself otherwise.
template <int GM>
__device__ __forceinline__ float outside_gate(const float* __restrict__ gext, index_t i) {
  static_assert(gate_from_outside<GM>);
  if constexpr (GM == gate_external) return dsigmoid(gext[i]);
  else return gext[i];
}

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

}  // namespace detail
}  // namespace grun::cuda::fused
