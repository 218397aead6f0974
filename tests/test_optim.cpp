// AdamW: a hand-computed two-step trajectory, decoupled weight decay, convergence on a quadratic,
// clipping, error paths, the retraction hook, and R's orthonormality over 1000 steps of loreft.
#include <catch2/catch.hpp>

#include <grun/optim/adamw.hpp>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

using namespace grun;

namespace {

struct tiny {
  param<double> w;  // [2, 2]
  param<double> b;  // [2]
};
tiny tiny_shape() {
  tiny t{};
  set_matrix(t.w, 2, 2);
  set_vector(t.b, 2);
  return t;
}
void fill(const tiny& t, std::initializer_list<double> w, std::initializer_list<double> b) {
  index_t i = 0;
  for (double x : w) t.w[i++] = x;
  i = 0;
  for (double x : b) t.b[i++] = x;
}

}  // namespace

namespace user_space {
/// A user-defined aggregate that opts into the retraction hook through ADL.
struct constrained {
  param<float> x;
};
inline int retract_calls = 0;
inline void retract(const constrained& c) {
  ++retract_calls;
  for (index_t i = 0; i < c.x.size(); ++i) c.x[i] = std::fmin(c.x[i], 1.0f);  // project onto x <= 1
}
}  // namespace user_space

TEST_CASE("adamw: two steps match the hand-computed trajectory", "[optim]") {
  const optim::adamw_options o{.lr = 0.1, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.01};
  owned_params<tiny> p(tiny_shape()), g(tiny_shape());
  const std::vector<double> th0 = {0.5, -1.0, 2.0, 0.0, 0.25, -0.75};
  const std::vector<double> g1 = {0.2, -0.4, 1e-3, 3.0, -2.0, 0.0};
  const std::vector<double> g2 = {-0.1, -0.4, 5.0, 1.0, 0.5, 0.0};
  fill(*p, {th0[0], th0[1], th0[2], th0[3]}, {th0[4], th0[5]});
  optim::adamw<tiny> opt(*p, o);

  // Step 1: m = 0.1 g1, v = 0.001 g1², m̂ = g1, v̂ = g1²:  θ1 = θ0 (1 − lr λ) − lr g1 / (|g1| + ε)
  fill(*g, {g1[0], g1[1], g1[2], g1[3]}, {g1[4], g1[5]});
  opt.step(*p, *g);
  std::vector<double> th1(6);
  for (int i = 0; i < 6; ++i) {
    th1[i] = th0[i] * (1 - 0.1 * 0.01) - 0.1 * g1[i] / (std::fabs(g1[i]) + 1e-8);
    CHECK(p.data()[i] == Approx(th1[i]).epsilon(1e-14).margin(1e-300));
  }
  // Step 2: m = 0.09 g1 + 0.1 g2, v = 0.000999 g1² + 0.001 g2², bias corrections 0.19 and 0.001999.
  fill(*g, {g2[0], g2[1], g2[2], g2[3]}, {g2[4], g2[5]});
  opt.step(*p, *g);
  for (int i = 0; i < 6; ++i) {
    const double m = 0.09 * g1[i] + 0.1 * g2[i];
    const double v = 0.000999 * g1[i] * g1[i] + 0.001 * g2[i] * g2[i];
    const double m_hat = m / 0.19, v_hat = v / 0.001999;
    const double th2 = th1[i] * (1 - 0.1 * 0.01) - 0.1 * m_hat / (std::sqrt(v_hat) + 1e-8);
    CHECK(p.data()[i] == Approx(th2).epsilon(1e-12).margin(1e-15));
    CHECK(opt.first_moment().data()[i] == Approx(m).epsilon(1e-14).margin(1e-300));
    CHECK(opt.second_moment().data()[i] == Approx(v).epsilon(1e-14).margin(1e-300));
  }
  // The zero-gradient element moved only by the decay.
  CHECK(p.data()[5] == -0.75 * (1 - 1e-3) * (1 - 1e-3));
  CHECK(opt.steps() == 2);
}

TEST_CASE("adamw: weight decay is decoupled from the moments", "[optim]") {
  const optim::adamw_options o{.lr = 0.05, .weight_decay = 0.2};
  owned_params<tiny> p(tiny_shape()), g(tiny_shape());
  fill(*p, {1, -2, 3, -4}, {5, -6});
  optim::adamw<tiny> opt(*p, o);
  for (int t = 0; t < 5; ++t) opt.step(*p, *g);  // zero gradient
  // θ shrinks geometrically by (1 − lr λ) per step; m and v never see the decay term.
  const double f = std::pow(1 - 0.05 * 0.2, 5);
  const double expect[6] = {1, -2, 3, -4, 5, -6};
  for (int i = 0; i < 6; ++i) {
    CHECK(p.data()[i] == Approx(expect[i] * f).epsilon(1e-14));
    CHECK(opt.first_moment().data()[i] == 0.0);
    CHECK(opt.second_moment().data()[i] == 0.0);
  }
  // An L2-coupled Adam would instead take ≈ lr-sized sign steps toward 0 (|Δ| ≈ 0.05 per step);
  // decoupled decay moved the first element by only 1 − 0.99^5 ≈ 0.049 in five steps.
  CHECK(1.0 - p.data()[0] < 0.06);
}

TEST_CASE("adamw: converges on an ill-conditioned quadratic (float storage)", "[optim]") {
  struct quad { param<float> x; };
  quad shape{};
  set_vector(shape.x, 4);
  owned_params<quad> p(shape), g(shape);
  const float a[4] = {100.0f, 1.0f, 0.01f, 10.0f};  // curvatures spanning 1e4
  const float c[4] = {1.0f, -2.0f, 0.5f, 3.0f};
  optim::adamw<quad> opt(*p, {.lr = 0.05, .weight_decay = 0.0});
  auto loss = [&] {
    double s = 0;
    for (int i = 0; i < 4; ++i) s += 0.5 * a[i] * (p->x[i] - c[i]) * (p->x[i] - c[i]);
    return s;
  };
  const double l0 = loss();
  for (int t = 0; t < 3000; ++t) {
    for (int i = 0; i < 4; ++i) g->x[i] = a[i] * (p->x[i] - c[i]);
    opt.step(*p, *g);
  }
  CHECK(loss() < 1e-6 * l0);
  for (int i = 0; i < 4; ++i) CHECK(p->x[i] == Approx(c[i]).margin(1e-2));
}

TEST_CASE("adamw: global-norm clipping equals a step on scaled gradients", "[optim]") {
  owned_params<tiny> p1(tiny_shape()), p2(tiny_shape()), g(tiny_shape()), gs(tiny_shape());
  fill(*p1, {1, 2, 3, 4}, {5, 6});
  fill(*p2, {1, 2, 3, 4}, {5, 6});
  fill(*g, {6, 0, 0, 8}, {0, 0});  // ‖g‖ = 10
  const double s = 2.0 / (10.0 + 1e-6);
  fill(*gs, {6 * s, 0, 0, 8 * s}, {0, 0});
  optim::adamw<tiny> clipped(*p1, {.lr = 0.1, .weight_decay = 0.0, .max_grad_norm = 2.0});
  optim::adamw<tiny> plain(*p2, {.lr = 0.1, .weight_decay = 0.0});
  for (int t = 0; t < 3; ++t) {
    CHECK(clipped.step(*p1, *g) == Approx(10.0));
    plain.step(*p2, *gs);
  }
  for (int i = 0; i < 6; ++i) CHECK(p1.data()[i] == Approx(p2.data()[i]).epsilon(1e-12));
  // below the threshold nothing is scaled
  optim::adamw<tiny> loose(*p1, {.lr = 0.1, .max_grad_norm = 100.0});
  CHECK(loose.step(*p1, *g) == Approx(10.0));
  CHECK(loose.first_moment().data()[0] == Approx(0.6));
}

TEST_CASE("adamw: errors leave parameters unchanged", "[optim]") {
  owned_params<tiny> p(tiny_shape()), g(tiny_shape());
  fill(*p, {1, 2, 3, 4}, {5, 6});
  optim::adamw<tiny> opt(*p);
  g->b[1] = std::nan("");
  REQUIRE_THROWS_AS(opt.step(*p, *g), numeric_error);
  CHECK(opt.steps() == 0);
  CHECK(p->w[0] == 1.0);
  CHECK(opt.first_moment().data()[0] == 0.0);

  tiny wrong = tiny_shape();
  set_matrix(wrong.w, 1, 4);
  owned_params<tiny> gw(wrong);
  REQUIRE_THROWS_AS(opt.step(*p, *gw), shape_error);
  REQUIRE_THROWS_AS(optim::adamw<tiny>(*p, {.beta2 = 1.0}), grun::error);
  REQUIRE_THROWS_AS(optim::adamw<tiny>(*p, {.eps = 0.0}), grun::error);
}

TEST_CASE("adamw: post-step hooks — ADL retract and a caller-supplied one", "[optim]") {
  user_space::constrained shape{};
  set_vector(shape.x, 3);
  owned_params<user_space::constrained> p(shape), g(shape);
  p->x[0] = 0.99f;
  g->x[0] = -1.0f;  // pushes x[0] above 1
  optim::adamw<user_space::constrained> opt(*p, {.lr = 0.1});
  user_space::retract_calls = 0;
  opt.step(*p, *g);
  opt.step(*p, *g);
  CHECK(user_space::retract_calls == 2);
  CHECK(p->x[0] <= 1.0f);
  int calls = 0;
  opt.step(*p, *g, [&](const user_space::constrained&) { ++calls; });
  CHECK(calls == 1);
  CHECK(user_space::retract_calls == 2);  // the explicit hook replaces the default
  CHECK(p->x[0] > 1.0f);
}

TEST_CASE("adamw: a post-step hook that throws leaves parameters, moments and step count as they were",
          "[optim]") {
  owned_params<tiny> p(tiny_shape()), g(tiny_shape()), fresh_p(tiny_shape());
  fill(*p, {1, 2, 3, 4}, {5, 6});
  fill(*fresh_p, {1, 2, 3, 4}, {5, 6});
  fill(*g, {0.5, -1, 2, 0}, {1, -3});
  optim::adamw<tiny> opt(*p, {.lr = 0.1});
  opt.step(*p, *g);
  const owned_params<tiny> after_one = p;
  const auto m1 = opt.first_moment(), v1 = opt.second_moment();
  // A retraction that fails after the update (as QR does on a rank-deficient R).
  REQUIRE_THROWS_AS(opt.step(*p, *g, [](const tiny&) { throw numeric_error("rank-deficient"); }), numeric_error);
  CHECK(opt.steps() == 1);
  CHECK(std::memcmp(p.data(), after_one.data(), sizeof(double) * 6) == 0);
  CHECK(std::memcmp(opt.first_moment().data(), m1.data(), sizeof(double) * 6) == 0);
  CHECK(std::memcmp(opt.second_moment().data(), v1.data(), sizeof(double) * 6) == 0);
  // ... so the next step is the second step of an uninterrupted run, bit for bit.
  optim::adamw<tiny> uninterrupted(*fresh_p, {.lr = 0.1});
  uninterrupted.step(*fresh_p, *g);
  uninterrupted.step(*fresh_p, *g);
  opt.step(*p, *g);
  CHECK(std::memcmp(p.data(), fresh_p.data(), sizeof(double) * 6) == 0);
}

TEST_CASE("adamw: half and bfloat16 parameters keep their moments in fp32", "[optim]") {
  struct halves { param<half> x; };
  struct bhalves { param<bfloat16> x; };
  STATIC_REQUIRE(std::is_same_v<optim::adamw<halves>::state_type, param_state<float>>);
  STATIC_REQUIRE(std::is_same_v<optim::adamw<bhalves>::state_type, param_state<float>>);
  SECTION("half: (1 − β2)·g² of a small gradient does not underflow") {
    // g = 1e-4: v = 1e-3 · 1e-8 = 1e-11, below half's smallest subnormal (6e-8). In half storage
    // v was 0 and the first step was lr · m̂ / ε ≈ 1e4 · lr instead of Adam's lr · sign(g).
    halves shape{};
    set_vector(shape.x, 4);
    owned_params<halves> p(shape), g(shape);
    for (index_t i = 0; i < 4; ++i) { p->x[i] = half(1.0f); g->x[i] = half(i % 2 ? -1e-4f : 1e-4f); }
    optim::adamw<halves> opt(*p, {.lr = 1e-2, .weight_decay = 0.0});
    opt.step(*p, *g);
    for (index_t i = 0; i < 4; ++i) {
      CHECK(float(p->x[i]) == Approx(i % 2 ? 1.01f : 0.99f).margin(1e-3));
      const double gi = float(g->x[i]);
      CHECK(opt.second_moment().data()[i] / (1e-3 * gi * gi) == Approx(1.0).epsilon(1e-4));  // (1 − β2) in fp32
    }
  }
  SECTION("bfloat16: v keeps decaying by β2 = 0.999") {
    // In bfloat16 (8 significant bits) 0.999·v rounds back to v: v never decayed.
    bhalves shape{};
    set_vector(shape.x, 1);
    owned_params<bhalves> p(shape), g(shape);
    optim::adamw<bhalves> opt(*p, {.lr = 1e-3, .weight_decay = 0.0});
    g->x[0] = bfloat16(1.0f);
    opt.step(*p, *g);
    g->x[0] = bfloat16(0.0f);
    for (int t = 0; t < 1000; ++t) opt.step(*p, *g);
    CHECK(opt.second_moment().data()[0] == Approx(1e-3 * std::pow(0.999, 1000)).epsilon(1e-3));
  }
}
