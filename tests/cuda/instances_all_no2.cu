// The shared test cases of all_no2 (fused_cases.hpp), compiled once for every CUDA test program.
#include "fused_cases.hpp"

GRUN_CUDA_INSTANTIATE_INTERVENTION(grun::test::fused_case::all_no2, float)
GRUN_CUDA_INSTANTIATE_INTERVENTION(grun::test::fused_case::all_no2, grun::bfloat16)
GRUN_CUDA_INSTANTIATE_INTERVENTION(grun::test::fused_case::all_no2, grun::half)
