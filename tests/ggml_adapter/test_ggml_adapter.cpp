// The ggml adapter (grun/adapters/ggml.hpp): a trained grun module as a custom operator inside real
// ggml graphs (ggml 0.25.3, CPU backend) gives bit for bit what grun's own forward gives — F32 and
// F16, 3-D hidden states, 1 or 4 ggml threads, between other ggml ops — and what a compute cannot
// take is refused when the graph is built.
#include <grun/adapters/ggml.hpp>
#include <grun/grun.hpp>

#include "../test_intervention_common.hpp"

#include <ggml-cpu.h>

#include <catch2/catch.hpp>

#include <cstring>
#include <memory>
#include <vector>

using namespace grun;
using Catch::Contains;

namespace {

using unlearner = gated_intervention<gate::linear, reft::loreft<4>>;

struct context {
  ggml_context* ctx;
  explicit context(std::size_t bytes = 32u << 20) {
    ggml_init_params p{};
    p.mem_size = bytes;
    p.mem_buffer = nullptr;
    p.no_alloc = false;
    ctx = ggml_init(p);
    REQUIRE(ctx != nullptr);
  }
  ~context() { ggml_free(ctx); }
  void compute(ggml_tensor* out, int threads) {
    ggml_cgraph* gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);
    REQUIRE(ggml_graph_compute_with_ctx(ctx, gf, threads) == GGML_STATUS_SUCCESS);
  }
};

}  // namespace

TEST_CASE("ggml adapter: the op gives grun's forward bit for bit, on 1 and 4 ggml threads", "[ggml]") {
  const index_t d = 24, n = 9;
  unlearner::module<float> m(d, 3);
  const auto hv = grun_test::random_floats(n * d, 1);
  const auto pos = positions::rows({8, 0, 4, 5});
  std::vector<float> ref(std::size_t(n * d)), gref(4);
  m.forward(exec::host, matrix_view<const float>(hv.data(), {n, d}), pos, matrix_view<float>(ref.data(), {n, d}),
            vector_view<float>(gref.data(), {4}));

  for (int threads : {1, 4}) {
    INFO("threads " << threads);
    context c;
    ggml_tensor* h = ggml_new_tensor_2d(c.ctx, GGML_TYPE_F32, d, n);
    std::memcpy(h->data, hv.data(), hv.size() * sizeof(float));
    ggml::intervention_op op(m, pos);
    ggml_tensor* out = op(c.ctx, h);
    c.compute(out, threads);
    op.check();
    CHECK(std::memcmp(out->data, ref.data(), ref.size() * sizeof(float)) == 0);
    CHECK(std::vector<float>(op.gates().begin(), op.gates().end()) == gref);
    CHECK(std::memcmp(h->data, hv.data(), hv.size() * sizeof(float)) == 0);  // h untouched
  }
}

TEST_CASE("ggml adapter: between other ops, 3-D hidden states, F16 storage", "[ggml]") {
  const index_t d = 16;
  SECTION("(a + b) → grun → ×2, hidden state [d, 3, 2] (6 tokens)") {
    unlearner::module<float> m(d, 5);
    context c;
    ggml_tensor* a = ggml_new_tensor_3d(c.ctx, GGML_TYPE_F32, d, 3, 2);
    ggml_tensor* b = ggml_new_tensor_3d(c.ctx, GGML_TYPE_F32, d, 3, 2);
    const auto av = grun_test::random_floats(6 * d, 2), bv = grun_test::random_floats(6 * d, 3);
    std::memcpy(a->data, av.data(), av.size() * 4);
    std::memcpy(b->data, bv.data(), bv.size() * 4);
    const auto pos = positions::rows({5, 2});
    ggml::intervention_op op(m, pos);
    ggml_tensor* out = ggml_scale(c.ctx, op(c.ctx, ggml_add(c.ctx, a, b)), 2.f);
    c.compute(out, 3);
    op.check();
    std::vector<float> sum(6 * d), ref(6 * d), g(2);
    for (std::size_t i = 0; i < sum.size(); ++i) sum[i] = av[i] + bv[i];
    m.forward(exec::host, matrix_view<const float>(sum.data(), {6, d}), pos, matrix_view<float>(ref.data(), {6, d}),
              vector_view<float>(g.data(), {2}));
    const auto* got = static_cast<const float*>(out->data);
    for (std::size_t i = 0; i < ref.size(); ++i) REQUIRE(got[i] == 2.f * ref[i]);
  }
  SECTION("F16 hidden state with a grun::half module") {
    unlearner::module<grun::half> m(d, 7);
    context c;
    const index_t n = 5;
    ggml_tensor* h = ggml_new_tensor_2d(c.ctx, GGML_TYPE_F16, d, n);
    const auto hv = grun_test::random_floats(n * d, 4);
    std::vector<grun::half> hh(hv.size()), ref(hv.size()), g(1);
    for (std::size_t i = 0; i < hv.size(); ++i) hh[i] = grun::half(hv[i]);
    std::memcpy(h->data, hh.data(), hh.size() * 2);
    const auto pos = positions::rows({3});
    ggml::intervention_op op(m, pos);
    ggml_tensor* out = op(c.ctx, h);
    c.compute(out, 2);
    op.check();
    m.forward(exec::host, matrix_view<const grun::half>(hh.data(), {n, d}), pos,
              matrix_view<grun::half>(ref.data(), {n, d}), vector_view<grun::half>(g.data(), {1}));
    CHECK(std::memcmp(out->data, ref.data(), ref.size() * 2) == 0);
    CHECK(op.gates()[0] == load<float>(g[0]));
  }
}

TEST_CASE("ggml adapter: what a compute could not take is refused when the graph is built", "[ggml]") {
  const index_t d = 32;
  unlearner::module<float> m(d, 1);
  context c;
  ggml::intervention_op op(m, positions::rows({1}));
  CHECK_THROWS_WITH(op(c.ctx, ggml_new_tensor_2d(c.ctx, GGML_TYPE_Q8_0, d, 4)),
                    Contains("h: expected type f32, got q8_0"));
  CHECK_THROWS_WITH(op(c.ctx, ggml_new_tensor_2d(c.ctx, GGML_TYPE_F16, d, 4)), Contains("expected type f32, got f16"));
  CHECK_THROWS_WITH(op(c.ctx, ggml_new_tensor_2d(c.ctx, GGML_TYPE_F32, d + 1, 4)),
                    Contains("expected hidden size ne[0] = 32 (the module's), got 33"));
  CHECK_THROWS_WITH(op(c.ctx, ggml_new_tensor_2d(c.ctx, GGML_TYPE_F32, d, 1)), Contains("expected a row in [0, 1)"));
  // a transposed view: the tokens are not contiguous
  ggml_tensor* t = ggml_transpose(c.ctx, ggml_new_tensor_2d(c.ctx, GGML_TYPE_F32, 4, d));
  CHECK_THROWS_WITH(op(c.ctx, t), Contains("values contiguous (nb[0] = 4 bytes), got nb[0] = 16"));
  // a view of every other token of [d, 8]: rows with a stride are fine
  ggml_tensor* base = ggml_new_tensor_2d(c.ctx, GGML_TYPE_F32, d, 8);
  ggml_tensor* every_other = ggml_view_2d(c.ctx, base, d, 4, 2 * base->nb[1], 0);
  CHECK(op(c.ctx, every_other) != nullptr);
  CHECK(ggml::tokens<float>(every_other).stride(0) == 2 * d);
  // the row views refuse what they cannot read
  CHECK_THROWS_WITH(ggml::tokens<float>(static_cast<ggml_tensor*>(nullptr), "x"), Contains("x: expected a ggml tensor"));
}
