#pragma once
// grun/cuda/fused/backward.cuh — the fused backward on CUDA cores: the coefficients of every
// position (write_coefficients, coef_kernel), the slots' gradient rows and dh (slot_kernel), and
// the deterministic second stage that sums the slots into the gradients (sum_slots_kernel). Part of
// intervention_fused.cuh (include that).

#include <cub/block/block_reduce.cuh>
#include <cub/warp/warp_reduce.cuh>

#include "common.cuh"

namespace grun::cuda::fused::detail {

/// One position q's coefficients for module k (of K) from its forward values e, z (forward_values,
/// or what the forward kept), its dout dots ux = {U·x [R]} and dL/dg from outside (dg_acc:
/// dgates(k, q), or 0):
///   de_i = s g U_i·x,   dL/dg = dg + s Σ_i e_i U_i·x,   dz = dL/dg σ'(z)
/// → cf[q][k], rc[q] when the module is the trained one, and to dzext: dz for an external gate's
/// logit, dL/dg for a gate given by its value.
template <int R, bool LO, int GM, class Acc>
__device__ __forceinline__ void write_coefficients(const Acc (&e_acc)[R], float z, const Acc* ux, float scale,
                                                   Acc dg_acc, index_t k, index_t K, index_t q, index_t P, bool trained,
                                                   const float* __restrict__ gext, float* __restrict__ dzext,
                                                   float* __restrict__ cf, float* __restrict__ rc) {
  constexpr int NP = 2 * R + 1;
  constexpr bool GATED = GM == gate_linear;
  const float zx = GM == gate_external ? gext[k * P + q] : 0.f;  // the external gate's logit
  float g = 1.f;
  if constexpr (GATED) g = dsigmoid(z);
  else if constexpr (gate_from_outside<GM>) g = outside_gate<GM>(gext, k * P + q);
  float e[R];
#pragma unroll
  for (int i = 0; i < R; ++i) {
    dg_acc += scale * e_acc[i] * ux[i];
    e[i] = float(e_acc[i]);
  }
  const float dg = float(dg_acc);
  // dL/dz of the gate's last pre-activation (g = σ(z) for linear and mlp alike): σ'(z) = σ(z) σ(−z).
  // With z at hand (linear) 1 − g is σ(−z) itself — for a nearly open gate (z ≈ 12) 1 − g in
  // fp32 keeps ~2 digits, and one such row put a bias gradient 3e-5 off the double reference.
  const float dz = GATED ? dg * g * dsigmoid(-z) : GM == gate_external ? dg * g * dsigmoid(-zx) : 0.f;
  if constexpr (GM == gate_external) dzext[k * P + q] = dz;
  else if constexpr (GM == gate_value) dzext[k * P + q] = dg;
  float* c = cf + (q * K + k) * NP;
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const float de = scale * g * float(ux[i]);
    c[i] = LO ? -de : 0.f;
    c[R + i] = de;
  }
  c[2 * R] = GATED ? dz : 0.f;
  if (trained) {
    float* t = rc + q * NP;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      t[i] = scale * g * e[i];
      t[R + i] = scale * g * float(ux[i]);
    }
    t[2 * R] = GATED ? dz : 0.f;
  }
}

/// write_coefficients for position q of module k from the dots ar = {U·h | D·h | w·h | U·x} — or,
/// KEPT, from the forward's e, z in kept [K][P][R + 1] and the dout dots at ar + 2R + 1 alone.
template <int R, bool LO, int GM, bool KEPT, class T, class Acc>
__device__ __forceinline__ void coefficients_of(const Acc* ar, const T* sc, const float* __restrict__ kept, float scale,
                                                Acc dg_acc, index_t k, index_t K, index_t q, index_t P, bool trained,
                                                const float* __restrict__ gext, float* __restrict__ dzext,
                                                float* __restrict__ cf, float* __restrict__ rc) {
  Acc e[R];
  float z;
  if constexpr (KEPT) {
    const float* kr = kept + (k * P + q) * kept_width<R>;
#pragma unroll
    for (int i = 0; i < R; ++i) e[i] = Acc(kr[i]);
    z = kr[R];
  } else {
    z = forward_values<R, LO, GM>(ar, sc, sc + R, e);
  }
  write_coefficients<R, LO, GM>(e, z, ar + 2 * R + 1, scale, dg_acc, k, K, q, P, trained, gext, dzext, cf, rc);
}

/// Per tile of ROWS positions and every module k: the dots U·h, D·h, w·h, U·x (x = dout row), then
///   cf[q][k] = { −[lo] de (coefficient of U in dh) | de (of D) | dz (of w) }            [2r+1]
///   rc[q]    = { s g e (of x in dU) | de (of h in dD, −[lo]·it in dU) | dz (of h in dw) } [2r+1], trained k
/// RES > 0: the resident schedule with RES vectors per thread and row (launch bounds as the forward's).
/// KEPT: the forward kept e and z per position (kept [K][P][R + 1]): only U·x is summed, h is not read.
///
/// fp32 storage accumulates these dots in fp64. dL/dg = s Σ_i e_i ux_i cancels (e_i = D_i·h + b_i −
/// U_i·h is itself a difference of dots), so every fp32 rounding along a dot over d is magnified in
/// dz and in the gate's gradients: at d = 4096 with fp32 chains they came out 5e-5 from the exact
/// (fp64) result, against the 1e-5 fp32 storage is held to. A product of two floats is exact in
/// double, so fp64 chains leave only the final roundings. Costs 3r+1 DFMA per element and module —
/// at the FP64 rate of an H100/H200 (half the FP32 rate) well under the memory time; 16-bit storage
/// (held to 2e-2, and the fast path) keeps fp32.
template <class T, int V, int R, int ROWS, bool LO, int GM, int RES, bool KEPT, class DG>
__global__ void __launch_bounds__(block, RES > 2 ? 3 : 0) coef_kernel(const T* __restrict__ pk, index_t ms, index_t dp, index_t K,
                                                     index_t trained, float scale, matrix_view<const T, cuda_space> h,
                                                     matrix_view<const T, cuda_space> dout,
                                                     matrix_view<const DG, cuda_space> dgates,
                                                     const index_t* __restrict__ pos, index_t P, float* __restrict__ cf,
                                                     float* __restrict__ rc, const float* __restrict__ gext,
                                                     float* __restrict__ dzext, const float* __restrict__ kept) {
  constexpr int ND = 3 * R + 1;
  constexpr bool GATED = GM == gate_linear;
  using Acc = std::conditional_t<std::is_same_v<T, float>, double, float>;
  using A = farr<ROWS * ND, Acc>;
  // What the block reduces: every dot, or with KEPT the U·x dots alone (ROWS·R of the ROWS·(3R+1):
  // the rest are never summed). A reduction sums each member on its own in a fixed tree, so the
  // members' bits do not depend on which others travel with them.
  using Reduced = farr<ROWS * (KEPT ? R : ND), Acc>;
  using BR = cub::BlockReduce<Reduced, block>;
  __shared__ typename BR::TempStorage tmp;
  const index_t d = h.extent(1), nvec = d / V;
  const index_t q0 = index_t(blockIdx.x) * ROWS;
  const int nr = int(P - q0 < ROWS ? P - q0 : ROWS);
  const bool has_dg = dgates.size() != 0;
  const T* hr[ROWS];
  const T* xr[ROWS];
#pragma unroll
  for (int rr = 0; rr < ROWS; ++rr) {
    const index_t row = row_at(pos, q0 + (rr < nr ? rr : 0));
    hr[rr] = h.row(row);  // (KEPT: never read)
    xr[rr] = dout.row(row);
  }
  // resident: the thread's vectors v = threadIdx.x + c·block (c < RES) of every row of h and dout.
  vec<T, V> held_h[RES > 0 ? RES : 1][ROWS], held_x[RES > 0 ? RES : 1][ROWS];
  if constexpr (RES > 0) {
    if constexpr (!KEPT) load_resident<T, V>(hr, nvec, held_h);
    load_resident<T, V>(xr, nvec, held_x);
  }
  for (index_t k = 0; k < K; ++k) {
    const T* pm = pk + k * ms;
    A a;
#pragma unroll
    for (int i = 0; i < ROWS * ND; ++i) a.v[i] = Acc(0);
    if constexpr (RES > 0) {
#pragma unroll
      for (int c = 0; c < RES; ++c) {
        const index_t v = threadIdx.x + c * block;
        if (v >= nvec) break;
        float x[ROWS][V], y[ROWS][V];
#pragma unroll
        for (int rr = 0; rr < ROWS; ++rr) {
          if constexpr (!KEPT) widen<T, V>(held_h[c][rr], x[rr]);
          widen<T, V>(held_x[c][rr], y[rr]);
        }
        accumulate_dots<V, R, ROWS, ND, LO, GATED, !KEPT, true>(pm, dp, v * V, x, y, a.v);
      }
    } else {
      for (index_t v = threadIdx.x; v < nvec; v += block) {
        float x[ROWS][V], y[ROWS][V];
#pragma unroll
        for (int rr = 0; rr < ROWS; ++rr) {
          if constexpr (!KEPT) load_row<T, V>(hr[rr] + v * V, x[rr]);
          load_row<T, V>(xr[rr] + v * V, y[rr]);
        }
        accumulate_dots<V, R, ROWS, ND, LO, GATED, !KEPT, true>(pm, dp, v * V, x, y, a.v);
      }
    }
    if constexpr (KEPT) {
      Reduced ux;  // U·x of each row: members 2R+1 … 3R of its dots
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr)
#pragma unroll
        for (int i = 0; i < R; ++i) ux.v[rr * R + i] = a.v[rr * ND + 2 * R + 1 + i];
      ux = BR(tmp).Reduce(ux, farr_sum{});
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr)
#pragma unroll
        for (int i = 0; i < R; ++i) a.v[rr * ND + 2 * R + 1 + i] = ux.v[rr * R + i];
    } else {
      a = BR(tmp).Reduce(a, farr_sum{});
    }
    if (threadIdx.x == 0) {
      const T* sc = pm + packed_tail(R, dp);
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr) {
        if (rr >= nr) break;
        const index_t q = q0 + rr;
        coefficients_of<R, LO, GM, KEPT>(a.v + rr * ND, sc, kept, scale, has_dg ? Acc(dload(&dgates(k, q))) : Acc(0), k,
                                         K, q, P, k == trained, gext, dzext, cf, rc);
      }
    }
    __syncthreads();
  }
}

/// db = Σ de and dc = Σ dz over the slot's positions [q0, q1), into the slot's tail (b, c); called by
/// every lane of one warp. Lane ℓ sums positions q0 + ℓ, q0 + ℓ + 32, … in order and cub::WarpReduce
/// adds the lanes' sums (a fixed shuffle pattern: the same bits every run). Before, one thread made
/// all (r+1)·rps loads from L2, a few in flight at a time, while the rest of its warp waited (an
/// estimated tens of µs at the tensor schedule's 128 positions per slot; not measured).
template <int R, bool GATED>
__device__ __forceinline__ void slot_bias_sums(const float* __restrict__ rc, index_t q0, index_t q1, float* tail) {
  constexpr int NP = 2 * R + 1;
  using WR = cub::WarpReduce<float>;
  __shared__ typename WR::TempStorage tmp;
  const int lane = int(threadIdx.x) % 32;
  for (int i = 0; i <= R; ++i) {
    const int column = i < R ? R + i : 2 * R;  // de_i, then dz
    float s = 0.f;
    if (i < R || GATED)
      for (index_t q = q0 + lane; q < q1; q += 32) s += rc[q * NP + column];
    const float total = WR(tmp).Sum(s);
    if (lane == 0) tail[i] = total;
    __syncwarp();  // tmp is reused
  }
}

/// Grid (slot, column block). A thread owns CW columns [col, col + CW) of the slot's rows
/// q ∈ [slot·rps, min(P, (slot+1)·rps)): it accumulates the trained module's gradient rows for those
/// columns into the slot's partial sums (slots + slot·ms, the packed layout) and writes dh.
/// HOLD (K = 1, r ≤ 8): the module's parameter columns stay in registers across the rows.
template <class T, int CW, int R, bool LO, bool GATED, bool HOLD>
__global__ void __launch_bounds__(block) slot_kernel(const T* __restrict__ pk, index_t ms, index_t dp, index_t K,
                                                     matrix_view<const T, cuda_space> h,
                                                     matrix_view<const T, cuda_space> dout,
                                                     const index_t* __restrict__ pos, index_t P, index_t rps,
                                                     const float* __restrict__ cf, const float* __restrict__ rc,
                                                     gate_path<T> dhg, matrix_view<T, cuda_space> dh,
                                                     float* __restrict__ slots) {
  constexpr int NP = 2 * R + 1;
  constexpr int G = R < 8 ? R : 8;  // gradient rows of U (and of D) accumulated per pass over the slot
  static_assert(!HOLD || R <= 8);
  const index_t d = h.extent(1);
  const index_t q0 = index_t(blockIdx.x) * rps, q1 = P < q0 + rps ? P : q0 + rps;
  float* slot = slots + index_t(blockIdx.x) * ms;
  if (blockIdx.y == 0 && threadIdx.x < 32) slot_bias_sums<R, GATED>(rc, q0, q1, slot + packed_tail(R, dp));
  const index_t c = index_t(blockIdx.y) * block + threadIdx.x;
  if (c >= d / CW) return;
  const index_t col = c * CW;

  float hu[HOLD ? R : 1][CW], hd[HOLD ? R : 1][CW], hw[CW];
  if constexpr (HOLD) {
#pragma unroll
    for (int i = 0; i < R; ++i) {
      load_param<CW>(pk + i * dp + col, hu[i]);
      load_param<CW>(pk + (R + i) * dp + col, hd[i]);
    }
    if (GATED) load_param<CW>(pk + 2 * R * dp + col, hw);
  }

  for (int i0 = 0; i0 < R; i0 += G) {
    const bool last = i0 + G >= R;  // dh is written in the last pass (dout may alias dh)
    float X[G][CW], Y[G][CW], Z[CW];
#pragma unroll
    for (int gi = 0; gi < G; ++gi)
#pragma unroll
      for (int e = 0; e < CW; ++e) X[gi][e] = Y[gi][e] = 0.f;
#pragma unroll
    for (int e = 0; e < CW; ++e) Z[e] = 0.f;
    // Rows in groups of SU: the group's h and dout loads are all issued before the first is used
    // (one row at a time kept 2 loads in flight per thread: latency-bound). Within a group every
    // row's dout is read before any dh row is written, so dh may alias dout (rows are distinct).
    constexpr int SU = 4;
    for (index_t qb = q0; qb < q1; qb += SU) {
      vec<T, CW> xr[SU], yr[SU];
      index_t rows[SU];
#pragma unroll
      for (int u = 0; u < SU; ++u) {
        rows[u] = row_at(pos, qb + u < q1 ? qb + u : q1 - 1);  // clamped: loaded, not used
        xr[u] = load_raw<T, CW>(h.row(rows[u]) + col);
        yr[u] = load_raw<T, CW>(dout.row(rows[u]) + col);
      }
#pragma unroll
      for (int u = 0; u < SU; ++u) {
        const index_t q = qb + u;
        if (q >= q1) break;
        const index_t row = rows[u];
        float x[CW], y[CW];
        widen<T, CW>(xr[u], x);
        widen<T, CW>(yr[u], y);
        const float* t = rc + q * NP;
#pragma unroll
        for (int gi = 0; gi < G; ++gi) {
          if (i0 + gi >= R) break;
          const float a = __ldg(t + i0 + gi), de = __ldg(t + R + i0 + gi);
#pragma unroll
          for (int e = 0; e < CW; ++e) {
            X[gi][e] = fmaf(a, y[e], X[gi][e]);
            Y[gi][e] = fmaf(de, x[e], Y[gi][e]);
          }
        }
        if (GATED && i0 == 0) {
          const float dz = __ldg(t + 2 * R);
#pragma unroll
          for (int e = 0; e < CW; ++e) Z[e] = fmaf(dz, x[e], Z[e]);
        }
        if (last) {
          float o[CW];
#pragma unroll
          for (int e = 0; e < CW; ++e) o[e] = y[e];
          if (dhg.data != nullptr) dhg.template add_to<CW>(q, col, o);  // a gate path computed elsewhere (mlp: Σ_k dZ1_k W1_k)
          for (index_t k = 0; k < (HOLD ? 1 : K); ++k) {
            const float* ck = cf + (q * K + k) * NP;
            const T* pm = pk + k * ms;
#pragma unroll
            for (int i = 0; i < R; ++i) {
              float pu[CW], pd[CW];
              if constexpr (HOLD) {
#pragma unroll
                for (int e = 0; e < CW; ++e) { pu[e] = hu[i][e]; pd[e] = hd[i][e]; }
              } else {
                if (LO) load_param<CW>(pm + i * dp + col, pu);
                load_param<CW>(pm + (R + i) * dp + col, pd);
              }
              const float cu = __ldg(ck + i), cd = __ldg(ck + R + i);
#pragma unroll
              for (int e = 0; e < CW; ++e) {
                if (LO) o[e] = fmaf(cu, pu[e], o[e]);
                o[e] = fmaf(cd, pd[e], o[e]);
              }
            }
            if (GATED) {
              float pw[CW];
              if constexpr (HOLD) {
#pragma unroll
                for (int e = 0; e < CW; ++e) pw[e] = hw[e];
              } else {
                load_param<CW>(pm + 2 * R * dp + col, pw);
              }
              const float cz = __ldg(ck + 2 * R);
#pragma unroll
              for (int e = 0; e < CW; ++e) o[e] = fmaf(cz, pw[e], o[e]);
            }
          }
          store_row<T, CW>(dh.row(row) + col, o);
        }
      }
    }
#pragma unroll
    for (int gi = 0; gi < G; ++gi) {
      if (i0 + gi >= R) break;
#pragma unroll
      for (int e = 0; e < CW; ++e) {
        slot[(i0 + gi) * dp + col + e] = X[gi][e] - (LO ? Y[gi][e] : 0.f);
        slot[(R + i0 + gi) * dp + col + e] = Y[gi][e];
      }
    }
    if (i0 == 0)
#pragma unroll
      for (int e = 0; e < CW; ++e) slot[2 * R * dp + col + e] = Z[e];
  }
}

/// Threads per CTA of the second stage: 8 warps per 32 gradient entries.
inline constexpr int sum_block = 256;

/// Second stage: every gradient entry = Σ_b slots[b] in double, stored into the gradient leaves
/// (overwritten); with no slots (P = 0) the gradients become zero. A CTA takes 32 consecutive
/// entries (a warp reads 128 contiguous bytes of a slot); warp w sums its fixed run of slots
/// [w·n/8, (w+1)·n/8) in slot order and the 8 runs are added in warp order, so the grouping depends
/// on the slot count only: bitwise-repeatable. (One thread per entry walking all 512 slots kept a
/// few loads in flight per thread over ~37k threads at d = 4096, r = 4 — ~0.6 MB in flight for the
/// 75 MB of partial sums; this keeps 8× the threads, each with its loads unrolled.)
template <class T, int R, bool GATED>
__global__ void __launch_bounds__(sum_block) sum_slots_kernel(const float* __restrict__ slots, index_t nslots,
                                                              index_t ms, index_t dp, index_t d, dst_ptrs<T> dst) {
  constexpr int NP = 2 * R + 1, WARPS = sum_block / 32;
  __shared__ double part[WARPS][32];
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const index_t n = NP * d + R + 1;
  const index_t i = index_t(blockIdx.x) * 32 + lane;
  // Entry i → its offset in the packed layout and its destination (null: nothing to store).
  index_t off = 0;
  T* p = nullptr;
  if (i < 2 * R * d) {
    const index_t rw = i / d, j = i % d;
    off = rw * dp + j;
    p = rw < R ? dst.U + i : dst.D + (i - R * d);
  } else if (i < NP * d) {
    off = 2 * R * dp + (i - 2 * R * d);
    p = GATED ? dst.w + (i - 2 * R * d) : nullptr;
  } else if (i < NP * d + R) {
    off = packed_tail(R, dp) + (i - NP * d);
    p = dst.b + (i - NP * d);
  } else if (i < n) {
    off = packed_tail(R, dp) + R;
    p = GATED ? dst.c : nullptr;
  }
  double s = 0;
  if (p != nullptr) {
    const index_t b0 = nslots * warp / WARPS, b1 = nslots * (warp + 1) / WARPS;
#pragma unroll 8
    for (index_t b = b0; b < b1; ++b) s += double(slots[b * ms + off]);
  }
  part[warp][lane] = s;
  __syncthreads();
  if (warp == 0 && p != nullptr) {
    double t = 0;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) t += part[w][lane];
    *p = store<T>(t);
  }
}

}  // namespace grun::cuda::fused::detail
