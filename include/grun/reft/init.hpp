#pragma once
// grun/reft/init.hpp — the initialization every low-rank ReFT shares (loreft, noreft, direft): the
// rows of rotate_layer orthonormalized Gaussian (as pyreft initializes its rotate_layer), weight
// ~ N(0, 1/d) (the scale of nn.Linear's default init), bias = 0. rotate_layer's draws come first,
// then weight's, so one seed gives one module whatever the policy.
#include <cmath>
#include <vector>

#include "../concepts.hpp"
#include "../ortho/qr_retraction.hpp"

namespace grun::reft::detail {

/// T: the storage type of p's tensors (p is the policy's params<T, S>: rotate_layer, weight, bias).
template <class T, class P, class Rng>
void init_lowrank(const P& p, Rng& rng) {
  const index_t r = p.rotate_layer.rows, d = p.rotate_layer.cols;
  std::vector<double> rows(static_cast<std::size_t>(r * d));
  for (auto& x : rows) x = rng.normal();
  // Orthonormal rows need r <= d; an unconstrained rotate_layer (noreft, direft) also takes r > d,
  // left Gaussian.
  if (r <= d) ortho::detail::orthonormalize_rows(rows.data(), r, d);
  for (index_t i = 0; i < r * d; ++i) p.rotate_layer[i] = store<T>(rows[std::size_t(i)]);
  const double sd = 1.0 / std::sqrt(double(d));
  for (index_t i = 0; i < p.weight.size(); ++i) p.weight[i] = store<T>(sd * rng.normal());
  for (index_t i = 0; i < p.bias.size(); ++i) p.bias[i] = store<T>(0.0);
}

}  // namespace grun::reft::detail
