// Unlearning losses and the objective (grun/loss/unlearn.hpp, kl.hpp, objective.hpp).
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <vector>

#include "grun/loss/objective.hpp"

using namespace grun;
using grun::loss::ignore_index;

namespace {

double log_sig(double z) { return -std::log1p(std::exp(-z)); }
double sig(double z) { return 1.0 / (1.0 + std::exp(-z)); }

std::vector<double> randv(std::size_t n, double lo, double hi, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(lo, hi);
  std::vector<double> v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

/// Owns every input and gradient array of a small batch, in storage type T.
template <class T>
struct batch {
  using A = acc_t<T>;
  index_t B = 4, Tn = 6, V = 7, P = 3, d = 5, G = 4;
  std::vector<A> nll, nll_ref, rnll, rnll_ref, rt_nll;  // forget: nll, ref, refusal; retain: nll
  std::vector<index_t> count{3, 0, 2, 5}, rcount{2, 4, 0, 3}, rt_count{4, 1, 0, 2};
  std::vector<T> logits, logits_ref, hidden_f, hidden_r, hidden_r_ref;
  std::vector<std::int64_t> labels{1, ignore_index, 6, 0, ignore_index, 3};
  std::vector<A> u, gate_f, gate_r, zf, zr;
  // gradients
  std::vector<A> d_nll, d_rnll, d_rt_nll, d_gf, d_gr, d_zf, d_zr;
  std::vector<T> d_logits, d_hf, d_hr;

  explicit batch(unsigned seed = 1) {
    auto cvt = [](const std::vector<double>& v) {
      std::vector<T> o(v.size());
      for (std::size_t i = 0; i < v.size(); ++i) o[i] = store<T>(static_cast<A>(v[i]));
      return o;
    };
    auto acc = [](const std::vector<double>& v) { return std::vector<A>(v.begin(), v.end()); };
    nll = acc(randv(4, 1, 30, seed));
    nll_ref = acc(randv(4, 1, 30, seed + 1));
    rnll = acc(randv(4, 1, 20, seed + 2));
    rnll_ref = acc(randv(4, 1, 20, seed + 3));
    rt_nll = acc(randv(4, 1, 20, seed + 4));
    logits = cvt(randv(42, -4, 4, seed + 5));
    logits_ref = cvt(randv(42, -4, 4, seed + 6));
    hidden_f = cvt(randv(15, -2, 2, seed + 7));
    hidden_r = cvt(randv(15, -2, 2, seed + 8));
    hidden_r_ref = cvt(randv(15, -2, 2, seed + 9));
    auto uu = loss::rmu_direction<A>(d, 42);
    u.assign(uu.data(), uu.data() + d);
    gate_f = acc(randv(4, 0.05, 0.95, seed + 10));
    gate_r = acc(randv(3, 0.05, 0.95, seed + 11));
    zf = acc(randv(4, -4, 4, seed + 12));
    zr = acc(randv(3, -4, 4, seed + 13));
    d_nll.resize(4); d_rnll.resize(4); d_rt_nll.resize(4); d_gf.resize(4); d_gr.resize(3); d_zf.resize(4); d_zr.resize(3);
    d_logits.resize(42); d_hf.resize(15); d_hr.resize(15);
  }
  loss::inputs<T> in() const {
    loss::inputs<T> x;
    x.forget.nll = {nll.data(), {B}};
    x.forget.nll_ref = {nll_ref.data(), {B}};
    x.forget.count = {count.data(), {B}};
    x.forget.refusal_nll = {rnll.data(), {B}};
    x.forget.refusal_nll_ref = {rnll_ref.data(), {B}};
    x.forget.refusal_count = {rcount.data(), {B}};
    x.forget.hidden = {hidden_f.data(), {P, d}};
    x.forget.direction = {u.data(), {d}};
    x.forget.gate = {gate_f.data(), {4}};
    x.forget.gate_logit = {zf.data(), {4}};
    x.retain.nll = {rt_nll.data(), {B}};
    x.retain.count = {rt_count.data(), {B}};
    x.retain.logits = {logits.data(), {Tn, V}};
    x.retain.logits_ref = {logits_ref.data(), {Tn, V}};
    x.retain.labels = {labels.data(), {Tn}};
    x.retain.hidden = {hidden_r.data(), {P, d}};
    x.retain.hidden_ref = {hidden_r_ref.data(), {P, d}};
    x.retain.gate = {gate_r.data(), {3}};
    x.retain.gate_logit = {zr.data(), {3}};
    return x;
  }
  loss::grads<T> g() {
    loss::grads<T> x;
    x.forget.nll = {d_nll.data(), {B}};
    x.forget.refusal_nll = {d_rnll.data(), {B}};
    x.forget.hidden = {d_hf.data(), {P, d}};
    x.forget.gate = {d_gf.data(), {4}};
    x.forget.gate_logit = {d_zf.data(), {4}};
    x.retain.nll = {d_rt_nll.data(), {B}};
    x.retain.logits = {d_logits.data(), {Tn, V}};
    x.retain.hidden = {d_hr.data(), {P, d}};
    x.retain.gate = {d_gr.data(), {3}};
    x.retain.gate_logit = {d_zr.data(), {3}};
    return x;
  }
};

/// Central differences of f over every entry of x, against the analytic gradient g.
/// Returns max |fd − g| / max(max |g|, 1e-12); the caller checks < 1e-6.
double fd_rel_err(std::vector<double>& x, const std::vector<double>& g, const std::function<double()>& f,
                  double h = 1e-6) {
  double err = 0, scale = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double keep = x[i];
    x[i] = keep + h; const double p = f();
    x[i] = keep - h; const double m = f();
    x[i] = keep;
    err = std::max(err, std::abs((p - m) / (2 * h) - g[i]));
    scale = std::max(scale, std::abs(g[i]));
  }
  return scale == 0 ? err : err / scale;
}

/// FD-checks every input array of `batch<double>` under objective `obj` (all gradients at once).
template <class Obj>
void fd_check_objective(const Obj& obj, index_t step = 100) {
  batch<double> b;
  auto L = [&] { return obj.value(exec::host, b.in(), step).total; };
  const auto terms = obj.value_and_grad(exec::host, b.in(), b.g(), step);
  CHECK(terms.total == Approx(L()).epsilon(1e-14));
  INFO("objective<" << Obj::forget_policy::name << ", " << Obj::retain_policy::name << ", "
                    << Obj::gate_policy::name << ">");
  CHECK(fd_rel_err(b.nll, b.d_nll, L) < 1e-6);
  CHECK(fd_rel_err(b.rnll, b.d_rnll, L) < 1e-6);
  CHECK(fd_rel_err(b.rt_nll, b.d_rt_nll, L) < 1e-6);
  CHECK(fd_rel_err(b.logits, b.d_logits, L) < 1e-6);
  CHECK(fd_rel_err(b.hidden_f, b.d_hf, L) < 1e-6);
  CHECK(fd_rel_err(b.hidden_r, b.d_hr, L) < 1e-6);
  CHECK(fd_rel_err(b.gate_f, b.d_gf, L) < 1e-6);
  CHECK(fd_rel_err(b.gate_r, b.d_gr, L) < 1e-6);
  CHECK(fd_rel_err(b.zf, b.d_zf, L) < 1e-6);
  CHECK(fd_rel_err(b.zr, b.d_zr, L) < 1e-6);
}

template <class P>
double eval(const P& p, const batch<double>& b) {
  return p.evaluate(exec::host, b.in(), loss::grads<double>{}, 1.0);
}

}  // namespace

// ---- closed forms --------------------------------------------------------------------------------

TEST_CASE("npo: closed form, paper form and sign", "[loss][npo]") {
  batch<double> b;
  loss::npo p;  // β = 0.1
  // valid sequences: count > 0 → b = 0, 2, 3
  double expect = 0, paper = 0;
  for (int i : {0, 2, 3}) {
    expect += -(2 / 0.1) * log_sig(0.1 * (b.nll[i] - b.nll_ref[i])) / 3;
    // NPO paper: (2/β) E log(1 + (π_θ/π_ref)^β), π = exp(−NLL)
    paper += (2 / 0.1) * std::log1p(std::pow(std::exp(-b.nll[i]) / std::exp(-b.nll_ref[i]), 0.1)) / 3;
  }
  CHECK(eval(p, b) == Approx(expect).epsilon(1e-12));
  CHECK(eval(p, b) == Approx(paper).epsilon(1e-9));
  auto g = b.g();
  p.evaluate(exec::host, b.in(), g, 1.0);
  for (int i : {0, 2, 3}) {
    CHECK(b.d_nll[i] < 0);  // descent raises the forget NLL
    CHECK(b.d_nll[i] == Approx(-(2.0 / 3) * sig(-0.1 * (b.nll[i] - b.nll_ref[i]))).epsilon(1e-12));
  }
  CHECK(b.d_nll[1] == 0);  // no answer tokens
  // θ = ref: L = (2/β) log 2, gradient −1/B_valid (GA on the summed NLL).
  b.nll_ref = b.nll;
  std::fill(b.d_nll.begin(), b.d_nll.end(), 0);
  CHECK(p.evaluate(exec::host, b.in(), b.g(), 1.0) == Approx(20 * std::log(2.0)).epsilon(1e-12));
  CHECK(b.d_nll[0] == Approx(-1.0 / 3).epsilon(1e-12));
}

TEST_CASE("simnpo: closed form and sign", "[loss][simnpo]") {
  batch<double> b;
  loss::simnpo p{.beta = 2.5, .gamma = 0.3};
  double expect = 0;
  for (int i : {0, 2, 3}) {
    // SimNPO paper: −(2/β) logσ(−(β/|y|) log π_θ − γ), log π_θ = −NLL
    const double logpi = -b.nll[i];
    expect += -(2 / 2.5) * log_sig(-(2.5 / static_cast<double>(b.count[i])) * logpi - 0.3) / 3;
  }
  CHECK(eval(p, b) == Approx(expect).epsilon(1e-12));
  p.evaluate(exec::host, b.in(), b.g(), 1.0);
  for (int i : {0, 2, 3}) CHECK(b.d_nll[i] < 0);
}

TEST_CASE("dpo: closed form, sign and θ = ref gradient", "[loss][dpo]") {
  batch<double> b;
  b.rcount = {2, 4, 0, 3};  // valid where count > 0 and rcount > 0: b = 0, 3
  loss::dpo p;
  double expect = 0;
  for (int i : {0, 3}) {
    const double lw = -b.rnll[i], lw0 = -b.rnll_ref[i], ll = -b.nll[i], ll0 = -b.nll_ref[i];
    expect += -(2 / 0.1) * log_sig(0.1 * ((lw - lw0) - (ll - ll0))) / 2;
  }
  CHECK(eval(p, b) == Approx(expect).epsilon(1e-12));
  p.evaluate(exec::host, b.in(), b.g(), 1.0);
  CHECK(b.d_nll[0] < 0);    // raise the forget answer's NLL
  CHECK(b.d_rnll[0] > 0);   // lower the refusal's NLL
  CHECK(b.d_nll[0] == Approx(-b.d_rnll[0]).epsilon(1e-14));
  CHECK(b.d_nll[1] == 0);
  CHECK(b.d_nll[2] == 0);
  b.nll_ref = b.nll;
  b.rnll_ref = b.rnll;
  std::fill(b.d_nll.begin(), b.d_nll.end(), 0);
  std::fill(b.d_rnll.begin(), b.d_rnll.end(), 0);
  CHECK(p.evaluate(exec::host, b.in(), b.g(), 1.0) == Approx(20 * std::log(2.0)).epsilon(1e-12));
  CHECK(b.d_nll[0] == Approx(-0.5).epsilon(1e-12));
  CHECK(b.d_rnll[3] == Approx(0.5).epsilon(1e-12));
}

TEST_CASE("ga / idk / retain_nll: token mean and sequence mean", "[loss][nll]") {
  batch<double> b;
  b.nll = {6, 100, 4, 10};  // count {3, 0, 2, 5}: sequence 1 has no answer and is skipped
  CHECK(eval(loss::ga{}, b) == Approx(-20.0 / 10));
  CHECK(eval(loss::ga{.reduction = loss::nll_reduction::sequence_mean}, b) == Approx(-20.0 / 3));
  b.rnll = {2, 8, 50, 3};   // refusal count {2, 4, 0, 3}
  CHECK(eval(loss::idk{}, b) == Approx(13.0 / 9));
  b.rt_nll = {4, 1, 7, 2};  // retain count {4, 1, 0, 2}
  CHECK(eval(loss::retain_nll{}, b) == Approx(7.0 / 7));
  CHECK(eval(loss::retain_nll{.reduction = loss::nll_reduction::sequence_mean}, b) == Approx(7.0 / 3));
  loss::ga{}.evaluate(exec::host, b.in(), b.g(), 2.0);
  CHECK(b.d_nll[0] == Approx(-2.0 / 10));
  CHECK(b.d_nll[1] == 0);
}

TEST_CASE("rmu / rmu_retain: hand-worked", "[loss][rmu]") {
  // h = [[1, 0], [0, 1]], u = [1, 0], c = 2: h − c·u = [[−1, 0], [−2, 1]], Σ² = 6, mean over 4 → 1.5.
  std::vector<double> h = {1, 0, 0, 1}, u = {1, 0}, h0 = {1, 1, 1, 1};
  loss::inputs<double> in;
  in.forget.hidden = {h.data(), {2, 2}};
  in.forget.direction = {u.data(), {2}};
  in.retain.hidden = {h.data(), {2, 2}};
  in.retain.hidden_ref = {h0.data(), {2, 2}};
  std::vector<double> dh(4);
  loss::grads<double> g;
  g.forget.hidden = {dh.data(), {2, 2}};
  CHECK(loss::rmu{.c = 2}.evaluate(exec::host, in, g, 1.0) == Approx(1.5));
  // ∂/∂h = 2(h − c·u)/4 = [[−0.5, 0], [−1, 0.5]]
  CHECK(dh[0] == Approx(-0.5));
  CHECK(dh[1] == 0);
  CHECK(dh[2] == Approx(-1));
  CHECK(dh[3] == Approx(0.5));
  // retain: h − h0 = [[0, −1], [−1, 0]] → 2/4
  CHECK(loss::rmu_retain{}.evaluate(exec::host, in, loss::grads<double>{}, 1.0) == Approx(0.5));
  // u is a unit vector with non-negative entries, reproducible from its seed.
  auto u1 = loss::rmu_direction<double>(64, 7), u2 = loss::rmu_direction<double>(64, 7), u3 = loss::rmu_direction<double>(64, 8);
  double n = 0;
  for (int j = 0; j < 64; ++j) { n += u1[j] * u1[j]; CHECK(u1[j] >= 0); CHECK(u1[j] == u2[j]); }
  CHECK(n == Approx(1.0).epsilon(1e-14));
  CHECK(u1[0] != u3[0]);
}

TEST_CASE("gate_bce: hand-worked, and agrees with gate_bce_logits", "[loss][gate]") {
  // forget gates [0.9], retain gates [0.2]: L = (−log 0.9 − log 0.8)/2 = (0.1053605 + 0.2231436)/2
  std::vector<double> gf = {0.9}, gr = {0.2};
  loss::inputs<double> in;
  in.forget.gate = {gf.data(), {1}};
  in.retain.gate = {gr.data(), {1}};
  std::vector<double> dgf(1), dgr(1);
  loss::grads<double> g;
  g.forget.gate = {dgf.data(), {1}};
  g.retain.gate = {dgr.data(), {1}};
  CHECK(loss::gate_bce{}.evaluate(exec::host, in, g, 1.0) == Approx(0.16425203348601843).epsilon(1e-12));
  CHECK(dgf[0] == Approx(-0.5 / 0.9));
  CHECK(dgr[0] == Approx(0.5 / 0.8));

  batch<double> b;
  for (std::size_t i = 0; i < b.zf.size(); ++i) b.gate_f[i] = sig(b.zf[i]);
  for (std::size_t i = 0; i < b.zr.size(); ++i) b.gate_r[i] = sig(b.zr[i]);
  CHECK(eval(loss::gate_bce{}, b) == Approx(eval(loss::gate_bce_logits{}, b)).epsilon(1e-12));
  // Chain rule through σ: ∂L/∂z = ∂L/∂g · g(1 − g) = σ(z) − y.
  auto gg = b.g();
  loss::gate_bce{}.evaluate(exec::host, b.in(), gg, 1.0);
  loss::gate_bce_logits{}.evaluate(exec::host, b.in(), gg, 1.0);
  for (std::size_t i = 0; i < b.zf.size(); ++i)
    CHECK(b.d_gf[i] * b.gate_f[i] * (1 - b.gate_f[i]) == Approx(b.d_zf[i]).epsilon(1e-12));

  // A NaN gate gives a NaN loss (it was clamped to eps: a finite loss hid the fault upstream).
  gf = {std::nan("")};
  gr = {0.2};
  CHECK(std::isnan(loss::gate_bce{}.evaluate(exec::host, in, g, 1.0)));
  gf = {0.9};
  gr = {std::nan("")};
  CHECK(std::isnan(loss::gate_bce{}.evaluate(exec::host, in, g, 1.0)));

  // Saturated gates: finite loss, non-zero gradient of the right sign.
  gf = {0.0};
  gr = {1.0};
  dgf = {0};
  dgr = {0};
  const double L = loss::gate_bce{.eps = 1e-6}.evaluate(exec::host, in, g, 1.0);
  CHECK(L == Approx(-std::log(1e-6)));
  CHECK(dgf[0] < 0);
  CHECK(dgr[0] > 0);
  // Huge logits: no overflow.
  std::vector<double> zf = {-800}, zr = {800};
  in.forget.gate_logit = {zf.data(), {1}};
  in.retain.gate_logit = {zr.data(), {1}};
  CHECK(loss::gate_bce_logits{}.evaluate(exec::host, in, loss::grads<double>{}, 1.0) == Approx(800));
}

TEST_CASE("retain_kl: hand-worked V = 3 and fused vs naive at ±1e4", "[loss][kl]") {
  // ref logits 0 (uniform), θ logits [1, 2, 3]: KL = Σ (1/3)(log(1/3) − log p_θ)
  //   = −log 3 − (1/3)Σ(x_v − lse) = lse − 2 − log 3 = 3.40760596444438 − 2 − 1.09861228866811 = 0.30899367577627
  std::vector<double> x = {1, 2, 3}, r = {0, 0, 0};
  std::vector<std::int64_t> y = {0};
  loss::inputs<double> in;
  in.retain.logits = {x.data(), {1, 3}};
  in.retain.logits_ref = {r.data(), {1, 3}};
  in.retain.labels = {y.data(), {1}};
  std::vector<double> dx(3);
  loss::grads<double> g;
  g.retain.logits = {dx.data(), {1, 3}};
  CHECK(loss::retain_kl{}.evaluate(exec::host, in, g, 1.0) == Approx(0.30899367577627).epsilon(1e-12));
  // ∂/∂x = p_θ − 1/3
  CHECK(dx[0] == Approx(0.09003057317038048 - 1.0 / 3).epsilon(1e-12));
  CHECK(dx[2] == Approx(0.665240955774822 - 1.0 / 3).epsilon(1e-12));

  for (double offset : {0.0, 1e4}) {
    for (double scale : {3.0, 1e4}) {
      const index_t T_ = 5, V = 97;
      auto xs = randv(T_ * V, -scale, scale, 3), rs = randv(T_ * V, -scale, scale, 4);
      for (auto& v : xs) v += offset;
      for (auto& v : rs) v += offset;
      std::vector<std::int64_t> lab = {1, ignore_index, 2, 3, 4};
      buffer<double> kl(T_), lse(T_), lse_r(T_);
      loss::token_kl_forward(exec::host, matrix_view<const double>(xs.data(), {T_, V}),
                             matrix_view<const double>(rs.data(), {T_, V}),
                             vector_view<const std::int64_t>(lab.data(), {T_}), kl.view(), lse.view(), lse_r.view());
      for (index_t t = 0; t < T_; ++t) {
        if (lab[static_cast<std::size_t>(t)] == ignore_index) { CHECK(kl[t] == 0); continue; }
        long double mx = -1e300L, mr = -1e300L;
        for (index_t v = 0; v < V; ++v) { mx = std::max<long double>(mx, xs[t * V + v]); mr = std::max<long double>(mr, rs[t * V + v]); }
        long double sx = 0, sr = 0;
        for (index_t v = 0; v < V; ++v) { sx += std::exp(xs[t * V + v] - mx); sr += std::exp(rs[t * V + v] - mr); }
        const long double lx = mx + std::log(sx), lr = mr + std::log(sr);
        long double ref = 0;
        for (index_t v = 0; v < V; ++v) {
          const long double pr = std::exp(rs[t * V + v] - lr);
          ref += pr * ((rs[t * V + v] - lr) - (xs[t * V + v] - lx));
        }
        INFO("offset " << offset << " scale " << scale << " row " << t);
        CHECK(std::isfinite(kl[t]));
        CHECK(std::abs(kl[t] - static_cast<double>(ref)) <= 1e-9 * (1 + std::abs(static_cast<double>(ref))));
      }
    }
  }
}

TEST_CASE("retain_kl: float and bfloat16 storage agree with double", "[loss][kl]") {
  batch<double> bd;
  batch<float> bf;
  batch<bfloat16> bb;
  const double kd = eval(loss::retain_kl{}, bd);
  const float kf = loss::retain_kl{}.evaluate(exec::host, bf.in(), loss::grads<float>{}, 1.0f);
  const float kb = loss::retain_kl{}.evaluate(exec::host, bb.in(), loss::grads<bfloat16>{}, 1.0f);
  CHECK(kf == Approx(kd).epsilon(1e-5));
  CHECK(kb == Approx(kd).epsilon(0.05));  // logits quantized to 8 bits of mantissa
  // same values for NPO in float
  CHECK(loss::npo{}.evaluate(exec::host, bf.in(), loss::grads<float>{}, 1.0f) ==
        Approx(eval(loss::npo{}, bd)).epsilon(1e-5));
}

// ---- finite differences ------------------------------------------------------------------------

TEST_CASE("every loss: finite-difference gradients in double through the objective", "[loss][fd]") {
  using namespace grun::loss;
  fd_check_objective(objective<ga, retain_nll, gate_bce>{.w_retain = 1.5, .w_gate = 10});
  fd_check_objective(objective<ga, retain_nll, gate_bce>{.forget = {.reduction = nll_reduction::sequence_mean},
                                                         .retain = {.reduction = nll_reduction::sequence_mean}});
  fd_check_objective(objective<npo, retain_kl, gate_bce_logits>{.w_retain = 2, .w_gate = 3});
  fd_check_objective(objective<simnpo, rmu_retain, gate_bce>{.forget = {.beta = 0.7, .gamma = 0.2}});
  fd_check_objective(objective<idk, retain_nll, gate_bce>{});
  fd_check_objective(objective<dpo, retain_kl, none>{.forget = {.beta = 0.3}});
  fd_check_objective(objective<rmu, rmu_retain, gate_bce>{.forget = {.c = 6.5}, .w_gate = 100});
  // During warm-up the forget gradient is scaled too.
  fd_check_objective(objective<npo, retain_nll, gate_bce>{.warmup_steps = 8}, 3);
}

TEST_CASE("objective: terms, weights and warm-up", "[loss][objective]") {
  using obj_t = loss::objective<loss::npo, loss::retain_nll, loss::gate_bce>;
  static_assert(obj_t::forget_policy::needs.reference && !obj_t::retain_policy::needs.reference);
  static_assert(obj_t::gate_policy::needs.gates);
  static_assert(std::is_same_v<loss::grad_diff<>, loss::objective<loss::ga, loss::retain_nll, loss::gate_bce>>);
  obj_t obj{.w_retain = 2, .w_gate = 10, .warmup_steps = 4};
  CHECK(obj.warmup(0) == 0);
  CHECK(obj.warmup(1) == 0.25);
  CHECK(obj.warmup(4) == 1);
  CHECK(obj.warmup(400) == 1);
  batch<double> b;
  const double f = eval(loss::npo{}, b), r = eval(loss::retain_nll{}, b), gt = eval(loss::gate_bce{}, b);
  auto t = obj.value(exec::host, b.in(), 2);
  CHECK(t.forget == Approx(f));
  CHECK(t.retain == Approx(r));
  CHECK(t.gate == Approx(gt));
  CHECK(t.warmup == 0.5);
  CHECK(t.total == Approx(0.5 * f + 2 * r + 10 * gt));
  // value_and_grad zeroes stale gradients first.
  std::fill(b.d_nll.begin(), b.d_nll.end(), 123.0);
  std::fill(b.d_logits.begin(), b.d_logits.end(), 5.0);
  obj.value_and_grad(exec::host, b.in(), b.g(), 2);
  CHECK(b.d_nll[1] == 0);
  CHECK(b.d_logits[0] == 0);  // retain_nll does not touch the logits
  // Warm-up step 0: no forget gradient at all.
  obj.value_and_grad(exec::host, b.in(), b.g(), 0);
  for (auto v : b.d_nll) CHECK(v == 0);
  obj.w_gate = -1;
  CHECK_THROWS_AS(obj.value(exec::host, b.in()), numeric_error);
}

TEST_CASE("objective: end to end from logits (token NLL → sequence → NPO + retain NLL)", "[loss][fd]") {
  // Forget and retain sides each: T = 8 tokens in B = 3 sequences (offsets), V = 11.
  const index_t T_ = 8, V = 11, B = 3;
  std::vector<double> xf = randv(T_ * V, -3, 3, 50), xr = randv(T_ * V, -3, 3, 51);
  std::vector<std::int64_t> yf = {ignore_index, 4, 2, ignore_index, 7, 7, 0, ignore_index};
  std::vector<std::int64_t> yr = {1, ignore_index, ignore_index, 3, 10, 9, ignore_index, 2};
  std::vector<index_t> off = {0, 3, 5, 8};
  std::vector<double> ref_nll = {2.0, 1.0, 4.0};
  vector_view<const index_t> o(off.data(), {B + 1});
  loss::objective<loss::npo, loss::retain_nll, loss::none> obj{.forget = {.beta = 0.5}};

  auto forward = [&](std::vector<double>& x, std::vector<std::int64_t>& y, buffer<double>& lse, buffer<double>& seq,
                     buffer<index_t>& cnt) {
    buffer<double> tok(T_);
    loss::token_nll_forward(exec::host, matrix_view<const double>(x.data(), {T_, V}),
                            vector_view<const std::int64_t>(y.data(), {T_}), tok.view(), lse.view());
    loss::sequence_nll(exec::host, tok.view(), vector_view<const std::int64_t>(y.data(), {T_}), o, seq.view(), cnt.view());
  };
  auto total = [&](bool grad, std::vector<double>* dxf, std::vector<double>* dxr) {
    buffer<double> lf(T_), lr(T_), sf(B), sr(B);
    buffer<index_t> cf(B), cr(B);
    forward(xf, yf, lf, sf, cf);
    forward(xr, yr, lr, sr, cr);
    loss::inputs<double> in;
    in.forget.nll = sf.view();
    in.forget.count = cf.view();
    in.forget.nll_ref = {ref_nll.data(), {B}};
    in.retain.nll = sr.view();
    in.retain.count = cr.view();
    if (!grad) return obj.value(exec::host, in).total;
    buffer<double> dsf(B), dsr(B), dtf(T_), dtr(T_);
    loss::grads<double> g;
    g.forget.nll = dsf.view();
    g.retain.nll = dsr.view();
    const double L = obj.value_and_grad(exec::host, in, g).total;
    loss::sequence_nll_backward(exec::host, o, dsf.view(), dtf.view());
    loss::sequence_nll_backward(exec::host, o, dsr.view(), dtr.view());
    loss::token_nll_backward(exec::host, matrix_view<const double>(xf.data(), {T_, V}),
                             vector_view<const std::int64_t>(yf.data(), {T_}), lf.view(), dtf.view(),
                             matrix_view<double>(dxf->data(), {T_, V}));
    loss::token_nll_backward(exec::host, matrix_view<const double>(xr.data(), {T_, V}),
                             vector_view<const std::int64_t>(yr.data(), {T_}), lr.view(), dtr.view(),
                             matrix_view<double>(dxr->data(), {T_, V}));
    return L;
  };
  std::vector<double> dxf(T_ * V), dxr(T_ * V);
  total(true, &dxf, &dxr);
  auto L = [&] { return total(false, nullptr, nullptr); };
  CHECK(fd_rel_err(xf, dxf, L) < 1e-6);
  CHECK(fd_rel_err(xr, dxr, L) < 1e-6);
  // Descending the NPO gradient raises the forget NLL.
  const double before = obj.value(exec::host, loss::inputs<double>{}).forget;  // empty → 0
  CHECK(before == 0);
  buffer<double> lf(T_), sf0(B), sf1(B);
  buffer<index_t> cf(B);
  forward(xf, yf, lf, sf0, cf);
  for (std::size_t i = 0; i < xf.size(); ++i) xf[i] -= 0.05 * dxf[i];
  forward(xf, yf, lf, sf1, cf);
  CHECK(sf1[0] + sf1[1] + sf1[2] > sf0[0] + sf0[1] + sf0[2]);
}

TEST_CASE("every loss: a batch with every label ignored gives 0 and a zero gradient", "[loss]") {
  batch<double> b;
  b.count = {0, 0, 0, 0};
  b.rcount = {0, 0, 0, 0};
  b.rt_count = {0, 0, 0, 0};
  std::fill(b.labels.begin(), b.labels.end(), ignore_index);
  auto check = [&](auto obj) {
    std::fill(b.d_nll.begin(), b.d_nll.end(), 9.0);
    std::fill(b.d_logits.begin(), b.d_logits.end(), 9.0);
    const auto t = obj.value_and_grad(exec::host, b.in(), b.g());
    CHECK(t.total == 0);
    CHECK(t.forget == 0);
    CHECK(t.retain == 0);
    for (auto v : b.d_nll) CHECK(v == 0);
    for (auto v : b.d_rnll) CHECK(v == 0);
    for (auto v : b.d_rt_nll) CHECK(v == 0);
    for (auto v : b.d_logits) CHECK(v == 0);
  };
  check(loss::objective<loss::ga, loss::retain_nll>{});
  check(loss::objective<loss::npo, loss::retain_kl>{});
  check(loss::objective<loss::simnpo, loss::retain_nll>{});
  check(loss::objective<loss::idk, loss::retain_kl>{});
  check(loss::objective<loss::dpo, loss::retain_nll>{});
  // Empty hidden / gates: 0 as well.
  loss::inputs<double> empty;
  CHECK(loss::rmu{}.evaluate(exec::host, loss::inputs<double>{.forget = {.direction = {b.u.data(), {0}}}},
                             loss::grads<double>{}, 1.0) == 0);
  CHECK(loss::rmu_retain{}.evaluate(exec::host, empty, loss::grads<double>{}, 1.0) == 0);
  CHECK(loss::gate_bce{}.evaluate(exec::host, empty, loss::grads<double>{}, 1.0) == 0);
  CHECK(loss::gate_bce_logits{}.evaluate(exec::host, empty, loss::grads<double>{}, 1.0) == 0);
}

TEST_CASE("losses: bad input is a clear grun::error", "[loss]") {
  batch<double> b;
  auto in = b.in();
  in.forget.nll_ref = {};
  CHECK_THROWS_WITH(loss::npo{}.evaluate(exec::host, in, loss::grads<double>{}, 1.0),
                    Catch::Contains("npo") && Catch::Contains("forget.nll_ref") && Catch::Contains("expected extent 4"));
  in = b.in();
  in.forget.count = {b.count.data(), {3}};
  CHECK_THROWS_AS(loss::ga{}.evaluate(exec::host, in, loss::grads<double>{}, 1.0), shape_error);
  b.count[2] = -1;
  CHECK_THROWS_WITH(loss::simnpo{}.evaluate(exec::host, b.in(), loss::grads<double>{}, 1.0),
                    Catch::Contains("forget.count[2]"));
  b.count[2] = 2;
  CHECK_THROWS_AS(loss::npo{.beta = 0}.evaluate(exec::host, b.in(), loss::grads<double>{}, 1.0), numeric_error);
  CHECK_THROWS_AS(loss::dpo{.beta = -1}.evaluate(exec::host, b.in(), loss::grads<double>{}, 1.0), numeric_error);
  in = b.in();
  in.forget.direction = {b.u.data(), {4}};
  CHECK_THROWS_WITH(loss::rmu{}.evaluate(exec::host, in, loss::grads<double>{}, 1.0), Catch::Contains("direction"));
  in = b.in();
  in.retain.logits_ref = {b.logits_ref.data(), {6, 6}};
  CHECK_THROWS_WITH(loss::retain_kl{}.evaluate(exec::host, in, loss::grads<double>{}, 1.0),
                    Catch::Contains("logits_ref") && Catch::Contains("[6, 7]"));
  auto g = b.g();
  g.forget.nll = {b.d_nll.data(), {2}};
  CHECK_THROWS_WITH(loss::ga{}.evaluate(exec::host, b.in(), g, 1.0), Catch::Contains("gradient forget.nll"));
  g = b.g();
  g.retain.hidden = {b.d_hr.data(), {5, 3}};
  CHECK_THROWS_AS(loss::rmu_retain{}.evaluate(exec::host, b.in(), g, 1.0), shape_error);
  // Which of DPO's two length fields is malformed, and how many entries are.
  b.rcount[1] = -4;
  b.rcount[3] = -1;
  CHECK_THROWS_WITH(loss::dpo{}.evaluate(exec::host, b.in(), loss::grads<double>{}, 1.0),
                    Catch::Contains("loss::dpo: forget.refusal_count[1]") && Catch::Contains("2 malformed entries"));
}

TEST_CASE("losses: inputs tagged cuda_space on exec::host are a shape_error, not a read of device memory", "[loss]") {
  // Views in cuda_space are never dereferenced on the host: the executor's memory space is checked first.
  loss::inputs<float, cuda_space> in;
  in.forget.nll = {nullptr, {3}};
  in.forget.count = {nullptr, {3}};
  CHECK_THROWS_WITH(loss::ga{}.evaluate(exec::host, in, loss::grads<float, cuda_space>{}, 1.f),
                    Catch::Contains("loss::ga: inputs are in cuda memory") && Catch::Contains("exec::host"));
  CHECK_THROWS_AS(loss::rmu_retain{}.evaluate(exec::host, in, loss::grads<float, cuda_space>{}, 1.f), shape_error);
  CHECK_THROWS_AS(loss::retain_kl{}.evaluate(exec::host, in, loss::grads<float, cuda_space>{}, 1.f), shape_error);
}

TEST_CASE("retain_kl: results do not depend on the thread count", "[loss][kl]") {
  const index_t T_ = 40, V = 5000;
  auto xs = randv(T_ * V, -5, 5, 1), rs = randv(T_ * V, -5, 5, 2);
  std::vector<float> x(xs.begin(), xs.end()), r(rs.begin(), rs.end()), d1(T_ * V), d4(T_ * V);
  std::vector<std::int64_t> y(T_, 3);
  y[7] = ignore_index;
  loss::inputs<float> in;
  in.retain.logits = {x.data(), {T_, V}};
  in.retain.logits_ref = {r.data(), {T_, V}};
  in.retain.labels = {y.data(), {T_}};
  loss::grads<float> g1, g4;
  g1.retain.logits = {d1.data(), {T_, V}};
  g4.retain.logits = {d4.data(), {T_, V}};
  const float a = loss::retain_kl{}.evaluate(exec::host, in, g1, 1.0f);
  const float c = loss::retain_kl{}.evaluate(exec::host(4), in, g4, 1.0f);
  CHECK(a == c);
  CHECK(d1 == d4);
}

namespace {
/// A user-defined policy: the extension point is the concept, nothing else. Hinge on the
/// per-token forget NLL: L = mean_b max(0, τ − NLL_b/|y_b|) stops pushing once the answer is
/// unlikely enough.
struct forget_hinge {
  static constexpr const char* name = "forget_hinge";
  static constexpr loss::loss_role slot = loss::loss_role::forget;
  static constexpr loss::loss_needs needs{.nll = true};  // the rest false
  double tau = 5;
  template <executor E, class T>
  acc_t<T> evaluate(const E&, const loss::inputs<T>& in, const loss::grads<T>& g, acc_t<T> w) const {
    acc_t<T> s = 0;
    const index_t B = in.forget.nll.extent(0);
    for (index_t b = 0; b < B; ++b) {
      if (in.forget.count(b) == 0) continue;
      const acc_t<T> len = static_cast<acc_t<T>>(in.forget.count(b)), m = static_cast<acc_t<T>>(tau) - in.forget.nll(b) / len;
      if (m <= 0) continue;
      s += m / static_cast<acc_t<T>>(B);
      if (!g.forget.nll.empty()) g.forget.nll(b) -= w / (len * static_cast<acc_t<T>>(B));
    }
    return s;
  }
};
static_assert(loss::loss_policy<forget_hinge>);
struct not_a_policy { static constexpr const char* name = "x"; };
static_assert(!loss::loss_policy<not_a_policy>);
/// needs must be a constant: a training loop reads it in if constexpr.
struct runtime_needs : forget_hinge {
  static inline loss::loss_needs needs{.nll = true};
};
static_assert(!loss::loss_policy<runtime_needs>);
}  // namespace

TEST_CASE("objective: a user-defined loss policy composes like a shipped one", "[loss][objective]") {
  fd_check_objective(loss::objective<forget_hinge, loss::retain_nll, loss::gate_bce>{.forget = {.tau = 8}});
  batch<double> b;
  CHECK(loss::objective<forget_hinge>{}.value(exec::host, b.in()).forget > 0);
}
