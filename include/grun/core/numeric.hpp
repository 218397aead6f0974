#pragma once
// grun/core/numeric.hpp — storage types and their conversion to the compute type.
//
// half and bfloat16 are storage only: every policy loads them into float (acc_t), computes,
// and stores back with round-to-nearest-even. The same bit layouts as IEEE binary16,
// bfloat16, __half, __nv_bfloat16, at::Half and at::BFloat16, so adapters reinterpret
// pointers without copying.
#include <bit>
#include <cmath>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include "config.hpp"

namespace grun {

struct half {
  std::uint16_t bits = 0;
  half() = default;
  GRUN_HD explicit half(float f) : bits(from_float(f)) {}
  GRUN_HD explicit operator float() const { return to_float(bits); }

  GRUN_HD static float to_float(std::uint16_t h) {
    const std::uint32_t sign = (h & 0x8000u) << 16;
    std::uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, out;
    if (exp == 0x1f) {
      out = sign | 0x7f800000u | (man << 13);  // inf / nan
    } else if (exp == 0) {
      if (man == 0) {
        out = sign;
      } else {  // subnormal: renormalize
        int e = -1;
        do { ++e; man <<= 1; } while ((man & 0x400u) == 0);
        out = sign | ((127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
      }
    } else {
      out = sign | ((exp + 112) << 23) | (man << 13);
    }
    return bit_cast_float(out);
  }
  GRUN_HD static std::uint16_t from_float(float f) {
    std::uint32_t x = bit_cast_u32(f);
    const std::uint32_t sign = (x >> 16) & 0x8000u;
    x &= 0x7fffffffu;
    if (x >= 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7c00u | (x > 0x7f800000u ? 0x200u : 0));
    if (x >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // overflow → inf
    if (x < 0x38800000u) {  // subnormal or zero in half
      if (x < 0x33000000u) return static_cast<std::uint16_t>(sign);
      const std::uint32_t e = x >> 23, m = (x & 0x7fffffu) | 0x800000u;
      const std::uint32_t shift = 126 - e;  // 14 + (112 - e + 1) - 1
      std::uint32_t v = m >> shift;
      const std::uint32_t rem = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
      if (rem > halfway || (rem == halfway && (v & 1u))) ++v;
      return static_cast<std::uint16_t>(sign | v);
    }
    std::uint32_t v = ((x - 0x38000000u) >> 13);
    const std::uint32_t rem = x & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (v & 1u))) ++v;
    return static_cast<std::uint16_t>(sign | v);
  }
  GRUN_HD static float bit_cast_float(std::uint32_t u) { float f; __builtin_memcpy(&f, &u, 4); return f; }
  GRUN_HD static std::uint32_t bit_cast_u32(float f) { std::uint32_t u; __builtin_memcpy(&u, &f, 4); return u; }
};

struct bfloat16 {
  std::uint16_t bits = 0;
  bfloat16() = default;
  GRUN_HD explicit bfloat16(float f) : bits(from_float(f)) {}
  GRUN_HD explicit operator float() const { return to_float(bits); }

  GRUN_HD static float to_float(std::uint16_t b) { return half::bit_cast_float(std::uint32_t(b) << 16); }
  GRUN_HD static std::uint16_t from_float(float f) {
    std::uint32_t x = half::bit_cast_u32(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((x >> 16) | 0x40u);  // quiet nan
    x += 0x7fffu + ((x >> 16) & 1u);  // round to nearest even
    return static_cast<std::uint16_t>(x >> 16);
  }
};

static_assert(sizeof(half) == 2 && sizeof(bfloat16) == 2, "grun::half/bfloat16: must be 2-byte storage");

/// Storage types a tensor may hold.
template <class T>
inline constexpr bool is_storage_type_v =
    std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, half> ||
    std::is_same_v<T, bfloat16>;

/// Loads a storage value into the compute type.
template <class Acc, class T>
GRUN_HD GRUN_FORCEINLINE Acc load(const T& x) { return static_cast<Acc>(static_cast<float>(x)); }
template <class Acc> GRUN_HD GRUN_FORCEINLINE Acc load(const double& x) { return static_cast<Acc>(x); }
template <class Acc> GRUN_HD GRUN_FORCEINLINE Acc load(const float& x) { return static_cast<Acc>(x); }

/// Stores a compute value into a storage type (round to nearest even for 16-bit types).
template <class T, class Acc>
GRUN_HD GRUN_FORCEINLINE T store(Acc x) {
  if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) return static_cast<T>(x);
  else return T(static_cast<float>(x));
}

/// Runtime dtype tag, for files and framework adapters.
enum class dtype : std::uint8_t { f32, f64, f16, bf16 };

template <class T> constexpr dtype dtype_of() {
  if constexpr (std::is_same_v<T, float>) return dtype::f32;
  else if constexpr (std::is_same_v<T, double>) return dtype::f64;
  else if constexpr (std::is_same_v<T, half>) return dtype::f16;
  else if constexpr (std::is_same_v<T, bfloat16>) return dtype::bf16;
  else static_assert(sizeof(T) == 0, "grun::dtype_of: T is not a grun storage type (float, double, half, bfloat16)");
}
constexpr std::size_t size_of(dtype t) { return t == dtype::f64 ? 8 : t == dtype::f32 ? 4 : 2; }
constexpr std::string_view name_of(dtype t) {
  switch (t) {
    case dtype::f32: return "float32";
    case dtype::f64: return "float64";
    case dtype::f16: return "float16";
    case dtype::bf16: return "bfloat16";
  }
  return "?";
}

/// Numerically safe primitives shared by gates and losses.
template <class Acc> GRUN_HD GRUN_FORCEINLINE Acc sigmoid(Acc z) {
  // Branch on sign so exp never overflows: σ(z) = 1/(1+e^-z) = e^z/(1+e^z).
  if (z >= Acc(0)) { const Acc e = std::exp(-z); return Acc(1) / (Acc(1) + e); }
  const Acc e = std::exp(z);
  return e / (Acc(1) + e);
}
/// log σ(z) = −softplus(−z), stable for |z| large.
template <class Acc> GRUN_HD GRUN_FORCEINLINE Acc log_sigmoid(Acc z) {
  return z >= Acc(0) ? -std::log1p(std::exp(-z)) : z - std::log1p(std::exp(z));
}

}  // namespace grun
