#pragma once
// grun/cuda/fused/forward_tensor.cuh — the fused forward on tensor cores (forward_tensor_kernel;
// forward_schedule::tensor, tensor_apply, tensor_pipelined). Part of intervention_fused.cuh
// (include that).
//
// The forward's dots are a skinny GEMM: for a tile of 8 rows, C [2r+1, 8] = P [2r+1, d] · Hᵀ [d, 8]
// (P the parameter rows U, D, w). On CUDA cores they cost 2r+1 FMAs per element of h — at d = 4096
// bf16 loreft<4> more instruction issue than the memory time allows (the stream schedule: 35% of copy
// bandwidth, every unit under 60% busy). mma.sync m16n8k16 (fp32 accumulate; the products of two
// 16-bit values are exact in fp32) does them in 2 instructions per warp and 32 columns of 8 rows.
//
// Parameters travel by value in the launch (up to tensor_max_modules modules): no host → device
// copy before the forward, and no packing kernel unless a stack's rows are not 16-byte aligned.

#include "tensor_core.cuh"

namespace grun::cuda::fused::detail {

/// The write of h' = h + coef·U for one module (bf16, staged), on tensor cores: per chunk of the
/// warp's 32 columns and per block j of 8 of them, one m16n8k16 product (twice: coef as hi + lo)
///   D [positions, 8 columns] = coef [positions, k = U row] · U [k, 8 columns] + h
/// with positions g on the rows (rows 8–15 and k ≥ r zero; r ≤ 8: one k-half). The columns are mapped as in
/// slot_tensor_kernel: logical column n of block j is physical column 8·⌊n/2⌋ + 2j + n mod 2 of the
/// chunk, so a lane's C/D fragment (position g, logical columns 2t, 2t + 1) is word j of its own held
/// vector: h goes in as C, h' comes out as D. B (k = U row, n = logical column g) takes lane (g, t)
/// U rows 2t, 2t + 1 at element 2j + g mod 2 of vector ⌊g/2⌋ of the chunk: two 16-byte
/// shared-memory loads per chunk, then half-word selects. Against the CUDA-core
/// write (per element: h and r parameters widened, r FMAs, per 8: r shared loads) about a third of
/// the instructions (an estimate: not yet timed on a GPU). coef: [ROWS][R] of this module.
template <int R, int HELD>
__device__ __forceinline__ void apply_on_tensor_cores(const float (&coef)[tensor_rows][R], const bfloat16* staged,
                                                      index_t lds, int nvec, int warp, int g, int t,
                                                      const uint4 (&held)[HELD], bool live, uint4* dst) {
  constexpr int STEP = 4 * (tensor_block / 32);
  unsigned hi[4], lo[4];
  a_fragment(g, t, [&](int q, int k) { return q < tensor_rows && k < R ? coef[q][k] : 0.f; }, hi, lo);
  const int keep_high = g % 2;  // B column g reads the odd (high) or even (low) half-words
  auto b_word = [&](unsigned row_a, unsigned row_b) {  // (U[2t][e], U[2t+1][e]) of one word's pair
    return keep_high ? (row_a >> 16) | (row_b & 0xffff0000u) : (row_a & 0xffffu) | (row_b << 16);
  };
  auto u_vector = [&](int u_row, int vector) -> uint4 {
    return u_row < R && vector < nvec ? *(reinterpret_cast<const uint4*>(staged + u_row * lds) + vector) : make_uint4(0, 0, 0, 0);
  };
#pragma unroll
  for (int c = 0; c < HELD; ++c) {
    const int first = 4 * warp + STEP * c;  // the chunk's first vector (the same for the warp's lanes)
    if (first >= nvec) break;
    const int uv = first + g / 2;  // B column g lies in the chunk's vector g / 2
    const uint4 u0 = u_vector(2 * t, uv), u1 = u_vector(2 * t + 1, uv);
    unsigned o[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float acc[4];
      unpack_pair<bfloat16>(word_of(held[c], j), acc[0], acc[1]);
      acc[2] = acc[3] = 0.f;  // rows 8–15: no positions
      mma_split(acc, hi, lo, b_word(word_of(u0, j), word_of(u1, j)), 0u);  // k ≥ 8: no U rows (r ≤ 8)
      o[j] = bf16_bits(acc[0]) | bf16_bits(acc[1]) << 16;
    }
    if (live && first + t < nvec) __stcs(dst + STEP * c, make_uint4(o[0], o[1], o[2], o[3]));
  }
}

/// forward_tensor_kernel's static shared memory for rank R (part, dots, coef; the kernel asserts it):
/// the staged launch opts in to the device's per-CTA limit less this, and the two must not exceed it.
template <int R>
constexpr std::size_t forward_tensor_static_bytes() {
  constexpr std::size_t MT = (2 * R + 1 + 15) / 16, WARPS = tensor_block / 32;
  return sizeof(float) * (WARPS * MT * 16 * tensor_rows + MT * 16 * tensor_rows + tensor_max_modules * tensor_rows * R);
}

/// h' = h + Σ_k Σ_i coef(k, i) · U_k,i over one 16-byte vector (8 elements of 16-bit storage), on
/// CUDA cores, in fp32 (r FMAs per element and module, k then i in order: the tensor schedules' bits);
/// u(k, i) gives U_k row i's vector at the same columns.
template <class T, int R, class Coef, class URow>
__device__ __forceinline__ uint4 add_modules(const uint4& hx, index_t K, Coef coef, URow u) {
  float o[8];
  unpack_pair<T>(hx.x, o[0], o[1]);
  unpack_pair<T>(hx.y, o[2], o[3]);
  unpack_pair<T>(hx.z, o[4], o[5]);
  unpack_pair<T>(hx.w, o[6], o[7]);
  for (index_t k = 0; k < K; ++k) {
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const uint4 uv = u(k, i);
      const float cf = coef(k, i);
      float p[8];
      unpack_pair<T>(uv.x, p[0], p[1]);
      unpack_pair<T>(uv.y, p[2], p[3]);
      unpack_pair<T>(uv.z, p[4], p[5]);
      unpack_pair<T>(uv.w, p[6], p[7]);
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] = fmaf(cf, p[e], o[e]);
    }
  }
  vec<T, 8> r;
#pragma unroll
  for (int e = 0; e < 8; ++e) dstore(&r.v[e], o[e]);
  return *reinterpret_cast<const uint4*>(&r);
}

/// Threads per CTA of the pipelined tensor schedule: the tensor schedule's 8 warps do the dots (the
/// same fragments, so the same bits), all 16 write h'.
inline constexpr int pipelined_block = 2 * tensor_block;

/// One tile of 8 positions per CTA and iteration; warp w, lane (g, t) holds row g's vectors
/// v = t + 4·(w + 8c), c < HELD (loaded once, streamed past L1, used for the dots of every module and
/// the write of h'). Per module: mma over the held vectors → per-warp partial C [16·MT, 8] → summed
/// over warps in a fixed order (bitwise-repeatable) → g and coef = s·g·e per row → after the last
/// module, h' = h + Σ_k Σ_i coef_k,i U_k,i on CUDA cores (r FMAs per element).
///
/// STAGED (one module): the CTA copies the module's 2r+1 parameter rows into shared memory once
/// and then walks tiles blockIdx.x, + gridDim.x, … (a grid of about 2 CTAs per SM): the dots and the
/// write read parameters from shared memory instead of L1/L2, which per tile of 8 rows (64 KiB of h
/// at d = 4096 bf16) would otherwise stream 72 KiB of parameters through L2 and stall on them.
/// Otherwise one tile per CTA, parameters read through the read-only cache.
/// APPLY (STAGED, bf16, r ≤ 8; forward_schedule::tensor_apply): the write of h' on tensor cores too
/// (apply_on_tensor_cores above). kept (or null): [K][P][R + 1], each position's e and z for a
/// backward that reads them instead of h (saved_activations).
///
/// PIPELINED (STAGED, not APPLY; forward_schedule::tensor_pipelined): one CTA of 512 threads per SM
/// with two tile buffers in shared memory after the parameters. Held in registers, a tile leaves its
/// CTA nothing to load while it is reduced and written, and two CTAs per SM do not cover each other
/// (ncu, run 5: 9 cycles per issued instruction, 45% of DRAM peak). Here tile i + gridDim.x lands in
/// the other buffer by cp.async while tile i is reduced and written: 64 KiB in flight per SM at
/// d = 4096 all the time. Warps 0–7 copy their vectors of the tile from shared memory into the same
/// registers the tensor schedule loads from global memory, so the dots, g, coef and the kept values
/// are its bits; all 16 warps then write h' with thread → (vector, rows) and the same FMA order:
/// h' is the tensor schedule's, bit for bit (the tests check it). Rows staged_row_stride(d) apart.
template <class T, int R, bool LO, int GM, int HELD, bool STAGED, bool APPLY, bool PIPELINED = false>
__global__ void __launch_bounds__(PIPELINED ? pipelined_block : tensor_block, PIPELINED ? 1 : 2)
    forward_tensor_kernel(module_ptrs<T> mods, index_t K, float scale, matrix_view<const T, cuda_space> h,
                          const index_t* __restrict__ pos, index_t P, matrix_view<T, cuda_space> out,
                          matrix_view<T, cuda_space> gates, const float* __restrict__ gext,
                          float* __restrict__ kept) {
  constexpr int NP = 2 * R + 1, MT = (NP + 15) / 16, WARPS = tensor_block / 32, ROWS = tensor_rows;
  constexpr int THREADS = PIPELINED ? pipelined_block : tensor_block;
  constexpr bool GATED = GM == gate_linear;
  static_assert(!APPLY || (STAGED && std::is_same_v<T, bfloat16> && R <= 8), "apply_on_tensor_cores' conditions");
  static_assert(!PIPELINED || (STAGED && !APPLY), "the pipelined schedule stages one module and writes on CUDA cores");
  __shared__ float part[WARPS][MT * 16][ROWS];
  __shared__ float dots[MT * 16][ROWS];
  __shared__ float coef[tensor_max_modules][ROWS][R];
  static_assert(sizeof(part) + sizeof(dots) + sizeof(coef) == forward_tensor_static_bytes<R>());
  extern __shared__ __align__(16) unsigned char smem[];
  T* staged = reinterpret_cast<T*>(smem);  // STAGED: [NP][lds] — U rows, D rows, w (zeros without a gate)

  // STAGED holds one module (launch_forward_tensor stages only K = 1). As a constant, ptxas drops the
  // module loops instead of unrolling each by 2 plus a remainder around a K it cannot see: for
  // loreft<4> bf16 at d = 4096 the default kernel's code goes from 5,320 SASS instructions with a
  // 4-byte spill to 3,200 with none, the pipelined one's registers from 123 to 108 (ptxas 13.0, sm_90;
  // benchmarks/cuda/sass_report.py). APPLY keeps the run-time count: as a constant its spill grows
  // from 16 bytes to 36.
  const index_t modules = STAGED && !APPLY ? 1 : K;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, g = lane / 4, t = lane % 4;
  const index_t d = h.extent(1);
  const int nvec = int(d / 8);  // ≤ 512 (launch_forward_tensor checks)
  const index_t lds = staged_row_stride(d);
  T* const buffers = staged + NP * lds;  // PIPELINED: two tiles [2][ROWS][lds] after the parameters
  // The thread's vectors of its row: v = v0 + STEP·c. Chunk c starts at column 8·(4·warp + STEP·c),
  // the same for the warp's lanes: the mma runs on every lane of a chunk with any column left, and
  // lanes past the row's end hold zeros (h and parameters both: no 0 · garbage). 32-bit vector
  // indices and one base pointer per row, so the HELD loads are one register and immediate offsets.
  // Warps past the first 8 (PIPELINED) take no part in the dots.
  constexpr int STEP = 4 * WARPS;
  const int v0 = t + 4 * warp;
  const bool dot_warp = !PIPELINED || warp < WARPS;
  auto chunk_live = [&](int c) { return dot_warp && 4 * warp + STEP * c < nvec; };

  if constexpr (STAGED) stage_parameter_rows<T, R>(mods.m[0], d, staged, lds);
  // Row `row` of module m's parameter matrix [2R+1, d] as the dots use it (null: a row of zeros —
  // direft's e needs no U·h, gate::always no w), as 16-byte vectors from v0 on.
  auto dot_row = [&](const src_ptrs<T>& m, int r) -> const uint4* {
    if ((r < R && !LO) || r >= NP || (r == 2 * R && !GATED)) return nullptr;
    const T* base = STAGED ? staged + r * lds : param_row(m, r, R, d);
    return reinterpret_cast<const uint4*>(base) + v0;
  };

  const index_t tiles = (P + ROWS - 1) / ROWS;
  // PIPELINED: tile → buffer b by cp.async, each thread a strided share of its vectors, one group
  // per tile. Rows past the last position repeat the first (loaded, never stored), as below.
  auto fetch = [&](index_t tile, int b) {
    const index_t q0 = tile * ROWS;
    const int nr = int(P - q0 < ROWS ? P - q0 : ROWS);
    T* to = buffers + b * ROWS * lds;
#pragma unroll 1
    for (int rr = 0; rr < ROWS; ++rr) {
      const T* from = h.row(row_at(pos, q0 + (rr < nr ? rr : 0)));
      for (int v = int(threadIdx.x); v < nvec; v += THREADS) cp_async_16(to + rr * lds + 8 * v, from + 8 * v);
    }
    cp_async_commit();
  };
  // PIPELINED's write of h': thread → vector wv of the tile's rows first, first + groups, … (groups:
  // how many rows the CTA's threads cover at once; nvec ≤ 512).
  const int groups = PIPELINED && nvec > 0 ? (THREADS / nvec < ROWS ? THREADS / nvec : ROWS) : 1;
  const int wv = PIPELINED && nvec > 0 ? int(threadIdx.x) % nvec : 0, first = PIPELINED && nvec > 0 ? int(threadIdx.x) / nvec : 0;
  if constexpr (PIPELINED)
    if (index_t(blockIdx.x) < tiles) fetch(blockIdx.x, 0);

  int buffer = 0;  // PIPELINED: where this iteration's tile lands
  for (index_t tile = blockIdx.x; tile < tiles; tile += STAGED ? index_t(gridDim.x) : tiles, buffer ^= 1) {
    const index_t q0 = tile * ROWS;
    const int nr = int(P - q0 < ROWS ? P - q0 : ROWS);
    const bool live = g < nr;  // rows past the last position repeat the first: loaded, never stored
    const index_t row = row_at(pos, q0 + (live ? g : 0));
    const T* current = buffers + buffer * ROWS * lds;

    uint4 held[HELD];
    if constexpr (PIPELINED) {
      // The next tile starts for the other buffer (which the barrier ending the previous iteration
      // freed); then this tile's copies are waited for: the thread's own, then everyone's. An empty
      // group where there is no next tile keeps "all but the newest group" meaning this tile.
      const index_t next = tile + index_t(gridDim.x);
      if (next < tiles) fetch(next, buffer ^ 1);
      else cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();
      const uint4* hv = reinterpret_cast<const uint4*>(current + g * lds) + v0;
#pragma unroll
      for (int c = 0; c < HELD; ++c) held[c] = dot_warp && v0 + STEP * c < nvec ? hv[STEP * c] : make_uint4(0, 0, 0, 0);
    } else {
      const uint4* hv = reinterpret_cast<const uint4*>(h.row(row)) + v0;
#pragma unroll
      for (int c = 0; c < HELD; ++c) held[c] = v0 + STEP * c < nvec ? __ldcs(hv + STEP * c) : make_uint4(0, 0, 0, 0);
    }

    for (index_t k = 0; k < modules; ++k) {
      const src_ptrs<T> m = mods.m[k];
      const uint4* ra[MT];
      const uint4* rb[MT];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        ra[mt] = dot_row(m, 16 * mt + g);
        rb[mt] = dot_row(m, 16 * mt + g + 8);
      }
      float acc[MT][4] = {};
#pragma unroll
      for (int c = 0; c < HELD; ++c) {
        if (!chunk_live(c)) break;
        const bool in = v0 + STEP * c < nvec;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const uint4 zero = make_uint4(0, 0, 0, 0);
          const uint4 pa = in && ra[mt] ? (STAGED ? ra[mt][STEP * c] : __ldg(ra[mt] + STEP * c)) : zero;
          const uint4 pb = in && rb[mt] ? (STAGED ? rb[mt][STEP * c] : __ldg(rb[mt] + STEP * c)) : zero;
          mma_vector<T>(acc[mt], pa, pb, held[c]);
        }
      }
      if (dot_warp) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) store_fragment(acc[mt], part[warp], mt, g, t);
      }
      __syncthreads();  // (also: every thread is past the previous tile's reads of coef)
      for (int i = int(threadIdx.x); i < NP * ROWS; i += THREADS) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) s += part[w][i / ROWS][i % ROWS];
        dots[i / ROWS][i % ROWS] = s;
      }
      __syncthreads();  // dots complete; part free for the next module
      if (threadIdx.x < ROWS) {
        const int n = int(threadIdx.x);
        float ar[NP], e[R];
#pragma unroll
        for (int i = 0; i < NP; ++i) ar[i] = dots[i][n];  // (rows a policy does not use: zero)
        const float z = forward_values<R, LO, GM>(ar, m.b, m.c, e);
        float gv = 1.f;
        if (n < nr) {
          if constexpr (GATED) gv = dsigmoid(z);
          else if constexpr (gate_from_outside<GM>) gv = outside_gate<GM>(gext, k * P + q0 + n);
          dstore(&gates(k, q0 + n), gv);
          if (kept) keep_values<R>(kept, k, P, q0 + n, e, z);
        }
#pragma unroll
        for (int i = 0; i < R; ++i) coef[k][n][i] = scale * gv * e[i];
      }
    }
    __syncthreads();  // every module's coef visible

    auto u_staged = [&](int v) {  // U row i's vector v, staged
      return [=](index_t, int i) { return *(reinterpret_cast<const uint4*>(staged + i * lds) + v); };
    };
    if constexpr (PIPELINED) {
      if (first < groups) {
        const auto u = u_staged(wv);
#pragma unroll 1
        for (int rr = first; rr < nr; rr += groups) {
          const uint4 hx = *(reinterpret_cast<const uint4*>(current + rr * lds) + wv);
          const uint4 o = add_modules<T, R>(hx, 1, [&](index_t, int i) { return coef[0][rr][i]; }, u);
          __stcs(reinterpret_cast<uint4*>(out.row(row_at(pos, q0 + rr))) + wv, o);
        }
      }
      __syncthreads();  // every read of this buffer done before the next iteration refills it
    } else if constexpr (APPLY) {
      uint4* dst = reinterpret_cast<uint4*>(out.row(row)) + v0;
      apply_on_tensor_cores<R, HELD>(coef[0], staged, lds, nvec, warp, g, t, held, live, dst);
    } else {
      uint4* dst = reinterpret_cast<uint4*>(out.row(row)) + v0;
#pragma unroll
      for (int c = 0; c < HELD; ++c) {
        if (!chunk_live(c)) break;
        const int v = v0 + STEP * c;
        if (v >= nvec) continue;
        auto cf = [&](index_t k, int i) { return coef[k][g][i]; };
        uint4 o;
        if constexpr (STAGED) {
          o = add_modules<T, R>(held[c], modules, cf, u_staged(v));
        } else {
          // (v0 + STEP·c rather than v: so written, ptxas 13.0 keeps this variant's spill at 4 bytes, not 16)
          o = add_modules<T, R>(held[c], K, cf, [&](index_t k, int i) {
            return __ldg(reinterpret_cast<const uint4*>(mods.m[k].U) + v0 + STEP * c + i * nvec);
          });
        }
        if (live) __stcs(dst + STEP * c, o);
      }
    }
  }
}

}  // namespace grun::cuda::fused::detail
