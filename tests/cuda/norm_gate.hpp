#pragma once
// A gate of the user's, written outside the library: g = σ(β · Σ_j h_j²/d − τ), "fires on large-norm
// rows", two scalar parameters β, τ. Nothing in grun names it. Its row math is GRUN_HD, so one
// definition serves exec::host (tests/test_gate.cpp: finite differences, composition with loreft)
// and exec::cuda, where it runs one thread per row beside the fused ReFT kernels, or on the generic
// path (tests/cuda/test_cuda_intervention.cu).
#include <array>
#include <string_view>

#include <grun/concepts.hpp>
#include <grun/rowmath.hpp>

namespace grun::test {

struct norm_gate {
  static constexpr const char* name = "test::norm_gate";
  template <class T, class Space = host_space>
  struct params {
    param<T, Space> beta;  // [1]
    param<T, Space> tau;   // [1]
  };
  static constexpr std::array<std::string_view, 2> param_names{"beta", "tau"};
  template <class T, class S>
  static void shape(params<T, S>& p, index_t) {
    set_vector(p.beta, 1);
    set_vector(p.tau, 1);
  }
  GRUN_HD static constexpr index_t scratch_size(index_t) { return 1; }
  template <class Acc, class P>
  GRUN_HD static Acc forward(const P& p, const Acc* h, index_t d, Acc* scratch) {
    Acc m = 0;
    for (index_t j = 0; j < d; ++j) m += h[j] * h[j];
    scratch[0] = m / Acc(d);
    return sigmoid(load<Acc>(p.beta[0]) * scratch[0] - load<Acc>(p.tau[0]));
  }
  template <class Acc, class P, class G>
  GRUN_HD static void backward(const P& p, const G& grads, const Acc* h, index_t d, Acc* scratch, Acc g, Acc dg,
                               Acc* dh) {
    const Acc dz = dg * g * (Acc(1) - g);
    grads.beta[0] += dz * scratch[0];
    grads.tau[0] -= dz;
    const Acc k = dz * load<Acc>(p.beta[0]) * Acc(2) / Acc(d);
    for (index_t j = 0; j < d; ++j) dh[j] += k * h[j];
  }
};
static_assert(gate_policy<norm_gate>);

}  // namespace grun::test
