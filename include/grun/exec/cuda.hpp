#pragma once
// grun/exec/cuda.hpp — the CUDA executor tag: exec::cuda(stream), chosen like thrust::device.
//
// The tag itself is plain C++ so host code can name it; the algorithms it dispatches to live in
// kernels/ and are only visible when the translation unit is compiled by nvcc.
#include "../core/tensor.hpp"
#include "host.hpp"

namespace grun::exec {

struct cuda_t {
  using memory_space = grun::cuda_space;
  void* stream = nullptr;        // cudaStream_t, kept opaque so host-only code compiles
  bool deterministic = false;    // bitwise-repeatable results; paths that cannot be refuse
  constexpr cuda_t operator()(void* s) const { return cuda_t{s, deterministic}; }
  static constexpr const char* name = "exec::cuda";
};
inline constexpr cuda_t cuda{};

}  // namespace grun::exec

namespace grun {
template <class E>
concept executor = requires {
  typename E::memory_space;
  { E::name } -> std::convertible_to<const char*>;
};
static_assert(executor<exec::host_t> && executor<exec::cuda_t>);
}  // namespace grun
