// The fused intervention kernels agree with exec::host at the edges of the rank range they take:
// r = 1 (linear + loreft<1>), 8 (always + direft<8>), 32 (linear + noreft<32>), fp32 / bf16.
// r > 32 takes the generic path (checked at compile time below).
#include "fused_intervention_check.hpp"

using namespace grun::test::fused_case;

static_assert(grun::detail::intervention_impl<grun::exec::cuda_t, all_di8>::fused);
static_assert(!grun::cuda::fused::supported<grun::gate::linear, grun::reft::loreft<33>, grun::ortho::qr_retraction>,
              "r > 32 takes the generic path");

TEST_CASE("fused intervention: r = 1 … 32 take the fused kernels, r = 33 does not", "[nodevice][intervention]") {
  CHECK(grun::detail::intervention_impl<grun::exec::cuda_t, lin_lo1>::fused);
  CHECK(grun::detail::intervention_impl<grun::exec::cuda_t, lin_no32>::fused);
  CHECK_FALSE(grun::cuda::fused::supported<grun::gate::linear, grun::reft::noreft<33>, grun::ortho::none>);
}

TEMPLATE_TEST_CASE("fused intervention agrees with exec::host: r = 1, 8, 32", "[intervention][fused]", float,
                   grun::bfloat16) {
  GRUN_REQUIRE_DEVICE();
  check_all<lin_lo1, TestType>();
  check_all<all_di8, TestType>();
  check_all<lin_no32, TestType>();
}
