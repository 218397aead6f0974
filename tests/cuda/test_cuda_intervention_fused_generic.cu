// The fused intervention kernels agree with the generic per-thread device path (same device, same
// inputs): linear + loreft<4>, linear + direft<4>, always + noreft<2>, fp32 / bf16.
#include "fused_intervention_check.hpp"

using namespace grun::test::fused_case;

TEST_CASE("fused intervention: the policies compared with the generic path take the fused kernels", "[nodevice][intervention]") {
  CHECK(grun::detail::intervention_impl<grun::exec::cuda_t, lin_lo4>::fused);
  CHECK(grun::detail::intervention_impl<grun::exec::cuda_t, lin_di4>::fused);
  CHECK(grun::detail::intervention_impl<grun::exec::cuda_t, all_no2>::fused);
}

TEMPLATE_TEST_CASE("fused intervention agrees with the generic device path", "[intervention][fused]", float,
                   grun::bfloat16) {
  GRUN_REQUIRE_DEVICE();
  check_against_generic<lin_lo4, TestType>(64, 256, iota(64));
  check_against_generic<lin_di4, TestType>(50, 129, {49, 1, 2, 30});
  check_against_generic<all_no2, TestType>(9, 8, {4});
}
