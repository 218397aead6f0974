// The fused intervention kernels (kernels/grun/cuda/intervention_fused.cuh) agree with exec::host:
// linear + loreft<4>, fp32 / bf16 / fp16, over every shape of check_all (fused_intervention_check.hpp).
// The other fused cases live in test_cuda_intervention_fused_{direft,ranks,generic,mlp}.cu, so nvcc
// compiles them in parallel.
#include "fused_intervention_check.hpp"

using namespace grun::test::fused_case;

static_assert(grun::detail::intervention_impl<grun::exec::cuda_t, lin_lo4>::fused);

TEST_CASE("fused intervention: policy selection needs no device", "[nodevice][intervention]") {
  CHECK(grun::cuda::fused::supported<grun::gate::always, grun::reft::noreft<2>, grun::ortho::none>);
  CHECK_FALSE(grun::cuda::fused::supported<grun::gate::mlp<>, grun::reft::loreft<4>, grun::ortho::qr_retraction>);
}

TEMPLATE_TEST_CASE("fused intervention agrees with exec::host: linear + loreft<4>", "[intervention][fused]", float,
                   grun::bfloat16, grun::half) {
  GRUN_REQUIRE_DEVICE();
  check_all<lin_lo4, TestType>();
}
