#pragma once
// grun/cuda/fused/backward_tensor.cuh — the fused backward's two kernels on tensor cores:
// coef_tensor_kernel (coef_schedule::tensor) and slot_tensor_kernel (slot_schedule::tensor).
// Part of intervention_fused.cuh (include that).

#include "backward.cuh"
#include "tensor_core.cuh"

namespace grun::cuda::fused::detail {

// ---- the coefficient kernel on tensor cores (16-bit storage, one module) ------------------------
// coef_kernel's 3r+1 dots per position are two skinny products like the forward's, for a tile of
// 8 positions: [U·h | D·h | w·h] = Θ·hᵀ and U·x = (Θ's first rows)·xᵀ (x = dout, Θ = [U; D; w]),
// on mma.sync with the forward's fragments (plain 16-byte loads; a lane's k are 8 consecutive
// columns of its row, the same for every operand). Unlike the forward nothing is written back per
// element, so nothing is held: each warp streams its column strip of the tile's h and dout rows, the
// next batch of loads — of this tile, or already of the CTA's next one — in flight while the current
// batch is multiplied. Θ is staged in shared memory once per (persistent) CTA. Per tile the 8 warps'
// partial dots are summed in a fixed order (bitwise-repeatable) and write_coefficients forms cf and
// rc from them as coef_kernel does. run 5 (H200): coef_kernel took 121 µs to read these 256 MiB
// (2.2 TB/s), 47% of DRAM peak, its dots on CUDA cores at 108 registers.

/// Vectors of each row a lane loads per pipeline step (two steps in registers: 64 of them).
inline constexpr int coef_tensor_batch = 4;

/// coef_tensor_kernel's static shared memory for rank R (part, dots; the kernel asserts it).
template <int R>
constexpr std::size_t coef_tensor_static_bytes() {
  constexpr std::size_t MT = (2 * R + 1 + 15) / 16, MU = (R + 15) / 16, WARPS = tensor_block / 32;
  return sizeof(float) * (WARPS * 16 * (MT + MU) * tensor_rows + (3 * R + 1) * tensor_rows);
}

/// Persistent CTAs of tensor_block threads walk tiles blockIdx.x, + gridDim.x, …; pm: the one module,
/// packed (rows dp = d apart: d % 8 == 0 here); dynamic shared memory: staged_bytes<T, R>(d).
/// KEPT: the forward kept e and z (kept [1][P][R + 1]): only dout is read, only U·x multiplied.
template <class T, int R, bool LO, int GM, bool KEPT, class DG>
__global__ void __launch_bounds__(tensor_block, 2)
    coef_tensor_kernel(const T* __restrict__ pm, index_t dp, index_t trained, float scale,
                       matrix_view<const T, cuda_space> h, matrix_view<const T, cuda_space> dout,
                       matrix_view<const DG, cuda_space> dgates, const index_t* __restrict__ pos, index_t P,
                       float* __restrict__ cf, float* __restrict__ rc, const float* __restrict__ gext,
                       float* __restrict__ dzext, const float* __restrict__ kept) {
  constexpr int NP = 2 * R + 1, ND = 3 * R + 1, MT = (NP + 15) / 16, MU = (R + 15) / 16;
  constexpr int WARPS = tensor_block / 32, ROWS = tensor_rows, B = coef_tensor_batch, STEP = 4 * WARPS;
  constexpr bool GATED = GM == gate_linear;
  // part: per warp, the h product's rows [0, 16·MT), then the dout product's [16·MT, 16·(MT + MU)).
  __shared__ float part[WARPS][16 * (MT + MU)][ROWS];
  __shared__ float dots[ND][ROWS];  // per position n: {U·h | D·h | w·h | U·x}, write_coefficients' order
  static_assert(sizeof(part) + sizeof(dots) == coef_tensor_static_bytes<R>());
  extern __shared__ __align__(16) unsigned char smem[];
  T* staged = reinterpret_cast<T*>(smem);  // [NP][staged_row_stride(d)]: U, D rows, w (zeros: no gate)

  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, g = lane / 4, t = lane % 4;
  const index_t d = h.extent(1);
  const int nvec = int(d / 8);
  const index_t tiles = (P + ROWS - 1) / ROWS;
  if (index_t(blockIdx.x) >= tiles) return;  // the whole CTA (the launch makes none such)
  stage_parameter_rows<T, R>(packed_sources<T>(pm, R, dp, GATED), d, staged, staged_row_stride(d));
  // Lane (g, t) of warp w: vectors v0 + STEP·c of row g (c: chunk), as in forward_tensor_kernel.
  const int v0 = t + 4 * warp;
  const int batches = (nvec + STEP * B - 1) / (STEP * B);
  auto chunk_live = [&](int c) { return 4 * warp + STEP * c < nvec; };  // the same for the warp's lanes
  auto in_row = [&](int c) { return v0 + STEP * c < nvec; };
  // The A fragments' parameter rows g and g + 8 of m-tile mt (null past the 2r+1 rows: zeros).
  const uint4* ra[MT];
  const uint4* rb[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int m = 16 * mt + g;
    ra[mt] = m < NP ? reinterpret_cast<const uint4*>(staged + m * staged_row_stride(d)) + v0 : nullptr;
    rb[mt] = m + 8 < NP ? reinterpret_cast<const uint4*>(staged + (m + 8) * staged_row_stride(d)) + v0 : nullptr;
  }
  const T* sc = pm + packed_tail(R, dp);
  const bool has_dg = dgates.size() != 0;

  struct batch {
    uint4 h[B], x[B];
  };
  // Row g of a tile (rows past the last position read the tile's first: loaded, never used).
  auto rows_of = [&](index_t tile, const uint4*& hv, const uint4*& xv) {
    const index_t q0 = tile * ROWS;
    const index_t row = row_at(pos, q0 + (q0 + g < P ? g : 0));
    hv = reinterpret_cast<const uint4*>(h.row(row)) + v0;
    xv = reinterpret_cast<const uint4*>(dout.row(row)) + v0;
  };
  auto load = [&](const uint4* hv, const uint4* xv, int b, batch& to) {
    const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int j = 0; j < B; ++j) {
      const int c = b * B + j;
      if constexpr (!KEPT) to.h[j] = in_row(c) ? __ldcs(hv + STEP * c) : zero;
      to.x[j] = in_row(c) ? __ldcs(xv + STEP * c) : zero;
    }
  };
  float acc_h[MT][4] = {}, acc_x[MU][4] = {};
  auto multiply = [&](int b, const batch& in) {
#pragma unroll
    for (int j = 0; j < B; ++j) {
      const int c = b * B + j;
      if (!chunk_live(c)) break;
      const bool inside = in_row(c);  // past the row's end: parameters zero too (no 0 · garbage)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const uint4 zero = make_uint4(0, 0, 0, 0);
        const uint4 pa = inside && ra[mt] ? ra[mt][STEP * c] : zero;
        const uint4 pb = inside && rb[mt] ? rb[mt][STEP * c] : zero;
        if constexpr (!KEPT) mma_vector<T>(acc_h[mt], pa, pb, in.h[j]);
        // U's rows lie in the first MU m-tiles (the rest of those tiles' products unused)
        if (mt < MU) mma_vector<T>(acc_x[mt], pa, pb, in.x[j]);
      }
    }
  };
  // The tile's dots summed over warps (fixed order), then its positions' coefficients.
  auto finish = [&](index_t tile) {
    if constexpr (!KEPT) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) store_fragment(acc_h[mt], part[warp], mt, g, t);
    }
#pragma unroll
    for (int mt = 0; mt < MU; ++mt) store_fragment(acc_x[mt], part[warp] + 16 * MT, mt, g, t);
    for (auto& a : acc_h) a[0] = a[1] = a[2] = a[3] = 0.f;
    for (auto& a : acc_x) a[0] = a[1] = a[2] = a[3] = 0.f;
    __syncthreads();  // (also: the previous tile's coefficients are written, dots is free)
    for (int i = int(threadIdx.x) + (KEPT ? NP * ROWS : 0); i < ND * ROWS; i += tensor_block) {
      const int m = i / ROWS, n = i % ROWS;
      const int from = m < NP ? m : 16 * MT + (m - NP);
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) s += part[w][from][n];
      dots[m][n] = s;
    }
    __syncthreads();  // dots complete; part free for the next tile
    const index_t q = tile * ROWS + index_t(threadIdx.x);
    if (threadIdx.x < ROWS && q < P) {
      float ar[ND] = {};
#pragma unroll
      for (int i = KEPT ? NP : 0; i < ND; ++i) ar[i] = dots[i][threadIdx.x];
      coefficients_of<R, LO, GM, KEPT>(ar, sc, kept, scale, has_dg ? float(dload(&dgates(0, q))) : 0.f, 0, 1, q, P,
                                       trained == 0, gext, dzext, cf, rc);
    }
  };

  // The pipeline over (tile, batch) pairs: load step i + 1, multiply step i.
  index_t tile = blockIdx.x;
  int b = 0;
  const uint4 *hv, *xv;
  rows_of(tile, hv, xv);
  batch cur;
  load(hv, xv, 0, cur);
  for (;;) {
    index_t next_tile = tile;
    int next_b = b + 1;
    if (next_b == batches) {
      next_b = 0;
      next_tile += gridDim.x;
    }
    const bool more = next_tile < tiles;
    const uint4 *next_hv = hv, *next_xv = xv;
    batch next;
    if (more) {
      if (next_b == 0) rows_of(next_tile, next_hv, next_xv);
      load(next_hv, next_xv, next_b, next);
    }
    multiply(b, cur);
    if (b + 1 == batches) finish(tile);
    if (!more) break;
    cur = next;
    tile = next_tile;
    b = next_b;
    hv = next_hv;
    xv = next_xv;
  }
}

// ---- the slot kernel on tensor cores (bf16, one module) ---------------------------------------------
// Both halves of the slot kernel's work are products with a thin side of 2r+1 ≤ 32 rows
// (Θ = [U; D; w] as packed, cf [P][2r+1] = { −[lo] de | de | dz }, rc [P][2r+1] = { s g e | … }):
//   dh[q, :] = dout[q, :] + Σ_m cf[q][m] Θ[m, :]                       positions × (2r+1) · (2r+1) × columns
//   G[m, :] += Σ_q cf[q][m] h[q, :] + [m < r] rc[q][m] dout[q, :]        (2r+1) × positions · positions × columns
// (G: the slot's gradient rows dU, dD, dw — the same sums slot_kernel forms on CUDA cores), so both
// run as mma.sync m16n8k16, 16 positions per step. The second has positions along k, but a 16-byte
// load puts 8 columns of one position in a lane: movmatrix (an 8 × 8 transpose across the warp)
// makes the loaded tile the B fragment. As in the forward, which physical column a logical column n
// of an 8-column block j is may be chosen freely so long as every operand agrees. Here
//   lane (g, t) loads columns c0 + 8t … c0 + 8t + 7 of positions g and g + 8;
//   block j (0..3), logical column n  ↔  physical column c0 + 8·⌊n/2⌋ + 2j + n mod 2,
// so that a lane's C/D fragment of block j (positions g, g+8; logical columns 2t, 2t+1) is word j
// of its own 16-byte vectors: dout goes in as C, dh comes out as D, and the gradient rows are
// written, without a shuffle. The parameters' B fragments (k = parameter row, n = logical column)
// are gathered once per warp.
//
// Coefficients enter the mma as bf16, each split into hi + lo (bf16(c) and bf16(c − hi): ~16
// significant bits) and multiplied twice; h, dout and the parameters are bf16 already, so every
// product is exact in the fp32 accumulators and the coefficients' rounding is the only new one,
// ~2⁻¹⁷ relative. (fp16 storage keeps slot_kernel: a mean loss's coefficients, ~1e-7, fall below
// fp16's normal range, where hi + lo would keep a few bits.)

/// Storage and ranks slot_tensor_kernel takes: bf16, the U rows within the first 16 parameter rows.
template <class T, int R>
inline constexpr bool slot_tensor_takes = std::is_same_v<T, bfloat16> && R <= 16;

/// Threads per CTA of slot_tensor_kernel: 8 warps, each owning a strip of 32 columns.
inline constexpr int slot_tensor_block = 256;
/// Positions per mma step: the k of the gradient product.
inline constexpr int slot_tensor_step = 16;

/// Grid (slot, group of 256 columns), one module (K = 1), rows of h, dout, dh in 16-byte vectors.
/// Warp w owns columns [c0, c0 + 32), c0 = 256·blockIdx.y + 32w; per step of 16 positions it loads
/// its lanes' vectors of h and dout (the next step's loads issued before this step's math), then
/// per block j: the gradient rows G += cf^T·h + rc^T·dout and dh = dout (+ the external gate's path)
/// + cf·Θ, all on tensor cores. Positions past the slot read its last row and get zero coefficients.
template <int R>
__global__ void __launch_bounds__(slot_tensor_block) slot_tensor_kernel(
    const bfloat16* __restrict__ pk, index_t ms, index_t dp, matrix_view<const bfloat16, cuda_space> h,
    matrix_view<const bfloat16, cuda_space> dout, const index_t* __restrict__ pos, index_t P, index_t rps,
    const float* __restrict__ cf, const float* __restrict__ rc, gate_path<bfloat16> dhg,
    matrix_view<bfloat16, cuda_space> dh, float* __restrict__ slots) {
  constexpr int NP = 2 * R + 1, MT = (NP + 15) / 16, STEP = slot_tensor_step;
  static_assert(R <= 16, "the U rows (rc's s·g·e coefficients of dout) lie in the first tile of 16 rows");
  const index_t d = h.extent(1);
  const index_t q0 = index_t(blockIdx.x) * rps, q1 = P < q0 + rps ? P : q0 + rps;
  float* slot = slots + index_t(blockIdx.x) * ms;
  // The trained module is the only one: its gate's bias gradient is Σ dz whether or not it has a gate
  // (rc's dz column is 0 without one).
  if (blockIdx.y == 0 && threadIdx.x < 32) slot_bias_sums<R, true>(rc, q0, q1, slot + packed_tail(R, dp));
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, g = lane / 4, t = lane % 4;
  const index_t c0 = index_t(blockIdx.y) * slot_tensor_block + 32 * warp;
  if (c0 >= d) return;  // the whole warp: its strip lies past the row's end
  const index_t col = c0 + 8 * t;  // this lane's vector
  const bool live = col < d;       // d % 8 == 0: a vector is wholly in or out

  // The parameters as dh's B fragments: k = parameter row (tile kt), n = logical column g of block j.
  unsigned pb[MT][4][2];
  {
    const auto* bits = reinterpret_cast<const unsigned short*>(pk);
    const index_t pc0 = c0 + 8 * (g / 2) + (g % 2);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const index_t pc = pc0 + 2 * j;
      auto p = [&](int m) -> unsigned { return m < NP && pc < d ? unsigned(bits[index_t(m) * dp + pc]) : 0u; };
#pragma unroll
      for (int kt = 0; kt < MT; ++kt) {
        const int m = 16 * kt + 2 * t;
        pb[kt][j][0] = p(m) | p(m + 1) << 16;
        pb[kt][j][1] = p(m + 8) | p(m + 9) << 16;
      }
    }
  }

  // The position a lane reads for slot position q (the slot's last past its end: read, not used).
  auto in_slot = [&](index_t q) { return q < q1 ? q : q1 - 1; };
  // v[0], v[1]: h at positions qs + g, qs + g + 8; v[2], v[3]: dout there (zeros past the row's end).
  auto load_step = [&](index_t qs, uint4 (&v)[4]) {
    const index_t ra = row_at(pos, in_slot(qs + g)), rb = row_at(pos, in_slot(qs + g + 8));
    const uint4 zero = make_uint4(0, 0, 0, 0);
    v[0] = live ? __ldcs(reinterpret_cast<const uint4*>(h.row(ra) + col)) : zero;
    v[1] = live ? __ldcs(reinterpret_cast<const uint4*>(h.row(rb) + col)) : zero;
    v[2] = live ? __ldcs(reinterpret_cast<const uint4*>(dout.row(ra) + col)) : zero;
    v[3] = live ? __ldcs(reinterpret_cast<const uint4*>(dout.row(rb) + col)) : zero;
  };

  float grad[MT][4][4] = {};
  uint4 cur[4], next[4] = {};  // = {}: a slot of one step copies next without having loaded it
  load_step(q0, cur);
  for (index_t qs = q0; qs < q1; qs += STEP) {
    if (qs + STEP < q1) load_step(qs + STEP, next);
    // The step's coefficients (zero past the slot): cf as dh's A (rows = positions, k = parameter
    // rows of tile mt) and, transposed, as the gradient's (rows = parameter rows, k = positions);
    // rc's s·g·e as the dout part of the U rows.
    unsigned gh[MT][4], gl[MT][4], dh_hi[MT][4], dh_lo[MT][4], yh[4], yl[4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      a_fragment(
          g, t, [&](int q, int k) { return qs + q < q1 && 16 * mt + k < NP ? __ldg(cf + (qs + q) * NP + 16 * mt + k) : 0.f; },
          dh_hi[mt], dh_lo[mt]);
      transpose_a(dh_hi[mt], gh[mt]);
      transpose_a(dh_lo[mt], gl[mt]);
    }
    a_fragment(g, t, [&](int m, int k) { return m < R && qs + k < q1 ? __ldg(rc + (qs + k) * NP + m) : 0.f; }, yh, yl);

    unsigned o0[4], o1[4];  // dh at positions g, g + 8 (word j: block j)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const unsigned xw0 = word_of(cur[0], j), xw1 = word_of(cur[1], j), yw0 = word_of(cur[2], j), yw1 = word_of(cur[3], j);
      // Gradient rows: B = the step's 16 positions × block j (k = position), by transposing.
      const unsigned bx0 = transpose_8x8(xw0), bx1 = transpose_8x8(xw1);
      const unsigned by0 = transpose_8x8(yw0), by1 = transpose_8x8(yw1);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) mma_split(grad[mt][j], gh[mt], gl[mt], bx0, bx1);
      mma_split(grad[0][j], yh, yl, by0, by1);
      // dh = dout + cf · Θ for positions g, g + 8 and logical columns 2t, 2t + 1 of block j.
      float c[4];
      unpack_pair<bfloat16>(yw0, c[0], c[1]);
      unpack_pair<bfloat16>(yw1, c[2], c[3]);
      if (dhg.data != nullptr && live) {  // a gate's path computed elsewhere (the mlp's)
        dhg.template add_to<2>(in_slot(qs + g), col + 2 * j, c);
        dhg.template add_to<2>(in_slot(qs + g + 8), col + 2 * j, c + 2);
      }
#pragma unroll
      for (int kt = 0; kt < MT; ++kt) mma_split(c, dh_hi[kt], dh_lo[kt], pb[kt][j][0], pb[kt][j][1]);
      o0[j] = bf16_bits(c[0]) | bf16_bits(c[1]) << 16;
      o1[j] = bf16_bits(c[2]) | bf16_bits(c[3]) << 16;
    }
    if (live && qs + g < q1)
      __stcs(reinterpret_cast<uint4*>(dh.row(row_at(pos, qs + g)) + col), make_uint4(o0[0], o0[1], o0[2], o0[3]));
    if (live && qs + g + 8 < q1)
      __stcs(reinterpret_cast<uint4*>(dh.row(row_at(pos, qs + g + 8)) + col), make_uint4(o1[0], o1[1], o1[2], o1[3]));
#pragma unroll
    for (int i = 0; i < 4; ++i) cur[i] = next[i];
  }
  // The slot's gradient rows: lane (g, t) holds rows 16mt + g, + 8 at logical columns 2t, 2t + 1 of
  // block j = physical columns col + 2j, + 1.
  if (!live) return;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int m = 16 * mt + g;
      if (m < NP) *reinterpret_cast<float2*>(slot + index_t(m) * dp + col + 2 * j) = make_float2(grad[mt][j][0], grad[mt][j][1]);
      if (m + 8 < NP)
        *reinterpret_cast<float2*>(slot + index_t(m + 8) * dp + col + 2 * j) = make_float2(grad[mt][j][2], grad[mt][j][3]);
    }
  }
}

}  // namespace grun::cuda::fused::detail
