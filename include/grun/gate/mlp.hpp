#pragma once
// grun/gate/mlp.hpp — the three-layer gate (the paper's "mlp_3"):
//   g(h) = σ(w3ᵀ relu(W2 relu(W1 h + b1) + b2) + b3)
// laid out like nn.Sequential(Linear(d,H1), ReLU, Linear(H1,H2), ReLU, Linear(H2,1)), hence the
// reference names "0.weight", "2.weight", "4.weight".
#include <array>
#include <cmath>
#include <cstring>
#include <string_view>
#include <type_traits>
#include <vector>

#include "../concepts.hpp"
#include "../rowmath.hpp"

namespace grun::gate {

#if !defined(__CUDA_ARCH__)
namespace detail {
/// The host GEMM micro-kernels' vector: a whole register of the widest unit (64 bytes with
/// AVX-512F, else grun::detail::hvec). Its lanes are independent outputs, so the width changes
/// no result.
#if defined(__AVX512F__)
inline constexpr int gemm_vec_bytes = 64;
#else
inline constexpr int gemm_vec_bytes = grun::detail::hvec_bytes;
#endif
template <class Acc> struct gemm_vec;
template <> struct gemm_vec<float> { typedef float type __attribute__((vector_size(gemm_vec_bytes))); };
template <> struct gemm_vec<double> { typedef double type __attribute__((vector_size(gemm_vec_bytes))); };
template <class Acc> using gemm_vec_t = typename gemm_vec<Acc>::type;
template <class Acc> inline constexpr int gemm_vec_lanes = int(gemm_vec_bytes / sizeof(Acc));
template <class V, class Acc> GRUN_FORCEINLINE V gemm_load(const Acc* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
template <class Acc, class V> GRUN_FORCEINLINE void gemm_store(Acc* p, V v) { __builtin_memcpy(p, &v, sizeof v); }
/// Broadcast of a: a − 0 is a for every a, so it compiles to a bare broadcast (folded into the
/// FMA's memory operand). 0 + a would turn −0 into +0, and the compiler keeps that add: one more
/// scalar add per broadcast, on the FMA ports.
template <class V, class Acc> GRUN_FORCEINLINE V gemm_splat(Acc a) { return a - V{}; }
}  // namespace detail
#endif

template <index_t H1 = 256, index_t H2 = 64>
struct mlp {
  static_assert(H1 > 0 && H2 > 0, "grun::gate::mlp: hidden widths must be positive");
  static constexpr const char* name = "gate::mlp";
  static constexpr index_t hidden1 = H1, hidden2 = H2;

  template <class T, class Space = host_space>
  struct params {
    param<T, Space> w1;  // [H1, d]
    param<T, Space> b1;  // [H1]
    param<T, Space> w2;  // [H2, H1]
    param<T, Space> b2;  // [H2]
    param<T, Space> w3;  // [1, H2]
    param<T, Space> b3;  // [1]
  };
  static constexpr std::array<std::string_view, 6> param_names{"0.weight", "0.bias", "2.weight",
                                                               "2.bias",   "4.weight", "4.bias"};

  template <class T, class S>
  static void shape(params<T, S>& p, index_t d) {
    set_matrix(p.w1, H1, d);
    set_vector(p.b1, H1);
    set_matrix(p.w2, H2, H1);
    set_vector(p.b2, H2);
    set_matrix(p.w3, 1, H2);
    set_vector(p.b3, 1);
  }
  /// scratch = [a1 (H1) | a2 (H2)], the post-ReLU activations; backward overwrites them in place
  /// with their gradients (relu'(x) = [a > 0] is read before each overwrite).
  GRUN_HD static constexpr index_t scratch_size(index_t) { return H1 + H2; }

  /// a[i] = relu(b[i] + W[i]·x) for i < rows, W [rows, n]: 8 rows per pass over x.
  template <class Acc, class W, class B, class X>
  GRUN_HD static void dense_relu(const W& w, const B& b, const X* x, index_t rows, index_t n, Acc* a) {
    constexpr int N = 8;
    for (index_t i0 = 0; i0 < rows; i0 += N) {
      const int g = int(rows - i0 < N ? rows - i0 : N);
      const decltype(w.row(0)) wr[N] = {w.row(i0), w.row(i0 + (1 < g ? 1 : 0)), w.row(i0 + (2 < g ? 2 : 0)),
                                        w.row(i0 + (3 < g ? 3 : 0)), w.row(i0 + (4 < g ? 4 : 0)),
                                        w.row(i0 + (5 < g ? 5 : 0)), w.row(i0 + (6 < g ? 6 : 0)),
                                        w.row(i0 + (7 < g ? 7 : 0))};
      Acc z[N];
      grun::detail::multi_dot<Acc, N>(wr, x, n, z);
      for (int i = 0; i < g; ++i) {
        const Acc v = load<Acc>(b[i0 + i]) + z[i];
        a[i0 + i] = v > Acc(0) ? v : Acc(0);
      }
    }
  }

  /// The layers after the first: a1 [H1] → g.
  template <class Acc, class P>
  GRUN_HD static Acc head(const P& p, Acc* scratch) {
    Acc* a1 = scratch;
    Acc* a2 = scratch + H1;
    dense_relu(p.w2, p.b2, a1, H2, H1, a2);
    return sigmoid(load<Acc>(p.b3[0]) + grun::detail::dot<Acc>(p.w3.data, a2, H2));
  }

  template <class Acc, class P>
  GRUN_HD static Acc forward(const P& p, const Acc* h, index_t d, Acc* scratch) {
    dense_relu(p.w1, p.b1, h, H1, d, scratch);  // a1 [H1]
    return head(p, scratch);
  }

  /// Backward through the layers after the first: leaves dz1 = dL/d(W1 h + b1) in a1 (scratch).
  template <class Acc, class P, class G>
  GRUN_HD static void head_backward(const P& p, const G& grads, Acc* scratch, Acc g, Acc dg) {
    Acc* a1 = scratch;
    Acc* a2 = scratch + H1;
    // σ'(z) = σ(z) σ(−z) from z itself (recomputed: head's very sum, so σ(z) is g bit for bit), not
    // g(1 − g): a gate saturated in fp32 (z ≳ 17, g rounds to 1) has 1 − g = 0 and would never be
    // pushed back — what the linear gate and gate_bce's clamp are careful to avoid.
    const Acc z = load<Acc>(p.b3[0]) + grun::detail::dot<Acc>(p.w3.data, a2, H2);
    const Acc dz = dg * g * sigmoid(-z);
    grads.b3[0] += dz;
    for (index_t i = 0; i < H2; ++i) grads.w3[i] += dz * a2[i];
    for (index_t i = 0; i < H2; ++i) a2[i] = a2[i] > Acc(0) ? dz * load<Acc>(p.w3[i]) : Acc(0);  // a2 := dz2
    Acc s[H1];  // W2ᵀ dz2, accumulated row by row (i in order)
    for (index_t j = 0; j < H1; ++j) s[j] = Acc(0);
    for (index_t i = 0; i < H2; ++i) {
      const Acc dz2 = a2[i];
      grads.b2[i] += dz2;
      if (dz2 == Acc(0)) continue;
      grun::detail::outer_and_back(dz2, p.w2.row(i), a1, grads.w2.row(i), s, H1);
    }
    for (index_t j = 0; j < H1; ++j) a1[j] = a1[j] > Acc(0) ? s[j] : Acc(0);  // a1 := dz1 = [a1 > 0] · W2ᵀ dz2
  }

  template <class Acc, class P, class G>
  GRUN_HD static void backward(const P& p, const G& grads, const Acc* h, index_t d, Acc* scratch, Acc g, Acc dg,
                               Acc* dh) {
    head_backward(p, grads, scratch, g, dg);
    const Acc* a1 = scratch;
    for (index_t i = 0; i < H1; ++i) {
      const Acc dz1 = a1[i];
      if (dz1 == Acc(0)) continue;
      grads.b1[i] += dz1;
      grun::detail::outer_and_back(dz1, p.w1.row(i), h, grads.w1.row(i), dh, d);
    }
  }

  // ---- host fast path: B rows at once --------------------------------------------------------
  // Row by row, the first layer streams all of W1 [H1, d] (4 MB at d = 4096) per row. The block
  // forms below read W1 once per block of rows (cache- and register-blocked GEMMs). Each value
  // they produce depends on its own row only — never on which rows share the block or on the
  // thread count — but the first layer's z = W1 h sums over j in one chain in order, not in the
  // row function's lanes, so it may differ from forward() by rounding. Parameter gradients still
  // sum over the block's rows in row order. exec::host uses them for up to host_block_rows rows
  // at a time; the CUDA kernels keep the rows.
  static constexpr index_t host_block_rows = 32;

  /// g[b] = g(h[b]) for b < B; scratch[b] as forward leaves it.
  template <class Acc, class P>
  static void forward_block(const P& p, const Acc* const* h, index_t B, index_t d, Acc* const* scratch, Acc* g) {
    using WT = std::remove_cv_t<std::remove_pointer_t<decltype(p.w1.row(0))>>;
#if !defined(__CUDA_ARCH__)
    if constexpr (std::is_same_v<WT, Acc>) {
      // Below one vector of rows the dot form (tile_dot) wins: the GEMM would pad hᵀ to a vector.
      if (B >= grun::detail::hvec_lanes<Acc> && B <= host_block_rows) {
        first_layer_gemm(p, h, B, d, scratch);
        for (index_t b = 0; b < B; ++b) g[b] = head(p, scratch[b]);
        return;
      }
    }
#endif
    constexpr int M = 2, N = 4;  // tile: M rows of W1 × N rows of h
    for (index_t i0 = 0; i0 < H1; i0 += M) {
      const WT* w[M];
      GRUN_UNROLL
      for (int m = 0; m < M; ++m) w[m] = p.w1.row(i0 + m < H1 ? i0 + m : i0);
      for (index_t b0 = 0; b0 < B; b0 += N) {
        const Acc* x[N];
        GRUN_UNROLL
        for (int k = 0; k < N; ++k) x[k] = h[b0 + k < B ? b0 + k : b0];
        Acc z[M][N];
        grun::detail::tile_dot<Acc, M, N>(w, x, d, z);
        for (int m = 0; m < M && i0 + m < H1; ++m)
          for (int k = 0; k < N && b0 + k < B; ++k) {
            const Acc v = load<Acc>(p.b1[i0 + m]) + z[m][k];
            scratch[b0 + k][i0 + m] = v > Acc(0) ? v : Acc(0);
          }
      }
    }
    for (index_t b = 0; b < B; ++b) g[b] = head(p, scratch[b]);
  }

#if !defined(__CUDA_ARCH__)
  /// Registers for the host micro-kernels: 32 vector registers with AVX-512VL (zmm0-31), else 16.
#if defined(__AVX512VL__)
  static constexpr bool wide_register_file = true;
#else
  static constexpr bool wide_register_file = false;
#endif

  /// z[i0 + m][v·VL + l] += Σ_{j < kc} w[m][j] · ht[j][v·VL + l] for m < MR (rows ≥ H1 computed,
  /// not stored), v < NV: the accumulators live in registers across the whole chunk.
  template <class Acc, int MR, int NV, index_t BP>
  static GRUN_FORCEINLINE void gemm_tile(const Acc* const* w, const Acc* ht, Acc* z, index_t i0, index_t kc) {
    using V = detail::gemm_vec_t<Acc>;
    constexpr int VL = detail::gemm_vec_lanes<Acc>;
    V acc[MR][NV];
    GRUN_UNROLL
    for (int m = 0; m < MR; ++m)
      GRUN_UNROLL
      for (int v = 0; v < NV; ++v) acc[m][v] = detail::gemm_load<V>(z + (i0 + m < H1 ? i0 + m : i0) * BP + v * VL);
    for (index_t j = 0; j < kc; ++j) {
      V hv[NV];
      GRUN_UNROLL
      for (int v = 0; v < NV; ++v) hv[v] = detail::gemm_load<V>(ht + j * BP + v * VL);
      GRUN_UNROLL
      for (int m = 0; m < MR; ++m) {
        const V wv = detail::gemm_splat<V>(w[m][j]);
        GRUN_UNROLL
        for (int v = 0; v < NV; ++v) acc[m][v] += wv * hv[v];
      }
    }
    // Unrolled with the bound inside: an index into acc known only at run time would keep the
    // whole array in memory (clang then spills the accumulators in the loop above; GCC coped).
    GRUN_UNROLL
    for (int m = 0; m < MR; ++m)
      if (i0 + m < H1)
        GRUN_UNROLL
        for (int v = 0; v < NV; ++v) detail::gemm_store(z + (i0 + m) * BP + v * VL, acc[m][v]);
  }

  /// scratch[b][i] = relu(b1[i] + Σ_j W1[i][j] h[b][j]) for b < B ≤ host_block_rows: the GEMM
  /// Z [H1, B] = W1 [H1, d] · Hᵀ as an outer-product micro-kernel. MR rows of W1 (one broadcast
  /// scalar each) × NV vectors of rows of h (hᵀ packed per chunk of KC columns, so a vector holds
  /// one column j of VL rows) give MR·NV accumulators in registers, MR + NV loads per MR·NV FMAs.
  /// Each z[i][b] is one chain over j = 0, 1, …, d−1 in order (the chunks reload the partial sum
  /// and continue it), so it does not depend on the chunk size, the tiling, which rows share the
  /// block, or the thread count.
  template <class Acc, class P>
  static void first_layer_gemm(const P& p, const Acc* const* h, index_t B, index_t d, Acc* const* scratch) {
    constexpr int VL = detail::gemm_vec_lanes<Acc>;
    constexpr index_t BP = (host_block_rows + VL - 1) / VL * VL;  // rows of a block, padded to vectors
    constexpr int NVmax = int(BP / VL);
    // 24 accumulators on 32 registers (12 rows × 2 zmm with AVX-512), 12 on 16 (3 × 4 ymm).
    constexpr int NV = NVmax < 4 ? NVmax : 4, MR = (wide_register_file ? 24 : 12) / NV;
    constexpr index_t KC = 128;                                   // columns per chunk: hᵀ chunk in L1
    const index_t nvec = (B + VL - 1) / VL;                       // vectors of rows in use
    alignas(64) Acc ht[KC * BP];
    std::vector<Acc> zbuf(std::size_t(H1 * BP), Acc(0));          // Z [H1][BP]: the running sums
    Acc* z = zbuf.data();
    for (index_t j0 = 0; j0 < d; j0 += KC) {
      const index_t kc = d - j0 < KC ? d - j0 : KC;
      for (index_t b = 0; b < nvec * VL; ++b) {  // ht[j][b] = h[b][j0 + j]; rows past B are zero
        if (b < B) {
          const Acc* hb = h[b] + j0;
          GRUN_NO_VECTORIZE
          for (index_t j = 0; j < kc; ++j) ht[j * BP + b] = hb[j];
        } else {
          GRUN_NO_VECTORIZE
          for (index_t j = 0; j < kc; ++j) ht[j * BP + b] = Acc(0);
        }
      }
      for (index_t i0 = 0; i0 < H1; i0 += MR) {
        const Acc* w[MR];
        GRUN_UNROLL
        for (int m = 0; m < MR; ++m) w[m] = p.w1.row(i0 + m < H1 ? i0 + m : i0) + j0;  // clamped: not stored
        for (index_t v0 = 0; v0 < nvec; v0 += NV) {
          // A last group narrower than NV (a block's tail of rows) runs a narrower kernel.
          const int nv = int(nvec - v0 < NV ? nvec - v0 : NV);
          const Acc* hp = ht + v0 * VL;
          Acc* zp = z + v0 * VL;
          if (nv == NV) gemm_tile<Acc, MR, NV, BP>(w, hp, zp, i0, kc);
          else if (NV > 2 && nv >= 2) {
            gemm_tile<Acc, MR, 2, BP>(w, hp, zp, i0, kc);
            if (nv == 3) gemm_tile<Acc, MR, 1, BP>(w, hp + 2 * VL, zp + 2 * VL, i0, kc);
          } else gemm_tile<Acc, MR, 1, BP>(w, hp, zp, i0, kc);
        }
      }
    }
    for (index_t b = 0; b < B; ++b)
      for (index_t i = 0; i < H1; ++i) {
        const Acc v = load<Acc>(p.b1[i]) + z[i * BP + b];
        scratch[b][i] = v > Acc(0) ? v : Acc(0);
      }
  }

  /// exec::host forms dW1 with first_layer_weight_grad over all rows (backward_block_rows per block).
  static constexpr bool host_weight_grad_gemm = true;
  template <class Params>
  static auto& first_layer_weight(Params& p) { return p.w1; }

  /// gw[i·ldg + j] = Σ_{p < P} dz1t[i·ldz + p] · h[p][j] for i < H1, j in [j0, j1): the weight
  /// gradient over all P rows as one GEMM dW1 [H1, d] = dZ1ᵀ [H1, P] · H [P, d], on first_layer_gemm's
  /// micro-kernel (MR rows of dZ1ᵀ, one broadcast scalar each, × NV vectors of a panel of H
  /// packed per chunk of KC rows). Each dW1[i][j] is one chain over p = 0, 1, …, P−1 in order (the
  /// chunks reload the partial sum and continue it), so it depends on the rows and their order
  /// only: not on how a caller splits the columns among threads, nor on how it blocked the rows.
  template <class Acc, class X, class GT>
  static void first_layer_weight_grad(const Acc* dz1t, index_t ldz, const X* const* h, index_t P, index_t j0,
                                      index_t j1, GT* gw, index_t ldg) {
    constexpr int VL = detail::gemm_vec_lanes<Acc>;
    constexpr int MR = wide_register_file ? 6 : 3, NV = 4;
    constexpr index_t NC = NV * VL;  // columns per panel
    constexpr index_t KC = 128;      // rows per chunk: the packed panel (KC × NC, 32 KB with AVX-512) stays in L1
    alignas(64) Acc hp[KC * NC];
    std::vector<Acc> zbuf(std::size_t(H1 * NC));  // dW1's panel [H1][NC]: the running sums
    Acc* z = zbuf.data();
    for (index_t jp = j0; jp < j1; jp += NC) {
      const index_t nc = j1 - jp < NC ? j1 - jp : NC;
      for (auto& v : zbuf) v = Acc(0);
      for (index_t p0 = 0; p0 < P; p0 += KC) {
        const index_t kc = P - p0 < KC ? P - p0 : KC;
        for (index_t q = 0; q < kc; ++q) {  // hp[q][c] = h[p0 + q][jp + c]; columns past nc are zero
          const X* hq = h[p0 + q] + jp;
          for (index_t c = 0; c < nc; ++c) hp[q * NC + c] = load<Acc>(hq[c]);
          for (index_t c = nc; c < NC; ++c) hp[q * NC + c] = Acc(0);
        }
        for (index_t i0 = 0; i0 < H1; i0 += MR) {
          const Acc* a[MR];
          GRUN_UNROLL
          for (int m = 0; m < MR; ++m) a[m] = dz1t + (i0 + m < H1 ? i0 + m : i0) * ldz + p0;  // clamped: not stored
          gemm_tile<Acc, MR, NV, NC>(a, hp, z, i0, kc);
        }
      }
      for (index_t i = 0; i < H1; ++i)
        for (index_t c = 0; c < nc; ++c) gw[i * ldg + jp + c] = store<GT>(z[i * NC + c]);
    }
  }
#endif

  /// backward for B rows (after forward_block with the same scratch): grads += Σ_b, dh[b] += the gate path.
  template <class Acc, class P, class G>
  static void backward_block(const P& p, const G& grads, const Acc* const* h, index_t B, index_t d,
                             Acc* const* scratch, const Acc* g, const Acc* dg, Acc* const* dh) {
    head_backward_block(p, grads, B, scratch, g, dg);
    first_layer_weight_grad_block(grads, h, B, d, scratch);
    first_layer_input_grad_block(p, B, d, scratch, dh);
  }

  /// backward_block without dW1: every other gradient and dh[b], and dz1 of row b copied to
  /// column b of dz1t [H1][ldz] when dz1t is not null (the caller forms dW1 = dz1t · H over all
  /// its rows at once with first_layer_weight_grad: per block, dW1 would need a slot of H1·d
  /// scalars per block of rows, zeroed and summed, to keep the sum's order fixed).
  template <class Acc, class P, class G>
  static void backward_block_rows(const P& p, const G& grads, index_t B, index_t d, Acc* const* scratch,
                                  const Acc* g, const Acc* dg, Acc* const* dh, Acc* dz1t, index_t ldz) {
    head_backward_block(p, grads, B, scratch, g, dg);
    if (dz1t)
      for (index_t i = 0; i < H1; ++i)
        for (index_t b = 0; b < B; ++b) dz1t[i * ldz + b] = scratch[b][i];
    first_layer_input_grad_block(p, B, d, scratch, dh);
  }

  /// The layers after the first for B rows: leaves dz1 in scratch[b][:H1]; db1 += Σ_b dz1[b] (b in order).
  template <class Acc, class P, class G>
  static void head_backward_block(const P& p, const G& grads, index_t B, Acc* const* scratch, const Acc* g,
                                  const Acc* dg) {
    for (index_t b = 0; b < B; ++b) head_backward(p, grads, scratch[b], g[b], dg[b]);  // scratch[b][:H1] = dz1
    for (index_t i = 0; i < H1; ++i)
      for (index_t b = 0; b < B; ++b) grads.b1[i] += scratch[b][i];
  }

  /// dW1[i] += Σ_b dz1[b][i] h[b] over a block's rows (b in order, as row by row).
  template <class Acc, class G>
  static void first_layer_weight_grad_block(const G& grads, const Acc* const* h, index_t B, index_t d,
                                            Acc* const* scratch) {
    using GT = std::remove_cv_t<std::remove_pointer_t<decltype(grads.w1.row(0))>>;
    constexpr int M = 4;  // rows of dW1 held in registers per chunk
    index_t i0 = 0;
    for (; i0 + M <= H1; i0 += M) {
      GT* gw[M];
      for (int m = 0; m < M; ++m) gw[m] = grads.w1.row(i0 + m);
      index_t j = 0;
#if !defined(__CUDA_ARCH__)
      if constexpr (std::is_same_v<GT, Acc>) {
        using V = grun::detail::hvec_t<Acc>;
        // M rows × U vectors of dW1 in registers: U loads of h and M broadcasts per M·U FMAs.
        constexpr int VL = grun::detail::hvec_lanes<Acc>, U = wide_register_file ? 4 : 2;
        for (; j + U * VL <= d; j += U * VL) {
          V acc[M][U];
          GRUN_UNROLL
          for (int m = 0; m < M; ++m)
            GRUN_UNROLL
            for (int u = 0; u < U; ++u) acc[m][u] = grun::detail::vload(gw[m] + j + u * VL);
          for (index_t b = 0; b < B; ++b) {
            V hb[U];
            GRUN_UNROLL
            for (int u = 0; u < U; ++u) hb[u] = grun::detail::vload(h[b] + j + u * VL);
            GRUN_UNROLL
            for (int m = 0; m < M; ++m) {
              const V c = grun::detail::vsplat(scratch[b][i0 + m]);
              GRUN_UNROLL
              for (int u = 0; u < U; ++u) acc[m][u] += c * hb[u];
            }
          }
          GRUN_UNROLL
          for (int m = 0; m < M; ++m)
            GRUN_UNROLL
            for (int u = 0; u < U; ++u) grun::detail::vstore(gw[m] + j + u * VL, acc[m][u]);
        }
        for (; j + VL <= d; j += VL) {
          V acc[M];
          GRUN_UNROLL
          for (int m = 0; m < M; ++m) acc[m] = grun::detail::vload(gw[m] + j);
          for (index_t b = 0; b < B; ++b) {
            const V hb = grun::detail::vload(h[b] + j);
            GRUN_UNROLL
            for (int m = 0; m < M; ++m) acc[m] += grun::detail::vsplat(scratch[b][i0 + m]) * hb;
          }
          GRUN_UNROLL
          for (int m = 0; m < M; ++m) grun::detail::vstore(gw[m] + j, acc[m]);
        }
      }
#endif
      for (; j < d; ++j)
        for (int m = 0; m < M; ++m)
          for (index_t b = 0; b < B; ++b) gw[m][j] += scratch[b][i0 + m] * h[b][j];
    }
    for (; i0 < H1; ++i0)
      for (index_t b = 0; b < B; ++b) grun::detail::axpy_row(scratch[b][i0], h[b], grads.w1.row(i0), d);
  }

  /// dh[b] += W1ᵀ dz1[b] for a block's rows (dz1[b] = scratch[b][:H1]).
  template <class Acc, class P>
  static void first_layer_input_grad_block(const P& p, index_t B, index_t d, Acc* const* scratch, Acc* const* dh) {
    using WT = std::remove_cv_t<std::remove_pointer_t<decltype(p.w1.row(0))>>;
    // dh[b] += Σ_i dz1[b][i] W1[i] (i in order, zeros included): a slab of NB rows of dh in
    // registers while W1's slab (H1 × U vectors, 32 KB in fp32) stays in L1 across the rows of the block.
    index_t j0 = 0;
#if !defined(__CUDA_ARCH__)
    if constexpr (std::is_same_v<WT, Acc>) {
      using V = detail::gemm_vec_t<Acc>;
      // NB rows × U vectors of dh in registers: U loads of W1 and NB broadcasts per NB·U FMAs.
      // 32 registers and 16 fp32 lanes: 8 rows × 2 vectors; else 4 rows × 4 (32 registers) or × 2.
      constexpr int VL = detail::gemm_vec_lanes<Acc>, U = wide_register_file && VL < 16 ? 4 : 2;
      constexpr int NB = wide_register_file && VL >= 16 ? 8 : 4;
      constexpr index_t SW = U * VL;
      // W1's slab [H1, SW] packed contiguous: read in place, its rows lie d apart, and for d a
      // multiple of 1024 they all fall into the same few cache sets, so every group of NB rows
      // would fetch the slab again from L3.
      // With a single group of rows the slab is read once: packing would only add a copy.
      const bool pack = B > NB;
      std::vector<Acc> slab(pack ? std::size_t(H1 * SW) : 0);
      for (; j0 + SW <= d; j0 += SW) {
        if (pack)  // row by row with memcpy: clang copied the slab's elements one scalar at a time
          for (index_t i = 0; i < H1; ++i) std::memcpy(slab.data() + i * SW, p.w1.row(i) + j0, sizeof(Acc) * SW);
        for (index_t b0 = 0; b0 < B; b0 += NB) {
          const int nb = int(B - b0 < NB ? B - b0 : NB);
          V acc[NB][U];
          const Acc* c[NB];
          GRUN_UNROLL
          for (int k = 0; k < NB; ++k) {
            const index_t b = b0 + (k < nb ? k : 0);  // clamped rows compute, but are not stored
            c[k] = scratch[b];
            GRUN_UNROLL
            for (int u = 0; u < U; ++u) acc[k][u] = detail::gemm_load<V>(dh[b] + j0 + u * VL);
          }
          for (index_t i = 0; i < H1; ++i) {
            const Acc* w = pack ? slab.data() + i * SW : p.w1.row(i) + j0;
            V wv[U];
            GRUN_UNROLL
            for (int u = 0; u < U; ++u) wv[u] = detail::gemm_load<V>(w + u * VL);
            GRUN_UNROLL
            for (int k = 0; k < NB; ++k) {
              const V cv = detail::gemm_splat<V>(c[k][i]);
              GRUN_UNROLL
              for (int u = 0; u < U; ++u) acc[k][u] += cv * wv[u];
            }
          }
          GRUN_UNROLL  // the bound inside, as in gemm_tile: acc stays in registers
          for (int k = 0; k < NB; ++k)
            if (k < nb)
              GRUN_UNROLL
              for (int u = 0; u < U; ++u) detail::gemm_store(dh[b0 + k] + j0 + u * VL, acc[k][u]);
        }
      }
    }
#endif
    for (; j0 < d; ++j0)
      for (index_t b = 0; b < B; ++b)
        for (index_t i = 0; i < H1; ++i) dh[b][j0] += scratch[b][i] * load<Acc>(p.w1(i, j0));
  }

  /// Initialization (used by grun::init): He-normal hidden layers (W1 ~ N(0, 2/d), W2 ~ N(0, 2/H1)),
  /// zero biases, and a small output layer w3 ~ N(0, (0.01/√H2)²), b3 = 0, so the initial gate ≈ 0.5.
  template <class T, class S, class Rng>
  static void init(const params<T, S>& p, Rng& rng) {
    auto fill = [&](const param<T, S>& w, double sd) {
      for (index_t i = 0; i < w.size(); ++i) w[i] = store<T>(sd * rng.normal());
    };
    fill(p.w1, std::sqrt(2.0 / double(p.w1.cols)));
    fill(p.b1, 0.0);
    fill(p.w2, std::sqrt(2.0 / double(H1)));
    fill(p.b2, 0.0);
    fill(p.w3, 0.01 / std::sqrt(double(H2)));
    fill(p.b3, 0.0);
  }
};
static_assert(gate_policy<mlp<>>);
static_assert(gate_policy<mlp<3, 2>>);

}  // namespace grun::gate
