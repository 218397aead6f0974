#pragma once
// grun/exec/host.hpp — the host executor, chosen like thrust::host.
#include "../core/tensor.hpp"

namespace grun::exec {

/// Runs on the calling thread (plus `threads` workers where an algorithm parallelizes over rows;
/// 0 = hardware concurrency, 1 = serial). Deterministic: results never depend on `threads`.
struct host_t {
  using memory_space = grun::host_space;
  unsigned threads = 1;
  constexpr host_t operator()(unsigned n) const { return host_t{n}; }
  static constexpr const char* name = "exec::host";
};
inline constexpr host_t host{};

}  // namespace grun::exec
