#pragma once
// grun/cuda/kl.cuh — fused per-token KL(p_ref ‖ p_θ) over the vocabulary on the device, plugged
// into loss::token_kl_forward / token_kl_backward through their executor seam
// (loss::detail::token_kl_impl<exec::cuda_t>). Same row math as loss/kl.hpp:
//
//   forward  KL_t = w / s_r − (m_r − m_x) − log s_r + log s_x,   w = Σ_v exp(r_v − m_r)(r_v − x_v)
//            lse_t = m_x + log s_x and lse_ref_t = m_r + log s_r saved for backward
//   backward dx_t[v] = dkl_t · (exp(x_t[v] − lse_t) − exp(r_t[v] − lse_ref_t))
//
// Laid out like nll.cuh: one block per token row, both rows tiled in 16-byte vectors across the
// block (the width is the narrower of the storage types involved, so bf16 logits with fp32
// reference logits still move whole vectors). Each thread keeps an online loss::kl_state (two
// log-sum-exps and w rescaled with the reference max), and the block combines the states with
// cub::BlockReduce over kl_state::merge — fixed thread→element assignment and CUB's fixed tree, so
// results are bitwise repeatable. Forward reads both rows once; backward reads both once more and
// writes the gradient once (in place over the logits allowed). Rows whose label is −100 are not
// read at all. Row offsets are 64-bit (T·V passes 2^31 at T = 8192, V = 131072).
#include <cub/block/block_reduce.cuh>

#include <cstdint>
#include <type_traits>

#include "check.cuh"  // first: brings exec::host_t before exec/cuda.hpp needs it
#include "nll.cuh"    // fast_exp, vector_ok, acc_load / acc_store

#include <grun/loss/kl.hpp>

namespace grun::cuda {

namespace detail {

/// Threads per row, as for the NLL kernel: a sweep takes 512 × 8 bf16 from each of the two rows,
/// so a block has twice the NLL kernel's bytes in flight (V = 131072: 32 sweeps).
inline constexpr int kl_block = 512;

template <class Acc>
struct kl_merge {
  __device__ __forceinline__ loss::kl_state<Acc> operator()(loss::kl_state<Acc> a, const loss::kl_state<Acc>& b) const {
    a.merge(b);
    return a;
  }
};

template <int Block, int W, class Acc, class T, class R, class L, class A>
__global__ void __launch_bounds__(Block)
token_kl_forward_kernel(tensor_view<T, 2, cuda_space> x, tensor_view<R, 2, cuda_space> r,
                        tensor_view<L, 1, cuda_space> labels, tensor_view<A, 1, cuda_space> kl,
                        tensor_view<A, 1, cuda_space> lse, tensor_view<A, 1, cuda_space> lse_ref) {
  using EX = std::remove_const_t<T>;
  using ER = std::remove_const_t<R>;
  using state = loss::kl_state<Acc>;
  using reduce = cub::BlockReduce<state, Block>;
  __shared__ typename reduce::TempStorage tmp;

  const index_t t = blockIdx.x;
  const index_t V = x.extent(1);
  if (static_cast<std::int64_t>(labels(t)) == loss::ignore_index) {  // whole block agrees: no read of either row
    if (threadIdx.x == 0) { kl(t) = A(0); lse(t) = A(0); lse_ref(t) = A(0); }
    return;
  }
  const EX* xrow = x.row(t);
  const ER* rrow = r.row(t);
  state st;
  // Vector sweep, W elements of each row per step. Both maxima are raised first, so each of s_r,
  // w and s_x is rescaled at most once per step (w with s_r: both carry the factor exp(−m_r)), then
  // the step's terms are added with one exp per element and row.
  const index_t nvec = V / W;
  for (index_t i = threadIdx.x; i < nvec; i += Block) {
    const vec<EX, W> xv = reinterpret_cast<const vec<EX, W>*>(xrow)[i];
    const vec<ER, W> rv = reinterpret_cast<const vec<ER, W>*>(rrow)[i];
    Acc xb[W], rb[W];
    Acc xm = st.cur.m, rm = st.ref.m;
#pragma unroll
    for (int k = 0; k < W; ++k) {
      xb[k] = acc_load<Acc>(&xv.v[k]);
      rb[k] = acc_load<Acc>(&rv.v[k]);
      xm = xb[k] > xm ? xb[k] : xm;
      rm = rb[k] > rm ? rb[k] : rm;
    }
    if (rm > st.ref.m) {
      const Acc scale = fast_exp(st.ref.m - rm);
      st.ref.s *= scale;
      st.w *= scale;
      st.ref.m = rm;
    }
    if (xm > st.cur.m) { st.cur.s *= fast_exp(st.cur.m - xm); st.cur.m = xm; }
    Acc sr = Acc(0), sw = Acc(0), sx = Acc(0);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const Acc e = fast_exp(rb[k] - st.ref.m);
      sr += e;
      sw += e != Acc(0) ? e * (rb[k] - xb[k]) : Acc(0);  // p_ref(v) = 0 adds 0 even when r = x = −inf
      sx += fast_exp(xb[k] - st.cur.m);
    }
    st.ref.s += sr;
    st.w += sw;
    st.cur.s += sx;
  }
  for (index_t v = nvec * W + threadIdx.x; v < V; v += Block) st.push(acc_load<Acc>(rrow + v), acc_load<Acc>(xrow + v));

  const state total = reduce(tmp).Reduce(st, kl_merge<Acc>{});
  if (threadIdx.x == 0) {
    kl(t) = static_cast<A>(total.value());
    lse(t) = static_cast<A>(total.cur.value());
    lse_ref(t) = static_cast<A>(total.ref.value());
  }
}

template <int Block, int W, bool Accumulate, class Acc, class T, class R, class L, class A, class G>
__global__ void __launch_bounds__(Block)
token_kl_backward_kernel(tensor_view<T, 2, cuda_space> x, tensor_view<R, 2, cuda_space> r,
                         tensor_view<L, 1, cuda_space> labels, tensor_view<A, 1, cuda_space> lse,
                         tensor_view<A, 1, cuda_space> lse_ref, tensor_view<A, 1, cuda_space> dkl,
                         tensor_view<G, 2, cuda_space> dx) {
  const index_t t = blockIdx.x;
  const index_t V = x.extent(1);
  G* out = dx.row(t);
  if (static_cast<std::int64_t>(labels(t)) == loss::ignore_index) {  // a zero row, or left alone when accumulating
    if constexpr (!Accumulate) write_row_gradient<Block, W, false, Acc>(out, V, [](index_t) { return Acc(0); });
    return;
  }
  const Acc lx = static_cast<Acc>(lse(t)), lr = static_cast<Acc>(lse_ref(t)), g = static_cast<Acc>(dkl(t));
  write_row_gradient<Block, W, Accumulate, Acc>(
      out, V, [&](index_t, Acc xv, Acc rv) { return g * (fast_exp(xv - lx) - fast_exp(rv - lr)); }, x.row(t), r.row(t));
}

}  // namespace detail

}  // namespace grun::cuda

namespace grun::loss::detail {

/// exec::cuda for loss::token_kl_forward / token_kl_backward. The front end has already checked
/// shapes, the accumulate types and the memory space; here: device present, vector path when every
/// row involved is 16-byte aligned (padded rows or offset views take the scalar path).
template <>
struct token_kl_impl<exec::cuda_t> {
  // Views of any space are accepted so that the front end's run-time space check (host view →
  // shape_error) compiles; only cuda_space views ever reach a launch.
  template <class T, class R, class L, class A, memory_space Sp>
  static void forward(const exec::cuda_t& ex, const tensor_view<T, 2, Sp>& logits, const tensor_view<R, 2, Sp>& logits_ref,
                      const tensor_view<L, 1, Sp>& labels, const tensor_view<A, 1, Sp>& kl,
                      const tensor_view<A, 1, Sp>& lse, const tensor_view<A, 1, Sp>& lse_ref) {
    if constexpr (std::is_same_v<Sp, cuda_space>) launch_forward(ex, logits, logits_ref, labels, kl, lse, lse_ref);
    else require_space<cuda_space>(logits, "token_kl_forward: logits");
  }

  template <bool Accumulate, class T, class R, class L, class A, class G, memory_space Sp>
  static void backward(const exec::cuda_t& ex, const tensor_view<T, 2, Sp>& logits,
                       const tensor_view<R, 2, Sp>& logits_ref, const tensor_view<L, 1, Sp>& labels,
                       const tensor_view<A, 1, Sp>& lse, const tensor_view<A, 1, Sp>& lse_ref,
                       const tensor_view<A, 1, Sp>& dkl, const tensor_view<G, 2, Sp>& dlogits) {
    if constexpr (std::is_same_v<Sp, cuda_space>)
      launch_backward<Accumulate>(ex, logits, logits_ref, labels, lse, lse_ref, dkl, dlogits);
    else require_space<cuda_space>(logits, "token_kl_backward: logits");
  }

 private:
  template <class T, class R, class L, class A>
  static void launch_forward(const exec::cuda_t& ex, const tensor_view<T, 2, cuda_space>& logits,
                             const tensor_view<R, 2, cuda_space>& logits_ref, const tensor_view<L, 1, cuda_space>& labels,
                             const tensor_view<A, 1, cuda_space>& kl, const tensor_view<A, 1, cuda_space>& lse,
                             const tensor_view<A, 1, cuda_space>& lse_ref) {
    using EX = std::remove_const_t<T>;
    using ER = std::remove_const_t<R>;
    using Acc = acc_t<EX>;
    constexpr int B = cuda::detail::kl_block;
    const index_t rows = logits.extent(0);
    if (rows == 0) return;
    const tensor_view<const EX, 2, cuda_space> x = logits;
    const tensor_view<const ER, 2, cuda_space> r = logits_ref;
    cuda::detail::launch_per_row<cuda::detail::common_vec_width<EX, ER>>("token_kl_forward", rows, [&](auto width) {
      cuda::detail::token_kl_forward_kernel<B, decltype(width)::value, Acc>
          <<<unsigned(rows), B, 0, cuda::stream_of(ex)>>>(x, r, labels, kl, lse, lse_ref);
    }, x, r);
  }

  template <bool Accumulate, class T, class R, class L, class A, class G>
  static void launch_backward(const exec::cuda_t& ex, const tensor_view<T, 2, cuda_space>& logits,
                              const tensor_view<R, 2, cuda_space>& logits_ref,
                              const tensor_view<L, 1, cuda_space>& labels, const tensor_view<A, 1, cuda_space>& lse,
                              const tensor_view<A, 1, cuda_space>& lse_ref, const tensor_view<A, 1, cuda_space>& dkl,
                              const tensor_view<G, 2, cuda_space>& dlogits) {
    using EX = std::remove_const_t<T>;
    using ER = std::remove_const_t<R>;
    using Acc = acc_t<EX>;
    constexpr int B = cuda::detail::kl_block;
    const index_t rows = logits.extent(0);
    if (rows == 0) return;
    const tensor_view<const EX, 2, cuda_space> x = logits;
    const tensor_view<const ER, 2, cuda_space> r = logits_ref;
    cuda::detail::launch_per_row<cuda::detail::common_vec_width<EX, ER, G>>("token_kl_backward", rows, [&](auto width) {
      cuda::detail::token_kl_backward_kernel<B, decltype(width)::value, Accumulate, Acc>
          <<<unsigned(rows), B, 0, cuda::stream_of(ex)>>>(x, r, labels, lse, lse_ref, dkl, dlogits);
    }, x, r, dlogits);
  }
};

}  // namespace grun::loss::detail
