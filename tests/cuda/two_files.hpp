#pragma once
// Every CUDA header of grun, for test_cuda_two_files (two_files_a.cu).
#include <grun/cuda/adamw.cuh>
#include <grun/cuda/intervention.cuh>
#include <grun/cuda/kl.cuh>
#include <grun/cuda/losses.cuh>
#include <grun/cuda/nll.cuh>
#include <grun/cuda/optim.cuh>
#include <grun/cuda/retract.cuh>

int grun_two_files_b();
