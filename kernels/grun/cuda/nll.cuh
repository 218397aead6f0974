#pragma once
// grun/cuda/nll.cuh — fused token NLL over the vocabulary on the device, plugged into
// loss::token_nll_forward / token_nll_backward through their executor seam
// (loss::detail::token_nll_impl<exec::cuda_t>), plus per-sequence sums.
//
//   forward  nll_t = lse(x_t) − x_t[y_t]  (written (m − x_t[y_t]) + log s as on the host), lse_t saved
//   backward dx_t[v] = dnll_t · (exp(x_t[v] − lse_t) − [v = y_t])
//
// One block per token row; the vocabulary is tiled in 16-byte vectors across the block. Each thread
// keeps an online (m, s) state — the host's loss::lse_state, same merge — and the block combines
// the states with cub::BlockReduce. Forward reads each logit once, backward reads it once more and
// writes the gradient once (in place allowed): 3 passes over T·V, the minimum with saved lse.
// Row offsets are 64-bit (T·V passes 2^31 at T = 8192, V = 131072).
//
// Labels on the device cannot be checked by the front end without a copy, so the kernels check
// them: a row whose label is neither in [0, V) nor the ignore index is counted (with the first such
// row) and left alone — nll and lse NaN, dlogits untouched — and the call then fails with the host
// path's shape_error. Reading the count back costs each call one 16-byte copy and one stream
// synchronization (~10 µs; the forward at T = 8192, V = 131072 bf16 moves 2 GiB).
#include <cub/block/block_reduce.cuh>

#include <cstdint>
#include <type_traits>

#include "check.cuh"  // first: brings exec::host_t before exec/cuda.hpp needs it
#include "scratch.cuh"

#include <grun/loss/sequence.hpp>
#include <grun/loss/token_nll.hpp>

namespace grun::cuda {

namespace detail {

/// exp on the device. float uses the SFU (ex2.approx, ~2 ulp): the kernel is bandwidth-bound only
/// if exp costs a few instructions; agreement with the host stays well inside rel 1e-5.
template <class Acc> __device__ __forceinline__ Acc fast_exp(Acc x) {
  if constexpr (std::is_same_v<Acc, float>) return __expf(x);
  else return exp(x);
}

/// Storage → accumulate type: the hardware conversion for the 2-byte types, a plain conversion
/// otherwise — double logits stay double (dload's float would round them to 24 bits).
template <class Acc, class T> __device__ __forceinline__ Acc acc_load(const T* p) {
  if constexpr (std::is_same_v<T, half> || std::is_same_v<T, bfloat16>) return static_cast<Acc>(dload(p));
  else return static_cast<Acc>(*p);
}
/// Accumulate type → storage: round-to-nearest-even for the 2-byte types, a plain conversion otherwise.
template <class G, class Acc> __device__ __forceinline__ void acc_store(G* p, Acc v) {
  if constexpr (std::is_same_v<G, half> || std::is_same_v<G, bfloat16>) dstore(p, static_cast<float>(v));
  else *p = static_cast<G>(v);
}

/// Threads per row. 512 × 8 bf16 = 4096 logits per sweep: V = 131072 takes 32 sweeps, enough
/// loads in flight per SM to saturate HBM with 2–4 resident blocks.
inline constexpr int nll_block = 512;

template <class T>
bool vector_ok(const T* p, index_t row_stride, int width) {
  return width > 1 && reinterpret_cast<std::uintptr_t>(p) % 16 == 0 && (row_stride * index_t(sizeof(T))) % 16 == 0;
}

/// Elements per 16-byte vector common to every storage type a kernel streams (the narrowest).
template <class... Ts>
inline constexpr int common_vec_width = [] {
  int w = 16;
  ((w = vec_width<Ts> < w ? vec_width<Ts> : w), ...);
  return w;
}();

/// The launch every one-block-per-row vocabulary kernel shares (token NLL, token KL; forward and
/// backward): a device, a grid that fits, then `launch(std::integral_constant<int, W>{})` — the
/// W-wide vector instantiation — when every row view it streams is 16-byte aligned, or the scalar
/// one (width 1) for padded rows and offset views.
template <int W, class Launch, class... RowViews>
void launch_per_row(const char* op, index_t rows, Launch&& launch, const RowViews&... row_views) {
  require_device(op);
  require<shape_error>(rows <= index_t(INT32_MAX), op, ": expected at most 2^31 − 1 rows, got ", rows);
  if ((vector_ok(row_views.data(), row_views.stride(0), W) && ...))
    launch(std::integral_constant<int, W>{});
  else
    launch(std::integral_constant<int, 1>{});
  GRUN_CUDA_CHECK_LAUNCH();
}

/// The gradient sweep of every vocabulary backward (token NLL, token KL) and of a zeroed row:
///   out[v] = grad(v, a_v, b_v, …)   (+ out[v] when Accumulate)   for v in [0, V)
/// where a, b, … are the rows passed, each element widened to Acc. The block walks W-wide 16-byte
/// vectors (every row and out aligned: launch_per_row's vector path), then the scalar tail. out may
/// alias a row it reads (not with Accumulate): each thread reads its vector of every row before it
/// writes the same vector of out, and no other thread touches it.
template <int Block, int W, bool Accumulate, class Acc, class G, class Grad, class... E>
__device__ __forceinline__ void write_row_gradient(G* out, index_t V, const Grad& grad, const E*... rows) {
  const index_t nvec = V / W;
  for (index_t i = threadIdx.x; i < nvec; i += Block) {
    const auto step = [&](const auto&... loaded) {
      vec<G, W> o;
      if constexpr (Accumulate) o = reinterpret_cast<const vec<G, W>*>(out)[i];
#pragma unroll
      for (int k = 0; k < W; ++k) {
        Acc d = grad(i * W + k, acc_load<Acc>(&loaded.v[k])...);
        if constexpr (Accumulate) d += acc_load<Acc>(&o.v[k]);
        acc_store(&o.v[k], d);
      }
      reinterpret_cast<vec<G, W>*>(out)[i] = o;
    };
    step(reinterpret_cast<const vec<E, W>*>(rows)[i]...);
  }
  for (index_t v = nvec * W + threadIdx.x; v < V; v += Block) {
    Acc d = grad(v, acc_load<Acc>(rows + v)...);
    if constexpr (Accumulate) d += acc_load<Acc>(out + v);
    acc_store(out + v, d);
  }
}

/// Rows whose label is out of the vocabulary: how many, and the first. Both are order-free
/// (a sum and a minimum), so the census is the same whatever order the blocks ran in.
struct label_census {
  unsigned long long first_row;
  unsigned long long bad_rows;
};

__device__ __forceinline__ void record_bad_label(label_census* census, index_t row) {
  atomicAdd(&census->bad_rows, 1ull);
  atomicMin(&census->first_row, static_cast<unsigned long long>(row));
}

/// The census of one launch: a device_report set up before it, read back (and reported with the
/// host path's wording) after it.
class label_check {
 public:
  explicit label_check(cudaStream_t s) : census_(s, label_census{~0ull, 0}) {}
  label_census* device() const noexcept { return census_.device(); }

  template <class L>
  void report(const tensor_view<L, 1, cuda_space>& labels, index_t vocab, const char* op) const {
    const label_census got = census_.read();
    if (got.bad_rows == 0) return;
    const auto row = static_cast<index_t>(got.first_row);
    std::remove_const_t<L> label{};
    GRUN_CUDA_CHECK(cudaMemcpy(&label, labels.data() + row * labels.stride(0), sizeof label, cudaMemcpyDeviceToHost));
    loss::detail::fail_label(op, row, static_cast<std::int64_t>(label), vocab, static_cast<index_t>(got.bad_rows));
  }

 private:
  device_report<label_census> census_;
};

template <class Acc>
struct lse_merge {
  __device__ __forceinline__ loss::lse_state<Acc> operator()(loss::lse_state<Acc> a,
                                                            const loss::lse_state<Acc>& b) const {
    a.merge(b);
    return a;
  }
};

template <int Block, int W, class Acc, class T, class L, class A>
__global__ void __launch_bounds__(Block)
token_nll_forward_kernel(tensor_view<T, 2, cuda_space> x, tensor_view<L, 1, cuda_space> labels,
                         tensor_view<A, 1, cuda_space> nll, tensor_view<A, 1, cuda_space> lse,
                         label_census* census) {
  using E = std::remove_const_t<T>;
  using state = loss::lse_state<Acc>;
  using reduce = cub::BlockReduce<state, Block>;
  __shared__ typename reduce::TempStorage tmp;

  const index_t t = blockIdx.x;
  const index_t V = x.extent(1);
  const auto y = static_cast<index_t>(labels(t));
  if (y == loss::ignore_index) {  // whole block agrees: no read of the row at all
    if (threadIdx.x == 0) { nll(t) = A(0); lse(t) = A(0); }
    return;
  }
  if (y < 0 || y >= V) {  // out of the vocabulary: counted, reported by the host after the launch
    if (threadIdx.x == 0) { nll(t) = A(NAN); lse(t) = A(NAN); record_bad_label(census, t); }
    return;
  }
  const E* row = x.row(t);
  state st;
  // Vector sweep: W elements per 16-byte load, local max first so s is rescaled once per vector.
  const index_t nvec = V / W;
  for (index_t i = threadIdx.x; i < nvec; i += Block) {
    const vec<E, W> v = reinterpret_cast<const vec<E, W>*>(row)[i];
    Acc buf[W];
    Acc bm = st.m;
#pragma unroll
    for (int k = 0; k < W; ++k) { buf[k] = acc_load<Acc>(&v.v[k]); bm = buf[k] > bm ? buf[k] : bm; }
    if (bm > st.m) { st.s *= fast_exp(st.m - bm); st.m = bm; }
    Acc bs = Acc(0);
#pragma unroll
    for (int k = 0; k < W; ++k) bs += fast_exp(buf[k] - st.m);
    st.s += bs;
  }
  for (index_t v = nvec * W + threadIdx.x; v < V; v += Block) st.push(acc_load<Acc>(row + v));

  const state total = reduce(tmp).Reduce(st, lse_merge<Acc>{});
  if (threadIdx.x == 0) {
    const Acc ls = log(total.s);
    lse(t) = static_cast<A>(total.m + ls);
    nll(t) = static_cast<A>((total.m - acc_load<Acc>(row + y)) + ls);
  }
}

template <int Block, int W, bool Accumulate, class Acc, class T, class L, class A, class G>
__global__ void __launch_bounds__(Block)
token_nll_backward_kernel(tensor_view<T, 2, cuda_space> x, tensor_view<L, 1, cuda_space> labels,
                          tensor_view<A, 1, cuda_space> lse, tensor_view<A, 1, cuda_space> dnll,
                          tensor_view<G, 2, cuda_space> dx, label_census* census) {
  const index_t t = blockIdx.x;
  const index_t V = x.extent(1);
  const auto y = static_cast<index_t>(labels(t));
  G* out = dx.row(t);
  if (y == loss::ignore_index) {  // a zero row, or left alone when accumulating
    if constexpr (!Accumulate) write_row_gradient<Block, W, false, Acc>(out, V, [](index_t) { return Acc(0); });
    return;
  }
  if (y < 0 || y >= V) {  // out of the vocabulary: row left untouched, reported after the launch
    if (threadIdx.x == 0) record_bad_label(census, t);
    return;
  }
  const Acc l = static_cast<Acc>(lse(t)), g = static_cast<Acc>(dnll(t));
  write_row_gradient<Block, W, Accumulate, Acc>(
      out, V, [&](index_t v, Acc xv) { return g * (fast_exp(xv - l) - (v == y ? Acc(1) : Acc(0))); }, x.row(t));
}

}  // namespace detail

}  // namespace grun::cuda

namespace grun::loss::detail {

/// exec::cuda for loss::token_nll_forward / token_nll_backward. The front end has already checked
/// shapes and the memory space; here: device present, vector path when rows are 16-byte aligned.
template <>
struct token_nll_impl<exec::cuda_t> {
  // Views of any space are accepted so that the front end's run-time space check (host view →
  // shape_error) compiles; only cuda_space views ever reach a launch.
  template <class T, class L, class A, memory_space Sp>
  static void forward(const exec::cuda_t& ex, const tensor_view<T, 2, Sp>& logits,
                      const tensor_view<L, 1, Sp>& labels, const tensor_view<A, 1, Sp>& nll,
                      const tensor_view<A, 1, Sp>& lse) {
    if constexpr (std::is_same_v<Sp, cuda_space>) launch_forward(ex, logits, labels, nll, lse);
    else require_space<cuda_space>(logits, "token_nll_forward: logits");
  }

  template <bool Accumulate, class T, class L, class A, class G, memory_space Sp>
  static void backward(const exec::cuda_t& ex, const tensor_view<T, 2, Sp>& logits,
                       const tensor_view<L, 1, Sp>& labels, const tensor_view<A, 1, Sp>& lse,
                       const tensor_view<A, 1, Sp>& dnll, const tensor_view<G, 2, Sp>& dlogits) {
    if constexpr (std::is_same_v<Sp, cuda_space>) launch_backward<Accumulate>(ex, logits, labels, lse, dnll, dlogits);
    else require_space<cuda_space>(logits, "token_nll_backward: logits");
  }

 private:
  template <class T, class L, class A>
  static void launch_forward(const exec::cuda_t& ex, const tensor_view<T, 2, cuda_space>& logits,
                             const tensor_view<L, 1, cuda_space>& labels, const tensor_view<A, 1, cuda_space>& nll,
                             const tensor_view<A, 1, cuda_space>& lse) {
    using E = std::remove_const_t<T>;
    using Acc = acc_t<E>;
    constexpr int B = cuda::detail::nll_block;
    const index_t rows = logits.extent(0);
    if (rows == 0) return;
    const tensor_view<const E, 2, cuda_space> x = logits;
    const cuda::detail::label_check labels_ok(cuda::stream_of(ex));
    cuda::detail::launch_per_row<cuda::vec_width<E>>("token_nll_forward", rows, [&](auto width) {
      cuda::detail::token_nll_forward_kernel<B, decltype(width)::value, Acc>
          <<<unsigned(rows), B, 0, cuda::stream_of(ex)>>>(x, labels, nll, lse, labels_ok.device());
    }, x);
    labels_ok.report(labels, logits.extent(1), "token_nll_forward");
  }

  template <bool Accumulate, class T, class L, class A, class G>
  static void launch_backward(const exec::cuda_t& ex, const tensor_view<T, 2, cuda_space>& logits,
                              const tensor_view<L, 1, cuda_space>& labels, const tensor_view<A, 1, cuda_space>& lse,
                              const tensor_view<A, 1, cuda_space>& dnll, const tensor_view<G, 2, cuda_space>& dlogits) {
    using E = std::remove_const_t<T>;
    using Acc = acc_t<E>;
    constexpr int B = cuda::detail::nll_block;
    const index_t rows = logits.extent(0);
    if (rows == 0) return;
    const tensor_view<const E, 2, cuda_space> x = logits;
    const cuda::detail::label_check labels_ok(cuda::stream_of(ex));
    cuda::detail::launch_per_row<cuda::detail::common_vec_width<E, G>>("token_nll_backward", rows, [&](auto width) {
      cuda::detail::token_nll_backward_kernel<B, decltype(width)::value, Accumulate, Acc>
          <<<unsigned(rows), B, 0, cuda::stream_of(ex)>>>(x, labels, lse, dnll, dlogits, labels_ok.device());
    }, x, dlogits);
    labels_ok.report(labels, logits.extent(1), "token_nll_backward");
  }
};

}  // namespace grun::loss::detail

namespace grun::cuda {

namespace detail {
inline constexpr int seq_block = 256;

template <class N, class L, class O, class A, class C>
__global__ void __launch_bounds__(seq_block)
sequence_nll_kernel(tensor_view<N, 1, cuda_space> nll, tensor_view<L, 1, cuda_space> labels,
                    tensor_view<O, 1, cuda_space> offsets, tensor_view<A, 1, cuda_space> seq_nll,
                    tensor_view<C, 1, cuda_space> seq_count) {
  using Acc = std::remove_const_t<A>;
  using reduce_sum = cub::BlockReduce<Acc, seq_block>;
  using reduce_cnt = cub::BlockReduce<long long, seq_block>;
  __shared__ typename reduce_sum::TempStorage tmp_sum;
  __shared__ typename reduce_cnt::TempStorage tmp_cnt;
  const index_t b = blockIdx.x;
  const index_t lo = static_cast<index_t>(offsets(b)), hi = static_cast<index_t>(offsets(b + 1));
  Acc sum = Acc(0);
  long long cnt = 0;
  for (index_t t = lo + threadIdx.x; t < hi; t += seq_block) {
    if (static_cast<std::int64_t>(labels(t)) == loss::ignore_index) continue;
    sum += static_cast<Acc>(nll(t));
    ++cnt;
  }
  // Fixed thread→token assignment and CUB's fixed reduction tree: bitwise repeatable.
  const Acc total = reduce_sum(tmp_sum).Sum(sum);
  const long long n = reduce_cnt(tmp_cnt).Sum(cnt);
  if (threadIdx.x == 0) { seq_nll(b) = total; seq_count(b) = static_cast<std::remove_const_t<C>>(n); }
}

template <class O, class A, class G>
__global__ void sequence_nll_backward_kernel(tensor_view<O, 1, cuda_space> offsets, tensor_view<A, 1, cuda_space> dseq,
                                             tensor_view<G, 1, cuda_space> dtok) {
  const index_t b = blockIdx.x;
  const index_t lo = static_cast<index_t>(offsets(b)), hi = static_cast<index_t>(offsets(b + 1));
  const auto g = dseq(b);
  for (index_t t = lo + threadIdx.x; t < hi; t += blockDim.x) dtok(t) = static_cast<std::remove_const_t<G>>(g);
}
}  // namespace detail

/// Device twin of loss::sequence_nll: NLL_b = Σ_{t∈b, y_t≠−100} nll_t and |y_b| per sequence,
/// one block per sequence, CUB block sums (deterministic). offsets [B+1] live on the device
/// (validate them on the host before copying: loss::require_sequence_offsets).
template <class N, class L, class O, class A, class C>
void sequence_nll(const exec::cuda_t& ex, tensor_view<N, 1, cuda_space> token_nll, tensor_view<L, 1, cuda_space> labels,
                  tensor_view<O, 1, cuda_space> offsets, tensor_view<A, 1, cuda_space> seq_nll,
                  tensor_view<C, 1, cuda_space> seq_count) {
  static_assert(!std::is_const_v<A> && !std::is_const_v<C> && std::is_integral_v<C>,
                "grun::cuda::sequence_nll: seq_nll (floating) and seq_count (integer) are mutable outputs");
  require_extent(labels, 0, token_nll.extent(0), "sequence_nll: labels");
  require<shape_error>(offsets.extent(0) >= 1, "sequence_nll: seq_offsets: expected B+1 >= 1 entries, got shape ",
                       grun::detail::shape_string(offsets));
  const index_t B = offsets.extent(0) - 1;
  require_extent(seq_nll, 0, B, "sequence_nll: seq_nll");
  require_extent(seq_count, 0, B, "sequence_nll: seq_count");
  if (B == 0) return;
  require_device("sequence_nll");
  detail::sequence_nll_kernel<<<unsigned(B), detail::seq_block, 0, stream_of(ex)>>>(token_nll, labels, offsets, seq_nll,
                                                                                     seq_count);
  GRUN_CUDA_CHECK_LAUNCH();
}

/// dtoken_nll[t] = dseq_nll[b] for t in sequence b.
template <class O, class A, class G>
void sequence_nll_backward(const exec::cuda_t& ex, tensor_view<O, 1, cuda_space> offsets,
                           tensor_view<A, 1, cuda_space> dseq_nll, tensor_view<G, 1, cuda_space> dtoken_nll) {
  static_assert(!std::is_const_v<G>, "grun::cuda::sequence_nll_backward: dtoken_nll is an output (mutable view)");
  require<shape_error>(offsets.extent(0) >= 1, "sequence_nll_backward: seq_offsets: expected B+1 >= 1 entries");
  const index_t B = offsets.extent(0) - 1;
  require_extent(dseq_nll, 0, B, "sequence_nll_backward: dseq_nll");
  if (B == 0) return;
  require_device("sequence_nll_backward");
  detail::sequence_nll_backward_kernel<<<unsigned(B), 256, 0, stream_of(ex)>>>(offsets, dseq_nll, dtoken_nll);
  GRUN_CUDA_CHECK_LAUNCH();
}

}  // namespace grun::cuda
