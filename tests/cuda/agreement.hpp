#pragma once
// tests/cuda/agreement.hpp — host-vs-device comparison helpers shared by the CUDA tests.
#include <grun/cuda/check.cuh>

#include <algorithm>
#include <cmath>
#include <random>
#include <span>
#include <vector>

#include "cuda_test.hpp"

namespace grun::test {

/// Issue 4's agreement tolerances: fp32 rel 1e-5, bf16/fp16 rel 2e-2.
template <class T> constexpr double tolerance() {
  if constexpr (std::is_same_v<T, float>) return 1e-5;
  else if constexpr (std::is_same_v<T, double>) return 1e-12;
  else return 2e-2;
}

/// Norm-wise relative error max|a − b| / max(max|b|, tiny): stable when single entries are ~0.
template <class A, class B>
double rel_error(std::span<A> a, std::span<B> b) {
  REQUIRE(a.size() == b.size());
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double x = static_cast<double>(static_cast<float>(a[i])), y = static_cast<double>(static_cast<float>(b[i]));
    if (std::isnan(x) != std::isnan(y)) return INFINITY;
    if (std::isnan(x)) continue;
    num = std::max(num, std::abs(x - y));
    den = std::max(den, std::abs(y));
  }
  return num / std::max(den, 1e-30);
}
template <class A, class B>
double rel_error(const std::vector<A>& a, const std::vector<B>& b) {
  return rel_error(std::span<const A>(a), std::span<const B>(b));
}
template <class A, class B>
double rel_error(const std::vector<A>& a, const buffer<B>& b) {
  return rel_error(std::span<const A>(a), std::span<const B>(b.data(), static_cast<std::size_t>(b.size())));
}

/// Deterministic uniform fill in [lo, hi), stored in T.
template <class T>
void fill_uniform(std::span<T> x, unsigned seed, float lo = -1.f, float hi = 1.f) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  for (auto& v : x) v = store<T>(d(gen));
}

}  // namespace grun::test
