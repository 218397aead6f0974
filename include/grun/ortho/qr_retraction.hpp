#pragma once
// grun/ortho/qr_retraction.hpp — keep R's rows orthonormal by retraction: after each optimizer step
// R ← Qᵀ where Rᵀ = Q·U is the thin QR factorization with diag(U) > 0 (the sign fix makes the map
// continuous and the identity on already-orthonormal R, so R moves as little as possible).
// Computed by modified Gram–Schmidt over R's rows, in double, with one re-orthogonalization pass
// ("twice is enough", Giraud et al. 2005) so the result is orthonormal to ~1e-15 for r ≤ 32.
#include <cmath>
#include <vector>

#include "../concepts.hpp"

namespace grun::ortho {

namespace detail {
/// Orthonormalizes the r rows of R [r, d] (row-major, double) in place; Gram–Schmidt keeps each
/// row's component along itself positive, i.e. diag(U) > 0. Throws numeric_error when the rows are
/// (numerically) linearly dependent or not finite.
inline void orthonormalize_rows(double* R, index_t r, index_t d) {
  require<shape_error>(r <= d, "qr_retraction: expected rank r <= hidden size d, got r = ", r, ", d = ", d);
  for (index_t k = 0; k < r; ++k) {
    double* rk = R + k * d;
    double norm0 = 0;
    for (index_t j = 0; j < d; ++j) norm0 += rk[j] * rk[j];
    norm0 = std::sqrt(norm0);
    require<numeric_error>(std::isfinite(norm0) && norm0 > 0, "qr_retraction: row ", k,
                           " of R is zero or not finite (norm ", norm0, "); cannot orthonormalize");
    for (int pass = 0; pass < 2; ++pass) {
      for (index_t i = 0; i < k; ++i) {
        const double* ri = R + i * d;
        double dot = 0;
        for (index_t j = 0; j < d; ++j) dot += ri[j] * rk[j];
        for (index_t j = 0; j < d; ++j) rk[j] -= dot * ri[j];
      }
    }
    double norm = 0;
    for (index_t j = 0; j < d; ++j) norm += rk[j] * rk[j];
    norm = std::sqrt(norm);
    require<numeric_error>(norm > 1e-12 * norm0, "qr_retraction: row ", k,
                           " of R is linearly dependent on the rows before it; cannot orthonormalize");
    for (index_t j = 0; j < d; ++j) rk[j] /= norm;
  }
}
}  // namespace detail

struct qr_retraction {
  static constexpr const char* name = "ortho::qr_retraction";
  static constexpr bool requires_rotation = true;
  static constexpr bool is_parametrization = false;

  /// R [r, d] ← rows of the Q factor of QR(Rᵀ), sign-fixed. Host memory only.
  template <class T, class S>
  static void retract(const param<T, S>& R) {
    static_assert(std::is_same_v<S, host_space>, "grun::ortho::qr_retraction: retract runs on host parameters");
    if (R.size() == 0) return;
    std::vector<double> tmp(static_cast<std::size_t>(R.size()));
    for (index_t i = 0; i < R.size(); ++i) tmp[i] = load<double>(R[i]);
    detail::orthonormalize_rows(tmp.data(), R.rows, R.cols);
    for (index_t i = 0; i < R.size(); ++i) R[i] = store<T>(tmp[i]);
  }
};
static_assert(ortho_policy<qr_retraction>);

}  // namespace grun::ortho
