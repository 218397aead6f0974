// The schedule knobs as the instance library sees them (instances_knobs.hpp). Spelled out here, not
// a call of schedule_knobs_seen_here(): that inline function could itself bind to the program's copy.
#include "instances_knobs.hpp"

grun::test::fused_case::schedule_knob_addresses grun::test::fused_case::schedule_knobs_seen_by_instances() {
  namespace fd = grun::cuda::fused::detail;
  return {&fd::forward_plan, &fd::coef_plan, &fd::slot_plan, &fd::slot_limit};
}
