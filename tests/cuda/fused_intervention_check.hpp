#pragma once
// tests/cuda/fused_intervention_check.hpp — the agreement checks of the fused intervention kernels
// (kernels/grun/cuda/intervention_fused.cuh, and the cuBLASLt mlp gate of intervention_mlp.cuh),
// shared by the test_cuda_intervention_fused*.cu files. The cases are spread over several files
// because each (policy, dtype) pair instantiates host and device kernels: one file held them all and
// took ~4.5 minutes of nvcc for sm_90 alone; split, the files compile in parallel. The pairs several
// files run are compiled once, in instances_*.cu (fused_cases.hpp).
//
// host_reference<I, T>: the setup every agreement case starts from — K modules on the host and the
// same values on the device, the inputs, and exec::host's forward and backward as the reference.
// check<I, T> below builds on it, and so does test_cuda_intervention.cu (exec::cuda's own dispatch:
// the fused kernels, or the generic path where they do not apply, double storage included).
// check<I, T>: the fused path (exec::cuda) against exec::host — forward, gates, dh, every parameter
// gradient — plus a bitwise repeat of the backward (deterministic mode).
// check_against_generic<I, T>: the fused path against the generic per-thread device path.
// check_all<I, T>: check<I, T> over the shapes that matter — d odd (scalar rows), P = 1, an empty
// position list, T = 1, unaligned row stride, in place, stacks of K modules, many slots.
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "agreement.hpp"
#include "fused_cases.hpp"  // the policies (lin_lo4, …), and the pairs compiled once in instances_*.cu

namespace grun::test::fused_case {

namespace gc = grun::cuda;


template <class I, class T>
using dparams = typename I::template params<T, cuda_space>;
template <class I, class T>
using hparams = typename I::template params<T, grun::host_space>;

template <class T>
using dview = grun::matrix_view<T, cuda_space>;
template <class T>
using cdview = grun::matrix_view<const T, cuda_space>;

template <class I, class T>
gc::device_params<dparams<I, T>> to_device(const grun::owned_params<hparams<I, T>>& host, index_t d) {
  gc::device_params<dparams<I, T>> dev(I::template shape<T, cuda_space>(d));
  GRUN_CUDA_CHECK(cudaMemcpy(dev.data(), host.data(), sizeof(T) * std::size_t(host.size()), cudaMemcpyHostToDevice));
  return dev;
}
template <class I, class T>
std::vector<T> flat(const gc::device_params<dparams<I, T>>& p) {
  std::vector<T> out(std::size_t(p.size()));
  GRUN_CUDA_CHECK(cudaMemcpy(out.data(), p.data(), sizeof(T) * out.size(), cudaMemcpyDeviceToHost));
  return out;
}

/// A device matrix [N, d] with row stride ld ≥ d (ld > d: rows not 16-byte aligned → scalar path).
template <class T>
struct strided {
  gc::device_buffer<T> buf;
  index_t N, d, ld;
  strided(index_t n, index_t dd, index_t l) : buf(std::max<index_t>(1, n * l)), N(n), d(dd), ld(l) {}
  dview<T> view() { return dview<T>(buf.data(), {N, d}, {ld, 1}); }
  void upload(const grun::host_matrix<T>& h) {
    if (N * d == 0) return;
    GRUN_CUDA_CHECK(cudaMemcpy2D(buf.data(), sizeof(T) * ld, h.storage.data(), sizeof(T) * d, sizeof(T) * d, N,
                                 cudaMemcpyHostToDevice));
  }
  grun::host_matrix<T> download() {
    grun::host_matrix<T> h(N, d);
    if (N * d == 0) return h;
    GRUN_CUDA_CHECK(cudaMemcpy2D(h.storage.data(), sizeof(T) * d, buf.data(), sizeof(T) * ld, sizeof(T) * d, N,
                                 cudaMemcpyDeviceToHost));
    return h;
  }
};

struct config {
  index_t N, d;
  std::vector<index_t> rows;  // positions
  index_t K = 1, trained = 0;
  double scale = 1.0;
  index_t pad = 0;             // row stride d + pad on the device
  bool in_place = false;       // out == h, dh == dout
  float upstream = 1.f;        // dout and dgates drawn from [-upstream, upstream) (a mean loss over many tokens: small)
};

/// How a case's parameters are drawn: module k is grun::init(…, init + k), then every leaf gets
/// N(0, 0.3) noise from mt19937(leaf.size() + spread · k) (the mlp gate's layers: scaled by fan-in, see
/// host_reference) — init keeps the gate near 0.5 and W small; spread, every path of the kernels matters.
struct seeds {
  std::uint64_t init;
  unsigned spread;
};

/// One case's setup and its exec::host reference: the K modules (host, and a device copy of the same
/// values) with the span views the impls take, the inputs h, dout, dgates (fill_uniform seeds 1, 2, 3),
/// and exec::host's forward (out, gates) and backward (dh, grads; module c.trained gets the gradients).
template <class I, class T>
struct host_reference {
  using Hp = hparams<I, T>;
  using Dp = dparams<I, T>;
  grun::positions pos;
  std::vector<grun::owned_params<Hp>> host_modules;
  std::vector<gc::device_params<Dp>> device_modules;
  std::vector<Hp> host_views;  // views into host_modules / device_modules: taken once all are built
  std::vector<Dp> device_views;
  grun::host_matrix<T> h, dout, dgates, out, dh, gates;
  grun::owned_params<Hp> grads;

  host_reference(const config& c, seeds s)
      : pos(grun::positions::rows(c.rows)), h(c.N, c.d), dout(c.N, c.d), dgates(c.K, pos.size()), out(c.N, c.d),
        dh(c.N, c.d), gates(c.K, pos.size()), grads(I::template shape<T>(c.d)) {
    for (index_t k = 0; k < c.K; ++k) {
      host_modules.emplace_back(I::template shape<T>(c.d));
      grun::init(*host_modules.back(), std::uint64_t(s.init + k));
      auto add_noise = [&](auto& leaf, float sd) {
        std::mt19937 gen(unsigned(leaf.size() + s.spread * k));
        std::normal_distribution<float> nd(0.f, sd);
        for (index_t i = 0; i < leaf.size(); ++i) leaf[i] = grun::store<T>(grun::load<float>(leaf[i]) + nd(gen));
      };
      auto& m = *host_modules.back();
      grun::for_each_param(m.reft, [&](auto& leaf) { add_noise(leaf, 0.3f); });
      if constexpr (requires { m.gate.w1; m.gate.w3; }) {
        // The mlp gate: noise 0.3 · min(1, 4 / √fan_in) per layer. A flat 0.3 puts the last
        // pre-activation at |z3| ~ 60 for d ~ 1000 (gates 1e-75 … 1): there the host's own fp32
        // result is 2e-5 off the double one (measured), so a 1e-5 agreement would test rounding, and
        // fp16 gradient leaves of a nearly closed gate (g ~ 3e-7) fall to fp16 subnormals. Scaled
        // by fan-in, gates span ~0.003 … 0.99 (both ReLU sides, saturating and open rows).
        auto& gp = m.gate;
        const index_t h1 = gp.w2.cols, h2 = gp.w3.cols;
        const auto sd = [](index_t fan_in) { return 0.3f * std::min(1.f, 4.f / std::sqrt(float(fan_in))); };
        add_noise(gp.w1, sd(c.d));
        add_noise(gp.b1, sd(c.d));
        add_noise(gp.w2, sd(h1));
        add_noise(gp.b2, sd(h1));
        add_noise(gp.w3, sd(h2));
        add_noise(gp.b3, sd(h2));
      } else {
        grun::for_each_param(m.gate, [&](auto& leaf) { add_noise(leaf, 0.3f); });
      }
      device_modules.push_back(to_device<I, T>(host_modules.back(), c.d));
    }
    for (auto& m : host_modules) host_views.push_back(*m);
    for (auto& m : device_modules) device_views.push_back(*m);

    grun::test::fill_uniform(h.storage.span(), 1, -2.f, 2.f);
    grun::test::fill_uniform(dout.storage.span(), 2, -c.upstream, c.upstream);
    grun::test::fill_uniform(dgates.storage.span(), 3, -c.upstream, c.upstream);
    using host_impl = grun::detail::intervention_impl<grun::exec::host_t, I>;
    host_impl::forward(grun::exec::host, std::span<const Hp>(host_views), c.scale, grun::matrix_view<const T>(h.view()),
                       pos, out.view(), gates.view());
    host_impl::backward(grun::exec::host, std::span<const Hp>(host_views), c.scale, c.trained,
                        grun::matrix_view<const T>(h.view()), pos, grun::matrix_view<const T>(dout.view()),
                        grun::matrix_view<const T>(dgates.view()), dh.view(), *grads);
  }
};

/// A host matrix's stored values in double.
template <class T>
grun::host_matrix<double> widen(const grun::host_matrix<T>& a) {
  grun::host_matrix<double> w(a.rows, a.cols);
  for (index_t i = 0; i < a.rows * a.cols; ++i) w.storage[i] = grun::load<double>(a.storage[i]);
  return w;
}

/// exec::host in double on the stored values of a host_reference's modules, for inputs given in
/// double: the reference every fused result is held to. Why double: a bias gradient is one sum over P
/// rows with heavy cancellation, where the fp32 host and the device (another summation order) each
/// carry ~1e-5 of rounding, and at d = 4096 (K = 2) the fp32 host's own dh is 1.5e-5 from the double
/// one — comparing two fp32 results would test the rounding, not the kernel. Against the exact result
/// the device must hold the tolerance on its own.
template <class I>
struct wide_reference {
  using Hd = hparams<I, double>;
  std::vector<grun::owned_params<Hd>> modules;
  std::vector<Hd> views;
  grun::host_matrix<double> out, gates, dh;
  grun::owned_params<Hd> grads;

  template <class T>
  wide_reference(const host_reference<I, T>& ref, double scale, index_t trained, const grun::host_matrix<double>& h,
                 const grun::host_matrix<double>& dout, const grun::host_matrix<double>& dgates)
      : out(h.rows, h.cols), gates(dgates.rows, dgates.cols), dh(h.rows, h.cols),
        grads(I::template shape<double>(h.cols)) {
    for (const auto& m : ref.host_modules) {
      modules.emplace_back(I::template shape<double>(h.cols));
      for (index_t i = 0; i < m.size(); ++i) modules.back().data()[i] = grun::load<double>(m.data()[i]);
    }
    for (auto& m : modules) views.push_back(*m);
    using host_impl = grun::detail::intervention_impl<grun::exec::host_t, I>;
    host_impl::forward(grun::exec::host, std::span<const Hd>(views), scale, grun::matrix_view<const double>(h.view()),
                       ref.pos, out.view(), gates.view());
    host_impl::backward(grun::exec::host, std::span<const Hd>(views), scale, trained,
                        grun::matrix_view<const double>(h.view()), ref.pos,
                        grun::matrix_view<const double>(dout.view()), grun::matrix_view<const double>(dgates.view()),
                        dh.view(), *grads);
  }
};

/// A flat gradient (the device's, stored as T) against the reference's, each parameter tensor on its
/// own scale (bias gradients are sums over P rows, weights over P·d); `shaped` names the leaves.
template <class Params, class T>
void check_gradient_leaves(const Params& shaped, const std::vector<T>& got, const std::vector<double>& want,
                           double tol) {
  REQUIRE(got.size() == want.size());
  index_t off = 0;
  grun::for_each_param(shaped, [&](const auto& leaf) {
    const auto n = std::size_t(leaf.size());
    INFO("gradient leaf at offset " << off << ", " << leaf.rows << " × " << leaf.cols);
    CHECK(grun::test::rel_error(std::span<const T>(got.data() + off, n), std::span<const double>(want.data() + off, n)) <
          tol);
    off += leaf.size();
  });
}

/// Runs `run` once under each forward schedule (schedules.cuh), that schedule the default meanwhile.
template <class Run>
void under_each_forward_schedule(Run&& run) {
  namespace fd = grun::cuda::fused::detail;
  for (const auto plan : {fd::forward_schedule::stream, fd::forward_schedule::resident, fd::forward_schedule::staged,
                          fd::forward_schedule::tensor, fd::forward_schedule::tensor_apply,
                          fd::forward_schedule::tensor_pipelined}) {
    INFO("forward schedule " << int(plan));
    // Restored on the way out, a throwing check (REQUIRE, a CUDA error) included.
    struct restore {
      fd::forward_schedule before;
      ~restore() { fd::forward_plan = before; }
    } const guard{std::exchange(fd::forward_plan, plan)};
    run();
  }
}

template <class I, class T>
void check(const config& c) {
  using Dp = dparams<I, T>;
  using impl = grun::detail::intervention_impl<grun::exec::cuda_t, I>;
  static_assert(impl::fused || impl::fused_mlp, "this test is about the fused kernels");
  host_reference<I, T> ref(c, {21, 13});
  const auto& pos = ref.pos;
  const index_t N = c.N, d = c.d, K = c.K, P = pos.size();
  INFO("d = " << d << ", N = " << N << ", P = " << P << ", K = " << K << ", pad = " << c.pad << ", in place "
              << c.in_place << ", " << I::gate_type::name << " + " << I::reft_type::name << "<" << I::rank << ">");
  using cuda_impl = grun::detail::intervention_impl<grun::exec::cuda_t, I>;

  // Every result is held to exec::host in double on the same stored values (see wide_reference).
  const auto h_wide = widen(ref.h);
  const wide_reference<I> wide(ref, c.scale, c.trained, h_wide, widen(ref.dout), widen(ref.dgates));
  const auto &out_wide = wide.out, &gates_wide = wide.gates, &dh_wide = wide.dh;
  const auto& grads_wide = wide.grads;
  const auto& hvd = wide.views;

  const index_t ld = d + c.pad;
  strided<T> hd(N, d, ld), outd(N, d, ld), doutd(N, d, ld), dhd(N, d, ld);
  hd.upload(ref.h);
  doutd.upload(ref.dout);
  gc::device_matrix<T> gatesd(K, P), dgatesd(ref.dgates);
  gc::device_params<Dp> grads_d(I::template shape<T, cuda_space>(d));
  dview<T> outv = c.in_place ? hd.view() : outd.view();
  dview<T> dhv = c.in_place ? doutd.view() : dhd.view();

  // Backward first when in place (it reads h, which the in-place forward overwrites). Deterministic
  // mode (cuBLASLt without split-K for the mlp gate) so the repeats below can be compared bitwise.
  const grun::exec::cuda_t det{nullptr, true};
  cuda_impl::backward(det, std::span<const Dp>(ref.device_views), c.scale, c.trained, cdview<T>(hd.view()), pos,
                      cdview<T>(doutd.view()), cdview<T>(dgatesd.view()), dhv, *grads_d);
  GRUN_CUDA_CHECK(cudaDeviceSynchronize());
  const auto dh_d = (c.in_place ? doutd : dhd).download();
  const auto gd = flat<I, T>(grads_d);

  namespace fd = gc::fused::detail;
  const auto saved_coef = fd::coef_plan;
  const auto saved_slot = fd::slot_plan;
  // One backward (from `saved` when given) under the given schedules into fresh buffers — dh = dout
  // when in place — returning dh and the gradients.
  auto backward_with = [&](fd::coef_schedule coef, fd::slot_schedule slot, bool in_place,
                           const grun::saved_activations<T>* saved) {
    strided<T> x(N, d, ld), y(N, d, ld);
    x.upload(ref.dout);
    gc::device_params<Dp> g(I::template shape<T, cuda_space>(d));
    fd::coef_plan = coef;
    fd::slot_plan = slot;
    grun::detail::run_backward<I>(det, std::span<const Dp>(ref.device_views), c.scale, c.trained, cdview<T>(hd.view()),
                                  pos, cdview<T>(x.view()), cdview<T>(dgatesd.view()), in_place ? x.view() : y.view(),
                                  *g, saved, "test");
    fd::coef_plan = saved_coef;
    fd::slot_plan = saved_slot;
    return std::pair{(in_place ? x : y).download(), flat<I, T>(g)};
  };
  if (!c.in_place) {
    // Determinism: the same call again gives the same bits (gradients and dh), and so does the
    // coefficient kernel's other CUDA-core schedule (a tuning knob: it only reads h and dout otherwise).
    const auto other = saved_coef == fd::coef_schedule::stream ? fd::coef_schedule::resident : fd::coef_schedule::stream;
    for (const auto coef : {saved_coef, other}) {
      INFO("the backward again, coefficient schedule " << int(coef));
      const auto [dh2, g2] = backward_with(coef, saved_slot, false, nullptr);
      CHECK(std::memcmp(gd.data(), g2.data(), sizeof(T) * gd.size()) == 0);
      CHECK(std::memcmp(dh2.storage.data(), dh_d.storage.data(), sizeof(T) * std::size_t(N * d)) == 0);
    }
  }
  cuda_impl::forward(grun::exec::cuda, std::span<const Dp>(ref.device_views), c.scale, cdview<T>(hd.view()), pos, outv,
                     gatesd.view());
  GRUN_CUDA_CHECK(cudaDeviceSynchronize());
  const auto out_d = (c.in_place ? hd : outd).download();
  const double tol = grun::test::tolerance<T>();
  const auto default_plan = fd::forward_plan;
  // One forward under the given schedule into a fresh buffer — or, in place, over a fresh copy of h —
  // returning h' and the gates.
  auto forward_run = [&](fd::forward_schedule plan, bool in_place = false) {
    strided<T> o(N, d, ld);
    if (in_place) o.upload(ref.h);
    gc::device_matrix<T> g(K, P);
    fd::forward_plan = plan;
    cuda_impl::forward(grun::exec::cuda, std::span<const Dp>(ref.device_views), c.scale,
                       in_place ? cdview<T>(o.view()) : cdview<T>(hd.view()), pos, o.view(), g.view());
    fd::forward_plan = default_plan;
    return std::pair{o.download(), g.to_host()};
  };
  const auto same_bits = [&](const auto& a, const auto& b) {
    CHECK(std::memcmp(a.first.storage.data(), b.first.storage.data(), sizeof(T) * std::size_t(N * d)) == 0);
    if (P > 0) CHECK(std::memcmp(a.second.storage.data(), b.second.storage.data(), sizeof(T) * std::size_t(K * P)) == 0);
  };
  if (c.in_place) {
    // Every schedule in place (out = h: a tile's rows are read before they are overwritten, and no
    // CTA reads another's rows) gives its own out-of-place bits — the pipelined one with its next tile
    // already in flight while it writes the current one.
    hd.upload(ref.h);  // the in-place forward above overwrote h
    {
      INFO("the default schedule in place again");
      same_bits(forward_run(default_plan, true), std::pair{out_d, gatesd.to_host()});
    }
    for (const auto plan : {fd::forward_schedule::stream, fd::forward_schedule::resident, fd::forward_schedule::staged,
                            fd::forward_schedule::tensor, fd::forward_schedule::tensor_apply,
                            fd::forward_schedule::tensor_pipelined}) {
      INFO("forward schedule " << int(plan) << " in place against out of place");
      same_bits(forward_run(plan, true), forward_run(plan));
    }
  } else {
    // The forward kernel's schedule is a tuning knob. stream, resident and staged only change how a
    // tile's rows are read: the same bits. tensor sums in another order: held to the host like the
    // default. Each of them repeats its own bits.
    {
      INFO("the default schedule again");
      same_bits(forward_run(default_plan), std::pair{out_d, gatesd.to_host()});
    }
    const auto streamed = forward_run(fd::forward_schedule::stream);
    CHECK(grun::test::rel_error(streamed.first.storage.span(), out_wide.storage.span()) < tol);
    if (P > 0) CHECK(grun::test::rel_error(streamed.second.storage.span(), gates_wide.storage.span()) < tol);
    for (const auto plan : {fd::forward_schedule::resident, fd::forward_schedule::staged}) {
      INFO("forward schedule " << int(plan) << " against stream");
      same_bits(forward_run(plan), streamed);
    }
    for (const auto plan : {fd::forward_schedule::tensor, fd::forward_schedule::tensor_apply}) {
      INFO("forward schedule " << int(plan) << " against the host, then again");
      const auto tensor = forward_run(plan);
      CHECK(grun::test::rel_error(tensor.first.storage.span(), out_wide.storage.span()) < tol);
      if (P > 0) CHECK(grun::test::rel_error(tensor.second.storage.span(), gates_wide.storage.span()) < tol);
      same_bits(forward_run(plan), tensor);
    }
    {
      // tensor_pipelined reads the tile from shared memory (cp.async, double-buffered) into the tensor
      // schedule's fragments and writes h' in its FMA order: its bits (other calls run tensor).
      INFO("forward schedule tensor_pipelined against tensor");
      same_bits(forward_run(fd::forward_schedule::tensor_pipelined), forward_run(fd::forward_schedule::tensor));
    }
  }

  CHECK(grun::test::rel_error(out_d.storage.span(), out_wide.storage.span()) < tol);
  if (P > 0) CHECK(grun::test::rel_error(gatesd.to_host().storage.span(), gates_wide.storage.span()) < tol);
  const std::vector<double> gh(grads_wide.data(), grads_wide.data() + grads_wide.size());
  auto check_gradients = [&](const std::vector<T>& g) {
    if (P == 0) {
      for (const T& x : g) CHECK(grun::load<float>(x) == 0.f);
      return;
    }
    check_gradient_leaves(*ref.grads, g, gh, tol);
  };
  CHECK(grun::test::rel_error(dh_d.storage.span(), dh_wide.storage.span()) < tol);
  check_gradients(gd);
  if (!c.in_place) {
    // At most 3 slots (slot_limit, a tuning knob of the CUDA-core slot kernel): runs of ⌈P/3⌉
    // positions (at least 16) that need not be whole groups of the kernel's 4 rows, added in another
    // order by the slot sums — held to the host; dh is formed row by row, the same bits.
    const auto saved_limit = fd::slot_limit;
    fd::slot_limit = 3;
    const auto [dh3, g3] = backward_with(saved_coef, fd::slot_schedule::cuda_cores, false, nullptr);
    fd::slot_limit = saved_limit;
    INFO("at most 3 slots");
    CHECK(grun::test::rel_error(dh3.storage.span(), dh_wide.storage.span()) < tol);
    if (saved_slot == fd::slot_schedule::cuda_cores)
      CHECK(std::memcmp(dh3.storage.data(), dh_d.storage.data(), sizeof(T) * std::size_t(N * d)) == 0);
    check_gradients(g3);
  }

  // The tensor-core schedules of the backward's two kernels (tuning knobs; other calls run the
  // defaults): the coefficient kernel's takes 16-bit storage, 2r+1 ≤ 32, one module; the slot
  // kernel's bf16, r ≤ 16, one module trained; both need 16-byte vector rows. Each, alone and
  // together: another summation order, held to the host like the default, and the same bits again,
  // in place (dh = dout).
  if (c.in_place) hd.upload(ref.h);  // the in-place forward above overwrote h
  if (K == 1) {
    constexpr int r = int(I::rank);
    auto run = [&](fd::coef_schedule coef, fd::slot_schedule slot, bool in_place) {
      return backward_with(coef, slot, in_place, nullptr);
    };
    const bool coef_tensor = fd::tensor_takes<T, r>, slot_tensor = fd::slot_tensor_takes<T, r> && c.trained == 0;
    const std::pair<fd::coef_schedule, fd::slot_schedule> plans[] = {
        {fd::coef_schedule::tensor, saved_slot}, {saved_coef, fd::slot_schedule::tensor},
        {fd::coef_schedule::tensor, fd::slot_schedule::tensor}};
    for (const auto& [coef, slot] : plans) {
      if ((coef == fd::coef_schedule::tensor && !coef_tensor) || (slot == fd::slot_schedule::tensor && !slot_tensor))
        continue;
      INFO("coefficient schedule " << int(coef) << ", slot schedule " << int(slot));
      const auto [dh_t, g_t] = run(coef, slot, false);
      CHECK(grun::test::rel_error(dh_t.storage.span(), dh_wide.storage.span()) < tol);
      check_gradients(g_t);
      const auto [dh2, g2] = run(coef, slot, true);
      CHECK(std::memcmp(dh2.storage.data(), dh_t.storage.data(), sizeof(T) * std::size_t(N * d)) == 0);
      CHECK(std::memcmp(g2.data(), g_t.data(), sizeof(T) * g_t.size()) == 0);
    }
  }

  // saved_activations: with 16-bit storage the fused forward (either kernel) keeps e = D h + b −
  // [lo] U h and z = c + w·h of every position and module in device memory, and the backward reads
  // dout only for its coefficients.
  // What it keeps is held to e and z from the double host parameters; the forward's output is the
  // default forward's, bit for bit; the backward, under each coefficient schedule that takes the call,
  // is held to the host like every path and repeats its bits (in place too).
  {
    constexpr int r = int(I::rank);
    constexpr bool LO = gc::fused::reft_kind<typename I::reft_type>::value == 1;
    constexpr bool gated = gc::fused::gate_kind<typename I::gate_type>::value == 1;
    grun::saved_activations<T> saved;
    strided<T> o(N, d, ld);
    gc::device_matrix<T> gk(K, P);
    grun::detail::run_forward<I>(grun::exec::cuda, std::span<const Dp>(ref.device_views), c.scale, cdview<T>(hd.view()),
                                 pos, o.view(), gk.view(), &saved);
    GRUN_CUDA_CHECK(cudaDeviceSynchronize());
    const bool keeps = impl::template may_save<T>(d) && P > 0;
    INFO("saved activations (kept: " << keeps << ")");
    REQUIRE(saved.filled());
    index_t width = r + 1;  // e and z; the mlp gate's activations and logit too
    if constexpr (impl::fused_mlp) {
      using mk = gc::mlp_gate::mlp_kind<typename I::gate_type>;
      width = gc::mlp_gate::detail::kept_regions<r, mk::h1, mk::h2, float>::width;
    }
    CHECK(saved.width() == (keeps ? width : 0));
    CHECK(saved.on_device() == keeps);
    if (!c.in_place)
      CHECK(std::memcmp(o.download().storage.data(), out_d.storage.data(), sizeof(T) * std::size_t(N * d)) == 0);
    if (keeps) {
      std::vector<float> kept(std::size_t(K * P * (r + 1)));
      const float* dev = grun::detail::saved_access::use(saved, K, P, d, true, "test");
      GRUN_CUDA_CHECK(cudaMemcpy(kept.data(), dev, sizeof(float) * kept.size(), cudaMemcpyDeviceToHost));
      std::vector<double> want_e, want_z;
      std::vector<float> got_e, got_z;
      for (index_t k = 0; k < K; ++k)
        for (index_t q = 0; q < P; ++q) {
          const double* x = h_wide.storage.data() + pos[q] * d;
          const auto& m = hvd[std::size_t(k)];
          auto dot = [&](const double* a) {
            double sum = 0;
            for (index_t j = 0; j < d; ++j) sum += a[j] * x[j];
            return sum;
          };
          const float* kq = kept.data() + (k * P + q) * (r + 1);
          for (index_t i = 0; i < r; ++i) {
            want_e.push_back(dot(m.reft.weight.row(i)) + m.reft.bias.data[i] - (LO ? dot(m.reft.rotate_layer.row(i)) : 0.0));
            got_e.push_back(kq[i]);
          }
          if constexpr (gated) {
            want_z.push_back(m.gate.bias.data[0] + dot(m.gate.weight.row(0)));
            got_z.push_back(kq[r]);
          }
        }
      CHECK(grun::test::rel_error(got_e, want_e) < tol);
      if (gated) CHECK(grun::test::rel_error(got_z, want_z) < tol);
      // The pipelined forward keeps the tensor schedule's bits too (and writes its h' and gates).
      auto keeping = [&](fd::forward_schedule plan) {
        grun::saved_activations<T> s;
        strided<T> y(N, d, ld);
        gc::device_matrix<T> gy(K, P);
        const auto before = fd::forward_plan;
        fd::forward_plan = plan;
        grun::detail::run_forward<I>(grun::exec::cuda, std::span<const Dp>(ref.device_views), c.scale,
                                     cdview<T>(hd.view()), pos, y.view(), gy.view(), &s);
        fd::forward_plan = before;
        std::vector<float> values(std::size_t(s.bytes() / sizeof(float)));
        GRUN_CUDA_CHECK(cudaMemcpy(values.data(), grun::detail::saved_access::use(s, K, P, d, true, "test"), s.bytes(),
                                   cudaMemcpyDeviceToHost));
        return std::tuple{y.download(), gy.to_host(), values};
      };
      if (!c.in_place) {
        INFO("kept values, tensor_pipelined against tensor");
        const auto [y1, g1, v1] = keeping(fd::forward_schedule::tensor);
        const auto [y2, g2, v2] = keeping(fd::forward_schedule::tensor_pipelined);
        CHECK(std::memcmp(y1.storage.data(), y2.storage.data(), sizeof(T) * std::size_t(N * d)) == 0);
        CHECK(std::memcmp(g1.storage.data(), g2.storage.data(), sizeof(T) * std::size_t(K * P)) == 0);
        REQUIRE(v1.size() == v2.size());
        CHECK(std::memcmp(v1.data(), v2.data(), sizeof(float) * v1.size()) == 0);
      }
    }
    auto run = [&](fd::coef_schedule coef, bool in_place) { return backward_with(coef, saved_slot, in_place, &saved); };
    // The default schedule: against the host, then again in place. Nothing kept (fp32, the mlp gate):
    // the recomputing backward, checked above already — once is enough here.
    const auto [dh_k, g_k] = run(saved_coef, false);
    CHECK(grun::test::rel_error(dh_k.storage.span(), dh_wide.storage.span()) < tol);
    check_gradients(g_k);
    if (!keeps) return;
    {
      const auto [dh2, g2] = run(saved_coef, true);
      CHECK(std::memcmp(dh2.storage.data(), dh_k.storage.data(), sizeof(T) * std::size_t(N * d)) == 0);
      CHECK(std::memcmp(g2.data(), g_k.data(), sizeof(T) * g_k.size()) == 0);
    }
    {
      // The other CUDA-core schedule only reads dout differently: the same bits.
      const auto other = saved_coef == fd::coef_schedule::stream ? fd::coef_schedule::resident : fd::coef_schedule::stream;
      const auto [dh2, g2] = run(other, false);
      CHECK(std::memcmp(dh2.storage.data(), dh_k.storage.data(), sizeof(T) * std::size_t(N * d)) == 0);
      CHECK(std::memcmp(g2.data(), g_k.data(), sizeof(T) * g_k.size()) == 0);
    }
    if (fd::tensor_takes<T, r> && K == 1) {
      INFO("backward from the kept values, coefficient kernel on tensor cores");
      const auto [dh_t, g_t] = run(fd::coef_schedule::tensor, false);
      CHECK(grun::test::rel_error(dh_t.storage.span(), dh_wide.storage.span()) < tol);
      check_gradients(g_t);
      const auto [dh2, g2] = run(fd::coef_schedule::tensor, true);
      CHECK(std::memcmp(dh2.storage.data(), dh_t.storage.data(), sizeof(T) * std::size_t(N * d)) == 0);
      CHECK(std::memcmp(g2.data(), g_t.data(), sizeof(T) * g_t.size()) == 0);
    }
    // The backward really reads them: with the kept values zeroed (e = 0, z = 0) it gives others.
    float* dev = const_cast<float*>(grun::detail::saved_access::use(saved, K, P, d, true, "test"));
    GRUN_CUDA_CHECK(cudaMemset(dev, 0, saved.bytes()));
    const auto [dh0, g0] = run(saved_coef, false);
    CHECK(std::memcmp(g0.data(), g_k.data(), sizeof(T) * g_k.size()) != 0);
  }
}

/// The fused path against the generic device path (same device, same inputs).
template <class I, class T>
void check_against_generic(index_t N, index_t d, std::vector<index_t> rows) {
  using Hp = hparams<I, T>;
  using Dp = dparams<I, T>;
  const auto pos = grun::positions::rows(rows);
  const index_t P = pos.size();
  grun::owned_params<Hp> hp(I::template shape<T>(d));
  grun::init(*hp, 7);
  auto dp = to_device<I, T>(hp, d);
  const Dp one[1] = {*dp};
  grun::host_matrix<T> h(N, d), dout(N, d);
  grun::test::fill_uniform(h.storage.span(), 4, -2.f, 2.f);
  grun::test::fill_uniform(dout.storage.span(), 5);
  gc::device_matrix<T> hd(h), doutd(dout), o1(N, d), o2(N, d), g1(1, P), g2(1, P), dh1(N, d), dh2(N, d);
  gc::device_params<Dp> gr1(I::template shape<T, cuda_space>(d)), gr2(I::template shape<T, cuda_space>(d));
  using cuda_impl = grun::detail::intervention_impl<grun::exec::cuda_t, I>;
  const cdview<T> none(nullptr, {0, 0});
  cuda_impl::forward(grun::exec::cuda, std::span<const Dp>(one), 1.0, cdview<T>(hd.view()), pos, o1.view(), g1.view());
  cuda_impl::template generic_forward<T, cuda_space>(grun::exec::cuda, std::span<const Dp>(one), 1.0, cdview<T>(hd.view()),
                                                     pos, o2.view(), g2.view());
  cuda_impl::backward(grun::exec::cuda, std::span<const Dp>(one), 1.0, 0, cdview<T>(hd.view()), pos,
                      cdview<T>(doutd.view()), none, dh1.view(), *gr1);
  cuda_impl::template generic_backward<T, cuda_space>(grun::exec::cuda, std::span<const Dp>(one), 1.0, 0,
                                                      cdview<T>(hd.view()), pos, cdview<T>(doutd.view()), none,
                                                      dh2.view(), *gr2);
  GRUN_CUDA_CHECK(cudaDeviceSynchronize());
  const double tol = grun::test::tolerance<T>();
  CHECK(grun::test::rel_error(o1.to_host().storage.span(), o2.to_host().storage.span()) < tol);
  CHECK(grun::test::rel_error(g1.to_host().storage.span(), g2.to_host().storage.span()) < tol);
  CHECK(grun::test::rel_error(dh1.to_host().storage.span(), dh2.to_host().storage.span()) < tol);
  const auto a = flat<I, T>(gr1), b = flat<I, T>(gr2);
  CHECK(grun::test::rel_error(std::span<const T>(a), std::span<const T>(b)) < tol);
}

inline std::vector<index_t> iota(index_t n) {
  std::vector<index_t> v(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) v[std::size_t(i)] = i;
  return v;
}

/// n positions first, first − 1, …: a list out of order.
inline std::vector<index_t> reversed(index_t n, index_t first) {
  std::vector<index_t> v(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) v[std::size_t(i)] = first - i;
  return v;
}

template <class I, class T>
void check_all() {
  check<I, T>({5, 37, {3}});                                         // d odd (scalar rows), P = 1
  check<I, T>({40, 64, {0, 5, 9, 17, 39, 21}});                      // vector rows, a position list
  check<I, T>({12, 33, {}});                                         // empty position list
  check<I, T>({1, 48, {0}});                                         // T = 1, every row selected
  check<I, T>({33, 40, {1, 2, 3, 4, 5, 6, 7, 8, 30}, 1, 0, 1.0, 3}); // row stride not 16-byte aligned
  // In place, 17 positions out of order: 3 tiles of 8 (the persistent forwards walk more than one).
  check<I, T>({40, 72, {39, 0, 7, 8, 21, 22, 23, 5, 30, 31, 12, 2, 17, 18, 36, 3, 1}, 1, 0, 1.0, 0, true});
  check<I, T>({70, 96, iota(70), 3, 1, 0.6 * 3 + 0.6});              // stack of K = 3, every row, train the middle
  check<I, T>({600, 1001, iota(600)});                               // d odd, many slots (P/16 = 38)
  // A position list in reverse order over several slots (the tensor slot schedule's: 64 positions,
  // the last one partial), d = 264: a column group and a warp's strip of 32 columns partly past d.
  // 197 positions: the last tile of 8 partial too (the pipelined forward's buffers refilled 24 times).
  check<I, T>({230, 264, reversed(197, 229)});
  check<I, T>({300, 1024, {299, 5, 17, 42, 128, 256, 3, 4, 6, 8}, 2, 0, 0.9});  // K = 2 (parameters re-read)
  // K = 9: more modules than travel by value in a launch (fused::detail::tensor_max_modules = 8):
  // their sources go host → device for the packing, and the forward takes a CUDA-core schedule.
  check<I, T>({24, 40, {23, 1, 2, 3, 5, 8, 13, 21}, 9, 8, 0.25});
  // Wide rows: the resident forward at 2 (bf16/fp16) or 4 (fp32) vectors per thread and row, and
  // at 4 (16-bit) beside fp32's streaming fallback; a partial last tile; a stack.
  check<I, T>({13, 2048, iota(13)});
  check<I, T>({9, 4096, {8, 1, 2, 3, 4, 5, 0}, 2, 1, 0.8});
}

}  // namespace grun::test::fused_case
