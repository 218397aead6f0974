// Fused AdamW (one launch over every parameter tensor) and the device QR retraction agree with
// the host's optim::adamw_update and ortho::qr_retraction.
#include <grun/cuda/adamw.cuh>
#include <grun/cuda/retract.cuh>
#include <grun/gate/mlp.hpp>
#include <grun/intervention.hpp>
#include <grun/reft/loreft.hpp>

#include <vector>

#include "agreement.hpp"

namespace gc = grun::cuda;
using grun::cuda_space;
using grun::index_t;
using I = grun::gated_intervention<grun::gate::mlp<>, grun::reft::loreft<4>>;

namespace {
template <class T>
grun::optim::adamw_coeffs<grun::acc_t<T>> coeffs() {
  return {grun::acc_t<T>(4e-3), grun::acc_t<T>(0.9), grun::acc_t<T>(0.999), grun::acc_t<T>(1e-8),
          grun::acc_t<T>(1 - 4e-3 * 1e-2), grun::acc_t<T>(1 - 0.9 * 0.9), grun::acc_t<T>(1 - 0.999 * 0.999),
          grun::acc_t<T>(0.75)};
}
}  // namespace

TEST_CASE("cuda adamw: host parameters on exec::cuda do not compile; an empty aggregate is a no-op", "[nodevice][adamw]") {
  // The static_assert is the guard for host_space leaves; here: zero-sized work needs no device.
  gc::device_params<I::params<float, cuda_space>> none;
  gc::device_param_state<float> m(*none), v(*none);
  grun::optim::detail::adamw_impl<grun::exec::cuda_t>::step(grun::exec::cuda, *none, *none, m, v, coeffs<float>());
  SUCCEED();
}

TEST_CASE("cuda adamw: more separate leaves than the segment table holds is a shape_error, before any launch",
          "[nodevice][adamw]") {
  // 50 leaves, the first 10 back to back and a gap before every later one: the segment table (48)
  // must be sized before it is written (it once was overrun when the first gap came late). Host
  // memory stands in for device memory: nothing is read before the check.
  struct five { grun::param<float, cuda_space> a, b, c, d, e; };
  struct fifty { five f0, f1, f2, f3, f4, f5, f6, f7, f8, f9; };
  const index_t n = 3, leaves = 50;
  std::vector<float> arena(std::size_t(2 * leaves * (n + 1)));
  fifty p{}, g{};
  index_t k = 0;
  for (fifty* agg : {&p, &g}) {
    float* base = arena.data() + k++ * leaves * (n + 1);
    index_t i = 0;
    grun::for_each_param(*agg, [&](auto& leaf) {
      leaf.data = base + i * n + (i >= 10 ? i - 9 : 0);
      grun::set_vector(leaf, n);
      ++i;
    });
  }
  using host_backed_state = grun::basic_param_state<float, cuda_space, grun::buffer<float>>;
  const host_backed_state m(p), v(p);
  CHECK_THROWS_AS(grun::optim::detail::adamw_impl<grun::exec::cuda_t>::step(grun::exec::cuda, p, g, m, v, coeffs<float>()),
                  grun::shape_error);
}

TEMPLATE_TEST_CASE("cuda adamw: one launch over a module agrees with optim::adamw_update", "[adamw]", float, grun::bfloat16,
                   grun::half) {
  GRUN_REQUIRE_DEVICE();
  using T = TestType;
  using A = grun::acc_t<T>;  // the moments' type: fp32 for bf16 and fp16 parameters
  using Hp = I::params<T>;
  using Dp = I::params<T, cuda_space>;
  const index_t d = 45;
  grun::owned_params<Hp> p(I::shape<T>(d)), g(*p);
  grun::param_state<A> m(*p), v(*p);
  grun::test::fill_uniform(p.data() ? std::span<T>(p.data(), std::size_t(p.size())) : std::span<T>(), 1);
  grun::test::fill_uniform(std::span<T>(g.data(), std::size_t(g.size())), 2);
  grun::test::fill_uniform(std::span<A>(m.data(), std::size_t(m.size())), 3, -0.1f, 0.1f);
  grun::test::fill_uniform(std::span<A>(v.data(), std::size_t(v.size())), 4, 0.f, 0.1f);
  gc::device_params<Dp> pd(I::shape<T, cuda_space>(d)), gd(*pd);
  gc::device_param_state<A> md(*pd), vd(*pd);
  auto up = [](auto& dev, const auto& host) {
    GRUN_CUDA_CHECK(cudaMemcpy(dev.data(), host.data(), sizeof(*host.data()) * std::size_t(host.size()), cudaMemcpyHostToDevice));
  };
  up(pd, p); up(gd, g); up(md, m); up(vd, v);
  const auto c = coeffs<T>();
  grun::optim::detail::adamw_impl<grun::exec::host_t>::step(grun::exec::host, *p, *g, m, v, c);
  grun::optim::detail::adamw_impl<grun::exec::cuda_t>::step(grun::exec::cuda, *pd, *gd, md, vd, c);
  std::vector<T> out(std::size_t(p.size()));
  GRUN_CUDA_CHECK(cudaMemcpy(out.data(), pd.data(), sizeof(T) * out.size(), cudaMemcpyDeviceToHost));
  CHECK(grun::test::rel_error(std::span<const T>(out), std::span<const T>(p.data(), out.size())) < grun::test::tolerance<T>());
  std::vector<A> moments(std::size_t(v.size()));
  GRUN_CUDA_CHECK(cudaMemcpy(moments.data(), vd.data(), sizeof(A) * moments.size(), cudaMemcpyDeviceToHost));
  CHECK(grun::test::rel_error(std::span<const A>(moments), std::span<const A>(v.data(), moments.size())) < 1e-5);
}

TEST_CASE("cuda adamw: leaves in separate buffers take the segment path", "[adamw]") {
  GRUN_REQUIRE_DEVICE();
  struct two { grun::param<float, cuda_space> a, b; };
  const index_t na = 1000, nb = 333;
  std::vector<float> host(std::size_t(4 * (na + nb)));
  grun::test::fill_uniform(std::span<float>(host), 5, 0.01f, 1.f);
  gc::device_buffer<float> A{std::span<const float>(host.data(), std::size_t(4 * na))},
      B{std::span<const float>(host.data() + 4 * na, std::size_t(4 * nb))};
  auto leaf = [](float* p, index_t n) { grun::param<float, cuda_space> x; x.data = p; grun::set_vector(x, n); return x; };
  two p{leaf(A.data(), na), leaf(B.data(), nb)}, g{leaf(A.data() + na, na), leaf(B.data() + nb, nb)};
  // The moments are one buffer each (leaf a, then leaf b): their values from the host layout.
  gc::device_param_state<float> m(p), v(p);
  for (const auto& [state, at] : {std::pair{&m, 2}, std::pair{&v, 3}}) {
    GRUN_CUDA_CHECK(cudaMemcpy(state->leaf(0).data, host.data() + at * na, sizeof(float) * na, cudaMemcpyHostToDevice));
    GRUN_CUDA_CHECK(cudaMemcpy(state->leaf(1).data, host.data() + 4 * na + at * nb, sizeof(float) * nb, cudaMemcpyHostToDevice));
  }
  const auto c = coeffs<float>();
  grun::optim::detail::adamw_impl<grun::exec::cuda_t>::step(grun::exec::cuda, p, g, m, v, c);
  const auto a = A.to_host();
  const auto b = B.to_host();
  for (index_t i = 0; i < na; i += 97) {
    float t = host[i], mm = host[2 * na + i], vv = host[3 * na + i];
    grun::optim::adamw_update<float>(t, host[na + i], mm, vv, c);
    CHECK(a[i] == Approx(t).epsilon(1e-6));
  }
  for (index_t i = 0; i < nb; i += 31) {
    const float* hb = host.data() + 4 * na;
    float t = hb[i], mm = hb[2 * nb + i], vv = hb[3 * nb + i];
    grun::optim::adamw_update<float>(t, hb[nb + i], mm, vv, c);
    CHECK(b[i] == Approx(t).epsilon(1e-6));
  }
}

TEMPLATE_TEST_CASE("cuda qr_retract agrees with ortho::qr_retraction", "[adamw][ortho]", float, grun::bfloat16) {
  GRUN_REQUIRE_DEVICE();
  using T = TestType;
  for (auto [r, d] : {std::pair<index_t, index_t>{4, 37}, {1, 1}, {32, 4096}, {8, 8}}) {
    grun::buffer<T> R(r * d);
    grun::test::fill_uniform(R.span(), unsigned(r * d));
    gc::device_buffer<T> Rd(R.span());
    grun::param<T> hp;
    hp.data = R.data();
    grun::set_matrix(hp, r, d);
    grun::param<T, cuda_space> dp;
    dp.data = Rd.data();
    grun::set_matrix(dp, r, d);
    grun::ortho::qr_retraction::retract(hp);
    gc::qr_retract(grun::exec::cuda, dp);
    INFO("r = " << r << ", d = " << d);
    CHECK(grun::test::rel_error(Rd.to_host(), R) < grun::test::tolerance<T>());
  }
  gc::device_buffer<float> zero(8);
  grun::param<float, cuda_space> z;
  z.data = zero.data();
  grun::set_matrix(z, 2, 4);
  CHECK_THROWS_AS(gc::qr_retract(grun::exec::cuda, z), grun::numeric_error);
  // The host's wording, norm included.
  CHECK_THROWS_WITH(gc::qr_retract(grun::exec::cuda, z),
                    Catch::Matchers::Contains("qr_retraction: row 0 of R is zero or not finite (norm 0)"));
  // A dependent second row: row 1 = 2 · row 0.
  const std::vector<float> dependent = {1, 2, 3, 4, 2, 4, 6, 8};
  zero.copy_from_host(dependent);
  CHECK_THROWS_WITH(gc::qr_retract(grun::exec::cuda, z),
                    Catch::Matchers::Contains("qr_retraction: row 1 of R is linearly dependent on the rows before it"));
  CHECK(zero.to_host() == dependent);  // R is left unchanged
}

TEST_CASE("cuda l2_norm matches the host sum of squares", "[adamw]") {
  GRUN_REQUIRE_DEVICE();
  std::vector<float> x(100001);
  grun::test::fill_uniform(std::span<float>(x), 8);
  double s = 0;
  for (float v : x) s += double(v) * v;
  gc::device_buffer<float> xd{std::span<const float>(x)};
  CHECK(gc::l2_norm(grun::exec::cuda, xd.data(), xd.size()) == Approx(std::sqrt(s)).epsilon(1e-12));
}
