// The second .cu file of test_cuda_two_files (see two_files_a.cu).
#include "two_files.hpp"

int grun_two_files_b() { return 2; }
