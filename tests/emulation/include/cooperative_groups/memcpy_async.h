#pragma once
// Emulation shim for <cooperative_groups/memcpy_async.h> (tests/emulation): the collective copy
// is done by the group's threads in turn (each its strided share), and wait() is the group's
// barrier — the order of effects the real cp.async pipeline guarantees after wait(). The
// alignment an aligned_size_t<N> promises is checked: the hardware path would fault or fall back.
#include <cooperative_groups.h>
#include <cuda/barrier>

#include <cstdint>
#include <cstring>

namespace cooperative_groups {

namespace detail {
inline void copy_share(const thread_block& group, void* dst, const void* src, std::size_t bytes) {
  const std::size_t chunk = 16;
  for (std::size_t at = std::size_t(group.thread_rank()) * chunk; at < bytes; at += std::size_t(group.size()) * chunk)
    std::memcpy(static_cast<unsigned char*>(dst) + at, static_cast<const unsigned char*>(src) + at,
                bytes - at < chunk ? bytes - at : chunk);
}
}  // namespace detail

inline void memcpy_async(const thread_block& group, void* dst, const void* src, std::size_t bytes) {
  detail::copy_share(group, dst, src, bytes);
}

template <std::size_t Alignment>
void memcpy_async(const thread_block& group, void* dst, const void* src, ::cuda::aligned_size_t<Alignment> bytes) {
  if (std::uintptr_t(dst) % Alignment || std::uintptr_t(src) % Alignment || bytes.value % Alignment)
    ::grun_emu::fail_device("cooperative_groups::memcpy_async: aligned_size_t promised an alignment the pointers or the size do not have");
  detail::copy_share(group, dst, src, bytes.value);
}

inline void wait(const thread_block& group) { group.sync(); }

}  // namespace cooperative_groups
