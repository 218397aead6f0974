#pragma once
// grun/optim/adamw.hpp — AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization",
// ICLR 2019, Algorithm 2), the optimizer of the GRUN reference code (lr 4e-3).
//
// One element, step t ≥ 1, gradient g (after optional global-norm clipping):
//
//     θ ← θ · (1 − lr·λ)                       decoupled decay: never enters m or v
//     m ← β1·m + (1 − β1)·g
//     v ← β2·v + (1 − β2)·g²
//     θ ← θ − lr · (m / (1 − β1^t)) / (√(v / (1 − β2^t)) + ε)
//
// The decay is scaled by lr (as torch.optim.AdamW does, so the reference hyper-parameters carry
// over); the paper scales it by the schedule multiplier η_t instead — identical for a constant lr.
//
// The optimizer walks any parameter aggregate with for_each_param_pair (Boost.PFR), so it needs no
// per-policy code. Its state m, v is a param_state shaped like the aggregate, in the compute type
// acc_t<T>: fp32 for half and bfloat16 parameters. (In the storage type, (1 − β2)·g² of a half
// gradient below ~2e-4 underflows to 0, so v̂ ≪ g² and the step grows far past lr (up to
// lr·m̂/ε when v is 0: ~1e4·lr at g = 1e-4); in bfloat16,
// β2·v rounds back to v and v stops decaying.) After every step it calls the retraction hook
// (retract_after_step): for a gated_intervention module this is the ortho policy's retraction
// (QR for loreft), so R's rows stay orthonormal. A step is all-or-nothing: when the retraction
// throws (a rank-deficient R), the parameters, the moments and the step count are restored.
#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/params.hpp"
#include "../exec/host.hpp"

namespace grun {

template <class I, class T, class Space> struct module_params;  // intervention.hpp

namespace optim {

// ---- the math, shared with the CUDA kernel -------------------------------------------------
/// Per-step scalars, folded on the host once per step.
template <class Acc>
struct adamw_coeffs {
  Acc lr;          // learning rate
  Acc beta1, beta2;
  Acc eps;
  Acc decay;       // 1 − lr·λ
  Acc bc1, bc2;    // 1 − β1^t, 1 − β2^t
  Acc grad_scale;  // global-norm clipping factor (1 when not clipping)
};

/// One AdamW element update (formula at the top of this file), in the compute type.
template <class Acc>
GRUN_HD GRUN_FORCEINLINE void adamw_update(Acc& theta, Acc g, Acc& m, Acc& v, const adamw_coeffs<Acc>& c) {
  g *= c.grad_scale;
  m = c.beta1 * m + (Acc(1) - c.beta1) * g;
  v = c.beta2 * v + (Acc(1) - c.beta2) * g * g;
  const Acc m_hat = m / c.bc1;
  const Acc v_hat = v / c.bc2;
  theta = theta * c.decay - c.lr * m_hat / (std::sqrt(v_hat) + c.eps);
}

/// AdamW over n contiguous elements (one parameter tensor): storage T, state S, compute Acc.
template <class Acc, class T, class S>
GRUN_HD void adamw_update_span(T* theta, const T* grad, S* m, S* v, index_t n, const adamw_coeffs<Acc>& c) {
  for (index_t i = 0; i < n; ++i) {
    Acc t = load<Acc>(theta[i]), mi = load<Acc>(m[i]), vi = load<Acc>(v[i]);
    adamw_update<Acc>(t, load<Acc>(grad[i]), mi, vi, c);
    theta[i] = store<T>(t);
    m[i] = store<S>(mi);
    v[i] = store<S>(vi);
  }
}

// ---- the retraction hook --------------------------------------------------------------------
namespace detail {
void retract() = delete;  // poison pill: only ADL finds a user's `retract(params)`

template <class P> struct module_params_traits : std::false_type {};
template <class I, class T, class S>
struct module_params_traits<module_params<I, T, S>> : std::true_type { using intervention = I; };

template <class P> concept adl_retractable = requires(const P& p) { retract(p); };

template <class P>
void retract_after_step(const P& p) {
  if constexpr (module_params_traits<P>::value) {
    module_params_traits<P>::intervention::retract(p);  // the ortho policy's retraction (no-op for none)
  } else if constexpr (adl_retractable<P>) {
    retract(p);
  }
}
template <class> inline constexpr bool dependent_false = false;
}  // namespace detail

/// Keeps a parameter aggregate on its constraint set after an optimizer step:
///   - a gated_intervention's module_params: the module's ortho policy retracts R (QR for loreft);
///   - any other aggregate: `retract(params)` when one is found by argument-dependent lookup
///     (a user's parameter struct opts in by declaring it in its own namespace);
///   - otherwise nothing.
template <class P>
void retract_after_step(const P& p) { detail::retract_after_step(p); }

// ---- the optimizer -------------------------------------------------------------------------
struct adamw_options {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;  // λ, decoupled (see above); torch's default
  /// Clip the global L2 norm of all gradients to this value (torch.nn.utils.clip_grad_norm_); 0 = off.
  double max_grad_norm = 0.0;
};

namespace detail {
/// The per-step scalars of step t (1-based) from the options and the gradients' global norm
/// (clipping folded into grad_scale). Shared by optim::adamw and cuda::adamw.
template <class Acc>
adamw_coeffs<Acc> fold_coeffs(const adamw_options& o, std::int64_t t, double grad_norm) {
  adamw_coeffs<Acc> c{};
  c.lr = static_cast<Acc>(o.lr);
  c.beta1 = static_cast<Acc>(o.beta1);
  c.beta2 = static_cast<Acc>(o.beta2);
  c.eps = static_cast<Acc>(o.eps);
  c.decay = static_cast<Acc>(1.0 - o.lr * o.weight_decay);
  c.bc1 = static_cast<Acc>(1.0 - std::pow(o.beta1, double(t)));
  c.bc2 = static_cast<Acc>(1.0 - std::pow(o.beta2, double(t)));
  c.grad_scale = Acc(1);
  if (o.max_grad_norm > 0 && grad_norm > o.max_grad_norm) c.grad_scale = static_cast<Acc>(o.max_grad_norm / (grad_norm + 1e-6));
  return c;
}
/// Calls f(θ, g, m, v) on corresponding leaves: params and grads (two aggregates of the same type,
/// walked pairwise) and leaf k of the moments m, v (param_states shaped like the aggregate), after
/// checking that the states have one leaf per parameter leaf.
template <class Params, class State, class F>
void for_each_leaf_with_state(const Params& p, const Params& g, const State& m, const State& v, F&& f) {
  index_t leaves = 0;
  for_each_param(p, [&](const auto&) { ++leaves; });
  require<shape_error>(m.leaf_count() == leaves && v.leaf_count() == leaves, "adamw step: expected optimizer state of ",
                       leaves, " parameter tensors, got ", m.leaf_count(), " and ", v.leaf_count());
  index_t k = 0;
  for_each_param_pair(p, g, [&](const auto& pl, const auto& gl) {
    f(pl, gl, m.leaf(k), v.leaf(k));
    ++k;
  });
}
/// Every leaf of params and grads has the optimizer state's shape and storage (shared by
/// optim::adamw and cuda::adamw; `who` names the caller in the error).
template <class Params, class State>
void check_adamw_shapes(const State& state, const Params& params, const Params& grads, const char* who) {
  index_t leaves = 0;
  for_each_param(params, [&](const auto&) { ++leaves; });
  require<shape_error>(state.leaf_count() == leaves, who, ": expected ", state.leaf_count(),
                       " parameter tensors (the optimizer state's), got ", leaves);
  auto check = [&](const auto& a, const auto& b, index_t k, const char* what) {
    require<shape_error>(a.rows == b.rows && a.cols == b.cols, who, ": parameter #", k, ": expected ", what,
                         " of shape [", a.rows, ", ", a.cols, "] (the optimizer state's), got [", b.rows, ", ", b.cols,
                         "]");
    require<shape_error>(b.size() == 0 || b.data != nullptr, who, ": parameter #", k, ": ", what,
                         " has no storage (null data)");
  };
  index_t k = 0;
  for_each_param_pair(params, grads, [&](const auto& p, const auto& g) {
    check(state.leaf(k), p, k, "parameters");
    check(state.leaf(k), g, k, "gradients");
    ++k;
  });
}
/// The option checks shared by optim::adamw and cuda::adamw.
inline void check_adamw_options(const adamw_options& o) {
  require<error>(o.lr >= 0 && std::isfinite(o.lr), "adamw: expected lr >= 0, got ", o.lr);
  require<error>(o.beta1 >= 0 && o.beta1 < 1, "adamw: expected 0 <= beta1 < 1, got ", o.beta1);
  require<error>(o.beta2 >= 0 && o.beta2 < 1, "adamw: expected 0 <= beta2 < 1, got ", o.beta2);
  require<error>(o.eps > 0, "adamw: expected eps > 0, got ", o.eps);
  require<error>(o.weight_decay >= 0, "adamw: expected weight_decay >= 0, got ", o.weight_decay);
  require<error>(o.max_grad_norm >= 0, "adamw: expected max_grad_norm >= 0 (0 = off), got ", o.max_grad_norm);
}
/// Executor dispatch for one step. Specialize for exec::cuda_t in kernels/ (fused AdamW).
template <class Exec>
struct adamw_impl {
  template <class... A> static void step(A&&...) {
    static_assert(dependent_false<Exec>, "grun: no adamw step for this parameter aggregate on this executor");
  }
};
/// The values of every leaf of a host aggregate, back to back (for_each_param order).
template <class Params>
std::vector<param_value_t<Params>> copy_leaves(const Params& p) {
  std::vector<param_value_t<Params>> out;
  for_each_param(p, [&](const auto& leaf) { out.insert(out.end(), leaf.data, leaf.data + leaf.size()); });
  return out;
}
/// Writes values saved by copy_leaves back into the same aggregate.
template <class Params>
void restore_leaves(const Params& p, const std::vector<param_value_t<Params>>& saved) {
  std::size_t at = 0;
  for_each_param(p, [&](const auto& leaf) {
    std::copy_n(saved.data() + at, leaf.size(), leaf.data);
    at += static_cast<std::size_t>(leaf.size());
  });
}
template <>
struct adamw_impl<exec::host_t> {
  /// m, v: param_states shaped like Params (any element type; optim::adamw uses Acc).
  template <class Params, class State, class Acc>
  static void step(const exec::host_t&, const Params& p, const Params& g, const State& m, const State& v,
                   const adamw_coeffs<Acc>& c) {
    for_each_leaf_with_state(p, g, m, v, [&](const auto& pl, const auto& gl, const auto& ml, const auto& vl) {
      static_assert(std::is_same_v<typename std::remove_cvref_t<decltype(pl)>::memory_space, host_space>,
                    "grun: no adamw step for cuda_space parameters on exec::host");
      adamw_update_span<Acc>(pl.data, gl.data, ml.data, vl.data, pl.size(), c);
    });
  }
};
}  // namespace detail

/// AdamW for a parameter aggregate `Params` (an aggregate of grun::param, e.g. a module's
/// module_params). Holds m and v (param_state<acc_type> shaped like Params, zero-initialized)
/// and the step count.
///
///   optim::adamw<unlearner::params<float>> opt(m.parameters(), {.lr = 4e-3});
///   m.backward(...);                       // gradients into m.gradients()
///   opt.step(m.parameters(), m.gradients());  // update + ortho retraction
template <class Params>
class adamw {
 public:
  using params_type = Params;
  using value_type = param_value_t<Params>;
  using acc_type = acc_t<value_type>;
  using state_type = param_state<acc_type>;

  /// State shaped like `shape` (only its extents are read).
  explicit adamw(const Params& shape, adamw_options opt = {}) : opt_(opt), m_(shape), v_(shape) {
    check_options();
  }

  const adamw_options& options() const { return opt_; }
  void set_lr(double lr) { opt_.lr = lr; check_options(); }
  std::int64_t steps() const { return t_; }
  /// The moments, in acc_type, leaf k shaped like the parameters' leaf k.
  const state_type& first_moment() const { return m_; }
  const state_type& second_moment() const { return v_; }
  state_type& first_moment() { return m_; }
  state_type& second_moment() { return v_; }
  /// Restores a saved state (step count; m and v are written through first_moment()/second_moment()).
  void set_steps(std::int64_t t) {
    require<error>(t >= 0, "adamw::set_steps: expected a non-negative step count, got ", t);
    t_ = t;
  }
  /// Forgets the moments and the step count.
  void reset() { m_.zero(); v_.zero(); t_ = 0; }

  /// One step on the host: params ← AdamW(params, grads), then retract_after_step(params).
  /// Returns the global L2 norm of the gradients before clipping. Throws shape_error when a leaf's
  /// shape differs from the state's, numeric_error (before changing anything) when a gradient is
  /// not finite. When the post-step hook throws, the parameters, moments and step count are put
  /// back as they were and the exception propagates.
  double step(const Params& params, const Params& grads) {
    return step(exec::host, params, grads, [](const Params& p) { retract_after_step(p); });
  }
  /// As above with a caller-supplied post-step hook instead of retract_after_step.
  template <class PostStep>
    requires std::invocable<PostStep&, const Params&>
  double step(const Params& params, const Params& grads, PostStep&& post_step) {
    return step(exec::host, params, grads, std::forward<PostStep>(post_step));
  }
  template <class Exec, class PostStep>
  double step(const Exec& ex, const Params& params, const Params& grads, PostStep&& post_step) {
    static_assert(std::is_same_v<Exec, exec::host_t>,
                  "grun::optim::adamw keeps its moments in host memory and runs on exec::host; for device "
                  "parameters use grun::cuda::adamw (kernels/grun/cuda/optim.cuh)");
    check_shapes(params, grads);
    const double norm = grad_norm(grads);
    require<numeric_error>(std::isfinite(norm), "adamw::step: expected finite gradients, got global norm ", norm,
                           " (parameters left unchanged)");
    // The hook may throw after the update (QR of a rank-deficient R): keep what it would destroy.
    // A few parameter-sized copies, beside a backward pass over every token.
    const auto saved_params = detail::copy_leaves(params);
    state_type saved_m = m_, saved_v = v_;
    ++t_;
    detail::adamw_impl<Exec>::step(ex, params, grads, m_, v_, detail::fold_coeffs<acc_type>(opt_, t_, norm));
    try {
      post_step(params);
    } catch (...) {
      detail::restore_leaves(params, saved_params);
      m_ = std::move(saved_m);
      v_ = std::move(saved_v);
      --t_;
      throw;
    }
    return norm;
  }

  /// Global L2 norm of an aggregate (in double).
  static double grad_norm(const Params& grads) {
    double s = 0;
    for_each_param(grads, [&](const auto& leaf) {
      for (index_t i = 0; i < leaf.size(); ++i) {
        const double x = load<double>(leaf[i]);
        s += x * x;
      }
    });
    return std::sqrt(s);
  }

 private:
  void check_options() const { detail::check_adamw_options(opt_); }
  void check_shapes(const Params& params, const Params& grads) const {
    detail::check_adamw_shapes(m_, params, grads, "adamw::step");
  }

  adamw_options opt_;
  state_type m_, v_;
  std::int64_t t_ = 0;
};

}  // namespace optim
}  // namespace grun
