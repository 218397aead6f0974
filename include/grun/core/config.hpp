#pragma once
// grun/core/config.hpp — compiler seams shared by every header.
#include <cstdint>

#if defined(__CUDACC__)
#  define GRUN_HD __host__ __device__
#  define GRUN_DEVICE __device__
#else
#  define GRUN_HD
#  define GRUN_DEVICE
#endif

#define GRUN_FORCEINLINE inline __attribute__((always_inline))

namespace grun {

/// All index arithmetic is 64-bit: T × V passes 2^31 for long contexts and large vocabularies.
using index_t = std::int64_t;

/// Every policy computes in this type, whatever the storage type (float, half, bfloat16).
/// Tests instantiate with double for finite-difference checks.
template <class Storage> struct accumulate_type { using type = float; };
template <> struct accumulate_type<double> { using type = double; };
template <class Storage> using acc_t = typename accumulate_type<Storage>::type;

}  // namespace grun
