// Every unlearning loss policy and loss::objective on exec::cuda agree with exec::host: the same
// GRUN_HD per-item terms, reduced by one CUB block (sequence and gate terms), the row kernel for
// RMU's mean squared error, and the fused KL for retain_kl.
#include <grun/cuda/losses.cuh>

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "agreement.hpp"

namespace gc = grun::cuda;
namespace loss = grun::loss;
using grun::cuda_space;
using grun::host_space;
using grun::index_t;

namespace {

/// One batch, on the host and copied to the device: B sequences (some without answer tokens),
/// G_f + G_r gate values, P × d hidden states and T × V logits for the retain side.
template <class T>
struct batch {
  using A = grun::acc_t<T>;
  index_t B, Gf, Gr, P, d, Tn, V;
  // host
  grun::buffer<A> nll, nll_ref, rnll, rnll_ref, gf, gr, zf, zr, u;
  grun::buffer<index_t> count, rcount;
  grun::buffer<T> h, h0, logits, logits_ref;
  grun::buffer<std::int64_t> labels;
  // device copies
  gc::device_buffer<A> nll_d, nll_ref_d, rnll_d, rnll_ref_d, gf_d, gr_d, zf_d, zr_d, u_d;
  gc::device_buffer<index_t> count_d, rcount_d;
  gc::device_buffer<T> h_d, h0_d, logits_d, logits_ref_d;
  gc::device_buffer<std::int64_t> labels_d;

  batch(index_t b, index_t gfn, index_t grn, index_t p, index_t dd, index_t tn, index_t v, unsigned seed,
        bool device = true)
      : B(b), Gf(gfn), Gr(grn), P(p), d(dd), Tn(tn), V(v), nll(b), nll_ref(b), rnll(b), rnll_ref(b), gf(gfn), gr(grn),
        zf(gfn), zr(grn), u(dd), count(b), rcount(b), h(p * dd), h0(p * dd), logits(tn * v), logits_ref(tn * v),
        labels(tn) {
    using grun::test::fill_uniform;
    fill_uniform(nll.span(), seed + 1, 5.f, 40.f);
    fill_uniform(nll_ref.span(), seed + 2, 5.f, 40.f);
    fill_uniform(rnll.span(), seed + 3, 2.f, 20.f);
    fill_uniform(rnll_ref.span(), seed + 4, 2.f, 20.f);
    fill_uniform(gf.span(), seed + 5, 0.f, 1.f);
    fill_uniform(gr.span(), seed + 6, 0.f, 1.f);
    if (gfn > 0) gf[0] = A(0);   // saturated on the wrong side: ε clamps it
    if (grn > 0) gr[0] = A(1);
    fill_uniform(zf.span(), seed + 7, -12.f, 12.f);
    fill_uniform(zr.span(), seed + 8, -12.f, 12.f);
    u = loss::rmu_direction<A>(dd > 0 ? dd : 1, seed);
    fill_uniform(h.span(), seed + 9, -3.f, 3.f);
    fill_uniform(h0.span(), seed + 10, -3.f, 3.f);
    fill_uniform(logits.span(), seed + 11, -6.f, 6.f);
    fill_uniform(logits_ref.span(), seed + 12, -6.f, 6.f);
    std::mt19937 gen(seed);
    for (index_t i = 0; i < b; ++i) {
      count[i] = (i % 5 == 3) ? 0 : index_t(1 + gen() % 30);   // some sequences without answers
      rcount[i] = (i % 7 == 4) ? 0 : index_t(1 + gen() % 8);
    }
    for (index_t t = 0; t < tn; ++t) labels[t] = (t % 4 == 1) ? loss::ignore_index : std::int64_t(gen() % v);
    if (!device || !gc::device_available()) return;
    nll_d = gc::device_buffer<A>(nll.span()); nll_ref_d = gc::device_buffer<A>(nll_ref.span());
    rnll_d = gc::device_buffer<A>(rnll.span()); rnll_ref_d = gc::device_buffer<A>(rnll_ref.span());
    gf_d = gc::device_buffer<A>(gf.span()); gr_d = gc::device_buffer<A>(gr.span());
    zf_d = gc::device_buffer<A>(zf.span()); zr_d = gc::device_buffer<A>(zr.span());
    u_d = gc::device_buffer<A>(u.span());
    count_d = gc::device_buffer<index_t>(count.span()); rcount_d = gc::device_buffer<index_t>(rcount.span());
    h_d = gc::device_buffer<T>(h.span()); h0_d = gc::device_buffer<T>(h0.span());
    logits_d = gc::device_buffer<T>(logits.span()); logits_ref_d = gc::device_buffer<T>(logits_ref.span());
    labels_d = gc::device_buffer<std::int64_t>(labels.span());
  }

  /// The same stored values widened to U (double): the host reference without fp32 summation
  /// error (a sequential fp32 sum over V = 8192 logits drifts ~1e-5 by itself). Host data only.
  template <class U>
  batch<U> widened() const {
    batch<U> w(B, Gf, Gr, P, d, Tn, V, 0, /*device=*/false);
    auto copy = [](const auto& from, auto& to) {
      using To = std::remove_cvref_t<decltype(to[0])>;
      for (index_t i = 0; i < from.size(); ++i) {
        if constexpr (std::is_integral_v<To>) to[i] = from[i];
        else to[i] = grun::store<To>(grun::load<double>(from[i]));
      }
    };
    copy(nll, w.nll); copy(nll_ref, w.nll_ref); copy(rnll, w.rnll); copy(rnll_ref, w.rnll_ref);
    copy(gf, w.gf); copy(gr, w.gr); copy(zf, w.zf); copy(zr, w.zr); copy(u, w.u);
    copy(count, w.count); copy(rcount, w.rcount);
    copy(h, w.h); copy(h0, w.h0); copy(logits, w.logits); copy(logits_ref, w.logits_ref); copy(labels, w.labels);
    return w;
  }

  loss::inputs<T> host_inputs() const {
    loss::inputs<T> in;
    auto& f = in.forget;
    auto& r = in.retain;
    f.nll = {nll.data(), {B}}; f.nll_ref = {nll_ref.data(), {B}}; f.count = {count.data(), {B}};
    f.refusal_nll = {rnll.data(), {B}}; f.refusal_nll_ref = {rnll_ref.data(), {B}}; f.refusal_count = {rcount.data(), {B}};
    f.hidden = {h.data(), {P, d}}; f.direction = {u.data(), {d}};
    f.gate = {gf.data(), {Gf}}; f.gate_logit = {zf.data(), {Gf}};
    r.nll = {nll_ref.data(), {B}}; r.count = {count.data(), {B}};
    r.hidden = {h.data(), {P, d}}; r.hidden_ref = {h0.data(), {P, d}};
    r.logits = {logits.data(), {Tn, V}}; r.logits_ref = {logits_ref.data(), {Tn, V}}; r.labels = {labels.data(), {Tn}};
    r.gate = {gr.data(), {Gr}}; r.gate_logit = {zr.data(), {Gr}};
    return in;
  }
  loss::inputs<T, cuda_space> device_inputs() const {
    loss::inputs<T, cuda_space> in;
    auto& f = in.forget;
    auto& r = in.retain;
    f.nll = {nll_d.data(), {B}}; f.nll_ref = {nll_ref_d.data(), {B}}; f.count = {count_d.data(), {B}};
    f.refusal_nll = {rnll_d.data(), {B}}; f.refusal_nll_ref = {rnll_ref_d.data(), {B}};
    f.refusal_count = {rcount_d.data(), {B}};
    f.hidden = {h_d.data(), {P, d}}; f.direction = {u_d.data(), {d}};
    f.gate = {gf_d.data(), {Gf}}; f.gate_logit = {zf_d.data(), {Gf}};
    r.nll = {nll_ref_d.data(), {B}}; r.count = {count_d.data(), {B}};
    r.hidden = {h_d.data(), {P, d}}; r.hidden_ref = {h0_d.data(), {P, d}};
    r.logits = {logits_d.data(), {Tn, V}}; r.logits_ref = {logits_ref_d.data(), {Tn, V}};
    r.labels = {labels_d.data(), {Tn}};
    r.gate = {gr_d.data(), {Gr}}; r.gate_logit = {zr_d.data(), {Gr}};
    return in;
  }
};

/// Gradient storage for both sides, host and device, pre-filled with the same values (policies
/// accumulate into them).
template <class T>
struct grad_set {
  using A = grun::acc_t<T>;
  grun::buffer<A> fn, frn, fg, fz, rn, rg, rz;
  grun::buffer<T> fh, rh, rl;
  gc::device_buffer<A> fn_d, frn_d, fg_d, fz_d, rn_d, rg_d, rz_d;
  gc::device_buffer<T> fh_d, rh_d, rl_d;
  const batch<T>& b;

  /// Host gradients of another grad_set's initial values, widened (no device copies).
  template <class U, class BB>
  grad_set(const grad_set<U>& o, const BB& bb)
      : fn(bb.B), frn(bb.B), fg(bb.Gf), fz(bb.Gf), rn(bb.B), rg(bb.Gr), rz(bb.Gr), fh(bb.P * bb.d), rh(bb.P * bb.d),
        rl(bb.Tn * bb.V), b(bb) {
    auto copy = [](const auto& from, auto& to) {
      using To = std::remove_cvref_t<decltype(to[0])>;
      for (index_t i = 0; i < from.size(); ++i) {
        if constexpr (std::is_integral_v<To>) to[i] = from[i];
        else to[i] = grun::store<To>(grun::load<double>(from[i]));
      }
    };
    copy(o.fn, fn); copy(o.frn, frn); copy(o.fg, fg); copy(o.fz, fz); copy(o.rn, rn); copy(o.rg, rg); copy(o.rz, rz);
    copy(o.fh, fh); copy(o.rh, rh); copy(o.rl, rl);
  }

  explicit grad_set(const batch<T>& bb)
      : fn(bb.B), frn(bb.B), fg(bb.Gf), fz(bb.Gf), rn(bb.B), rg(bb.Gr), rz(bb.Gr), fh(bb.P * bb.d), rh(bb.P * bb.d),
        rl(bb.Tn * bb.V), b(bb) {
    unsigned s = 100;
    for (auto* x : {&fn, &frn, &fg, &fz, &rn, &rg, &rz}) grun::test::fill_uniform(x->span(), ++s, -0.5f, 0.5f);
    for (auto* x : {&fh, &rh, &rl}) grun::test::fill_uniform(x->span(), ++s, -0.5f, 0.5f);
    if (!gc::device_available()) return;
    fn_d = gc::device_buffer<A>(fn.span()); frn_d = gc::device_buffer<A>(frn.span());
    fg_d = gc::device_buffer<A>(fg.span()); fz_d = gc::device_buffer<A>(fz.span());
    rn_d = gc::device_buffer<A>(rn.span()); rg_d = gc::device_buffer<A>(rg.span()); rz_d = gc::device_buffer<A>(rz.span());
    fh_d = gc::device_buffer<T>(fh.span()); rh_d = gc::device_buffer<T>(rh.span()); rl_d = gc::device_buffer<T>(rl.span());
  }
  loss::grads<T> host() {
    loss::grads<T> g;
    g.forget.nll = {fn.data(), {b.B}}; g.forget.refusal_nll = {frn.data(), {b.B}};
    g.forget.gate = {fg.data(), {b.Gf}}; g.forget.gate_logit = {fz.data(), {b.Gf}};
    g.forget.hidden = {fh.data(), {b.P, b.d}};
    g.retain.nll = {rn.data(), {b.B}}; g.retain.gate = {rg.data(), {b.Gr}}; g.retain.gate_logit = {rz.data(), {b.Gr}};
    g.retain.hidden = {rh.data(), {b.P, b.d}}; g.retain.logits = {rl.data(), {b.Tn, b.V}};
    return g;
  }
  loss::grads<T, cuda_space> device() {
    loss::grads<T, cuda_space> g;
    g.forget.nll = {fn_d.data(), {b.B}}; g.forget.refusal_nll = {frn_d.data(), {b.B}};
    g.forget.gate = {fg_d.data(), {b.Gf}}; g.forget.gate_logit = {fz_d.data(), {b.Gf}};
    g.forget.hidden = {fh_d.data(), {b.P, b.d}};
    g.retain.nll = {rn_d.data(), {b.B}}; g.retain.gate = {rg_d.data(), {b.Gr}}; g.retain.gate_logit = {rz_d.data(), {b.Gr}};
    g.retain.hidden = {rh_d.data(), {b.P, b.d}}; g.retain.logits = {rl_d.data(), {b.Tn, b.V}};
    return g;
  }
  /// Every device gradient against its host twin: accumulate-type gradients at fp32 tolerance,
  /// storage-type ones (hidden, logits) at the storage type's.
  template <class R>
  void check_agreement(const R& ref) const {
    const double acc_tol = 1e-5, store_tol = grun::test::tolerance<T>();
    CHECK(grun::test::rel_error(fn_d.to_host(), ref.fn) < acc_tol);
    CHECK(grun::test::rel_error(frn_d.to_host(), ref.frn) < acc_tol);
    CHECK(grun::test::rel_error(fg_d.to_host(), ref.fg) < acc_tol);
    CHECK(grun::test::rel_error(fz_d.to_host(), ref.fz) < acc_tol);
    CHECK(grun::test::rel_error(rn_d.to_host(), ref.rn) < acc_tol);
    CHECK(grun::test::rel_error(rg_d.to_host(), ref.rg) < acc_tol);
    CHECK(grun::test::rel_error(rz_d.to_host(), ref.rz) < acc_tol);
    CHECK(grun::test::rel_error(fh_d.to_host(), ref.fh) < store_tol);
    CHECK(grun::test::rel_error(rh_d.to_host(), ref.rh) < store_tol);
    CHECK(grun::test::rel_error(rl_d.to_host(), ref.rl) < store_tol);
  }
};

double rel(double a, double b) { return std::abs(a - b) / std::max(std::abs(b), 1e-30); }

/// evaluate on both executors, value and every gradient compared.
template <class T, class Policy>
void check_policy(const batch<T>& b, const Policy& p, double weight) {
  using A = grun::acc_t<T>;
  const auto wide = b.template widened<double>();
  grad_set<T> g(b);
  grad_set<double> ref(g, wide);
  const double vh = p.evaluate(grun::exec::host, wide.host_inputs(), ref.host(), weight);
  const A vd = p.evaluate(grun::exec::cuda, b.device_inputs(), g.device(), A(weight));
  GRUN_CUDA_CHECK(cudaDeviceSynchronize());
  INFO(Policy::name << ": host (double) " << vh << ", device " << vd);
  CHECK(rel(vd, vh) < 1e-5);
  g.check_agreement(ref);
}

template <class T>
void check_every_policy(const batch<T>& b) {
  check_policy(b, loss::ga{}, 0.7);
  check_policy(b, loss::ga{.reduction = loss::nll_reduction::sequence_mean}, 0.7);
  check_policy(b, loss::npo{.beta = 0.3}, 1.3);
  check_policy(b, loss::simnpo{.beta = 2.5, .gamma = 0.5}, 0.9);
  check_policy(b, loss::idk{}, 1.0);
  check_policy(b, loss::dpo{.beta = 0.2}, 1.1);
  check_policy(b, loss::rmu{.c = 6.5}, 2.0);
  check_policy(b, loss::retain_nll{}, 1.0);
  check_policy(b, loss::retain_kl{}, 1.7);
  check_policy(b, loss::rmu_retain{}, 0.4);
  check_policy(b, loss::gate_bce{}, 10.0);
  check_policy(b, loss::gate_bce_logits{}, 10.0);
  check_policy(b, loss::none{}, 1.0);
}

}  // namespace

TEMPLATE_TEST_CASE("cuda losses: every policy agrees with exec::host (value and gradients)", "[losses]", float,
                   grun::bfloat16, grun::half) {
  GRUN_REQUIRE_DEVICE();
  using T = TestType;
  SECTION("odd sizes") { check_every_policy(batch<T>(37, 301, 517, 33, 77, 45, 1031, 11)); }
  SECTION("more items than one block's threads, d and V multiples of the vector width") {
    check_every_policy(batch<T>(1000, 4096, 2049, 300, 4096, 64, 8192, 12));
  }
  SECTION("one of everything") { check_every_policy(batch<T>(1, 1, 1, 1, 1, 1, 1, 13)); }
  SECTION("empty batch: value 0, gradients untouched") { check_every_policy(batch<T>(0, 0, 0, 0, 5, 0, 7, 14)); }
}

TEST_CASE("cuda losses: loss::objective (zeroing included) agrees with exec::host", "[losses]") {
  GRUN_REQUIRE_DEVICE();
  using T = grun::bfloat16;
  const batch<T> b(29, 130, 211, 17, 61, 23, 517, 21);
  const auto wide = b.template widened<double>();
  auto check = [&](const auto& obj) {
    grad_set<T> g(b);
    grad_set<double> ref(g, wide);
    const auto th = obj.value_and_grad(grun::exec::host, wide.host_inputs(), ref.host(), 3);
    const auto td = obj.value_and_grad(grun::exec::cuda, b.device_inputs(), g.device(), 3);
    GRUN_CUDA_CHECK(cudaDeviceSynchronize());
    CHECK(rel(td.total, th.total) < 1e-5);
    CHECK(rel(td.forget, th.forget) < 1e-5);
    CHECK(rel(td.retain, th.retain) < 1e-5);
    CHECK(rel(td.gate, th.gate) < 1e-5);
    g.check_agreement(ref);
    const auto vd = obj.value(grun::exec::cuda, b.device_inputs(), 3);
    CHECK(rel(vd.total, th.total) < 1e-5);
  };
  check(loss::grad_diff<>{.w_retain = 1.5, .w_gate = 10, .warmup_steps = 10});
  check(loss::objective<loss::npo, loss::retain_kl, loss::gate_bce_logits>{.w_retain = 1, .w_gate = 10});
  check(loss::objective<loss::rmu, loss::rmu_retain, loss::gate_bce>{.w_retain = 2, .w_gate = 100});
}

TEST_CASE("cuda losses: zeroing a one-row gradient whose row stride is below its width", "[losses]") {
  GRUN_REQUIRE_DEVICE();
  // torch keeps any stride on a size-1 dimension (a transposed [d, 1] is [1, d] with stride 1):
  // a pitch below the width must not reach cudaMemset2D. The element after the row stays.
  const std::vector<float> ones(7, 1.f);
  grun::cuda::device_buffer<float> buf{std::span<const float>(ones)};
  const grun::matrix_view<float, grun::cuda_space> row(buf.data(), {1, 6}, {2, 1});
  grun::loss::detail::zero_impl<grun::exec::cuda_t>::run(grun::exec::cuda, row);
  const auto h = buf.to_host();
  for (int j = 0; j < 6; ++j) CHECK(h[std::size_t(j)] == 0.f);
  CHECK(h[6] == 1.f);
}

TEST_CASE("cuda losses: bitwise repeatable", "[losses]") {
  GRUN_REQUIRE_DEVICE();
  using T = float;
  const batch<T> b(777, 3000, 2500, 123, 1000, 40, 3000, 31);
  const loss::objective<loss::dpo, loss::retain_kl, loss::gate_bce> obj{.w_retain = 1, .w_gate = 10};
  grad_set<T> g1(b), g2(b);
  const auto t1 = obj.value_and_grad(grun::exec::cuda, b.device_inputs(), g1.device());
  const auto t2 = obj.value_and_grad(grun::exec::cuda, b.device_inputs(), g2.device());
  GRUN_CUDA_CHECK(cudaDeviceSynchronize());
  CHECK(std::memcmp(&t1, &t2, sizeof(t1)) == 0);
  CHECK(g1.fn_d.to_host() == g2.fn_d.to_host());
  CHECK(g1.frn_d.to_host() == g2.frn_d.to_host());
  CHECK(g1.fg_d.to_host() == g2.fg_d.to_host());
  CHECK(g1.rl_d.to_host() == g2.rl_d.to_host());
}

TEST_CASE("cuda losses: a negative answer length on the device is a shape_error naming the field and index",
          "[losses]") {
  GRUN_REQUIRE_DEVICE();
  batch<float> b(40, 3, 3, 2, 3, 2, 5, 41);
  b.count[7] = -2;
  b.count[30] = -1;
  b.count_d.copy_from_host(b.count.span());
  grun::loss::grads<float, cuda_space> none;
  CHECK_THROWS_WITH(loss::npo{}.evaluate(grun::exec::cuda, b.device_inputs(), none, 1.f),
                    Catch::Contains("loss::npo") && Catch::Contains("forget.count[7]") && Catch::Contains("2 malformed"));
  b.count[7] = 1;
  b.count[30] = 1;
  b.rcount[12] = -3;
  b.count_d.copy_from_host(b.count.span());
  b.rcount_d.copy_from_host(b.rcount.span());
  CHECK_THROWS_WITH(loss::dpo{}.evaluate(grun::exec::cuda, b.device_inputs(), none, 1.f),
                    Catch::Contains("forget.refusal_count[12]"));
}

TEST_CASE("cuda losses: host inputs on exec::cuda are a shape_error before any launch", "[nodevice][losses]") {
  const batch<float> b(6, 4, 4, 3, 8, 5, 11, 51);  // host data only when there is no device
  const auto in = b.host_inputs();
  const loss::grads<float> none;
  CHECK_THROWS_AS(loss::npo{}.evaluate(grun::exec::cuda, in, none, 1.f), grun::shape_error);
  CHECK_THROWS_WITH(loss::ga{}.evaluate(grun::exec::cuda, in, none, 1.f), Catch::Contains("host memory") && Catch::Contains("exec::cuda"));
  CHECK_THROWS_WITH(loss::gate_bce{}.evaluate(grun::exec::cuda, in, none, 1.f), Catch::Contains("host memory") && Catch::Contains("exec::cuda"));
  CHECK_THROWS_WITH(loss::rmu{}.evaluate(grun::exec::cuda, in, none, 1.f), Catch::Contains("host memory") && Catch::Contains("exec::cuda"));
  CHECK_THROWS_WITH(loss::rmu_retain{}.evaluate(grun::exec::cuda, in, none, 1.f), Catch::Contains("host memory") && Catch::Contains("exec::cuda"));
  CHECK_THROWS_WITH(loss::retain_kl{}.evaluate(grun::exec::cuda, in, none, 1.f), Catch::Contains("host memory") && Catch::Contains("exec::cuda"));
  // The objective zeroes gradients first: a host gradient view is refused there.
  grun::buffer<float> dn(b.B);
  loss::grads<float> g;
  g.forget.nll = dn.view();
  CHECK_THROWS_AS(loss::grad_diff<>{}.value_and_grad(grun::exec::cuda, in, g), grun::shape_error);
  CHECK(loss::none{}.evaluate(grun::exec::cuda, in, none, 1.f) == 0.f);
}
