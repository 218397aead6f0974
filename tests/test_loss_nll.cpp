// Fused token NLL and sequence reductions (grun/loss/token_nll.hpp, grun/loss/sequence.hpp).
#include <catch2/catch.hpp>

#include <sys/mman.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "grun/loss/sequence.hpp"
#include "grun/loss/token_nll.hpp"

using namespace grun;
using grun::loss::ignore_index;

namespace {

// Naive two-pass reference in long double: max, then Σ exp(x − max).
long double naive_lse(const std::vector<long double>& x) {
  long double m = x[0];
  for (auto v : x) m = std::max(m, v);
  long double s = 0;
  for (auto v : x) s += std::exp(v - m);
  return m + std::log(s);
}

template <class T>
host_matrix<T> make_logits(index_t T_, index_t V, double scale, double offset, unsigned seed) {
  host_matrix<T> m(T_, V);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  for (index_t t = 0; t < T_; ++t)
    for (index_t v = 0; v < V; ++v) m(t, v) = store<T>(static_cast<acc_t<T>>(offset + scale * u(rng)));
  return m;
}

buffer<std::int64_t> make_labels(index_t T_, index_t V, unsigned seed, double ignore_frac = 0.25) {
  buffer<std::int64_t> y(T_);
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<std::int64_t> pick(0, V - 1);
  std::uniform_real_distribution<double> u(0, 1);
  for (index_t t = 0; t < T_; ++t) y[t] = u(rng) < ignore_frac ? ignore_index : pick(rng);
  return y;
}

template <class T>
std::vector<long double> row_ld(const host_matrix<T>& m, index_t t) {
  std::vector<long double> r(static_cast<std::size_t>(m.cols));
  for (index_t v = 0; v < m.cols; ++v) r[static_cast<std::size_t>(v)] = static_cast<long double>(load<double>(m(t, v)));
  return r;
}

template <class T>
void check_against_naive(index_t T_, index_t V, double scale, double offset, double rel, double abs_tol) {
  using A = acc_t<T>;
  auto x = make_logits<T>(T_, V, scale, offset, 7);
  auto y = make_labels(T_, V, 11);
  buffer<A> nll(T_), lse(T_), dnll(T_);
  host_matrix<T> dx(T_, V);
  loss::token_nll_forward(exec::host, x.view(), y.view(), nll.view(), lse.view());
  std::mt19937_64 rng(3);
  std::uniform_real_distribution<double> u(0.5, 2.0);
  for (index_t t = 0; t < T_; ++t) dnll[t] = static_cast<A>(u(rng));
  loss::token_nll_backward(exec::host, x.view(), y.view(), lse.view(), dnll.view(), dx.view());
  for (index_t t = 0; t < T_; ++t) {
    if (y[t] == ignore_index) {
      CHECK(nll[t] == 0);
      for (index_t v = 0; v < V; ++v) CHECK(load<double>(dx(t, v)) == 0.0);
      continue;
    }
    const auto r = row_ld(x, t);
    const long double l = naive_lse(r);
    const long double ref = l - r[static_cast<std::size_t>(y[t])];
    INFO("row " << t << " V " << V << " offset " << offset);
    CHECK(std::isfinite(static_cast<double>(nll[t])));
    CHECK(std::abs(static_cast<double>(nll[t] - ref)) <= abs_tol + rel * std::abs(static_cast<double>(ref)));
    for (index_t v = 0; v < V; ++v) {
      const long double p = std::exp(r[static_cast<std::size_t>(v)] - l);
      const double g = static_cast<double>(dnll[t] * (p - (v == y[t] ? 1.0L : 0.0L)));
      CHECK(std::abs(load<double>(dx(t, v)) - g) <= abs_tol + rel * std::abs(g));
    }
  }
}

}  // namespace

TEST_CASE("token_nll: hand-worked V = 3", "[loss][nll]") {
  // x = [1, 2, 3]: lse = 3 + log(1 + e^-1 + e^-2) = 3 + log(1.503214724) = 3.407605964.
  // softmax = [e^-2.4076, e^-1.4076, e^-0.4076] = [0.090030573, 0.244728471, 0.665240956].
  // label 2: nll = 0.407605964, grad = [0.090030573, 0.244728471, −0.334759044].
  // label 0: nll = 2.407605964, grad = [−0.909969427, 0.244728471, 0.665240956].
  // label −100: nll 0, grad 0.
  std::vector<double> xs = {1, 2, 3, 1, 2, 3, 1, 2, 3};
  std::vector<std::int64_t> ys = {2, 0, ignore_index};
  matrix_view<const double> x(xs.data(), {3, 3});
  vector_view<const std::int64_t> y(ys.data(), {3});
  buffer<double> nll(3), lse(3), dnll(3);
  loss::token_nll_forward(exec::host, x, y, nll.view(), lse.view());
  CHECK(nll[0] == Approx(0.40760596444438013).epsilon(1e-12));
  CHECK(nll[1] == Approx(2.40760596444438).epsilon(1e-12));
  CHECK(nll[2] == 0.0);
  CHECK(lse[0] == Approx(3.40760596444438).epsilon(1e-12));
  for (int t = 0; t < 3; ++t) dnll[t] = 1.0;
  host_matrix<double> dx(3, 3);
  loss::token_nll_backward(exec::host, x, y, lse.view(), dnll.view(), dx.view());
  const double expect[3][3] = {{0.090030573, 0.244728471, -0.334759044},
                               {-0.909969427, 0.244728471, 0.665240956},
                               {0, 0, 0}};
  for (int t = 0; t < 3; ++t)
    for (int v = 0; v < 3; ++v) CHECK(dx(t, v) == Approx(expect[t][v]).margin(1e-9));
}

TEST_CASE("token_nll: fused one-pass agrees with the naive two-pass reference", "[loss][nll]") {
  for (index_t V : {1, 3, 15, 16, 17, 100, 1000}) {
    check_against_naive<double>(9, V, 5.0, 0.0, 1e-12, 1e-12);
    check_against_naive<float>(9, V, 5.0, 0.0, 2e-5, 2e-6);
  }
}

TEST_CASE("token_nll: logits of ±1e4 and a +1e4 common offset do not overflow", "[loss][nll]") {
  for (index_t V : {3, 64, 1001}) {
    check_against_naive<double>(7, V, 1e4, 0.0, 1e-12, 1e-9);
    check_against_naive<double>(7, V, 3.0, 1e4, 1e-12, 1e-9);
    check_against_naive<double>(7, V, 1e4, 1e4, 1e-12, 1e-9);
    // float: logits near 1e4 are themselves quantized to ulp(1e4) ≈ 1e-3; the one-pass result
    // is compared with the exact result for those same stored values.
    check_against_naive<float>(7, V, 1e4, 0.0, 1e-6, 2e-3);
    check_against_naive<float>(7, V, 3.0, 1e4, 1e-6, 2e-3);
  }
  // One row with a single huge winner: softmax is one-hot, nll = 0 or 2e4.
  std::vector<float> xs = {1e4f, -1e4f, 0.f};
  std::vector<std::int64_t> ys = {0};
  buffer<float> nll(1), lse(1);
  loss::token_nll_forward(exec::host, matrix_view<const float>(xs.data(), {1, 3}),
                          vector_view<const std::int64_t>(ys.data(), {1}), nll.view(), lse.view());
  CHECK(nll[0] == 0.0f);
  CHECK(lse[0] == 1e4f);
  ys[0] = 1;
  loss::token_nll_forward(exec::host, matrix_view<const float>(xs.data(), {1, 3}),
                          vector_view<const std::int64_t>(ys.data(), {1}), nll.view(), lse.view());
  CHECK(nll[0] == 2e4f);
}

TEST_CASE("token_nll: masked vocabulary entries of -inf are fine", "[loss][nll]") {
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> xs(40, -inf);
  xs[5] = 1.0;
  xs[33] = 2.0;
  std::vector<std::int64_t> ys = {33};
  buffer<double> nll(1), lse(1), dnll(1);
  loss::token_nll_forward(exec::host, matrix_view<const double>(xs.data(), {1, 40}),
                          vector_view<const std::int64_t>(ys.data(), {1}), nll.view(), lse.view());
  CHECK(nll[0] == Approx(std::log1p(std::exp(-1.0))).epsilon(1e-12));
  dnll[0] = 1;
  host_matrix<double> dx(1, 40);
  loss::token_nll_backward(exec::host, matrix_view<const double>(xs.data(), {1, 40}),
                           vector_view<const std::int64_t>(ys.data(), {1}), lse.view(), dnll.view(), dx.view());
  for (int v = 0; v < 40; ++v) CHECK(std::isfinite(dx(0, v)));
  CHECK(dx(0, 0) == 0.0);
}

TEST_CASE("token_nll: finite-difference gradient in double", "[loss][nll][fd]") {
  const index_t T_ = 5, V = 37;
  auto x = make_logits<double>(T_, V, 3.0, 0.5, 21);
  auto y = make_labels(T_, V, 5, 0.2);
  y[1] = ignore_index;
  std::vector<double> w = {0.3, -1.2, 0.7, 2.0, -0.4};  // L = Σ_t w_t nll_t
  auto L = [&](host_matrix<double>& m) {
    buffer<double> nll(T_), lse(T_);
    loss::token_nll_forward(exec::host, m.view(), y.view(), nll.view(), lse.view());
    double s = 0;
    for (index_t t = 0; t < T_; ++t) s += w[static_cast<std::size_t>(t)] * nll[t];
    return s;
  };
  buffer<double> nll(T_), lse(T_), dnll(T_);
  loss::token_nll_forward(exec::host, x.view(), y.view(), nll.view(), lse.view());
  for (index_t t = 0; t < T_; ++t) dnll[t] = w[static_cast<std::size_t>(t)];
  host_matrix<double> dx(T_, V);
  loss::token_nll_backward(exec::host, x.view(), y.view(), lse.view(), dnll.view(), dx.view());
  double max_err = 0, max_g = 0;
  for (index_t t = 0; t < T_; ++t)
    for (index_t v = 0; v < V; ++v) {
      const double h = 1e-5, keep = x(t, v);
      x(t, v) = keep + h; const double lp = L(x);
      x(t, v) = keep - h; const double lm = L(x);
      x(t, v) = keep;
      const double fd = (lp - lm) / (2 * h);
      max_err = std::max(max_err, std::abs(fd - dx(t, v)));
      max_g = std::max(max_g, std::abs(dx(t, v)));
    }
  CHECK(max_err / max_g < 1e-6);
}

TEST_CASE("token_nll: backward in place (dlogits aliases logits)", "[loss][nll]") {
  auto x = make_logits<float>(6, 50, 4.0, 0.0, 9);
  auto x2 = x;
  auto y = make_labels(6, 50, 2);
  buffer<float> nll(6), lse(6), dnll(6);
  for (int t = 0; t < 6; ++t) dnll[t] = 1.0f + 0.1f * static_cast<float>(t);
  loss::token_nll_forward(exec::host, x.view(), y.view(), nll.view(), lse.view());
  host_matrix<float> dx(6, 50);
  loss::token_nll_backward(exec::host, x.view(), y.view(), lse.view(), dnll.view(), dx.view());
  loss::token_nll_backward(exec::host, x2.view(), y.view(), lse.view(), dnll.view(), x2.view());
  for (int t = 0; t < 6; ++t)
    for (int v = 0; v < 50; ++v) CHECK(x2(t, v) == dx(t, v));
  CHECK_THROWS_AS(loss::token_nll_backward(exec::host, x.view(), y.view(), lse.view(), dnll.view(), x.view(), true),
                  shape_error);
}

TEST_CASE("token_nll: results do not depend on the thread count", "[loss][nll]") {
  const index_t T_ = 64, V = 4099;
  auto x = make_logits<float>(T_, V, 6.0, 0.0, 1);
  auto y = make_labels(T_, V, 4);
  buffer<float> n1(T_), l1(T_), n4(T_), l4(T_), dnll(T_);
  loss::token_nll_forward(exec::host, x.view(), y.view(), n1.view(), l1.view());
  loss::token_nll_forward(exec::host(4), x.view(), y.view(), n4.view(), l4.view());
  for (index_t t = 0; t < T_; ++t) { CHECK(n1[t] == n4[t]); CHECK(l1[t] == l4[t]); dnll[t] = 1; }
  host_matrix<float> d1(T_, V), d4(T_, V);
  loss::token_nll_backward(exec::host, x.view(), y.view(), l1.view(), dnll.view(), d1.view());
  loss::token_nll_backward(exec::host(0), x.view(), y.view(), l1.view(), dnll.view(), d4.view());
  CHECK(std::memcmp(d1.storage.data(), d4.storage.data(), sizeof(float) * static_cast<std::size_t>(T_ * V)) == 0);
}

TEMPLATE_TEST_CASE("token_nll: 16-bit storage agrees with double", "[loss][nll]", half, bfloat16) {
  // (a) The same stored values, reference in double: only float accumulation error.
  // (b) Against the unquantized double logits: the storage rounding dominates
  //     (relative 2^-11 for half, 2^-8 for bfloat16, times |x| ≤ 8).
  const index_t T_ = 12, V = 333;
  auto xd = make_logits<double>(T_, V, 8.0, 0.0, 17);
  host_matrix<TestType> xs(T_, V);
  host_matrix<double> xq(T_, V);
  for (index_t t = 0; t < T_; ++t)
    for (index_t v = 0; v < V; ++v) {
      xs(t, v) = store<TestType>(static_cast<float>(xd(t, v)));
      xq(t, v) = load<double>(xs(t, v));
    }
  auto y = make_labels(T_, V, 8);
  buffer<float> nll(T_), lse(T_), dnll(T_);
  buffer<double> nd(T_), ld(T_), nq(T_), lq(T_);
  loss::token_nll_forward(exec::host, xs.view(), y.view(), nll.view(), lse.view());
  loss::token_nll_forward(exec::host, xd.view(), y.view(), nd.view(), ld.view());
  loss::token_nll_forward(exec::host, xq.view(), y.view(), nq.view(), lq.view());
  const double quant = std::is_same_v<TestType, half> ? 8.0 * 0x1p-11 : 8.0 * 0x1p-8;
  for (index_t t = 0; t < T_; ++t) {
    CHECK(std::abs(nll[t] - nq[t]) <= 1e-5 * (1 + nq[t]));
    CHECK(std::abs(nll[t] - nd[t]) <= 2 * quant);
    dnll[t] = 1;
  }
  host_matrix<TestType> dx(T_, V);
  loss::token_nll_backward(exec::host, xs.view(), y.view(), lse.view(), dnll.view(), dx.view());
  const double tol = std::is_same_v<TestType, half> ? 2e-3 : 1e-2;  // gradient stored in 16 bits
  for (index_t t = 0; t < T_; ++t) {
    if (y[t] == ignore_index) continue;
    for (index_t v = 0; v < V; ++v) {
      const double p = std::exp(xq(t, v) - lq[t]) - (v == y[t] ? 1.0 : 0.0);
      CHECK(std::abs(load<double>(dx(t, v)) - p) <= tol * std::abs(p) + 1e-6);
    }
  }
}

TEST_CASE("token_nll: 64-bit row offsets (row stride past 2^31 elements)", "[loss][nll]") {
  // Two rows 2^31 + 64 floats apart in a sparse anonymous mapping (~8 GiB of address space,
  // two pages touched). 32-bit index arithmetic would read the wrong address here.
  const index_t V = 300, stride = (index_t{1} << 31) + 64, rows = 2;
  const std::size_t bytes = sizeof(float) * static_cast<std::size_t>(stride + V);
  void* mem = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) {
    WARN("skipped: could not reserve 8 GiB of address space");
    return;
  }
  float* base = static_cast<float*>(mem);
  matrix_view<float> x(base, {rows, V}, {stride, 1});
  auto ref = make_logits<float>(rows, V, 5.0, 0.0, 99);
  for (index_t t = 0; t < rows; ++t)
    for (index_t v = 0; v < V; ++v) x(t, v) = ref(t, v);
  std::vector<std::int64_t> ys = {17, 250};
  vector_view<const std::int64_t> y(ys.data(), {2});
  buffer<float> nll(2), lse(2), nr(2), lr(2), dnll(2);
  loss::token_nll_forward(exec::host, x, y, nll.view(), lse.view());
  loss::token_nll_forward(exec::host, ref.view(), y, nr.view(), lr.view());
  CHECK(nll[0] == nr[0]);
  CHECK(nll[1] == nr[1]);
  dnll[0] = dnll[1] = 1;
  host_matrix<float> dr(rows, V);
  loss::token_nll_backward(exec::host, ref.view(), y, lr.view(), dnll.view(), dr.view());
  loss::token_nll_backward(exec::host, x, y, lse.view(), dnll.view(), x);  // in place, huge stride
  for (index_t t = 0; t < rows; ++t)
    for (index_t v = 0; v < V; ++v) CHECK(x(t, v) == dr(t, v));
  munmap(mem, bytes);
}

TEST_CASE("token_nll: large vocabulary, few tokens", "[loss][nll]") {
  // V = 2^20 + 3: exercises the blocked loop and a long accumulation in float.
  check_against_naive<float>(2, (index_t{1} << 20) + 3, 10.0, 0.0, 1e-5, 1e-4);
}

TEST_CASE("token_nll: every label ignored gives zero nll and zero gradient", "[loss][nll]") {
  auto x = make_logits<float>(4, 10, 3.0, 0.0, 1);
  buffer<std::int64_t> y(4);
  for (int t = 0; t < 4; ++t) y[t] = ignore_index;
  buffer<float> nll(4), lse(4), dnll(4);
  for (int t = 0; t < 4; ++t) { nll[t] = 5; dnll[t] = 1; }
  loss::token_nll_forward(exec::host, x.view(), y.view(), nll.view(), lse.view());
  host_matrix<float> dx(4, 10);
  for (int i = 0; i < 40; ++i) dx.storage[i] = 7;
  loss::token_nll_backward(exec::host, x.view(), y.view(), lse.view(), dnll.view(), dx.view());
  for (int t = 0; t < 4; ++t) CHECK(nll[t] == 0);
  for (int i = 0; i < 40; ++i) CHECK(dx.storage[i] == 0);
}

TEST_CASE("token_nll: bad input is a shape_error naming the problem", "[loss][nll]") {
  auto x = make_logits<float>(3, 5, 1.0, 0.0, 1);
  buffer<float> nll(3), lse(3), small(2);
  std::vector<std::int64_t> ys = {0, 4, 7};
  vector_view<const std::int64_t> y(ys.data(), {3});
  CHECK_THROWS_WITH(loss::token_nll_forward(exec::host, x.view(), y, nll.view(), lse.view()),
                    Catch::Contains("labels[2] = 7") && Catch::Contains("[0, 5)"));
  ys[2] = -1;
  CHECK_THROWS_WITH(loss::token_nll_forward(exec::host, x.view(), y, nll.view(), lse.view()),
                    Catch::Contains("labels[2] = -1"));
  ys[2] = 1;
  CHECK_THROWS_AS(loss::token_nll_forward(exec::host, x.view(), y, small.view(), lse.view()), shape_error);
  CHECK_THROWS_WITH(loss::token_nll_forward(exec::host, x.view(), y, small.view(), lse.view()),
                    Catch::Contains("nll") && Catch::Contains("expected extent 3"));
  // Columns not contiguous.
  matrix_view<const float> xt(x.storage.data(), {3, 5}, {1, 3});
  CHECK_THROWS_WITH(loss::token_nll_forward(exec::host, xt, y, nll.view(), lse.view()),
                    Catch::Contains("unit stride"));
  host_matrix<float> dx(3, 4);
  CHECK_THROWS_AS(loss::token_nll_backward(exec::host, x.view(), y, lse.view(), nll.view(), dx.view()), shape_error);
}

TEST_CASE("sequence_nll: sums per sequence, counts answer tokens, broadcasts back", "[loss][nll]") {
  // Three sequences: tokens [0,3), [3,3) (empty), [3,6).
  std::vector<double> tok = {9, 1.5, 2.0, 0.25, 7, 0.5};
  std::vector<std::int64_t> ys = {ignore_index, 3, 4, 1, ignore_index, 2};
  std::vector<index_t> off = {0, 3, 3, 6};
  buffer<double> seq(3);
  buffer<index_t> cnt(3);
  vector_view<const index_t> o(off.data(), {4});
  loss::sequence_nll(exec::host, vector_view<const double>(tok.data(), {6}),
                     vector_view<const std::int64_t>(ys.data(), {6}), o, seq.view(), cnt.view());
  CHECK(seq[0] == 3.5);
  CHECK(seq[1] == 0.0);
  CHECK(seq[2] == 0.75);
  CHECK(cnt[0] == 2);
  CHECK(cnt[1] == 0);
  CHECK(cnt[2] == 2);
  buffer<double> dseq(3), dtok(6);
  dseq[0] = 1; dseq[1] = 2; dseq[2] = -3;
  loss::sequence_nll_backward(exec::host, o, dseq.view(), dtok.view());
  const double expect[] = {1, 1, 1, -3, -3, -3};
  for (int t = 0; t < 6; ++t) CHECK(dtok[t] == expect[t]);

  auto u = loss::uniform_offsets(3, 4);
  CHECK(u[0] == 0);
  CHECK(u[3] == 12);

  std::vector<index_t> bad = {0, 4, 3, 6};
  CHECK_THROWS_WITH(loss::sequence_nll(exec::host, vector_view<const double>(tok.data(), {6}),
                                       vector_view<const std::int64_t>(ys.data(), {6}),
                                       vector_view<const index_t>(bad.data(), {4}), seq.view(), cnt.view()),
                    Catch::Contains("must not decrease"));
  bad = {0, 3, 3, 5};
  CHECK_THROWS_WITH(loss::sequence_nll(exec::host, vector_view<const double>(tok.data(), {6}),
                                       vector_view<const std::int64_t>(ys.data(), {6}),
                                       vector_view<const index_t>(bad.data(), {4}), seq.view(), cnt.view()),
                    Catch::Contains("expected the token count 6, got 5"));
  bad = {1, 3, 3, 6};
  CHECK_THROWS_AS(loss::sequence_nll(exec::host, vector_view<const double>(tok.data(), {6}),
                                     vector_view<const std::int64_t>(ys.data(), {6}),
                                     vector_view<const index_t>(bad.data(), {4}), seq.view(), cnt.view()),
                  shape_error);
}
