#pragma once
// Emulation shim for cub::WarpReduce (tests/emulation), for the full 32-lane warp: the same contract
// — every lane of the warp calls it, the aggregate is defined in lane 0 only — and the same order of
// operations as cub's shuffle reduction: lane i takes lane i + offset's partial for offset = 1, 2,
// 4, 8, 16. Each lane parks at the warp's barrier after writing its input (::grun_emu::sync_warp),
// so a lane that returned before the others called it stops the emulation, as the shuffles of a
// warp with missing lanes are undefined on the device. Lanes other than 0 get a value-initialised T.
#include <cuda_emulation.hpp>

namespace grun_emu {

/// cub's shuffle order over one warp's partials in `slot` (the first `valid` lanes hold one): lane i
/// takes lane i + offset's partial for offset = 1, 2, 4, 8, 16 — a lane past the valid ones
/// contributes nothing. Returns lane 0's total.
template <class T, class Op>
T warp_fold(const T* slot, int valid, Op op) {
  constexpr int lanes = 32;
  T part[lanes];
  for (int l = 0; l < valid; ++l) part[l] = slot[l];
  for (int offset = 1; offset < lanes; offset *= 2)
    for (int l = 0; l + offset < valid; l += 2 * offset) part[l] = op(part[l], part[l + offset]);
  return part[0];
}

}  // namespace grun_emu

namespace cub {

template <class T, int LogicalWarpThreads = 32, int = 0>
class WarpReduce {
  static_assert(LogicalWarpThreads == 32, "grun CUDA emulation: cub::WarpReduce over a logical warp of 32 lanes only");
  static constexpr int lanes = 32;

 public:
  struct TempStorage {
    T slot[lanes];
  };
  explicit WarpReduce(TempStorage& storage) : storage_(storage) {}

  template <class Op>
  T Reduce(T input, Op op) {
    const unsigned rank = ::grun_emu::thread_rank(), lane = rank % lanes;
    if (rank - lane + lanes > ::grun_emu::cta_size())
      ::grun_emu::fail_device("cub::WarpReduce in a warp the CTA does not fill (blockDim not a multiple of 32)");
    storage_.slot[lane] = input;
    ::grun_emu::sync_warp();
    T out{};
    if (lane == 0) out = ::grun_emu::warp_fold(storage_.slot, lanes, op);
    ::grun_emu::sync_warp();  // the storage may be reused at once, as cub allows
    return out;
  }
  T Sum(T input) {
    return Reduce(input, [](const T& a, const T& b) { return a + b; });
  }

 private:
  TempStorage& storage_;
};

}  // namespace cub
