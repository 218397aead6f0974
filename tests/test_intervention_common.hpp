#pragma once
// Shared helpers for the gate / reft / ortho / intervention / stack tests: random fills, flattening a
// parameter aggregate into scalar pointers, and relative errors for finite-difference checks.
#include <catch2/catch.hpp>

#include <grun/gate/always.hpp>
#include <grun/gate/linear.hpp>
#include <grun/gate/mlp.hpp>
#include <grun/ortho/householder.hpp>
#include <grun/ortho/none.hpp>
#include <grun/ortho/qr_retraction.hpp>
#include <grun/reft/direft.hpp>
#include <grun/reft/loreft.hpp>
#include <grun/stack.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

namespace grun_test {
using namespace grun;

inline std::size_t sz(index_t n) { return static_cast<std::size_t>(n); }

/// Every scalar of a parameter aggregate, in for_each_param order.
template <class P>
auto scalars(const P& p) {
  std::vector<param_value_t<P>*> out;
  auto copy = p;
  for_each_param(copy, [&](auto& leaf) {
    for (index_t i = 0; i < leaf.size(); ++i) out.push_back(leaf.data + i);
  });
  return out;
}

template <class P>
void randomize(const P& p, std::uint64_t seed, double scale = 0.5) {
  grun::rng g(seed, 7);
  auto copy = p;
  for_each_param(copy, [&](auto& leaf) {
    using T = typename std::remove_cvref_t<decltype(leaf)>::value_type;
    for (index_t i = 0; i < leaf.size(); ++i) leaf[i] = store<T>(scale * g.normal());
  });
}

template <class T>
host_matrix<T> random_matrix(index_t r, index_t c, std::uint64_t seed, double scale = 1.0) {
  host_matrix<T> m(r, c);
  grun::rng g(seed, 11);
  for (index_t i = 0; i < r * c; ++i) m.storage[i] = store<T>(scale * g.normal());
  return m;
}

/// n normal floats (a flat buffer for the adapters' tests, which build their own tensors around it).
inline std::vector<float> random_floats(index_t n, std::uint64_t seed, double scale = 1.0) {
  const host_matrix<float> m = random_matrix<float>(1, n, seed, scale);
  return {m.storage.data(), m.storage.data() + n};
}

inline std::vector<double> random_vector(index_t n, std::uint64_t seed, double scale = 1.0) {
  std::vector<double> v(static_cast<std::size_t>(n));
  grun::rng g(seed, 13);
  for (auto& x : v) x = scale * g.normal();
  return v;
}

/// ‖a − b‖ / max(‖a‖, ‖b‖, 1e-8) (the floor keeps identically-zero gradients from reading as 100 % error)
inline double rel_err(const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double num = 0, na = 0, nb = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return std::sqrt(num) / std::max({std::sqrt(na), std::sqrt(nb), 1e-8});
}

/// Central difference of f w.r.t. the scalar *x.
inline double central_difference(double* x, const std::function<double()>& f, double eps = 1e-6) {
  const double x0 = *x;
  *x = x0 + eps;
  const double fp = f();
  *x = x0 - eps;
  const double fm = f();
  *x = x0;
  return (fp - fm) / (2 * eps);
}

/// rel_err of the gradient of `loss` w.r.t. every scalar of a parameter aggregate: `grads` (same
/// shape, for_each_param order) against central differences of `loss` in `params`' scalars.
template <class P, class G>
double param_gradient_error(const P& params, const G& grads, const std::function<double()>& loss) {
  const auto ps = scalars(params);
  const auto gs = scalars(grads);
  REQUIRE(ps.size() == gs.size());
  std::vector<double> analytic, numeric;
  for (std::size_t i = 0; i < ps.size(); ++i) {
    analytic.push_back(*gs[i]);
    numeric.push_back(central_difference(ps[i], loss));
  }
  return rel_err(analytic, numeric);
}

/// rel_err of an input gradient: grad[i] against central differences of `loss` in x[i], i < n.
inline double input_gradient_error(const double* grad, double* x, index_t n, const std::function<double()>& loss) {
  std::vector<double> numeric;
  for (index_t i = 0; i < n; ++i) numeric.push_back(central_difference(x + i, loss));
  return rel_err(std::vector<double>(grad, grad + n), numeric);
}

/// Finite-difference check of gated_intervention I in double: L = Σ c ⊙ h' + Σ cg ⊙ g over positions.
template <class I>
void check_intervention_fd(index_t d, index_t n, const positions& pos, std::uint64_t seed, bool gate_loss,
                           double param_scale = 0.0) {
  owned_params<typename I::template params<double>> p(I::template shape<double>(d));
  init(*p, seed);
  if (param_scale > 0) {
    randomize(p->gate, seed + 1, param_scale);
    if constexpr (!I::ortho_type::requires_rotation) randomize(p->reft, seed + 2, param_scale);
  }
  owned_params<typename I::template params<double>> grads(*p);
  auto h = random_matrix<double>(n, d, seed + 3);
  auto c = random_matrix<double>(n, d, seed + 4);
  const index_t P = pos.size();
  std::vector<double> cg = random_vector(P, seed + 5);
  host_matrix<double> out(n, d), dh(n, d);
  std::vector<double> gates(static_cast<std::size_t>(std::max<index_t>(P, 1)));

  auto loss = [&]() {
    I::forward(exec::host, *p, h.view(), pos, out.view(), vector_view<double>(gates.data(), {P}));
    double L = 0;
    for (index_t i = 0; i < n * d; ++i) L += c.storage[i] * out.storage[i];
    if (gate_loss)
      for (index_t q = 0; q < P; ++q) L += cg[std::size_t(q)] * gates[std::size_t(q)];
    return L;
  };
  I::backward(exec::host(3), *p, h.view(), pos, c.view(),
              gate_loss ? vector_view<const double>(cg.data(), {P}) : vector_view<const double>(), dh.view(), *grads);

  INFO("d = " << d << ", N = " << n << ", P = " << P);
  CHECK(param_gradient_error(*p, *grads, loss) < 1e-6);
  INFO("input gradient dh");
  CHECK(input_gradient_error(dh.storage.data(), h.storage.data(), n * d, loss) < 1e-6);
}

}  // namespace grun_test
