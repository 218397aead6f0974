// The shared test cases of mlp_lo4 (fused_cases.hpp), compiled once for every CUDA test program.
#include "fused_cases.hpp"

GRUN_TEST_SHARED_MLP_LO4(INSTANTIATE)
