// gated_intervention: full compositions against finite differences (double), positions, in-place use,
// thread-count independence, dtype agreement, input validation, concurrent apply, seeded init.
#include "test_intervention_common.hpp"

#include <grun/loss/unlearn.hpp>

#include <algorithm>
#include <thread>

using namespace grun_test;

namespace {
template <class I>
void fd_suite(std::uint64_t seed) {
  for (index_t d : {7, 33}) {
    INFO("d = " << d);
    check_intervention_fd<I>(d, 5, positions::rows({3, 0, 4}), seed, true, 0.5);
    check_intervention_fd<I>(d, 4, positions::all(4), seed + 1, false, 0.5);
    check_intervention_fd<I>(d, 1, positions::all(1), seed + 2, true, 0.5);  // T = 1
    const index_t lengths[] = {2, 3};
    check_intervention_fd<I>(d, 6, positions::last_prompt_token(lengths, 3), seed + 3, true, 0.5);
    check_intervention_fd<I>(d, 3, positions{}, seed + 4, true, 0.5);  // empty positions
  }
}

template <class T>
struct run_result {
  host_matrix<T> out, dh;
  std::vector<T> gates;
};

template <class I, class T>
run_result<T> run(const typename I::template params<T>& p, const host_matrix<T>& h, const host_matrix<T>& dout,
                  const positions& pos, unsigned threads, const std::vector<T>* dgates = nullptr) {
  const index_t n = h.rows, d = h.cols, P = pos.size();
  run_result<T> r{host_matrix<T>(n, d), host_matrix<T>(n, d), std::vector<T>(sz(P))};
  I::forward(exec::host(threads), p, h.view(), pos, r.out.view(), vector_view<T>(r.gates.data(), {P}));
  owned_params<typename I::template params<T>> grads(p);
  I::backward(exec::host(threads), p, h.view(), pos, dout.view(),
              dgates ? vector_view<const T>(dgates->data(), {P}) : vector_view<const T>(), r.dh.view(), *grads);
  return r;
}
}  // namespace

TEST_CASE("linear gate × {loreft, noreft, direft} match finite differences", "[intervention][fd]") {
  fd_suite<gated_intervention<gate::linear, reft::loreft<4>>>(1000);
  fd_suite<gated_intervention<gate::linear, reft::noreft<2>>>(1100);
  fd_suite<gated_intervention<gate::linear, reft::direft<3>>>(1200);
}
TEST_CASE("mlp gate × {loreft, noreft, direft} match finite differences", "[intervention][fd]") {
  fd_suite<gated_intervention<gate::mlp<6, 4>, reft::loreft<4>>>(2000);
  fd_suite<gated_intervention<gate::mlp<6, 4>, reft::noreft<1>>>(2100);
  fd_suite<gated_intervention<gate::mlp<6, 4>, reft::direft<2>>>(2200);
}
TEST_CASE("always gate × {loreft, direft} match finite differences", "[intervention][fd]") {
  fd_suite<gated_intervention<gate::always, reft::loreft<4>>>(3000);
  fd_suite<gated_intervention<gate::always, reft::direft<2>>>(3100);
}

/// Gradients of an mlp-gated LoReFT against central differences of L = Σ c·out + Σ cg·g, on 300
/// sampled parameters (and every 7th entry of dh when `check_dh`); seeds from `seed`. Returns the
/// double parameters and inputs for further checks.
template <class I>
struct mlp_fd_case {
  index_t d, n;
  owned_params<typename I::template params<double>> p;
  host_matrix<double> h, out;
  std::vector<double> gates;
  mlp_fd_case(index_t dd, index_t nn, std::uint64_t seed, bool check_dh)
      : d(dd), n(nn), p(I::template shape<double>(dd)), h(random_matrix<double>(nn, dd, seed + 2)), out(nn, dd),
        gates(sz(nn)) {
    owned_params<typename I::template params<double>> grads(I::template shape<double>(d));
    init(*p, seed);
    randomize(p->gate.w3, seed + 1, 0.5);
    auto c = random_matrix<double>(n, d, seed + 3);
    const auto pos = positions::all(n);
    std::vector<double> cg = random_vector(n, seed + 4);
    host_matrix<double> dh(n, d);
    auto loss = [&]() {
      I::forward(exec::host, *p, h.view(), pos, out.view(), vector_view<double>(gates.data(), {n}));
      double L = 0;
      for (index_t i = 0; i < n * d; ++i) L += c.storage[i] * out.storage[i];
      for (index_t q = 0; q < n; ++q) L += cg[sz(q)] * gates[sz(q)];
      return L;
    };
    I::backward(exec::host(2), *p, h.view(), pos, c.view(), vector_view<const double>(cg.data(), {n}), dh.view(), *grads);
    auto ps = scalars(*p);
    auto gs = scalars(*grads);
    std::vector<double> an, nu;
    grun::rng pick(seed + 5);
    for (int s = 0; s < 300; ++s) {
      const std::size_t i = pick.next() % ps.size();
      an.push_back(*gs[i]);
      nu.push_back(central_difference(ps[i], loss));
    }
    if (check_dh)
      for (index_t i = 0; i < n * d; i += 7) {
        an.push_back(dh.storage[sz(i)]);
        nu.push_back(central_difference(&h.storage[sz(i)], loss));
      }
    CHECK(rel_err(an, nu) < 1e-6);
  }
};

TEST_CASE("the default mlp<256, 64> gate matches finite differences on sampled coordinates", "[intervention][fd]") {
  mlp_fd_case<gated_intervention<gate::mlp<>, reft::loreft<4>>>(7, 3, 5, /*check_dh=*/false);
}

TEST_CASE("mlp host block GEMM (rows past one vector, a partial vector, two chunks) matches finite differences",
          "[intervention][fd]") {
  // n = 37 rows: exec::host runs the gate's first layer as a GEMM over chunks of 32 rows and a
  // tail of 5; d = 13 leaves a column tail in every vector loop. Checks parameters and dh.
  using I = gated_intervention<gate::mlp<13, 4>, reft::loreft<4>>;
  mlp_fd_case<I> fd(13, 37, 15, /*check_dh=*/true);
  const index_t d = fd.d, n = fd.n;
  const auto pos = positions::all(n);
  // The float GEMM agrees with the double one.
  owned_params<I::params<float>> pf(I::shape<float>(d));
  auto ps = scalars(*fd.p);
  for (std::size_t i = 0; i < ps.size(); ++i) *scalars(*pf)[i] = float(*ps[i]);
  host_matrix<float> hf(n, d), outf(n, d);
  for (index_t i = 0; i < n * d; ++i) hf.storage[sz(i)] = float(fd.h.storage[sz(i)]);
  std::vector<float> gf(sz(n));
  I::forward(exec::host, *pf, hf.view(), pos, outf.view(), vector_view<float>(gf.data(), {n}));
  I::forward(exec::host, *fd.p, fd.h.view(), pos, fd.out.view(), vector_view<double>(fd.gates.data(), {n}));
  for (index_t q = 0; q < n; ++q) CHECK(std::abs(double(gf[sz(q)]) - fd.gates[sz(q)]) < 1e-5);
}

TEST_CASE("unselected rows pass through and in-place equals out-of-place", "[intervention]") {
  using I = gated_intervention<gate::linear, reft::loreft<4>>;
  I::module<float> m(16, 3);
  auto h = random_matrix<float>(10, 16, 4);
  auto pos = positions::rows({7, 2});
  host_matrix<float> out(10, 16);
  std::vector<float> g1(2), g2(2);
  m.forward(exec::host, h.view(), pos, out.view(), vector_view<float>(g1.data(), {2}));
  for (index_t i = 0; i < 10; ++i)
    for (index_t j = 0; j < 16; ++j)
      if (i != 7 && i != 2) CHECK(out(i, j) == h(i, j));
      else CHECK(out(i, j) != h(i, j));
  auto inplace = h;
  m.forward(exec::host, inplace.view(), pos, inplace.view(), vector_view<float>(g2.data(), {2}));
  CHECK(std::memcmp(inplace.storage.data(), out.storage.data(), sizeof(float) * 160) == 0);
  CHECK(g1 == g2);
  // backward in place (dh aliases dout) equals out of place
  using P = I::params<float>;
  owned_params<P> ga(m.parameters()), gb(m.parameters());
  auto dout = random_matrix<float>(10, 16, 5);
  host_matrix<float> dh(10, 16);
  I::backward(exec::host, m.parameters(), h.view(), pos, dout.view(), vector_view<const float>(), dh.view(), *ga);
  auto dio = dout;
  I::backward(exec::host, m.parameters(), h.view(), pos, dio.view(), vector_view<const float>(), dio.view(), *gb);
  CHECK(std::memcmp(dio.storage.data(), dh.storage.data(), sizeof(float) * 160) == 0);
  CHECK(std::memcmp(ga.data(), gb.data(), sizeof(float) * std::size_t(ga.size())) == 0);
  for (index_t j = 0; j < 16; ++j) CHECK(dh(0, j) == dout(0, j));  // identity on unselected rows
}

TEST_CASE("results do not depend on the number of threads", "[intervention][threads]") {
  using I = gated_intervention<gate::mlp<8, 4>, reft::loreft<4>>;
  const index_t n = 300, d = 12;
  I::module<float> m(d, 1);
  auto h = random_matrix<float>(n, d, 2), dout = random_matrix<float>(n, d, 3);
  std::vector<index_t> rows;
  for (index_t i = 0; i < n; i += 2) rows.push_back(i);
  auto pos = positions::rows(rows);
  std::vector<float> dg(rows.size(), 0.25f);
  owned_params<I::params<float>> g1(m.parameters());
  auto ref = run<I, float>(m.parameters(), h, dout, pos, 1, &dg);
  {
    I::backward(exec::host(1), m.parameters(), h.view(), pos, dout.view(),
                vector_view<const float>(dg.data(), {index_t(dg.size())}), ref.dh.view(), *g1);
  }
  for (unsigned t : {2u, 3u, 8u, 0u}) {
    INFO("threads = " << t);
    auto r = run<I, float>(m.parameters(), h, dout, pos, t, &dg);
    CHECK(std::memcmp(r.out.storage.data(), ref.out.storage.data(), sizeof(float) * n * d) == 0);
    CHECK(std::memcmp(r.dh.storage.data(), ref.dh.storage.data(), sizeof(float) * n * d) == 0);
    owned_params<I::params<float>> g(m.parameters());
    I::backward(exec::host(t), m.parameters(), h.view(), pos, dout.view(),
                vector_view<const float>(dg.data(), {index_t(dg.size())}), r.dh.view(), *g);
    CHECK(std::memcmp(g.data(), g1.data(), sizeof(float) * std::size_t(g.size())) == 0);
  }
}

TEST_CASE("float and double agree; half and bfloat16 storage compute in fp32", "[intervention][dtype]") {
  using I = gated_intervention<gate::linear, reft::loreft<4>>;
  const index_t n = 6, d = 33;
  I::module<double> md(d, 7);
  auto pos = positions::rows({0, 3, 5});
  auto hd = random_matrix<double>(n, d, 8), dd = random_matrix<double>(n, d, 9);
  auto ref = run<I, double>(md.parameters(), hd, dd, pos, 1);

  auto compare = [&]<class T>(T, double tol) {
    owned_params<I::params<T>> p(I::shape<T>(d));
    for_each_param_pair(*p, md.parameters(), [](auto& a, const auto& b) {
      for (index_t i = 0; i < b.size(); ++i) a[i] = store<T>(b[i]);
    });
    host_matrix<T> h(n, d), dout(n, d);
    for (index_t i = 0; i < n * d; ++i) { h.storage[i] = store<T>(hd.storage[i]); dout.storage[i] = store<T>(dd.storage[i]); }
    auto r = run<I, T>(*p, h, dout, pos, 2);
    double worst = 0;
    for (index_t i = 0; i < n * d; ++i) {
      worst = std::max(worst, std::abs(load<double>(r.out.storage[i]) - ref.out.storage[i]));
      worst = std::max(worst, std::abs(load<double>(r.dh.storage[i]) - ref.dh.storage[i]));
    }
    for (std::size_t q = 0; q < 3; ++q) worst = std::max(worst, std::abs(load<double>(r.gates[q]) - ref.gates[q]));
    CHECK(worst < tol);
  };
  compare(float{}, 1e-5);
  compare(half{}, 2e-2);
  compare(bfloat16{}, 1e-1);
}

TEST_CASE("half storage takes a gate loss's fp32 dgates: gate_bce on saturated gates passes half's range",
          "[intervention][dtype][gate]") {
  // gate_bce's gradient on a gate below ε is −w/(G·ε): with ε = 1e-6 and G = 4 gate values, −2.5e5.
  // Rounded to half (max 65504) it is −inf, and inf·σ'(z) poisons every gate gradient; taken as the
  // loss writes it (acc_t<half> = float), the gradients are finite and agree with fp32 storage.
  using I = gated_intervention<gate::linear, reft::loreft<4>>;
  const index_t n = 4, d = 24;
  const auto pos = positions::all(n);
  I::module<float> mf(d, 5);
  auto& pf = *mf.owned_parameters();
  pf.gate.bias[0] = -16.f;  // every gate ≈ σ(−16) ≈ 1e-7 < ε: saturated on the wrong side for a forget row
  owned_params<I::params<half>> ph(I::shape<half>(d));
  for_each_param_pair(*ph, pf, [](auto& a, const auto& b) {
    for (index_t i = 0; i < b.size(); ++i) { a[i] = store<half>(b[i]); b[i] = load<float>(a[i]); }
  });  // fp32 reference on the very values half stores
  auto hf = random_matrix<float>(n, d, 61, 0.5), doutf = random_matrix<float>(n, d, 62, 0.1);
  host_matrix<half> hh(n, d), douth(n, d);
  for (index_t i = 0; i < n * d; ++i) {
    hh.storage[i] = store<half>(hf.storage[i]);
    hf.storage[i] = load<float>(hh.storage[i]);
    douth.storage[i] = store<half>(doutf.storage[i]);
    doutf.storage[i] = load<float>(douth.storage[i]);
  }
  host_matrix<half> outh(n, d);
  std::vector<half> gates(sz(n));
  I::forward(exec::host, *ph, hh.view(), pos, outh.view(), vector_view<half>(gates.data(), {n}));

  // The loss on this side is what a trainer computes: loss::inputs<half> carries gates in float.
  std::vector<float> g(sz(n)), dg(sz(n), 0.f);
  for (index_t q = 0; q < n; ++q) g[sz(q)] = load<float>(gates[sz(q)]);
  loss::inputs<half> in;
  in.forget.gate = {g.data(), {n}};
  loss::grads<half> lg;
  lg.forget.gate = {dg.data(), {n}};
  loss::gate_bce{}.evaluate(exec::host, in, lg, 1.0f);
  for (index_t q = 0; q < n; ++q) {
    INFO("q = " << q << ", gate " << g[sz(q)] << ", dL/dg " << dg[sz(q)]);
    REQUIRE(g[sz(q)] < 1e-6f);
    REQUIRE(dg[sz(q)] < -65504.f);
  }
  const vector_view<const float> dgv(dg.data(), {n});

  owned_params<I::params<float>> grads_f(I::shape<float>(d));
  host_matrix<float> dhf(n, d);
  I::backward(exec::host, pf, hf.view(), pos, doutf.view(), dgv, dhf.view(), *grads_f);
  owned_params<I::params<half>> grads_h(I::shape<half>(d));
  host_matrix<half> dhh(n, d);
  I::backward(exec::host, *ph, hh.view(), pos, douth.view(), dgv, dhh.view(), *grads_h);

  auto rel = [](auto a, const auto* b, index_t m) {  // max |a − b| / max |b| over m values
    double num = 0, den = 0;
    for (index_t i = 0; i < m; ++i) {
      num = std::max(num, std::abs(load<double>(a[i]) - load<double>(b[i])));
      den = std::max(den, std::abs(load<double>(b[i])));
    }
    return num / std::max(den, 1e-30);
  };
  int leaf = 0;
  for_each_param_pair(grads_h->gate, grads_f->gate, [&](const auto& a, const auto& b) {
    INFO("gate gradient leaf " << leaf++);
    for (index_t i = 0; i < a.size(); ++i) REQUIRE(std::isfinite(load<float>(a[i])));
    CHECK(rel(a.data, b.data, a.size()) < 2e-2);
  });
  // The ReFT's gradients carry g ≈ 1e-7 (dL/dΔ = g·dout): below half's smallest subnormal step 2^-24,
  // where half storage keeps nothing but the nearest multiple of it.
  for_each_param_pair(grads_h->reft, grads_f->reft, [&](const auto& a, const auto& b) {
    INFO("ReFT gradient leaf " << leaf++);
    for (index_t i = 0; i < a.size(); ++i) REQUIRE(std::abs(load<double>(a[i]) - double(b[i])) <= std::ldexp(1.0, -25));
  });
  CHECK(grads_f->gate.bias[0] != 0.f);  // the gate path carries the loss: σ'(z)·dL/dg ≈ −w/G
  CHECK(rel(dhh.storage.data(), dhf.storage.data(), n * d) < 2e-2);

  // The same gradient rounded to half first is what the fp32 overload exists to avoid.
  std::vector<half> dg_half(sz(n));
  for (index_t q = 0; q < n; ++q) dg_half[sz(q)] = store<half>(dg[sz(q)]);
  CHECK(std::isinf(load<float>(dg_half[0])));
  owned_params<I::params<half>> grads_rounded(I::shape<half>(d));
  I::backward(exec::host, *ph, hh.view(), pos, douth.view(), vector_view<const half>(dg_half.data(), {n}), dhh.view(),
              *grads_rounded);
  CHECK_FALSE(std::isfinite(load<float>(grads_rounded->gate.bias[0])));

  // Values half holds: fp32 and half dgates give the same bits (both are read as float), for the
  // static backward, the owning module and a stack.
  for (index_t q = 0; q < n; ++q) { dg[sz(q)] = 0.25f * float(q) - 0.5f; dg_half[sz(q)] = store<half>(dg[sz(q)]); }
  owned_params<I::params<half>> ga(I::shape<half>(d)), gb(I::shape<half>(d));
  host_matrix<half> dha(n, d), dhb(n, d);
  I::backward(exec::host, *ph, hh.view(), pos, douth.view(), dgv, dha.view(), *ga);
  I::backward(exec::host, *ph, hh.view(), pos, douth.view(), vector_view<const half>(dg_half.data(), {n}), dhb.view(), *gb);
  CHECK(std::memcmp(ga.data(), gb.data(), sizeof(half) * std::size_t(ga.size())) == 0);
  CHECK(std::memcmp(dha.storage.data(), dhb.storage.data(), sizeof(half) * std::size_t(n * d)) == 0);

  I::module<half> mh(d, 5);
  mh.backward(exec::host, hh.view(), pos, douth.view(), vector_view<float>(dg.data(), {n}), dha.view());
  const std::vector<half> from_fp32(mh.gradients().gate.weight.data, mh.gradients().gate.weight.data + d);
  mh.backward(exec::host, hh.view(), pos, douth.view(), vector_view<const half>(dg_half.data(), {n}), dha.view());
  CHECK(std::memcmp(from_fp32.data(), mh.gradients().gate.weight.data, sizeof(half) * std::size_t(d)) == 0);

  intervention_stack<gate::linear, reft::loreft<4>, I::ortho_type, half> st(d);
  st.append(*ph);
  st.backward(exec::host, hh.view(), pos, douth.view(), matrix_view<const float>(dg.data(), {1, n}), dha.view(), *ga);
  st.backward(exec::host, hh.view(), pos, douth.view(), matrix_view<const half>(dg_half.data(), {1, n}), dhb.view(), *gb);
  CHECK(std::memcmp(ga.data(), gb.data(), sizeof(half) * std::size_t(ga.size())) == 0);
}

TEST_CASE("bad inputs throw shape_error naming expected and got", "[intervention][errors]") {
  using I = gated_intervention<gate::linear, reft::loreft<4>>;
  const index_t n = 5, d = 8;
  I::module<float> m(d, 1);
  auto h = random_matrix<float>(n, d, 2);
  host_matrix<float> out(n, d), dh(n, d), wrong(n, d + 1);
  std::vector<float> g(8);
  auto pos = positions::rows({1, 2});
  auto gv = vector_view<float>(g.data(), {2});
  auto fwd = [&](auto&&... a) { I::forward(exec::host, m.parameters(), a...); };

  CHECK_THROWS_WITH(fwd(wrong.view(), pos, wrong.view(), gv), Catch::Contains("expected shape [1, 9]"));
  CHECK_THROWS_WITH(fwd(h.view(), pos, wrong.view(), gv), Catch::Contains("out: expected shape [5, 8]"));
  CHECK_THROWS_WITH(fwd(h.view(), pos, out.view(), vector_view<float>(g.data(), {3})),
                    Catch::Contains("gates (one per position): expected extent 2"));
  CHECK_THROWS_WITH(fwd(h.view(), positions::rows({1, 5}), out.view(), gv), Catch::Contains("expected a row in [0, 5)"));
  CHECK_THROWS_WITH(fwd(h.view(), positions::all(6), out.view(), vector_view<float>(g.data(), {6})),
                    Catch::Contains("built for 6 rows"));
  // a column-strided h (every other element)
  host_matrix<float> wide(n, 2 * d);
  matrix_view<const float> strided(wide.storage.data(), {n, d}, {2 * d, 2});
  CHECK_THROWS_WITH(fwd(strided, pos, out.view(), gv), Catch::Contains("unit stride"));
  // a row-strided h is fine (rows contiguous)
  matrix_view<const float> rowstrided(wide.storage.data(), {n, d}, {2 * d, 1});
  CHECK_NOTHROW(fwd(rowstrided, pos, out.view(), gv));
  // partially overlapping out
  host_matrix<float> big(n + 1, d);
  matrix_view<float> shifted(big.storage.data() + d, {n, d});
  CHECK_THROWS_WITH(fwd(matrix_view<const float>(big.storage.data(), {n, d}), pos, shifted, gv),
                    Catch::Contains("partially overlapping"));
  // parameters of the wrong shape / without storage
  auto bad = m.parameters();
  bad.reft.weight.cols = d + 1;
  CHECK_THROWS_WITH(I::forward(exec::host, bad, h.view(), pos, out.view(), gv), Catch::Contains("reft.weight"));
  auto null = m.parameters();
  null.gate.bias.data = nullptr;
  CHECK_THROWS_WITH(I::forward(exec::host, null, h.view(), pos, out.view(), gv), Catch::Contains("null data"));
  // backward
  owned_params<I::params<float>> grads(m.parameters());
  auto bwd = [&](auto&&... a) { I::backward(exec::host, m.parameters(), a...); };
  CHECK_THROWS_WITH(bwd(h.view(), pos, wrong.view(), vector_view<const float>(), dh.view(), *grads),
                    Catch::Contains("dout: expected shape [5, 8]"));
  CHECK_THROWS_WITH(bwd(h.view(), pos, out.view(), vector_view<const float>(g.data(), {3}), dh.view(), *grads),
                    Catch::Contains("dgates must be empty"));
  CHECK_THROWS_WITH(bwd(h.view(), pos, out.view(), vector_view<const float>(), wrong.view(), *grads),
                    Catch::Contains("dh: expected shape"));
  auto h2 = h;
  CHECK_THROWS_WITH(bwd(h2.view(), pos, out.view(), vector_view<const float>(), h2.view(), *grads),
                    Catch::Contains("dh must not overlap h"));
  auto badg = *grads;
  badg.gate.weight.cols = 3;
  CHECK_THROWS_WITH(bwd(h.view(), pos, out.view(), vector_view<const float>(), dh.view(), badg),
                    Catch::Contains("(grads): parameter gate.weight"));
  CHECK_THROWS_AS(I::module<float>(0, 1), shape_error);
}

TEST_CASE("positions: constructors and validation", "[intervention][positions]") {
  auto a = positions::all(4);
  CHECK(a.size() == 4);
  CHECK(a[3] == 3);
  CHECK(a.expected_rows() == 4);
  const index_t lengths[] = {3, 1, 5};
  auto l = positions::last_prompt_token(lengths, 5);
  CHECK(std::vector<index_t>(l.span().begin(), l.span().end()) == std::vector<index_t>{2, 5, 14});
  CHECK(l.expected_rows() == 15);
  const index_t zero[] = {2, 0};
  CHECK_THROWS_WITH(positions::last_prompt_token(zero, 4), Catch::Contains("must be in 1..4 (seq_len), got 0"));
  const index_t too_long[] = {5};
  CHECK_THROWS_AS(positions::last_prompt_token(too_long, 4), shape_error);
  CHECK_THROWS_AS(positions::last_prompt_token(lengths, 0), shape_error);
  CHECK_THROWS_WITH(positions::rows({1, 4, 1}), Catch::Contains("row 1 appears more than once"));
  CHECK_THROWS_WITH(positions::rows({-1}), Catch::Contains(">= 0"));
  CHECK_THROWS_AS(positions::all(-1), shape_error);
  CHECK(positions::rows({}).empty());
  CHECK(positions{}.size() == 0);
  CHECK_NOTHROW(positions::rows({9}).validate(10, "t"));
  CHECK_THROWS_AS(positions::rows({10}).validate(10, "t"), shape_error);
  CHECK_THROWS_WITH(positions::rows({3, 12, 5}).validate(10, "t"),
                    Catch::Contains("t: position 1 selects row 12, expected a row in [0, 10)"));
  // in_order / max_row are known at construction (the CUDA path asks them on every call).
  CHECK(a.in_order());
  CHECK(a.max_row() == 3);
  CHECK(positions::rows({0, 1, 2}).in_order());
  CHECK_FALSE(positions::rows({0, 2, 1}).in_order());
  CHECK_FALSE(positions::rows({1}).in_order());
  CHECK_FALSE(l.in_order());
  CHECK(l.max_row() == 14);
  CHECK(positions{}.in_order());
  CHECK(positions{}.max_row() == -1);
  CHECK(positions::rows({4, 0, 7}).max_row() == 7);
}

TEST_CASE("one trained module applied from many threads at once gives identical results", "[intervention][threads]") {
  using I = gated_intervention<gate::mlp<16, 8>, reft::loreft<4>, ortho::householder>;
  const index_t n = 40, d = 24;
  const I::module<float> m(d, 11);
  auto h = random_matrix<float>(n, d, 12);
  auto pos = positions::all(n);
  host_matrix<float> ref(n, d);
  std::vector<float> ref_g(sz(n));
  m.forward(exec::host, h.view(), pos, ref.view(), vector_view<float>(ref_g.data(), {n}));
  constexpr int workers = 8;
  std::vector<host_matrix<float>> outs;
  std::vector<std::vector<float>> gates(workers, std::vector<float>(sz(n)));
  for (int w = 0; w < workers; ++w) outs.emplace_back(n, d);
  std::vector<std::thread> pool;
  for (int w = 0; w < workers; ++w)
    pool.emplace_back([&, w] {
      for (int rep = 0; rep < 20; ++rep)
        m.forward(exec::host(unsigned(1 + w % 3)), h.view(), pos, outs[sz(w)].view(),
                  vector_view<float>(gates[sz(w)].data(), {n}));
    });
  for (auto& t : pool) t.join();
  for (int w = 0; w < workers; ++w) {
    CHECK(std::memcmp(outs[sz(w)].storage.data(), ref.storage.data(), sizeof(float) * n * d) == 0);
    CHECK(gates[sz(w)] == ref_g);
  }
}

TEST_CASE("backward repeats bit for bit: its kept scratch is re-zeroed between calls of any size, on any thread",
          "[intervention][threads]") {
  // The host backward keeps its gradient slots (and the mlp gate's dZ1ᵀ) on the calling thread
  // across calls up to 4M scalars, and allocates fresh above; a call after a larger one, or the
  // same call again, must not see what an earlier one left there.
  const auto gradients_of = [](const auto& m, index_t n, index_t P, unsigned threads) {
    using M = std::remove_cvref_t<decltype(m)>;
    using I = typename M::intervention;
    const index_t d = m.dim();
    auto h = random_matrix<float>(n, d, 40 + std::uint64_t(P)), dout = random_matrix<float>(n, d, 41);
    host_matrix<float> dh(n, d);
    std::vector<index_t> rows;
    for (index_t i = 0; i < P; ++i) rows.push_back((i * 7) % n);
    std::sort(rows.begin(), rows.end());
    rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
    owned_params<typename I::template params<float>> g(m.parameters());
    I::backward(exec::host(threads), m.parameters(), h.view(), positions::rows(rows), dout.view(),
                vector_view<const float>(), dh.view(), *g);
    return std::vector<float>(g.data(), g.data() + g.size());
  };
  SECTION("linear gate + loreft<4>, then mlp<16, 8> + loreft<4>, then a call past the kept limit") {
    using L = gated_intervention<gate::linear, reft::loreft<4>>;
    using Mlp = gated_intervention<gate::mlp<16, 8>, reft::loreft<4>>;
    using Big = gated_intervention<gate::linear, reft::loreft<32>>;
    const L::module<float> small(64, 1);
    const Mlp::module<float> mlp(64, 2);
    const Big::module<float> big(8192, 3);  // ~524K gradient scalars × 10 slots > 4M: fresh slots
    const auto small_first = gradients_of(small, 9, 5, 1);
    const auto mlp_first = gradients_of(mlp, 80, 60, 2);
    const auto big_first = gradients_of(big, 170, 170, 2);
    CHECK(gradients_of(small, 9, 5, 1) == small_first);
    CHECK(gradients_of(mlp, 80, 60, 2) == mlp_first);
    CHECK(gradients_of(big, 170, 170, 2) == big_first);
    CHECK(gradients_of(small, 9, 5, 1) == small_first);
    CHECK(gradients_of(mlp, 80, 60, 1) == mlp_first);  // any thread count: the same bits
  }
  SECTION("from several threads at once") {
    using Mlp = gated_intervention<gate::mlp<16, 8>, reft::loreft<4>>;
    const Mlp::module<float> mlp(48, 4);
    const auto ref = gradients_of(mlp, 50, 33, 1);
    std::vector<int> same(4, 0);
    std::vector<std::thread> pool;
    for (int w = 0; w < 4; ++w)
      pool.emplace_back([&, w] {
        for (int rep = 0; rep < 5; ++rep) same[sz(w)] += gradients_of(mlp, 50, 33, unsigned(1 + w % 2)) == ref;
      });
    for (auto& t : pool) t.join();
    for (int w = 0; w < 4; ++w) CHECK(same[sz(w)] == 5);
  }
}

namespace {
/// The bytes of what a matrix or a parameter set holds, for bit-for-bit comparison (half has no ==).
template <class T>
std::vector<unsigned char> as_bits(const T* p, std::size_t n) {
  const auto* b = reinterpret_cast<const unsigned char*>(p);
  return std::vector<unsigned char>(b, b + n * sizeof(T));
}
template <class T>
std::vector<unsigned char> as_vector(const host_matrix<T>& m) { return as_bits(m.storage.data(), m.storage.size()); }
template <class P>
std::vector<unsigned char> as_vector(const owned_params<P>& p) { return as_bits(p.data(), sz(p.size())); }

/// Forward then backward of I on (n, d, positions) twice: recomputing the gate and from a
/// saved_activations; every output compared bit for bit.
template <class I, class T>
void check_saved_matches_recompute(index_t n, index_t d, const std::vector<index_t>& rows, unsigned threads,
                                   bool with_dgates, std::uint64_t seed) {
  INFO("n = " << n << ", d = " << d << ", P = " << rows.size() << ", threads = " << threads
              << (with_dgates ? ", dgates" : ""));
  const typename I::template module<T> m(d, seed);
  const auto h = random_matrix<T>(n, d, seed + 1), dout = random_matrix<T>(n, d, seed + 2);
  const auto pos = positions::rows(rows);
  const index_t P = pos.size();
  std::vector<T> dg(sz(P));
  for (index_t q = 0; q < P; ++q) dg[sz(q)] = T(0.25 * double(q % 3) - 0.3);
  const auto dgates = with_dgates ? vector_view<const T>(dg.data(), {P}) : vector_view<const T>();
  const exec::host_t ex = exec::host(threads);

  host_matrix<T> out0(n, d), out1(n, d), dh0(n, d), dh1(n, d);
  std::vector<T> g0(sz(P)), g1(sz(P));
  owned_params<typename I::template params<T>> grads0(m.parameters()), grads1(m.parameters());
  I::forward(ex, m.parameters(), h.view(), pos, out0.view(), vector_view<T>(g0.data(), {P}));
  I::backward(ex, m.parameters(), h.view(), pos, dout.view(), dgates, dh0.view(), *grads0);

  saved_activations<T> saved;
  CHECK_FALSE(saved.filled());
  I::forward(ex, m.parameters(), h.view(), pos, out1.view(), vector_view<T>(g1.data(), {P}), saved);
  CHECK(saved.filled());
  CHECK(saved.positions() == P);
  CHECK(saved.modules() == 1);
  I::backward(ex, m.parameters(), h.view(), pos, dout.view(), dgates, dh1.view(), *grads1, saved);
  CHECK(as_vector(out0) == as_vector(out1));
  CHECK(as_bits(g0.data(), g0.size()) == as_bits(g1.data(), g1.size()));
  CHECK(as_vector(dh0) == as_vector(dh1));
  CHECK(as_vector(grads0) == as_vector(grads1));
  // A second backward from the same saved activations (it reads them, does not consume them).
  I::backward(ex, m.parameters(), h.view(), pos, dout.view(), dgates, dh1.view(), *grads1, saved);
  CHECK(as_vector(grads0) == as_vector(grads1));
}
}  // namespace

TEST_CASE("saved activations: the backward skips the gate's forward and gives the same bits",
          "[intervention][saved]") {
  using Mlp = gated_intervention<gate::mlp<16, 8>, reft::loreft<4>>;
  SECTION("mlp gate: positions short of a block, past one, unsorted; threads 1 and 2; with and without dgates") {
    for (unsigned threads : {1u, 2u})
      for (bool with_dgates : {false, true}) {
        check_saved_matches_recompute<Mlp, float>(9, 37, {4}, threads, with_dgates, 1);
        check_saved_matches_recompute<Mlp, float>(40, 64, {0, 3, 5, 6, 9, 11, 17, 30, 39}, threads, with_dgates, 2);
        std::vector<index_t> many;
        for (index_t i = 0; i < 70; ++i) many.push_back((i * 13) % 70);
        check_saved_matches_recompute<Mlp, float>(70, 33, many, threads, with_dgates, 3);
        check_saved_matches_recompute<Mlp, double>(70, 33, many, threads, with_dgates, 4);
      }
    check_saved_matches_recompute<Mlp, float>(5, 16, {}, 1, false, 5);  // no positions
  }
  SECTION("mlp gate with half storage: saved in fp32") {
    check_saved_matches_recompute<Mlp, half>(30, 40, {1, 2, 8, 9, 20, 29}, 2, true, 6);
    saved_activations<half> s;
    static_assert(std::is_same_v<saved_activations<half>::value_type, float>);
  }
  SECTION("the default mlp<256, 64>: 321 scalars a position") {
    using Default = gated_intervention<gate::mlp<>, reft::loreft<4>>;
    check_saved_matches_recompute<Default, float>(20, 48, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 19}, 2, true, 7);
    const Default::module<float> m(48, 7);
    const auto h = random_matrix<float>(20, 48, 8);
    host_matrix<float> out(20, 48);
    std::vector<float> g(3);
    saved_activations<float> saved;
    m.forward(exec::host, h.view(), positions::rows({1, 5, 7}), out.view(), vector_view<float>(g.data(), {3}), saved);
    CHECK(saved.width() == 256 + 64 + 1);
    CHECK(saved.bytes() == 3 * 321 * sizeof(float));
  }
  SECTION("linear gate and direft: nothing worth saving, the backward recomputes") {
    using L = gated_intervention<gate::linear, reft::loreft<4>>;
    using D = gated_intervention<gate::linear, reft::direft<3>>;
    check_saved_matches_recompute<L, float>(12, 33, {0, 2, 11}, 2, true, 9);
    check_saved_matches_recompute<D, double>(12, 33, {0, 2, 11}, 1, false, 10);
    const L::module<float> m(33, 9);
    const auto h = random_matrix<float>(12, 33, 8);
    host_matrix<float> out(12, 33);
    std::vector<float> g(2);
    saved_activations<float> saved;
    m.forward(exec::host, h.view(), positions::rows({1, 5}), out.view(), vector_view<float>(g.data(), {2}), saved);
    CHECK(saved.filled());
    CHECK(saved.width() == 0);
    CHECK(saved.bytes() == 0);
  }
}

TEST_CASE("saved activations: module and stack use them; the backward really reads them", "[intervention][saved]") {
  using Mlp = gated_intervention<gate::mlp<16, 8>, reft::loreft<4>>;
  const index_t n = 24, d = 40;
  const auto h = random_matrix<float>(n, d, 11), dout = random_matrix<float>(n, d, 12);
  const auto pos = positions::rows({0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 20, 23});
  const index_t P = pos.size();
  host_matrix<float> out(n, d), dh0(n, d), dh1(n, d);
  std::vector<float> g(sz(P));

  SECTION("owning module") {
    Mlp::module<float> m(d, 13);
    m.forward(exec::host, h.view(), pos, out.view(), vector_view<float>(g.data(), {P}));
    m.backward(exec::host, h.view(), pos, dout.view(), vector_view<const float>(), dh0.view());
    const std::vector<float> ref(m.owned_gradients().data(), m.owned_gradients().data() + m.owned_gradients().size());
    saved_activations<float> saved;
    m.forward(exec::host, h.view(), pos, out.view(), vector_view<float>(g.data(), {P}), saved);
    m.backward(exec::host, h.view(), pos, dout.view(), vector_view<const float>(), dh1.view(), saved);
    CHECK(std::vector<float>(m.owned_gradients().data(), m.owned_gradients().data() + m.owned_gradients().size()) == ref);
    CHECK(as_vector(dh0) == as_vector(dh1));
    // Change the gate's first layer after the forward: a backward from the saved activations still
    // sees the old ones (so it read them), a recomputing one sees the new.
    auto& w1 = gate::mlp<16, 8>::first_layer_weight(m.owned_parameters()->gate);
    for (index_t i = 0; i < w1.size(); ++i) w1.data[i] *= 1.5f;
    m.backward(exec::host, h.view(), pos, dout.view(), vector_view<const float>(), dh1.view(), saved);
    const std::vector<float> from_saved(m.owned_gradients().data(), m.owned_gradients().data() + m.owned_gradients().size());
    m.backward(exec::host, h.view(), pos, dout.view(), vector_view<const float>(), dh1.view());
    const std::vector<float> recomputed(m.owned_gradients().data(), m.owned_gradients().data() + m.owned_gradients().size());
    CHECK(from_saved != recomputed);
  }
  SECTION("stack of 3, training the newest and a frozen one") {
    intervention_stack<gate::mlp<16, 8>, reft::loreft<4>, ortho::qr_retraction, float> st(d, 0.5, 0.7);
    st.append(21);
    st.append(22);
    st.append(23);
    host_matrix<float> gates(3, P);
    std::vector<float> dgv(sz(3 * P), 0.125f);
    const matrix_view<const float> dg(dgv.data(), {3, P});
    using PT = decltype(st)::params_type;
    owned_params<PT> a(st.module(0)), b(st.module(0));
    for (index_t trained : {index_t(-1), index_t(0)}) {
      st.forward(exec::host(2), h.view(), pos, out.view(), gates.view());
      st.backward(exec::host(2), h.view(), pos, dout.view(), dg, dh0.view(), *a, trained);
      saved_activations<float> saved;
      st.forward(exec::host(2), h.view(), pos, out.view(), gates.view(), saved);
      CHECK(saved.modules() == 3);
      st.backward(exec::host(2), h.view(), pos, dout.view(), dg, dh1.view(), *b, saved, trained);
      CHECK(as_vector(a) == as_vector(b));
      CHECK(as_vector(dh0) == as_vector(dh1));
    }
  }
}

TEST_CASE("saved activations: a backward refuses ones from no forward or another call", "[intervention][saved][errors]") {
  using Mlp = gated_intervention<gate::mlp<16, 8>, reft::loreft<4>>;
  const Mlp::module<float> m(16, 1);
  const auto h = random_matrix<float>(6, 16, 2);
  host_matrix<float> out(6, 16), dh(6, 16);
  std::vector<float> g(3);
  owned_params<Mlp::params<float>> grads(m.parameters());
  saved_activations<float> saved;
  const auto pos = positions::rows({0, 2, 4});
  CHECK_THROWS_WITH(Mlp::backward(exec::host, m.parameters(), h.view(), pos, h.view(), vector_view<const float>(),
                                     dh.view(), *grads, saved),
                       Catch::Contains("expected what a forward saved, got none"));
  Mlp::forward(exec::host, m.parameters(), h.view(), pos, out.view(), vector_view<float>(g.data(), {3}), saved);
  CHECK_THROWS_WITH(Mlp::backward(exec::host, m.parameters(), h.view(), positions::rows({0, 2}), h.view(),
                                     vector_view<const float>(), dh.view(), *grads, saved),
                       Catch::Contains("expected a forward's over 1 module(s), 2 positions, d = 16; "
                                                          "got one over 1 module(s), 3 positions, d = 16"));
  // A forward that refuses its inputs (gates of the wrong length) leaves the last forward's standing.
  CHECK_THROWS_AS(Mlp::forward(exec::host, m.parameters(), h.view(), pos, out.view(),
                               vector_view<float>(g.data(), {2}), saved),
                  shape_error);
  CHECK(saved.filled());
  CHECK(saved.positions() == 3);
  saved.clear();
  CHECK_FALSE(saved.filled());
  CHECK_THROWS_AS(Mlp::backward(exec::host, m.parameters(), h.view(), pos, h.view(), vector_view<const float>(),
                                dh.view(), *grads, saved),
                  shape_error);
}

TEST_CASE("init is deterministic for a seed", "[intervention][init]") {
  using I = gated_intervention<gate::linear, reft::loreft<4>>;
  I::module<float> a(33, 42), b(33, 42), c(33, 43);
  CHECK(std::memcmp(a.owned_parameters().data(), b.owned_parameters().data(), sizeof(float) * 33 * 9 + 20) == 0);
  CHECK(std::memcmp(a.owned_parameters().data(), c.owned_parameters().data(), sizeof(float) * 33) != 0);
  // The generator's integers are fixed by its definition (xoshiro256** seeded by splitmix64).
  grun::rng g(0);
  const std::uint64_t first = g.next(), second = g.next();
  grun::rng g2(0);
  CHECK(g2.next() == first);
  CHECK(g2.next() == second);
  CHECK(first != second);
  // Uniforms in [0, 1), normals with the right moments.
  grun::rng n(1);
  double s = 0, s2 = 0;
  for (int i = 0; i < 20000; ++i) { const double x = n.normal(); s += x; s2 += x * x; }
  CHECK(std::abs(s / 20000) < 0.03);
  CHECK(std::abs(s2 / 20000 - 1) < 0.05);
  // The gate's stream does not depend on the reft and vice versa: same seed, different gate, same R.
  using M = gated_intervention<gate::mlp<4, 2>, reft::loreft<4>>;
  M::module<float> mm(33, 42);
  CHECK(std::memcmp(mm.parameters().reft.rotate_layer.data, a.parameters().reft.rotate_layer.data, sizeof(float) * 132) == 0);
}

TEST_CASE("quickstart: the owning module", "[intervention][module]") {
  using unlearner = gated_intervention<gate::linear, reft::loreft<4>>;
  const index_t batch = 2, seq = 5, d = 16;
  unlearner::module<float> m(d, /*seed=*/1);
  auto h = random_matrix<float>(batch * seq, d, 3);
  host_matrix<float> out(batch * seq, d), dh(batch * seq, d);
  std::vector<float> gates(sz(batch));
  const index_t lengths[] = {3, 5};
  auto pos = positions::last_prompt_token(lengths, seq);
  m.forward(exec::host, h.view(), pos, out.view(), vector_view<float>(gates.data(), {batch}));
  m.backward(exec::host, h.view(), pos, out.view(), vector_view<const float>(), dh.view());
  CHECK(parameter_count(m.parameters()) == (d + 1) + (2 * 4 * d + 4));
  CHECK(m.dim() == d);
  m.retract();
}

// ---- the dispatch seam: a mock executor that records what reaches it (Thrust-style) ----------
namespace {
struct recording_exec {
  using memory_space = host_space;
  static constexpr const char* name = "test::recording_exec";
};
struct dispatch_log {
  int forwards = 0, backwards = 0;
  index_t modules = -1, trained = -1;
  double scale = 0;
};
dispatch_log g_log;
}  // namespace

template <class G, class R, class O>
struct grun::detail::intervention_impl<recording_exec, grun::gated_intervention<G, R, O>> {
  using host = intervention_impl<exec::host_t, gated_intervention<G, R, O>>;
  template <class P, class... A>
  static void forward(const recording_exec&, std::span<const P> m, double scale, A&&... rest) {
    ++g_log.forwards;
    g_log.modules = index_t(m.size());
    g_log.scale = scale;
    host::forward(exec::host, m, scale, std::forward<A>(rest)...);
  }
  template <class P, class... A>
  static void backward(const recording_exec&, std::span<const P> m, double scale, index_t trained, A&&... rest) {
    ++g_log.backwards;
    g_log.trained = trained;
    host::backward(exec::host, m, scale, trained, std::forward<A>(rest)...);
  }
};

TEST_CASE("executors reach the implementation through detail::intervention_impl", "[intervention][dispatch]") {
  static_assert(executor<recording_exec>);
  intervention_stack<gate::linear, reft::loreft<2>, ortho::qr_retraction, double> st(5, 0.5, 1.0);
  st.append(1);
  st.append(2);
  auto h = random_matrix<double>(3, 5, 3);
  host_matrix<double> out(3, 5), ref(3, 5), dh(3, 5);
  std::vector<double> gates(4);
  auto pos = positions::rows({0, 2});
  st.forward(recording_exec{}, h.view(), pos, out.view(), matrix_view<double>(gates.data(), {2, 2}));
  st.forward(exec::host, h.view(), pos, ref.view(), matrix_view<double>(gates.data(), {2, 2}));
  CHECK(g_log.forwards == 1);
  CHECK(g_log.modules == 2);
  CHECK(g_log.scale == 2.0);
  CHECK(std::memcmp(out.storage.data(), ref.storage.data(), sizeof(double) * 15) == 0);
  owned_params<decltype(st)::params_type> grads(st.module(0));
  st.backward(recording_exec{}, h.view(), pos, out.view(), matrix_view<const double>(), dh.view(), *grads, 0);
  CHECK(g_log.backwards == 1);
  CHECK(g_log.trained == 0);
}
