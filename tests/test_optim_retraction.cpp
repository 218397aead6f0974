// AdamW + the module's ortho policy: R's rows stay orthonormal (QR retraction after every step),
// while the same training without a retraction (noreft) drifts off the constraint set.
#include <catch2/catch.hpp>

#include <grun/gate/linear.hpp>
#include <grun/intervention.hpp>
#include <grun/optim/adamw.hpp>
#include <grun/reft/loreft.hpp>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

using namespace grun;

namespace {

/// ‖R Rᵀ − I‖_max in double.
template <class T>
double ortho_error(const host_matrix<T>& R) {
  double worst = 0;
  for (index_t a = 0; a < R.rows; ++a)
    for (index_t b = 0; b < R.rows; ++b) {
      double s = 0;
      for (index_t j = 0; j < R.cols; ++j) s += double(R(a, j)) * double(R(b, j));
      worst = std::max(worst, std::fabs(s - (a == b ? 1.0 : 0.0)));
    }
  return worst;
}

/// 1000 AdamW steps on L = ½‖h' − target‖² over random rows; returns (final ortho error, max over steps, loss ratio).
template <class I>
std::vector<double> train(std::uint64_t seed) {
  const index_t n = 24, d = 32;
  typename I::template module<float> m(d, seed);
  optim::adamw<typename I::template params<float>> opt(m.parameters(), {.lr = 1e-2, .weight_decay = 1e-2});
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<float> h(n * d), target(n * d), out(n * d), dout(n * d), dh(n * d), gates(n);
  for (auto& x : h) x = nd(rng);
  for (auto& x : target) x = nd(rng);
  const auto pos = positions::all(n);
  const matrix_view<const float> hv(h.data(), {n, d});
  double worst = 0, first_loss = 0, loss = 0;
  for (int step = 0; step < 1000; ++step) {
    m.forward(exec::host, hv, pos, matrix_view<float>(out.data(), {n, d}), vector_view<float>(gates.data(), {n}));
    loss = 0;
    for (index_t i = 0; i < n * d; ++i) {
      dout[i] = out[i] - target[i];
      loss += 0.5 * double(dout[i]) * dout[i];
    }
    if (step == 0) first_loss = loss;
    m.backward(exec::host, hv, pos, matrix_view<const float>(dout.data(), {n, d}), vector_view<const float>(),
               matrix_view<float>(dh.data(), {n, d}));
    opt.step(m.parameters(), m.gradients());  // retract_after_step → the module's ortho policy
    worst = std::max(worst, ortho_error(m.rotation()));
  }
  return {ortho_error(m.rotation()), worst, loss / first_loss};
}

}  // namespace

TEST_CASE("adamw + qr_retraction keeps R orthonormal over 1000 steps", "[optim][ortho]") {
  using I = gated_intervention<gate::linear, reft::loreft<4>>;
  static_assert(std::is_same_v<I::ortho_type, ortho::qr_retraction>);
  const auto r = train<I>(11);
  INFO("final ‖RRᵀ−I‖_max = " << r[0] << ", worst = " << r[1] << ", loss ratio = " << r[2]);
  CHECK(r[0] < 1e-5);
  CHECK(r[1] < 1e-5);
  CHECK(r[2] < 0.9);  // it did learn something
}

TEST_CASE("without a retraction the same training leaves the constraint set", "[optim][ortho]") {
  using I = gated_intervention<gate::linear, reft::noreft<4>>;
  const auto r = train<I>(11);
  INFO("final ‖RRᵀ−I‖_max = " << r[0]);
  CHECK(r[0] > 1e-3);
}
