// Fused token NLL and sequence sums on exec::cuda agree with exec::host (same row math).
#include <grun/cuda/nll.cuh>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "agreement.hpp"

namespace gc = grun::cuda;
using grun::cuda_space;
using grun::index_t;

namespace {

template <class T>
struct nll_case {
  index_t T_, V, stride;  // stride ≥ V: padded rows exercise the scalar (unaligned) path
  grun::buffer<T> x;
  grun::buffer<std::int64_t> y;
  nll_case(index_t t, index_t v, index_t s, unsigned seed) : T_(t), V(v), stride(s), x(t * s), y(t) {
    grun::test::fill_uniform(x.span(), seed, -8.f, 8.f);
    std::mt19937 gen(seed + 1);
    for (index_t i = 0; i < t; ++i) y[i] = (i % 3 == 2) ? grun::loss::ignore_index : index_t(gen() % v);
  }
  grun::matrix_view<const T> host_x() const { return {x.data(), {T_, V}, {stride, 1}}; }
};

template <class T>
void check_nll_agreement(index_t T_, index_t V, index_t stride) {
  using A = grun::acc_t<T>;
  nll_case<T> c(T_, V, stride, unsigned(T_ * 131 + V));
  // host reference
  grun::buffer<A> nll_h(T_), lse_h(T_), dnll_h(T_);
  grun::test::fill_uniform(dnll_h.span(), 7, 0.5f, 2.f);
  grun::loss::token_nll_forward(grun::exec::host, c.host_x(), grun::vector_view<const std::int64_t>(c.y.data(), {T_}),
                                nll_h.view(), lse_h.view());
  grun::buffer<T> dx_h(T_ * stride);
  grun::loss::token_nll_backward(grun::exec::host, c.host_x(), grun::vector_view<const std::int64_t>(c.y.data(), {T_}),
                                 grun::vector_view<const A>(lse_h.data(), {T_}),
                                 grun::vector_view<const A>(dnll_h.data(), {T_}),
                                 grun::matrix_view<T>(dx_h.data(), {T_, V}, {stride, 1}));
  // device
  gc::device_buffer<T> x_d(c.x.span());
  gc::device_buffer<std::int64_t> y_d(c.y.span());
  gc::device_buffer<A> nll_d(T_), lse_d(T_), dnll_d(dnll_h.span());
  const grun::matrix_view<const T, cuda_space> xv(x_d.data(), {T_, V}, {stride, 1});
  const grun::vector_view<const std::int64_t, cuda_space> yv(y_d.data(), {T_});
  grun::loss::token_nll_forward(grun::exec::cuda, xv, yv, nll_d.view(), lse_d.view());
  gc::device_buffer<T> dx_d(T_ * stride);
  grun::loss::token_nll_backward(grun::exec::cuda, xv, yv, grun::vector_view<const A, cuda_space>(lse_d.data(), {T_}),
                                 grun::vector_view<const A, cuda_space>(dnll_d.data(), {T_}),
                                 grun::matrix_view<T, cuda_space>(dx_d.data(), {T_, V}, {stride, 1}));
  GRUN_CUDA_CHECK(cudaDeviceSynchronize());
  INFO("T = " << T_ << ", V = " << V << ", row stride = " << stride);
  // nll/lse are fp32 computed from the same stored logits: fp32 tolerance for every storage type.
  CHECK(grun::test::rel_error(nll_d.to_host(), nll_h) < 1e-5);
  CHECK(grun::test::rel_error(lse_d.to_host(), lse_h) < 1e-5);
  CHECK(grun::test::rel_error(dx_d.to_host(), dx_h) < grun::test::tolerance<T>());

  // accumulate: dx_d already holds grad; adding it once more gives 2 · grad
  grun::loss::token_nll_backward(grun::exec::cuda, xv, yv, grun::vector_view<const A, cuda_space>(lse_d.data(), {T_}),
                                 grun::vector_view<const A, cuda_space>(dnll_d.data(), {T_}),
                                 grun::matrix_view<T, cuda_space>(dx_d.data(), {T_, V}, {stride, 1}), true);
  std::vector<float> twice(dx_h.span().size());
  for (std::size_t i = 0; i < twice.size(); ++i) twice[i] = 2.f * static_cast<float>(dx_h[index_t(i)]);
  CHECK(grun::test::rel_error(dx_d.to_host(), twice) < grun::test::tolerance<T>());

  // in place: dlogits written over the logits (last: it destroys x_d)
  grun::loss::token_nll_backward(grun::exec::cuda, xv, yv, grun::vector_view<const A, cuda_space>(lse_d.data(), {T_}),
                                 grun::vector_view<const A, cuda_space>(dnll_d.data(), {T_}),
                                 grun::matrix_view<T, cuda_space>(x_d.data(), {T_, V}, {stride, 1}));
  auto inplace = x_d.to_host();
  for (index_t t = 0; t < T_; ++t)
    for (index_t v = V; v < stride; ++v) inplace[t * stride + v] = dx_h[t * stride + v];  // padding untouched
  CHECK(grun::test::rel_error(inplace, dx_h) < grun::test::tolerance<T>());
}

}  // namespace

TEST_CASE("cuda token_nll: host views on exec::cuda are a shape_error, before any launch", "[nodevice][nll]") {
  grun::buffer<float> x(12), nll(3), lse(3);
  grun::buffer<std::int64_t> y(3);
  CHECK_THROWS_AS(grun::loss::token_nll_forward(grun::exec::cuda, grun::matrix_view<const float>(x.data(), {3, 4}),
                                                grun::vector_view<const std::int64_t>(y.data(), {3}), nll.view(),
                                                lse.view()),
                  grun::shape_error);
  CHECK_THROWS_AS(grun::loss::token_nll_backward(grun::exec::cuda, grun::matrix_view<const float>(x.data(), {3, 4}),
                                                 grun::vector_view<const std::int64_t>(y.data(), {3}),
                                                 grun::vector_view<const float>(lse.data(), {3}),
                                                 grun::vector_view<const float>(nll.data(), {3}),
                                                 grun::matrix_view<float>(x.data(), {3, 4})),
                  grun::shape_error);
}

TEST_CASE("cuda token_nll: wrong extents on device views are a shape_error", "[nodevice][nll]") {
  // Views only: no device memory is touched, so this runs without a GPU.
  float* fake = nullptr;
  std::int64_t* fy = nullptr;
  CHECK_THROWS_AS(grun::loss::token_nll_forward(grun::exec::cuda, grun::matrix_view<const float, cuda_space>(fake, {3, 4}),
                                                grun::vector_view<const std::int64_t, cuda_space>(fy, {2}),
                                                grun::vector_view<float, cuda_space>(fake, {3}),
                                                grun::vector_view<float, cuda_space>(fake, {3})),
                  grun::shape_error);
}

TEMPLATE_TEST_CASE("cuda token_nll agrees with exec::host", "[nll]", float, grun::bfloat16, grun::half) {
  GRUN_REQUIRE_DEVICE();
  check_nll_agreement<TestType>(1, 1, 1);
  check_nll_agreement<TestType>(1, 4099, 4099);      // V not a multiple of the vector width
  check_nll_agreement<TestType>(7, 1000, 1003);     // padded rows: scalar path
  check_nll_agreement<TestType>(33, 32000, 32000);  // vector path, several sweeps
  check_nll_agreement<TestType>(5, 131072, 131072);
  check_nll_agreement<TestType>(0, 17, 17);         // T = 0: nothing launched
}

TEST_CASE("cuda token_nll: double logits stay double (nll, lse and gradient agree to 1e-12)", "[nll]") {
  GRUN_REQUIRE_DEVICE();
  // Logits that fp32 cannot represent: a float round trip anywhere shows as ~1e-8 (rel_error
  // compares through float, so the check here is its own, in double).
  const index_t T_ = 5, V = 1001;  // odd V: 2-double vector sweep plus a tail
  std::vector<double> x(std::size_t(T_ * V));
  std::mt19937_64 gen(11);
  std::uniform_real_distribution<double> u(-8.0, 8.0);
  for (double& v : x) v = u(gen);
  std::vector<std::int64_t> y = {3, grun::loss::ignore_index, 1000, 0, 517};
  std::vector<double> dnll = {0.5, 0.75, 1.0, 1.25, 1.5};
  std::vector<double> nll_h(T_), lse_h(T_), dx_h(x.size());
  grun::loss::token_nll_forward(grun::exec::host, grun::matrix_view<const double>(x.data(), {T_, V}),
                                grun::vector_view<const std::int64_t>(y.data(), {T_}),
                                grun::vector_view<double>(nll_h.data(), {T_}), grun::vector_view<double>(lse_h.data(), {T_}));
  grun::loss::token_nll_backward(grun::exec::host, grun::matrix_view<const double>(x.data(), {T_, V}),
                                 grun::vector_view<const std::int64_t>(y.data(), {T_}),
                                 grun::vector_view<const double>(lse_h.data(), {T_}),
                                 grun::vector_view<const double>(dnll.data(), {T_}),
                                 grun::matrix_view<double>(dx_h.data(), {T_, V}));
  gc::device_buffer<double> x_d{std::span<const double>(x)}, nll_d(T_), lse_d(T_), dnll_d{std::span<const double>(dnll)},
      dx_d(T_ * V);
  gc::device_buffer<std::int64_t> y_d{std::span<const std::int64_t>(y)};
  const grun::matrix_view<const double, cuda_space> xv(x_d.data(), {T_, V});
  const grun::vector_view<const std::int64_t, cuda_space> yv(y_d.data(), {T_});
  grun::loss::token_nll_forward(grun::exec::cuda, xv, yv, nll_d.view(), lse_d.view());
  grun::loss::token_nll_backward(grun::exec::cuda, xv, yv, grun::vector_view<const double, cuda_space>(lse_d.data(), {T_}),
                                 grun::vector_view<const double, cuda_space>(dnll_d.data(), {T_}),
                                 grun::matrix_view<double, cuda_space>(dx_d.data(), {T_, V}));
  auto rel = [](const std::vector<double>& a, const std::vector<double>& b) {
    double num = 0, den = 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
      num = std::max(num, std::abs(a[i] - b[i]));
      den = std::max(den, std::abs(b[i]));
    }
    return num / std::max(den, 1e-300);
  };
  CHECK(rel(nll_d.to_host(), nll_h) < 1e-12);
  CHECK(rel(lse_d.to_host(), lse_h) < 1e-12);
  CHECK(rel(dx_d.to_host(), dx_h) < 1e-12);
}

TEST_CASE("cuda token_nll: every label ignored gives nll 0 and a zero gradient", "[nll]") {
  GRUN_REQUIRE_DEVICE();
  const index_t T_ = 4, V = 64;
  gc::device_buffer<float> x(T_ * V), nll(T_), lse(T_), d(T_);
  std::vector<std::int64_t> y(T_, grun::loss::ignore_index);
  gc::device_buffer<std::int64_t> yd(y);
  grun::loss::token_nll_forward(grun::exec::cuda, grun::matrix_view<const float, cuda_space>(x.data(), {T_, V}),
                                grun::vector_view<const std::int64_t, cuda_space>(yd.data(), {T_}), nll.view(), lse.view());
  for (float v : nll.to_host()) CHECK(v == 0.f);
}

TEST_CASE("cuda token_nll: out-of-vocabulary labels on the device are a shape_error with the host's wording",
          "[nll]") {
  GRUN_REQUIRE_DEVICE();
  // Rows 1 and 3 are bad (V and −1); row 2 is ignored. The error names the first bad row, its
  // value and the count; the backward leaves the bad rows' gradient untouched (never half-written).
  const index_t T_ = 4, V = 37;
  std::vector<float> x(std::size_t(T_ * V));
  grun::test::fill_uniform(std::span<float>(x), 3, -2.f, 2.f);
  const std::vector<std::int64_t> y = {5, V, grun::loss::ignore_index, -1};
  gc::device_buffer<float> x_d{std::span<const float>(x)}, nll(T_), lse(T_), dnll(T_);
  gc::device_buffer<std::int64_t> y_d{std::span<const std::int64_t>(y)};
  const std::vector<float> ones(std::size_t(T_), 1.f);
  GRUN_CUDA_CHECK(cudaMemcpy(dnll.data(), ones.data(), sizeof(float) * ones.size(), cudaMemcpyHostToDevice));
  const grun::matrix_view<const float, cuda_space> xv(x_d.data(), {T_, V});
  const grun::vector_view<const std::int64_t, cuda_space> yv(y_d.data(), {T_});
  CHECK_THROWS_WITH(grun::loss::token_nll_forward(grun::exec::cuda, xv, yv, nll.view(), lse.view()),
                    Catch::Matchers::Contains("token_nll_forward: labels[1] = 37 is outside the vocabulary [0, 37)") &&
                        Catch::Matchers::Contains("(2 labels out of range)"));
  const auto nll_h = nll.to_host();
  CHECK(std::isfinite(nll_h[0]));  // the good row is still computed
  CHECK(std::isnan(nll_h[1]));
  CHECK(std::isnan(nll_h[3]));

  const std::vector<float> sentinel(x.size(), 42.f);
  gc::device_buffer<float> dx{std::span<const float>(sentinel)};
  CHECK_THROWS_WITH(grun::loss::token_nll_backward(grun::exec::cuda, xv, yv,
                                                   grun::vector_view<const float, cuda_space>(lse.data(), {T_}),
                                                   grun::vector_view<const float, cuda_space>(dnll.data(), {T_}),
                                                   grun::matrix_view<float, cuda_space>(dx.data(), {T_, V})),
                    Catch::Matchers::Contains("token_nll_backward: labels[1] = 37"));
  const auto dx_h = dx.to_host();
  for (index_t v = 0; v < V; ++v) {
    CHECK(dx_h[std::size_t(1 * V + v)] == 42.f);
    CHECK(dx_h[std::size_t(3 * V + v)] == 42.f);
    CHECK(dx_h[std::size_t(2 * V + v)] == 0.f);  // ignored row: zero gradient
  }
}

TEST_CASE("cuda sequence_nll agrees with loss::sequence_nll", "[nll]") {
  GRUN_REQUIRE_DEVICE();
  const index_t T_ = 1000;
  grun::buffer<float> tok(T_);
  grun::test::fill_uniform(tok.span(), 3, 0.f, 5.f);
  grun::buffer<std::int64_t> y(T_);
  for (index_t t = 0; t < T_; ++t) y[t] = (t % 4 == 0) ? grun::loss::ignore_index : 1;
  std::vector<index_t> off = {0, 1, 1, 300, 999, 1000};  // includes an empty sequence and T = 1
  const index_t B = index_t(off.size()) - 1;
  grun::buffer<float> seq_h(B);
  grun::buffer<std::int64_t> cnt_h(B);
  grun::loss::sequence_nll(grun::exec::host, grun::vector_view<float>(tok.data(), {T_}),
                           grun::vector_view<std::int64_t>(y.data(), {T_}), grun::vector_view<index_t>(off.data(), {B + 1}),
                           seq_h.view(), cnt_h.view());
  gc::device_buffer<float> tok_d(tok.span()), seq_d(B);
  gc::device_buffer<std::int64_t> y_d{y.span()}, cnt_d{B}, off_d{std::span<const index_t>(off)};
  gc::sequence_nll(grun::exec::cuda, grun::vector_view<const float, cuda_space>(tok_d.data(), {T_}),
                   grun::vector_view<const std::int64_t, cuda_space>(y_d.data(), {T_}),
                   grun::vector_view<const index_t, cuda_space>(off_d.data(), {B + 1}), seq_d.view(), cnt_d.view());
  CHECK(grun::test::rel_error(seq_d.to_host(), seq_h) < 1e-5);
  const auto cnt = cnt_d.to_host();
  for (index_t b = 0; b < B; ++b) CHECK(cnt[b] == cnt_h[b]);
  // backward broadcast
  gc::device_buffer<float> dtok(T_);
  gc::sequence_nll_backward(grun::exec::cuda, grun::vector_view<const index_t, cuda_space>(off_d.data(), {B + 1}),
                            grun::vector_view<const float, cuda_space>(seq_d.data(), {B}), dtok.view());
  const auto dt = dtok.to_host();
  const auto sd = seq_d.to_host();
  for (index_t b = 0; b < B; ++b)
    for (index_t t = off[b]; t < off[b + 1]; ++t) CHECK(dt[t] == sd[b]);
}
