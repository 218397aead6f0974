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
// Every policy runs on the executor it is given, with inputs<T, Sp> in that executor's memory:
// the per-item math is written once as a GRUN_HD term (detail/terms.hpp) that exec::host loops
// over and exec::cuda runs in one block (kernels/grun/cuda/losses.cuh); retain_kl, rmu and
// rmu_retain run the fused KL and mean-squared kernels. On exec::cuda the value comes back to the
// host (one stream synchronization per term); gradients stay on the device.
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "concepts.hpp"
#include "detail/parallel.hpp"
#include "detail/terms.hpp"
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
inline void require_positive(double x, const char* policy, const char* knob) {
  require<numeric_error>(std::isfinite(x) && x > 0, "loss::", policy, ": ", knob, ": expected a finite value > 0, got ", x);
}
inline constexpr const char* expected_length = "expected an answer length >= 0, got a negative one";

/// −(2/β)·logσ(z) and its derivative −(2/β)·σ(−z): the shared core of NPO, SimNPO and DPO.
/// (d/dz logσ(z) = σ(−z).) At z = 0 the derivative is −1/β, so a term's first step moves
/// NLL like gradient ascent does (the reason for the 2/β scale in the NPO paper).
template <class Acc>
GRUN_HD GRUN_FORCEINLINE Acc neg_log_sigmoid_scaled(Acc z, Acc beta, Acc* dz) {
  *dz = -(Acc(2) / beta) * sigmoid(-z);
  return -(Acc(2) / beta) * log_sigmoid(z);
}

// ---- per-item terms (see detail/terms.hpp for the contract) --------------------------------

/// Mean NLL of one side's answers (ga, idk, retain_nll): v_b = NLL_b, n_b = |y_b| (token_mean) or
/// 1 (sequence_mean) for |y_b| > 0; ∂v_b/∂NLL_b = 1.
template <class Acc, memory_space Sp>
struct nll_mean_term {
  using memory_space = Sp;
  tensor_view<const Acc, 1, Sp> nll;
  tensor_view<const index_t, 1, Sp> count;
  tensor_view<Acc, 1, Sp> dnll;
  nll_reduction reduction;
  GRUN_HD index_t size() const { return nll.extent(0); }
  GRUN_HD int invalid(index_t b) const { return count(b) < 0 ? 1 : 0; }
  GRUN_HD index_t denominator(index_t b) const {
    return count(b) == 0 ? 0 : (reduction == nll_reduction::token_mean ? count(b) : 1);
  }
  GRUN_HD Acc apply(index_t b, Acc scale) const {
    if (count(b) == 0) return Acc(0);
    if (!dnll.empty()) dnll(b) += scale;
    return nll(b);
  }
};

/// Mean NLL (see nll_reduction); adds weight · ∂mean/∂NLL_b into dnll (if non-empty).
template <class Acc, executor E, memory_space Sp>
Acc nll_mean(const E& ex, nll_reduction r, const tensor_view<const Acc, 1, Sp>& nll,
             const tensor_view<const index_t, 1, Sp>& count, const tensor_view<Acc, 1, Sp>& dnll, Acc weight,
             const char* policy, const char* nll_field, const char* count_field) {
  const index_t B = nll.extent(0);
  require_per_sequence(count, B, policy, count_field);
  require_grad_or_empty(dnll, B, policy, nll_field);
  return mean_of(reduce_terms<Acc>(ex, nll_mean_term<Acc, Sp>{nll, count, dnll, r}, weight, policy, {count_field},
                                   expected_length));
}

/// NPO: v_b = −(2/β) logσ(β (NLL_θ,b − NLL_ref,b)) for |y_b| > 0.
template <class Acc, memory_space Sp>
struct npo_term {
  using memory_space = Sp;
  tensor_view<const Acc, 1, Sp> nll, nll_ref;
  tensor_view<const index_t, 1, Sp> count;
  tensor_view<Acc, 1, Sp> dnll;
  Acc beta;
  GRUN_HD index_t size() const { return nll.extent(0); }
  GRUN_HD int invalid(index_t b) const { return count(b) < 0 ? 1 : 0; }
  GRUN_HD index_t denominator(index_t b) const { return count(b) > 0 ? 1 : 0; }
  GRUN_HD Acc apply(index_t b, Acc scale) const {
    if (count(b) == 0) return Acc(0);
    Acc dz;
    const Acc v = neg_log_sigmoid_scaled(beta * (nll(b) - nll_ref(b)), beta, &dz);
    if (!dnll.empty()) dnll(b) += scale * dz * beta;
    return v;
  }
};

/// SimNPO: v_b = −(2/β) logσ(β NLL_b / |y_b| − γ) for |y_b| > 0.
template <class Acc, memory_space Sp>
struct simnpo_term {
  using memory_space = Sp;
  tensor_view<const Acc, 1, Sp> nll;
  tensor_view<const index_t, 1, Sp> count;
  tensor_view<Acc, 1, Sp> dnll;
  Acc beta, gamma;
  GRUN_HD index_t size() const { return nll.extent(0); }
  GRUN_HD int invalid(index_t b) const { return count(b) < 0 ? 1 : 0; }
  GRUN_HD index_t denominator(index_t b) const { return count(b) > 0 ? 1 : 0; }
  GRUN_HD Acc apply(index_t b, Acc scale) const {
    if (count(b) == 0) return Acc(0);
    const Acc len = static_cast<Acc>(count(b));
    Acc dz;
    const Acc v = neg_log_sigmoid_scaled(beta * nll(b) / len - gamma, beta, &dz);
    if (!dnll.empty()) dnll(b) += scale * dz * beta / len;
    return v;
  }
};

/// DPO: v_b = −(2/β) logσ(β[(NLL_θ(y_l) − NLL_ref(y_l)) − (NLL_θ(y_w) − NLL_ref(y_w))]) where both
/// answers have tokens; y_l = the forget answer (nll), y_w = the refusal (rnll).
template <class Acc, memory_space Sp>
struct dpo_term {
  using memory_space = Sp;
  tensor_view<const Acc, 1, Sp> nll, nll_ref, rnll, rnll_ref;
  tensor_view<const index_t, 1, Sp> count, rcount;
  tensor_view<Acc, 1, Sp> dnll, drnll;
  Acc beta;
  GRUN_HD index_t size() const { return nll.extent(0); }
  GRUN_HD int invalid(index_t b) const { return count(b) < 0 ? 1 : (rcount(b) < 0 ? 2 : 0); }
  GRUN_HD index_t denominator(index_t b) const { return count(b) > 0 && rcount(b) > 0 ? 1 : 0; }
  GRUN_HD Acc apply(index_t b, Acc scale) const {
    if (count(b) == 0 || rcount(b) == 0) return Acc(0);
    const Acc h = beta * ((nll(b) - nll_ref(b)) - (rnll(b) - rnll_ref(b)));
    Acc dh;
    const Acc v = neg_log_sigmoid_scaled(h, beta, &dh);
    if (!dnll.empty()) dnll(b) += scale * dh * beta;
    if (!drnll.empty()) drnll(b) -= scale * dh * beta;
    return v;
  }
};

/// Gate BCE from gate values over forget (items [0, G_f), target 1) then retain (target 0):
/// v = −log max(g, ε) or −log max(1 − g, ε); gradient −1/max(g, ε) or 1/max(1 − g, ε).
template <class Acc, memory_space Sp>
struct gate_bce_term {
  using memory_space = Sp;
  tensor_view<const Acc, 1, Sp> gf, gr;
  tensor_view<Acc, 1, Sp> dgf, dgr;
  Acc eps;
  GRUN_HD index_t size() const { return gf.extent(0) + gr.extent(0); }
  GRUN_HD int invalid(index_t) const { return 0; }
  GRUN_HD index_t denominator(index_t) const { return 1; }
  GRUN_HD Acc apply(index_t i, Acc scale) const {
    using std::log;
    const index_t nf = gf.extent(0);
    if (i < nf) {
      // Clamped below at eps; a NaN gate stays NaN (comparisons with NaN are false: `g > eps ? g : eps`
      // turned it into eps, hiding the fault upstream behind a finite loss).
      const Acc p = gf(i) < eps ? eps : gf(i);
      if (!dgf.empty()) dgf(i) -= scale / p;
      return -log(p);
    }
    const Acc q = Acc(1) - gr(i - nf) < eps ? eps : Acc(1) - gr(i - nf);
    if (!dgr.empty()) dgr(i - nf) += scale / q;
    return -log(q);
  }
};

/// Gate BCE from logits: v = softplus(−z) (forget) or softplus(z) (retain), ∂v/∂z = σ(z) − y.
template <class Acc, memory_space Sp>
struct gate_bce_logits_term {
  using memory_space = Sp;
  tensor_view<const Acc, 1, Sp> zf, zr;
  tensor_view<Acc, 1, Sp> dzf, dzr;
  GRUN_HD index_t size() const { return zf.extent(0) + zr.extent(0); }
  GRUN_HD int invalid(index_t) const { return 0; }
  GRUN_HD index_t denominator(index_t) const { return 1; }
  GRUN_HD Acc apply(index_t i, Acc scale) const {
    const index_t nf = zf.extent(0);
    if (i < nf) {
      if (!dzf.empty()) dzf(i) += scale * (sigmoid(zf(i)) - Acc(1));
      return -log_sigmoid(zf(i));
    }
    if (!dzr.empty()) dzr(i - nf) += scale * sigmoid(zr(i - nf));
    return -log_sigmoid(-zr(i - nf));
  }
};

/// Token mean of per-token KL (retain_kl): n_t = [label_t ≠ −100], v_t = KL_t (0 on ignored rows);
/// writes ∂L/∂KL_t = scale into dkl (if non-empty) for token_kl_backward.
template <class Acc, class L, memory_space Sp>
struct token_mean_term {
  using memory_space = Sp;
  tensor_view<const L, 1, Sp> labels;
  tensor_view<const Acc, 1, Sp> value;
  tensor_view<Acc, 1, Sp> dvalue;
  GRUN_HD index_t size() const { return labels.extent(0); }
  GRUN_HD int invalid(index_t) const { return 0; }
  GRUN_HD index_t denominator(index_t t) const { return labels(t) != ignore_index ? 1 : 0; }
  GRUN_HD Acc apply(index_t t, Acc scale) const {
    if (!dvalue.empty()) dvalue(t) = scale;
    return value(t);
  }
};

template <class T, memory_space Sp>
void require_hidden(const tensor_view<const T, 2, Sp>& h, const tensor_view<T, 2, Sp>& dh, const char* policy) {
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
  static constexpr loss_needs needs{.nll = true};
  nll_reduction reduction = nll_reduction::token_mean;

  template <executor E, class T, memory_space Sp>
  acc_t<T> evaluate(const E& ex, const inputs<T, Sp>& in, const grads<T, Sp>& g, acc_t<T> weight) const {
    return -detail::nll_mean(ex, reduction, in.forget.nll, in.forget.count, g.forget.nll, -weight, name, "forget.nll",
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
  static constexpr loss_needs needs{.nll = true, .reference = true};
  double beta = 0.1;

  template <executor E, class T, memory_space Sp>
  acc_t<T> evaluate(const E& ex, const inputs<T, Sp>& in, const grads<T, Sp>& g, acc_t<T> weight) const {
    using Acc = acc_t<T>;
    detail::require_positive(beta, name, "beta");
    const auto& f = in.forget;
    const index_t B = f.nll.extent(0);
    detail::require_per_sequence(f.count, B, name, "forget.count");
    detail::require_per_sequence(f.nll_ref, B, name, "forget.nll_ref");
    detail::require_grad_or_empty(g.forget.nll, B, name, "forget.nll");
    const detail::npo_term<Acc, Sp> term{f.nll, f.nll_ref, f.count, g.forget.nll, static_cast<Acc>(beta)};
    return detail::mean_of(detail::reduce_terms<Acc>(ex, term, weight, name, {"forget.count"}, detail::expected_length));
  }
};

/// SimNPO (Fan et al. 2024, arXiv 2410.07163, eq. 4): reference-free, length-normalized NPO
///   L = −(2/β) · mean_b logσ(−(β/|y_b|) · log π_θ(y_b|x_b) − γ) = −(2/β) · mean_b logσ(β·NLL_b/|y_b| − γ),
/// DESIGN.md's formula. ∂L/∂NLL_b = −(2/B)·σ(−z_b)/|y_b| < 0: descent raises the forget NLL.
/// β, γ are tuned per task in the paper; defaults here β = 0.1 (as NPO), γ = 0.
struct simnpo {
  static constexpr const char* name = "simnpo";
  static constexpr loss_role slot = loss_role::forget;
  static constexpr loss_needs needs{.nll = true};
  double beta = 0.1;
  double gamma = 0.0;

  template <executor E, class T, memory_space Sp>
  acc_t<T> evaluate(const E& ex, const inputs<T, Sp>& in, const grads<T, Sp>& g, acc_t<T> weight) const {
    using Acc = acc_t<T>;
    detail::require_positive(beta, name, "beta");
    require<numeric_error>(std::isfinite(gamma), "loss::simnpo: gamma: expected a finite value, got ", gamma);
    const auto& f = in.forget;
    const index_t B = f.nll.extent(0);
    detail::require_per_sequence(f.count, B, name, "forget.count");
    detail::require_grad_or_empty(g.forget.nll, B, name, "forget.nll");
    const detail::simnpo_term<Acc, Sp> term{f.nll, f.count, g.forget.nll, static_cast<Acc>(beta), static_cast<Acc>(gamma)};
    return detail::mean_of(detail::reduce_terms<Acc>(ex, term, weight, name, {"forget.count"}, detail::expected_length));
  }
};

/// IDK (TOFU, Maini et al. 2024, arXiv 2401.06121): fine-tune toward a refusal answer,
///   L = mean NLL_θ(refusal_b | x_b), on the forget questions (refusal_* fields of the forget side).
struct idk {
  static constexpr const char* name = "idk";
  static constexpr loss_role slot = loss_role::forget;
  static constexpr loss_needs needs{.refusal = true};
  nll_reduction reduction = nll_reduction::token_mean;

  template <executor E, class T, memory_space Sp>
  acc_t<T> evaluate(const E& ex, const inputs<T, Sp>& in, const grads<T, Sp>& g, acc_t<T> weight) const {
    return detail::nll_mean(ex, reduction, in.forget.refusal_nll, in.forget.refusal_count, g.forget.refusal_nll, weight,
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
  static constexpr loss_needs needs{.nll = true, .reference = true, .refusal = true};
  double beta = 0.1;

  template <executor E, class T, memory_space Sp>
  acc_t<T> evaluate(const E& ex, const inputs<T, Sp>& in, const grads<T, Sp>& g, acc_t<T> weight) const {
    using Acc = acc_t<T>;
    detail::require_positive(beta, name, "beta");
    const auto& f = in.forget;
    const index_t B = f.nll.extent(0);
    detail::require_per_sequence(f.count, B, name, "forget.count");
    detail::require_per_sequence(f.nll_ref, B, name, "forget.nll_ref");
    detail::require_per_sequence(f.refusal_nll, B, name, "forget.refusal_nll");
    detail::require_per_sequence(f.refusal_nll_ref, B, name, "forget.refusal_nll_ref");
    detail::require_per_sequence(f.refusal_count, B, name, "forget.refusal_count");
    detail::require_grad_or_empty(g.forget.nll, B, name, "forget.nll");
    detail::require_grad_or_empty(g.forget.refusal_nll, B, name, "forget.refusal_nll");
    const detail::dpo_term<Acc, Sp> term{f.nll,           f.nll_ref, f.refusal_nll,       f.refusal_nll_ref, f.count,
                                         f.refusal_count, g.forget.nll, g.forget.refusal_nll, static_cast<Acc>(beta)};
    return detail::mean_of(detail::reduce_terms<Acc>(ex, term, weight, name, {"forget.count", "forget.refusal_count"},
                                                     detail::expected_length));
  }
};

/// RMU (Li et al. 2024, "The WMDP Benchmark", arXiv 2403.03218, eq. 1), forget term:
///   L = (1/(P·d)) Σ_p ‖h_p − c·u‖²   on forget rows at the chosen layer,
/// mean over all P·d elements (the reference implementation's mse_loss). u = a fixed random unit
/// vector (rmu_direction), c the steering coefficient — model dependent, tuned per model in WMDP.
struct rmu {
  static constexpr const char* name = "rmu";
  static constexpr loss_role slot = loss_role::forget;
  static constexpr loss_needs needs{.hidden = true};
  double c = 20.0;

  template <executor E, class T, memory_space Sp>
  acc_t<T> evaluate(const E& ex, const inputs<T, Sp>& in, const grads<T, Sp>& g, acc_t<T> weight) const {
    using Acc = acc_t<T>;
    require<numeric_error>(std::isfinite(c), "loss::rmu: c: expected a finite steering coefficient, got ", c);
    const auto& h = in.forget.hidden;
    require_extent(in.forget.direction, 0, h.extent(1), "loss::rmu: forget.direction (u, one per hidden column)");
    detail::require_hidden(h, g.forget.hidden, name);
    return detail::mean_squared(ex, h, g.forget.hidden, weight,
                                detail::steering_target<Acc, Sp>{in.forget.direction, static_cast<Acc>(c)}, name);
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
  static constexpr loss_needs needs{.nll = true};
  nll_reduction reduction = nll_reduction::token_mean;

  template <executor E, class T, memory_space Sp>
  acc_t<T> evaluate(const E& ex, const inputs<T, Sp>& in, const grads<T, Sp>& g, acc_t<T> weight) const {
    return detail::nll_mean(ex, reduction, in.retain.nll, in.retain.count, g.retain.nll, weight, name, "retain.nll",
                            "retain.count");
  }
};

/// L = mean over retain answer tokens (labels ≠ −100) of KL(p_ref ‖ p_θ) — kl.hpp, fused and stable.
/// Gradient goes to retain.logits (θ); the reference logits are frozen.
struct retain_kl {
  static constexpr const char* name = "retain_kl";
  static constexpr loss_role slot = loss_role::retain;
  static constexpr loss_needs needs{.reference = true, .logits = true};

  template <executor E, class T, memory_space Sp>
  acc_t<T> evaluate(const E& ex, const inputs<T, Sp>& in, const grads<T, Sp>& g, acc_t<T> weight) const {
    using Acc = acc_t<T>;
    const auto& r = in.retain;
    const index_t Tn = r.logits.extent(0);
    require_extent(r.labels, 0, Tn, "loss::retain_kl: retain.labels");
    require<shape_error>(r.logits_ref.extent(0) == Tn && r.logits_ref.extent(1) == r.logits.extent(1),
                         "loss::retain_kl: retain.logits_ref: expected the shape of retain.logits ",
                         grun::detail::shape_string(r.logits), ", got ", grun::detail::shape_string(r.logits_ref));
    if constexpr (!std::is_same_v<Sp, typename E::memory_space>) {
      detail::require_executor_space<E, Sp>(name);
      return Acc(0);
    } else {
      const bool want_grad = !g.retain.logits.empty();
      if (want_grad) {
        require_extent(g.retain.logits, 0, Tn, "loss::retain_kl: gradient retain.logits");
        require_extent(g.retain.logits, 1, r.logits.extent(1), "loss::retain_kl: gradient retain.logits");
      }
      if (Tn == 0) return Acc(0);
      // kl | lse | lse_ref | dkl, one temporary where ex runs.
      auto tmp = detail::temporary_impl<E>::template make<Acc>(ex, 4 * Tn);
      const tensor_view<Acc, 1, Sp> kl(tmp.data(), {Tn}), lse(tmp.data() + Tn, {Tn}), lse_ref(tmp.data() + 2 * Tn, {Tn}),
          dkl(tmp.data() + 3 * Tn, {want_grad ? Tn : 0});
      token_kl_forward(ex, r.logits, r.logits_ref, r.labels, kl, lse, lse_ref);
      // L = Σ_t KL_t / #answer tokens (ignored rows hold 0); dkl_t = weight / #answer tokens.
      const auto totals = detail::reduce_terms<Acc>(
          ex, detail::token_mean_term<Acc, std::int64_t, Sp>{r.labels, kl, dkl}, weight, name, {}, "");
      if (want_grad && totals.denominator > 0)
        token_kl_backward(ex, r.logits, r.logits_ref, r.labels, lse, lse_ref, dkl, g.retain.logits, /*accumulate=*/true);
      return detail::mean_of(totals);
    }
  }
};

/// RMU's retain term: L = (1/(P·d)) Σ ‖h_p − h_ref,p‖² on retain rows (frozen model's hidden states).
struct rmu_retain {
  static constexpr const char* name = "rmu_retain";
  static constexpr loss_role slot = loss_role::retain;
  static constexpr loss_needs needs{.reference = true, .hidden = true};

  template <executor E, class T, memory_space Sp>
  acc_t<T> evaluate(const E& ex, const inputs<T, Sp>& in, const grads<T, Sp>& g, acc_t<T> weight) const {
    using Acc = acc_t<T>;
    const auto& h = in.retain.hidden;
    const auto& h0 = in.retain.hidden_ref;
    require<shape_error>(h0.extent(0) == h.extent(0) && h0.extent(1) == h.extent(1),
                         "loss::rmu_retain: retain.hidden_ref: expected the shape of retain.hidden ",
                         grun::detail::shape_string(h), ", got ", grun::detail::shape_string(h0));
    detail::require_hidden(h, g.retain.hidden, name);
    static_assert(std::is_same_v<Acc, acc_t<T>>);
    return detail::mean_squared(ex, h, g.retain.hidden, weight, detail::reference_target<T, Sp>{h0}, name);
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
  static constexpr loss_needs needs{.gates = true};
  double eps = 1e-6;

  template <executor E, class T, memory_space Sp>
  acc_t<T> evaluate(const E& ex, const inputs<T, Sp>& in, const grads<T, Sp>& g, acc_t<T> weight) const {
    using Acc = acc_t<T>;
    require<numeric_error>(eps > 0 && eps < 0.5, "loss::gate_bce: eps: expected 0 < eps < 0.5, got ", eps);
    const auto& gf = in.forget.gate;
    const auto& gr = in.retain.gate;
    detail::require_grad_or_empty(g.forget.gate, gf.extent(0), name, "forget.gate");
    detail::require_grad_or_empty(g.retain.gate, gr.extent(0), name, "retain.gate");
    const detail::gate_bce_term<Acc, Sp> term{gf, gr, g.forget.gate, g.retain.gate, static_cast<Acc>(eps)};
    return detail::mean_of(detail::reduce_terms<Acc>(ex, term, weight, name, {}, ""));
  }
};

/// The same BCE from gate logits z (g = σ(z)), exact and stable for any z:
///   −log σ(z) = softplus(−z) on forget rows, −log(1 − σ(z)) = softplus(z) on retain rows,
///   ∂/∂z = σ(z) − y. Mean over all gate values.
struct gate_bce_logits {
  static constexpr const char* name = "gate_bce_logits";
  static constexpr loss_role slot = loss_role::gate;
  static constexpr loss_needs needs{.gates = true};

  template <executor E, class T, memory_space Sp>
  acc_t<T> evaluate(const E& ex, const inputs<T, Sp>& in, const grads<T, Sp>& g, acc_t<T> weight) const {
    using Acc = acc_t<T>;
    const auto& zf = in.forget.gate_logit;
    const auto& zr = in.retain.gate_logit;
    detail::require_grad_or_empty(g.forget.gate_logit, zf.extent(0), name, "forget.gate_logit");
    detail::require_grad_or_empty(g.retain.gate_logit, zr.extent(0), name, "retain.gate_logit");
    const detail::gate_bce_logits_term<Acc, Sp> term{zf, zr, g.forget.gate_logit, g.retain.gate_logit};
    return detail::mean_of(detail::reduce_terms<Acc>(ex, term, weight, name, {}, ""));
  }
};

// ---- nothing -----------------------------------------------------------------------------------

/// L ≡ 0 in any slot: no retain term, or no gate term (an ungated gate::always ablation).
struct none {
  static constexpr const char* name = "none";
  static constexpr loss_role slot = loss_role::any;
  static constexpr loss_needs needs{};

  template <executor E, class T, memory_space Sp>
  acc_t<T> evaluate(const E&, const inputs<T, Sp>&, const grads<T, Sp>&, acc_t<T>) const { return acc_t<T>(0); }
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
