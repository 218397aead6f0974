// cuda::adamw (device moments, one fused launch, device QR retraction) agrees with optim::adamw
// step for step, clips the same way, and refuses non-finite gradients without changing anything.
#include <grun/cuda/optim.cuh>
#include <grun/gate/linear.hpp>
#include <grun/gate/mlp.hpp>
#include <grun/reft/loreft.hpp>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "agreement.hpp"

namespace gc = grun::cuda;
using grun::cuda_space;
using grun::index_t;

namespace {
/// A host module's parameters copied to a device aggregate of the same shapes.
template <class I, class Hp>
gc::device_params<typename I::template params<float, cuda_space>> upload(const grun::owned_params<Hp>& h, index_t d) {
  gc::device_params<typename I::template params<float, cuda_space>> p(I::template shape<float, cuda_space>(d));
  GRUN_CUDA_CHECK(cudaMemcpy(p.data(), h.data(), sizeof(float) * std::size_t(h.size()), cudaMemcpyHostToDevice));
  return p;
}
template <class D>
std::vector<float> download(const D& p) {
  std::vector<float> out(std::size_t(p.size()));
  GRUN_CUDA_CHECK(cudaMemcpy(out.data(), p.data(), sizeof(float) * out.size(), cudaMemcpyDeviceToHost));
  return out;
}

template <class I>
void check_steps(index_t d, grun::optim::adamw_options o, int steps) {
  using Hp = typename I::template params<float>;
  using Dp = typename I::template params<float, cuda_space>;
  grun::owned_params<Hp> p(I::template shape<float>(d)), g(*p);
  grun::init(*p, 5);
  auto pd = upload<I>(p, d);
  gc::device_params<Dp> gd(I::template shape<float, cuda_space>(d));
  grun::optim::adamw<Hp> host(*p, o);
  gc::adamw<Dp> dev(*pd, o);
  for (int s = 0; s < steps; ++s) {
    grun::test::fill_uniform(std::span<float>(g.data(), std::size_t(g.size())), unsigned(100 + s), -2.f, 2.f);
    GRUN_CUDA_CHECK(cudaMemcpy(gd.data(), g.data(), sizeof(float) * std::size_t(g.size()), cudaMemcpyHostToDevice));
    const double nh = host.step(*p, *g);
    const double nd = dev.step(grun::exec::cuda, *pd, *gd);
    CHECK(nd == Approx(nh).epsilon(1e-9));
  }
  const auto back = download(pd);
  INFO("d = " << d << ", steps = " << steps << ", max_grad_norm = " << o.max_grad_norm);
  CHECK(grun::test::rel_error(std::span<const float>(back), std::span<const float>(p.data(), std::size_t(p.size()))) < 1e-5);
  CHECK(dev.steps() == steps);
}
}  // namespace

TEST_CASE("cuda::adamw agrees with optim::adamw, retraction included", "[optim]") {
  GRUN_REQUIRE_DEVICE();
  using linear = grun::gated_intervention<grun::gate::linear, grun::reft::loreft<4>>;
  using mlp = grun::gated_intervention<grun::gate::mlp<>, grun::reft::loreft<8>>;
  check_steps<linear>(77, {.lr = 1e-2}, 5);
  check_steps<linear>(4096, {.lr = 4e-3, .max_grad_norm = 1.0}, 3);  // clipped: norm ≫ 1
  check_steps<mlp>(130, {.lr = 4e-3, .weight_decay = 0.1}, 4);
}

TEST_CASE("cuda::adamw agrees with optim::adamw for ortho::none modules (noreft, loreft + ortho::none)", "[optim]") {
  GRUN_REQUIRE_DEVICE();
  using noreft = grun::gated_intervention<grun::gate::linear, grun::reft::noreft<4>>;
  using loreft_none = grun::gated_intervention<grun::gate::linear, grun::reft::loreft<4>, grun::ortho::none>;
  check_steps<noreft>(45, {.lr = 1e-2}, 3);
  check_steps<loreft_none>(33, {.lr = 4e-3, .max_grad_norm = 1.0}, 3);
}

TEST_CASE("cuda::adamw: ortho::none needs no device retraction (it once did not compile)", "[nodevice][optim]") {
  using noreft = grun::gated_intervention<grun::gate::linear, grun::reft::noreft<4>>;
  using loreft_none = grun::gated_intervention<grun::gate::linear, grun::reft::loreft<4>, grun::ortho::none>;
  using Dn = noreft::params<float, cuda_space>;
  using Dl = loreft_none::params<float, cuda_space>;
  // Taking step's address instantiates it and the retraction hook it calls.
  [[maybe_unused]] double (gc::adamw<Dn>::*step_noreft)(const grun::exec::cuda_t&, const Dn&, const Dn&) = &gc::adamw<Dn>::step;
  [[maybe_unused]] double (gc::adamw<Dl>::*step_loreft)(const grun::exec::cuda_t&, const Dl&, const Dl&) = &gc::adamw<Dl>::step;
  // Nothing to retract: no launch, so no device is needed.
  gc::retract_after_step(grun::exec::cuda, noreft::shape<float, cuda_space>(8));
  gc::retract_after_step(grun::exec::cuda, loreft_none::shape<float, cuda_space>(8));
  SUCCEED();
}

TEST_CASE("cuda::adamw refuses non-finite gradients and leaves the parameters alone", "[optim]") {
  GRUN_REQUIRE_DEVICE();
  using I = grun::gated_intervention<grun::gate::linear, grun::reft::loreft<4>>;
  using Hp = I::params<float>;
  using Dp = I::params<float, cuda_space>;
  const index_t d = 33;
  static_assert(std::is_same_v<decltype(upload<I>(std::declval<grun::owned_params<Hp>&>(), d)), gc::device_params<Dp>>);
  grun::owned_params<Hp> p(I::shape<float>(d)), g(*p);
  grun::init(*p, 9);
  g.data()[7] = std::numeric_limits<float>::quiet_NaN();
  auto pd = upload<I>(p, d), gd = upload<I>(g, d);
  gc::adamw<Dp> dev(*pd, {.lr = 1e-2});
  CHECK_THROWS_AS(dev.step(grun::exec::cuda, *pd, *gd), grun::numeric_error);
  CHECK(dev.steps() == 0);
  CHECK(download(pd) == std::vector<float>(p.data(), p.data() + p.size()));
}

TEST_CASE("cuda::adamw: bad options are refused like optim::adamw's", "[nodevice][optim]") {
  CHECK_THROWS_AS(grun::optim::detail::check_adamw_options({.lr = -1}), grun::error);
  CHECK_THROWS_WITH(grun::optim::detail::check_adamw_options({.beta2 = 1.0}), Catch::Contains("beta2"));
}

TEST_CASE("cuda::adamw keeps the moments of bf16 and fp16 parameters in fp32", "[nodevice][optim]") {
  using I = grun::gated_intervention<grun::gate::linear, grun::reft::loreft<4>>;
  STATIC_REQUIRE(std::is_same_v<gc::adamw<I::params<grun::bfloat16, cuda_space>>::state_type, gc::device_param_state<float>>);
  STATIC_REQUIRE(std::is_same_v<gc::adamw<I::params<grun::half, cuda_space>>::state_type, gc::device_param_state<float>>);
  STATIC_REQUIRE(std::is_same_v<gc::adamw<I::params<double, cuda_space>>::state_type, gc::device_param_state<double>>);
}

TEST_CASE("cuda::adamw: a post-step hook that throws leaves parameters, moments and step count as they were",
          "[optim]") {
  GRUN_REQUIRE_DEVICE();
  using I = grun::gated_intervention<grun::gate::linear, grun::reft::loreft<4>>;
  using Hp = I::params<float>;
  using Dp = I::params<float, cuda_space>;
  const index_t d = 40;
  grun::owned_params<Hp> p(I::shape<float>(d)), g(*p);
  grun::init(*p, 3);
  grun::test::fill_uniform(std::span<float>(g.data(), std::size_t(g.size())), 4);
  auto pd = upload<I>(p, d), gd = upload<I>(g, d);
  gc::adamw<Dp> dev(*pd, {.lr = 1e-2});
  dev.step(grun::exec::cuda, *pd, *gd);
  const auto params1 = download(pd), m1 = download(dev.first_moment()), v1 = download(dev.second_moment());
  CHECK_THROWS_AS(dev.step(grun::exec::cuda, *pd, *gd, [](const Dp&) { throw grun::numeric_error("rank-deficient"); }),
                  grun::numeric_error);
  CHECK(dev.steps() == 1);
  CHECK(download(pd) == params1);
  CHECK(download(dev.first_moment()) == m1);
  CHECK(download(dev.second_moment()) == v1);
}
