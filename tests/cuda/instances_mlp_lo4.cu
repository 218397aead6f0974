// The shared test cases of mlp_lo4 (fused_cases.hpp), compiled once for every CUDA test program.
#include "fused_cases.hpp"

GRUN_CUDA_INSTANTIATE_INTERVENTION(grun::test::fused_case::mlp_lo4, float)
GRUN_CUDA_INSTANTIATE_INTERVENTION(grun::test::fused_case::mlp_lo4, grun::bfloat16)
GRUN_CUDA_INSTANTIATE_INTERVENTION(grun::test::fused_case::mlp_lo4, grun::half)
GRUN_CUDA_INSTANTIATE_INTERVENTION_DGATES(grun::test::fused_case::mlp_lo4, grun::bfloat16, float)
GRUN_CUDA_INSTANTIATE_INTERVENTION_DGATES(grun::test::fused_case::mlp_lo4, grun::half, float)
