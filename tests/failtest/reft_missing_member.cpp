// A reft policy without `rank` must be rejected with a message naming it.
#include <grun/gate/linear.hpp>
#include <grun/intervention.hpp>
#include <grun/reft/direft.hpp>

struct no_rank_reft : grun::reft::direft<2> {
#ifndef GRUN_FAILTEST_CONTROL
  static constexpr const char* rank = "oops";  // hides the base's rank with something that is no index
#endif
};

using unlearner = grun::gated_intervention<grun::gate::linear, no_rank_reft>;
unlearner::params<float> p = unlearner::shape<float>(8);
