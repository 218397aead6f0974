#pragma once
// grun/intervention.hpp — the gated intervention (GRUN, Ren et al. 2025, arXiv 2502.17823, eq. 3):
//
//     h' = h + g(h) · Δ(h)          on the selected rows of h [N, d]; other rows pass through
//
// composed at compile time from a gate policy (gate/), a ReFT parameterization (reft/) and an
// orthogonality policy (ortho/):
//
//     using unlearner = grun::gated_intervention<grun::gate::linear, grun::reft::loreft<4>>;
//     unlearner::module<float> m(d, /*seed=*/1);
//     m.forward(grun::exec::host, h, grun::positions::last_prompt_token(lengths, S), out, gates);
//
// Execution dispatches on the executor through detail::intervention_impl<Exec, Intervention>, a
// primary template that fails with "grun: no forward for gated_intervention on exec::cuda" until
// kernels/ specializes it (partially, for exec::cuda_t and any gated_intervention<G, R, O>) — no edit
// of this header needed. The specialization for exec::host lives here; both sides call the same
// GRUN_HD row math (forward_row / backward_row).
#include <algorithm>
#include <atomic>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <span>
#include <thread>
#include <type_traits>
#include <vector>

#include "concepts.hpp"
#include "exec/host.hpp"  // before cuda.hpp, which names exec::host_t
#include "exec/cuda.hpp"
#include "init.hpp"
#include "positions.hpp"
#include "rowmath.hpp"
#include "saved_activations.hpp"

namespace grun {

namespace detail {
struct missing_default_ortho {};
template <class R> struct default_ortho { using type = missing_default_ortho; };
template <class R> requires requires { typename R::default_ortho; }
struct default_ortho<R> { using type = typename R::default_ortho; };
template <class> inline constexpr bool dependent_false = false;
}  // namespace detail
template <class Reft> using default_ortho_t = typename detail::default_ortho<Reft>::type;

/// What a backward's dgates (the external dL/dg of a gate loss) may hold for storage type T: T itself
/// (what autograd hands back for a T gates tensor) or the accumulate type acc_t<T>, which is what grun's
/// gate losses write (loss::grads<T>::gate). The difference matters for half: gate_bce's gradient on a
/// saturated gate is w/(G·ε) — 1/(16·1e-6) = 62500 is at half's limit (65504), fewer gate values pass it
/// — and a rounding to T on the way would turn it into inf. Either way the kernels read it as acc_t<T>.
template <class G, class T>
concept gate_gradient_for = std::same_as<std::remove_const_t<G>, T> || std::same_as<std::remove_const_t<G>, acc_t<T>>;

/// The parameters of one module: an aggregate { gate; reft; } of the policies' parameter aggregates.
/// With a parametrizing ortho policy (householder), reft.rotate_layer holds the raw tensor.
template <class I, class T, class Space = host_space>
struct module_params {
  using value_type = T;
  typename I::gate_type::template params<T, Space> gate;
  typename I::reft_type::template params<T, Space> reft;
};

template <class Gate, class Reft, class Ortho> struct gated_intervention;

namespace detail {
/// Forward / backward through the executor with an optional saved_activations (null: none).
/// exec::host saves where the gate has a saved form; an executor whose intervention_impl has
/// forward_keeping / backward_from_kept saves what it can (exec::cuda), others record the call's
/// shape only.
template <class I, class Exec, class T, class S>
void run_forward(const Exec& ex, std::span<const module_params<I, T, S>> modules, double scale,
                 matrix_view<const T, S> h, const positions& pos, matrix_view<T, S> out, matrix_view<T, S> gates,
                 saved_activations<T>* saved);
template <class I, class Exec, class T, class S, class DG>
void run_backward(const Exec& ex, std::span<const module_params<I, T, S>> modules, double scale, index_t trained,
                  matrix_view<const T, S> h, const positions& pos, matrix_view<const T, S> dout,
                  matrix_view<const DG, S> dgates, matrix_view<T, S> dh, const module_params<I, T, S>& grads,
                  const saved_activations<T>* saved, const char* what);

/// The dispatch seam. Specialize for (executor, gated_intervention<G, R, O>) with
///   template <class T, class S> static void forward(const Exec&, std::span<const module_params<I, T, S>> modules,
///       double scale, matrix_view<const T, S> h, const positions&, matrix_view<T, S> out, matrix_view<T, S> gates);
///   template <class T, class S> static void backward(const Exec&, std::span<const module_params<I, T, S>> modules,
///       double scale, index_t trained, matrix_view<const T, S> h, const positions&, matrix_view<const T, S> dout,
///       matrix_view<const DG, S> dgates, matrix_view<T, S> dh, const module_params<I, T, S>& grads);
///   (backward also templated on DG, dgates' element type: T or acc_t<T>, see gate_gradient_for)
/// computing  h' = h + scale · Σ_k g_k Δ_k  (gates [K, P]) and its backward, parameter gradients for
/// module `trained` only (overwritten). Inputs arrive validated.
template <class Exec, class I>
struct intervention_impl {
  template <class... A> static void forward(A&&...) {
    static_assert(dependent_false<Exec>, "grun: no forward for gated_intervention on this executor");
  }
  template <class... A> static void backward(A&&...) {
    static_assert(dependent_false<Exec>, "grun: no backward for gated_intervention on this executor");
  }
};
template <class I>
struct intervention_impl<exec::cuda_t, I> {
  template <class... A> static void forward(A&&...) {
    static_assert(dependent_false<I>,
                  "grun: no forward for gated_intervention on exec::cuda (its kernels are not included: compile "
                  "with nvcc and include the kernels/ header that specializes detail::intervention_impl)");
  }
  template <class... A> static void backward(A&&...) {
    static_assert(dependent_false<I>,
                  "grun: no backward for gated_intervention on exec::cuda (its kernels are not included: compile "
                  "with nvcc and include the kernels/ header that specializes detail::intervention_impl)");
  }
};
}  // namespace detail

template <class Gate, class Reft, class Ortho = default_ortho_t<Reft>>
struct gated_intervention {
  // ---- compile-time contract, one message per missing piece --------------------------------
  static_assert(has_policy_name<Gate>, "grun::gated_intervention: Gate lacks `static constexpr const char* name`");
  static_assert(has_params_template<Gate>,
                "grun::gated_intervention: Gate lacks `template <class T, class Space> struct params` (an aggregate)");
  static_assert(has_param_names<Gate>, "grun::gated_intervention: Gate lacks `static constexpr std::array<std::string_view, "
                                       "N> param_names` with one name per params field");
  static_assert(has_shape<Gate>, "grun::gated_intervention: Gate lacks `static void shape(params&, index_t d)`");
  static_assert(has_scratch_size<Gate>, "grun::gated_intervention: Gate lacks `static index_t scratch_size(index_t d)`");
  static_assert(gate_has_forward<Gate>,
                "grun::gated_intervention: Gate lacks `static Acc forward(const params&, const Acc* h, index_t d, Acc* scratch)`");
  static_assert(gate_has_backward<Gate>,
                "grun::gated_intervention: Gate lacks `static void backward(const params&, const grads&, const Acc* h, "
                "index_t d, Acc* scratch, Acc g, Acc dg, Acc* dh)`");
  static_assert(has_policy_name<Reft>, "grun::gated_intervention: Reft lacks `static constexpr const char* name`");
  static_assert(has_params_template<Reft>,
                "grun::gated_intervention: Reft lacks `template <class T, class Space> struct params` (an aggregate)");
  static_assert(has_param_names<Reft>, "grun::gated_intervention: Reft lacks `static constexpr std::array<std::string_view, "
                                       "N> param_names` with one name per params field");
  static_assert(has_shape<Reft>, "grun::gated_intervention: Reft lacks `static void shape(params&, index_t d)`");
  static_assert(has_scratch_size<Reft>, "grun::gated_intervention: Reft lacks `static index_t scratch_size(index_t d)`");
  static_assert(reft_has_rank<Reft>, "grun::gated_intervention: Reft lacks `static constexpr index_t rank`");
  static_assert(reft_has_rotation_flag<Reft>, "grun::gated_intervention: Reft lacks `static constexpr bool has_rotation`");
  static_assert(reft_has_rotation_accessor<Reft>,
                "grun::gated_intervention: Reft has_rotation but lacks `static param& rotation(params&)`");
  static_assert(reft_has_forward<Reft>, "grun::gated_intervention: Reft lacks `static void forward(const params&, const "
                                        "Acc* h, index_t d, Acc* delta, Acc* scratch)`");
  static_assert(reft_has_backward<Reft>, "grun::gated_intervention: Reft lacks `static void backward(const params&, const "
                                         "grads&, const Acc* h, index_t d, Acc* scratch, const Acc* ddelta, Acc* dh)`");
  static_assert(!std::is_same_v<Ortho, detail::missing_default_ortho>,
                "grun::gated_intervention: Reft lacks `using default_ortho`; name an ortho policy explicitly");
  static_assert(ortho_policy<Ortho>, "grun::gated_intervention: Ortho is not an ortho_policy (needs name, "
                                     "requires_rotation, is_parametrization, retract, and materialize/pullback "
                                     "when it is a parametrization)");
  static_assert(!Ortho::requires_rotation || Reft::has_rotation,
                "grun::gated_intervention: this Ortho policy constrains a rotation R, but the Reft has none "
                "(has_rotation = false); use ortho::none");

  using gate_type = Gate;
  using reft_type = Reft;
  using ortho_type = Ortho;
  static constexpr index_t rank = Reft::rank;

  /// { gate; reft; } parameter views of storage type T.
  template <class T, class Space = host_space> using params = module_params<gated_intervention, T, Space>;
  template <class T> class module;

  /// Shape-only parameters (null data) for hidden size d: feed to owned_params to allocate.
  template <class T = float, class Space = host_space>
  static params<T, Space> shape(index_t d) {
    require<shape_error>(d >= 1, "gated_intervention::shape: expected hidden size d >= 1, got ", d);
    if constexpr (Ortho::requires_rotation)
      require<shape_error>(d >= Reft::rank, "gated_intervention::shape: ", Ortho::name, " needs d >= rank r, got d = ",
                           d, ", r = ", Reft::rank);
    params<T, Space> p{};
    Gate::shape(p.gate, d);
    Reft::shape(p.reft, d);
    return p;
  }

  // ---- row math (GRUN_HD: shared by the host loop and the CUDA kernels) --------------------
  GRUN_HD static constexpr index_t scratch_size(index_t d) { return Gate::scratch_size(d) + Reft::scratch_size(d); }

  /// g(h) returned, Δ(h) written to delta [d]; scratch [scratch_size(d)] keeps what backward needs.
  template <class Acc, class P>
  GRUN_HD static Acc forward_row(const P& p, const Acc* h, index_t d, Acc* delta, Acc* scratch) {
    Reft::forward(p.reft, h, d, delta, scratch + Gate::scratch_size(d));
    return Gate::forward(p.gate, h, d, scratch);
  }

  /// After forward_row (same scratch, g, delta), for a term  s · g(h) Δ(h)  of h':
  ///   dL/dg = dg_ext + s · doutᵀΔ,   dL/dΔ = s · g · dout   (into work [d]),
  ///   grads += dL/dθ,  dh += the gate and ReFT paths of dL/dh (the identity is the caller's).
  template <class Acc, class P, class G>
  GRUN_HD static void backward_row(const P& p, const G& grads, const Acc* h, index_t d, Acc* scratch, Acc g,
                                   const Acc* delta, const Acc* dout, Acc dg_ext, Acc s, Acc* work, Acc* dh) {
    Acc dg = dg_ext;
    const Acc sg = s * g;
    for (index_t j = 0; j < d; ++j) work[j] = sg * dout[j];
    dg += s * detail::dot<Acc>(dout, delta, d);
    Reft::backward(p.reft, grads.reft, h, d, scratch + Gate::scratch_size(d), work, dh);
    Gate::backward(p.gate, grads.gate, h, d, scratch, g, dg, dh);
  }

  // ---- the public operations --------------------------------------------------------------
  /// out = h with rows at `pos` replaced by h + g(h)Δ(h); gates [P] = g at each position.
  /// out may be h itself (in place) or must not overlap it. h: [N, d], out: [N, d], gates: [P].
  template <class Exec, class T, class S>
  static void forward(const Exec& ex, const params<T, S>& p, std::type_identity_t<matrix_view<const T, S>> h,
                      const positions& pos, std::type_identity_t<matrix_view<T, S>> out,
                      std::type_identity_t<vector_view<T, S>> gates) {
    forward_checked(ex, p, h, pos, out, gates, static_cast<saved_activations<T>*>(nullptr));
  }
  /// The same, keeping in `saved` what the backward would otherwise recompute (see saved_activations).
  template <class Exec, class T, class S>
  static void forward(const Exec& ex, const params<T, S>& p, std::type_identity_t<matrix_view<const T, S>> h,
                      const positions& pos, std::type_identity_t<matrix_view<T, S>> out,
                      std::type_identity_t<vector_view<T, S>> gates, saved_activations<T>& saved) {
    forward_checked(ex, p, h, pos, out, gates, &saved);
  }

  /// Backward of forward: dh [N, d] = dL/dh (identity + gate path + ReFT path; dh may be dout itself),
  /// grads = dL/dθ (overwritten). dgates [P] adds an external dL/dg (a gate loss); an empty view means none.
  template <class Exec, class T, class S>
  static void backward(const Exec& ex, const params<T, S>& p, std::type_identity_t<matrix_view<const T, S>> h,
                       const positions& pos, std::type_identity_t<matrix_view<const T, S>> dout,
                       std::type_identity_t<vector_view<const T, S>> dgates, std::type_identity_t<matrix_view<T, S>> dh,
                       const params<T, S>& grads) {
    backward_checked(ex, p, h, pos, dout, dgates, dh, grads, static_cast<const saved_activations<T>*>(nullptr));
  }
  /// The same with dgates in the accumulate type acc_t<T> (fp32 for half and bfloat16 storage), as grun's
  /// gate losses write it: no rounding to T on the way (see gate_gradient_for).
  template <class Exec, class T, class S, class DG>
    requires(!std::same_as<T, acc_t<T>> && std::same_as<std::remove_const_t<DG>, acc_t<T>>)
  static void backward(const Exec& ex, const params<T, S>& p, std::type_identity_t<matrix_view<const T, S>> h,
                       const positions& pos, std::type_identity_t<matrix_view<const T, S>> dout,
                       tensor_view<DG, 1, S> dgates, std::type_identity_t<matrix_view<T, S>> dh, const params<T, S>& grads) {
    backward_checked(ex, p, h, pos, dout, vector_view<const acc_t<T>, S>(dgates), dh, grads,
                     static_cast<const saved_activations<T>*>(nullptr));
  }
  /// Either of the above after a forward that filled `saved` (same parameters, h and positions).
  template <class Exec, class T, class S, class DG>
    requires gate_gradient_for<DG, T>
  static void backward(const Exec& ex, const params<T, S>& p, std::type_identity_t<matrix_view<const T, S>> h,
                       const positions& pos, std::type_identity_t<matrix_view<const T, S>> dout,
                       tensor_view<DG, 1, S> dgates, std::type_identity_t<matrix_view<T, S>> dh, const params<T, S>& grads,
                       const saved_activations<T>& saved) {
    backward_checked(ex, p, h, pos, dout, vector_view<const std::remove_const_t<DG>, S>(dgates), dh, grads, &saved);
  }

  /// Call after every optimizer step: keeps R on its constraint set (QR retraction); a no-op for
  /// ortho::none and for parametrizations (householder).
  template <class T, class S>
  static void retract(const params<T, S>& p) {
    if constexpr (Reft::has_rotation && !Ortho::is_parametrization) Ortho::retract(Reft::rotation(p.reft));
  }

  /// R [r, d] as the forward uses it (materialized for a parametrization; a copy otherwise). Host only.
  template <class T>
  static host_matrix<T> rotation(const params<T, host_space>& p) {
    static_assert(Reft::has_rotation, "grun::gated_intervention::rotation: this Reft has no rotation R");
    const auto& raw = Reft::rotation(p.reft);
    host_matrix<T> R(raw.rows, raw.cols);
    if constexpr (Ortho::is_parametrization) {
      std::vector<double> tmp(static_cast<std::size_t>(raw.size()));
      Ortho::materialize(raw, tmp.data());
      for (index_t i = 0; i < raw.size(); ++i) R.storage[i] = store<T>(tmp[i]);
    } else {
      for (index_t i = 0; i < raw.size(); ++i) R.storage[i] = raw[i];
    }
    return R;
  }

  // ---- host-side validation shared with intervention_stack -------------------------------
  template <class Exec, class S>
  static void check_exec() {
    static_assert(executor<Exec>, "grun::gated_intervention: the first argument must be an executor (exec::host, exec::cuda)");
    static_assert(std::is_same_v<S, typename Exec::memory_space>,
                  "grun::gated_intervention: parameters and tensors must live in the executor's memory space "
                  "(host_space for exec::host, cuda_space for exec::cuda)");
  }
  template <class T, class S>
  static void check_params(const params<T, S>& p, index_t d, const char* what) {
    const params<T, S> expected = shape<T, S>(d);
    index_t leaf = 0;
    auto check = [&](const auto& e, const auto& g, const auto& names, const char* group) {
      index_t i = 0;
      for_each_param_pair(e, g, [&](const auto& el, const auto& gl) {
        const std::string field = std::string(group) + "." +
                                  (i < index_t(names.size()) ? std::string(names[std::size_t(i)]) : std::to_string(i));
        require<shape_error>(el.rows == gl.rows && el.cols == gl.cols, what, ": parameter ", field, " expected shape [",
                             el.rows, ", ", el.cols, "] for d = ", d, ", got [", gl.rows, ", ", gl.cols, "]");
        require<shape_error>(gl.size() == 0 || gl.data != nullptr, what, ": parameter ", field, " has no storage (null data)");
        ++i;
        ++leaf;
      });
    };
    check(expected.gate, p.gate, Gate::param_names, "gate");
    check(expected.reft, p.reft, Reft::param_names, "reft");
  }
  template <class V, class W>
  static void check_same_shape(const V& v, const W& ref, const char* what) {
    require<shape_error>(v.extent(0) == ref.extent(0) && v.extent(1) == ref.extent(1), what, ": expected shape ",
                         detail::shape_string(ref), ", got ", detail::shape_string(v));
  }
  template <class V, class W>
  static bool overlaps(const V& a, const W& b) {
    if (a.size() == 0 || b.size() == 0) return false;
    auto range = [](const auto& v) {
      using E = typename std::remove_cvref_t<decltype(v)>::element_type;
      index_t last = 0;
      for (int i = 0; i < std::remove_cvref_t<decltype(v)>::rank; ++i) last += (v.extent(i) - 1) * v.stride(i);
      const auto lo = reinterpret_cast<std::uintptr_t>(v.data());
      return std::pair{lo, lo + std::uintptr_t(last + 1) * sizeof(E)};
    };
    const auto [alo, ahi] = range(a);
    const auto [blo, bhi] = range(b);
    return alo < bhi && blo < ahi;
  }
  template <class V, class W>
  static void check_in_place_or_disjoint(const V& a, const W& b, const char* what) {
    const bool same = static_cast<const void*>(a.data()) == static_cast<const void*>(b.data()) &&
                      a.stride(0) == b.stride(0) && a.stride(1) == b.stride(1);
    require<shape_error>(same || !overlaps(a, b), what,
                         ": expected the same tensor (in place) or non-overlapping memory, got partially overlapping views");
  }
  template <class T, class S>
  static void check_inputs(const params<T, S>& p, matrix_view<const T, S> h, const positions& pos, const char* what) {
    require<shape_error>(h.extent(1) >= 1, what, ": h must be [N, d] with d >= 1, got shape ", detail::shape_string(h));
    require_rows_contiguous(h, (std::string(what) + ": h").c_str());
    check_params(p, h.extent(1), what);
    pos.validate(h.extent(0), what);
  }
  template <class T, class S>
  static void check_backward_outputs(matrix_view<const T, S> h, const positions& pos, matrix_view<const T, S> dout,
                                     index_t dgates_rows, index_t dgates_cols, matrix_view<T, S> dh,
                                     const params<T, S>& grads, const char* what) {
    const std::string w(what);
    check_same_shape(dout, h, (w + ": dout").c_str());
    check_same_shape(dh, h, (w + ": dh").c_str());
    require_rows_contiguous(dout, (w + ": dout").c_str());
    require_rows_contiguous(dh, (w + ": dh").c_str());
    check_in_place_or_disjoint(dh, dout, (w + ": dh and dout").c_str());
    require<shape_error>(!overlaps(dh, h), what, ": dh must not overlap h");
    require<shape_error>(dgates_rows == 0 || dgates_cols == pos.size(), what,
                         ": dgates must be empty (no gate loss) or hold one value per position: expected ", pos.size(),
                         ", got ", dgates_cols);
    check_params(grads, h.extent(1), (w + " (grads)").c_str());
  }
  template <class Exec, class T, class S>
  static void forward_checked(const Exec& ex, const params<T, S>& p, matrix_view<const T, S> h, const positions& pos,
                              matrix_view<T, S> out, vector_view<T, S> gates, saved_activations<T>* saved) {
    check_exec<Exec, S>();
    check_inputs(p, h, pos, "gated_intervention::forward");
    check_same_shape(out, h, "gated_intervention::forward: out");
    require_rows_contiguous(out, "gated_intervention::forward: out");
    check_in_place_or_disjoint(out, h, "gated_intervention::forward: out and h");
    require_extent(gates, 0, pos.size(), "gated_intervention::forward: gates (one per position)");
    const params<T, S> one[1] = {p};
    detail::run_forward<gated_intervention>(ex, std::span<const params<T, S>>(one), 1.0, h, pos, out, as_rows(gates),
                                            saved);
  }
  template <class Exec, class T, class S, class DG>
  static void backward_checked(const Exec& ex, const params<T, S>& p, matrix_view<const T, S> h, const positions& pos,
                               matrix_view<const T, S> dout, vector_view<const DG, S> dgates, matrix_view<T, S> dh,
                               const params<T, S>& grads, const saved_activations<T>* saved) {
    static_assert(gate_gradient_for<DG, T>);
    check_exec<Exec, S>();
    check_inputs(p, h, pos, "gated_intervention::backward");
    check_backward_outputs(h, pos, dout, dgates.size() == 0 ? 0 : 1, dgates.size() == 0 ? 0 : dgates.extent(0), dh,
                           grads, "gated_intervention::backward");
    const params<T, S> one[1] = {p};
    detail::run_backward<gated_intervention>(ex, std::span<const params<T, S>>(one), 1.0, index_t(0), h, pos, dout,
                                             as_rows(dgates), dh, grads, saved, "gated_intervention::backward");
  }
  template <class V>
  static auto as_rows(const V& v) {  // [P] → [1, P]
    return tensor_view<typename V::value_type, 2, typename V::memory_space>(v.data(), {v.size() == 0 ? 0 : 1, v.extent(0)},
                                                                             {0, v.stride(0)});
  }
};

// ---- the host executor ----------------------------------------------------------------------
namespace detail {

template <class I, class Exec, class T, class S>
void run_forward(const Exec& ex, std::span<const module_params<I, T, S>> modules, double scale,
                 matrix_view<const T, S> h, const positions& pos, matrix_view<T, S> out, matrix_view<T, S> gates,
                 saved_activations<T>* saved) {
  using impl = intervention_impl<Exec, I>;
  if (!saved) return impl::forward(ex, modules, scale, h, pos, out, gates);
  const index_t K = index_t(modules.size()), P = pos.size(), d = h.extent(1);
  if constexpr (std::is_same_v<Exec, exec::host_t>) {
    impl::forward(ex, modules, scale, h, pos, out, gates, saved_access::begin(*saved, K, P, d, impl::saved_width(d)));
  } else if constexpr (requires { impl::forward_keeping(ex, modules, scale, h, pos, out, gates, *saved); }) {
    // The executor saves what its kernels can (saved_access::begin_on_device), or nothing.
    saved_access::begin(*saved, K, P, d, 0);
    saved_access::touching(*saved, ex, [&] { impl::forward_keeping(ex, modules, scale, h, pos, out, gates, *saved); });
  } else {
    saved_access::begin(*saved, K, P, d, 0);
    impl::forward(ex, modules, scale, h, pos, out, gates);
  }
  saved_access::finish(*saved);
}

template <class I, class Exec, class T, class S, class DG>
void run_backward(const Exec& ex, std::span<const module_params<I, T, S>> modules, double scale, index_t trained,
                  matrix_view<const T, S> h, const positions& pos, matrix_view<const T, S> dout,
                  matrix_view<const DG, S> dgates, matrix_view<T, S> dh, const module_params<I, T, S>& grads,
                  const saved_activations<T>* saved, const char* what) {
  using impl = intervention_impl<Exec, I>;
  constexpr bool on_host = std::is_same_v<Exec, exec::host_t>;
  const acc_t<T>* data =
      saved ? saved_access::use(*saved, index_t(modules.size()), pos.size(), h.extent(1), !on_host, what) : nullptr;
  if constexpr (on_host) {
    if (data) return impl::backward(ex, modules, scale, trained, h, pos, dout, dgates, dh, grads, data);
  } else if constexpr (requires { impl::backward_from_kept(ex, modules, scale, trained, h, pos, dout, dgates, dh, grads, data); }) {
    if (data)
      return saved_access::touching(*saved, ex, [&] {
        impl::backward_from_kept(ex, modules, scale, trained, h, pos, dout, dgates, dh, grads, data);
      });
  }
  impl::backward(ex, modules, scale, trained, h, pos, dout, dgates, dh, grads);
}

inline unsigned resolve_threads(unsigned t) {
  if (t == 0) t = std::thread::hardware_concurrency();
  return t == 0 ? 1 : t;
}

/// Runs f(block, worker) for block in [0, nblocks) on `threads` workers. Which worker runs a block
/// varies; callers make results depend only on the block, never on the worker.
template <class F>
void parallel_blocks(unsigned threads, index_t nblocks, F&& f) {
  const unsigned workers = static_cast<unsigned>(std::min<index_t>(threads, std::max<index_t>(nblocks, 1)));
  if (workers <= 1) {
    for (index_t b = 0; b < nblocks; ++b) f(b, 0u);
    return;
  }
  std::atomic<index_t> next{0};
  auto work = [&](unsigned w) {
    for (index_t b = next.fetch_add(1); b < nblocks; b = next.fetch_add(1)) f(b, w);
  };
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  for (unsigned w = 1; w < workers; ++w) pool.emplace_back(work, w);
  work(0u);
  for (auto& t : pool) t.join();
}

/// Scratch kept across calls on the calling thread, n scalars, contents unspecified (callers
/// write before they read). The gate block paths take a few MB a call: allocated fresh, glibc
/// gives them back to the system on free, and every call pays a page fault per 4 KB again.
template <class Acc, int Tag>
Acc* reusable_scratch(std::size_t n) {
  thread_local std::vector<Acc> kept;
  if (kept.size() < n) kept.resize(n);
  return kept.data();
}

/// n scalars set to 0: reusable_scratch up to 4M scalars (slots of gradients at small T would
/// otherwise be faulted in page by page on every call — at T = 1, d = 4096 that was 6× the
/// arithmetic), above that allocated into `fresh` and freed with it (a rare large call does not
/// keep its memory pinned to the thread).
template <class Acc, int Tag>
Acc* zeroed_scratch(index_t n, buffer<Acc>& fresh) {
  constexpr index_t kept_limit = index_t(4) * 1024 * 1024;
  if (n > kept_limit) {
    fresh = buffer<Acc>(n);
    return fresh.data();
  }
  Acc* const p = reusable_scratch<Acc, Tag>(std::size_t(n));
  std::fill_n(p, n, Acc(0));
  return p;
}

/// Points the leaves of a shaped aggregate into consecutive storage at `base`.
template <class P, class V>
P bind_params(P shaped, V* base) {
  index_t off = 0;
  for_each_param(shaped, [&](auto& leaf) { leaf.data = base + off; off += leaf.size(); });
  return shaped;
}

/// Copies a module's parameters into the compute type and materializes R for a parametrization.
template <class I, class Acc, class T>
owned_params<typename I::template params<Acc>> acc_params(const typename I::template params<T>& p, index_t d) {
  owned_params<typename I::template params<Acc>> a(I::template shape<Acc>(d));
  for_each_param_pair(*a, p, [](auto& dst, const auto& src) {
    for (index_t i = 0; i < src.size(); ++i) dst[i] = load<Acc>(src[i]);
  });
  if constexpr (I::ortho_type::is_parametrization) {
    const auto& raw = I::reft_type::rotation(p.reft);
    std::vector<double> R(static_cast<std::size_t>(raw.size()));
    I::ortho_type::materialize(raw, R.data());
    auto& dst = I::reft_type::rotation(a->reft);
    for (index_t i = 0; i < raw.size(); ++i) dst[i] = static_cast<Acc>(R[i]);
  }
  return a;
}

/// Copies the rows of src not selected by `mask` into dst (skipped when they are the same tensor).
template <class T, class U>
void copy_unselected(const exec::host_t& ex, matrix_view<const T> src, matrix_view<U> dst, const std::vector<char>& mask) {
  if (static_cast<const void*>(src.data()) == static_cast<const void*>(dst.data()) && src.stride(0) == dst.stride(0)) return;
  const index_t n = src.extent(0), d = src.extent(1), block = 256;
  parallel_blocks(resolve_threads(ex.threads), (n + block - 1) / block, [&](index_t b, unsigned) {
    for (index_t i = b * block; i < std::min(n, (b + 1) * block); ++i)
      if (!mask[std::size_t(i)]) std::memcpy(static_cast<void*>(dst.row(i)), src.row(i), sizeof(T) * std::size_t(d));
  });
}

template <class G, class R, class O>
struct intervention_impl<exec::host_t, gated_intervention<G, R, O>> {
  using I = gated_intervention<G, R, O>;
  static constexpr index_t forward_block = 16;
  /// Pointers to each module's parameters in the compute type Acc: the caller's own when they are
  /// already Acc and used as stored (no copy: 4 MB per call for an mlp gate at d = 4096), else
  /// converted (and R materialized) into `owned`.
  template <class Acc, class T, class S>
  static std::vector<const typename I::template params<Acc>*> compute_params(
      std::span<const module_params<I, T, S>> modules, index_t d,
      std::vector<owned_params<typename I::template params<Acc>>>& owned) {
    std::vector<const typename I::template params<Acc>*> out;
    out.reserve(modules.size());
    owned.reserve(modules.size());
    for (const auto& m : modules) {
      if constexpr (std::is_same_v<T, Acc> && std::is_same_v<S, host_space> && !O::is_parametrization) {
        out.push_back(&m);
      } else {
        owned.push_back(acc_params<I, Acc, T>(m, d));
        out.push_back(&*owned.back());
      }
    }
    return out;
  }
  /// Row stride of a block's row buffers: d plus one cache line, so rows d = 4096 floats apart
  /// do not all map to the same cache sets when a kernel reads one chunk of every row.
  static index_t padded_stride(index_t d) { return d + 16; }
  /// Gates with a host block form (forward_block / backward_block over host_block_rows rows).
  static constexpr bool gate_blocks = requires { G::host_block_rows; };
  /// Block gates that form their first layer's weight gradient as one GEMM over all rows
  /// (backward_block_rows per block, then first_layer_weight_grad over columns).
  static constexpr bool gate_weight_gemm = gate_blocks && requires { G::host_weight_grad_gemm; };
  /// A row as Acc: the row itself when it is stored as Acc (read in place: no copy through the
  /// cache), else widened into buf. Rows are read-only here, and dh (which may alias dout) is
  /// written only after the last read of its block's dout rows.
  template <class T, class Acc>
  static const Acc* widened_row(const T* row, Acc* buf, index_t d) {
    if constexpr (std::is_same_v<T, Acc>) {
      return row;
    } else {
      for (index_t j = 0; j < d; ++j) buf[j] = load<Acc>(row[j]);
      return buf;
    }
  }
  /// ReFTs with a host block form (forward_block / backward_block over any number of rows).
  static constexpr bool reft_blocks = requires { R::host_block_rows; };
  /// Rows in blocks when either policy has a block form: the gate's block size if it has one, else
  /// the ReFT's; within a block the ReFT takes reft_rows at a time (1: row by row).
  static constexpr bool row_blocks = gate_blocks || reft_blocks;
  // constexpr, not consteval: clang 14 rejects a consteval member called from another member of a
  // class template (the call is an immediate invocation in a dependent context it will not fold).
  static constexpr index_t reft_rows() {
    if constexpr (reft_blocks) return R::host_block_rows;
    else return 1;
  }
  static constexpr index_t block_rows() {
    if constexpr (gate_blocks) return G::host_block_rows;
    else return reft_rows();
  }
  /// The policies' block forms where they have one, else their row functions row by row (which
  /// give the same values: a block form is bit for bit its row function on each row).
  template <class PG, class Acc>
  static void gate_forward_rows(const PG& p, const Acc* const* h, index_t nb, index_t d, Acc* const* scratch, Acc* g) {
    if constexpr (gate_blocks) G::forward_block(p, h, nb, d, scratch, g);
    else
      for (index_t b = 0; b < nb; ++b) g[b] = G::forward(p, h[b], d, scratch[b]);
  }
  template <class Acc>
  static void save_gate_rows(Acc* dst, index_t nb, index_t gs, Acc* const* scratch, const Acc* g) {
    for (index_t b = 0; b < nb; ++b, dst += gs + 1) {
      std::copy_n(scratch[b], gs, dst);
      dst[gs] = g[b];
    }
  }
  template <class Acc>
  static void load_gate_rows(const Acc* src, index_t nb, index_t gs, Acc* const* scratch, Acc* g) {
    for (index_t b = 0; b < nb; ++b, src += gs + 1) {
      std::copy_n(src, gs, scratch[b]);
      g[b] = src[gs];
    }
  }
  template <class PR, class Acc>
  static void reft_forward_rows(const PR& p, const Acc* const* h, index_t nb, index_t d, Acc* const* delta, Acc* const* scratch) {
    if constexpr (reft_blocks) R::forward_block(p, h, nb, d, delta, scratch);
    else
      for (index_t b = 0; b < nb; ++b) R::forward(p, h[b], d, delta[b], scratch[b]);
  }
  template <class PR, class GR, class Acc>
  static void reft_backward_rows(const PR& p, const GR& grads, const Acc* const* h, index_t nb, index_t d, Acc* const* scratch,
                                 Acc* const* ddelta, Acc* const* dh) {
    if constexpr (reft_blocks) R::backward_block(p, grads, h, nb, d, scratch, ddelta, dh);
    else
      for (index_t b = 0; b < nb; ++b) R::backward(p, grads, h[b], d, scratch[b], ddelta[b], dh[b]);
  }
  /// Scalars a forward saves per selected row and module for its backward (saved_activations): the
  /// block gate's scratch (gate::mlp: a1, a2) and g, so the backward skips the gate's forward — for
  /// gate::mlp the first-layer GEMM, a quarter of its fwd+bwd arithmetic. 0: nothing worth saving
  /// (a linear gate's recompute is one dot over a row the backward reads anyway).
  static index_t saved_width(index_t d) {
    if constexpr (gate_blocks) return G::scratch_size(d) + 1;
    else return 0;
  }
  /// The layout of a block's gradient slot: every parameter but the weight a gate_weight_gemm gate
  /// forms apart (its rows set to 0, so the slot holds none of it).
  template <class P>
  static P slot_shape(P shaped) {
    if constexpr (gate_weight_gemm) G::first_layer_weight(shaped.gate).rows = 0;
    return shaped;
  }

  /// saved: null, or [K][P][saved_width(d)] to fill for backward (module-major, positions in order).
  template <class T, class S>
  static void forward(const exec::host_t& ex, std::span<const module_params<I, T, S>> modules, double scale,
                      matrix_view<const T, S> h, const positions& pos, matrix_view<T, S> out, matrix_view<T, S> gates,
                      acc_t<T>* saved = nullptr) {
    using Acc = acc_t<T>;
    const index_t n = h.extent(0), d = h.extent(1), P = pos.size(), K = index_t(modules.size());
    std::vector<owned_params<typename I::template params<Acc>>> owned;
    const auto pa = compute_params<Acc>(modules, d, owned);
    std::vector<char> mask(std::size_t(n), 0);
    for (index_t q = 0; q < P; ++q) mask[std::size_t(pos[q])] = 1;
    copy_unselected(ex, h, out, mask);

    const unsigned threads = resolve_threads(ex.threads);
    const Acc s = static_cast<Acc>(scale);
    if constexpr (row_blocks) {
      // Block forms (mlp gate: W1 read once per block of rows, not once per row; loreft: R and W
      // once per block), each bit for bit its row function.
      constexpr index_t B = block_rows(), RB = reft_rows();
      const index_t nblocks = (P + B - 1) / B;
      const index_t gs = G::scratch_size(d), rs = R::scratch_size(d);
      const index_t ld = padded_stride(d);
      const index_t ws = B * (2 * ld + gs + 1) + RB * (ld + rs);
      const index_t nworkers = std::min<index_t>(threads, std::max<index_t>(nblocks, 1));
      Acc* const work = reusable_scratch<Acc, 0>(std::size_t(nworkers * ws));
      parallel_blocks(threads, nblocks, [&](index_t blk, unsigned w) {
        const index_t q0 = blk * B, nb = std::min(P, q0 + B) - q0;
        Acc* base = work + w * ws;
        const Acc* hx[B];
        Acc *hbuf[B], *sum[B], *gscr[B], *delta[RB], *rscr[RB];
        for (index_t b = 0; b < B; ++b) {
          hbuf[b] = base + b * ld;
          sum[b] = base + (B + b) * ld;
          gscr[b] = base + 2 * B * ld + b * gs;
        }
        Acc* gv = base + B * (2 * ld + gs);
        for (index_t b = 0; b < RB; ++b) {
          delta[b] = gv + B + b * ld;
          rscr[b] = gv + B + RB * ld + b * rs;
        }
        for (index_t b = 0; b < nb; ++b) {
          const T* hr = h.row(pos[q0 + b]);
          hx[b] = widened_row(hr, hbuf[b], d);
          for (index_t j = 0; j < d; ++j) sum[b][j] = Acc(0);
        }
        for (index_t k = 0; k < K; ++k) {
          const auto& pk = *pa[std::size_t(k)];
          gate_forward_rows(pk.gate, hx, nb, d, gscr, gv);
          if (saved) save_gate_rows(saved + (k * P + q0) * (gs + 1), nb, gs, gscr, gv);
          for (index_t r0 = 0; r0 < nb; r0 += RB) {
            const index_t rb = std::min(RB, nb - r0);
            reft_forward_rows(pk.reft, hx + r0, rb, d, delta, rscr);
            for (index_t b = 0; b < rb; ++b) {
              gates(k, q0 + r0 + b) = store<T>(gv[r0 + b]);
              grun::detail::axpy_row(gv[r0 + b], delta[b], sum[r0 + b], d);
            }
          }
        }
        for (index_t b = 0; b < nb; ++b) {
          T* o = out.row(pos[q0 + b]);
          for (index_t j = 0; j < d; ++j) o[j] = store<T>(hx[b][j] + s * sum[b][j]);
        }
      });
      return;
    }
    const index_t nblocks = (P + forward_block - 1) / forward_block;
    const index_t ws = 3 * d + I::scratch_size(d);
    const index_t workers = std::min<index_t>(threads, std::max<index_t>(nblocks, 1));
    Acc* const work = reusable_scratch<Acc, 0>(std::size_t(workers * ws));
    parallel_blocks(threads, nblocks, [&](index_t b, unsigned w) {
      Acc* hx = work + w * ws;
      Acc* delta = hx + d;
      Acc* sum = delta + d;
      Acc* scratch = sum + d;
      for (index_t q = b * forward_block; q < std::min(P, (b + 1) * forward_block); ++q) {
        const index_t row = pos[q];
        const T* hr = h.row(row);
        for (index_t j = 0; j < d; ++j) { hx[j] = load<Acc>(hr[j]); sum[j] = Acc(0); }
        for (index_t k = 0; k < K; ++k) {
          const Acc g = I::forward_row(*pa[std::size_t(k)], hx, d, delta, scratch);
          gates(k, q) = store<T>(g);
          for (index_t j = 0; j < d; ++j) sum[j] += g * delta[j];
        }
        T* o = out.row(row);
        for (index_t j = 0; j < d; ++j) o[j] = store<T>(hx[j] + s * sum[j]);
      }
    });
  }

  /// saved: null (the gate is recomputed), or what forward saved for these modules, h and positions.
  template <class T, class S, class DG>
  static void backward(const exec::host_t& ex, std::span<const module_params<I, T, S>> modules, double scale,
                       index_t trained, matrix_view<const T, S> h, const positions& pos, matrix_view<const T, S> dout,
                       matrix_view<const DG, S> dgates, matrix_view<T, S> dh, const module_params<I, T, S>& grads,
                       const acc_t<T>* saved = nullptr) {
    using Acc = acc_t<T>;
    using PA = typename I::template params<Acc>;
    const index_t n = h.extent(0), d = h.extent(1), P = pos.size(), K = index_t(modules.size());
    std::vector<owned_params<PA>> owned;
    const auto pa = compute_params<Acc>(modules, d, owned);
    std::vector<char> mask(std::size_t(n), 0);
    for (index_t q = 0; q < P; ++q) mask[std::size_t(pos[q])] = 1;
    copy_unselected(ex, dout, dh, mask);

    // Parameter gradients: each block of positions accumulates into its own slot, and slots are
    // summed in block order, so the result depends on P (and the parameter count) only — never on
    // the number of threads. At most 64 slots, and at most ~32M scalars of slots in all. A
    // gate_weight_gemm gate's first-layer weight has no slot: its gradient is one GEMM over all
    // P rows in order after the blocks (H1·d scalars per slot would cost more to zero and sum
    // than the GEMM: at P = 128, d = 4096, 8 slots of 1M scalars).
    const PA shaped = slot_shape(I::template shape<Acc>(d));
    const index_t np = parameter_count(shaped);
    const index_t max_slots = std::clamp<index_t>(index_t(32) * 1024 * 1024 / std::max<index_t>(np, 1), 1, 64);
    index_t block = std::max<index_t>(16, (P + max_slots - 1) / std::max<index_t>(max_slots, 1));
    if constexpr (gate_blocks) {
      // A whole number of the gate's row chunks per slot (past the first): a short chunk costs
      // a full pass over W1 (and, without the GEMM, its gradient) for a few rows.
      constexpr index_t B = G::host_block_rows;
      if (block > B || gate_weight_gemm) block = (block + B - 1) / B * B;
    }
    const index_t nblocks = (P + block - 1) / block;
    buffer<Acc> fresh_slots;
    Acc* const slots = zeroed_scratch<Acc, 2>(nblocks * np, fresh_slots);

    const unsigned threads = resolve_threads(ex.threads);
    const index_t workers = std::min<index_t>(threads, std::max<index_t>(nblocks, 1));
    // Frozen modules still need their backward for dh; their parameter gradients go to a per-worker sink.
    std::vector<buffer<Acc>> sink_storage;
    std::vector<PA> sinks;
    if (K > 1)
      for (index_t w = 0; w < workers; ++w) {
        sink_storage.emplace_back(np);
        sinks.push_back(bind_params(shaped, sink_storage.back().data()));
      }
    const Acc s = static_cast<Acc>(scale);
    const bool has_dgates = dgates.size() != 0;

    if constexpr (row_blocks) {
      // Rows of a slot's block in chunks of B, in order: the block forms accumulate each parameter
      // gradient over the chunk's rows in row order, as the row path would.
      constexpr index_t B = block_rows(), RB = reft_rows();
      const index_t gs = G::scratch_size(d), rs = R::scratch_size(d);
      const index_t ld = padded_stride(d);
      const index_t bws = B * (3 * ld + gs + 2) + RB * (ld + rs);
      Acc* const bwork = reusable_scratch<Acc, 1>(std::size_t(workers * bws));
      // gate_weight_gemm: the trained module's dz1 of every row, transposed ([H1][P]), for the GEMM.
      buffer<Acc> fresh_dz1t;
      Acc* dz1t = nullptr;
      if constexpr (gate_weight_gemm) dz1t = zeroed_scratch<Acc, 4>(G::hidden1 * P, fresh_dz1t);
      parallel_blocks(threads, nblocks, [&](index_t blk, unsigned w) {
        const PA slot = bind_params(shaped, slots + blk * np);
        Acc* base = bwork + w * bws;
        const Acc *hx[B], *dx[B];
        Acc *hbuf[B], *dbuf[B], *dhx[B], *gscr[B];
        for (index_t b = 0; b < B; ++b) {
          hbuf[b] = base + b * ld;
          dbuf[b] = base + (B + b) * ld;
          dhx[b] = base + (2 * B + b) * ld;
          gscr[b] = base + 3 * B * ld + b * gs;
        }
        Acc* gv = base + B * (3 * ld + gs);
        Acc* dgv = gv + B;
        Acc *delta[RB], *rscr[RB];
        for (index_t b = 0; b < RB; ++b) {
          delta[b] = dgv + B + b * ld;
          rscr[b] = dgv + B + RB * ld + b * rs;
        }
        const index_t qend = std::min(P, (blk + 1) * block);
        for (index_t q0 = blk * block; q0 < qend; q0 += B) {
          const index_t nb = std::min(qend, q0 + B) - q0;
          for (index_t b = 0; b < nb; ++b) {
            hx[b] = widened_row(h.row(pos[q0 + b]), hbuf[b], d);
            dx[b] = widened_row(dout.row(pos[q0 + b]), dbuf[b], d);
            for (index_t j = 0; j < d; ++j) dhx[b][j] = dx[b][j];  // the identity path of h' = h + …
          }
          for (index_t k = 0; k < K; ++k) {
            const auto& pk = *pa[std::size_t(k)];
            const PA& gk = k == trained ? slot : sinks[w];
            // The gate as the forward left it: saved (the same bits: the same block function on the
            // same rows), else recomputed.
            if (saved) load_gate_rows(saved + (k * P + q0) * (gs + 1), nb, gs, gscr, gv);
            else gate_forward_rows(pk.gate, hx, nb, d, gscr, gv);
            for (index_t r0 = 0; r0 < nb; r0 += RB) {
              const index_t rb = std::min(RB, nb - r0);
              reft_forward_rows(pk.reft, hx + r0, rb, d, delta, rscr);
              for (index_t b = 0; b < rb; ++b) {
                // backward_row's ReFT half: dL/dg = dg_ext + s·doutᵀΔ, dL/dΔ = s·g·dout (over Δ,
                // which the dot was its last use of).
                const index_t c = r0 + b;
                dgv[c] = (has_dgates ? load<Acc>(dgates(k, q0 + c)) : Acc(0)) + s * grun::detail::dot<Acc>(dx[c], delta[b], d);
                const Acc sg = s * gv[c];
                for (index_t j = 0; j < d; ++j) delta[b][j] = sg * dx[c][j];
              }
              reft_backward_rows(pk.reft, gk.reft, hx + r0, rb, d, rscr, delta, dhx + r0);
            }
            if constexpr (gate_weight_gemm)
              G::backward_block_rows(pk.gate, gk.gate, nb, d, gscr, gv, dgv, dhx,
                                     k == trained ? dz1t + q0 : static_cast<Acc*>(nullptr), P);
            else if constexpr (gate_blocks)
              G::backward_block(pk.gate, gk.gate, hx, nb, d, gscr, gv, dgv, dhx);
            else
              for (index_t b = 0; b < nb; ++b) G::backward(pk.gate, gk.gate, hx[b], d, gscr[b], gv[b], dgv[b], dhx[b]);
          }
          for (index_t b = 0; b < nb; ++b) {
            T* o = dh.row(pos[q0 + b]);
            for (index_t j = 0; j < d; ++j) o[j] = store<T>(dhx[b][j]);
          }
        }
      });
      if constexpr (gate_weight_gemm) {
        // dW1 = dZ1ᵀ · H over all P rows (p in order), straight into grads; threads split the
        // columns, which does not change any sum. Reads h only: dh may alias dout, not h.
        std::vector<const T*> hrows(static_cast<std::size_t>(P));
        for (index_t q = 0; q < P; ++q) hrows[std::size_t(q)] = h.row(pos[q]);
        const auto& gw = G::first_layer_weight(grads.gate);
        constexpr index_t cols = 128;  // columns per task
        parallel_blocks(threads, (d + cols - 1) / cols, [&](index_t c, unsigned) {
          G::first_layer_weight_grad(dz1t, P, hrows.data(), P, c * cols, std::min(d, (c + 1) * cols), gw.data,
                                     gw.cols);
        });
      }
    } else {
      const index_t ws = 5 * d + I::scratch_size(d);
      Acc* const work = reusable_scratch<Acc, 1>(std::size_t(workers * ws));
      parallel_blocks(threads, nblocks, [&](index_t b, unsigned w) {
        const PA slot = bind_params(shaped, slots + b * np);
        Acc* hx = work + w * ws;
        Acc* dx = hx + d;
        Acc* dhx = dx + d;
        Acc* delta = dhx + d;
        Acc* tmp = delta + d;
        Acc* scratch = tmp + d;
        for (index_t q = b * block; q < std::min(P, (b + 1) * block); ++q) {
          const index_t row = pos[q];
          const T* hr = h.row(row);
          const T* dr = dout.row(row);
          for (index_t j = 0; j < d; ++j) {
            hx[j] = load<Acc>(hr[j]);
            dx[j] = load<Acc>(dr[j]);
            dhx[j] = dx[j];  // the identity path of h' = h + …
          }
          for (index_t k = 0; k < K; ++k) {
            const Acc g = I::forward_row(*pa[std::size_t(k)], hx, d, delta, scratch);
            const Acc dg = has_dgates ? load<Acc>(dgates(k, q)) : Acc(0);
            I::backward_row(*pa[std::size_t(k)], k == trained ? slot : sinks[w], hx, d, scratch, g, delta, dx, dg, s,
                            tmp, dhx);
          }
          T* o = dh.row(row);
          for (index_t j = 0; j < d; ++j) o[j] = store<T>(dhx[j]);
        }
      });
    }

    buffer<double> fresh_total;
    double* const total = zeroed_scratch<double, 3>(np, fresh_total);
    for (index_t b = 0; b < nblocks; ++b) {
      const Acc* sl = slots + b * np;
      for (index_t i = 0; i < np; ++i) total[i] += double(sl[i]);
    }
    const auto tv = bind_params(slot_shape(I::template shape<double>(d)), total);
    if constexpr (I::ortho_type::is_parametrization) {
      // dL/dR → dL/dv through the exact Householder pullback.
      const auto& dR = R::rotation(tv.reft);
      std::vector<double> dv(static_cast<std::size_t>(dR.size()));
      I::ortho_type::pullback(R::rotation(modules[std::size_t(trained)].reft), dR.data, dv.data());
      std::copy(dv.begin(), dv.end(), dR.data);
    }
    for_each_param_pair(grads, tv, [](const auto& dst, const auto& src) {
      using T2 = typename std::remove_cvref_t<decltype(dst)>::value_type;
      for (index_t i = 0; i < src.size(); ++i) dst[i] = store<T2>(src[i]);
    });
  }
};
}  // namespace detail

// ---- the owning convenience type --------------------------------------------------------------
/// Parameters and gradients of one module in host memory, with the operations bound:
///   unlearner::module<float> m(d, seed);  m.forward(exec::host, h, pos, out, gates);
template <class Gate, class Reft, class Ortho>
template <class T>
class gated_intervention<Gate, Reft, Ortho>::module {
 public:
  using intervention = gated_intervention<Gate, Reft, Ortho>;
  using params_type = typename intervention::template params<T, host_space>;

  /// Hidden size d; parameters initialized by grun::init(…, seed); gradients zero.
  /// (Not at the start of its line: nvcc reads a line starting with `module` as a C++20 module
  /// declaration candidate and warns, #3189-D.)
  explicit(false) module(index_t d, std::uint64_t seed)
      : d_(d), params_(intervention::template shape<T>(d)), grads_(*params_) {
    init(*params_, seed);
  }

  index_t dim() const { return d_; }
  const params_type& parameters() const { return *params_; }
  const params_type& gradients() const { return *grads_; }
  /// The owning storage (one contiguous buffer each), for optimizers and IO.
  owned_params<params_type>& owned_parameters() { return params_; }
  owned_params<params_type>& owned_gradients() { return grads_; }
  const owned_params<params_type>& owned_parameters() const { return params_; }

  template <class Exec>
  void forward(const Exec& ex, matrix_view<const T> h, const positions& pos, matrix_view<T> out, vector_view<T> gates) const {
    intervention::forward(ex, *params_, h, pos, out, gates);
  }
  /// The same, keeping what the backward would recompute (see saved_activations).
  template <class Exec>
  void forward(const Exec& ex, matrix_view<const T> h, const positions& pos, matrix_view<T> out, vector_view<T> gates,
               saved_activations<T>& saved) const {
    intervention::forward(ex, *params_, h, pos, out, gates, saved);
  }
  /// Gradients land in gradients() (overwritten).
  template <class Exec>
  void backward(const Exec& ex, matrix_view<const T> h, const positions& pos, matrix_view<const T> dout,
                vector_view<const T> dgates, matrix_view<T> dh) {
    intervention::backward(ex, *params_, h, pos, dout, dgates, dh, *grads_);
  }
  /// dgates in the accumulate type (see gate_gradient_for).
  template <class Exec, class DG>
    requires(!std::same_as<T, acc_t<T>> && std::same_as<std::remove_const_t<DG>, acc_t<T>>)
  void backward(const Exec& ex, matrix_view<const T> h, const positions& pos, matrix_view<const T> dout,
                vector_view<DG> dgates, matrix_view<T> dh) {
    intervention::backward(ex, *params_, h, pos, dout, dgates, dh, *grads_);
  }
  /// After a forward that filled `saved` (dgates of either type).
  template <class Exec, class DG>
    requires gate_gradient_for<DG, T>
  void backward(const Exec& ex, matrix_view<const T> h, const positions& pos, matrix_view<const T> dout,
                vector_view<DG> dgates, matrix_view<T> dh, const saved_activations<T>& saved) {
    intervention::backward(ex, *params_, h, pos, dout, dgates, dh, *grads_, saved);
  }
  /// After each optimizer step (see gated_intervention::retract).
  void retract() { intervention::retract(*params_); }
  host_matrix<T> rotation() const { return intervention::rotation(*params_); }

 private:
  index_t d_;
  owned_params<params_type> params_;
  owned_params<params_type> grads_;
};

}  // namespace grun
