#pragma once
// grun/reft/loreft.hpp — low-rank linear subspace ReFT (Wu et al. 2024, "ReFT", arXiv 2404.03592, eq. 2):
//     Δ(h) = Rᵀ (W h + b − R h),   R [r, d] (orthonormal rows for loreft), W [r, d], b [r]
// The edit replaces the coordinates of h in R's row space by W h + b and leaves the orthogonal
// complement alone. noreft<r> is the same formula with R unconstrained.
//
// Memory layout: R is stored [r, d] (rows = the subspace basis). Reference checkpoints (pyreft)
// store `rotate_layer` as [d, r]; IO transposes that one tensor.
#include <array>
#include <cmath>
#include <string_view>
#include <type_traits>
#include <vector>

#include "../concepts.hpp"
#include "../rowmath.hpp"
#include "../ortho/none.hpp"
#include "../ortho/qr_retraction.hpp"
#include "init.hpp"

namespace grun::reft {

namespace detail {
/// Shared body of loreft and noreft (they differ only in the default orthogonality policy).
template <index_t Rank>
struct lowrank_edit {
  static_assert(Rank > 0, "grun::reft: rank r must be positive");
  static constexpr index_t rank = Rank;
  static constexpr bool has_rotation = true;

  template <class T, class Space = host_space>
  struct params {
    param<T, Space> rotate_layer;  // R [r, d]
    param<T, Space> weight;        // W [r, d]   (learned_source.weight)
    param<T, Space> bias;          // b [r]      (learned_source.bias)
  };
  static constexpr std::array<std::string_view, 3> param_names{"rotate_layer", "weight", "bias"};

  template <class T, class S>
  static void shape(params<T, S>& p, index_t d) {
    set_matrix(p.rotate_layer, Rank, d);
    set_matrix(p.weight, Rank, d);
    set_vector(p.bias, Rank);
  }
  template <class T, class S> static param<T, S>& rotation(params<T, S>& p) { return p.rotate_layer; }
  template <class T, class S> static const param<T, S>& rotation(const params<T, S>& p) { return p.rotate_layer; }

  /// scratch = [s = R h (r) | e = W h + b − R h (r)]
  GRUN_HD static constexpr index_t scratch_size(index_t) { return 2 * Rank; }

  template <class Acc, class P>
  GRUN_HD static void forward(const P& p, const Acc* h, index_t d, Acc* delta, Acc* scratch) {
    Acc* s = scratch;
    Acc* e = scratch + Rank;
    // R h and W h: up to 4 rows of each per pass over h (8 dots in flight, h read once per pass).
    for (index_t k0 = 0; k0 < Rank; k0 += group) {
      constexpr int G = int(Rank < group ? Rank : group);
      const std::remove_pointer_t<decltype(p.weight.row(0))>* rows[2 * G];
      Acc dots[2 * G];
      const int g = int(Rank - k0 < group ? Rank - k0 : group);
      for (int i = 0; i < G; ++i) {
        const index_t k = k0 + (i < g ? i : 0);
        rows[i] = p.rotate_layer.row(k);
        rows[G + i] = p.weight.row(k);
      }
      grun::detail::multi_dot<Acc, 2 * G>(rows, h, d, dots);
      for (int i = 0; i < g; ++i) {
        s[k0 + i] = dots[i];
        e[k0 + i] = dots[G + i] + load<Acc>(p.bias[k0 + i]) - dots[i];
      }
    }
    // Δ = Rᵀ e: one store per coordinate, k summed in order.
    rotate_back(p, e, delta, d);
  }

  // With δ = dL/dΔ and de = R δ [r]:
  //   dR_k += e_k δ − de_k h,   dW_k += de_k h,   db += de,   dh += Σ_k de_k (W_k − R_k).
  template <class Acc, class P, class G>
  GRUN_HD static void backward(const P& p, const G& grads, const Acc* h, index_t d, Acc* scratch, const Acc* ddelta,
                               Acc* dh) {
    const Acc* e = scratch + Rank;
    Acc de[Rank];
    for (index_t k0 = 0; k0 < Rank; k0 += 2 * group) {
      constexpr int N = int(Rank < 2 * group ? Rank : 2 * group);
      const int g = int(Rank - k0 < 2 * group ? Rank - k0 : 2 * group);
      const std::remove_pointer_t<decltype(p.weight.row(0))>* rows[N];
      Acc dots[N];
      for (int i = 0; i < N; ++i) rows[i] = p.rotate_layer.row(k0 + (i < g ? i : 0));
      grun::detail::multi_dot<Acc, N>(rows, ddelta, d, dots);
      for (int i = 0; i < g; ++i) de[k0 + i] = dots[i];
    }
    for (index_t k = 0; k < Rank; ++k) grads.bias[k] += de[k];
#if !defined(__CUDA_ARCH__)
    using WT = std::remove_cv_t<std::remove_pointer_t<decltype(p.weight.row(0))>>;
    using GT = std::remove_cv_t<std::remove_pointer_t<decltype(grads.weight.row(0))>>;
    if constexpr (std::is_same_v<WT, Acc> && std::is_same_v<GT, Acc> && Rank <= 8) {
      // All k in one pass (dh loaded and stored once); per element the same operations in the
      // same order as the per-k loop below.
      using V = grun::detail::hvec_t<Acc>;
      constexpr int L = grun::detail::hvec_lanes<Acc>;
      const Acc *r[Rank], *w[Rank];
      Acc *gr[Rank], *gw[Rank];
      V ev[Rank], dev[Rank];
      for (index_t k = 0; k < Rank; ++k) {
        r[k] = p.rotate_layer.row(k);
        w[k] = p.weight.row(k);
        gr[k] = grads.rotate_layer.row(k);
        gw[k] = grads.weight.row(k);
        ev[k] = grun::detail::vsplat(e[k]);
        dev[k] = grun::detail::vsplat(de[k]);
      }
      index_t j = 0;
      for (; j + L <= d; j += L) {
        const V hv = grun::detail::vload(h + j), dv = grun::detail::vload(ddelta + j);
        V dhv = grun::detail::vload(dh + j);
        GRUN_UNROLL
        for (index_t k = 0; k < Rank; ++k) {
          grun::detail::vstore(gr[k] + j, grun::detail::vload(gr[k] + j) + (ev[k] * dv - dev[k] * hv));
          grun::detail::vstore(gw[k] + j, grun::detail::vload(gw[k] + j) + dev[k] * hv);
          dhv += dev[k] * (grun::detail::vload(w[k] + j) - grun::detail::vload(r[k] + j));
        }
        grun::detail::vstore(dh + j, dhv);
      }
      for (; j < d; ++j)
        for (index_t k = 0; k < Rank; ++k) {
          gr[k][j] += e[k] * ddelta[j] - de[k] * h[j];
          gw[k][j] += de[k] * h[j];
          dh[j] += de[k] * (w[k][j] - r[k][j]);
        }
      return;
    }
#endif
    for (index_t k = 0; k < Rank; ++k) {
      lowrank_grad_row(e[k], de[k], p.rotate_layer.row(k), p.weight.row(k), ddelta, h, grads.rotate_layer.row(k),
                       grads.weight.row(k), dh, d);
    }
  }
  /// One k of the backward: gr += e δ − de h,  gw += de h,  dh += de (w − r).
  template <class Acc, class W, class GW>
  GRUN_HD static void lowrank_grad_row(Acc ek, Acc dek, const W* __restrict__ r, const W* __restrict__ w,
                                       const Acc* __restrict__ ddelta, const Acc* __restrict__ h, GW* __restrict__ gr,
                                       GW* __restrict__ gw, Acc* __restrict__ dh, index_t d) {
    for (index_t j = 0; j < d; ++j) {
      gr[j] += ek * ddelta[j] - dek * h[j];
      gw[j] += dek * h[j];
      dh[j] += dek * (load<Acc>(w[j]) - load<Acc>(r[j]));
    }
  }
  static constexpr index_t group = 4;

  /// delta = Rᵀ e [d] (k summed in order), up to 8 rows of R per pass.
  template <class Acc, class P>
  GRUN_HD static void rotate_back(const P& p, const Acc* e, Acc* delta, index_t d) {
    constexpr int N = int(Rank < 8 ? Rank : 8);
    const std::remove_pointer_t<decltype(p.rotate_layer.row(0))>* rows[N];
    for (int i = 0; i < N; ++i) rows[i] = p.rotate_layer.row(i);
    grun::detail::multi_axpy_set<Acc, N>(e, rows, delta, d);
    for (index_t k = N; k < Rank; ++k) grun::detail::axpy_row(e[k], p.rotate_layer.row(k), delta, d);
  }

#if !defined(__CUDA_ARCH__)
  // ---- host fast path: rows in blocks --------------------------------------------------------
  // Row by row, every row streams R and W (2·r·d values: 128 KB at r = 4, d = 4096, past L1) three
  // times — the dots, Rᵀe, the backward's dots and update — and dR, dW once each way. The block
  // forms read each once per pair of rows (the dots) or per block (Rᵀe, the update). Every value
  // they produce is, bit for bit, forward's / backward's on that row: each dot keeps multi_dot's
  // lane split and tree (tile_dot), each sum over k or over rows runs in the same order with the
  // same expressions. exec::host uses them; the CUDA kernels keep the rows.
  static constexpr index_t host_block_rows = 8;

  /// For b < B: delta[b] = Δ(h[b]) and scratch[b] as forward(h[b]) leaves them.
  template <class Acc, class P>
  static void forward_block(const P& p, const Acc* const* h, index_t B, index_t d, Acc* const* delta,
                            Acc* const* scratch) {
    using WT = std::remove_cv_t<std::remove_pointer_t<decltype(p.weight.row(0))>>;
    if constexpr (!std::is_same_v<WT, Acc>) {
      for (index_t b = 0; b < B; ++b) forward(p, h[b], d, delta[b], scratch[b]);
    } else {
      constexpr int G = int(Rank < group ? Rank : group), N = 2;  // tile: 2G rows of R, W × N rows of h
      for (index_t k0 = 0; k0 < Rank; k0 += group) {
        const int g = int(Rank - k0 < group ? Rank - k0 : group);
        const Acc* rows[2 * G];
        for (int i = 0; i < G; ++i) {
          const index_t k = k0 + (i < g ? i : 0);
          rows[i] = p.rotate_layer.row(k);
          rows[G + i] = p.weight.row(k);
        }
        for (index_t b0 = 0; b0 < B; b0 += N) {
          const Acc* x[N];
          for (int c = 0; c < N; ++c) x[c] = h[b0 + c < B ? b0 + c : b0];
          Acc dots[2 * G][N];
          grun::detail::tile_dot<Acc, 2 * G, N>(rows, x, d, dots);
          for (int c = 0; c < N && b0 + c < B; ++c) {
            Acc* sb = scratch[b0 + c];
            for (int i = 0; i < g; ++i) {
              sb[k0 + i] = dots[i][c];
              sb[Rank + k0 + i] = dots[G + i][c] + load<Acc>(p.bias[k0 + i]) - dots[i][c];
            }
          }
        }
      }
      rotate_back_block(p, scratch, delta, B, d);
    }
  }

  /// For b < B, in order: backward(h[b], scratch[b], ddelta[b]) into grads and dh[b].
  template <class Acc, class P, class Gr>
  static void backward_block(const P& p, const Gr& grads, const Acc* const* h, index_t B, index_t d,
                             Acc* const* scratch, const Acc* const* ddelta, Acc* const* dh) {
    using WT = std::remove_cv_t<std::remove_pointer_t<decltype(p.weight.row(0))>>;
    using GT = std::remove_cv_t<std::remove_pointer_t<decltype(grads.weight.row(0))>>;
    if constexpr (!std::is_same_v<WT, Acc> || !std::is_same_v<GT, Acc> || Rank > 8) {
      for (index_t b = 0; b < B; ++b) backward(p, grads, h[b], d, scratch[b], ddelta[b], dh[b]);
    } else {
      constexpr index_t RB = host_block_rows;
      constexpr int N = 2;
      Acc de[RB][Rank];
      for (index_t c0 = 0; c0 < B; c0 += RB) {  // RB rows at a time (de and the splats below are per row)
        const index_t nb = B - c0 < RB ? B - c0 : RB;
        // de = R δ for each row: tile_dot keeps multi_dot<Acc, Rank>'s lanes (backward's dots) for
        // Rank ≥ 2; one dot alone (Rank = 1) has lanes of its own, so it stays a dot.
        const Acc* rows[Rank];
        for (index_t k = 0; k < Rank; ++k) rows[k] = p.rotate_layer.row(k);
        if constexpr (Rank == 1)
          for (index_t b = 0; b < nb; ++b) de[b][0] = grun::detail::dot<Acc>(rows[0], ddelta[c0 + b], d);
        else
          for (index_t b0 = 0; b0 < nb; b0 += N) {
            const Acc* x[N];
            for (int c = 0; c < N; ++c) x[c] = ddelta[c0 + (b0 + c < nb ? b0 + c : b0)];
            Acc dots[Rank][N];
            grun::detail::tile_dot<Acc, int(Rank), N>(rows, x, d, dots);
            for (int c = 0; c < N && b0 + c < nb; ++c)
              for (index_t k = 0; k < Rank; ++k) de[b0 + c][k] = dots[k][c];
          }
        for (index_t b = 0; b < nb; ++b)
          for (index_t k = 0; k < Rank; ++k) grads.bias[k] += de[b][k];
        update_block(p, grads, h + c0, nb, d, scratch + c0, ddelta + c0, dh + c0, de);
      }
    }
  }

 private:
  /// delta[b] = Rᵀ e[b] (e = scratch[b] + Rank), k summed in order as rotate_back does.
  template <class Acc, class P>
  static void rotate_back_block(const P& p, Acc* const* scratch, Acc* const* delta, index_t B, index_t d) {
    if constexpr (Rank > 8) {
      for (index_t b = 0; b < B; ++b) rotate_back(p, scratch[b] + Rank, delta[b], d);
    } else {
      using V = grun::detail::hvec_t<Acc>;
      constexpr int L = grun::detail::hvec_lanes<Acc>;
      constexpr index_t RB = host_block_rows;
      const Acc* r[Rank];
      for (index_t k = 0; k < Rank; ++k) r[k] = p.rotate_layer.row(k);
      for (index_t c0 = 0; c0 < B; c0 += RB) {
        const index_t nb = B - c0 < RB ? B - c0 : RB;
        // Local copies (splats and row pointers): the stores below could alias the caller's arrays,
        // so read through them the compiler would reload each one on every iteration.
        V es[RB][Rank];
        Acc* out[RB];
        for (index_t b = 0; b < nb; ++b) {
          out[b] = delta[c0 + b];
          for (index_t k = 0; k < Rank; ++k) es[b][k] = grun::detail::vsplat(scratch[c0 + b][Rank + k]);
        }
        index_t j = 0;
        for (; j + L <= d; j += L) {
          V rv[Rank];
          GRUN_UNROLL
          for (index_t k = 0; k < Rank; ++k) rv[k] = grun::detail::vload(r[k] + j);
          for (index_t b = 0; b < nb; ++b) {
            V s = rv[0] * es[b][0];
            GRUN_UNROLL
            for (index_t k = 1; k < Rank; ++k) s += rv[k] * es[b][k];
            grun::detail::vstore(out[b] + j, s);
          }
        }
        for (index_t b = 0; b < nb; ++b) {
          const Acc* e = scratch[c0 + b] + Rank;
          for (index_t jj = j; jj < d; ++jj) {
            Acc s = r[0][jj] * e[0];
            for (index_t k = 1; k < Rank; ++k) s += r[k][jj] * e[k];
            out[b][jj] = s;
          }
        }
      }
    }
  }

  /// backward's single pass for B ≤ host_block_rows rows: dR_k += e_k δ − de_k h, dW_k += de_k h
  /// (rows in order), dh += Σ_k de_k (W_k − R_k); dR, dW, W − R loaded once per block.
  template <class Acc, class P, class Gr>
  static void update_block(const P& p, const Gr& grads, const Acc* const* h, index_t B, index_t d, Acc* const* scratch,
                           const Acc* const* ddelta, Acc* const* dh, const Acc (*de)[Rank]) {
    using V = grun::detail::hvec_t<Acc>;
    constexpr int L = grun::detail::hvec_lanes<Acc>;
    const Acc *r[Rank], *w[Rank];
    Acc *gr[Rank], *gw[Rank];
    for (index_t k = 0; k < Rank; ++k) {
      r[k] = p.rotate_layer.row(k);
      w[k] = p.weight.row(k);
      gr[k] = grads.rotate_layer.row(k);
      gw[k] = grads.weight.row(k);
    }
    // Local copies (splats and row pointers), as in rotate_back_block.
    constexpr index_t RB = host_block_rows;
    V es[RB][Rank], des[RB][Rank];
    const Acc *hp[RB], *dp[RB];
    Acc* dhp[RB];
    for (index_t b = 0; b < B; ++b) {
      hp[b] = h[b];
      dp[b] = ddelta[b];
      dhp[b] = dh[b];
      for (index_t k = 0; k < Rank; ++k) {
        es[b][k] = grun::detail::vsplat(scratch[b][Rank + k]);
        des[b][k] = grun::detail::vsplat(de[b][k]);
      }
    }
    index_t j = 0;
    for (; j + L <= d; j += L) {
      V grv[Rank], gwv[Rank], wr[Rank];
      GRUN_UNROLL
      for (index_t k = 0; k < Rank; ++k) {
        grv[k] = grun::detail::vload(gr[k] + j);
        gwv[k] = grun::detail::vload(gw[k] + j);
        wr[k] = grun::detail::vload(w[k] + j) - grun::detail::vload(r[k] + j);
      }
      for (index_t b = 0; b < B; ++b) {
        const V hv = grun::detail::vload(hp[b] + j), dv = grun::detail::vload(dp[b] + j);
        V dhv = grun::detail::vload(dhp[b] + j);
        GRUN_UNROLL
        for (index_t k = 0; k < Rank; ++k) {
          grv[k] = grv[k] + (es[b][k] * dv - des[b][k] * hv);
          gwv[k] = gwv[k] + des[b][k] * hv;
          dhv += des[b][k] * wr[k];
        }
        grun::detail::vstore(dhp[b] + j, dhv);
      }
      GRUN_UNROLL
      for (index_t k = 0; k < Rank; ++k) {
        grun::detail::vstore(gr[k] + j, grv[k]);
        grun::detail::vstore(gw[k] + j, gwv[k]);
      }
    }
    for (index_t b = 0; b < B; ++b) {
      const Acc* e = scratch[b] + Rank;
      for (index_t jj = j; jj < d; ++jj)
        for (index_t k = 0; k < Rank; ++k) {
          gr[k][jj] += e[k] * ddelta[b][jj] - de[b][k] * h[b][jj];
          gw[k][jj] += de[b][k] * h[b][jj];
          dh[b][jj] += de[b][k] * (w[k][jj] - r[k][jj]);
        }
    }
  }

 public:
#endif

  /// Initialization (used by grun::init): reft/init.hpp's, rotate_layer orthonormalized Gaussian
  /// rows, weight ~ N(0, 1/d), bias = 0.
  template <class T, class S, class Rng>
  static void init(const params<T, S>& p, Rng& rng) { detail::init_lowrank<T>(p, rng); }
};
}  // namespace detail

/// LoReFT: R's rows orthonormal, kept so by QR retraction unless another ortho policy is named.
template <index_t Rank>
struct loreft : detail::lowrank_edit<Rank> {
  static constexpr const char* name = "reft::loreft";
  using default_ortho = ortho::qr_retraction;
};

/// NoReFT: the LoReFT formula with R an ordinary trainable matrix.
template <index_t Rank>
struct noreft : detail::lowrank_edit<Rank> {
  static constexpr const char* name = "reft::noreft";
  using default_ortho = ortho::none;
};

static_assert(reft_policy<loreft<4>>);
static_assert(reft_policy<loreft<1>>);
static_assert(reft_policy<noreft<4>>);

}  // namespace grun::reft
