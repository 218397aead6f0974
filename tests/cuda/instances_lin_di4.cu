// The shared test cases of lin_di4 (fused_cases.hpp), compiled once for every CUDA test program.
#include "fused_cases.hpp"

GRUN_TEST_SHARED_LIN_DI4(INSTANTIATE)
