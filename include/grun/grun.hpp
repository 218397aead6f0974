#pragma once
// grun — Gated Representation UNlearning. The umbrella header: everything a host program needs.
#include "version.hpp"
#include "core/config.hpp"
#include "core/error.hpp"
#include "core/numeric.hpp"
#include "core/tensor.hpp"
#include "core/params.hpp"
#include "exec/host.hpp"
#include "exec/cuda.hpp"
