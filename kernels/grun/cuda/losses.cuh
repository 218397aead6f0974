#pragma once
// grun/cuda/losses.cuh — exec::cuda for every unlearning loss policy (loss/unlearn.hpp) and for
// loss::objective: include this header and pass inputs<T, cuda_space> / grads<T, cuda_space>.
//
//   sequence and gate terms  ga, npo, simnpo, idk, dpo, retain_nll, gate_bce, gate_bce_logits and
//                            retain_kl's token mean: the policy's own GRUN_HD term (detail/terms.hpp)
//                            run by ONE block of reduce_block threads in two passes —
//                              D = Σ_i n_i  (cub::BlockReduce, with the first malformed item),
//                              Σ_i v_i with gradients scaled by weight · (1/D)  (cub::BlockReduce).
//                            Item i always goes to thread i mod reduce_block and CUB's tree is fixed:
//                            bitwise repeatable. B and G (sequences, gate values) are small, so one
//                            block is the right size: the launch costs more than the arithmetic.
//   rmu, rmu_retain          (1/(P·d)) Σ (h − target)²: one block per row (columns strided across
//                            the block, gradient written in the same pass), row sums to a [P]
//                            temporary, then the same one-block reduction over rows in fixed order.
//   retain_kl                the fused token KL of kl.cuh, then the token mean above.
//
// Each evaluate returns its value on the host: one cudaMemcpyAsync of a few bytes and a stream
// synchronization per term. Gradients stay on the device, on the executor's stream.
#include <cub/block/block_reduce.cuh>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "check.cuh"  // first: exec::host_t before exec/cuda.hpp
#include "kl.cuh"
#include "nll.cuh"
#include "scratch.cuh"

#include <grun/loss/detail/terms.hpp>
#include <grun/loss/objective.hpp>
#include <grun/loss/unlearn.hpp>

namespace grun::cuda::detail {

inline constexpr int reduce_block = 256;

/// Pass-one state of a term reduction: denominator, malformed items, the smallest malformed index.
struct term_census {
  index_t denominator;
  index_t invalid_count;
  index_t first_invalid;
  int invalid_field;
};
struct merge_census {
  __device__ __forceinline__ term_census operator()(const term_census& a, const term_census& b) const {
    term_census c = a;
    c.denominator += b.denominator;
    c.invalid_count += b.invalid_count;
    if (b.first_invalid < c.first_invalid) { c.first_invalid = b.first_invalid; c.invalid_field = b.invalid_field; }
    return c;
  }
};

template <class Acc, class Term>
__global__ void __launch_bounds__(reduce_block) reduce_terms_kernel(Term term, Acc weight, loss::detail::term_totals<Acc>* out) {
  using census_reduce = cub::BlockReduce<term_census, reduce_block>;
  using sum_reduce = cub::BlockReduce<Acc, reduce_block>;
  __shared__ typename census_reduce::TempStorage census_tmp;
  __shared__ typename sum_reduce::TempStorage sum_tmp;
  __shared__ term_census census;
  constexpr index_t none = std::numeric_limits<index_t>::max();

  const index_t n = term.size();
  term_census mine{0, 0, none, 0};
  for (index_t i = threadIdx.x; i < n; i += reduce_block) {
    if (const int bad = term.invalid(i)) {
      if (mine.invalid_count++ == 0) { mine.first_invalid = i; mine.invalid_field = bad; }  // ascending i: first is smallest
    } else {
      mine.denominator += term.denominator(i);
    }
  }
  const term_census all = census_reduce(census_tmp).Reduce(mine, merge_census{});
  if (threadIdx.x == 0) census = all;
  __syncthreads();
  const term_census c = census;
  Acc sum = Acc(0);
  if (c.invalid_count == 0 && c.denominator > 0) {  // uniform across the block: no divergent barrier
    const Acc scale = weight * (Acc(1) / static_cast<Acc>(c.denominator));
    for (index_t i = threadIdx.x; i < n; i += reduce_block) sum += term.apply(i, scale);
    sum = sum_reduce(sum_tmp).Sum(sum);
  }
  if (threadIdx.x == 0) {
    out->sum = sum;
    out->denominator = c.denominator;
    out->invalid_count = c.invalid_count;
    out->first_invalid = c.invalid_count ? c.first_invalid : -1;
    out->invalid_field = c.invalid_field;
  }
}

/// Row p of (h − target)²: block-strided columns, dh updated in the same pass, row sum to rows[p].
template <class T, class G, class Target>
__global__ void __launch_bounds__(reduce_block)
mean_squared_rows_kernel(tensor_view<const T, 2, cuda_space> h, tensor_view<G, 2, cuda_space> dh, acc_t<T> weight,
                         acc_t<T> inv, Target target, acc_t<T>* rows) {
  using Acc = acc_t<T>;
  using sum_reduce = cub::BlockReduce<Acc, reduce_block>;
  __shared__ typename sum_reduce::TempStorage tmp;
  const index_t p = blockIdx.x, d = h.extent(1);
  const T* hp = h.row(p);
  G* dp = dh.empty() ? nullptr : dh.row(p);
  // Hardware conversions for the 2-byte types; double stays double.
  auto ld = [](const auto* x) -> Acc {
    if constexpr (std::is_same_v<Acc, double>) return static_cast<Acc>(*x);
    else return dload(x);
  };
  Acc s = Acc(0);
  for (index_t j = threadIdx.x; j < d; j += reduce_block) {
    const Acc e = ld(hp + j) - target(p, j);
    s += e * e;
    if (dp) {
      const Acc v = ld(dp + j) + weight * Acc(2) * e * inv;
      if constexpr (std::is_same_v<Acc, double>) dp[j] = static_cast<G>(v);
      else dstore(dp + j, v);
    }
  }
  s = sum_reduce(tmp).Sum(s);
  if (threadIdx.x == 0) rows[p] = s;
}

/// Σ of a device array as a term (denominator 1 each): the rows of mean_squared.
template <class Acc>
struct array_term {
  using memory_space = cuda_space;
  const Acc* values;
  index_t n;
  GRUN_HD index_t size() const { return n; }
  GRUN_HD int invalid(index_t) const { return 0; }
  GRUN_HD index_t denominator(index_t) const { return 1; }
  GRUN_HD Acc apply(index_t i, Acc) const { return values[i]; }
};

/// Zeroes a strided view the memset calls cannot describe.
template <class V>
__global__ void zero_strided_kernel(V v) {
  using El = typename V::element_type;
  const index_t cols = V::rank == 1 ? 1 : v.extent(1);
  const index_t total = v.extent(0) * cols;
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += index_t(gridDim.x) * blockDim.x) {
    if constexpr (V::rank == 1) v(i) = El{};
    else v(i / cols, i % cols) = El{};
  }
}

}  // namespace grun::cuda::detail

namespace grun::loss::detail {

template <>
struct term_reduce_impl<exec::cuda_t> {
  template <class Acc, class Term>
  static term_totals<Acc> run(const exec::cuda_t& ex, const Term& term, Acc weight) {
    const term_totals<Acc> none{};
    if (term.size() == 0) return none;
    cuda::require_device("loss: sequence/gate term reduction");
    const cudaStream_t s = cuda::stream_of(ex);
    const cuda::detail::device_report<term_totals<Acc>> out(s, none);  // the kernel writes every field
    cuda::detail::reduce_terms_kernel<Acc><<<1, cuda::detail::reduce_block, 0, s>>>(term, weight, out.device());
    GRUN_CUDA_CHECK_LAUNCH();
    return out.read();
  }
};

template <>
struct mean_squared_impl<exec::cuda_t> {
  template <class T, class Target>
  static acc_t<T> run(const exec::cuda_t& ex, const tensor_view<const T, 2, cuda_space>& h,
                      const tensor_view<T, 2, cuda_space>& dh, acc_t<T> weight, const Target& target) {
    using Acc = acc_t<T>;
    const index_t P = h.extent(0), d = h.extent(1);
    if (P * d == 0) return Acc(0);
    require_rows_contiguous(h, "loss: mean squared error: hidden");
    if (!dh.empty()) require_rows_contiguous(dh, "loss: mean squared error: gradient hidden");
    require<shape_error>(P <= index_t(INT32_MAX), "loss: mean squared error: expected at most 2^31 − 1 rows, got ", P);
    cuda::require_device("loss: mean squared error");
    const cudaStream_t s = cuda::stream_of(ex);
    cuda::detail::stream_scratch<Acc> rows(P, s);
    const Acc inv = Acc(1) / static_cast<Acc>(P * d);
    cuda::detail::mean_squared_rows_kernel<<<unsigned(P), cuda::detail::reduce_block, 0, s>>>(h, dh, weight, inv, target,
                                                                                              rows.ptr);
    GRUN_CUDA_CHECK_LAUNCH();
    // Σ rows in a fixed order (the host sums them in row order: equal up to rounding).
    const term_totals<Acc> t = term_reduce_impl<exec::cuda_t>::run<Acc>(ex, cuda::detail::array_term<Acc>{rows.ptr, P}, Acc(1));
    return t.sum * inv;
  }
};

template <>
struct temporary_impl<exec::cuda_t> {
  template <class Acc>
  static cuda::detail::stream_scratch<Acc> make(const exec::cuda_t& ex, index_t n) {
    if (n > 0) cuda::require_device("loss: device temporary");
    return cuda::detail::stream_scratch<Acc>(n, cuda::stream_of(ex));
  }
};

template <>
struct zero_impl<exec::cuda_t> {
  template <class V>
  static void run(const exec::cuda_t& ex, const V& v) {
    using El = typename V::element_type;
    static_assert(std::is_trivially_copyable_v<El>, "grun: zeroing a device view needs a trivially copyable element");
    if (v.empty()) return;
    cuda::require_device("loss::objective: zeroing gradients");
    const cudaStream_t s = cuda::stream_of(ex);
    // Every grun storage type's zero is all-zero bits: memset where the layout allows it.
    if constexpr (V::rank == 1) {
      if (v.stride(0) == 1) {
        GRUN_CUDA_CHECK(cudaMemsetAsync(v.data(), 0, sizeof(El) * std::size_t(v.extent(0)), s));
        return;
      }
    } else {
      if (v.stride(1) == 1 && v.extent(0) == 1) {
        // One row: its stride is never stepped and may be below the width (torch keeps any stride
        // on a size-1 dimension), which cudaMemset2D may refuse as a pitch — as in copy_rows.
        GRUN_CUDA_CHECK(cudaMemsetAsync(v.data(), 0, sizeof(El) * std::size_t(v.extent(1)), s));
        return;
      }
      if (v.stride(1) == 1) {
        GRUN_CUDA_CHECK(cudaMemset2DAsync(v.data(), sizeof(El) * std::size_t(v.stride(0)), 0,
                                          sizeof(El) * std::size_t(v.extent(1)), std::size_t(v.extent(0)), s));
        return;
      }
    }
    cuda::detail::zero_strided_kernel<<<unsigned(cuda::ceil_div(v.size(), 256) < 4096 ? cuda::ceil_div(v.size(), 256) : 4096),
                                         256, 0, s>>>(v);
    GRUN_CUDA_CHECK_LAUNCH();
  }
};

}  // namespace grun::loss::detail
