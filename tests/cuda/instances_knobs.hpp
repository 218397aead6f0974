#pragma once
// tests/cuda/instances_knobs.hpp — where the instance library (grun_cuda_test_instances, a shared
// library: tests/cuda/CMakeLists.txt) finds the fused kernels' schedule knobs. The knobs are inline
// variables (kernels/grun/cuda/fused/schedules.cuh) that the tests set before running a case; the
// cases themselves run in the library. A program and a shared library each carry a definition of an
// inline variable, and the dynamic linker makes them one (GCC emits them as unique global symbols)
// — were that ever lost (hidden visibility, -Bsymbolic), every schedule test would silently run the
// default schedule. test_cuda_intervention_fused.cu checks these addresses against its own.
#include <grun/cuda/fused/schedules.cuh>

namespace grun::test::fused_case {

struct schedule_knob_addresses {
  const void* forward_plan;
  const void* coef_plan;
  const void* slot_plan;
  const void* slot_limit;
};

/// The knobs' addresses as code compiled into the instance library sees them (instances_knobs.cu).
schedule_knob_addresses schedule_knobs_seen_by_instances();

/// The same addresses as code compiled into the calling program sees them.
inline schedule_knob_addresses schedule_knobs_seen_here() {
  namespace fd = grun::cuda::fused::detail;
  return {&fd::forward_plan, &fd::coef_plan, &fd::slot_plan, &fd::slot_limit};
}

}  // namespace grun::test::fused_case
