#pragma once
// examples/device_loop/train.hpp — one GRUN training loop, written once, run on either executor.
//
// The toy task: N hidden states of size d (noise 0.1 per entry); the first half ("forget") carry a planted feature f
// (h += 3f), the second half ("retain") do not. A gated LoReFT (linear gate, rank 4) intervenes on
// every row and is trained with
//   L = rmu(forget outputs → c·u) + rmu_retain(retain outputs → h) + w_gate · gate_bce
// so the gate must learn to fire on f, and the ReFT to steer forget rows toward c·u while
// leaving retain rows alone — GRUN's recipe in miniature. Every step is
//   forward (intervention) → objective.value_and_grad → backward → AdamW + QR retraction of R,
// all on the backend's executor; the host backend (host.cpp) and the CUDA backend (device.cu)
// differ only in where buffers live and which optimizer class owns the moments.
#include <grun/grun.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace device_loop {

using unlearner = grun::gated_intervention<grun::gate::linear, grun::reft::loreft<4>>;
using objective = grun::loss::objective<grun::loss::rmu, grun::loss::rmu_retain, grun::loss::gate_bce>;
using grun::index_t;

struct problem {
  index_t n_forget = 256, n_retain = 256, d = 256;
  int steps = 200;
  double lr = 3e-2;
  grun::host_matrix<float> h;       // [N, d]
  grun::buffer<float> u;            // RMU direction [d]
  grun::owned_params<unlearner::params<float>> init;

  explicit problem(std::uint64_t seed = 7) : h(n_forget + n_retain, d), u(grun::loss::rmu_direction<float>(d, seed + 1)),
                                              init(unlearner::shape<float>(d)) {
    std::mt19937 gen(static_cast<unsigned>(seed));
    std::normal_distribution<float> normal(0.f, 1.f);
    std::vector<float> f(static_cast<std::size_t>(d));
    float norm = 0;
    for (auto& x : f) { x = normal(gen); norm += x * x; }
    for (auto& x : f) x /= std::sqrt(norm);
    for (index_t i = 0; i < h.rows; ++i)
      for (index_t j = 0; j < d; ++j) h(i, j) = 0.1f * normal(gen) + (i < n_forget ? 3.f * f[std::size_t(j)] : 0.f);
    grun::init(*init, seed + 2);
  }
  index_t rows() const { return n_forget + n_retain; }
};

struct step_log {
  int step;
  double total, forget, retain, gate, gate_forget, gate_retain;
};

/// Trains on `be`; returns the log of every step (gate means taken before the step's update).
template <class Backend>
std::vector<step_log> train(Backend& be, const problem& pb) {
  using S = typename Backend::space;
  using params = unlearner::params<float, S>;
  const index_t N = pb.rows(), d = pb.d, nf = pb.n_forget, nr = pb.n_retain;
  const auto pos = grun::positions::all(N);

  auto h = be.upload(pb.h.storage, N, d);
  auto out = be.zeros(N, d), dout = be.zeros(N, d), dh = be.zeros(N, d);
  auto gates = be.zeros(1, N), dgates = be.zeros(1, N);
  auto u = be.upload(pb.u, 1, d);
  auto p = be.template upload_params<params>(pb.init, d);
  auto g = be.template zero_params<params>(d);
  auto opt = be.template optimizer<params>(*p, grun::optim::adamw_options{.lr = pb.lr, .weight_decay = 0.0});

  const grun::tensor_view<const float, 2, S> hv(h.data(), {N, d});
  const grun::tensor_view<float, 2, S> outv(out.data(), {N, d}), doutv(dout.data(), {N, d}), dhv(dh.data(), {N, d});
  const grun::tensor_view<float, 1, S> gatesv(gates.data(), {N}), dgatesv(dgates.data(), {N});
  auto rows = [&](auto* base, index_t first, index_t count) {
    return grun::tensor_view<std::remove_pointer_t<decltype(base)>, 2, S>(base + first * d, {count, d});
  };

  grun::loss::inputs<float, S> in;
  in.forget.hidden = rows(static_cast<const float*>(out.data()), 0, nf);
  in.forget.direction = {u.data(), {d}};
  in.forget.gate = {gates.data(), {nf}};
  in.retain.hidden = rows(static_cast<const float*>(out.data()), nf, nr);
  in.retain.hidden_ref = rows(static_cast<const float*>(h.data()), nf, nr);
  in.retain.gate = {gates.data() + nf, {nr}};
  grun::loss::grads<float, S> grads;
  grads.forget.hidden = rows(dout.data(), 0, nf);
  grads.forget.gate = {dgates.data(), {nf}};
  grads.retain.hidden = rows(dout.data(), nf, nr);
  grads.retain.gate = {dgates.data() + nf, {nr}};

  const objective obj{.forget = {.c = 4.0}, .w_retain = 1.0, .w_gate = 1.0};
  std::vector<step_log> log;
  for (int step = 0; step < pb.steps; ++step) {
    unlearner::forward(be.ex, *p, hv, pos, outv, gatesv);
    const auto t = obj.value_and_grad(be.ex, in, grads, step);
    const auto gh = be.download(gates, N);
    double gf = 0, gr = 0;
    for (index_t i = 0; i < nf; ++i) gf += gh[std::size_t(i)] / double(nf);
    for (index_t i = nf; i < N; ++i) gr += gh[std::size_t(i)] / double(nr);
    log.push_back({step, t.total, t.forget, t.retain, t.gate, gf, gr});
    unlearner::backward(be.ex, *p, hv, pos, grun::tensor_view<const float, 2, S>(doutv),
                        grun::tensor_view<const float, 1, S>(dgatesv), dhv, *g);
    be.step(opt, *p, *g);
  }
  return log;
}

/// exec::host storage for train(): buffers in host memory, optim::adamw.
struct host_backend {
  using space = grun::host_space;
  grun::exec::host_t ex = grun::exec::host;

  grun::buffer<float> upload(const grun::buffer<float>& x, index_t, index_t) { return x; }
  grun::buffer<float> zeros(index_t r, index_t c) { return grun::buffer<float>(r * c); }
  std::vector<float> download(const grun::buffer<float>& x, index_t n) { return {x.data(), x.data() + n}; }
  template <class P>
  grun::owned_params<P> upload_params(const grun::owned_params<P>& init, index_t) { return init; }
  template <class P>
  grun::owned_params<P> zero_params(index_t d) { return grun::owned_params<P>(unlearner::shape<float>(d)); }
  template <class P>
  grun::optim::adamw<P> optimizer(const P& shape, grun::optim::adamw_options o) { return grun::optim::adamw<P>(shape, o); }
  template <class O, class P>
  void step(O& opt, const P& p, const P& g) { opt.step(p, g); }
};

/// Prints the log every `every` steps and judges it: the loss fell by half, and the gate separates
/// forget from retain rows (mean gate ≥ 0.9 on forget, ≤ 0.1 on retain).
inline bool report(const char* backend, const std::vector<step_log>& log, int every = 25) {
  std::printf("%s: step  total     rmu       retain    gate_bce  gate(forget) gate(retain)\n", backend);
  for (const auto& s : log)
    if (s.step % every == 0 || s.step + 1 == int(log.size()))
      std::printf("%s: %4d  %-9.4f %-9.4f %-9.4f %-9.4f %-12.4f %.4f\n", backend, s.step, s.total, s.forget, s.retain,
                  s.gate, s.gate_forget, s.gate_retain);
  const auto& a = log.front();
  const auto& b = log.back();
  const bool ok = std::isfinite(b.total) && b.total < 0.5 * a.total && b.gate_forget >= 0.9 && b.gate_retain <= 0.1;
  std::printf("%s: %s (loss %.4f -> %.4f, gates %.3f / %.3f)\n", backend, ok ? "OK" : "FAILED", a.total, b.total,
              b.gate_forget, b.gate_retain);
  return ok;
}

}  // namespace device_loop
