#pragma once
// grun/cuda/adamw.cuh — fused AdamW on exec::cuda: every parameter tensor of a module (or of a
// stack) updated by one launch, with optim::adamw_update (the host's GRUN_HD element math).
//
// The leaves of the params and grads aggregates and of the moments m, v (device_param_states in the
// compute type: fp32 for half and bfloat16 parameters) become segments {θ, g, m, v, n}. When the
// leaves sit back to back in all four — the layout device_params / device_param_state give, one
// buffer carved in declaration order — the segments fuse into one flat array and the kernel is a
// plain grid-stride loop; otherwise up to max_segments segments travel in the kernel's parameter
// block and each thread finds its segment by a scan of the (constant-cached) offsets.
//
// Sums of squares (gradient norms) are cub::DeviceReduce runs on the executor's stream into
// stream-ordered scratch: the only synchronization is the one that brings the result to the host.
#include <cub/device/device_reduce.cuh>
#include <thrust/iterator/transform_iterator.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "check.cuh"  // first: exec::host_t before exec/cuda.hpp
#include "scratch.cuh"

#include <grun/optim/adamw.hpp>

namespace grun::cuda {

namespace detail {

inline constexpr int adamw_max_segments = 48;  // 48 × 40 B: well inside the 4 KiB parameter block

template <class T, class S>
struct adamw_segment {
  T* theta;
  const T* grad;
  S* m;
  S* v;
  index_t begin;  // running offset over all segments
};
template <class T, class S>
struct adamw_table {
  adamw_segment<T, S> seg[adamw_max_segments];
  int count;
  index_t total;
};

template <class Acc, class T, class S>
__global__ void adamw_kernel(adamw_table<T, S> tab, optim::adamw_coeffs<Acc> c) {
  const index_t stride = index_t(gridDim.x) * blockDim.x;
  int s = 0;
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < tab.total; i += stride) {
    while (s + 1 < tab.count && i >= tab.seg[s + 1].begin) ++s;  // i only grows: the scan resumes
    const auto& sg = tab.seg[s];
    const index_t k = i - sg.begin;
    Acc t = load<Acc>(sg.theta[k]), m = load<Acc>(sg.m[k]), v = load<Acc>(sg.v[k]);
    optim::adamw_update<Acc>(t, load<Acc>(sg.grad[k]), m, v, c);
    sg.theta[k] = store<T>(t);
    sg.m[k] = store<S>(m);
    sg.v[k] = store<S>(v);
  }
}

template <class T>
struct square_of {
  __device__ double operator()(const T& a) const { const double f = load<double>(a); return f * f; }
};

/// *out (device) = Σ x[i]² over n elements, in double: cub::DeviceReduce on stream s (fixed
/// reduction tree, no atomics: run-to-run deterministic). Asynchronous: no synchronization.
template <class T>
void sum_of_squares_async(const T* x, index_t n, double* out, cudaStream_t s) {
  if (n == 0) {
    GRUN_CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(double), s));
    return;
  }
  const auto squares = thrust::make_transform_iterator(x, square_of<T>{});
  run_with_cub_scratch(s, [&](void* temp, std::size_t& bytes) {
    return cub::DeviceReduce::Sum(temp, bytes, squares, out, n, s);
  });
}

template <class T, class S, class Acc>
void launch_adamw(const exec::cuda_t& ex, const adamw_table<T, S>& tab, const optim::adamw_coeffs<Acc>& c) {
  if (tab.total == 0) return;
  require_device("adamw step");
  const int block = 256;
  const index_t blocks = std::min<index_t>(ceil_div(tab.total, block), 4096);
  adamw_kernel<Acc><<<unsigned(blocks), block, 0, stream_of(ex)>>>(tab, c);
  GRUN_CUDA_CHECK_LAUNCH();
}

}  // namespace detail

/// AdamW over n contiguous elements (a flat parameter buffer: a whole device_params). One launch.
template <class Acc, class T, class S>
void adamw_step_flat(const exec::cuda_t& ex, T* theta, const T* grad, S* m, S* v, index_t n,
                     const optim::adamw_coeffs<Acc>& c) {
  require<shape_error>(n >= 0, "adamw_step_flat: expected n >= 0, got ", n);
  detail::adamw_table<T, S> tab{};
  tab.seg[0] = {theta, grad, m, v, 0};
  tab.count = 1;
  tab.total = n;
  detail::launch_adamw(ex, tab, c);
}

/// Global L2 norm of a flat device array (for gradient clipping), cub::DeviceReduce over squares:
/// run-to-run deterministic (fixed reduction tree, no atomics). Synchronizes the stream (once).
template <class T>
double l2_norm(const exec::cuda_t& ex, const T* x, index_t n) {
  if (n == 0) return 0.0;
  require_device("l2_norm");
  const cudaStream_t s = stream_of(ex);
  detail::stream_scratch<double> out(1, s);
  detail::sum_of_squares_async(x, n, out.ptr, s);
  double sum = 0;
  GRUN_CUDA_CHECK(cudaMemcpyAsync(&sum, out.ptr, sizeof(double), cudaMemcpyDeviceToHost, s));
  GRUN_CUDA_CHECK(cudaStreamSynchronize(s));
  return std::sqrt(sum);
}

}  // namespace grun::cuda

namespace grun::optim::detail {

/// exec::cuda for an AdamW step over aggregates whose leaves all live in cuda_space (params,
/// grads, and the moments m, v: device_param_states shaped like Params). One launch for every
/// leaf of the aggregate.
template <>
struct adamw_impl<exec::cuda_t> {
  template <class Params, class State, class Acc>
  static void step(const exec::cuda_t& ex, const Params& p, const Params& g, const State& m, const State& v,
                   const adamw_coeffs<Acc>& c) {
    using T = param_value_t<Params>;
    using S = typename State::value_type;
    static_assert(std::is_same_v<typename State::memory_space, cuda_space>,
                  "grun: the moments of an adamw step on exec::cuda live in cuda_space (device_param_state)");
    cuda::detail::adamw_table<T, S> tab{};
    index_t total = 0, leaves = 0;
    bool fused = true;  // every non-empty leaf starts where the one before it ended, in all four aggregates
    for_each_leaf_with_state(p, g, m, v, [&](const auto& pl, const auto& gl, const auto& ml, const auto& vl) {
      static_assert(std::is_same_v<typename std::remove_cvref_t<decltype(pl)>::memory_space, cuda_space>,
                    "grun: no adamw step for host_space parameters on exec::cuda (use device_params)");
      if (pl.size() == 0) return;
      if (leaves == 0) {
        tab.seg[0] = {pl.data, gl.data, ml.data, vl.data, 0};
      } else {
        const auto& f = tab.seg[0];
        fused = fused && pl.data == f.theta + total && gl.data == f.grad + total && ml.data == f.m + total &&
                vl.data == f.v + total;
      }
      ++leaves;
      total += pl.size();
    });
    tab.count = leaves > 0 ? 1 : 0;  // fused: seg[0] spans all `total` elements
    if (!fused) {
      // One segment per non-empty leaf, counted before any is written (the table has a fixed size).
      require<shape_error>(leaves <= cuda::detail::adamw_max_segments, "adamw step on exec::cuda: expected at most ",
                           cuda::detail::adamw_max_segments, " non-contiguous parameter tensors per step, got ", leaves,
                           " (keep the leaves in one buffer, e.g. grun::cuda::device_params)");
      tab = {};
      total = 0;
      for_each_leaf_with_state(p, g, m, v, [&](const auto& pl, const auto& gl, const auto& ml, const auto& vl) {
        if (pl.size() == 0) return;
        tab.seg[tab.count++] = {pl.data, gl.data, ml.data, vl.data, total};
        total += pl.size();
      });
    }
    tab.total = total;
    cuda::detail::launch_adamw(ex, tab, c);
  }
};

}  // namespace grun::optim::detail
