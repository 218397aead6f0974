#pragma once
// Emulation shim for cub::WarpReduce (tests/emulation): named so the kernels that use it parse;
// warp-synchronous code is not emulated, and instantiating a reduction says so at compile time.
#include <cuda_emulation.hpp>

namespace cub {

template <class T, int LogicalWarpThreads = 32, int = 0>
class WarpReduce {
 public:
  struct TempStorage {};
  explicit WarpReduce(TempStorage&) {}
  template <class U = T>
  T Sum(U) {
    static_assert(sizeof(U) == 0, "grun CUDA emulation: cub::WarpReduce (warp-synchronous code) is not emulated");
    return T{};
  }
};

}  // namespace cub
