#pragma once
// grun/gate/linear.hpp — the linear gate  g(h) = σ(wᵀh + c)
// (GRUN, Ren et al. 2025, arXiv 2502.17823, §3: a single linear layer with a sigmoid decides whether
// a hidden row belongs to the forget set; d + 1 parameters per layer).
#include <array>
#include <cmath>
#include <string_view>

#include "../concepts.hpp"
#include "../rowmath.hpp"

namespace grun::gate {

struct linear {
  static constexpr const char* name = "gate::linear";

  template <class T, class Space = host_space>
  struct params {
    param<T, Space> weight;  // w [1, d]  (nn.Linear(d, 1).weight)
    param<T, Space> bias;    // c [1]
  };
  static constexpr std::array<std::string_view, 2> param_names{"weight", "bias"};

  template <class T, class S>
  static void shape(params<T, S>& p, index_t d) {
    set_matrix(p.weight, 1, d);
    set_vector(p.bias, 1);
  }
  GRUN_HD static constexpr index_t scratch_size(index_t) { return 0; }

  template <class Acc, class P>
  GRUN_HD static Acc forward(const P& p, const Acc* h, index_t d, Acc* /*scratch*/) {
    return sigmoid(load<Acc>(p.bias[0]) + grun::detail::dot<Acc>(p.weight.data, h, d));
  }

  // dz = dg · σ'(z) = dg · σ(z) σ(−z);  dw += dz h,  dc += dz,  dh += dz w.
  // σ(−z) from z, not 1 − g: for a nearly open gate (z ≈ 12) 1 − g in fp32 keeps ~2 significant
  // digits of σ'(z); one more dot over d buys them back (and matches the fused CUDA kernels).
  template <class Acc, class P, class G>
  GRUN_HD static void backward(const P& p, const G& grads, const Acc* h, index_t d, Acc* /*scratch*/, Acc /*g*/,
                               Acc dg, Acc* dh) {
    const Acc z = load<Acc>(p.bias[0]) + grun::detail::dot<Acc>(p.weight.data, h, d);
    const Acc dz = dg * sigmoid(z) * sigmoid(-z);
    grads.bias[0] += dz;
    grun::detail::outer_and_back(dz, p.weight.data, h, grads.weight.data, dh, d);
  }

  /// Initialization (used by grun::init): w ~ N(0, (0.01/√d)²), c = 0, so wᵀh ≈ 0.01·rms(h) and
  /// the initial gate is ≈ 0.5 for hidden rows of moderate scale.
  template <class T, class S, class Rng>
  static void init(const params<T, S>& p, Rng& rng) {
    const double sd = 0.01 / std::sqrt(double(p.weight.cols));
    for (index_t j = 0; j < p.weight.size(); ++j) p.weight[j] = store<T>(sd * rng.normal());
    p.bias[0] = store<T>(0.0);
  }
};
static_assert(gate_policy<linear>);

}  // namespace grun::gate
