#pragma once
// grun/loss/kl.hpp — fused per-token KL(p_ref ‖ p_θ) between two logit rows.
//
//   KL_t = Σ_v p_ref(v) (log p_ref(v) − log p_θ(v)),  p = softmax(logits)
//        = Σ_v p_ref(v) (r_v − x_v) − lse(r) + lse(x)
//        = w / s_r − (m_r − m_x) − log s_r + log s_x,    w = Σ_v exp(r_v − m_r)(r_v − x_v)
//   ∂KL_t/∂x_v = p_θ(v) − p_ref(v)
//
// One read of both rows: online log-sum-exps for r and x, and w rescaled together with s_r when
// m_r grows (the same trick as token_nll). Large common offsets cancel inside (r − x) and
// (m_r − m_x) before anything is added to a small number, so logits near 1e4 keep precision.
// The reference model is frozen: no gradient flows to logits_ref.
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "token_nll.hpp"

namespace grun::loss {

template <class Acc>
struct kl_state {
  lse_state<Acc> ref, cur;
  Acc w = Acc(0);

  GRUN_HD GRUN_FORCEINLINE void push(Acc r, Acc x) {
    if (r > ref.m) {
      const Acc scale = std::exp(ref.m - r);
      ref.s = ref.s * scale + Acc(1);
      w = w * scale + (r - x);
      ref.m = r;
    } else {
      const Acc e = std::exp(r - ref.m);
      ref.s += e;
      if (e != Acc(0)) w += e * (r - x);  // p_ref(v) = 0 contributes 0 even when r = x = −inf
    }
    cur.push(x);
  }
  /// Combines two partial states over disjoint parts of a row (block reductions on the device).
  ///
  /// Both w and ref.s are sums scaled by exp(−ref.m): w = Σ exp(r_v − m_r)(r_v − x_v) and
  /// s_r = Σ exp(r_v − m_r). With m = max(m_a, m_b), each side is brought to the common max by
  /// the same factor exp(m_side − m) ≤ 1 before adding:
  ///   s_r = s_a·exp(m_a − m) + s_b·exp(m_b − m),   w = w_a·exp(m_a − m) + w_b·exp(m_b − m)
  /// (one of the two factors is 1, so one exp per merge). cur is an ordinary log-sum-exp merge.
  /// An empty state (m = lowest_finite, s = w = 0) is the identity: its factor is exp(≤ 0) and
  /// 0·factor = 0, never (−inf) − (−inf) or 0·inf, so merges stay NaN-free.
  GRUN_HD GRUN_FORCEINLINE void merge(const kl_state& o) {
    if (o.ref.m > ref.m) {
      const Acc scale = std::exp(ref.m - o.ref.m);
      ref.s = ref.s * scale + o.ref.s;
      w = w * scale + o.w;
      ref.m = o.ref.m;
    } else {
      const Acc scale = std::exp(o.ref.m - ref.m);
      ref.s += o.ref.s * scale;
      w += o.w * scale;
    }
    cur.merge(o.cur);
  }
  GRUN_HD Acc value() const { return w / ref.s - (ref.m - cur.m) - std::log(ref.s) + std::log(cur.s); }
};

/// KL(softmax(r) ‖ softmax(x)) of one row; also returns both log-sum-exps for backward.
template <class Acc, class T, class R>
GRUN_HD Acc row_kl(const T* x, const R* r, index_t n, Acc* lse, Acc* lse_ref) {
  kl_state<Acc> st;
  for (index_t v = 0; v < n; ++v) st.push(load<Acc>(r[v]), load<Acc>(x[v]));
  *lse = st.cur.value();
  *lse_ref = st.ref.value();
  return st.value();
}

/// dx[v] (+)= dkl · (exp(x_v − lse) − exp(r_v − lse_ref)). Without Accumulate, dx may alias x.
template <bool Accumulate, class Acc, class T, class R, class G>
GRUN_HD void row_kl_backward(const T* x, const R* r, index_t n, Acc lse, Acc lse_ref, Acc dkl, G* dx) {
  for (index_t v = 0; v < n; ++v) {
    Acc g = dkl * (std::exp(load<Acc>(x[v]) - lse) - std::exp(load<Acc>(r[v]) - lse_ref));
    if constexpr (Accumulate) g += load<Acc>(dx[v]);
    dx[v] = store<G>(g);
  }
}

namespace detail {

template <class E>
struct token_kl_impl {
  template <class... A>
  static void forward(const A&...) {
    static_assert(always_false_v<E>, "grun: no token_kl_forward for loss::retain_kl on this executor "
                                     "(exec::cuda needs kernels/, compiled by nvcc)");
  }
  template <bool Accumulate, class... A>
  static void backward(const A&...) {
    static_assert(always_false_v<E>, "grun: no token_kl_backward for loss::retain_kl on this executor "
                                     "(exec::cuda needs kernels/, compiled by nvcc)");
  }
};

template <>
struct token_kl_impl<exec::host_t> {
  template <class T, class R, class L, class A>
  static void forward(const exec::host_t& ex, const tensor_view<T, 2>& x, const tensor_view<R, 2>& r,
                      const tensor_view<L, 1>& labels, const tensor_view<A, 1>& kl, const tensor_view<A, 1>& lse,
                      const tensor_view<A, 1>& lse_ref) {
    const index_t V = x.extent(1);
    parallel_rows(ex, x.extent(0), 2 * V, [&](index_t t) {
      if (labels(t) == ignore_index) { kl(t) = A(0); lse(t) = A(0); lse_ref(t) = A(0); return; }
      A a, b;
      kl(t) = row_kl<A>(x.row(t), r.row(t), V, &a, &b);
      lse(t) = a;
      lse_ref(t) = b;
    });
  }
  template <bool Accumulate, class T, class R, class L, class A, class G>
  static void backward(const exec::host_t& ex, const tensor_view<T, 2>& x, const tensor_view<R, 2>& r,
                       const tensor_view<L, 1>& labels, const tensor_view<A, 1>& lse,
                       const tensor_view<A, 1>& lse_ref, const tensor_view<A, 1>& dkl,
                       const tensor_view<G, 2>& dx) {
    using Acc = std::remove_const_t<A>;
    const index_t V = x.extent(1);
    parallel_rows(ex, x.extent(0), 2 * V, [&](index_t t) {
      G* d = dx.row(t);
      if (labels(t) == ignore_index) {
        if constexpr (!Accumulate)
          for (index_t v = 0; v < V; ++v) d[v] = store<G>(Acc(0));
        return;
      }
      row_kl_backward<Accumulate, Acc>(x.row(t), r.row(t), V, static_cast<Acc>(lse(t)),
                                       static_cast<Acc>(lse_ref(t)), static_cast<Acc>(dkl(t)), d);
    });
  }
};

template <class T, class R, class L, memory_space Sp>
void check_token_kl(const tensor_view<T, 2, Sp>& x, const tensor_view<R, 2, Sp>& r,
                    const tensor_view<L, 1, Sp>& labels, const char* op) {
  static_assert(std::is_integral_v<std::remove_const_t<L>>, "grun::loss::token_kl: labels must be integers (int64)");
  static_assert(std::is_same_v<acc_t<std::remove_const_t<T>>, acc_t<std::remove_const_t<R>>>,
                "grun::loss::token_kl: logits and logits_ref must share the accumulate type");
  require_rows_contiguous(x, op);
  require_rows_contiguous(r, op);
  require_extent(r, 0, x.extent(0), "token_kl: logits_ref");
  require_extent(r, 1, x.extent(1), "token_kl: logits_ref");
  require_extent(labels, 0, x.extent(0), "token_kl: labels (the mask: −100 rows are skipped)");
  require<shape_error>(x.extent(1) > 0, op, ": logits: expected a vocabulary of at least 1, got shape ",
                       grun::detail::shape_string(x));
}

}  // namespace detail

/// Per-token KL(p_ref ‖ p_θ) [T] (0 where labels == −100; labels are only a mask here) and the
/// two log-sum-exps [T] saved for backward. logits, logits_ref [T, V] rows contiguous.
template <executor E, class T, class R, class L, class A, memory_space Sp>
void token_kl_forward(const E& ex, tensor_view<T, 2, Sp> logits, tensor_view<R, 2, Sp> logits_ref,
                      tensor_view<L, 1, Sp> labels, tensor_view<A, 1, Sp> kl, tensor_view<A, 1, Sp> lse,
                      tensor_view<A, 1, Sp> lse_ref) {
  static_assert(!std::is_const_v<A> && std::is_same_v<A, acc_t<std::remove_const_t<T>>>,
                "grun::loss::token_kl_forward: kl, lse, lse_ref are mutable views of acc_t<T>");
  detail::check_token_kl(logits, logits_ref, labels, "token_kl_forward");
  require_extent(kl, 0, logits.extent(0), "token_kl_forward: kl");
  require_extent(lse, 0, logits.extent(0), "token_kl_forward: lse");
  require_extent(lse_ref, 0, logits.extent(0), "token_kl_forward: lse_ref");
  require_space<typename E::memory_space>(logits, "token_kl_forward: logits");
  detail::token_kl_impl<E>::forward(ex, logits, logits_ref, labels, kl, lse, lse_ref);
}

/// dlogits[t, v] = dkl[t] · (p_θ(v) − p_ref(v)); rows with label −100 get 0 (or are left alone
/// with `accumulate`). dlogits may alias logits unless `accumulate`.
template <executor E, class T, class R, class L, class A1, class A2, class A3, class G, memory_space Sp>
void token_kl_backward(const E& ex, tensor_view<T, 2, Sp> logits, tensor_view<R, 2, Sp> logits_ref,
                       tensor_view<L, 1, Sp> labels, tensor_view<A1, 1, Sp> lse_in, tensor_view<A2, 1, Sp> lse_ref_in,
                       tensor_view<A3, 1, Sp> dkl_in, tensor_view<G, 2, Sp> dlogits, bool accumulate = false) {
  static_assert(!std::is_const_v<G>, "grun::loss::token_kl_backward: dlogits is an output (mutable view)");
  using A = acc_t<std::remove_const_t<T>>;
  static_assert(std::is_same_v<std::remove_const_t<A1>, A> && std::is_same_v<std::remove_const_t<A2>, A> &&
                    std::is_same_v<std::remove_const_t<A3>, A>,
                "grun::loss::token_kl_backward: lse, lse_ref and dkl must be views of acc_t<T>");
  const tensor_view<const A, 1, Sp> lse = lse_in, lse_ref = lse_ref_in, dkl = dkl_in;
  detail::check_token_kl(logits, logits_ref, labels, "token_kl_backward");
  require_extent(lse, 0, logits.extent(0), "token_kl_backward: lse");
  require_extent(lse_ref, 0, logits.extent(0), "token_kl_backward: lse_ref");
  require_extent(dkl, 0, logits.extent(0), "token_kl_backward: dkl");
  require_rows_contiguous(dlogits, "token_kl_backward: dlogits");
  require_extent(dlogits, 0, logits.extent(0), "token_kl_backward: dlogits");
  require_extent(dlogits, 1, logits.extent(1), "token_kl_backward: dlogits");
  // (An empty dlogits aliases nothing: empty buffers may share a null data pointer.)
  require<shape_error>(!accumulate || dlogits.empty() ||
                           static_cast<const void*>(dlogits.data()) != static_cast<const void*>(logits.data()),
                       "token_kl_backward: accumulate = true needs dlogits separate from logits, got the same buffer");
  require_space<typename E::memory_space>(logits, "token_kl_backward: logits");
  if (accumulate) detail::token_kl_impl<E>::template backward<true>(ex, logits, logits_ref, labels, lse, lse_ref, dkl, dlogits);
  else detail::token_kl_impl<E>::template backward<false>(ex, logits, logits_ref, labels, lse, lse_ref, dkl, dlogits);
}

}  // namespace grun::loss
