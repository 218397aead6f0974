#pragma once
// grun/gate/always.hpp — the constant gate  g ≡ 1: plain, ungated ReFT (the paper's baseline,
// needed for ablations). No parameters; dL/dg is discarded.
#include <array>
#include <string_view>

#include "../concepts.hpp"

namespace grun::gate {

struct always {
  static constexpr const char* name = "gate::always";

  template <class T, class Space = host_space>
  struct params {};
  static constexpr std::array<std::string_view, 0> param_names{};

  template <class T, class S> static void shape(params<T, S>&, index_t) {}
  GRUN_HD static constexpr index_t scratch_size(index_t) { return 0; }

  template <class Acc, class P>
  GRUN_HD static Acc forward(const P&, const Acc*, index_t, Acc*) { return Acc(1); }
  template <class Acc, class P, class G>
  GRUN_HD static void backward(const P&, const G&, const Acc*, index_t, Acc*, Acc, Acc, Acc*) {}

  template <class T, class S, class Rng> static void init(const params<T, S>&, Rng&) {}
};
static_assert(gate_policy<always>);

}  // namespace grun::gate
