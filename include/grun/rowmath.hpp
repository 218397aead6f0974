#pragma once
// grun/rowmath.hpp — the row kernels the policies share: several dot products over one vector in a
// single pass, and the fused rank-N update. Written so GCC vectorizes them without -ffast-math and
// deterministically: each dot keeps `lanes` independent partial sums combined in a fixed tree at
// the end (see core/simd.hpp), so a result depends on n only — never on threads or call site.
// GRUN_HD: the CUDA kernels run the same code per thread.
#include <type_traits>

#include "core/numeric.hpp"
#include "core/simd.hpp"

namespace grun::detail {

/// Lanes per dot when N dots share a pass: N·L accumulators must fit the vector registers.
template <class Acc, int N>
inline constexpr int multi_lanes = N == 1 ? simd::lanes<Acc> : (std::is_same_v<Acc, double> ? 4 : 8);

/// out[k] = Σ_j w[k][j]·x[j] for k < N, x read once (the N rows of w stream next to it).
template <class Acc, int N, class W, class X>
GRUN_HD GRUN_FORCEINLINE void multi_dot(const W* const* w, const X* x, index_t n, Acc* out) {
  constexpr int L = multi_lanes<Acc, N>;
  Acc part[N][L] = {};
  const index_t nv = n - n % L;  // (bounds as nv, not j + L <= n: quiets GCC's false -Waggressive-loop-optimizations)
  for (index_t j = 0; j < nv; j += L) {
    Acc xv[L];
    for (int l = 0; l < L; ++l) xv[l] = load<Acc>(x[j + l]);
    for (int k = 0; k < N; ++k)
      for (int l = 0; l < L; ++l) part[k][l] += load<Acc>(w[k][j + l]) * xv[l];
  }
  Acc tail[N] = {};
  for (index_t j = nv; j < n; ++j)
    for (int k = 0; k < N; ++k) tail[k] += load<Acc>(w[k][j]) * load<Acc>(x[j]);
  for (int k = 0; k < N; ++k) {
    for (int s = L / 2; s >= 1; s /= 2)
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
  Acc part[M][N][L] = {};
  const index_t nv = n - n % L;
  for (index_t j = 0; j < nv; j += L)
    for (int m = 0; m < M; ++m) {
      Acc wv[L];
      for (int l = 0; l < L; ++l) wv[l] = load<Acc>(w[m][j + l]);
      for (int k = 0; k < N; ++k)
        for (int l = 0; l < L; ++l) part[m][k][l] += wv[l] * load<Acc>(x[k][j + l]);
    }
  Acc tail[M][N] = {};
  for (index_t j = nv; j < n; ++j)
    for (int m = 0; m < M; ++m)
      for (int k = 0; k < N; ++k) tail[m][k] += load<Acc>(w[m][j]) * load<Acc>(x[k][j]);
  for (int m = 0; m < M; ++m)
    for (int k = 0; k < N; ++k) {
      for (int s = L / 2; s >= 1; s /= 2)
        for (int l = 0; l < s; ++l) part[m][k][l] += part[m][k][l + s];
      out[m][k] = part[m][k][0] + tail[m][k];
    }
}

}  // namespace grun::detail
