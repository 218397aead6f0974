#pragma once
// grun/io/dequant.hpp — ggml block formats decoded to float, one row at a time.
//
// Every block format stores QK consecutive elements of a row (ggml's ne[0] axis) in a fixed
// number of bytes. Scales are IEEE binary16, little-endian. Layouts (ggml-common.h; the GGUF
// spec's "quantization types"):
//
//   Q8_0  32 elements in 34 bytes:  d:f16, q[32]:int8             x_i = d · q_i
//   Q4_0  32 elements in 18 bytes:  d:f16, qs[16]:nibbles          x_i = (q_i − 8) · d
//   Q4_1  32 elements in 20 bytes:  d:f16, m:f16, qs[16]:nibbles   x_i = q_i · d + m
//
//   nibble order (Q4_*): byte j holds element j in its low nibble and element j + 16 in its
//   high nibble, so the low nibbles are elements 0..15 and the high nibbles 16..31.
//
// F32 / F16 / BF16 are "blocks" of one element. All functions are GRUN_HD, take raw bytes
// (no alignment assumed: a Q4_0 block is 18 bytes) and never allocate or throw, so a CUDA
// kernel can call exactly the same code. The caller guarantees n is a multiple of the block
// size and that src holds n / QK blocks; gguf_file checks both before it calls these.
#include <cstddef>
#include <cstdint>

#include "../core/config.hpp"
#include "../core/numeric.hpp"

namespace grun::io::dequant {

inline constexpr index_t q8_0_block = 32, q8_0_bytes = 2 + 32;
inline constexpr index_t q4_0_block = 32, q4_0_bytes = 2 + 16;
inline constexpr index_t q4_1_block = 32, q4_1_bytes = 2 + 2 + 16;

/// Little-endian 16-bit load from unaligned bytes (host byte order does not matter).
GRUN_HD GRUN_FORCEINLINE std::uint16_t load_u16(const unsigned char* p) {
  return static_cast<std::uint16_t>(p[0] | (p[1] << 8));
}
GRUN_HD GRUN_FORCEINLINE float load_f16(const unsigned char* p) { return half::to_float(load_u16(p)); }

/// One Q8_0 block → 32 floats.
GRUN_HD inline void q8_0_block_to_float(const unsigned char* b, float* out) {
  const float d = load_f16(b);
  for (int i = 0; i < 32; ++i) out[i] = d * static_cast<float>(static_cast<signed char>(b[2 + i]));
}
/// One Q4_0 block → 32 floats: x = (q − 8)·d.
GRUN_HD inline void q4_0_block_to_float(const unsigned char* b, float* out) {
  const float d = load_f16(b);
  const unsigned char* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    out[j] = static_cast<float>(static_cast<int>(qs[j] & 0x0f) - 8) * d;
    out[j + 16] = static_cast<float>(static_cast<int>(qs[j] >> 4) - 8) * d;
  }
}
/// One Q4_1 block → 32 floats: x = q·d + m.
GRUN_HD inline void q4_1_block_to_float(const unsigned char* b, float* out) {
  const float d = load_f16(b), m = load_f16(b + 2);
  const unsigned char* qs = b + 4;
  for (int j = 0; j < 16; ++j) {
    out[j] = static_cast<float>(qs[j] & 0x0f) * d + m;
    out[j + 16] = static_cast<float>(qs[j] >> 4) * d + m;
  }
}

/// Rows of n elements (n a multiple of the block size for the block formats).
GRUN_HD inline void row_q8_0(const unsigned char* src, float* dst, index_t n) {
  for (index_t b = 0; b < n / q8_0_block; ++b) q8_0_block_to_float(src + b * q8_0_bytes, dst + b * q8_0_block);
}
GRUN_HD inline void row_q4_0(const unsigned char* src, float* dst, index_t n) {
  for (index_t b = 0; b < n / q4_0_block; ++b) q4_0_block_to_float(src + b * q4_0_bytes, dst + b * q4_0_block);
}
GRUN_HD inline void row_q4_1(const unsigned char* src, float* dst, index_t n) {
  for (index_t b = 0; b < n / q4_1_block; ++b) q4_1_block_to_float(src + b * q4_1_bytes, dst + b * q4_1_block);
}
GRUN_HD inline void row_f32(const unsigned char* src, float* dst, index_t n) {
  for (index_t i = 0; i < n; ++i) {
    const unsigned char* p = src + 4 * i;
    const std::uint32_t u = std::uint32_t(p[0]) | (std::uint32_t(p[1]) << 8) | (std::uint32_t(p[2]) << 16) |
                            (std::uint32_t(p[3]) << 24);
    dst[i] = half::bit_cast_float(u);
  }
}
GRUN_HD inline void row_f16(const unsigned char* src, float* dst, index_t n) {
  for (index_t i = 0; i < n; ++i) dst[i] = load_f16(src + 2 * i);
}
GRUN_HD inline void row_bf16(const unsigned char* src, float* dst, index_t n) {
  for (index_t i = 0; i < n; ++i) dst[i] = bfloat16::to_float(load_u16(src + 2 * i));
}

}  // namespace grun::io::dequant
