#pragma once
// grun/loss/detail/terms.hpp — the executor seams under the unlearning losses.
//
// Every sequence-level loss (ga, npo, simnpo, idk, dpo, retain_nll), the gate losses and the
// token-mean of retain_kl have one shape: a mean over a data-dependent number of items,
//
//   L = (1/D) Σ_i v_i,   D = Σ_i n_i   (n_i = this item's share of the denominator, 0 = skipped),
//
// and the gradient of item i is scaled by weight / D, known only after D is. A policy states its
// per-item math once, as a Term (GRUN_HD, so the device runs the same code):
//
//   using memory_space = …;                      where its views live
//   index_t size() const;                        number of items
//   int invalid(index_t i) const;                0, or k ≥ 1: input field k−1 of item i is malformed
//   index_t denominator(index_t i) const;        n_i
//   Acc apply(index_t i, Acc scale) const;       v_i; adds scale · ∂v_i/∂input into its gradients
//
// reduce_terms runs it in two passes (D, then the items with scale = weight · (1/D)) on the
// executor: exec::host here, exec::cuda in kernels/grun/cuda/losses.cuh (one block, CUB block
// reductions, a fixed item-to-thread assignment: bitwise repeatable). The RMU mean squared error
// (P·d elements, one more seam) and two small utilities (a call-scoped temporary, zeroing a
// gradient view) complete what a policy needs to run unchanged on either executor.
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "../../core/error.hpp"
#include "../../core/tensor.hpp"
#include "../../exec/host.hpp"  // before cuda.hpp, whose executor check names exec::host_t
#include "../../exec/cuda.hpp"
#include "parallel.hpp"

namespace grun::loss::detail {

/// What reduce_terms found: Σ v_i (only when D > 0 and every item is valid), D, and the first
/// malformed item (index and field code) with the number of malformed items.
template <class Acc>
struct term_totals {
  Acc sum = Acc(0);
  index_t denominator = 0;
  index_t invalid_count = 0;
  index_t first_invalid = -1;  // smallest malformed index
  int invalid_field = 0;       // its code (1-based field number)
};

/// Dispatch seam: one specialization per executor; kernels/ adds exec::cuda_t under nvcc.
template <class E>
struct term_reduce_impl {
  template <class Acc, class Term>
  static term_totals<Acc> run(const E&, const Term&, Acc) {
    static_assert(always_false_v<E>, "grun: no sequence/gate loss reduction on this executor "
                                     "(exec::cuda needs kernels/grun/cuda/losses.cuh, compiled by nvcc)");
    return {};
  }
};

template <>
struct term_reduce_impl<exec::host_t> {
  /// Items in index order on the calling thread: B and G are small (sequences, gate values).
  template <class Acc, class Term>
  static term_totals<Acc> run(const exec::host_t&, const Term& term, Acc weight) {
    term_totals<Acc> t;
    const index_t n = term.size();
    for (index_t i = 0; i < n; ++i) {
      if (const int bad = term.invalid(i)) {
        if (t.invalid_count++ == 0) { t.first_invalid = i; t.invalid_field = bad; }
      } else {
        t.denominator += term.denominator(i);
      }
    }
    if (t.invalid_count != 0 || t.denominator == 0) return t;
    const Acc scale = weight * (Acc(1) / static_cast<Acc>(t.denominator));
    for (index_t i = 0; i < n; ++i) t.sum += term.apply(i, scale);
    return t;
  }
};

/// A loss's inputs must live where its executor runs: shape_error (before any allocation or
/// launch) otherwise, so a host tensor handed to exec::cuda is a catchable error, not a fault.
template <executor E, memory_space Sp>
void require_executor_space(const char* policy) {
  if constexpr (!std::is_same_v<Sp, typename E::memory_space>)
    fail<shape_error>("loss::", policy, ": inputs are in ", Sp::name, " memory, but ", E::name, " runs in ",
                      E::memory_space::name, " memory");
}

/// Runs `term` on `ex` (its views must live where ex runs) and reports a malformed item as
/// shape_error naming policy, field and index: "loss::npo: forget.count[2]: expected …".
/// fields[k] names field code k+1 and says what was expected of it.
template <class Acc, executor E, class Term>
term_totals<Acc> reduce_terms(const E& ex, const Term& term, Acc weight, const char* policy,
                              std::initializer_list<const char*> fields, const char* expected) {
  if constexpr (!std::is_same_v<typename Term::memory_space, typename E::memory_space>) {
    require_executor_space<E, typename Term::memory_space>(policy);
    return {};
  } else {
    const term_totals<Acc> t = term_reduce_impl<E>::template run<Acc>(ex, term, weight);
    if (t.invalid_count != 0) {
      const auto k = static_cast<std::size_t>(t.invalid_field - 1);
      fail<shape_error>("loss::", policy, ": ", k < fields.size() ? fields.begin()[k] : "input", "[", t.first_invalid,
                        "]: ", expected, " (", t.invalid_count, " malformed entr", t.invalid_count == 1 ? "y" : "ies",
                        ")");
    }
    return t;
  }
}

/// Σ_i v_i / D, or 0 when there is nothing to average (never 0/0).
template <class Acc>
Acc mean_of(const term_totals<Acc>& t) {
  return t.denominator == 0 ? Acc(0) : t.sum * (Acc(1) / static_cast<Acc>(t.denominator));
}

// ---- mean squared error over [P, d] (rmu, rmu_retain) ---------------------------------------

/// RMU's forget target: c · u_j, the same for every row.
template <class Acc, memory_space Sp>
struct steering_target {
  tensor_view<const Acc, 1, Sp> u;
  Acc c;
  GRUN_HD GRUN_FORCEINLINE Acc operator()(index_t, index_t j) const { return c * u(j); }
};
/// RMU's retain target: the frozen model's hidden state.
template <class T, memory_space Sp>
struct reference_target {
  tensor_view<const T, 2, Sp> h0;
  GRUN_HD GRUN_FORCEINLINE acc_t<T> operator()(index_t p, index_t j) const { return load<acc_t<T>>(h0(p, j)); }
};

/// Seam for (1/(P·d)) Σ (h − target)², adding weight · 2(h − target)/(P·d) into dh (if non-empty).
template <class E>
struct mean_squared_impl {
  template <class... A>
  static void run(const A&...) {
    static_assert(always_false_v<E>, "grun: no mean squared error (loss::rmu, rmu_retain) on this executor "
                                     "(exec::cuda needs kernels/grun/cuda/losses.cuh, compiled by nvcc)");
  }
};

template <>
struct mean_squared_impl<exec::host_t> {
  template <class T, class Target>
  static acc_t<T> run(const exec::host_t& ex, const matrix_view<const T>& h, const matrix_view<T>& dh,
                      acc_t<T> weight, const Target& target) {
    using Acc = acc_t<T>;
    const index_t P = h.extent(0), d = h.extent(1);
    if (P * d == 0) return Acc(0);
    buffer<Acc> rows(P);
    const Acc inv = Acc(1) / static_cast<Acc>(P * d);
    parallel_rows(ex, P, d, [&](index_t p) {
      Acc s = Acc(0);
      for (index_t j = 0; j < d; ++j) {
        const Acc e = load<Acc>(h(p, j)) - target(p, j);
        s += e * e;
        if (!dh.empty()) dh(p, j) = store<T>(load<Acc>(dh(p, j)) + weight * Acc(2) * e * inv);
      }
      rows[p] = s;
    });
    Acc total = Acc(0);
    for (index_t p = 0; p < P; ++p) total += rows[p];  // row order: independent of the thread count
    return total * inv;
  }
};

template <executor E, class T, memory_space Sp, class Target>
acc_t<T> mean_squared(const E& ex, const tensor_view<const T, 2, Sp>& h, const tensor_view<T, 2, Sp>& dh,
                      acc_t<T> weight, const Target& target, const char* policy) {
  if constexpr (!std::is_same_v<Sp, typename E::memory_space>) {
    require_executor_space<E, Sp>(policy);
    return acc_t<T>(0);
  } else {
    return mean_squared_impl<E>::run(ex, h, dh, weight, target);
  }
}

// ---- small executor utilities ----------------------------------------------------------------

/// Call-scoped temporary of n accumulators where E runs (host: buffer<Acc>; device: stream-ordered).
template <class E>
struct temporary_impl {
  template <class Acc>
  static buffer<Acc> make(const E&, index_t) {
    static_assert(always_false_v<E>, "grun: no temporaries on this executor "
                                     "(exec::cuda needs kernels/grun/cuda/losses.cuh, compiled by nvcc)");
    return buffer<Acc>();
  }
};
template <>
struct temporary_impl<exec::host_t> {
  template <class Acc>
  static buffer<Acc> make(const exec::host_t&, index_t n) { return buffer<Acc>(n); }
};

/// Sets every element of a (possibly empty) gradient view to zero where E runs.
template <class E>
struct zero_impl {
  template <class V>
  static void run(const E&, const V&) {
    static_assert(always_false_v<E>, "grun: no zeroing on this executor "
                                     "(exec::cuda needs kernels/grun/cuda/losses.cuh, compiled by nvcc)");
  }
};
template <>
struct zero_impl<exec::host_t> {
  template <class V>
  static void run(const exec::host_t&, const V& v) {
    using El = typename V::element_type;
    if constexpr (V::rank == 1) {
      for (index_t i = 0; i < v.extent(0); ++i) v(i) = store<El>(acc_t<El>(0));
    } else {
      for (index_t i = 0; i < v.extent(0); ++i)
        for (index_t j = 0; j < v.extent(1); ++j) v(i, j) = store<El>(acc_t<El>(0));
    }
  }
};

template <executor E, class V>
void zero_view(const E& ex, const V& v, const char* what) {
  if (v.empty()) return;
  require_space<typename E::memory_space>(v, what);
  if constexpr (std::is_same_v<typename V::memory_space, typename E::memory_space>) zero_impl<E>::run(ex, v);
}

}  // namespace grun::loss::detail
