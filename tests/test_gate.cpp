// Gates: row math against finite differences (double), algebraic laws, initialization, metadata,
// and a user-defined gate composed with loreft through gated_intervention (the extension point).
#include "cuda/norm_gate.hpp"
#include "test_intervention_common.hpp"

using namespace grun_test;

namespace {

/// FD check of one gate's row math: L = a·g(h) for random h and a.
template <class Gate>
void check_gate_row_fd(index_t d, std::uint64_t seed) {
  using P = typename Gate::template params<double>;
  P shaped{};
  Gate::shape(shaped, d);
  owned_params<P> p(shaped), grads(shaped);
  randomize(*p, seed, 0.4);
  std::vector<double> h = random_vector(d, seed + 1);
  std::vector<double> scratch(static_cast<std::size_t>(std::max<index_t>(Gate::scratch_size(d), 1)));
  const double a = 0.7;
  auto loss = [&]() { return a * Gate::forward(*p, h.data(), d, scratch.data()); };
  const double g = Gate::forward(*p, h.data(), d, scratch.data());
  std::vector<double> dh(static_cast<std::size_t>(d), 0.0);
  Gate::backward(*p, *grads, h.data(), d, scratch.data(), g, a, dh.data());

  CHECK(param_gradient_error(*p, *grads, loss) < 1e-6);
  CHECK(input_gradient_error(dh.data(), h.data(), d, loss) < 1e-6);
}

// A user-defined gate (cuda/norm_gate.hpp: one definition for these host tests and the device's).
using grun::test::norm_gate;

}  // namespace

TEST_CASE("gate row math matches finite differences", "[gate][fd]") {
  for (index_t d : {1, 7, 33}) {
    INFO("d = " << d);
    check_gate_row_fd<gate::linear>(d, 10 + std::uint64_t(d));
    check_gate_row_fd<gate::mlp<5, 3>>(d, 20 + std::uint64_t(d));
    check_gate_row_fd<gate::mlp<16, 8>>(d, 30 + std::uint64_t(d));
    check_gate_row_fd<norm_gate>(d, 40 + std::uint64_t(d));
  }
}

TEST_CASE("gate laws: zero parameters give σ(0), always gives 1", "[gate][laws]") {
  const index_t d = 7;
  std::vector<double> h = random_vector(d, 1);
  {
    gate::linear::params<double> s{};
    gate::linear::shape(s, d);
    owned_params<decltype(s)> p(s);
    CHECK(gate::linear::forward(*p, h.data(), d, static_cast<double*>(nullptr)) == 0.5);
  }
  {
    gate::mlp<4, 3>::params<double> s{};
    gate::mlp<4, 3>::shape(s, d);
    owned_params<decltype(s)> p(s);
    std::vector<double> scratch(7);
    CHECK(gate::mlp<4, 3>::forward(*p, h.data(), d, scratch.data()) == 0.5);
  }
  gate::always::params<double> none{};
  CHECK(gate::always::forward(none, h.data(), d, static_cast<double*>(nullptr)) == 1.0);
  std::vector<double> dh(std::size_t(d), 0.0);
  gate::always::backward(none, none, h.data(), d, static_cast<double*>(nullptr), 1.0, 5.0, dh.data());
  CHECK(std::all_of(dh.begin(), dh.end(), [](double x) { return x == 0.0; }));
}

TEST_CASE("a gate saturated in fp32 still gets a gradient (σ'(z) = σ(z)σ(−z), not g(1 − g))", "[gate]") {
  // z = 20: σ(z) rounds to 1 in float, so g(1 − g) = 0 and the gate could never be pushed back;
  // σ(z)σ(−z) = 2.06e-9. The linear and the mlp gate alike.
  const index_t d = 3;
  const std::vector<float> h = {0.f, 0.f, 0.f};
  auto bias_gradient = [&](auto gate_tag, auto&& last_bias) {
    using Gate = decltype(gate_tag);
    using P = typename Gate::template params<float>;
    P shaped{};
    Gate::shape(shaped, d);
    owned_params<P> p(shaped), grads(shaped);
    last_bias(*p).data[0] = 20.f;
    std::vector<float> scratch(static_cast<std::size_t>(std::max<index_t>(Gate::scratch_size(d), 1)));
    std::vector<float> dh(std::size_t(d), 0.f);
    const float g = Gate::forward(*p, h.data(), d, scratch.data());
    CHECK(g == 1.f);
    Gate::backward(*p, *grads, h.data(), d, scratch.data(), g, 1.f, dh.data());
    return double(last_bias(*grads).data[0]);
  };
  const double expect = 1.0 / (1.0 + std::exp(-20.0)) / (1.0 + std::exp(20.0));
  CHECK(bias_gradient(gate::linear{}, [](auto& p) -> auto& { return p.bias; }) == Approx(expect).epsilon(1e-5));
  CHECK(bias_gradient(gate::mlp<4, 3>{}, [](auto& p) -> auto& { return p.b3; }) == Approx(expect).epsilon(1e-5));
}

TEST_CASE("a hidden size whose parameter count overflows 64 bits is refused, not wrapped", "[gate]") {
  // mlp's first layer is [256, d]: 256 · 2^57 = 2^65
  using M = gated_intervention<gate::mlp<>, reft::loreft<4>>;
  CHECK_THROWS_WITH(M::shape<float>(index_t(1) << 57), Catch::Contains("element count fits in 64 bits"));
  CHECK_NOTHROW(M::shape<float>(4096));
}

TEST_CASE("gate shapes and reference names", "[gate]") {
  using L = gated_intervention<gate::linear, reft::loreft<4>>;
  auto s = L::shape<float>(33);
  CHECK(s.gate.weight.rows == 1);
  CHECK(s.gate.weight.cols == 33);
  CHECK(s.gate.bias.is_vector);
  CHECK(parameter_count(s.gate) == 33 + 1);  // d + 1 per layer (DESIGN)
  CHECK(gate::linear::param_names[0] == "weight");
  using M = gated_intervention<gate::mlp<>, reft::loreft<4>>;
  auto m = M::shape<float>(10);
  CHECK(m.gate.w1.rows == 256);
  CHECK(m.gate.w2.rows == 64);
  CHECK(m.gate.w2.cols == 256);
  CHECK(m.gate.w3.cols == 64);
  CHECK(gate::mlp<>::param_names[4] == "4.weight");
  CHECK(gate::always::param_names.size() == 0);
  using A = gated_intervention<gate::always, reft::loreft<4>>;
  CHECK(parameter_count(A::shape<float>(10).gate) == 0);
}

TEST_CASE("initialized gates start near 0.5", "[gate][init]") {
  const index_t d = 64, n = 32;
  auto h = random_matrix<float>(n, d, 5);
  host_matrix<float> out(n, d);
  std::vector<float> gates(static_cast<std::size_t>(n));
  auto pos = positions::all(n);
  gated_intervention<gate::linear, reft::loreft<4>>::module<float> lin(d, 1);
  lin.forward(exec::host, h.view(), pos, out.view(), vector_view<float>(gates.data(), {n}));
  for (float g : gates) CHECK(std::abs(g - 0.5f) < 0.05f);
  gated_intervention<gate::mlp<>, reft::loreft<4>>::module<float> mlp(d, 1);
  mlp.forward(exec::host, h.view(), pos, out.view(), vector_view<float>(gates.data(), {n}));
  for (float g : gates) CHECK(std::abs(g - 0.5f) < 0.05f);
}

TEST_CASE("a user-defined gate composes with loreft", "[gate][extension][fd]") {
  using U = gated_intervention<norm_gate, reft::loreft<3>>;
  check_intervention_fd<U>(7, 5, positions::rows({4, 0, 2}), 3, true, 0.5);
  check_intervention_fd<U>(33, 3, positions::all(3), 4, false, 0.5);
  U::module<float> m(9, 2);  // default init (no init() in the policy) and the owning type work too
  CHECK(parameter_count(m.parameters().gate) == 2);
}
