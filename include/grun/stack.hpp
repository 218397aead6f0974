#pragma once
// grun/stack.hpp — sequential unlearning (GRUN, Ren et al. 2025, §3.3): each deletion request trains
// a new, independent module k at the same site; all modules read the same input and add up,
//
//     h' = h + s(K) · Σ_k g_k(h) Δ_k(h),     s(K) = a·K + b   (default a = 0, b = 1;
//                                                              the GRUN reference code uses a = b = 0.6)
//
// so appending a module never changes what the earlier ones compute. Training the newest module
// keeps the earlier ones frozen (they still shape dL/dh).
#include <cstdint>
#include <deque>
#include <vector>

#include "intervention.hpp"

namespace grun {

template <class Gate, class Reft, class Ortho = default_ortho_t<Reft>, class T = float>
class intervention_stack {
 public:
  using intervention = gated_intervention<Gate, Reft, Ortho>;
  using params_type = typename intervention::template params<T, host_space>;

  /// An empty stack for hidden size d with stack scale s(K) = a·K + b.
  explicit intervention_stack(index_t d, double a = 0.0, double b = 1.0) : d_(d), a_(a), b_(b) {
    (void)intervention::template shape<T>(d);  // validates d
  }

  index_t dim() const { return d_; }
  index_t size() const { return index_t(modules_.size()); }
  double scale() const { return a_ * double(size()) + b_; }
  void set_scale(double a, double b) { a_ = a; b_ = b; }

  /// Appends a new module initialized from `seed`; existing modules are not touched (neither their
  /// storage nor the references returned for them move). Returns the new module's parameters.
  const params_type& append(std::uint64_t seed) {
    owned_params<params_type> m(intervention::template shape<T>(d_));
    init(*m, seed);
    modules_.push_back(std::move(m));
    return *modules_.back();
  }
  /// Appends a copy of trained parameters `p` (shape checked against d).
  const params_type& append(const params_type& p) {
    intervention::check_params(p, d_, "intervention_stack::append");
    owned_params<params_type> m(intervention::template shape<T>(d_));
    for_each_param_pair(*m, p, [](auto& dst, const auto& src) {
      for (index_t i = 0; i < src.size(); ++i) dst[i] = src[i];
    });
    modules_.push_back(std::move(m));
    return *modules_.back();
  }

  const params_type& module(index_t k) const { return *modules_.at(checked(k)); }
  owned_params<params_type>& owned_module(index_t k) { return modules_.at(checked(k)); }

  /// out = h + s(K) Σ_k g_k Δ_k on the rows at `pos`; gates [K, P]. out may be h (in place).
  template <class Exec>
  void forward(const Exec& ex, matrix_view<const T> h, const positions& pos, matrix_view<T> out,
               matrix_view<T> gates) const {
    forward_checked(ex, h, pos, out, gates, nullptr);
  }
  /// The same, keeping what the backward would recompute (see saved_activations).
  template <class Exec>
  void forward(const Exec& ex, matrix_view<const T> h, const positions& pos, matrix_view<T> out, matrix_view<T> gates,
               saved_activations<T>& saved) const {
    forward_checked(ex, h, pos, out, gates, &saved);
  }

  /// Module k alone, unscaled: out = h + g_k Δ_k; gates [P].
  template <class Exec>
  void forward_module(const Exec& ex, index_t k, matrix_view<const T> h, const positions& pos, matrix_view<T> out,
                      vector_view<T> gates) const {
    intervention::forward(ex, module(k), h, pos, out, gates);
  }

  /// Backward of forward: dh = dL/dh through every module (frozen ones included); grads = dL/dθ of
  /// module `trained` (default: the newest), overwritten. dgates [K, P] or empty (no gate loss).
  static constexpr index_t newest = -1;
  template <class Exec>
  void backward(const Exec& ex, matrix_view<const T> h, const positions& pos, matrix_view<const T> dout,
                matrix_view<const T> dgates, matrix_view<T> dh, const params_type& grads, index_t trained = newest) const {
    backward_checked(ex, h, pos, dout, dgates, dh, grads, trained, nullptr);
  }
  /// The same with dgates in the accumulate type acc_t<T>, as grun's gate losses write it (see
  /// gate_gradient_for: no rounding to half on the way).
  template <class Exec, class DG>
    requires(!std::same_as<T, acc_t<T>> && std::same_as<std::remove_const_t<DG>, acc_t<T>>)
  void backward(const Exec& ex, matrix_view<const T> h, const positions& pos, matrix_view<const T> dout,
                matrix_view<DG> dgates, matrix_view<T> dh, const params_type& grads, index_t trained = newest) const {
    backward_checked(ex, h, pos, dout, matrix_view<const acc_t<T>>(dgates), dh, grads, trained, nullptr);
  }
  /// Either of the above after a forward that filled `saved` (same modules, h and positions).
  template <class Exec, class DG>
    requires gate_gradient_for<DG, T>
  void backward(const Exec& ex, matrix_view<const T> h, const positions& pos, matrix_view<const T> dout,
                matrix_view<DG> dgates, matrix_view<T> dh, const params_type& grads, const saved_activations<T>& saved,
                index_t trained = newest) const {
    backward_checked(ex, h, pos, dout, matrix_view<const std::remove_const_t<DG>>(dgates), dh, grads, trained, &saved);
  }

 private:
  template <class Exec>
  void forward_checked(const Exec& ex, matrix_view<const T> h, const positions& pos, matrix_view<T> out,
                       matrix_view<T> gates, saved_activations<T>* saved) const {
    intervention::template check_exec<Exec, host_space>();
    require<shape_error>(size() >= 1, "intervention_stack::forward: the stack is empty (append a module first)");
    check_common(h, pos, "intervention_stack::forward");
    intervention::check_same_shape(out, h, "intervention_stack::forward: out");
    require_rows_contiguous(out, "intervention_stack::forward: out");
    intervention::check_in_place_or_disjoint(out, h, "intervention_stack::forward: out and h");
    require<shape_error>(gates.extent(0) == size() && gates.extent(1) == pos.size(),
                         "intervention_stack::forward: gates: expected shape [", size(), ", ", pos.size(),
                         "] (modules × positions), got ", detail::shape_string(gates));
    const auto views = module_views();
    detail::run_forward<intervention>(ex, std::span<const params_type>(views), scale(), h, pos, out, gates, saved);
  }
  template <class Exec, class DG>
  void backward_checked(const Exec& ex, matrix_view<const T> h, const positions& pos, matrix_view<const T> dout,
                        matrix_view<const DG> dgates, matrix_view<T> dh, const params_type& grads, index_t trained,
                        const saved_activations<T>* saved) const {
    intervention::template check_exec<Exec, host_space>();
    require<shape_error>(size() >= 1, "intervention_stack::backward: the stack is empty (append a module first)");
    // Only `newest` (-1) names the last module: any other negative index is a caller's mistake,
    // not a Python-style index from the end.
    if (trained == newest) trained = size() - 1;
    checked(trained);
    check_common(h, pos, "intervention_stack::backward");
    require<shape_error>(dgates.size() == 0 || (dgates.extent(0) == size() && dgates.extent(1) == pos.size()),
                         "intervention_stack::backward: dgates: expected shape [", size(), ", ", pos.size(),
                         "] or empty, got ", detail::shape_string(dgates));
    intervention::check_backward_outputs(h, pos, dout, dgates.size() == 0 ? 0 : 1, pos.size(), dh, grads,
                                         "intervention_stack::backward");
    const auto views = module_views();
    detail::run_backward<intervention>(ex, std::span<const params_type>(views), scale(), trained, h, pos, dout, dgates,
                                       dh, grads, saved, "intervention_stack::backward");
  }

  std::size_t checked(index_t k) const {
    require<shape_error>(k >= 0 && k < size(), "intervention_stack: module index ", k, " out of range [0, ", size(), ")");
    return std::size_t(k);
  }
  void check_common(matrix_view<const T> h, const positions& pos, const char* what) const {
    require<shape_error>(h.extent(1) == d_, what, ": h: expected ", d_, " columns (the stack's d), got shape ",
                         detail::shape_string(h));
    require_rows_contiguous(h, what);
    pos.validate(h.extent(0), what);
  }
  std::vector<params_type> module_views() const {
    std::vector<params_type> v;
    v.reserve(modules_.size());
    for (const auto& m : modules_) v.push_back(*m);
    return v;
  }

  index_t d_;
  double a_, b_;
  // A deque: append never moves the existing elements, so the references append(), module() and
  // owned_module() return stay valid as the stack grows (a vector's reallocation freed them).
  std::deque<owned_params<params_type>> modules_;
};

}  // namespace grun
