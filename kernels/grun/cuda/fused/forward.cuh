#pragma once
// grun/cuda/fused/forward.cuh — the fused forward on CUDA cores (forward_kernel): the stream,
// resident and staged schedules, and every call the tensor-core forward does not take (fp32
// storage, rows that are not 16-byte vectors, d > 4096, K > 8, sm < 80). Part of
// intervention_fused.cuh (include that).

#include <cooperative_groups.h>
#include <cooperative_groups/memcpy_async.h>
#include <cub/block/block_reduce.cuh>
#include <cuda/barrier>  // cuda::aligned_size_t

#include "common.cuh"

namespace grun::cuda::fused::detail {

/// One CTA per tile of ROWS consecutive positions. Dynamic shared memory: coef [K][ROWS][R] floats,
/// then (when `stage`) the tile of h as stored, ROWS × d elements. RES > 0: the resident schedule
/// with RES vectors per thread and row; ASYNC: the staged schedule (`stage` must be true).
/// The resident schedule at 3–4 vectors per row asks ptxas for 3 CTAs per SM (≤ 168 registers; it
/// would take ~197 and fit 2): 96 KiB of loads in flight per SM instead of 64, for a 32-byte spill
/// (bf16 loreft<4>, ptxas 13.0). To be confirmed on a GPU with the other schedules. The other
/// instantiations pass 0 (ptxas's own choice, as with no second argument: an explicit 1 made it take
/// 146 registers for the streaming forward instead of 96).
template <class T, int V, int R, int ROWS, bool LO, int GM, int RES, bool ASYNC>
__global__ void __launch_bounds__(block, RES > 2 ? 3 : 0) forward_kernel(const T* __restrict__ pk, index_t ms, index_t dp, index_t K,
                                                        float scale, matrix_view<const T, cuda_space> h,
                                                        const index_t* __restrict__ pos, index_t P,
                                                        matrix_view<T, cuda_space> out, matrix_view<T, cuda_space> gates,
                                                        const float* __restrict__ gext, bool stage, index_t coef_floats,
                                                        float* __restrict__ kept) {
  static_assert(!(RES > 0 && ASYNC), "one schedule at a time");
  constexpr int NP = 2 * R + 1;
  constexpr bool GATED = GM == gate_linear;
  using A = farr<ROWS * NP>;
  using BR = cub::BlockReduce<A, block>;
  __shared__ typename BR::TempStorage tmp;
  extern __shared__ __align__(16) unsigned char smem[];
  float* coef = reinterpret_cast<float*>(smem);
  T* tile = reinterpret_cast<T*>(smem + coef_floats * sizeof(float));

  const index_t d = h.extent(1), nvec = d / V;
  const index_t q0 = index_t(blockIdx.x) * ROWS;
  const int nr = int(P - q0 < ROWS ? P - q0 : ROWS);
  // Row pointers of the tile (rows past the last position repeat the first: loaded, never stored).
  // Streaming schedules take the output rows here too (96 registers, not 128, for bf16 loreft<4>);
  // the resident one after its loads, where they do not compete with the rows it holds.
  const T* hr[ROWS];
  T* dst[ROWS];
#pragma unroll
  for (int rr = 0; rr < ROWS; ++rr) {
    const index_t row = row_at(pos, q0 + (rr < nr ? rr : 0));
    hr[rr] = h.row(row);
    if constexpr (RES == 0) dst[rr] = out.row(row);
  }

  // resident: the thread's vectors v = threadIdx.x + c·block (c < RES) of every row of the tile.
  vec<T, V> held[RES > 0 ? RES : 1][ROWS];
  if constexpr (RES > 0) load_resident<T, V>(hr, nvec, held);
  // staged: the tile lands in shared memory by cp.async; the reads below then come from there.
  if constexpr (ASYNC) {
    namespace cg = cooperative_groups;
    const cg::thread_block cta = cg::this_thread_block();
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr)
      cg::memcpy_async(cta, tile + rr * d, hr[rr], ::cuda::aligned_size_t<16>(std::size_t(d) * sizeof(T)));
    cg::wait(cta);
  }
  const T* xr[ROWS];  // where the dots read row rr
#pragma unroll
  for (int rr = 0; rr < ROWS; ++rr) xr[rr] = ASYNC ? tile + rr * d : hr[rr];

  for (index_t k = 0; k < K; ++k) {
    const T* pm = pk + k * ms;
    A a;
#pragma unroll
    for (int i = 0; i < ROWS * NP; ++i) a.v[i] = 0.f;
    if constexpr (RES > 0) {
#pragma unroll
      for (int c = 0; c < RES; ++c) {
        const index_t v = threadIdx.x + c * block;
        if (v >= nvec) break;
        float x[ROWS][V];
#pragma unroll
        for (int rr = 0; rr < ROWS; ++rr) widen<T, V>(held[c][rr], x[rr]);
        accumulate_dots<V, R, ROWS, NP, LO, GATED, true, false>(pm, dp, v * V, x, x, a.v);
      }
    } else {
      for (index_t v = threadIdx.x; v < nvec; v += block) {
        float x[ROWS][V];
#pragma unroll
        for (int rr = 0; rr < ROWS; ++rr) {
          const vec<T, V> raw = load_raw<T, V>(xr[rr] + v * V);
          widen<T, V>(raw, x[rr]);
          if (!ASYNC && k == 0 && stage) *reinterpret_cast<vec<T, V>*>(tile + rr * d + v * V) = raw;
        }
        accumulate_dots<V, R, ROWS, NP, LO, GATED, true, false>(pm, dp, v * V, x, x, a.v);
      }
    }
    a = BR(tmp).Reduce(a, farr_sum{});
    if (threadIdx.x == 0) {
      const T* sc = pm + packed_tail(R, dp);  // b [R], c
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr) {
        if (rr >= nr) break;
        float e[R];
        const float z = forward_values<R, LO, GM>(a.v + rr * NP, sc, sc + R, e);
        float g = 1.f;
        if constexpr (GATED) g = dsigmoid(z);
        else if constexpr (gate_from_outside<GM>) g = outside_gate<GM>(gext, k * P + q0 + rr);
        dstore(&gates(k, q0 + rr), g);
#pragma unroll
        for (int i = 0; i < R; ++i) coef[(k * ROWS + rr) * R + i] = scale * g * e[i];
        if (kept) keep_values<R>(kept, k, P, q0 + rr, e, z);
      }
    }
    __syncthreads();  // coef visible; tmp free for the next module
  }

  if constexpr (RES > 0) {
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr) dst[rr] = out.row(row_at(pos, q0 + (rr < nr ? rr : 0)));
#pragma unroll
    for (int c = 0; c < RES; ++c) {
      const index_t v = threadIdx.x + c * block;
      if (v >= nvec) break;
      float o[ROWS][V];
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr) widen<T, V>(held[c][rr], o[rr]);
      apply_modules<V, R, ROWS>(pk, ms, dp, K, v * V, coef, o);
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr)
        if (rr < nr) store_row<T, V>(dst[rr] + v * V, o[rr]);
    }
  } else {
    const T* src[ROWS];
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr) src[rr] = stage ? tile + rr * d : hr[rr];
    for (index_t v = threadIdx.x; v < nvec; v += block) {
      float o[ROWS][V];
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr) load_row<T, V>(src[rr] + v * V, o[rr]);
      apply_modules<V, R, ROWS>(pk, ms, dp, K, v * V, coef, o);
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr)
        if (rr < nr) store_row<T, V>(dst[rr] + v * V, o[rr]);
    }
  }
}

}  // namespace grun::cuda::fused::detail
