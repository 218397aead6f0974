// The Eigen adapter (grun/adapters/eigen.hpp): a module run on Eigen objects — tokens in the rows of a
// RowMajor matrix, in the columns of a ColMajor one, in a Block or a Map with an outer stride, stored
// as Eigen::half — gives bit for bit what it gives on grun's own host matrices; parameter leaves map
// to Eigen; layouts that are not token vectors are refused by name.
#include <grun/adapters/eigen.hpp>
#include <grun/grun.hpp>

#include "../test_intervention_common.hpp"

#include <catch2/catch.hpp>

#include <cstring>
#include <vector>

using namespace grun;

namespace {

using unlearner = gated_intervention<gate::linear, reft::loreft<4>>;

/// grun's own forward and backward on host matrices: the reference results.
struct reference {
  host_matrix<float> out, dh;
  std::vector<float> gates, grads;
  reference(unlearner::module<float>& m, const host_matrix<float>& h, const positions& pos,
            const host_matrix<float>& dout, const std::vector<float>& dgates)
      : out(h.rows, h.cols), dh(h.rows, h.cols), gates(std::size_t(pos.size())) {
    m.forward(exec::host, h.view(), pos, out.view(), vector_view<float>(gates.data(), {pos.size()}));
    m.backward(exec::host, h.view(), pos, dout.view(), vector_view<const float>(dgates.data(), {pos.size()}), dh.view());
    const auto& g = m.owned_gradients();
    grads.assign(g.data(), g.data() + g.size());
  }
};

template <class A>
bool same_bits(const A& a, const float* b, std::size_t n) {
  return std::memcmp(a.data(), b, n * sizeof(float)) == 0;
}

}  // namespace

TEST_CASE("eigen adapter: tokens in rows (RowMajor) or columns (ColMajor) give grun's results bit for bit",
          "[eigen]") {
  const index_t n = 6, d = 13;
  unlearner::module<float> m(d, 3);
  const auto h = grun_test::random_matrix<float>(n, d, 1), dout = grun_test::random_matrix<float>(n, d, 2);
  const auto pos = positions::rows({5, 0, 3});
  const std::vector<float> dgates = {0.5f, -1.f, 2.f};
  const reference ref(m, h, pos, dout, dgates);
  const Eigen::Map<const Eigen::VectorXf> dg(dgates.data(), 3);

  SECTION("RowMajor [N, d]") {
    using RM = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    const RM H = Eigen::Map<const RM>(h.storage.data(), n, d), Dout = Eigen::Map<const RM>(dout.storage.data(), n, d);
    RM Out(n, d), Dh(n, d);
    Eigen::VectorXf gates(3);
    eigen::forward(m, exec::host, H, pos, Out, gates);
    eigen::backward(m, exec::host, H, pos, Dout, dg, Dh);
    CHECK(same_bits(Out, ref.out.storage.data(), std::size_t(n * d)));
    CHECK(same_bits(gates, ref.gates.data(), 3));
    CHECK(same_bits(Dh, ref.dh.storage.data(), std::size_t(n * d)));
    CHECK(std::memcmp(m.owned_gradients().data(), ref.grads.data(), ref.grads.size() * sizeof(float)) == 0);
  }
  SECTION("ColMajor [d, N] (Eigen's default: one token per column), in place") {
    Eigen::MatrixXf H = Eigen::Map<const Eigen::MatrixXf>(h.storage.data(), d, n);
    const Eigen::MatrixXf Dout = Eigen::Map<const Eigen::MatrixXf>(dout.storage.data(), d, n);
    Eigen::VectorXf gates(3);
    Eigen::MatrixXf Dh(d, n);
    const Eigen::MatrixXf H0 = H;
    eigen::backward(m, exec::host, H0, pos, Dout, dg, Dh);
    eigen::forward(m, exec::host, H, pos, H, gates);  // out = h
    CHECK(same_bits(H, ref.out.storage.data(), std::size_t(n * d)));
    CHECK(same_bits(Dh, ref.dh.storage.data(), std::size_t(n * d)));
    CHECK(same_bits(gates, ref.gates.data(), 3));
  }
  SECTION("a Block of a wider matrix, and a Map with an outer stride (no copy)") {
    Eigen::MatrixXf wide = Eigen::MatrixXf::Zero(d + 5, n + 2);
    wide.block(2, 1, d, n) = Eigen::Map<const Eigen::MatrixXf>(h.storage.data(), d, n);
    Eigen::MatrixXf Out(d, n);
    Eigen::VectorXf gates(3);
    eigen::forward(m, exec::host, wide.block(2, 1, d, n), pos, Out, gates);
    CHECK(same_bits(Out, ref.out.storage.data(), std::size_t(n * d)));
    const auto view = eigen::tokens(wide.block(2, 1, d, n));
    CHECK(view.extent(0) == n);
    CHECK(view.extent(1) == d);
    CHECK(view.stride(0) == d + 5);
    CHECK(view.data() == wide.data() + 2 + (d + 5));
    // a Map with an outer stride, written through: Out2's padding rows stay untouched
    std::vector<float> padded(std::size_t((d + 3) * n), 7.f);
    Eigen::Map<Eigen::MatrixXf, 0, Eigen::OuterStride<>> Out2(padded.data(), d, n, Eigen::OuterStride<>(d + 3));
    eigen::forward(m, exec::host, wide.block(2, 1, d, n), pos, Out2, gates);
    CHECK(Eigen::MatrixXf(Out2) == Out);
    for (index_t t = 0; t < n; ++t)
      for (index_t j = d; j < d + 3; ++j) CHECK(padded[std::size_t(t * (d + 3) + j)] == 7.f);
  }
}

TEST_CASE("eigen adapter: an mlp-gate module keeps its forward's activations for the backward (same bits)",
          "[eigen]") {
  using mlp_unlearner = gated_intervention<gate::mlp<16, 8>, reft::loreft<4>>;
  const index_t n = 40, d = 21;
  mlp_unlearner::module<float> m(d, 4);
  const Eigen::MatrixXf H = Eigen::MatrixXf::Random(d, n), Dout = Eigen::MatrixXf::Random(d, n);
  std::vector<index_t> rows;
  for (index_t t = 0; t < n; t += 1 + t % 2) rows.push_back(t);
  const auto pos = positions::rows(rows);
  const index_t P = pos.size();
  const Eigen::VectorXf dg = Eigen::VectorXf::Constant(P, 0.5f);
  auto run = [&](saved_activations<float>* saved) {
    Eigen::MatrixXf Out(d, n), Dh(d, n);
    Eigen::VectorXf gates(P);
    eigen::forward(m, exec::host, H, pos, Out, gates, saved);
    eigen::backward(m, exec::host, H, pos, Dout, dg, Dh, saved);
    std::vector<float> all(m.owned_gradients().data(), m.owned_gradients().data() + m.owned_gradients().size());
    all.insert(all.end(), Out.data(), Out.data() + Out.size());
    all.insert(all.end(), Dh.data(), Dh.data() + Dh.size());
    all.insert(all.end(), gates.data(), gates.data() + gates.size());
    return all;
  };
  const auto recomputed = run(nullptr);
  saved_activations<float> saved;
  const auto from_saved = run(&saved);
  CHECK(saved.filled());
  CHECK(saved.positions() == P);
  REQUIRE(recomputed.size() == from_saved.size());
  CHECK(std::memcmp(recomputed.data(), from_saved.data(), recomputed.size() * sizeof(float)) == 0);
}

TEST_CASE("eigen adapter: Eigen::half storage is grun::half bit for bit", "[eigen]") {
  const index_t n = 4, d = 8;
  unlearner::module<grun::half> m(d, 5);
  const auto hf = grun_test::random_matrix<float>(n, d, 4);
  host_matrix<grun::half> h(n, d), out(n, d);
  for (index_t i = 0; i < n * d; ++i) h.storage[i] = grun::half(hf.storage[i]);
  const auto pos = positions::rows({1, 2});
  std::vector<grun::half> g(2);
  m.forward(exec::host, h.view(), pos, out.view(), vector_view<grun::half>(g.data(), {2}));

  using RM = Eigen::Matrix<Eigen::half, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  RM H(n, d), Out(n, d);
  std::memcpy(static_cast<void*>(H.data()), h.storage.data(), std::size_t(n * d) * 2);
  Eigen::Matrix<Eigen::half, Eigen::Dynamic, 1> gates(2);
  eigen::forward(m, exec::host, H, pos, Out, gates);
  CHECK(std::memcmp(Out.data(), out.storage.data(), std::size_t(n * d) * 2) == 0);
  CHECK(std::memcmp(gates.data(), g.data(), 4) == 0);
}

TEST_CASE("eigen adapter: parameter leaves as Eigen maps (aliasing, [rows, cols], vectors [1, n])", "[eigen]") {
  const index_t d = 10;
  unlearner::module<float> m(d, 7);
  const auto& p = m.parameters();
  const auto R = eigen::map(p.reft.rotate_layer);  // [r, d], orthonormal rows after init
  CHECK(R.rows() == 4);
  CHECK(R.cols() == d);
  CHECK((R * R.transpose() - Eigen::MatrixXf::Identity(4, 4)).cwiseAbs().maxCoeff() < 1e-6f);
  const auto b = eigen::map(p.reft.bias);
  CHECK(b.rows() == 1);
  CHECK(b.cols() == 4);
  auto w = eigen::map(m.owned_parameters()->reft.weight);  // writable: assigning through it edits the module
  w.setZero();
  CHECK(m.parameters().reft.weight[0] == 0.f);
}

TEST_CASE("eigen adapter: layouts that are not token vectors are refused by name", "[eigen]") {
  const index_t n = 3, d = 4;
  unlearner::module<float> m(d, 1);
  Eigen::MatrixXf H = Eigen::MatrixXf::Random(d, n), Out(d, n);
  Eigen::VectorXf gates(1);
  const auto pos = positions::rows({0});
  // tokens read with an inner stride of 2 (every other element of a [2d, n] matrix)
  Eigen::MatrixXf tall = Eigen::MatrixXf::Random(2 * d, n);
  Eigen::Map<Eigen::MatrixXf, 0, Eigen::Stride<Eigen::Dynamic, 2>> strided(tall.data(), d, n,
                                                                             Eigen::Stride<Eigen::Dynamic, 2>(2 * d, 2));
  CHECK_THROWS_WITH(eigen::forward(m, exec::host, strided, pos, Out, gates),
                    Catch::Contains("h: expected each token's values contiguous (inner stride 1), got inner stride 2"));
  // a hidden size the module does not have (a RowMajor matrix read as [d, n] by mistake: d' = n)
  using RM = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  RM wrong(d, n), wrong_out(d, n);
  CHECK_THROWS_AS(eigen::forward(m, exec::host, wrong, pos, wrong_out, gates), shape_error);
  // gates must be a vector
  Eigen::MatrixXf g2(2, 2);
  CHECK_THROWS_WITH(eigen::forward(m, exec::host, H, pos, Out, g2), Catch::Contains("gates: expected a vector, got a 2 × 2"));
}
