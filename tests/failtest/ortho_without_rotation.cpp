// An orthogonality policy on a reft without a rotation R (direft) must not compile.
#include <grun/gate/linear.hpp>
#include <grun/intervention.hpp>
#include <grun/reft/direft.hpp>

#ifdef GRUN_FAILTEST_CONTROL
using unlearner = grun::gated_intervention<grun::gate::linear, grun::reft::direft<4>, grun::ortho::none>;
#else
using unlearner = grun::gated_intervention<grun::gate::linear, grun::reft::direft<4>, grun::ortho::qr_retraction>;
#endif
unlearner::params<float> p = unlearner::shape<float>(8);
