#pragma once
// grun/adapters/eigen.hpp — Eigen dense objects ↔ grun::tensor_view. Glue only: no math here.
//
// Hidden states in Eigen programs are either one token per row of a RowMajor matrix [N, d] or — the
// Eigen default — one token per column of a ColMajor matrix [d, N]. Either way each token's d values
// are the contiguous ("inner") vectors, and that is the view grun takes: tokens(m) is the [N, d] row
// view of the inner vectors, whatever the storage order, with the outer stride carried as the row
// stride (so a Block, a Map with OuterStride<> or a Ref works without a copy). An inner stride other
// than 1 is rejected by name. Any object with direct access (Matrix, Array, Map, Ref, Block of them)
// is taken; expressions without storage (a + b, m.transpose() of a ColMajor…) are a compile error.
//
//   Eigen::MatrixXf H(d, N), Out(d, N);        // tokens in columns
//   Eigen::VectorXf gates(P);
//   grun::eigen::forward(module, grun::exec::host, H, pos, Out, gates);
//   Eigen::Map<const Eigen::MatrixXf> R = grun::eigen::map(module.parameters().reft.rotate_layer);
//
// Element types: float, double, Eigen::half and Eigen::bfloat16 (bit for bit grun::half /
// grun::bfloat16: the pointer is reinterpreted, never copied).
#include <Eigen/Core>

#include <type_traits>

#include "../core/error.hpp"
#include "../core/params.hpp"
#include "../core/tensor.hpp"
#include "../positions.hpp"
#include "../saved_activations.hpp"

namespace grun::eigen {

namespace detail {
/// grun's storage type for an Eigen scalar (const kept).
template <class S> struct storage {
  static_assert(sizeof(S) == 0, "grun::eigen: the scalar type must be float, double, Eigen::half or Eigen::bfloat16");
};
template <> struct storage<float> { using type = float; };
template <> struct storage<double> { using type = double; };
template <> struct storage<Eigen::half> { using type = grun::half; };
template <> struct storage<Eigen::bfloat16> { using type = grun::bfloat16; };
template <class S> struct storage<const S> { using type = const typename storage<S>::type; };
static_assert(sizeof(Eigen::half) == sizeof(grun::half) && sizeof(Eigen::bfloat16) == sizeof(grun::bfloat16));

/// Eigen's scalar for a grun storage type (the inverse of storage).
template <class T> struct scalar { using type = T; };
template <> struct scalar<grun::half> { using type = Eigen::half; };
template <> struct scalar<grun::bfloat16> { using type = Eigen::bfloat16; };
template <class T> struct scalar<const T> { using type = const typename scalar<T>::type; };

template <class Derived>
constexpr void require_direct_access() {
  static_assert(bool(Eigen::internal::traits<Derived>::Flags & Eigen::DirectAccessBit),
                "grun::eigen: expected an object with storage (Matrix, Array, Map, Ref or a Block of them), got an "
                "expression: evaluate it first (.eval()) or write it into a matrix");
}

template <class T, class Derived>
matrix_view<T> tokens(T* data, const Derived& m, const char* what) {
  require<shape_error>(m.size() == 0 || m.innerStride() == 1, what,
                       ": expected each token's values contiguous (inner stride 1), got inner stride ", m.innerStride());
  // The inner vectors are the tokens: a RowMajor object's rows, a ColMajor object's columns.
  const index_t n = Derived::IsRowMajor ? m.rows() : m.cols();
  const index_t d = Derived::IsRowMajor ? m.cols() : m.rows();
  return {data, {n, d}, {index_t(m.outerStride()), 1}};
}

template <class T, class Derived>
vector_view<T> vector(T* data, const Derived& v, const char* what) {
  require<shape_error>(v.rows() == 1 || v.cols() == 1, what, ": expected a vector, got a ", v.rows(), " × ", v.cols(),
                       " matrix");
  return {data, {index_t(v.size())}, {index_t(v.size() <= 1 ? 1 : v.innerStride())}};
}
}  // namespace detail

/// The grun storage type of an Eigen object's scalar.
template <class Derived>
using storage_t = typename detail::storage<typename Derived::Scalar>::type;

/// [N, d] view of the tokens of `m` (see the file comment). Writable.
template <class Derived>
matrix_view<storage_t<Derived>> tokens(Eigen::DenseBase<Derived>& m, const char* what = "tokens") {
  detail::require_direct_access<Derived>();
  return detail::tokens(reinterpret_cast<storage_t<Derived>*>(m.derived().data()), m.derived(), what);
}
/// Read-only [N, d] view of the tokens of `m`.
template <class Derived>
matrix_view<const storage_t<Derived>> tokens(const Eigen::DenseBase<Derived>& m, const char* what = "tokens") {
  detail::require_direct_access<Derived>();
  return detail::tokens(reinterpret_cast<const storage_t<Derived>*>(m.derived().data()), m.derived(), what);
}

/// View of a vector (gates [P], their gradients); any inner stride.
template <class Derived>
vector_view<storage_t<Derived>> vector(Eigen::DenseBase<Derived>& v, const char* what = "vector") {
  detail::require_direct_access<Derived>();
  return detail::vector(reinterpret_cast<storage_t<Derived>*>(v.derived().data()), v.derived(), what);
}
template <class Derived>
vector_view<const storage_t<Derived>> vector(const Eigen::DenseBase<Derived>& v, const char* what = "vector") {
  detail::require_direct_access<Derived>();
  return detail::vector(reinterpret_cast<const storage_t<Derived>*>(v.derived().data()), v.derived(), what);
}

/// A parameter leaf as an Eigen row-major map ([rows, cols]; a vector leaf is [1, n]): read, print,
/// or assign it with Eigen. The map aliases the leaf: keep the module alive.
template <class T>
auto map(const param<T, host_space>& leaf) {
  using S = typename detail::scalar<T>::type;
  using M = Eigen::Matrix<std::remove_const_t<S>, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Mapped = std::conditional_t<std::is_const_v<S>, const M, M>;
  return Eigen::Map<Mapped>(reinterpret_cast<S*>(leaf.data), Eigen::Index(leaf.rows), Eigen::Index(leaf.cols));
}

/// module.forward on Eigen objects: h, out [tokens of d], gates [P]. `out` and `gates` are taken by
/// const reference so that temporaries (a Block, a Map) bind; they are written (Eigen's idiom for
/// output arguments). out may be h itself (in place). saved: where a training forward keeps what its
/// backward would recompute (see saved_activations), or null.
template <class Module, class Exec, class H, class Out, class G>
void forward(const Module& module, const Exec& ex, const Eigen::DenseBase<H>& h, const positions& pos,
             const Eigen::DenseBase<Out>& out, const Eigen::DenseBase<G>& gates,
             saved_activations<param_value_t<typename Module::params_type>>* saved = nullptr) {
  const auto hv = tokens(h, "h");
  const auto ov = tokens(const_cast<Eigen::DenseBase<Out>&>(out), "out");
  const auto gv = vector(const_cast<Eigen::DenseBase<G>&>(gates), "gates");
  if (saved) module.forward(ex, hv, pos, ov, gv, *saved);
  else module.forward(ex, hv, pos, ov, gv);
}

/// module.backward on Eigen objects: gradients land in module.gradients() (overwritten), dh is
/// written (it may be dout itself). dgates may be empty (size 0): no gradient reaches the gates.
/// saved: what the forward saved, or null (the backward recomputes).
template <class Module, class Exec, class H, class Dout, class Dg, class Dh>
void backward(Module& module, const Exec& ex, const Eigen::DenseBase<H>& h, const positions& pos,
              const Eigen::DenseBase<Dout>& dout, const Eigen::DenseBase<Dg>& dgates, const Eigen::DenseBase<Dh>& dh,
              const saved_activations<param_value_t<typename Module::params_type>>* saved = nullptr) {
  const auto dg0 = vector(dgates, "dgates");
  const auto dg = dg0.size() == 0 ? decltype(dg0)() : dg0;
  const auto hv = tokens(h, "h");
  const auto dv = tokens(dout, "dout");
  const auto dhv = tokens(const_cast<Eigen::DenseBase<Dh>&>(dh), "dh");
  if (saved) module.backward(ex, hv, pos, dv, dg, dhv, *saved);
  else module.backward(ex, hv, pos, dv, dg, dhv);
}

}  // namespace grun::eigen
