#pragma once
// Emulation shim for cub::DeviceReduce::Sum (tests/emulation), to cub's contract: a call with a
// null temporary only sets temp_storage_bytes; the call with storage sums num_items inputs into
// *out, in the accumulator type of the inputs, on the (synchronous) stream. Checked as the device
// would fault: the temporary must be device memory of at least the asked bytes (it is written
// over, so an undersized one is an ASan report), the output and the input's array device memory.
// The order of the sum is sequential, not cub's tiled tree: results agree with the device's to
// rounding, not bit for bit.
#include <cuda_emulation.hpp>

#include <thrust/iterator/transform_iterator.h>

#include <cstddef>
#include <cstring>
#include <type_traits>

namespace cub {

namespace emulation_detail {

/// The array an input iterator reads: the pointer itself, or the one under its base() chain.
template <class It>
auto array_of(It it) {
  if constexpr (std::is_pointer_v<It>) return it;
  else return array_of(it.base());
}

}  // namespace emulation_detail

struct DeviceReduce {
  static constexpr std::size_t temp_bytes = 512;  // any positive size: a caller must allocate what it is told

  template <class InputIt, class OutputIt, class NumItems>
  static cudaError_t Sum(void* temp, std::size_t& temp_bytes_inout, InputIt in, OutputIt out, NumItems num_items,
                         cudaStream_t = nullptr) {
    if (temp == nullptr) {
      temp_bytes_inout = temp_bytes;
      return cudaSuccess;
    }
    using acc_t = std::decay_t<decltype(in[0])>;
    const std::size_t n = num_items > 0 ? std::size_t(num_items) : 0;
    if (temp_bytes_inout < temp_bytes || !::grun_emu::in_device_memory(temp, temp_bytes) ||
        !::grun_emu::in_device_memory(&*out, sizeof(*out)) ||
        (n > 0 && !::grun_emu::in_device_memory(emulation_detail::array_of(in), n * sizeof(*emulation_detail::array_of(in)))))
      return cudaErrorInvalidValue;
    std::memset(temp, 0xA5, temp_bytes);  // the temporary is cub's to use: scribbled over
    acc_t sum{};
    for (std::size_t i = 0; i < n; ++i) sum = sum + in[std::ptrdiff_t(i)];
    *out = sum;
    return cudaSuccess;
  }
};

}  // namespace cub
