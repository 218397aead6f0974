#pragma once
// grun/concepts.hpp — the contracts a gate, a ReFT parameterization and an orthogonality policy
// must meet (STYLE.md §3). Every shipped policy static_asserts itself against its concept at the
// bottom of its header; gated_intervention re-checks each requirement separately so a policy that
// does not fit fails with a message naming the missing member.
//
// Row math convention: one hidden row h ∈ R^d arrives as `const Acc* h` (already converted to the
// compute type), parameters as a params aggregate (any storage type, read with load<Acc>), and
// parameter gradients as a params aggregate of Acc that the backward *accumulates* into. All row
// functions are GRUN_HD, allocate nothing and never throw, so CUDA kernels call the same code.
#include <array>
#include <concepts>
#include <cstddef>
#include <string_view>
#include <type_traits>

#include "core/params.hpp"

namespace grun {

namespace detail {
template <class A> struct is_std_array_of_names : std::false_type {};
template <std::size_t N> struct is_std_array_of_names<std::array<std::string_view, N>> : std::true_type {};

template <class P>
constexpr std::size_t field_count = boost::pfr::tuple_size_v<P>;

// The probe types the concepts instantiate the row math with.
using probe_acc = double;
template <class Policy> using probe_params = typename Policy::template params<double, host_space>;
}  // namespace detail

// ---- pieces shared by gates and ReFTs (split so diagnostics name the missing member) ----
template <class P> concept has_policy_name = requires { { P::name } -> std::convertible_to<const char*>; };
template <class P> concept has_params_template = requires {
  typename P::template params<double, host_space>;
  typename P::template params<float, host_space>;
} && std::is_aggregate_v<typename P::template params<double, host_space>>;
template <class P> concept has_param_names =
    has_params_template<P> && requires { P::param_names; } &&
    detail::is_std_array_of_names<std::remove_cv_t<decltype(P::param_names)>>::value &&
    (std::tuple_size_v<std::remove_cv_t<decltype(P::param_names)>> ==
     detail::field_count<detail::probe_params<P>>);
template <class P> concept has_shape = has_params_template<P> && requires(detail::probe_params<P>& p, index_t d) {
  P::shape(p, d);
};
template <class P> concept has_scratch_size = requires(index_t d) { { P::scratch_size(d) } -> std::convertible_to<index_t>; };

// ---- gate_policy ---------------------------------------------------------------------------
/// A gate g(h) ∈ [0, 1] deciding whether a row belongs to the forget set. Required members:
///   name                                   const char*, for diagnostics ("gate::linear")
///   template <class T, class Space> params  aggregate of grun::param (may be empty)
///   param_names                            std::array<std::string_view, #fields>: reference checkpoint
///                                          names in field order (IO prefixes "gate_func.")
///   shape(params&, index_t d)              sets every field's extents for hidden size d
///   scratch_size(index_t d) -> index_t     Acc elements of per-row scratch forward/backward need
///   forward(p, h, d, scratch) -> Acc       g(h); saves activations in scratch
///   backward(p, grads, h, d, scratch, g, dg, dh)
///                                          given g from forward (and its scratch, which backward may
///                                          clobber) and dL/dg: grads += dL/dθ, dh[0..d) += dL/dh
template <class G> concept gate_has_forward = has_params_template<G> &&
    requires(const detail::probe_params<G>& p, const double* h, index_t d, double* s) {
      { G::forward(p, h, d, s) } -> std::same_as<double>;
    };
template <class G> concept gate_has_backward = has_params_template<G> &&
    requires(const detail::probe_params<G>& p, const double* h, index_t d, double* s, double g, double* dh) {
      G::backward(p, p, h, d, s, g, g, dh);
    };
template <class G>
concept gate_policy = has_policy_name<G> && has_params_template<G> && has_param_names<G> && has_shape<G> &&
                      has_scratch_size<G> && gate_has_forward<G> && gate_has_backward<G>;

// ---- reft_policy ---------------------------------------------------------------------------
/// A low-rank edit Δ(h) ∈ R^d. Required members (plus name, params, param_names, shape, scratch_size
/// as for gates):
///   rank                    index_t, compile-time rank r
///   has_rotation            bool: the policy has an R [r, d] that an ortho policy may constrain
///   rotation(params&)       -> param& of R (only when has_rotation)
///   default_ortho           the ortho policy gated_intervention uses when none is named
///   forward(p, h, d, delta, scratch)          delta[0..d) = Δ(h); saves r-vectors in scratch
///   backward(p, grads, h, d, scratch, ddelta, dh)
///                           given dL/dΔ: grads += dL/dθ, dh[0..d) += (∂Δ/∂h)ᵀ dL/dΔ
template <class R> concept reft_has_rank = requires { { R::rank } -> std::convertible_to<index_t>; };
template <class R> concept reft_has_rotation_flag = requires { { R::has_rotation } -> std::convertible_to<bool>; };
template <class R> concept reft_has_default_ortho = requires { typename R::default_ortho; };
template <class R> concept reft_has_forward = has_params_template<R> &&
    requires(const detail::probe_params<R>& p, const double* h, index_t d, double* delta, double* s) {
      R::forward(p, h, d, delta, s);
    };
template <class R> concept reft_has_backward = has_params_template<R> &&
    requires(const detail::probe_params<R>& p, const double* h, index_t d, double* s, const double* dd, double* dh) {
      R::backward(p, p, h, d, s, dd, dh);
    };
template <class R> concept reft_has_rotation_accessor = reft_has_rotation_flag<R> &&
    (!R::has_rotation || requires(detail::probe_params<R>& p) {
      { R::rotation(p) } -> std::same_as<param<double, host_space>&>;
    });
template <class R>
concept reft_policy = has_policy_name<R> && has_params_template<R> && has_param_names<R> && has_shape<R> &&
                      has_scratch_size<R> && reft_has_rank<R> && reft_has_rotation_flag<R> &&
                      reft_has_default_ortho<R> && reft_has_forward<R> && reft_has_backward<R> &&
                      reft_has_rotation_accessor<R>;

// ---- ortho_policy --------------------------------------------------------------------------
/// How the rows of a ReFT's R stay orthonormal. Required members:
///   name                 const char*
///   requires_rotation    bool: combining it with a reft whose has_rotation is false is a compile error
///   is_parametrization   bool: params hold raw values and R = materialize(raw) every call
///   retract(param<T>& R) host; called after each optimizer step (a no-op for none / parametrizations)
/// and, when is_parametrization:
///   materialize(const param<T>& raw, double* R)             R [r, d] from raw [r, d]
///   pullback(const param<T>& raw, const double* dR, double* draw)   exact dL/draw from dL/dR
template <class O> concept ortho_has_flags = requires {
  { O::requires_rotation } -> std::convertible_to<bool>;
  { O::is_parametrization } -> std::convertible_to<bool>;
};
template <class O> concept ortho_has_retract = requires(param<double, host_space>& r) { O::retract(r); };
template <class O> concept ortho_has_materialize = ortho_has_flags<O> &&
    (!O::is_parametrization || requires(const param<double, host_space>& raw, double* out, const double* in) {
      O::materialize(raw, out);
      O::pullback(raw, in, out);
    });
template <class O>
concept ortho_policy = has_policy_name<O> && ortho_has_flags<O> && ortho_has_retract<O> && ortho_has_materialize<O>;

/// An ortho policy that needs an R only fits a reft that has one.
template <class O, class R>
concept ortho_fits = ortho_policy<O> && reft_policy<R> && (!O::requires_rotation || R::has_rotation);

}  // namespace grun
