#pragma once
// grun/gate/mlp.hpp — the three-layer gate (the paper's "mlp_3"):
//   g(h) = σ(w3ᵀ relu(W2 relu(W1 h + b1) + b2) + b3)
// laid out like nn.Sequential(Linear(d,H1), ReLU, Linear(H1,H2), ReLU, Linear(H2,1)), hence the
// reference names "0.weight", "2.weight", "4.weight".
#include <array>
#include <cmath>
#include <string_view>

#include "../concepts.hpp"

namespace grun::gate {

template <index_t H1 = 256, index_t H2 = 64>
struct mlp {
  static_assert(H1 > 0 && H2 > 0, "grun::gate::mlp: hidden widths must be positive");
  static constexpr const char* name = "gate::mlp";
  static constexpr index_t hidden1 = H1, hidden2 = H2;

  template <class T, class Space = host_space>
  struct params {
    param<T, Space> w1;  // [H1, d]
    param<T, Space> b1;  // [H1]
    param<T, Space> w2;  // [H2, H1]
    param<T, Space> b2;  // [H2]
    param<T, Space> w3;  // [1, H2]
    param<T, Space> b3;  // [1]
  };
  static constexpr std::array<std::string_view, 6> param_names{"0.weight", "0.bias", "2.weight",
                                                               "2.bias",   "4.weight", "4.bias"};

  template <class T, class S>
  static void shape(params<T, S>& p, index_t d) {
    set_matrix(p.w1, H1, d);
    set_vector(p.b1, H1);
    set_matrix(p.w2, H2, H1);
    set_vector(p.b2, H2);
    set_matrix(p.w3, 1, H2);
    set_vector(p.b3, 1);
  }
  /// scratch = [a1 (H1) | a2 (H2)], the post-ReLU activations; backward overwrites them in place
  /// with their gradients (relu'(x) = [a > 0] is read before each overwrite).
  GRUN_HD static constexpr index_t scratch_size(index_t) { return H1 + H2; }

  template <class Acc, class P>
  GRUN_HD static Acc forward(const P& p, const Acc* h, index_t d, Acc* scratch) {
    Acc* a1 = scratch;       // [H1]
    Acc* a2 = scratch + H1;  // [H2]
    for (index_t i = 0; i < H1; ++i) {
      Acc z = load<Acc>(p.b1[i]);
      const auto* w = p.w1.row(i);
      for (index_t j = 0; j < d; ++j) z += load<Acc>(w[j]) * h[j];
      a1[i] = z > Acc(0) ? z : Acc(0);
    }
    for (index_t i = 0; i < H2; ++i) {
      Acc z = load<Acc>(p.b2[i]);
      const auto* w = p.w2.row(i);
      for (index_t j = 0; j < H1; ++j) z += load<Acc>(w[j]) * a1[j];
      a2[i] = z > Acc(0) ? z : Acc(0);
    }
    Acc z = load<Acc>(p.b3[0]);
    for (index_t j = 0; j < H2; ++j) z += load<Acc>(p.w3[j]) * a2[j];
    return sigmoid(z);
  }

  template <class Acc, class P, class G>
  GRUN_HD static void backward(const P& p, const G& grads, const Acc* h, index_t d, Acc* scratch, Acc g, Acc dg,
                               Acc* dh) {
    Acc* a1 = scratch;
    Acc* a2 = scratch + H1;
    const Acc dz = dg * g * (Acc(1) - g);
    grads.b3[0] += dz;
    for (index_t i = 0; i < H2; ++i) grads.w3[i] += dz * a2[i];
    for (index_t i = 0; i < H2; ++i) a2[i] = a2[i] > Acc(0) ? dz * load<Acc>(p.w3[i]) : Acc(0);  // a2 := dz2
    for (index_t i = 0; i < H2; ++i) {
      const Acc dz2 = a2[i];
      grads.b2[i] += dz2;
      auto* gw = grads.w2.row(i);
      for (index_t j = 0; j < H1; ++j) gw[j] += dz2 * a1[j];
    }
    for (index_t j = 0; j < H1; ++j) {  // a1 := dz1 = [a1 > 0] · W2ᵀ dz2
      if (a1[j] > Acc(0)) {
        Acc s = 0;
        for (index_t i = 0; i < H2; ++i) s += load<Acc>(p.w2(i, j)) * a2[i];
        a1[j] = s;
      } else {
        a1[j] = Acc(0);
      }
    }
    for (index_t i = 0; i < H1; ++i) {
      const Acc dz1 = a1[i];
      if (dz1 == Acc(0)) continue;
      grads.b1[i] += dz1;
      auto* gw = grads.w1.row(i);
      const auto* w = p.w1.row(i);
      for (index_t j = 0; j < d; ++j) {
        gw[j] += dz1 * h[j];
        dh[j] += dz1 * load<Acc>(w[j]);
      }
    }
  }

  /// Initialization (used by grun::init): He-normal hidden layers (W1 ~ N(0, 2/d), W2 ~ N(0, 2/H1)),
  /// zero biases, and a small output layer w3 ~ N(0, (0.01/√H2)²), b3 = 0, so the initial gate ≈ 0.5.
  template <class T, class S, class Rng>
  static void init(const params<T, S>& p, Rng& rng) {
    auto fill = [&](const param<T, S>& w, double sd) {
      for (index_t i = 0; i < w.size(); ++i) w[i] = store<T>(sd * rng.normal());
    };
    fill(p.w1, std::sqrt(2.0 / double(p.w1.cols)));
    fill(p.b1, 0.0);
    fill(p.w2, std::sqrt(2.0 / double(H1)));
    fill(p.b2, 0.0);
    fill(p.w3, 0.01 / std::sqrt(double(H2)));
    fill(p.b3, 0.0);
  }
};
static_assert(gate_policy<mlp<>>);
static_assert(gate_policy<mlp<3, 2>>);

}  // namespace grun::gate
