// The shared test cases of all_no2 (fused_cases.hpp), compiled once for every CUDA test program.
#include "fused_cases.hpp"

GRUN_TEST_SHARED_ALL_NO2(INSTANTIATE)
