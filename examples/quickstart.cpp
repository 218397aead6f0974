// quickstart — grun without any framework: compose a gated intervention at compile time, run
// forward and backward on the host, take one AdamW step (which also retracts R onto orthonormal rows).
#include <grun/grun.hpp>

#include <cmath>
#include <cstdio>

int main() {
  // The paper's GRUN: an MLP gate (d → 256 → 64 → 1) in front of a rank-4 LoReFT.
  using unlearner = grun::gated_intervention<grun::gate::mlp<>, grun::reft::loreft<4>>;

  const grun::index_t tokens = 6, d = 64;
  unlearner::module<float> m(d, /*seed=*/42);  // parameters seeded, R orthonormal
  std::printf("gated LoReFT r=4, d=%lld: %lld trainable parameters\n", static_cast<long long>(d),
              static_cast<long long>(grun::parameter_count(m.parameters())));

  grun::host_matrix<float> h(tokens, d), out(tokens, d), dout(tokens, d), dh(tokens, d);
  for (grun::index_t i = 0; i < tokens * d; ++i) h.storage[i] = std::sin(0.37f * float(i));

  // Intervene on the last prompt token of two sequences of three tokens each (rows 2 and 5).
  const grun::index_t prompt_lengths[] = {3, 3};
  const auto pos = grun::positions::last_prompt_token(prompt_lengths, /*seq_len=*/3);
  grun::buffer<float> gates(pos.size());

  // A training forward keeps what its backward would otherwise recompute (the gate's hidden layers).
  grun::saved_activations<float> saved;
  m.forward(grun::exec::host, h.view(), pos, out.view(), gates.view(), saved);  // h' = h + g(h)·Δ(h)
  std::printf("gates: %.4f %.4f\n", gates[0], gates[1]);

  // Backward of L = Σ h'·dout plus a gate loss pushing both gates towards 1 (dL/dg = −1).
  for (grun::index_t i = 0; i < tokens * d; ++i) dout.storage[i] = 0.01f;
  grun::buffer<float> dgates(pos.size());
  dgates[0] = dgates[1] = -1.0f;
  m.backward(grun::exec::host, h.view(), pos, dout.view(), dgates.view(), dh.view(), saved);

  grun::optim::adamw<unlearner::params<float>> opt(m.parameters(), {.lr = 4e-3});
  const double norm = opt.step(m.parameters(), m.gradients());  // update, then QR retraction of R
  m.forward(grun::exec::host, h.view(), pos, out.view(), gates.view());
  std::printf("after one AdamW step (|grad| = %.4f): gates %.4f %.4f\n", norm, gates[0], gates[1]);

  const auto R = m.rotation();  // [r, d], rows orthonormal
  double err = 0;
  for (grun::index_t i = 0; i < 4; ++i)
    for (grun::index_t j = 0; j < 4; ++j) {
      double dot = 0;
      for (grun::index_t k = 0; k < d; ++k) dot += double(R(i, k)) * double(R(j, k));
      err = std::fmax(err, std::fabs(dot - (i == j ? 1.0 : 0.0)));
    }
  std::printf("max |R Rᵀ − I| = %.2e\n", err);
  return err < 1e-5 ? 0 : 1;
}
