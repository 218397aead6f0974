#pragma once
// grun/cuda/fused/tensor_core.cuh — the tensor-core pieces the 16-bit kernels share (the forward,
// the coefficient kernel, the slot kernel): mma.sync m16n8k16 with fp32 accumulate, its operands
// from plain 16-byte loads, coefficients as bf16 hi + lo pairs, movmatrix, cp.async, and the
// staged parameter rows. Part of intervention_fused.cuh (include that).
//
// The sum over k is order-free, so a thread's fragments come from plain 16-byte loads: lane (g, t)
// (g = lane / 4, t = lane % 4) loads 8 consecutive elements of h row g at vector v, and of parameter
// rows g and g + 8 at the same vector; words 2s and 2s + 1 of those vectors are its k = 2t..2t+1 and
// 2t+8..2t+9 registers of mma step s (s = 0, 1). Every lane maps a logical k to the same physical
// column, which is all the product needs.

#include <type_traits>

#include "common.cuh"

namespace grun::cuda::fused::detail {

/// Threads per CTA of the tensor schedule: 8 warps share a tile's columns.
inline constexpr int tensor_block = 256;
/// Rows per tile: the mma's n.
inline constexpr int tensor_rows = 8;
/// Most vectors of 8 elements per thread (held in registers): d ≤ 16 · 4 · 8 warps · 8 = 4096.
inline constexpr int tensor_max_held = 16;

/// c += a · b: one mma.sync.m16n8k16, row-major a (16 × 16), column-major b (16 × 8), fp32 c.
template <class T>
__device__ __forceinline__ void mma_16816(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                          unsigned b0, unsigned b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, bfloat16>)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#elif defined(GRUN_CUDA_EMULATION)
  ::grun_emu::mma_16816<device_type_t<T>>(c, a0, a1, a2, a3, b0, b1);  // tests/emulation: the warp collective
#else
  __trap();  // the host never launches it; sm < 80 never dispatches here (launch_forward_tensor checks)
#endif
}

// Asynchronous copies (cp.async, sm_80+): 16 bytes from global to shared memory without passing
// through registers (.cg: cached in L2, not L1), in groups a thread commits and later waits for.
/// Starts one 16-byte copy (both addresses 16-byte aligned); it lands when a cp_async_wait covers
/// the group it is committed with.
__device__ __forceinline__ void cp_async_16(void* shared_dst, const void* global_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned to = static_cast<unsigned>(__cvta_generic_to_shared(shared_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(to), "l"(global_src) : "memory");
#elif defined(GRUN_CUDA_EMULATION)
  ::grun_emu::cp_async_16(shared_dst, global_src);  // tests/emulation: lands at the wait, poison until then
#else
  __trap();  // never launched below sm_80 (the launches check limits_of_device().mma)
#endif
}
/// Closes the thread's current group of copies (an empty group is a group).
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#elif defined(GRUN_CUDA_EMULATION)
  ::grun_emu::cp_async_commit();
#endif
}
/// Waits until at most N of the thread's committed groups are still in flight. Other threads' copies
/// need a barrier after it.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#elif defined(GRUN_CUDA_EMULATION)
  ::grun_emu::cp_async_wait(N);
#endif
}

/// The two 16-bit elements of a 32-bit word (lower address in the low half) → float.
template <class T>
__device__ __forceinline__ void unpack_pair(unsigned w, float& lo, float& hi) {
  if constexpr (std::is_same_v<T, bfloat16>) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
  } else {
    const __half2 p = *reinterpret_cast<const __half2*>(&w);
    const float2 f = __half22float2(p);
    lo = f.x;
    hi = f.y;
  }
}

/// Word j (0–3) of a 16-byte vector: elements 2j (low half) and 2j + 1 (high) of 16-bit storage.
__device__ __forceinline__ unsigned word_of(const uint4& v, int j) { return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w; }

/// c += A · B over one 16-byte vector per lane (two m16n8k16 steps): lane (g, t) gives rows g, g + 8
/// of A as the vectors a_g, a_g8 and column g of B as b, 8 consecutive k each — the dots' fragments
/// of the forward and the coefficient kernel (the sum over k does not care which physical column a
/// logical k is, so long as every operand maps it the same way).
template <class T>
__device__ __forceinline__ void mma_vector(float (&c)[4], const uint4& a_g, const uint4& a_g8, const uint4& b) {
  mma_16816<T>(c, a_g.x, a_g8.x, a_g.y, a_g8.y, b.x, b.y);
  mma_16816<T>(c, a_g.z, a_g8.z, a_g.w, a_g8.w, b.z, b.w);
}

/// Lane (g, t)'s C fragment of m-tile mt (rows 16mt + g, + 8; columns 2t, 2t + 1) into part[row][column].
template <int COLS>
__device__ __forceinline__ void store_fragment(const float (&c)[4], float (*part)[COLS], int mt, int g, int t) {
  part[16 * mt + g][2 * t] = c[0];
  part[16 * mt + g][2 * t + 1] = c[1];
  part[16 * mt + g + 8][2 * t] = c[2];
  part[16 * mt + g + 8][2 * t + 1] = c[3];
}

// Coefficients as mma operands (bf16): each split into hi + lo, multiplied twice.
/// The bits of bf16(x), rounded to nearest even.
__device__ __forceinline__ unsigned bf16_bits(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
/// Two coefficients (a at the lower k) as bf16 pairs: hi = bf16(a), bf16(b); lo = their remainders.
__device__ __forceinline__ void split_pair(float a, float b, unsigned& hi, unsigned& lo) {
  const unsigned ah = bf16_bits(a), bh = bf16_bits(b);
  hi = ah | bh << 16;
  lo = bf16_bits(a - __uint_as_float(ah << 16)) | bf16_bits(b - __uint_as_float(bh << 16)) << 16;
}

/// An A fragment of m16n8k16 (row-major 16 × 16) from a(row, k) → float, as hi and lo words:
/// lane (g, t) holds rows g, g + 8 at k = 2t, 2t + 1 and 2t + 8, 2t + 9.
template <class Entry>
__device__ __forceinline__ void a_fragment(int g, int t, Entry a, unsigned (&hi)[4], unsigned (&lo)[4]) {
  split_pair(a(g, 2 * t), a(g, 2 * t + 1), hi[0], lo[0]);
  split_pair(a(g + 8, 2 * t), a(g + 8, 2 * t + 1), hi[1], lo[1]);
  split_pair(a(g, 2 * t + 8), a(g, 2 * t + 9), hi[2], lo[2]);
  split_pair(a(g + 8, 2 * t + 8), a(g + 8, 2 * t + 9), hi[3], lo[3]);
}

/// c += (hi + lo) · b.
__device__ __forceinline__ void mma_split(float (&c)[4], const unsigned (&hi)[4], const unsigned (&lo)[4], unsigned b0,
                                          unsigned b1) {
  mma_16816<bfloat16>(c, hi[0], hi[1], hi[2], hi[3], b0, b1);
  mma_16816<bfloat16>(c, lo[0], lo[1], lo[2], lo[3], b0, b1);
}

/// The row stride of every row staged in shared memory for the tensor-core kernels (parameter rows,
/// and the pipelined forward's tile rows): a multiple of 64 elements plus 32, i.e. ≡ 64 bytes mod
/// 128. Their lanes 4g + t read 16-byte vector t + 4·warp (+ a chunk's offset) of row g, so a
/// quarter-warp (the unit of a 16-byte shared load) reads 64 contiguous bytes of each of two rows;
/// 64 bytes apart mod 128, those fill the 32 banks once. (A stride of d + 8 puts the two rows 16
/// bytes apart mod 128: their vectors overlap in 3 of 4 bank groups, a 2-way conflict; d, in all 4.)
GRUN_HD constexpr index_t staged_row_stride(index_t d) { return (d + 63) / 64 * 64 + 32; }

/// The CTA copies module m's 2R+1 parameter rows [U; D; w] (zeros for a null w: no gate) into shared
/// memory, rows lds elements apart, and waits for all of it. d % 8 == 0.
template <class T, int R>
__device__ __forceinline__ void stage_parameter_rows(const src_ptrs<T>& m, index_t d, T* staged, index_t lds) {
  const int nvec = int(d / 8);
#pragma unroll 1
  for (int r = 0; r < 2 * R + 1; ++r) {
    const T* src = param_row(m, r, R, d);
    T* to = staged + r * lds;
    if (src == nullptr) {  // the gate row without a gate: zeros
      for (int v = int(threadIdx.x); v < nvec; v += int(blockDim.x)) reinterpret_cast<uint4*>(to)[v] = make_uint4(0, 0, 0, 0);
    } else if ((reinterpret_cast<std::uintptr_t>(src) & 15u) == 0) {
      for (int v = int(threadIdx.x); v < nvec; v += int(blockDim.x))
        reinterpret_cast<uint4*>(to)[v] = __ldg(reinterpret_cast<const uint4*>(src) + v);
    } else {  // a tensor that starts mid-vector (e.g. after a bias of r elements in one flat buffer)
      for (index_t j = threadIdx.x; j < d; j += blockDim.x) to[j] = src[j];
    }
  }
  __syncthreads();
}


/// M^T of an 8 × 8 matrix of 16-bit elements spread over the warp (lane 4g + t holds M[g][2t..2t+1],
/// the lower column in the low half; it gets M^T[g][2t..2t+1]). Every lane of the warp calls it.
__device__ __forceinline__ unsigned transpose_8x8(unsigned a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  unsigned d;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(d) : "r"(a));
  return d;
#elif defined(GRUN_CUDA_EMULATION)
  return ::grun_emu::movmatrix_trans(a);
#else
  __trap();  // never dispatched below sm_80 (backward_impl checks)
  return a;
#endif
}

/// The A fragment of the transposed 16 × 16 matrix, from a's: its 8 × 8 blocks swap places across the
/// diagonal (a1, rows 8–15 × k 0–7, and a2, rows 0–7 × k 8–15) and each is transposed.
__device__ __forceinline__ void transpose_a(const unsigned (&a)[4], unsigned (&t)[4]) {
  t[0] = transpose_8x8(a[0]);
  t[1] = transpose_8x8(a[2]);
  t[2] = transpose_8x8(a[1]);
  t[3] = transpose_8x8(a[3]);
}

}  // namespace grun::cuda::fused::detail
