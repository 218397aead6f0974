#pragma once
// grun — Gated Representation UNlearning. The umbrella header: everything a host program needs.
//
//   using unlearner = grun::gated_intervention<grun::gate::mlp<>, grun::reft::loreft<4>>;
//   using objective = grun::loss::objective<grun::loss::npo, grun::loss::retain_nll, grun::loss::gate_bce>;
//
// Framework adapters (adapters/torch.hpp) and CUDA kernels (kernels/) are included on their own.
#include "version.hpp"
#include "core/config.hpp"
#include "core/error.hpp"
#include "core/numeric.hpp"
#include "core/tensor.hpp"
#include "core/params.hpp"
#include "exec/host.hpp"
#include "exec/cuda.hpp"
#include "concepts.hpp"
#include "gate/always.hpp"
#include "gate/linear.hpp"
#include "gate/mlp.hpp"
#include "reft/loreft.hpp"
#include "reft/direft.hpp"
#include "ortho/none.hpp"
#include "ortho/qr_retraction.hpp"
#include "ortho/householder.hpp"
#include "positions.hpp"
#include "init.hpp"
#include "intervention.hpp"
#include "stack.hpp"
#include "loss/objective.hpp"
#include "optim/adamw.hpp"
#include "io/safetensors.hpp"
#include "io/adapter.hpp"
#include "io/gguf.hpp"
