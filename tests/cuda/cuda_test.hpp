#pragma once
// tests/cuda/cuda_test.hpp — the skip protocol for CUDA tests (Catch2 v2 has no SKIP).
//
// A device test case starts with GRUN_REQUIRE_DEVICE(). Without a CUDA device it WARNs
// "SKIPPED: no CUDA device" (printed by Catch's console reporter), counts itself and returns;
// cuda_main.cpp then exits 77 so ctest (SKIP_RETURN_CODE 77) reports the run as Skipped.
// A case that needs more device memory than is free skips the same way, with its own WARN
// (test_cuda_large_index.cu). Cases tagged [nodevice] check host-side validation that needs no GPU
// and always run.
#include <catch2/catch.hpp>

namespace grun::test {
/// True when a CUDA device is usable (cached; never throws).
bool device_present();
/// Number of device test cases that returned early because there was no device.
int& skipped_cases();
}  // namespace grun::test

#define GRUN_REQUIRE_DEVICE()                                                         \
  do {                                                                                \
    if (!::grun::test::device_present()) {                                            \
      ++::grun::test::skipped_cases();                                                \
      WARN("SKIPPED: no CUDA device — this test case did not run");                   \
      return;                                                                         \
    }                                                                                 \
  } while (0)
