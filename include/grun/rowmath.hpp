#pragma once
// grun/rowmath.hpp — the row kernels the policies share: several dot products over one vector in a
// single pass, and the fused rank-N update. Written so GCC vectorizes them without -ffast-math and
// deterministically: each dot keeps `lanes` independent partial sums combined in a fixed tree at
// the end (see core/simd.hpp), so a result depends on n only — never on threads or call site.
// GRUN_HD: the CUDA kernels run the same code per thread.
#include <type_traits>

#include "core/numeric.hpp"
#include "core/simd.hpp"

/// Fully unroll a short fixed-count loop (GCC otherwise may keep the lane accumulators of
/// multi_dot / tile_dot in memory, one store-forwarded load and store per FMA).
#if defined(__CUDA_ARCH__)
#define GRUN_UNROLL _Pragma("unroll")
#elif defined(__CUDACC__)  // nvcc's host pass: its front end warns on GCC's pragma (#1675-D)
#define GRUN_UNROLL
#elif defined(__clang__)
#define GRUN_UNROLL _Pragma("clang loop unroll(full)")
#elif defined(__GNUC__)
#define GRUN_UNROLL _Pragma("GCC unroll 64")
#else
#define GRUN_UNROLL
#endif

/// Keep a loop scalar: for the strided copies (a transpose's writes) that clang would otherwise
/// vectorize into AVX-512 scatter stores, slower than the scalar stores they replace on the AMD EPYC
/// (AVX-512) grun is benchmarked on. GCC 12 leaves such loops scalar by itself.
#if defined(__clang__) && !defined(__CUDA_ARCH__)
#define GRUN_NO_VECTORIZE _Pragma("clang loop vectorize(disable)")
#else
#define GRUN_NO_VECTORIZE
#endif

namespace grun::detail {

/// Lanes per dot when N dots share a pass: N·L accumulators must fit the vector registers.
template <class Acc, int N>
inline constexpr int multi_lanes = N == 1 ? simd::lanes<Acc> : (std::is_same_v<Acc, double> ? 4 : 8);

#if !defined(__CUDA_ARCH__)
/// Host: a GNU vector of Acc, one register wide (32 bytes with AVX, else 16). The
/// loops below are written on it directly because GCC's SLP pass, given the same loops on arrays,
/// sometimes keeps the accumulators in memory or shuffles across them.
template <class Acc> struct hvec;
#if defined(__AVX__)
inline constexpr int hvec_bytes = 32;
#else
inline constexpr int hvec_bytes = 16;
#endif
template <> struct hvec<float> { typedef float type __attribute__((vector_size(hvec_bytes))); };
template <> struct hvec<double> { typedef double type __attribute__((vector_size(hvec_bytes))); };
template <class Acc> using hvec_t = typename hvec<Acc>::type;
template <class Acc> inline constexpr int hvec_lanes = int(hvec_bytes / sizeof(Acc));
template <class Acc> GRUN_FORCEINLINE hvec_t<Acc> vload(const Acc* p) {
  hvec_t<Acc> v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
template <class Acc> GRUN_FORCEINLINE void vstore(Acc* p, hvec_t<Acc> v) { __builtin_memcpy(p, &v, sizeof v); }
template <class Acc> GRUN_FORCEINLINE hvec_t<Acc> vsplat(Acc a) {
  return hvec_t<Acc>{} + a;  // broadcast of a scalar operand (GCC vector extension)
}
#endif

/// out[k] = Σ_j w[k][j]·x[j] for k < N, x read once (the N rows of w stream next to it).
template <class Acc, int N, class W, class X>
GRUN_HD GRUN_FORCEINLINE void multi_dot(const W* const* w, const X* x, index_t n, Acc* out) {
  constexpr int L = multi_lanes<Acc, N>;
#if !defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<W, Acc> && std::is_same_v<X, Acc> && L % hvec_lanes<Acc> == 0) {
    // Same lanes and the same final tree as the scalar loop below, so the same result.
    constexpr int V = hvec_lanes<Acc>, U = L / V;
    hvec_t<Acc> acc[N][U] = {};
    const index_t nv = n - n % L;
    for (index_t j = 0; j < nv; j += L) {
      hvec_t<Acc> xv[U];
      GRUN_UNROLL
      for (int u = 0; u < U; ++u) xv[u] = vload(x + j + u * V);
      GRUN_UNROLL
      for (int k = 0; k < N; ++k)
        GRUN_UNROLL
        for (int u = 0; u < U; ++u) acc[k][u] += vload(w[k] + j + u * V) * xv[u];
    }
    GRUN_UNROLL
    for (int k = 0; k < N; ++k) {
      Acc part[L];
      for (int u = 0; u < U; ++u) vstore(part + u * V, acc[k][u]);
      Acc tail = Acc(0);
      for (index_t j = nv; j < n; ++j) tail += w[k][j] * x[j];
      for (int s = L / 2; s >= 1; s /= 2)
        for (int l = 0; l < s; ++l) part[l] += part[l + s];
      out[k] = part[0] + tail;
    }
    return;
  }
#endif
  Acc part[N][L] = {};
  const index_t nv = n - n % L;  // (bounds as nv, not j + L <= n: quiets GCC's false -Waggressive-loop-optimizations)
  for (index_t j = 0; j < nv; j += L) {
    Acc xv[L];
    GRUN_UNROLL
    for (int l = 0; l < L; ++l) xv[l] = load<Acc>(x[j + l]);
    GRUN_UNROLL
    for (int k = 0; k < N; ++k)
      GRUN_UNROLL
      for (int l = 0; l < L; ++l) part[k][l] += load<Acc>(w[k][j + l]) * xv[l];
  }
  Acc tail[N] = {};
  for (index_t j = nv; j < n; ++j)
    GRUN_UNROLL
    for (int k = 0; k < N; ++k) tail[k] += load<Acc>(w[k][j]) * load<Acc>(x[j]);
  GRUN_UNROLL
  for (int k = 0; k < N; ++k) {
    GRUN_UNROLL
    for (int s = L / 2; s >= 1; s /= 2)
      GRUN_UNROLL
      for (int l = 0; l < s; ++l) part[k][l] += part[k][l + s];
    out[k] = part[k][0] + tail[k];
  }
}

/// Σ_j a[j]·b[j] with a and b loaded through load<Acc> (storage types welcome).
template <class Acc, class A, class B>
GRUN_HD GRUN_FORCEINLINE Acc dot(const A* a, const B* b, index_t n) {
  const A* rows[1] = {a};
  Acc out[1];
  multi_dot<Acc, 1>(rows, b, n, out);
  return out[0];
}

}  // namespace grun::detail

namespace grun::detail {

/// y[j] += a·x[j]  (restrict: lets GCC vectorize without runtime alias checks).
template <class Acc, class X>
GRUN_HD inline void axpy_row(Acc a, const X* __restrict__ x, Acc* __restrict__ y, index_t n) {
  for (index_t j = 0; j < n; ++j) y[j] += a * load<Acc>(x[j]);
}

/// g[j] += a·x[j] and y[j] += a·w[j] in one pass: the backward of a linear unit z = wᵀx with dz = a
/// (weight gradient g, input gradient y).
template <class Acc, class W, class X>
GRUN_HD inline void outer_and_back(Acc a, const W* __restrict__ w, const X* __restrict__ x, Acc* __restrict__ g,
                                   Acc* __restrict__ y, index_t n) {
  for (index_t j = 0; j < n; ++j) {
    g[j] += a * load<Acc>(x[j]);
    y[j] += a * load<Acc>(w[j]);
  }
}

}  // namespace grun::detail

namespace grun::detail {

/// out[m][k] = Σ_j w[m][j]·x[k][j]: an M×N tile of dot products (each W row and each x row loaded
/// once per chunk). Every dot keeps the lane split of multi_dot<Acc, 8> and the same final tree, so
/// a result does not depend on the tile it was computed in.
template <class Acc, int M, int N, class W, class X>
GRUN_FORCEINLINE void tile_dot(const W* const* w, const X* const* x, index_t n, Acc (*out)[N]) {
  constexpr int L = multi_lanes<Acc, 8>;
#if !defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<W, Acc> && std::is_same_v<X, Acc> && L == hvec_lanes<Acc>) {
    hvec_t<Acc> acc[M][N] = {};
    const index_t nv = n - n % L;
    for (index_t j = 0; j < nv; j += L) {
      hvec_t<Acc> xv[N];
      GRUN_UNROLL
      for (int k = 0; k < N; ++k) xv[k] = vload(x[k] + j);
      GRUN_UNROLL
      for (int m = 0; m < M; ++m) {
        const hvec_t<Acc> wv = vload(w[m] + j);
        GRUN_UNROLL
        for (int k = 0; k < N; ++k) acc[m][k] += wv * xv[k];
      }
    }
    for (int m = 0; m < M; ++m)
      for (int k = 0; k < N; ++k) {
        Acc part[L];
        vstore(part, acc[m][k]);
        Acc tail = Acc(0);
        for (index_t j = nv; j < n; ++j) tail += w[m][j] * x[k][j];
        for (int s = L / 2; s >= 1; s /= 2)
          for (int l = 0; l < s; ++l) part[l] += part[l + s];
        out[m][k] = part[0] + tail;
      }
    return;
  }
#endif
  Acc part[M][N][L] = {};
  const index_t nv = n - n % L;
  for (index_t j = 0; j < nv; j += L)
    GRUN_UNROLL
    for (int m = 0; m < M; ++m) {
      Acc wv[L];
      GRUN_UNROLL
      for (int l = 0; l < L; ++l) wv[l] = load<Acc>(w[m][j + l]);
      GRUN_UNROLL
      for (int k = 0; k < N; ++k)
        GRUN_UNROLL
        for (int l = 0; l < L; ++l) part[m][k][l] += wv[l] * load<Acc>(x[k][j + l]);
    }
  Acc tail[M][N] = {};
  for (index_t j = nv; j < n; ++j)
    GRUN_UNROLL
    for (int m = 0; m < M; ++m)
      GRUN_UNROLL
      for (int k = 0; k < N; ++k) tail[m][k] += load<Acc>(w[m][j]) * load<Acc>(x[k][j]);
  GRUN_UNROLL
  for (int m = 0; m < M; ++m)
    GRUN_UNROLL
    for (int k = 0; k < N; ++k) {
      GRUN_UNROLL
      for (int s = L / 2; s >= 1; s /= 2)
        GRUN_UNROLL
        for (int l = 0; l < s; ++l) part[m][k][l] += part[m][k][l + s];
      out[m][k] = part[m][k][0] + tail[m][k];
    }
}

}  // namespace grun::detail

namespace grun::detail {

/// y[j] = Σ_k a[k]·x[k][j] for k < N in order (k = 0 first): one store per coordinate.
template <class Acc, int N, class X>
GRUN_HD GRUN_FORCEINLINE void multi_axpy_set(const Acc* a, const X* const* x, Acc* y, index_t n) {
  index_t j0 = 0;
#if !defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<X, Acc>) {
    constexpr int V = hvec_lanes<Acc>;
    hvec_t<Acc> av[N];
    GRUN_UNROLL
    for (int k = 0; k < N; ++k) av[k] = vsplat(a[k]);
    for (; j0 + V <= n; j0 += V) {
      hvec_t<Acc> s = vload(x[0] + j0) * av[0];
      GRUN_UNROLL
      for (int k = 1; k < N; ++k) s += vload(x[k] + j0) * av[k];
      vstore(y + j0, s);
    }
  }
#endif
  for (index_t j = j0; j < n; ++j) {
    Acc s = load<Acc>(x[0][j]) * a[0];
    GRUN_UNROLL
    for (int k = 1; k < N; ++k) s += load<Acc>(x[k][j]) * a[k];
    y[j] = s;
  }
}

}  // namespace grun::detail
