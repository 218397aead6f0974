#pragma once
// tests/cuda/fused_cases.hpp — the gated interventions the CUDA agreement tests run, and which of
// their (policy, storage) pairs are compiled once for every test program rather than once per
// program: those that several programs run (test_cuda_intervention, test_cuda_intervention_fused,
// _direft, _generic, _mlp and test_cuda_large_index). Each pair's exec::cuda path is a few hundred
// kernels; compiled in each program that ran it, they were 40% of the kernels nvcc and the emulation
// compiled for these programs. Declared extern here and instantiated in instances_<policy>.cu (the
// library grun_cuda_test_instances, and its emulated twin), both from one list per policy (below).
#include <grun/cuda/intervention.cuh>
#include <grun/gate/always.hpp>
#include <grun/gate/linear.hpp>
#include <grun/gate/mlp.hpp>
#include <grun/reft/direft.hpp>
#include <grun/reft/loreft.hpp>

namespace grun::test::fused_case {

using lin_lo4 = grun::gated_intervention<grun::gate::linear, grun::reft::loreft<4>>;
using lin_lo1 = grun::gated_intervention<grun::gate::linear, grun::reft::loreft<1>>;
using lin_no32 = grun::gated_intervention<grun::gate::linear, grun::reft::noreft<32>>;
using all_no2 = grun::gated_intervention<grun::gate::always, grun::reft::noreft<2>>;
using lin_di4 = grun::gated_intervention<grun::gate::linear, grun::reft::direft<4>>;
using all_di8 = grun::gated_intervention<grun::gate::always, grun::reft::direft<8>>;
using mlp_lo4 = grun::gated_intervention<grun::gate::mlp<>, grun::reft::loreft<4>>;
using mlp_di2 = grun::gated_intervention<grun::gate::mlp<24, 8>, grun::reft::direft<2>>;

}  // namespace grun::test::fused_case

// The pairs each instances_<policy>.cu compiles, one list per policy for both sides: KIND is EXTERN
// (below, for every file that includes this header) or INSTANTIATE (in that policy's instance file),
// so the declaration and the definition cannot drift apart. Every policy runs in all three storage
// types; the two whose gate losses the tests exercise add the backward with fp32 gate gradients.
#define GRUN_TEST_EVERY_STORAGE_(KIND, I)                                    \
  GRUN_CUDA_##KIND##_INTERVENTION(grun::test::fused_case::I, float)          \
  GRUN_CUDA_##KIND##_INTERVENTION(grun::test::fused_case::I, grun::bfloat16) \
  GRUN_CUDA_##KIND##_INTERVENTION(grun::test::fused_case::I, grun::half)
#define GRUN_TEST_FP32_DGATES_(KIND, I)                                                       \
  GRUN_CUDA_##KIND##_INTERVENTION_DGATES(grun::test::fused_case::I, grun::bfloat16, float) \
  GRUN_CUDA_##KIND##_INTERVENTION_DGATES(grun::test::fused_case::I, grun::half, float)

#define GRUN_TEST_SHARED_LIN_LO4(KIND) GRUN_TEST_EVERY_STORAGE_(KIND, lin_lo4) GRUN_TEST_FP32_DGATES_(KIND, lin_lo4)
#define GRUN_TEST_SHARED_MLP_LO4(KIND) GRUN_TEST_EVERY_STORAGE_(KIND, mlp_lo4) GRUN_TEST_FP32_DGATES_(KIND, mlp_lo4)
#define GRUN_TEST_SHARED_LIN_DI4(KIND) GRUN_TEST_EVERY_STORAGE_(KIND, lin_di4)
#define GRUN_TEST_SHARED_ALL_NO2(KIND) GRUN_TEST_EVERY_STORAGE_(KIND, all_no2)

GRUN_TEST_SHARED_LIN_LO4(EXTERN)
GRUN_TEST_SHARED_MLP_LO4(EXTERN)
GRUN_TEST_SHARED_LIN_DI4(EXTERN)
GRUN_TEST_SHARED_ALL_NO2(EXTERN)
