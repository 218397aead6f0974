#pragma once
// Emulation shim for cub::BlockReduce (tests/emulation): the same contract — every thread of the
// CTA calls it, the aggregate is defined in thread 0 only — and the same order of operations as
// cub's default algorithm (BLOCK_REDUCE_WARP_REDUCTIONS): each warp of 32 folds by shuffle-down
// steps of 1, 2, 4, 8, 16 lanes, then thread 0 folds the warp totals in warp order. So the float
// rounding of a reduction is the device's (up to its fused multiply-adds elsewhere). Threads other
// than 0 get a value-initialised T: code that reads the result elsewhere shows in the results.
#include <cuda_emulation.hpp>

#include <cub/warp/warp_reduce.cuh>

namespace cub {

enum BlockReduceAlgorithm { BLOCK_REDUCE_RAKING_COMMUTATIVE_ONLY, BLOCK_REDUCE_RAKING, BLOCK_REDUCE_WARP_REDUCTIONS };

template <class T, int BlockDimX, BlockReduceAlgorithm = BLOCK_REDUCE_WARP_REDUCTIONS, int BlockDimY = 1,
          int BlockDimZ = 1, int = 0>
class BlockReduce {
  static constexpr int threads = BlockDimX * BlockDimY * BlockDimZ;

 public:
  struct TempStorage {
    T slot[threads];
  };
  explicit BlockReduce(TempStorage& storage) : storage_(storage) {}

  template <class Op>
  T Reduce(T input, Op op) {
    return Reduce(input, op, threads);
  }
  template <class Op>
  T Reduce(T input, Op op, int valid) {
    if (::grun_emu::cta_size() != unsigned(threads)) ::grun_emu::fail_device("cub::BlockReduce: the CTA's size differs from BLOCK_DIM");
    const unsigned rank = ::grun_emu::thread_rank();
    storage_.slot[rank] = input;
    __syncthreads();
    T out{};
    if (rank == 0) out = fold(op, valid);
    __syncthreads();  // the storage may be reused at once, as cub allows after a barrier
    return out;
  }
  T Sum(T input) {
    return Reduce(input, [](const T& a, const T& b) { return a + b; });
  }

 private:
  /// cub's order: each warp's partials folded as its shuffles fold them (warp_fold), then the
  /// warps' totals in order.
  template <class Op>
  T fold(Op op, int valid) const {
    constexpr int warp = 32;
    T total{};
    for (int w = 0; w * warp < valid; ++w) {
      const int lanes = valid - w * warp < warp ? valid - w * warp : warp;
      const T part = ::grun_emu::warp_fold(storage_.slot + w * warp, lanes, op);
      total = w == 0 ? part : op(total, part);
    }
    return total;
  }

  TempStorage& storage_;
};

}  // namespace cub
