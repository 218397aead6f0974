// The fused intervention kernels agree with exec::host: linear + direft<4> and always + noreft<2>,
// fp32 / bf16 / fp16, over every shape of check_all (fused_intervention_check.hpp).
#include "fused_intervention_check.hpp"

using namespace grun::test::fused_case;

TEST_CASE("fused intervention: direft<4> and noreft<2> take the fused kernels", "[nodevice][intervention]") {
  CHECK(grun::detail::intervention_impl<grun::exec::cuda_t, lin_di4>::fused);
  CHECK(grun::detail::intervention_impl<grun::exec::cuda_t, all_no2>::fused);
}

TEMPLATE_TEST_CASE("fused intervention agrees with exec::host: linear + direft<4>, always + noreft<2>",
                   "[intervention][fused]", float, grun::bfloat16, grun::half) {
  GRUN_REQUIRE_DEVICE();
  check_all<lin_di4, TestType>();
  check_all<all_no2, TestType>();
}
