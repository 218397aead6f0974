#pragma once
// grun/reft/direft.hpp — direct low-rank ReFT (Wu et al. 2024, "ReFT", DiReFT variant without the
// orthogonality and the subtraction):
//     Δ(h) = W2ᵀ (W1 h + b),   W1 [r, d], W2 [r, d], b [r]
//
// Field names follow pyreft's layout so checkpoints line up with loreft's:
//   rotate_layer = W2 (the up-projection, stored [r, d]; on disk [d, r] like loreft's, IO transposes),
//   weight = W1, bias = b (the learned source). Unlike loreft, rotate_layer is NOT constrained:
//   has_rotation = false, so an orthogonality policy other than ortho::none does not compile with it.
#include <array>
#include <cmath>
#include <string_view>
#include <vector>

#include "../concepts.hpp"
#include "../rowmath.hpp"
#include "../ortho/none.hpp"
#include "../ortho/qr_retraction.hpp"
#include "init.hpp"

namespace grun::reft {

template <index_t Rank>
struct direft {
  static_assert(Rank > 0, "grun::reft::direft: rank r must be positive");
  static constexpr const char* name = "reft::direft";
  static constexpr index_t rank = Rank;
  static constexpr bool has_rotation = false;
  using default_ortho = ortho::none;

  template <class T, class Space = host_space>
  struct params {
    param<T, Space> rotate_layer;  // W2 [r, d]  (up-projection)
    param<T, Space> weight;        // W1 [r, d]  (down-projection)
    param<T, Space> bias;          // b  [r]
  };
  static constexpr std::array<std::string_view, 3> param_names{"rotate_layer", "weight", "bias"};

  template <class T, class S>
  static void shape(params<T, S>& p, index_t d) {
    set_matrix(p.rotate_layer, Rank, d);
    set_matrix(p.weight, Rank, d);
    set_vector(p.bias, Rank);
  }
  /// scratch = [u = W1 h + b (r)]
  GRUN_HD static constexpr index_t scratch_size(index_t) { return Rank; }

  template <class Acc, class P>
  GRUN_HD static void forward(const P& p, const Acc* h, index_t d, Acc* delta, Acc* scratch) {
    Acc* u = scratch;
    // W1 h: up to 8 rows per pass over h.
    for (index_t k0 = 0; k0 < Rank; k0 += group) {
      constexpr int N = int(Rank < group ? Rank : group);
      const int g = int(Rank - k0 < group ? Rank - k0 : group);
      const std::remove_pointer_t<decltype(p.weight.row(0))>* rows[N];
      Acc dots[N];
      for (int i = 0; i < N; ++i) rows[i] = p.weight.row(k0 + (i < g ? i : 0));
      grun::detail::multi_dot<Acc, N>(rows, h, d, dots);
      for (int i = 0; i < g; ++i) u[k0 + i] = load<Acc>(p.bias[k0 + i]) + dots[i];
    }
    for (index_t j = 0; j < d; ++j) delta[j] = Acc(0);
    for (index_t k = 0; k < Rank; ++k) grun::detail::axpy_row(u[k], p.rotate_layer.row(k), delta, d);
  }

  // du = W2 δ;  dW2_k += u_k δ,  dW1_k += du_k h,  db += du,  dh += W1ᵀ du.
  template <class Acc, class P, class G>
  GRUN_HD static void backward(const P& p, const G& grads, const Acc* h, index_t d, Acc* scratch, const Acc* ddelta,
                               Acc* dh) {
    const Acc* u = scratch;
    Acc du[Rank];
    for (index_t k0 = 0; k0 < Rank; k0 += group) {
      constexpr int N = int(Rank < group ? Rank : group);
      const int g = int(Rank - k0 < group ? Rank - k0 : group);
      const std::remove_pointer_t<decltype(p.weight.row(0))>* rows[N];
      Acc dots[N];
      for (int i = 0; i < N; ++i) rows[i] = p.rotate_layer.row(k0 + (i < g ? i : 0));
      grun::detail::multi_dot<Acc, N>(rows, ddelta, d, dots);
      for (int i = 0; i < g; ++i) du[k0 + i] = dots[i];
    }
    for (index_t k = 0; k < Rank; ++k) {
      grads.bias[k] += du[k];
      grun::detail::axpy_row(u[k], ddelta, grads.rotate_layer.row(k), d);
      grun::detail::outer_and_back(du[k], p.weight.row(k), h, grads.weight.row(k), dh, d);
    }
  }
  static constexpr index_t group = 8;

  /// Initialization (used by grun::init): reft/init.hpp's, rotate_layer orthonormalized Gaussian
  /// rows, weight ~ N(0, 1/d), bias = 0.
  template <class T, class S, class Rng>
  static void init(const params<T, S>& p, Rng& rng) { detail::init_lowrank<T>(p, rng); }
};

static_assert(reft_policy<direft<4>>);

}  // namespace grun::reft
