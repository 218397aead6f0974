#pragma once
// grun/cuda/householder.cuh — ortho::householder on the device: R = E_r · H_1 ⋯ H_r materialized from
// the raw vectors v_k, and the exact pullback dL/dR → dL/dv, in double like the host
// (ortho/householder.hpp, whose GRUN_HD formulas these kernels use).
//
// Row i of R is e_i H_1 ⋯ H_r: a row's reflections never look at the other rows, so one CTA per row
// sweeps k = 1 … r with one block reduction per step (m·v_k and v_kᵀv_k together):
//     m ← m − (2/n_k)(m·v_k) v_k,     a_ik = m·v_k   (m = M_{k−1}(i), before H_k)
// The pullback needs, per step k and column j, a sum over the rows i of
//     −(2/n)(M_{k−1}(i, j) c_ik + G(i, j) a_ik) + (4/n²) a_ik c_ik v_k(j),   c_ik = G(i)·v_k,
// with G (dL/dM_k) reflected from dL/dR backwards: G ← G − (2/n_k) c_ik v_k. The host keeps every
// M_k and G ([r + 1, r, d]); here the dots come from row sweeps — a_ik in the materializing sweep,
// c_ik in a backward sweep over the rows of dL/dR — and then one thread per column replays the
// same recurrences on its column alone from those r² scalars (M_{k−1}(i, j) = M_k(i, j) + (2/n_k) a_ik
// v_k(j): H_k is an involution) and sums over i in order. No [r, r, d] scratch; every sum has a
// fixed order, so the results are bitwise repeatable.
//
//   householder_materialize   each module's R [r, d] in T (and a_ik, n_k for the pullback); a zero or
//                             non-finite v_k is reported with the host's numeric_error (the stream is
//                             waited for, once per call)
//   householder_pullback      dL/dv [r, d] from dL/dR [r, d] (in place allowed) and what materialize kept
#include <cub/block/block_reduce.cuh>

#include <span>

#include "check.cuh"
#include "scratch.cuh"

#include <grun/ortho/householder.hpp>

namespace grun::cuda {

namespace detail {
inline constexpr int householder_block = 256;

/// The sums of one pass over a row: x·v and vᵀv.
struct householder_sums {
  double xv, vv;
};
struct householder_sums_plus {
  GRUN_HD householder_sums operator()(const householder_sums& p, const householder_sums& q) const {
    return {p.xv + q.xv, p.vv + q.vv};
  }
};

/// The first module (in launch order) with a zero or non-finite v_k: the module, k (−1: none) and v_kᵀv_k.
struct householder_status {
  index_t module, k;
  double n;
};

/// Σ_j x(j) v(j) and Σ_j v(j)² over the CTA (x in double, v as stored), the same value in every thread.
template <class T>
__device__ householder_sums householder_row_sums(const double* x, const T* v, index_t d, void* storage,
                                                 householder_sums* shared) {
  using reduce = cub::BlockReduce<householder_sums, householder_block>;
  householder_sums s{0, 0};
  for (index_t j = threadIdx.x; j < d; j += householder_block) {
    const double vj = load<double>(v[j]);
    s.xv += x[j] * vj;
    s.vv += vj * vj;
  }
  const householder_sums t = reduce(*static_cast<typename reduce::TempStorage*>(storage)).Reduce(s, householder_sums_plus{});
  if (threadIdx.x == 0) *shared = t;
  __syncthreads();
  const householder_sums out = *shared;
  __syncthreads();  // *shared and the reduction's storage are rewritten by the next call
  return out;
}

/// Row i = blockIdx.x of R: m = e_i, then m ← m H_k for k = 0 … r−1 (m: work row i, double).
/// Keeps a[i][k] = M_{k−1}(i)·v_k and, from row 0, n[k]; writes R's row i as T. A degenerate v_k stops
/// every CTA at step k (each sees the same n_k); row 0 reports it unless an earlier module did.
template <class T>
__global__ void __launch_bounds__(householder_block)
householder_materialize_kernel(const T* raw, index_t r, index_t d, double* work, T* R, double* a, double* n,
                               index_t module, householder_status* status) {
  using reduce = cub::BlockReduce<householder_sums, householder_block>;
  __shared__ typename reduce::TempStorage storage;
  __shared__ householder_sums shared;
  const index_t i = blockIdx.x;
  double* m = work + i * d;
  for (index_t j = threadIdx.x; j < d; j += householder_block) m[j] = j == i ? 1.0 : 0.0;
  for (index_t k = 0; k < r; ++k) {
    const T* v = raw + k * d;
    const householder_sums s = householder_row_sums(m, v, d, &storage, &shared);
    if (!(isfinite(s.vv) && s.vv > 0)) {  // s is the CTA's shared value: every thread returns
      if (i == 0 && threadIdx.x == 0 && status->k < 0) *status = householder_status{module, k, s.vv};
      return;
    }
    if (threadIdx.x == 0) {
      a[i * r + k] = s.xv;
      if (i == 0) n[k] = s.vv;
    }
    const double coef = ortho::householder::reflection_coefficient(s.xv, s.vv);
    for (index_t j = threadIdx.x; j < d; j += householder_block) m[j] -= coef * load<double>(v[j]);
  }
  for (index_t j = threadIdx.x; j < d; j += householder_block) R[i * d + j] = store<T>(m[j]);
}

/// Row i = blockIdx.x of G = dL/dR, reflected backwards: c[i][k] = G(i)·v_k, then G ← G H_k, for
/// k = r−1 … 0 (G: work row i, double).
template <class T, class TG>
__global__ void __launch_bounds__(householder_block)
householder_backward_sweep_kernel(const T* raw, const TG* dR, index_t r, index_t d, const double* n, double* work,
                                  double* c) {
  using reduce = cub::BlockReduce<householder_sums, householder_block>;
  __shared__ typename reduce::TempStorage storage;
  __shared__ householder_sums shared;
  const index_t i = blockIdx.x;
  double* g = work + i * d;
  for (index_t j = threadIdx.x; j < d; j += householder_block) g[j] = load<double>(dR[i * d + j]);
  for (index_t k = r - 1; k >= 0; --k) {
    const T* v = raw + k * d;
    const double cik = householder_row_sums(g, v, d, &storage, &shared).xv;
    if (threadIdx.x == 0) c[i * r + k] = cik;
    const double coef = ortho::householder::reflection_coefficient(cik, n[k]);
    for (index_t j = threadIdx.x; j < d; j += householder_block) g[j] -= coef * load<double>(v[j]);
  }
}

/// Column j of dL/dv (one thread per column): the rows' M_r(i, j) and G(i, j) replayed from the
/// sweeps' scalars, then for k = r−1 … 0 the sum over i (in order) of pullback_term, and both
/// reflected back past H_k. dv may be dR (a column's dR is read before any of its dv is written).
template <index_t r, class T, class TG>
__global__ void __launch_bounds__(householder_block)
householder_pullback_kernel(const T* raw, const TG* dR, index_t d, const double* a, const double* c, const double* n,
                            TG* dv) {
  const index_t j = index_t(blockIdx.x) * householder_block + threadIdx.x;
  if (j >= d) return;
  double m[r], g[r], v[r];
  for (index_t k = 0; k < r; ++k) v[k] = load<double>(raw[k * d + j]);
  for (index_t i = 0; i < r; ++i) {
    m[i] = j == i ? 1.0 : 0.0;
    for (index_t k = 0; k < r; ++k) m[i] -= ortho::householder::reflection_coefficient(a[i * r + k], n[k]) * v[k];
    g[i] = load<double>(dR[i * d + j]);
  }
  for (index_t k = r - 1; k >= 0; --k) {
    double sum = 0;
    for (index_t i = 0; i < r; ++i) {
      m[i] += ortho::householder::reflection_coefficient(a[i * r + k], n[k]) * v[k];  // M_{k−1}(i, j)
      sum += ortho::householder::pullback_term(m[i], g[i], v[k], a[i * r + k], c[i * r + k], n[k]);
      g[i] -= ortho::householder::reflection_coefficient(c[i * r + k], n[k]) * v[k];
    }
    dv[k * d + j] = store<TG>(sum);
  }
}

}  // namespace detail

/// For each of the K raw tensors raws[m] [r, d] (device): R_m [r, d] (device, T, at R + m·r·d) = the
/// first r rows of H_1 ⋯ H_r, and the dots the pullback replays (device, double: a_m [r, r] at
/// dots + m·(r² + r), then n_m [r]), on the executor's stream. Waits for the stream once, to report a
/// zero or non-finite v_k as numeric_error with the host's wording (and the module, when K > 1).
template <class T>
void householder_materialize(const exec::cuda_t& ex, std::span<const param<T, cuda_space>> raws, T* R, double* dots) {
  if (raws.empty()) return;
  const index_t r = raws[0].rows, d = raws[0].cols;
  require<shape_error>(r <= d, "householder: expected rank r <= hidden size d, got r = ", r, ", d = ", d);
  if (r == 0) return;
  require_device("ortho::householder (materialize R)");
  const cudaStream_t s = stream_of(ex);
  detail::stream_scratch<double> work(r * d, s);  // one module at a time: the launches are stream-ordered
  const detail::device_report<detail::householder_status> status(s, detail::householder_status{-1, -1, 0.0});
  for (std::size_t m = 0; m < raws.size(); ++m) {
    double* a = dots + index_t(m) * (r * r + r);
    detail::householder_materialize_kernel<T><<<unsigned(r), detail::householder_block, 0, s>>>(
        raws[m].data, r, d, work.ptr, R + index_t(m) * r * d, a, a + r * r, index_t(m), status.device());
    GRUN_CUDA_CHECK_LAUNCH();
  }
  const detail::householder_status st = status.read();
  if (st.k < 0) return;
  if (raws.size() == 1)
    fail<numeric_error>("householder: raw vector v_", st.k, " must be nonzero and finite, got squared norm ", st.n);
  fail<numeric_error>("householder: raw vector v_", st.k, " of module ", st.module,
                      " must be nonzero and finite, got squared norm ", st.n);
}

/// dL/dv [r, d] (device, TG; may be dR itself) from dL/dR [r, d] and raw [r, d], given the dots
/// householder_materialize kept for that raw tensor (a [r, r], then n [r]), on the executor's
/// stream. r: the rank, known at compile time (the column replay keeps 3r doubles per thread).
template <index_t r, class T, class TG>
void householder_pullback(const exec::cuda_t& ex, const param<T, cuda_space>& raw, const TG* dR, TG* dv,
                          const double* dots) {
  const index_t d = raw.cols;
  require<shape_error>(raw.rows == r, "householder pullback: expected rank ", r, ", got raw vectors [", raw.rows, ", ",
                       d, "]");
  if (d == 0) return;
  const cudaStream_t s = stream_of(ex);
  const double *a = dots, *n = dots + r * r;
  detail::stream_scratch<double> work(r * d, s), c(r * r, s);
  detail::householder_backward_sweep_kernel<T, TG><<<unsigned(r), detail::householder_block, 0, s>>>(
      raw.data, dR, r, d, n, work.ptr, c.ptr);
  GRUN_CUDA_CHECK_LAUNCH();
  detail::householder_pullback_kernel<r, T, TG>
      <<<unsigned(ceil_div(d, index_t(detail::householder_block))), detail::householder_block, 0, s>>>(raw.data, dR, d,
                                                                                                   a, c.ptr, n, dv);
  GRUN_CUDA_CHECK_LAUNCH();
}

/// exec::cuda's kernels for a parametrizing ortho policy (gated_intervention's seam uses them):
///   available                       whether they exist
///   materialize(ex, raws, R, dots)  the K modules' R from their raw tensors, and what pullback needs
///   dots_size(r)                    doubles of `dots` per module
///   pullback<r>(ex, raw, dR, dv, dots)
template <class O>
struct device_parametrization {
  static constexpr bool available = false;
};
template <>
struct device_parametrization<ortho::householder> {
  static constexpr bool available = true;
  static constexpr index_t dots_size(index_t r) { return r * r + r; }
  template <class T>
  static void materialize(const exec::cuda_t& ex, std::span<const param<T, cuda_space>> raws, T* R, double* dots) {
    householder_materialize<T>(ex, raws, R, dots);
  }
  template <index_t r, class T, class TG>
  static void pullback(const exec::cuda_t& ex, const param<T, cuda_space>& raw, const TG* dR, TG* dv, const double* dots) {
    householder_pullback<r, T, TG>(ex, raw, dR, dv, dots);
  }
};

}  // namespace grun::cuda
