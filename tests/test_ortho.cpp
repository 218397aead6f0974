// Orthogonality policies: QR retraction (orthonormal, sign-fixed, idempotent, close to its input) and
// the Householder parametrization (orthonormal for any raw vectors, exact pullback vs finite differences).
#include "test_intervention_common.hpp"

using namespace grun_test;

namespace {
template <class T>
double orthonormality_error(const param<T>& R) {
  double worst = 0;
  for (index_t a = 0; a < R.rows; ++a)
    for (index_t b = 0; b < R.rows; ++b) {
      double s = 0;
      for (index_t j = 0; j < R.cols; ++j) s += load<double>(R(a, j)) * load<double>(R(b, j));
      worst = std::max(worst, std::abs(s - (a == b ? 1.0 : 0.0)));
    }
  return worst;
}
template <class T>
owned_params<param<T>> matrix_param(index_t r, index_t d, std::uint64_t seed, double scale = 1.0) {
  param<T> s;
  set_matrix(s, r, d);
  owned_params<param<T>> p(s);
  randomize(*p, seed, scale);
  return p;
}
}  // namespace

TEST_CASE("qr_retraction makes rows orthonormal", "[ortho]") {
  for (index_t d : {4, 7, 33}) {
    auto R = matrix_param<double>(4, d, 1 + std::uint64_t(d));
    ortho::qr_retraction::retract(*R);
    CHECK(orthonormality_error(*R) < 1e-12);
    auto Rf = matrix_param<float>(4, d, 2 + std::uint64_t(d), 3.0);
    ortho::qr_retraction::retract(*Rf);
    CHECK(orthonormality_error(*Rf) < 1e-5);
  }
  auto R32 = matrix_param<double>(32, 40, 5);
  ortho::qr_retraction::retract(*R32);
  CHECK(orthonormality_error(*R32) < 1e-12);
}

TEST_CASE("qr_retraction is the identity on orthonormal rows and stays close to its input", "[ortho]") {
  const index_t r = 4, d = 33;
  auto Q = matrix_param<double>(r, d, 7);
  ortho::qr_retraction::retract(*Q);
  auto R = *Q;  // the same storage; compare against a copy
  std::vector<double> before(Q->data, Q->data + Q->size());
  ortho::qr_retraction::retract(*Q);
  for (index_t i = 0; i < Q->size(); ++i) CHECK(std::abs(Q->data[i] - before[std::size_t(i)]) < 1e-14);
  // A small step off the manifold comes back near where it left (sign fix: no row flips).
  grun::rng g(8);
  for (index_t i = 0; i < Q->size(); ++i) Q->data[i] += 1e-3 * g.normal();
  ortho::qr_retraction::retract(*Q);
  double dist = 0;
  for (index_t i = 0; i < Q->size(); ++i) dist = std::max(dist, std::abs(Q->data[i] - before[std::size_t(i)]));
  CHECK(dist < 1e-2);
  CHECK(orthonormality_error(*Q) < 1e-12);
  (void)R;
}

TEST_CASE("qr_retraction rejects degenerate input", "[ortho][errors]") {
  auto R = matrix_param<double>(3, 7, 9);
  std::copy(R->row(0), R->row(0) + 7, R->row(2));  // row 2 = row 0
  CHECK_THROWS_AS(ortho::qr_retraction::retract(*R), numeric_error);
  auto Z = matrix_param<double>(2, 7, 9, 0.0);
  CHECK_THROWS_AS(ortho::qr_retraction::retract(*Z), numeric_error);
  auto N = matrix_param<double>(2, 7, 9);
  N->data[3] = std::nan("");
  CHECK_THROWS_AS(ortho::qr_retraction::retract(*N), numeric_error);
  auto W = matrix_param<double>(5, 3, 9);
  CHECK_THROWS_WITH(ortho::qr_retraction::retract(*W), Catch::Contains("r <= hidden size d"));
}

TEST_CASE("gated_intervention::retract restores orthonormality after a step", "[ortho]") {
  using U = gated_intervention<gate::linear, reft::loreft<4>>;
  U::module<float> m(33, 1);
  CHECK(orthonormality_error(m.parameters().reft.rotate_layer) < 1e-6);
  randomize(m.parameters().reft.rotate_layer, 2, 0.1);  // an "optimizer step" that leaves the manifold
  CHECK(orthonormality_error(m.parameters().reft.rotate_layer) > 1e-2);
  m.retract();
  CHECK(orthonormality_error(m.parameters().reft.rotate_layer) < 1e-5);
  // no-ops: ortho::none leaves R alone
  using N = gated_intervention<gate::linear, reft::noreft<4>>;
  N::module<double> n(7, 1);
  randomize(n.parameters().reft.rotate_layer, 3);
  std::vector<double> before(n.parameters().reft.rotate_layer.data, n.parameters().reft.rotate_layer.data + 28);
  n.retract();
  CHECK(std::equal(before.begin(), before.end(), n.parameters().reft.rotate_layer.data));
}

TEST_CASE("householder materializes orthonormal rows", "[ortho][householder]") {
  for (index_t d : {1, 7, 33})
    for (index_t r : {1, 3, 4}) {
      if (r > d) continue;
      auto v = matrix_param<double>(r, d, 10 + std::uint64_t(d * r));
      param<double> Rs;
      set_matrix(Rs, r, d);
      owned_params<param<double>> R(Rs);
      ortho::householder::materialize(*v, R->data);
      CHECK(orthonormality_error(*R) < 1e-12);
    }
  // v_k = e_k gives H_k = I − 2 e_k e_kᵀ, so R = −E_r.
  auto v = matrix_param<double>(3, 7, 1, 0.0);
  for (index_t k = 0; k < 3; ++k) (*v)(k, k) = 2.0;
  std::vector<double> R(21);
  ortho::householder::materialize(*v, R.data());
  for (index_t i = 0; i < 3; ++i)
    for (index_t j = 0; j < 7; ++j) CHECK(R[std::size_t(i * 7 + j)] == (i == j ? -1.0 : 0.0));
}

TEST_CASE("householder pullback matches finite differences", "[ortho][householder][fd]") {
  {  // d = 1: R = −1 whatever v is, so dL/dv = 0 (finite differences only see rounding noise there)
    auto v = matrix_param<double>(1, 1, 19);
    double C = 0.7, dv = 1;
    ortho::householder::pullback(*v, &C, &dv);
    CHECK(std::abs(dv) < 1e-12);
  }
  for (index_t d : {2, 7, 33})
    for (index_t r : {1, 3, 4}) {
      if (r > d) continue;
      INFO("d = " << d << ", r = " << r);
      auto v = matrix_param<double>(r, d, 20 + std::uint64_t(d * r));
      std::vector<double> C = random_vector(r * d, 30), R(sz(r * d)), dv(sz(r * d));
      auto loss = [&]() {
        ortho::householder::materialize(*v, R.data());
        double L = 0;
        for (std::size_t i = 0; i < R.size(); ++i) L += C[i] * R[i];
        return L;
      };
      ortho::householder::pullback(*v, C.data(), dv.data());
      CHECK(input_gradient_error(dv.data(), v->data, r * d, loss) < 1e-6);
    }
}

TEST_CASE("householder rejects zero vectors and r > d", "[ortho][householder][errors]") {
  auto v = matrix_param<double>(2, 7, 1);
  for (index_t j = 0; j < 7; ++j) (*v)(1, j) = 0.0;
  std::vector<double> R(14);
  CHECK_THROWS_AS(ortho::householder::materialize(*v, R.data()), numeric_error);
  auto w = matrix_param<double>(4, 3, 1);
  std::vector<double> R2(12);
  CHECK_THROWS_AS(ortho::householder::materialize(*w, R2.data()), shape_error);
}

TEST_CASE("gated intervention with householder R matches finite differences", "[ortho][householder][fd]") {
  using U = gated_intervention<gate::linear, reft::loreft<3>, ortho::householder>;
  check_intervention_fd<U>(7, 5, positions::rows({1, 4, 2}), 41, true, 0.5);
  check_intervention_fd<U>(33, 4, positions::all(4), 42, false, 0.5);
  using M = gated_intervention<gate::mlp<6, 4>, reft::loreft<1>, ortho::householder>;
  check_intervention_fd<M>(7, 3, positions::rows({0, 2}), 43, true, 0.5);
}

TEST_CASE("householder module: forward uses the materialized R", "[ortho][householder]") {
  using U = gated_intervention<gate::always, reft::loreft<4>, ortho::householder>;
  using L = gated_intervention<gate::always, reft::loreft<4>, ortho::none>;
  U::module<double> m(9, 5);
  auto R = m.rotation();
  // The same edit through plain loreft with R materialized by hand.
  owned_params<L::params<double>> q(L::shape<double>(9));
  for_each_param_pair(*q, m.parameters(), [](auto& a, const auto& b) { std::copy(b.data, b.data + b.size(), a.data); });
  std::copy(R.storage.data(), R.storage.data() + 36, q->reft.rotate_layer.data);
  auto h = random_matrix<double>(3, 9, 6);
  host_matrix<double> o1(3, 9), o2(3, 9);
  std::vector<double> g(3);
  auto pos = positions::all(3);
  m.forward(exec::host, h.view(), pos, o1.view(), vector_view<double>(g.data(), {3}));
  L::forward(exec::host, *q, h.view(), pos, o2.view(), vector_view<double>(g.data(), {3}));
  for (index_t i = 0; i < 27; ++i) CHECK(o1.storage[i] == Approx(o2.storage[i]).margin(1e-14));
}
