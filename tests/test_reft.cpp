// ReFT parameterizations: row math against finite differences (double), and the algebraic laws of
// LoReFT (identity edit when W = R, b = 0; edits live in R's row space; the edit sets R h' = W h + b).
#include "test_intervention_common.hpp"

using namespace grun_test;

namespace {

template <class Reft>
struct reft_fixture {
  using P = typename Reft::template params<double>;
  index_t d;
  owned_params<P> p, grads;
  explicit reft_fixture(index_t d_) : d(d_), p(shaped(d_)), grads(shaped(d_)) {}
  static P shaped(index_t d) {
    P s{};
    Reft::shape(s, d);
    return s;
  }
  std::vector<double> delta(const std::vector<double>& h) const {
    std::vector<double> out(sz(d)), scratch(sz(Reft::scratch_size(d)));
    Reft::forward(*p, h.data(), d, out.data(), scratch.data());
    return out;
  }
};

/// FD check: L = cᵀ Δ(h).
template <class Reft>
void check_reft_row_fd(index_t d, std::uint64_t seed) {
  reft_fixture<Reft> f(d);
  randomize(*f.p, seed, 0.5);
  std::vector<double> h = random_vector(d, seed + 1), c = random_vector(d, seed + 2);
  std::vector<double> delta(sz(d)), scratch(sz(Reft::scratch_size(d)));
  auto loss = [&]() {
    Reft::forward(*f.p, h.data(), d, delta.data(), scratch.data());
    double L = 0;
    for (index_t j = 0; j < d; ++j) L += c[std::size_t(j)] * delta[std::size_t(j)];
    return L;
  };
  loss();
  std::vector<double> dh(sz(d), 0.0);
  Reft::backward(*f.p, *f.grads, h.data(), d, scratch.data(), c.data(), dh.data());
  CHECK(param_gradient_error(*f.p, *f.grads, loss) < 1e-6);
  CHECK(input_gradient_error(dh.data(), h.data(), d, loss) < 1e-6);
}

void orthonormal_rows(const param<double>& R, std::uint64_t seed) {
  std::vector<double> tmp(sz(R.size()));
  grun::rng g(seed);
  for (auto& x : tmp) x = g.normal();
  ortho::detail::orthonormalize_rows(tmp.data(), R.rows, R.cols);
  std::copy(tmp.begin(), tmp.end(), R.data);
}

}  // namespace

TEST_CASE("reft row math matches finite differences", "[reft][fd]") {
  for (index_t d : {1, 7, 33}) {
    INFO("d = " << d);
    check_reft_row_fd<reft::loreft<1>>(d, 100 + std::uint64_t(d));
    check_reft_row_fd<reft::loreft<4>>(d, 200 + std::uint64_t(d));
    check_reft_row_fd<reft::noreft<3>>(d, 300 + std::uint64_t(d));
    check_reft_row_fd<reft::direft<1>>(d, 400 + std::uint64_t(d));
    check_reft_row_fd<reft::direft<4>>(d, 500 + std::uint64_t(d));
  }
}

TEST_CASE("loreft with W = R and b = 0 is the identity edit", "[reft][laws]") {
  const index_t d = 33;
  reft_fixture<reft::loreft<4>> f(d);
  orthonormal_rows(f.p->rotate_layer, 3);
  std::copy(f.p->rotate_layer.data, f.p->rotate_layer.data + f.p->rotate_layer.size(), f.p->weight.data);
  auto delta = f.delta(random_vector(d, 4));
  for (double x : delta) CHECK(std::abs(x) < 1e-14);
}

TEST_CASE("loreft edits live in R's row space and set R h' = W h + b", "[reft][laws]") {
  const index_t d = 33, r = 4, n = 6;
  using U = gated_intervention<gate::always, reft::loreft<4>>;
  U::module<double> m(d, 9);
  randomize(m.parameters().reft.weight, 10, 0.3);
  randomize(m.parameters().reft.bias, 11, 0.3);
  auto h = random_matrix<double>(n, d, 12);
  host_matrix<double> out(n, d);
  std::vector<double> gates(static_cast<std::size_t>(n));
  m.forward(exec::host, h.view(), positions::all(n), out.view(), vector_view<double>(gates.data(), {n}));
  const auto& R = m.parameters().reft.rotate_layer;
  const auto& W = m.parameters().reft.weight;
  const auto& b = m.parameters().reft.bias;
  for (index_t i = 0; i < n; ++i) {
    CHECK(gates[std::size_t(i)] == 1.0);
    // e = h' − h; e − Rᵀ(R e) must vanish.
    std::vector<double> e(sz(d)), proj(sz(d), 0.0);
    for (index_t j = 0; j < d; ++j) e[std::size_t(j)] = out(i, j) - h(i, j);
    for (index_t k = 0; k < r; ++k) {
      double s = 0;
      for (index_t j = 0; j < d; ++j) s += R(k, j) * e[std::size_t(j)];
      for (index_t j = 0; j < d; ++j) proj[std::size_t(j)] += s * R(k, j);
    }
    for (index_t j = 0; j < d; ++j) CHECK(std::abs(e[std::size_t(j)] - proj[std::size_t(j)]) < 1e-12);
    // R h' = W h + b
    for (index_t k = 0; k < r; ++k) {
      double rh = 0, wh = b[k];
      for (index_t j = 0; j < d; ++j) { rh += R(k, j) * out(i, j); wh += W(k, j) * h(i, j); }
      CHECK(std::abs(rh - wh) < 1e-12);
    }
  }
}

TEST_CASE("zero parameters give a zero edit", "[reft][laws]") {
  const index_t d = 7;
  reft_fixture<reft::noreft<2>> a(d);
  reft_fixture<reft::direft<2>> b(d);
  for (double x : a.delta(random_vector(d, 1))) CHECK(x == 0.0);
  for (double x : b.delta(random_vector(d, 1))) CHECK(x == 0.0);
  // direft with W1 = 0 is the constant edit W2ᵀ b
  randomize(b.p->rotate_layer, 2);
  b.p->bias[0] = 1.5;
  b.p->bias[1] = -0.5;
  auto delta = b.delta(random_vector(d, 3));
  for (index_t j = 0; j < d; ++j)
    CHECK(delta[std::size_t(j)] == Approx(1.5 * b.p->rotate_layer(0, j) - 0.5 * b.p->rotate_layer(1, j)).margin(1e-15));
}

TEST_CASE("noreft takes a rank above d (its R has no constraint), loreft refuses it", "[reft]") {
  using N = gated_intervention<gate::linear, reft::noreft<8>>;
  N::module<float> m(4, 1);  // orthonormal rows need r <= d: noreft's init leaves R Gaussian
  CHECK(m.owned_parameters()->reft.rotate_layer.rows == 8);
  using L = gated_intervention<gate::linear, reft::loreft<8>>;
  CHECK_THROWS_AS(L::module<float>(4, 1), shape_error);
}

TEST_CASE("reft shapes, names and defaults", "[reft]") {
  using L = gated_intervention<gate::linear, reft::loreft<4>>;
  static_assert(std::is_same_v<L::ortho_type, ortho::qr_retraction>);
  static_assert(std::is_same_v<gated_intervention<gate::linear, reft::noreft<4>>::ortho_type, ortho::none>);
  static_assert(std::is_same_v<gated_intervention<gate::linear, reft::direft<4>>::ortho_type, ortho::none>);
  auto s = L::shape<float>(4096);
  CHECK(parameter_count(s.reft) == 2 * 4 * 4096 + 4);  // DESIGN: LoReFT r = 4 adds 2·4·d + 4
  CHECK(s.reft.rotate_layer.rows == 4);  // [r, d] in memory; files hold [d, r]
  CHECK(s.reft.rotate_layer.cols == 4096);
  CHECK(reft::loreft<4>::param_names[0] == "rotate_layer");
  CHECK(reft::direft<4>::param_names[1] == "weight");
  CHECK_THROWS_AS(L::shape<float>(3), shape_error);   // qr_retraction needs d >= r
  CHECK_THROWS_AS(L::shape<float>(0), shape_error);
  CHECK_NOTHROW(gated_intervention<gate::linear, reft::direft<4>>::shape<float>(3));
}

namespace {
/// The host block forms give, bit for bit, the row functions' values on each row: Δ and the scratch
/// of forward, and after backward the gradients (rows summed in order) and every dh row.
template <class Reft, class Acc>
void check_blocks_match_rows(index_t d, index_t B, std::uint64_t seed) {
  INFO(Reft::name << "<" << Reft::rank << ">, d = " << d << ", B = " << B << ", " << sizeof(Acc) * 8 << "-bit");
  using P = typename Reft::template params<Acc>;
  P shaped{};
  Reft::shape(shaped, d);
  owned_params<P> p(shaped), g_rows(shaped), g_block(shaped);
  {
    owned_params<typename Reft::template params<double>> pd(reft_fixture<Reft>::shaped(d));
    randomize(*pd, seed, 0.5);
    for (index_t i = 0; i < p.size(); ++i) p.data()[i] = Acc(pd.data()[i]);
  }
  for (index_t i = 0; i < g_rows.size(); ++i) g_rows.data()[i] = g_block.data()[i] = Acc(0.125) * Acc(i % 7);
  const index_t rs = Reft::scratch_size(d);
  auto rows_of = [&](std::uint64_t s) {
    std::vector<std::vector<Acc>> m;
    for (index_t b = 0; b < B; ++b) {
      const auto v = random_vector(d, s + std::uint64_t(b));
      m.emplace_back(v.begin(), v.end());
    }
    return m;
  };
  const auto h = rows_of(seed + 100), dd = rows_of(seed + 200), dh0 = rows_of(seed + 300);
  std::vector<std::vector<Acc>> delta_r(sz(B), std::vector<Acc>(sz(d))), delta_b = delta_r;
  std::vector<std::vector<Acc>> scr_r(sz(B), std::vector<Acc>(sz(rs))), scr_b = scr_r;
  std::vector<std::vector<Acc>> dh_r = dh0, dh_b = dh0;
  std::vector<const Acc*> hp, dp;
  std::vector<Acc*> deltap, scrp, dhp;
  for (index_t b = 0; b < B; ++b) {
    hp.push_back(h[sz(b)].data());
    dp.push_back(dd[sz(b)].data());
    deltap.push_back(delta_b[sz(b)].data());
    scrp.push_back(scr_b[sz(b)].data());
    dhp.push_back(dh_b[sz(b)].data());
    Reft::forward(*p, h[sz(b)].data(), d, delta_r[sz(b)].data(), scr_r[sz(b)].data());
    Reft::backward(*p, *g_rows, h[sz(b)].data(), d, scr_r[sz(b)].data(), dd[sz(b)].data(), dh_r[sz(b)].data());
  }
  Reft::forward_block(*p, hp.data(), B, d, deltap.data(), scrp.data());
  Reft::backward_block(*p, *g_block, hp.data(), B, d, scrp.data(), dp.data(), dhp.data());
  for (index_t b = 0; b < B; ++b) {
    INFO("row " << b);
    CHECK(std::memcmp(delta_r[sz(b)].data(), delta_b[sz(b)].data(), sizeof(Acc) * sz(d)) == 0);
    CHECK(std::memcmp(scr_r[sz(b)].data(), scr_b[sz(b)].data(), sizeof(Acc) * sz(rs)) == 0);
    CHECK(std::memcmp(dh_r[sz(b)].data(), dh_b[sz(b)].data(), sizeof(Acc) * sz(d)) == 0);
  }
  CHECK(std::memcmp(g_rows.data(), g_block.data(), sizeof(Acc) * sz(g_rows.size())) == 0);
}

template <class Reft>
void check_blocks_match_rows_all(std::uint64_t seed) {
  for (index_t d : {Reft::rank, index_t(37), index_t(64), index_t(1029)})
    for (index_t B : {1, 2, 3, 8, 11, 32}) {
      check_blocks_match_rows<Reft, float>(d, B, seed);
      check_blocks_match_rows<Reft, double>(d, B, seed + 1);
    }
}
}  // namespace

TEST_CASE("loreft/noreft host block forms equal the row functions bit for bit", "[reft][blocks]") {
  check_blocks_match_rows_all<reft::loreft<1>>(500);
  check_blocks_match_rows_all<reft::loreft<4>>(510);
  check_blocks_match_rows_all<reft::noreft<3>>(520);
  check_blocks_match_rows_all<reft::loreft<8>>(530);
  check_blocks_match_rows_all<reft::noreft<12>>(540);  // past 8: the block forms fall back to the rows
}
