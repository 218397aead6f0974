#pragma once
// grun/core/simd.hpp — reductions and exp written so the compiler vectorizes them without
// -ffast-math, deterministically.
//
// A float reduction `s += a[j] * b[j]` is a dependent chain: GCC will not reorder it (that would
// change the rounding), so it runs at one FMA per 4 cycles. Splitting it into `lanes` independent
// partial sums, combined in a fixed order at the end, gives the vectorizer its freedom and the
// result is still the same on every run and every thread count (bench_host_torch measured ~8× on
// the LoReFT row products at d = 4096).
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "config.hpp"

namespace grun::simd {

/// Independent accumulators per reduction: 16 floats = two AVX2 or one AVX-512 register of lanes
/// with two chains each, enough to hide FMA latency.
template <class Acc> inline constexpr int lanes = std::is_same_v<Acc, double> ? 8 : 16;

/// Σ_j a[j]·b[j] in Acc, loading either side through `load`.
template <class Acc, class A, class B>
GRUN_HD GRUN_FORCEINLINE Acc dot(const A* a, const B* b, index_t n) {
  constexpr int L = lanes<Acc>;
  Acc part[L] = {};
  index_t j = 0;
  for (; j + L <= n; j += L)
    for (int k = 0; k < L; ++k) part[k] += static_cast<Acc>(a[j + k]) * static_cast<Acc>(b[j + k]);
  Acc tail = Acc(0);
  for (; j < n; ++j) tail += static_cast<Acc>(a[j]) * static_cast<Acc>(b[j]);
  for (int w = L / 2; w >= 1; w /= 2)
    for (int k = 0; k < w; ++k) part[k] += part[k + w];
  return part[0] + tail;
}

/// y[j] += alpha · x[j] (axpy; vectorizes as is, here for symmetry and documentation).
template <class Acc, class X>
GRUN_HD GRUN_FORCEINLINE void axpy(Acc alpha, const X* x, Acc* y, index_t n) {
  for (index_t j = 0; j < n; ++j) y[j] += alpha * static_cast<Acc>(x[j]);
}

/// Bit reinterpretation usable everywhere: __builtin_bit_cast keeps GCC's vectorizer happy (a
/// memcpy through a stack slot does not), but nvcc 13's front end crashes on it, so translation
/// units compiled by nvcc take the memcpy form (and __float_as_uint on the device).
template <class To, class From>
GRUN_HD GRUN_FORCEINLINE To bit_cast(From x) {
  static_assert(sizeof(To) == sizeof(From), "grun::simd::bit_cast: sizes differ");
#if defined(__CUDACC__)
  To y;
  __builtin_memcpy(&y, &x, sizeof(To));
  return y;
#else
  return __builtin_bit_cast(To, x);
#endif
}

/// e^x for float, branch-free so loops over it vectorize on any x86-64 ISA without -ffast-math:
/// Cody–Waite reduction x = n·ln2 + r, |r| ≤ ln2/2, a degree-6 Taylor polynomial for e^r (rel.
/// error < 2.3e-7, about one ulp), and 2^n assembled in the exponent bits. Every select is made on
/// the integer bits (a float `?:` under GCC's default -ftrapping-math stops the vectorizer below
/// AVX-512): x < −87.34 flushes to 0, x > 88.72 saturates to e^88.72, NaN passes through.
/// For double it is std::exp, so the tests' reference arithmetic stays exact.
template <class Acc>
GRUN_HD GRUN_FORCEINLINE Acc exp(Acc x) {
  if constexpr (std::is_same_v<Acc, double>) {
    return std::exp(x);
  } else {
    const std::uint32_t ux = bit_cast<std::uint32_t>(x);
    const std::uint32_t nan = 0u - std::uint32_t((ux & 0x7FFFFFFFu) > 0x7F800000u);
    const std::uint32_t under = 0u - std::uint32_t(ux > 0xC2AEAC4Fu);                         // x < −87.33654
    const std::uint32_t over = 0u - std::uint32_t((ux < 0x80000000u) & (ux > 0x42B17217u));  // x > 88.72283
    const std::uint32_t clamped = (0xC2AEAC4Fu & under) | (((0x42B17217u & over) | (ux & ~over)) & ~under);
    const float xc = bit_cast<float>(clamped);
    // Round x·log2(e) to the nearest integer n with the 1.5·2^23 trick: after the add, the low
    // mantissa bits of t hold n exactly (pure arithmetic; floorf and float→int conversions stop
    // GCC's vectorizer).
    const float t = xc * 1.44269504088896341f + 12582912.0f;
    const float n = t - 12582912.0f;
    float r = xc - n * 0.693359375f;  // ln2 split: high part exact in float,
    r = r - n * -2.12194440e-4f;      // low part carries the rest
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const std::int32_t e = bit_cast<std::int32_t>(t) - 0x4B400000 + 127;
    const std::uint32_t y = bit_cast<std::uint32_t>(p * bit_cast<float>(std::uint32_t(e) << 23)) & ~under;
    return bit_cast<float>((ux & nan) | (y & ~nan));
  }
}

}  // namespace grun::simd
