// tests/cuda/cuda_main.cpp — Catch2 main for the CUDA tests: exit 77 (ctest SKIP_RETURN_CODE)
// when any device case was skipped for want of a GPU (or of the device memory a large case needs), so
// the run shows as Skipped, not Passed.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cuda_runtime.h>

#include <cstdio>

#include "cuda_test.hpp"

namespace grun::test {
bool device_present() {
  static const bool present = [] {
    int n = 0;
    const bool ok = cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
    (void)cudaGetLastError();
    return ok;
  }();
  return present;
}
int& skipped_cases() {
  static int n = 0;
  return n;
}
}  // namespace grun::test

int main(int argc, char* argv[]) {
  const int rc = Catch::Session().run(argc, argv);
  if (rc != 0) return rc;
  if (grun::test::skipped_cases() > 0) {
    std::fprintf(stderr, "SKIPPED: %s — %d CUDA test case(s) did not run (exit 77)\n",
                 grun::test::device_present() ? "too little free device memory (see the warnings above)"
                                              : "no CUDA device",
                 grun::test::skipped_cases());
    return 77;
  }
  return 0;
}
