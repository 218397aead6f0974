// intervention_stack: sequential unlearning, h' = h + s(K) Σ_k g_k Δ_k.
#include "test_intervention_common.hpp"

using namespace grun_test;

namespace {
using stack_t = intervention_stack<gate::linear, reft::loreft<4>, ortho::qr_retraction, double>;
using I = stack_t::intervention;
}  // namespace

TEST_CASE("appending a module leaves earlier modules' contributions bitwise unchanged", "[stack]") {
  intervention_stack<gate::mlp<8, 4>, reft::loreft<4>, ortho::qr_retraction, float> st(16);
  st.append(1);
  auto h = random_matrix<float>(6, 16, 2);
  auto pos = positions::rows({0, 3, 5});
  host_matrix<float> before(6, 16), after(6, 16);
  std::vector<float> gb(3), ga(3);
  st.forward_module(exec::host, 0, h.view(), pos, before.view(), vector_view<float>(gb.data(), {3}));
  const float* storage = st.module(0).reft.weight.data;
  st.append(2);
  st.append(st.module(1));  // a copy of trained parameters
  CHECK(st.size() == 3);
  CHECK(st.module(0).reft.weight.data == storage);  // never moved
  // ... nor the aggregates the stack returned for them (a vector's reallocation freed these)
  const auto& first = st.module(0);
  auto& first_owned = st.owned_module(0);
  for (int k = 0; k < 40; ++k) st.append(std::uint64_t(10 + k));
  CHECK(first.reft.weight.data == storage);
  CHECK(first_owned->reft.weight.data == storage);
  CHECK(&first == &st.module(0));
  st.forward_module(exec::host, 0, h.view(), pos, after.view(), vector_view<float>(ga.data(), {3}));
  CHECK(std::memcmp(before.storage.data(), after.storage.data(), sizeof(float) * 96) == 0);
  CHECK(gb == ga);
}

TEST_CASE("stack forward is h + s(K) Σ_k g_k Δ_k", "[stack]") {
  const index_t n = 5, d = 9;
  stack_t st(d, 0.6, 0.6);
  st.append(1);
  st.append(2);
  st.append(3);
  CHECK(st.scale() == Approx(0.6 * 3 + 0.6));
  auto h = random_matrix<double>(n, d, 4);
  auto pos = positions::rows({4, 1});
  host_matrix<double> out(n, d), single(n, d);
  std::vector<double> gates(6), g1(2);
  st.forward(exec::host(2), h.view(), pos, out.view(), matrix_view<double>(gates.data(), {3, 2}));
  std::vector<double> expect(sz(n * d));
  for (index_t i = 0; i < n * d; ++i) expect[sz(i)] = 0;
  for (index_t k = 0; k < 3; ++k) {
    st.forward_module(exec::host, k, h.view(), pos, single.view(), vector_view<double>(g1.data(), {2}));
    CHECK(gates[sz(2 * k)] == g1[0]);
    CHECK(gates[sz(2 * k + 1)] == g1[1]);
    for (index_t i = 0; i < n * d; ++i) expect[sz(i)] += single.storage[i] - h.storage[i];
  }
  for (index_t i = 0; i < n * d; ++i) CHECK(out.storage[i] == Approx(h.storage[i] + st.scale() * expect[sz(i)]).margin(1e-13));
  // K = 1 with the default scale is exactly the single intervention
  stack_t one(d);
  one.append(st.module(0));
  one.forward(exec::host, h.view(), pos, out.view(), matrix_view<double>(gates.data(), {1, 2}));
  st.forward_module(exec::host, 0, h.view(), pos, single.view(), vector_view<double>(g1.data(), {2}));
  CHECK(std::memcmp(out.storage.data(), single.storage.data(), sizeof(double) * n * d) == 0);
}

TEST_CASE("stack backward matches finite differences for the trained module", "[stack][fd]") {
  for (index_t trained : {stack_t::newest, index_t(0), index_t(1)}) {
    INFO("trained = " << trained);
    const index_t n = 4, d = 7, K = 3;
    stack_t st(d, 0.6, 0.6);
    for (index_t k = 0; k < K; ++k) {
      st.append(std::uint64_t(10 + k));
      randomize(st.owned_module(k)->gate, std::uint64_t(20 + k), 0.5);
      randomize(st.owned_module(k)->reft.weight, std::uint64_t(30 + k), 0.5);
    }
    auto h = random_matrix<double>(n, d, 5), c = random_matrix<double>(n, d, 6);
    auto pos = positions::rows({2, 0, 3});
    const index_t P = pos.size();
    std::vector<double> cg = random_vector(K * P, 7), gates(sz(K * P));
    host_matrix<double> out(n, d), dh(n, d);
    auto loss = [&]() {
      st.forward(exec::host, h.view(), pos, out.view(), matrix_view<double>(gates.data(), {K, P}));
      double L = 0;
      for (index_t i = 0; i < n * d; ++i) L += c.storage[i] * out.storage[i];
      for (index_t i = 0; i < K * P; ++i) L += cg[sz(i)] * gates[sz(i)];
      return L;
    };
    owned_params<stack_t::params_type> grads(I::shape<double>(d));
    st.backward(exec::host(2), h.view(), pos, c.view(), matrix_view<const double>(cg.data(), {K, P}), dh.view(), *grads,
                trained);
    const index_t k = trained < 0 ? K - 1 : trained;
    CHECK(param_gradient_error(*st.owned_module(k), *grads, loss) < 1e-6);
    CHECK(input_gradient_error(dh.storage.data(), h.storage.data(), n * d, loss) < 1e-6);
  }
}

TEST_CASE("stack: bad inputs", "[stack][errors]") {
  stack_t st(7);
  auto h = random_matrix<double>(3, 7, 1);
  host_matrix<double> out(3, 7);
  std::vector<double> g(6);
  auto pos = positions::rows({0, 2});
  CHECK_THROWS_WITH(st.forward(exec::host, h.view(), pos, out.view(), matrix_view<double>(g.data(), {1, 2})),
                    Catch::Contains("stack is empty"));
  st.append(1);
  CHECK_THROWS_WITH(st.forward(exec::host, h.view(), pos, out.view(), matrix_view<double>(g.data(), {2, 2})),
                    Catch::Contains("gates: expected shape [1, 2]"));
  owned_params<stack_t::params_type> grads(I::shape<double>(7));
  CHECK_THROWS_WITH(st.backward(exec::host, h.view(), pos, out.view(), matrix_view<const double>(), out.view(), *grads, 3),
                    Catch::Contains("module index 3 out of range"));
  // Only -1 (stack::newest) names the newest module; -2 is not an index from the end.
  CHECK_THROWS_WITH(st.backward(exec::host, h.view(), pos, out.view(), matrix_view<const double>(), out.view(), *grads, -2),
                    Catch::Contains("module index -2 out of range"));
  CHECK_THROWS_AS(st.module(1), shape_error);
  owned_params<stack_t::params_type> other(I::shape<double>(8));
  CHECK_THROWS_WITH(st.append(*other), Catch::Contains("expected shape [1, 7]"));
  auto wide = random_matrix<double>(3, 8, 1);
  CHECK_THROWS_WITH(st.forward(exec::host, wide.view(), pos, out.view(), matrix_view<double>(g.data(), {1, 2})),
                    Catch::Contains("expected 7 columns"));
}

TEST_CASE("a householder stack matches finite differences", "[stack][fd][householder]") {
  using S = intervention_stack<gate::mlp<4, 3>, reft::loreft<2>, ortho::householder, double>;
  const index_t n = 3, d = 6, K = 2;
  S st(d, 0.6, 0.6);
  st.append(1);
  st.append(2);
  randomize(st.owned_module(1)->gate, 3, 0.5);
  auto h = random_matrix<double>(n, d, 4), c = random_matrix<double>(n, d, 5);
  auto pos = positions::all(n);
  std::vector<double> gates(sz(K * n));
  host_matrix<double> out(n, d), dh(n, d);
  auto loss = [&]() {
    st.forward(exec::host, h.view(), pos, out.view(), matrix_view<double>(gates.data(), {K, n}));
    double L = 0;
    for (index_t i = 0; i < n * d; ++i) L += c.storage[i] * out.storage[i];
    return L;
  };
  owned_params<S::params_type> grads(S::intervention::shape<double>(d));
  st.backward(exec::host, h.view(), pos, c.view(), matrix_view<const double>(), dh.view(), *grads);
  CHECK(param_gradient_error(*st.owned_module(1), *grads, loss) < 1e-6);
}
