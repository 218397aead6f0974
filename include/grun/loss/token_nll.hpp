#pragma once
// grun/loss/token_nll.hpp — fused per-token negative log-likelihood over the vocabulary.
//
//   nll_t = −log softmax(x_t)[y_t] = lse(x_t) − x_t[y_t],   lse(x) = log Σ_v exp(x_v)
//   ∂nll_t/∂x_t[v] = softmax(x_t)[v] − [v = y_t]
//
// Forward reads each row of logits once: an online log-sum-exp keeps a running maximum m and
// s = Σ exp(x − m), rescaling s whenever m grows (Milakov & Gimelshein 2018, "Online normalizer
// calculation for softmax", arXiv 1805.02867). Nothing of size V is materialized, and since every
// exponent is ≤ 0, logits of ±1e4 or a common offset of +1e4 cannot overflow. The per-token lse is
// saved so backward needs exactly one more read of the logits (and may write dlogits in place).
//
// Labels are int64, −100 (ignore_index, the Hugging Face / PyTorch convention) marks prompt and
// padding tokens: their nll is 0 and their gradient row is 0.
//
// The row functions are GRUN_HD over (pointer, V) so the CUDA kernels reuse the same arithmetic;
// all index arithmetic is index_t (int64): T·V and row strides past 2^31 are fine.
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../core/simd.hpp"
#include "../core/tensor.hpp"
#include "../exec/host.hpp"  // before cuda.hpp, whose executor check names exec::host_t
#include "../exec/cuda.hpp"
#include "detail/parallel.hpp"

namespace grun::loss {

/// Label value that marks a token as not part of any answer (no loss, no gradient).
inline constexpr std::int64_t ignore_index = -100;

/// Most negative finite value of Acc: the online max starts here rather than at −inf, so that
/// `x − m` is never (−inf) − (−inf) = NaN for a logit of −inf (masked vocabulary entries).
template <class Acc>
GRUN_HD constexpr Acc lowest_finite() {
  if constexpr (std::is_same_v<Acc, double>) return -1.7976931348623157e308;
  else return -3.40282347e38f;
}

/// Online log-sum-exp: lse = m + log s, s = Σ exp(x − m) (s ≥ 1 once one element was pushed).
template <class Acc>
struct lse_state {
  Acc m = lowest_finite<Acc>();
  Acc s = Acc(0);

  GRUN_HD GRUN_FORCEINLINE void push(Acc x) {
    if (x > m) { s = s * std::exp(m - x) + Acc(1); m = x; }
    else       { s += std::exp(x - m); }
  }
  /// Combines two partial states (for block / warp reductions on the device).
  GRUN_HD GRUN_FORCEINLINE void merge(const lse_state& o) {
    if (o.m > m) { s = s * std::exp(m - o.m) + o.s; m = o.m; }
    else         { s += o.s * std::exp(o.m - m); }
  }
  GRUN_HD Acc value() const { return m + std::log(s); }
};


/// Online log-sum-exp of one row x[0..n), vectorizable without -ffast-math.
///
/// L = simd::lanes<Acc> independent (m_k, s_k) states, lane k taking elements v ≡ k (mod L). The
/// row is swept in chunks of C = 16·L elements (1 KiB of floats, so the second look hits L1): a
/// first look at the chunk raises each lane's max (compare + select), then each s_k is rescaled
/// once and the chunk adds exp(x − m_k), one exp per element. Every loop is over k < L
/// with constant trip count, so GCC vectorizes it for any x86-64 ISA (simd::exp), and the
/// lanes are merged in a fixed order at the end (lse_state::merge): the result depends only on
/// (x, n), never on threads or chunking. A NaN never raises a max but flows into its lane's sum.
/// The memory is still read once; x − m_k ≤ 0 always, so ±1e4 logits cannot overflow.
template <class Acc, class T>
GRUN_HD lse_state<Acc> row_lse(const T* x, index_t n) {
  constexpr int L = simd::lanes<Acc>;
  constexpr index_t C = 16 * L;
  Acc m[L], s[L];
  for (int k = 0; k < L; ++k) { m[k] = lowest_finite<Acc>(); s[k] = Acc(0); }
  index_t v = 0;
  while (n - v >= L) {
    const index_t len = (n - v) >= C ? C : (n - v) / L * L;
    const T* p = x + v;
    Acc cm[L];
    for (int k = 0; k < L; ++k) cm[k] = m[k];
    for (index_t j = 0; j < len; j += L)
      for (int k = 0; k < L; ++k) { const Acc a = load<Acc>(p[j + k]); cm[k] = a > cm[k] ? a : cm[k]; }
    for (int k = 0; k < L; ++k) { s[k] *= simd::exp<Acc>(m[k] - cm[k]); m[k] = cm[k]; }  // exp(0) = 1 exactly
    for (index_t j = 0; j < len; j += L)
      for (int k = 0; k < L; ++k) s[k] += simd::exp<Acc>(load<Acc>(p[j + k]) - m[k]);
    v += len;
  }
  lse_state<Acc> st;
  st.m = m[0];
  st.s = s[0];
  for (int k = 1; k < L; ++k) st.merge(lse_state<Acc>{m[k], s[k]});
  for (; v < n; ++v) st.push(load<Acc>(x[v]));
  return st;
}

/// nll = lse(x) − x[label], written as (m − x[label]) + log s so a large common offset cancels
/// exactly instead of being added and subtracted. Also returns lse for the backward pass.
template <class Acc, class T>
GRUN_HD Acc row_nll(const T* x, index_t n, index_t label, Acc* lse_out) {
  const lse_state<Acc> st = row_lse<Acc>(x, n);
  *lse_out = st.value();
  return (st.m - load<Acc>(x[label])) + std::log(st.s);
}

/// dx[v] = dnll · (exp(x[v] − lse) − [v = label]); when Accumulate, dx[v] += … instead.
/// Without Accumulate dx may alias x (each x[v] is read before dx[v] is written).
///
/// The sweep writes dnll · exp(x − lse) everywhere (L-wide blocks, vectorizable even when dx == x:
/// element k of a block is read before element k is written, nothing crosses blocks), and the
/// label's entry is redone afterwards from x[label] / dx[label] saved before the sweep — bitwise
/// the same value as the per-element formula.
template <bool Accumulate, class Acc, class T, class G>
GRUN_HD void row_nll_backward(const T* x, index_t n, index_t label, Acc lse, Acc dnll, G* dx) {
  constexpr int L = simd::lanes<Acc>;
  const Acc x_label = load<Acc>(x[label]);
  Acc d_label = Acc(0);
  if constexpr (Accumulate) d_label = load<Acc>(dx[label]);
  index_t v = 0;
  for (; v + L <= n; v += L) {
    Acc g[L];
    for (int k = 0; k < L; ++k) g[k] = dnll * simd::exp<Acc>(load<Acc>(x[v + k]) - lse);
    if constexpr (Accumulate)
      for (int k = 0; k < L; ++k) g[k] += load<Acc>(dx[v + k]);
    for (int k = 0; k < L; ++k) dx[v + k] = store<G>(g[k]);
  }
  for (; v < n; ++v) {
    Acc g = dnll * simd::exp<Acc>(load<Acc>(x[v]) - lse);
    if constexpr (Accumulate) g += load<Acc>(dx[v]);
    dx[v] = store<G>(g);
  }
  Acc g = dnll * (simd::exp<Acc>(x_label - lse) - Acc(1));
  if constexpr (Accumulate) g += d_label;
  dx[label] = store<G>(g);
}

namespace detail {

/// The one wording of a bad label, for host views (found here) and device views (found by the
/// kernel, reported after it): the first bad row, its value and, when known, how many rows are bad.
[[noreturn]] inline void fail_label(const char* op, index_t row, std::int64_t label, index_t vocab, index_t bad_rows = 1) {
  if (bad_rows > 1)
    fail<shape_error>(op, ": labels[", row, "] = ", label, " is outside the vocabulary [0, ", vocab,
                      ") and is not the ignore index ", ignore_index, " (", bad_rows, " labels out of range)");
  fail<shape_error>(op, ": labels[", row, "] = ", label, " is outside the vocabulary [0, ", vocab,
                    ") and is not the ignore index ", ignore_index);
}

template <class L>
void require_labels(const tensor_view<L, 1>& labels, index_t vocab, const char* op) {
  for (index_t t = 0; t < labels.extent(0); ++t) {
    const auto y = static_cast<std::int64_t>(labels(t));
    if (y != ignore_index && (y < 0 || y >= vocab)) fail_label(op, t, y, vocab);
  }
}

/// Dispatch seam: one specialization per executor. kernels/ adds exec::cuda_t under nvcc.
template <class E>
struct token_nll_impl {
  template <class... A>
  static void forward(const A&...) {
    static_assert(always_false_v<E>, "grun: no token_nll_forward for loss::token_nll on this executor "
                                     "(exec::cuda needs kernels/, compiled by nvcc)");
  }
  template <bool Accumulate, class... A>
  static void backward(const A&...) {
    static_assert(always_false_v<E>, "grun: no token_nll_backward for loss::token_nll on this executor "
                                     "(exec::cuda needs kernels/, compiled by nvcc)");
  }
};

template <>
struct token_nll_impl<exec::host_t> {
  template <class T, class L, class A>
  static void forward(const exec::host_t& ex, const tensor_view<T, 2>& logits, const tensor_view<L, 1>& labels,
                      const tensor_view<A, 1>& nll, const tensor_view<A, 1>& lse) {
    const index_t V = logits.extent(1);
    parallel_rows(ex, logits.extent(0), V, [&](index_t t) {
      const auto y = static_cast<index_t>(labels(t));
      if (y == ignore_index) { nll(t) = A(0); lse(t) = A(0); return; }
      A l;
      nll(t) = row_nll<A>(logits.row(t), V, y, &l);  // A is the (mutable) accumulate type
      lse(t) = l;
    });
  }
  template <bool Accumulate, class T, class L, class A, class G>
  static void backward(const exec::host_t& ex, const tensor_view<T, 2>& logits, const tensor_view<L, 1>& labels,
                       const tensor_view<A, 1>& lse, const tensor_view<A, 1>& dnll, const tensor_view<G, 2>& dlogits) {
    const index_t V = logits.extent(1);
    parallel_rows(ex, logits.extent(0), V, [&](index_t t) {
      const auto y = static_cast<index_t>(labels(t));
      G* d = dlogits.row(t);
      if (y == ignore_index) {
        if constexpr (!Accumulate)
          for (index_t v = 0; v < V; ++v) d[v] = store<G>(A(0));
        return;
      }
      using Acc = std::remove_const_t<A>;
      row_nll_backward<Accumulate, Acc>(logits.row(t), V, y, static_cast<Acc>(lse(t)), static_cast<Acc>(dnll(t)), d);
    });
  }
};

template <class T, class L, class A, memory_space Sp>
void check_token_nll(const tensor_view<T, 2, Sp>& logits, const tensor_view<L, 1, Sp>& labels,
                     const tensor_view<A, 1, Sp>& a, const char* a_name, const tensor_view<A, 1, Sp>& b,
                     const char* b_name, const char* op) {
  static_assert(std::is_integral_v<std::remove_const_t<L>>, "grun::loss::token_nll: labels must be integers (int64)");
  static_assert(std::is_same_v<std::remove_const_t<A>, acc_t<std::remove_const_t<T>>>,
                "grun::loss::token_nll: per-token outputs must have the accumulate type acc_t<T> "
                "(float for float/half/bfloat16 logits, double for double)");
  require_rows_contiguous(logits, op);
  const index_t T_ = logits.extent(0);
  require<shape_error>(logits.extent(1) > 0, op, ": logits: expected a vocabulary of at least 1, got shape ",
                       grun::detail::shape_string(logits));
  require_extent(labels, 0, T_, "token_nll: labels");
  require_extent(a, 0, T_, a_name);
  require_extent(b, 0, T_, b_name);
  if constexpr (std::is_same_v<Sp, host_space>) require_labels(labels, logits.extent(1), op);
}

}  // namespace detail

/// Forward: per-token nll [T] (0 where labels == −100) and lse [T] (saved for backward).
///   logits [T, V] rows contiguous (any row stride), storage float/double/half/bfloat16
///   labels [T] integer, in [0, V) or −100 — otherwise shape_error naming the row and value
///          (device views: found by the kernel and reported after it, see grun/cuda/nll.cuh)
///   nll, lse [T] of acc_t<storage>
template <executor E, class T, class L, class A, memory_space Sp>
void token_nll_forward(const E& ex, tensor_view<T, 2, Sp> logits, tensor_view<L, 1, Sp> labels,
                       tensor_view<A, 1, Sp> nll, tensor_view<A, 1, Sp> lse) {
  static_assert(!std::is_const_v<A>, "grun::loss::token_nll_forward: nll and lse are outputs (mutable views)");
  detail::check_token_nll(logits, labels, nll, "token_nll_forward: nll", lse, "token_nll_forward: lse",
                          "token_nll_forward");
  require_space<typename E::memory_space>(logits, "token_nll_forward: logits");
  detail::token_nll_impl<E>::forward(ex, logits, labels, nll, lse);
}

/// Backward: dlogits[t, v] = dnll[t] · (softmax(x_t)[v] − [v = labels[t]]), rows with label −100
/// get 0. One read of the logits per row. dlogits [T, V] (rows contiguous) may be the logits
/// buffer itself (same data and strides) to save memory. With `accumulate`, adds into dlogits
/// instead (then it must not alias the logits).
template <executor E, class T, class L, class A, class A2, class G, memory_space Sp>
void token_nll_backward(const E& ex, tensor_view<T, 2, Sp> logits, tensor_view<L, 1, Sp> labels,
                        tensor_view<A, 1, Sp> lse, tensor_view<A2, 1, Sp> dnll, tensor_view<G, 2, Sp> dlogits,
                        bool accumulate = false) {
  static_assert(!std::is_const_v<G>, "grun::loss::token_nll_backward: dlogits is an output (mutable view)");
  static_assert(std::is_same_v<std::remove_const_t<A>, std::remove_const_t<A2>>,
                "grun::loss::token_nll_backward: lse and dnll must have the same type acc_t<T>");
  using Acc = std::remove_const_t<A>;
  const tensor_view<const Acc, 1, Sp> lse_c = lse, dnll_c = dnll;
  detail::check_token_nll(logits, labels, lse_c, "token_nll_backward: lse", dnll_c, "token_nll_backward: dnll",
                          "token_nll_backward");
  require_rows_contiguous(dlogits, "token_nll_backward: dlogits");
  require_extent(dlogits, 0, logits.extent(0), "token_nll_backward: dlogits");
  require_extent(dlogits, 1, logits.extent(1), "token_nll_backward: dlogits");
  // (An empty dlogits aliases nothing: empty buffers may share a null data pointer.)
  require<shape_error>(!accumulate || dlogits.empty() ||
                           static_cast<const void*>(dlogits.data()) != static_cast<const void*>(logits.data()),
                       "token_nll_backward: accumulate = true needs dlogits separate from logits, got the same buffer");
  require_space<typename E::memory_space>(logits, "token_nll_backward: logits");
  if (accumulate) detail::token_nll_impl<E>::template backward<true>(ex, logits, labels, lse_c, dnll_c, dlogits);
  else detail::token_nll_impl<E>::template backward<false>(ex, logits, labels, lse_c, dnll_c, dlogits);
}

}  // namespace grun::loss
