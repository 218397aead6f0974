#pragma once
// grun/loss/unlearn.hpp — the unlearning losses GRUN enhances, as loss_policy types.
//
// Notation: NLL_b = Σ_{t∈b} −log π(y_t | x, y_<t) summed over the answer tokens of sequence b
// (sequence_nll), |y_b| its answer length, log π(y_b|x_b) = −NLL_b. A sequence with |y_b| = 0 has
// nothing to unlearn or retain: every loss skips it, and a batch with no answer token at all gives
// L = 0 and a zero gradient (never 0/0).
//
// Forget slot                              Retain slot              Gate slot
//   ga, npo, simnpo, idk, dpo, rmu           retain_nll, retain_kl,   gate_bce, gate_bce_logits
//                                            rmu_retain               (none fits any slot)
//
// Sequence-level terms are O(B) and run on the host for every executor; token- and
// representation-level terms (retain_kl, rmu, rmu_retain) dispatch on the executor.
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "concepts.hpp"
#include "detail/parallel.hpp"
#include "kl.hpp"
#include "token_nll.hpp"

namespace grun::loss {

/// How an NLL term averages over a batch (ga, idk, retain_nll).
///   token_mean:    Σ_b NLL_b / Σ_b |y_b| — the mean token cross-entropy of the batch, what a
///                  Hugging Face causal-LM returns as `loss` and what the TOFU / GRUN reference
///                  trainers differentiate for GA, GradDiff, IDK and the retain NLL (default).
///   sequence_mean: mean over sequences (|y_b| > 0) of NLL_b, the summed form DESIGN.md writes.
enum class nll_reduction { token_mean, sequence_mean };

namespace detail {

template <class V>
void require_per_sequence(const V& v, index_t B, const char* policy, const char* field) {
  require<shape_error>(v.extent(0) == B, "loss::", policy, ": ", field, ": expected extent ", B,
                       " (one per sequence, as in the side's nll/count), got ", v.extent(0),
                       v.extent(0) == 0 ? " (empty: the trainer must provide it for this policy)" : "");
}
template <class V>
void require_grad_or_empty(const V& g, index_t n, const char* policy, const char* field) {
  require<shape_error>(g.empty() || g.extent(0) == n, "loss::", policy, ": gradient ", field,
                       ": expected extent ", n, " or an empty view (no gradient), got ", g.extent(0));
}
template <class C>
void require_counts(const C& count, const char* policy, const char* field) {
  for (index_t b = 0; b < count.extent(0); ++b)
    require<shape_error>(count(b) >= 0, "loss::", policy, ": ", field, "[", b, "]: expected an answer length >= 0, got ",
                         count(b));
}
inline void require_positive(double x, const char* policy, const char* knob) {
  require<numeric_error>(std::isfinite(x) && x > 0, "loss::", policy, ": ", knob, ": expected a finite value > 0, got ", x);
}

/// Mean NLL of one side's answers; adds dscale · ∂mean/∂NLL_b into dnll (if non-empty).
template <class Acc>
Acc nll_mean(nll_reduction r, const vector_view<const Acc>& nll, const vector_view<const index_t>& count,
             const vector_view<Acc>& dnll, Acc dscale, const char* policy, const char* nll_field,
             const char* count_field) {
  const index_t B = nll.extent(0);
  require_per_sequence(count, B, policy, count_field);
  require_counts(count, policy, count_field);
  require_grad_or_empty(dnll, B, policy, nll_field);
  index_t denom = 0;
  for (index_t b = 0; b < B; ++b)
    if (count(b) > 0) denom += r == nll_reduction::token_mean ? count(b) : 1;
  if (denom == 0) return Acc(0);
  Acc sum = Acc(0);
  for (index_t b = 0; b < B; ++b)
    if (count(b) > 0) sum += nll(b);
  if (!dnll.empty()) {
    const Acc d = dscale / static_cast<Acc>(denom);
    for (index_t b = 0; b < B; ++b)
      if (count(b) > 0) dnll(b) += d;
  }
  return sum / static_cast<Acc>(denom);
}

/// −(2/β)·logσ(z) and its derivative −(2/β)·σ(−z): the shared core of NPO, SimNPO and DPO.
/// (d/dz logσ(z) = σ(−z).) At z = 0 the derivative is −1/β, so a term's first step moves
/// NLL like gradient ascent does (the reason for the 2/β scale in the NPO paper).
template <class Acc>
GRUN_HD GRUN_FORCEINLINE Acc neg_log_sigmoid_scaled(Acc z, Acc beta, Acc* dz) {
  *dz = -(Acc(2) / beta) * sigmoid(-z);
  return -(Acc(2) / beta) * log_sigmoid(z);
}

template <class T>
void zero_grad_view(const T& v) {
  using E = typename T::element_type;
  if constexpr (T::rank == 1) {
    for (index_t i = 0; i < v.extent(0); ++i) v(i) = store<E>(acc_t<E>(0));
  } else {
    for (index_t i = 0; i < v.extent(0); ++i)
      for (index_t j = 0; j < v.extent(1); ++j) v(i, j) = store<E>(acc_t<E>(0));
  }
}

/// (1/(P·d)) Σ (h − target)² with target(p, j) given by a callable; adds weight · 2(h − target)/(P·d).
template <class T, class Target>
acc_t<T> mean_squared(const exec::host_t& ex, const matrix_view<const T>& h, const matrix_view<T>& dh,
                      acc_t<T> weight, Target target) {
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

template <class T>
void require_hidden(const matrix_view<const T>& h, const matrix_view<T>& dh, const char* policy) {
  require<shape_error>(dh.empty() || (dh.extent(0) == h.extent(0) && dh.extent(1) == h.extent(1)), "loss::", policy,
                       ": gradient hidden: expected shape ", grun::detail::shape_string(h),
                       " or an empty view, got ", grun::detail::shape_string(dh));
}

}  // namespace detail

// ---- forget losses ---------------------------------------------------------------------------

/// Gradient ascent: L = −mean NLL_forget (reduction: token_mean by default, see nll_reduction).
/// Minimizing L raises the forget NLL without bound — hence GradDiff/NPO.
struct ga {
  static constexpr const char* name = "ga";
  static constexpr loss_role slot = loss_role::forget;
  static constexpr bool needs_nll = true, needs_reference = false, needs_refusal = false, needs_hidden = false,
                        needs_logits = false, needs_gates = false;
  nll_reduction reduction = nll_reduction::token_mean;

  template <executor E, class T>
  acc_t<T> evaluate(const E&, const inputs<T>& in, const grads<T>& g, acc_t<T> weight) const {
    return -detail::nll_mean(reduction, in.forget.nll, in.forget.count, g.forget.nll, -weight, name, "forget.nll",
                             "forget.count");
  }
};

/// Negative Preference Optimization (Zhang et al. 2024, arXiv 2404.05868, eq. 3):
///   L = −(2/β) · mean_b logσ(−β · log(π_θ(y_b|x_b) / π_ref(y_b|x_b)))
///     = −(2/β) · mean_b logσ(β · (NLL_θ,b − NLL_ref,b))          since log π = −NLL,
/// which is DESIGN.md's formula exactly. Sign check: ∂L/∂NLL_θ,b = −(2/B)·σ(−β(NLL_θ,b − NLL_ref,b)) < 0,
/// so a descent step raises the forget NLL, and the push fades (σ(−z) → 0) once NLL_θ ≫ NLL_ref —
/// NPO's bounded alternative to GA. At θ = ref the gradient is −1/B per sequence: GA's, summed form.
/// Mean over sequences with |y_b| > 0. ref = the frozen model without the intervention.
struct npo {
  static constexpr const char* name = "npo";
  static constexpr loss_role slot = loss_role::forget;
  static constexpr bool needs_nll = true, needs_reference = true, needs_refusal = false, needs_hidden = false,
                        needs_logits = false, needs_gates = false;
  double beta = 0.1;

  template <executor E, class T>
  acc_t<T> evaluate(const E&, const inputs<T>& in, const grads<T>& g, acc_t<T> weight) const {
    using Acc = acc_t<T>;
    detail::require_positive(beta, name, "beta");
    const auto& f = in.forget;
    const index_t B = f.nll.extent(0);
    detail::require_per_sequence(f.count, B, name, "forget.count");
    detail::require_per_sequence(f.nll_ref, B, name, "forget.nll_ref");
    detail::require_counts(f.count, name, "forget.count");
    detail::require_grad_or_empty(g.forget.nll, B, name, "forget.nll");
    index_t n = 0;
    for (index_t b = 0; b < B; ++b) n += f.count(b) > 0;
    if (n == 0) return Acc(0);
    const Acc be = static_cast<Acc>(beta), inv = Acc(1) / static_cast<Acc>(n);
    Acc sum = Acc(0);
    for (index_t b = 0; b < B; ++b) {
      if (f.count(b) == 0) continue;
      Acc dz;
      sum += detail::neg_log_sigmoid_scaled(be * (f.nll(b) - f.nll_ref(b)), be, &dz);
      if (!g.forget.nll.empty()) g.forget.nll(b) += weight * inv * dz * be;
    }
    return sum * inv;
  }
};

/// SimNPO (Fan et al. 2024, arXiv 2410.07163, eq. 4): reference-free, length-normalized NPO
///   L = −(2/β) · mean_b logσ(−(β/|y_b|) · log π_θ(y_b|x_b) − γ) = −(2/β) · mean_b logσ(β·NLL_b/|y_b| − γ),
/// DESIGN.md's formula. ∂L/∂NLL_b = −(2/B)·σ(−z_b)/|y_b| < 0: descent raises the forget NLL.
/// β, γ are tuned per task in the paper; defaults here β = 0.1 (as NPO), γ = 0.
struct simnpo {
  static constexpr const char* name = "simnpo";
  static constexpr loss_role slot = loss_role::forget;
  static constexpr bool needs_nll = true, needs_reference = false, needs_refusal = false, needs_hidden = false,
                        needs_logits = false, needs_gates = false;
  double beta = 0.1;
  double gamma = 0.0;

  template <executor E, class T>
  acc_t<T> evaluate(const E&, const inputs<T>& in, const grads<T>& g, acc_t<T> weight) const {
    using Acc = acc_t<T>;
    detail::require_positive(beta, name, "beta");
    require<numeric_error>(std::isfinite(gamma), "loss::simnpo: gamma: expected a finite value, got ", gamma);
    const auto& f = in.forget;
    const index_t B = f.nll.extent(0);
    detail::require_per_sequence(f.count, B, name, "forget.count");
    detail::require_counts(f.count, name, "forget.count");
    detail::require_grad_or_empty(g.forget.nll, B, name, "forget.nll");
    index_t n = 0;
    for (index_t b = 0; b < B; ++b) n += f.count(b) > 0;
    if (n == 0) return Acc(0);
    const Acc be = static_cast<Acc>(beta), ga_ = static_cast<Acc>(gamma), inv = Acc(1) / static_cast<Acc>(n);
    Acc sum = Acc(0);
    for (index_t b = 0; b < B; ++b) {
      if (f.count(b) == 0) continue;
      const Acc len = static_cast<Acc>(f.count(b));
      Acc dz;
      sum += detail::neg_log_sigmoid_scaled(be * f.nll(b) / len - ga_, be, &dz);
      if (!g.forget.nll.empty()) g.forget.nll(b) += weight * inv * dz * be / len;
    }
    return sum * inv;
  }
};

/// IDK (TOFU, Maini et al. 2024, arXiv 2401.06121): fine-tune toward a refusal answer,
///   L = mean NLL_θ(refusal_b | x_b), on the forget questions (refusal_* fields of the forget side).
struct idk {
  static constexpr const char* name = "idk";
  static constexpr loss_role slot = loss_role::forget;
  static constexpr bool needs_nll = false, needs_reference = false, needs_refusal = true, needs_hidden = false,
                        needs_logits = false, needs_gates = false;
  nll_reduction reduction = nll_reduction::token_mean;

  template <executor E, class T>
  acc_t<T> evaluate(const E&, const inputs<T>& in, const grads<T>& g, acc_t<T> weight) const {
    return detail::nll_mean(reduction, in.forget.refusal_nll, in.forget.refusal_count, g.forget.refusal_nll, weight,
                            name, "forget.refusal_nll", "forget.refusal_count");
  }
};

/// DPO (Rafailov et al. 2023, arXiv 2305.18290) used for unlearning as in the NPO paper / TOFU:
/// preferred y_w = refusal answer, rejected y_l = the forget answer, reference frozen.
///   h_b = β·[(log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l))]
///       = β·[(NLL_θ(y_l) − NLL_ref(y_l)) − (NLL_θ(y_w) − NLL_ref(y_w))]
///   L = −(2/β) · mean_b logσ(h_b)
/// The constant is 2/β (not DPO's 1): the same scale as NPO, so at θ = ref the gradient is ±1/B
/// per sequence — ascent on the forget answer, descent on the refusal — and loss weights carry
/// over between NPO and DPO runs. ∂L/∂NLL_θ(y_l) = −(2/B)σ(−h_b) < 0 raises the forget NLL.
/// Mean over sequences where both answers have tokens.
struct dpo {
  static constexpr const char* name = "dpo";
  static constexpr loss_role slot = loss_role::forget;
  static constexpr bool needs_nll = true, needs_reference = true, needs_refusal = true, needs_hidden = false,
                        needs_logits = false, needs_gates = false;
  double beta = 0.1;

  template <executor E, class T>
  acc_t<T> evaluate(const E&, const inputs<T>& in, const grads<T>& g, acc_t<T> weight) const {
    using Acc = acc_t<T>;
    detail::require_positive(beta, name, "beta");
    const auto& f = in.forget;
    const index_t B = f.nll.extent(0);
    detail::require_per_sequence(f.count, B, name, "forget.count");
    detail::require_per_sequence(f.nll_ref, B, name, "forget.nll_ref");
    detail::require_per_sequence(f.refusal_nll, B, name, "forget.refusal_nll");
    detail::require_per_sequence(f.refusal_nll_ref, B, name, "forget.refusal_nll_ref");
    detail::require_per_sequence(f.refusal_count, B, name, "forget.refusal_count");
    detail::require_counts(f.count, name, "forget.count");
    detail::require_counts(f.refusal_count, name, "forget.refusal_count");
    detail::require_grad_or_empty(g.forget.nll, B, name, "forget.nll");
    detail::require_grad_or_empty(g.forget.refusal_nll, B, name, "forget.refusal_nll");
    index_t n = 0;
    for (index_t b = 0; b < B; ++b) n += f.count(b) > 0 && f.refusal_count(b) > 0;
    if (n == 0) return Acc(0);
    const Acc be = static_cast<Acc>(beta), inv = Acc(1) / static_cast<Acc>(n);
    Acc sum = Acc(0);
    for (index_t b = 0; b < B; ++b) {
      if (f.count(b) == 0 || f.refusal_count(b) == 0) continue;
      const Acc h = be * ((f.nll(b) - f.nll_ref(b)) - (f.refusal_nll(b) - f.refusal_nll_ref(b)));
      Acc dh;
      sum += detail::neg_log_sigmoid_scaled(h, be, &dh);
      if (!g.forget.nll.empty()) g.forget.nll(b) += weight * inv * dh * be;
      if (!g.forget.refusal_nll.empty()) g.forget.refusal_nll(b) -= weight * inv * dh * be;
    }
    return sum * inv;
  }
};

/// RMU (Li et al. 2024, "The WMDP Benchmark", arXiv 2403.03218, eq. 1), forget term:
///   L = (1/(P·d)) Σ_p ‖h_p − c·u‖²   on forget rows at the chosen layer,
/// mean over all P·d elements (the reference implementation's mse_loss). u = a fixed random unit
/// vector (rmu_direction), c the steering coefficient — model dependent, tuned per model in WMDP.
struct rmu {
  static constexpr const char* name = "rmu";
  static constexpr loss_role slot = loss_role::forget;
  static constexpr bool needs_nll = false, needs_reference = false, needs_refusal = false, needs_hidden = true,
                        needs_logits = false, needs_gates = false;
  double c = 20.0;

  template <executor E, class T>
  acc_t<T> evaluate(const E& ex, const inputs<T>& in, const grads<T>& g, acc_t<T> weight) const {
    static_assert(std::is_same_v<E, exec::host_t>, "grun: no evaluate for loss::rmu on this executor");
    using Acc = acc_t<T>;
    require<numeric_error>(std::isfinite(c), "loss::rmu: c: expected a finite steering coefficient, got ", c);
    const auto& h = in.forget.hidden;
    require_extent(in.forget.direction, 0, h.extent(1), "loss::rmu: forget.direction (u, one per hidden column)");
    detail::require_hidden(h, g.forget.hidden, name);
    const Acc cc = static_cast<Acc>(c);
    const auto& u = in.forget.direction;
    return detail::mean_squared(ex, h, g.forget.hidden, weight, [&](index_t, index_t j) { return cc * u(j); });
  }
};

/// RMU's control direction: u_j ~ U[0, 1) i.i.d., then u / ‖u‖ (as in the WMDP reference code),
/// drawn from splitmix64 so the same seed gives the same u on every platform.
template <class Acc = float>
buffer<Acc> rmu_direction(index_t d, std::uint64_t seed) {
  require<shape_error>(d > 0, "rmu_direction: expected a hidden size d > 0, got ", d);
  buffer<Acc> u(d);
  std::uint64_t s = seed;
  double norm2 = 0;
  std::vector<double> tmp(static_cast<std::size_t>(d));
  for (index_t j = 0; j < d; ++j) {
    std::uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    tmp[static_cast<std::size_t>(j)] = static_cast<double>(z >> 11) * 0x1p-53;
    norm2 += tmp[static_cast<std::size_t>(j)] * tmp[static_cast<std::size_t>(j)];
  }
  const double inv = norm2 > 0 ? 1.0 / std::sqrt(norm2) : 0.0;
  for (index_t j = 0; j < d; ++j) u[j] = static_cast<Acc>(tmp[static_cast<std::size_t>(j)] * inv);
  return u;
}

// ---- retain losses ---------------------------------------------------------------------------

/// L = mean NLL_θ on retain answers (GradDiff's retain term; the retain term of GRUN's NPO/IDK runs).
struct retain_nll {
  static constexpr const char* name = "retain_nll";
  static constexpr loss_role slot = loss_role::retain;
  static constexpr bool needs_nll = true, needs_reference = false, needs_refusal = false, needs_hidden = false,
                        needs_logits = false, needs_gates = false;
  nll_reduction reduction = nll_reduction::token_mean;

  template <executor E, class T>
  acc_t<T> evaluate(const E&, const inputs<T>& in, const grads<T>& g, acc_t<T> weight) const {
    return detail::nll_mean(reduction, in.retain.nll, in.retain.count, g.retain.nll, weight, name, "retain.nll",
                            "retain.count");
  }
};

/// L = mean over retain answer tokens (labels ≠ −100) of KL(p_ref ‖ p_θ) — kl.hpp, fused and stable.
/// Gradient goes to retain.logits (θ); the reference logits are frozen.
struct retain_kl {
  static constexpr const char* name = "retain_kl";
  static constexpr loss_role slot = loss_role::retain;
  static constexpr bool needs_nll = false, needs_reference = true, needs_refusal = false, needs_hidden = false,
                        needs_logits = true, needs_gates = false;

  template <executor E, class T>
  acc_t<T> evaluate(const E& ex, const inputs<T>& in, const grads<T>& g, acc_t<T> weight) const {
    using Acc = acc_t<T>;
    const auto& r = in.retain;
    const index_t Tn = r.logits.extent(0);
    require_extent(r.labels, 0, Tn, "loss::retain_kl: retain.labels");
    require<shape_error>(r.logits_ref.extent(0) == Tn && r.logits_ref.extent(1) == r.logits.extent(1),
                         "loss::retain_kl: retain.logits_ref: expected the shape of retain.logits ",
                         grun::detail::shape_string(r.logits), ", got ", grun::detail::shape_string(r.logits_ref));
    index_t n = 0;
    for (index_t t = 0; t < Tn; ++t) n += r.labels(t) != ignore_index;
    if (!g.retain.logits.empty()) {
      require_extent(g.retain.logits, 0, Tn, "loss::retain_kl: gradient retain.logits");
      require_extent(g.retain.logits, 1, r.logits.extent(1), "loss::retain_kl: gradient retain.logits");
    }
    if (n == 0) return Acc(0);
    buffer<Acc> kl(Tn), lse(Tn), lse_ref(Tn), dkl(Tn);
    token_kl_forward(ex, r.logits, r.logits_ref, r.labels, kl.view(), lse.view(), lse_ref.view());
    Acc sum = Acc(0);
    for (index_t t = 0; t < Tn; ++t) sum += kl[t];  // ignored rows hold 0
    const Acc inv = Acc(1) / static_cast<Acc>(n);
    if (!g.retain.logits.empty()) {
      for (index_t t = 0; t < Tn; ++t) dkl[t] = weight * inv;
      token_kl_backward(ex, r.logits, r.logits_ref, r.labels, lse.view(), lse_ref.view(), dkl.view(), g.retain.logits,
                        /*accumulate=*/true);
    }
    return sum * inv;
  }
};

/// RMU's retain term: L = (1/(P·d)) Σ ‖h_p − h_ref,p‖² on retain rows (frozen model's hidden states).
struct rmu_retain {
  static constexpr const char* name = "rmu_retain";
  static constexpr loss_role slot = loss_role::retain;
  static constexpr bool needs_nll = false, needs_reference = true, needs_refusal = false, needs_hidden = true,
                        needs_logits = false, needs_gates = false;

  template <executor E, class T>
  acc_t<T> evaluate(const E& ex, const inputs<T>& in, const grads<T>& g, acc_t<T> weight) const {
    static_assert(std::is_same_v<E, exec::host_t>, "grun: no evaluate for loss::rmu_retain on this executor");
    using Acc = acc_t<T>;
    const auto& h = in.retain.hidden;
    const auto& h0 = in.retain.hidden_ref;
    require<shape_error>(h0.extent(0) == h.extent(0) && h0.extent(1) == h.extent(1),
                         "loss::rmu_retain: retain.hidden_ref: expected the shape of retain.hidden ",
                         grun::detail::shape_string(h), ", got ", grun::detail::shape_string(h0));
    detail::require_hidden(h, g.retain.hidden, name);
    return detail::mean_squared(ex, h, g.retain.hidden, weight,
                                [&](index_t p, index_t j) { return load<Acc>(h0(p, j)); });
  }
};

// ---- gate losses -----------------------------------------------------------------------------

/// GRUN's gate loss (Ren et al. 2025, arXiv 2502.17823, §3): binary cross-entropy of every gate
/// output against 1 on forget rows and 0 on retain rows, mean over all G_f + G_r gate values:
///   L = (1/(G_f+G_r)) [Σ_forget −log max(g, ε) + Σ_retain −log max(1 − g, ε)]
/// From gate values, g is clamped at ε so a saturated gate gives a finite loss. The gradient is
/// the unclamped one evaluated at the clamped value, −1/max(g, ε) and 1/max(1 − g, ε): equal to the
/// exact derivative wherever ε is not active, and still pushing (at most 1/ε) on a gate saturated
/// on the wrong side instead of dying there. Prefer gate_bce_logits when the gate exposes z.
struct gate_bce {
  static constexpr const char* name = "gate_bce";
  static constexpr loss_role slot = loss_role::gate;
  static constexpr bool needs_nll = false, needs_reference = false, needs_refusal = false, needs_hidden = false,
                        needs_logits = false, needs_gates = true;
  double eps = 1e-6;

  template <executor E, class T>
  acc_t<T> evaluate(const E&, const inputs<T>& in, const grads<T>& g, acc_t<T> weight) const {
    using Acc = acc_t<T>;
    require<numeric_error>(eps > 0 && eps < 0.5, "loss::gate_bce: eps: expected 0 < eps < 0.5, got ", eps);
    const auto& gf = in.forget.gate;
    const auto& gr = in.retain.gate;
    detail::require_grad_or_empty(g.forget.gate, gf.extent(0), name, "forget.gate");
    detail::require_grad_or_empty(g.retain.gate, gr.extent(0), name, "retain.gate");
    const index_t n = gf.extent(0) + gr.extent(0);
    if (n == 0) return Acc(0);
    const Acc e = static_cast<Acc>(eps), inv = Acc(1) / static_cast<Acc>(n);
    Acc sum = Acc(0);
    for (index_t i = 0; i < gf.extent(0); ++i) {
      const Acc p = gf(i) > e ? gf(i) : e;
      sum -= std::log(p);
      if (!g.forget.gate.empty()) g.forget.gate(i) -= weight * inv / p;
    }
    for (index_t i = 0; i < gr.extent(0); ++i) {
      const Acc q = Acc(1) - gr(i) > e ? Acc(1) - gr(i) : e;
      sum -= std::log(q);
      if (!g.retain.gate.empty()) g.retain.gate(i) += weight * inv / q;
    }
    return sum * inv;
  }
};

/// The same BCE from gate logits z (g = σ(z)), exact and stable for any z:
///   −log σ(z) = softplus(−z) on forget rows, −log(1 − σ(z)) = softplus(z) on retain rows,
///   ∂/∂z = σ(z) − y. Mean over all gate values.
struct gate_bce_logits {
  static constexpr const char* name = "gate_bce_logits";
  static constexpr loss_role slot = loss_role::gate;
  static constexpr bool needs_nll = false, needs_reference = false, needs_refusal = false, needs_hidden = false,
                        needs_logits = false, needs_gates = true;

  template <executor E, class T>
  acc_t<T> evaluate(const E&, const inputs<T>& in, const grads<T>& g, acc_t<T> weight) const {
    using Acc = acc_t<T>;
    const auto& zf = in.forget.gate_logit;
    const auto& zr = in.retain.gate_logit;
    detail::require_grad_or_empty(g.forget.gate_logit, zf.extent(0), name, "forget.gate_logit");
    detail::require_grad_or_empty(g.retain.gate_logit, zr.extent(0), name, "retain.gate_logit");
    const index_t n = zf.extent(0) + zr.extent(0);
    if (n == 0) return Acc(0);
    const Acc inv = Acc(1) / static_cast<Acc>(n);
    Acc sum = Acc(0);
    for (index_t i = 0; i < zf.extent(0); ++i) {
      sum -= log_sigmoid(zf(i));
      if (!g.forget.gate_logit.empty()) g.forget.gate_logit(i) += weight * inv * (sigmoid(zf(i)) - Acc(1));
    }
    for (index_t i = 0; i < zr.extent(0); ++i) {
      sum -= log_sigmoid(-zr(i));
      if (!g.retain.gate_logit.empty()) g.retain.gate_logit(i) += weight * inv * sigmoid(zr(i));
    }
    return sum * inv;
  }
};

// ---- nothing -----------------------------------------------------------------------------------

/// L ≡ 0 in any slot: no retain term, or no gate term (an ungated gate::always ablation).
struct none {
  static constexpr const char* name = "none";
  static constexpr loss_role slot = loss_role::any;
  static constexpr bool needs_nll = false, needs_reference = false, needs_refusal = false, needs_hidden = false,
                        needs_logits = false, needs_gates = false;

  template <executor E, class T>
  acc_t<T> evaluate(const E&, const inputs<T>&, const grads<T>&, acc_t<T>) const { return acc_t<T>(0); }
};

static_assert(loss_policy<ga>);
static_assert(loss_policy<npo>);
static_assert(loss_policy<simnpo>);
static_assert(loss_policy<idk>);
static_assert(loss_policy<dpo>);
static_assert(loss_policy<rmu>);
static_assert(loss_policy<retain_nll>);
static_assert(loss_policy<retain_kl>);
static_assert(loss_policy<rmu_retain>);
static_assert(loss_policy<gate_bce>);
static_assert(loss_policy<gate_bce_logits>);
static_assert(loss_policy<none>);

}  // namespace grun::loss
