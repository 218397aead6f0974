// The shared test cases of lin_di4 (fused_cases.hpp), compiled once for every CUDA test program.
#include "fused_cases.hpp"

GRUN_CUDA_INSTANTIATE_INTERVENTION(grun::test::fused_case::lin_di4, float)
GRUN_CUDA_INSTANTIATE_INTERVENTION(grun::test::fused_case::lin_di4, grun::bfloat16)
GRUN_CUDA_INSTANTIATE_INTERVENTION(grun::test::fused_case::lin_di4, grun::half)
