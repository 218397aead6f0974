#pragma once
// Emulation shim for cub::DeviceReduce::Sum and Max (tests/emulation), to cub's contract: a call
// with a null temporary only sets temp_storage_bytes; the call with storage reduces num_items inputs
// into *out, in the accumulator type of the inputs, in the stream's order (an empty Max gives
// the type's lowest value, as cub's does). Checked as the device
// would fault: the temporary must be device memory of at least the asked bytes (it is written
// over, so an undersized one is an ASan report), the output and the input's array device memory.
// The order of the sum is sequential, not cub's tiled tree: results agree with the device's to
// rounding, not bit for bit.
#include <cuda_emulation.hpp>

#include <thrust/iterator/transform_iterator.h>

#include <cstddef>
#include <cstring>
#include <limits>
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
                         cudaStream_t stream = nullptr) {
    using acc_t = std::decay_t<decltype(in[0])>;
    return reduce(temp, temp_bytes_inout, in, out, num_items, acc_t{}, [](const acc_t& a, const acc_t& b) { return a + b; },
                  stream);
  }
  template <class InputIt, class OutputIt, class NumItems>
  static cudaError_t Max(void* temp, std::size_t& temp_bytes_inout, InputIt in, OutputIt out, NumItems num_items,
                         cudaStream_t stream = nullptr) {
    using acc_t = std::decay_t<decltype(in[0])>;
    return reduce(temp, temp_bytes_inout, in, out, num_items, std::numeric_limits<acc_t>::lowest(),
                  [](const acc_t& a, const acc_t& b) { return a < b ? b : a; }, stream);
  }

 private:
  template <class InputIt, class OutputIt, class NumItems, class Acc, class Op>
  static cudaError_t reduce(void* temp, std::size_t& temp_bytes_inout, InputIt in, OutputIt out, NumItems num_items,
                            Acc init, Op op, cudaStream_t stream) {
    if (temp == nullptr) {
      temp_bytes_inout = temp_bytes;
      return cudaSuccess;
    }
    const std::size_t n = num_items > 0 ? std::size_t(num_items) : 0;
    if (temp_bytes_inout < temp_bytes || !::grun_emu::in_device_memory(temp, temp_bytes) ||
        !::grun_emu::in_device_memory(&*out, sizeof(*out)) ||
        (n > 0 && !::grun_emu::in_device_memory(emulation_detail::array_of(in), n * sizeof(*emulation_detail::array_of(in)))))
      return cudaErrorInvalidValue;
    ::grun_emu::issue(stream, [=] {
      std::memset(temp, 0xA5, temp_bytes);  // the temporary is cub's to use: scribbled over
      Acc acc = init;
      for (std::size_t i = 0; i < n; ++i) acc = op(acc, in[std::ptrdiff_t(i)]);
      *out = acc;
    });
    return cudaSuccess;
  }
};

}  // namespace cub
