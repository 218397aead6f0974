// The mlp gate on exec::cuda (kernels/grun/cuda/intervention_mlp.cuh: cuBLASLt first layer, fused ReFT
// kernels with external gate values) agrees with exec::host and with the generic device path.
#include "fused_intervention_check.hpp"

using namespace grun::test::fused_case;

static_assert(!grun::detail::intervention_impl<grun::exec::cuda_t, mlp_lo4>::fused &&
                  grun::detail::intervention_impl<grun::exec::cuda_t, mlp_lo4>::fused_mlp,
              "mlp gate: cuBLASLt first layer + fused ReFT kernels");

TEST_CASE("fused intervention: the mlp gate takes the cuBLASLt path", "[nodevice][intervention][mlp]") {
  CHECK(grun::detail::intervention_impl<grun::exec::cuda_t, mlp_lo4>::fused_mlp);
  CHECK(grun::detail::intervention_impl<grun::exec::cuda_t, mlp_di2>::fused_mlp);
}

TEMPLATE_TEST_CASE("mlp gate (cuBLASLt first layer) agrees with exec::host", "[intervention][fused][mlp]", float,
                   grun::bfloat16, grun::half) {
  GRUN_REQUIRE_DEVICE();
  check_all<mlp_lo4, TestType>();
  check<mlp_di2, TestType>({30, 50, {29, 3, 4, 11}, 2, 1, 0.8});
}
TEMPLATE_TEST_CASE("mlp gate path agrees with the generic device path", "[intervention][fused][mlp]", float,
                   grun::bfloat16) {
  GRUN_REQUIRE_DEVICE();
  check_against_generic<mlp_lo4, TestType>(64, 256, iota(64));
  check_against_generic<mlp_lo4, TestType>(33, 77, {32, 0, 5});
}
