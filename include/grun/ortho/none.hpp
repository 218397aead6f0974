#pragma once
// grun/ortho/none.hpp — no constraint: R (if any) is an ordinary trainable matrix.
#include "../concepts.hpp"

namespace grun::ortho {

struct none {
  static constexpr const char* name = "ortho::none";
  static constexpr bool requires_rotation = false;
  static constexpr bool is_parametrization = false;
  template <class P> static void retract(P&) {}
};
static_assert(ortho_policy<none>);

}  // namespace grun::ortho
