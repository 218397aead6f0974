#pragma once
// tests/cuda/fused_cases.hpp — the gated interventions the CUDA agreement tests run, and which of
// their (policy, storage) pairs are compiled once for every test program rather than once per
// program: those that several programs run (test_cuda_intervention, test_cuda_intervention_fused,
// _direft, _generic, _mlp and test_cuda_large_index). Each pair's exec::cuda path is a few hundred
// kernels; compiled in each program that ran it, they were 40% of the kernels nvcc and the emulation
// compiled for these programs. Declared extern here, instantiated in instances_<policy>.cu (the
// library grun_cuda_test_instances, and its emulated twin): a pair added to one list and not the
// other is a link error naming it, or is compiled where it is used, as before.
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

// Instantiated in instances_lin_lo4.cu.
GRUN_CUDA_EXTERN_INTERVENTION(grun::test::fused_case::lin_lo4, float)
GRUN_CUDA_EXTERN_INTERVENTION(grun::test::fused_case::lin_lo4, grun::bfloat16)
GRUN_CUDA_EXTERN_INTERVENTION(grun::test::fused_case::lin_lo4, grun::half)
GRUN_CUDA_EXTERN_INTERVENTION_DGATES(grun::test::fused_case::lin_lo4, grun::bfloat16, float)
GRUN_CUDA_EXTERN_INTERVENTION_DGATES(grun::test::fused_case::lin_lo4, grun::half, float)
// Instantiated in instances_mlp_lo4.cu.
GRUN_CUDA_EXTERN_INTERVENTION(grun::test::fused_case::mlp_lo4, float)
GRUN_CUDA_EXTERN_INTERVENTION(grun::test::fused_case::mlp_lo4, grun::bfloat16)
GRUN_CUDA_EXTERN_INTERVENTION(grun::test::fused_case::mlp_lo4, grun::half)
GRUN_CUDA_EXTERN_INTERVENTION_DGATES(grun::test::fused_case::mlp_lo4, grun::bfloat16, float)
GRUN_CUDA_EXTERN_INTERVENTION_DGATES(grun::test::fused_case::mlp_lo4, grun::half, float)
// Instantiated in instances_lin_di4.cu.
GRUN_CUDA_EXTERN_INTERVENTION(grun::test::fused_case::lin_di4, float)
GRUN_CUDA_EXTERN_INTERVENTION(grun::test::fused_case::lin_di4, grun::bfloat16)
GRUN_CUDA_EXTERN_INTERVENTION(grun::test::fused_case::lin_di4, grun::half)
// Instantiated in instances_all_no2.cu.
GRUN_CUDA_EXTERN_INTERVENTION(grun::test::fused_case::all_no2, float)
GRUN_CUDA_EXTERN_INTERVENTION(grun::test::fused_case::all_no2, grun::bfloat16)
GRUN_CUDA_EXTERN_INTERVENTION(grun::test::fused_case::all_no2, grun::half)
