#pragma once
// grun/cuda/retract.cuh — ortho::qr_retraction on the device: R [r, d] ← rows of Q of QR(Rᵀ),
// diag(U) > 0, by modified Gram–Schmidt with one re-orthogonalization pass, in double — the same
// algorithm and order as ortho::detail::orthonormalize_rows on the host. r ≤ 32: one block; each
// dot product is a cub::BlockReduce (fixed tree: bitwise repeatable).
#include <cub/block/block_reduce.cuh>

#include "check.cuh"
#include "scratch.cuh"

#include <grun/ortho/qr_retraction.hpp>

namespace grun::cuda {

namespace detail {
inline constexpr int retract_block = 512;
/// Largest rank one retraction block handles (r ≤ 32 rows of R).
inline constexpr index_t retract_max_rank = 32;

/// code: 0 ok, 1 + k when row k is zero / not finite (norm: its norm), 1001 + k when row k is dependent.
struct retract_status {
  int code;
  double norm;
};

template <class T>
__global__ void __launch_bounds__(retract_block)
qr_retract_kernel(T* R, double* w, index_t r, index_t d, retract_status* status) {
  using reduce = cub::BlockReduce<double, retract_block>;
  __shared__ typename reduce::TempStorage tmp;
  __shared__ double shared;
  for (index_t i = threadIdx.x; i < r * d; i += retract_block) w[i] = load<double>(R[i]);
  __syncthreads();
  auto dot = [&](const double* a, const double* b) {
    double s = 0;
    for (index_t j = threadIdx.x; j < d; j += retract_block) s += a[j] * b[j];
    const double t = reduce(tmp).Sum(s);
    if (threadIdx.x == 0) shared = t;
    __syncthreads();
    const double out = shared;
    __syncthreads();
    return out;
  };
  for (index_t k = 0; k < r; ++k) {
    double* rk = w + k * d;
    const double norm0 = sqrt(dot(rk, rk));
    if (!isfinite(norm0) || !(norm0 > 0)) {  // norm0 is the block's shared value: every thread returns
      if (threadIdx.x == 0) *status = retract_status{int(1 + k), norm0};
      return;
    }
    for (int pass = 0; pass < 2; ++pass)
      for (index_t i = 0; i < k; ++i) {
        const double* ri = w + i * d;
        const double c = dot(ri, rk);
        for (index_t j = threadIdx.x; j < d; j += retract_block) rk[j] -= c * ri[j];
        __syncthreads();
      }
    const double norm = sqrt(dot(rk, rk));
    if (!(norm > 1e-12 * norm0)) {
      if (threadIdx.x == 0) *status = retract_status{int(1001 + k), norm};
      return;
    }
    for (index_t j = threadIdx.x; j < d; j += retract_block) rk[j] /= norm;
    __syncthreads();
  }
  for (index_t i = threadIdx.x; i < r * d; i += retract_block) R[i] = store<T>(w[i]);
}
}  // namespace detail

/// Retracts R [r, d] (device memory) in place; r ≤ 32 ≤ … ≤ d. Synchronizes the stream to report
/// a degenerate R as numeric_error (R is left unchanged then).
template <class T>
void qr_retract(const exec::cuda_t& ex, const param<T, cuda_space>& R) {
  if (R.size() == 0) return;
  require<shape_error>(R.rows <= detail::retract_max_rank, "qr_retract on exec::cuda: expected rank r <= ",
                       detail::retract_max_rank, " (one block), got r = ", R.rows);
  require<shape_error>(R.rows <= R.cols, "qr_retract: expected rank r <= hidden size d, got r = ", R.rows, ", d = ", R.cols);
  require_device("qr_retract");
  const cudaStream_t s = stream_of(ex);
  // Scratch and the status reset on the executor's stream: a device_buffer would zero the status on
  // the legacy default stream, unordered with a non-blocking `s` (a failure could be overwritten).
  detail::stream_scratch<double> w(R.size(), s);
  const detail::device_report<detail::retract_status> status(s, detail::retract_status{0, 0.0});
  detail::qr_retract_kernel<<<1, detail::retract_block, 0, s>>>(R.data, w.ptr, R.rows, R.cols, status.device());
  GRUN_CUDA_CHECK_LAUNCH();
  const detail::retract_status st = status.read();
  // The host's wording (ortho::detail::orthonormalize_rows), found on the device.
  require<numeric_error>(st.code == 0 || st.code > 1000, "qr_retraction: row ", st.code - 1,
                         " of R is zero or not finite (norm ", st.norm, "); cannot orthonormalize");
  require<numeric_error>(st.code == 0, "qr_retraction: row ", st.code - 1001,
                         " of R is linearly dependent on the rows before it; cannot orthonormalize");
}

}  // namespace grun::cuda
