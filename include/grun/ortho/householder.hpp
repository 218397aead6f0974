#pragma once
// grun/ortho/householder.hpp — an exact parametrization of orthonormal rows by Householder
// reflections: the trainable raw tensor holds r vectors v_k ∈ R^d (stored [r, d], where R would be),
// and
//     R = E_r · H_1 · H_2 ⋯ H_r,   H_k = I − 2 v_k v_kᵀ / (v_kᵀ v_k),   E_r = [I_r 0]  (first r rows)
// Each H_k is orthogonal, so R's rows are orthonormal for any nonzero v_k, and no retraction is needed
// (cf. torch.nn.utils.parametrizations.orthogonal with orthogonal_map="householder").
// Forward materializes R once per call (O(r² d)); the backward maps dL/dR to dL/dv exactly.
// The two formulas below (reflection_coefficient, pullback_term) are GRUN_HD: exec::cuda's kernels
// (kernels/grun/cuda/householder.cuh) sweep the same recurrences with them.
#include <cmath>
#include <vector>

#include "../concepts.hpp"

namespace grun::ortho {

struct householder {
  static constexpr const char* name = "ortho::householder";
  static constexpr bool requires_rotation = true;
  static constexpr bool is_parametrization = true;

  template <class P> static void retract(P&) {}

  /// The coefficient of v in a row's reflection, m H = m − (2/n)(m·v) v with n = vᵀv: (2/n)·dot,
  /// given dot = m·v.
  GRUN_HD static constexpr double reflection_coefficient(double dot, double n) { return dot * (2.0 / n); }

  /// Row i's share of dL/dv_k at column j (pullback sums it over the rows i):
  ///   −(2/n)(m c + g a) + (4/n²) a c v,
  /// where m = M_{k−1}(i, j) (R's row i before H_k), g = G(i, j) (dL/dM_k), v = v_k(j), a = M_{k−1}(i)·v_k,
  /// c = G(i)·v_k, n = v_kᵀv_k.
  GRUN_HD static constexpr double pullback_term(double m, double g, double v, double a, double c, double n) {
    return -(2.0 / n) * (m * c + g * a) + (4.0 / (n * n)) * a * c * v;
  }

  /// R [r, d] (row-major double) from raw [r, d]. Throws numeric_error for a zero or non-finite v_k.
  template <class T, class S>
  static void materialize(const param<T, S>& raw, double* R) {
    const index_t r = raw.rows, d = raw.cols;
    check(raw);
    std::vector<double> v(static_cast<std::size_t>(d)), a(static_cast<std::size_t>(r));
    for (index_t i = 0; i < r; ++i)
      for (index_t j = 0; j < d; ++j) R[i * d + j] = (i == j) ? 1.0 : 0.0;
    for (index_t k = 0; k < r; ++k) apply(R, raw, k, v.data(), a.data());
  }

  /// draw [r, d] = dL/dv given dR = dL/dR (both row-major double; draw overwritten).
  ///   M_k = M_{k−1} H_k, a = M_{k−1} v, c = G v, n = vᵀv, G = dL/dM_k:
  ///   dL/dv = −(2/n) (M_{k−1}ᵀ c + Gᵀ a) + (4/n²)(aᵀc) v,   dL/dM_{k−1} = G H_k.
  template <class T, class S>
  static void pullback(const param<T, S>& raw, const double* dR, double* draw) {
    const index_t r = raw.rows, d = raw.cols;
    check(raw);
    const std::size_t rd = static_cast<std::size_t>(r * d);
    std::vector<double> M(rd * static_cast<std::size_t>(r + 1));  // M_0 .. M_r
    std::vector<double> v(static_cast<std::size_t>(d)), a(static_cast<std::size_t>(r)), c(a.size());
    for (index_t i = 0; i < r; ++i)
      for (index_t j = 0; j < d; ++j) M[i * d + j] = (i == j) ? 1.0 : 0.0;
    for (index_t k = 0; k < r; ++k) {
      std::copy(M.begin() + k * rd, M.begin() + (k + 1) * rd, M.begin() + (k + 1) * rd);
      apply(M.data() + (k + 1) * rd, raw, k, v.data(), a.data());
    }
    std::vector<double> G(dR, dR + rd);
    for (index_t k = r - 1; k >= 0; --k) {
      const double* Mp = M.data() + k * rd;  // M_{k-1} in the formula's numbering (before H_k)
      double n = 0;
      for (index_t j = 0; j < d; ++j) { v[j] = load<double>(raw(k, j)); n += v[j] * v[j]; }
      for (index_t i = 0; i < r; ++i) {
        double ai = 0, ci = 0;
        for (index_t j = 0; j < d; ++j) { ai += Mp[i * d + j] * v[j]; ci += G[i * d + j] * v[j]; }
        a[i] = ai; c[i] = ci;
      }
      double* out = draw + k * d;
      for (index_t j = 0; j < d; ++j) {
        double s = 0;
        for (index_t i = 0; i < r; ++i) s += pullback_term(Mp[i * d + j], G[i * d + j], v[j], a[i], c[i], n);
        out[j] = s;
      }
      for (index_t i = 0; i < r; ++i)
        for (index_t j = 0; j < d; ++j) G[i * d + j] -= reflection_coefficient(c[i], n) * v[j];
    }
  }

  /// Raw vectors ~ N(0, 1): R is then a uniformly random-ish orthonormal frame.
  template <class T, class S, class Rng>
  static void init(const param<T, S>& raw, Rng& rng) {
    for (index_t i = 0; i < raw.size(); ++i) raw[i] = store<T>(rng.normal());
  }

 private:
  template <class T, class S>
  static void check(const param<T, S>& raw) {
    static_assert(std::is_same_v<S, host_space>, "grun::ortho::householder: materialize runs on host parameters");
    require<shape_error>(raw.rows <= raw.cols, "householder: expected rank r <= hidden size d, got r = ", raw.rows,
                         ", d = ", raw.cols);
    for (index_t k = 0; k < raw.rows; ++k) {
      double n = 0;
      for (index_t j = 0; j < raw.cols; ++j) n += load<double>(raw(k, j)) * load<double>(raw(k, j));
      require<numeric_error>(std::isfinite(n) && n > 0, "householder: raw vector v_", k,
                             " must be nonzero and finite, got squared norm ", n);
    }
  }
  // M ← M H_k, M [r, d].
  template <class T, class S>
  static void apply(double* M, const param<T, S>& raw, index_t k, double* v, double* a) {
    const index_t r = raw.rows, d = raw.cols;
    double n = 0;
    for (index_t j = 0; j < d; ++j) { v[j] = load<double>(raw(k, j)); n += v[j] * v[j]; }
    for (index_t i = 0; i < r; ++i) {
      double s = 0;
      for (index_t j = 0; j < d; ++j) s += M[i * d + j] * v[j];
      a[i] = reflection_coefficient(s, n);
    }
    for (index_t i = 0; i < r; ++i)
      for (index_t j = 0; j < d; ++j) M[i * d + j] -= a[i] * v[j];
  }
};
static_assert(ortho_policy<householder>);

}  // namespace grun::ortho
