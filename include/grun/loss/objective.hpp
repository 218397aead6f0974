#pragma once
// grun/loss/objective.hpp — GRUN's training objective, composed at compile time.
//
//   L = s(step) · L_forget + w_retain · L_retain + w_gate · L_gate,
//   s(step) = min(1, step / warmup_steps)   (1 when warmup_steps = 0)
//
// (DESIGN.md; GRUN reference defaults: gate weight 10 — 100 for RMU — and retain weight 1–2.)
// The warm-up scales only the unlearning (forget) term: the retain and gate terms hold the model
// and teach the gate from the first step.
//
//   using objective = grun::loss::objective<grun::loss::npo, grun::loss::retain_nll, grun::loss::gate_bce>;
//   objective obj{.w_retain = 1, .w_gate = 10, .warmup_steps = 20};
//   if constexpr (objective::forget_policy::needs.reference) { ... compute NLL_ref ... }
//   auto terms = obj.value_and_grad(grun::exec::host, in, g, step);  // g zeroed, then filled
#include <cmath>
#include <type_traits>

#include "concepts.hpp"
#include "kl.hpp"
#include "sequence.hpp"
#include "token_nll.hpp"
#include "unlearn.hpp"

namespace grun::loss {

/// Every term of one evaluation, for logging: total = warmup·forget + w_retain·retain + w_gate·gate.
template <class Acc>
struct objective_terms {
  Acc total = Acc(0);
  Acc forget = Acc(0);  // L_forget, unweighted
  Acc retain = Acc(0);  // L_retain, unweighted
  Acc gate = Acc(0);    // L_gate, unweighted
  Acc warmup = Acc(1);  // s(step) applied to L_forget
};

template <loss_policy Forget, loss_policy Retain = none, loss_policy Gate = none>
struct objective {
  static_assert(Forget::slot == loss_role::forget || Forget::slot == loss_role::any,
                "grun::loss::objective: the first policy must be a forget loss (ga, npo, simnpo, idk, dpo, rmu) or none");
  static_assert(Retain::slot == loss_role::retain || Retain::slot == loss_role::any,
                "grun::loss::objective: the second policy must be a retain loss (retain_nll, retain_kl, rmu_retain) or none");
  static_assert(Gate::slot == loss_role::gate || Gate::slot == loss_role::any,
                "grun::loss::objective: the third policy must be a gate loss (gate_bce, gate_bce_logits) or none");

  using forget_policy = Forget;
  using retain_policy = Retain;
  using gate_policy = Gate;

  Forget forget{};
  Retain retain{};
  Gate gate{};
  double w_retain = 1.0;
  double w_gate = 10.0;
  index_t warmup_steps = 0;

  /// s(step) = min(1, step / warmup_steps), 1 without warm-up, 0 for step ≤ 0 during warm-up.
  double warmup(index_t step) const {
    if (warmup_steps <= 0) return 1.0;
    if (step <= 0) return 0.0;
    return step >= warmup_steps ? 1.0 : static_cast<double>(step) / static_cast<double>(warmup_steps);
  }

  /// Zeroes every non-empty view of g, then adds each term's weighted gradient into it.
  /// in and g live where ex runs (inputs<T, cuda_space> with exec::cuda).
  template <executor E, class T, memory_space Sp>
  objective_terms<acc_t<T>> value_and_grad(const E& ex, const inputs<T, Sp>& in, const grads<T, Sp>& g,
                                           index_t step = 0) const {
    check_weights();
    zero(ex, g.forget);
    zero(ex, g.retain);
    return run(ex, in, g, step);
  }

  /// The same terms without any gradient.
  template <executor E, class T, memory_space Sp>
  objective_terms<acc_t<T>> value(const E& ex, const inputs<T, Sp>& in, index_t step = 0) const {
    check_weights();
    return run(ex, in, grads<T, Sp>{}, step);
  }

 private:
  void check_weights() const {
    require<numeric_error>(std::isfinite(w_retain) && w_retain >= 0, "loss::objective: w_retain: expected a finite weight >= 0, got ",
                           w_retain);
    require<numeric_error>(std::isfinite(w_gate) && w_gate >= 0, "loss::objective: w_gate: expected a finite weight >= 0, got ",
                           w_gate);
  }
  template <executor E, class T, memory_space Sp>
  static void zero(const E& ex, const side_grads<T, Sp>& s) {
    detail::zero_view(ex, s.nll, "loss::objective: gradient nll");
    detail::zero_view(ex, s.refusal_nll, "loss::objective: gradient refusal_nll");
    detail::zero_view(ex, s.logits, "loss::objective: gradient logits");
    detail::zero_view(ex, s.hidden, "loss::objective: gradient hidden");
    detail::zero_view(ex, s.gate, "loss::objective: gradient gate");
    detail::zero_view(ex, s.gate_logit, "loss::objective: gradient gate_logit");
  }
  template <executor E, class T, memory_space Sp>
  objective_terms<acc_t<T>> run(const E& ex, const inputs<T, Sp>& in, const grads<T, Sp>& g, index_t step) const {
    using Acc = acc_t<T>;
    objective_terms<Acc> out;
    out.warmup = static_cast<Acc>(warmup(step));
    const Acc wr = static_cast<Acc>(w_retain), wg = static_cast<Acc>(w_gate);
    out.forget = forget.evaluate(ex, in, g, out.warmup);
    out.retain = retain.evaluate(ex, in, g, wr);
    out.gate = gate.evaluate(ex, in, g, wg);
    out.total = out.warmup * out.forget + wr * out.retain + wg * out.gate;
    return out;
  }
};

/// GradDiff (GA on forget + NLL on retain), with GRUN's gate loss by default.
template <loss_policy Gate = gate_bce>
using grad_diff = objective<ga, retain_nll, Gate>;

}  // namespace grun::loss
