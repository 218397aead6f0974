#pragma once
// grun/loss/detail/parallel.hpp — row-parallel loop for exec::host.
//
// Rows are split into contiguous blocks, one per worker; each row's result is written by exactly
// one worker and never combined across rows here, so results are bitwise independent of
// `threads` (exec::host's determinism rule). Reductions over rows are done afterwards, in row
// order, on the calling thread.
#include <algorithm>
#include <exception>
#include <thread>
#include <vector>

#include "../../core/tensor.hpp"
#include "../../exec/host.hpp"

namespace grun::loss::detail {

template <class E> inline constexpr bool always_false_v = false;

/// Calls f(i) for every i in [0, n). `work_per_row` (elements touched) sizes the split: a thread
/// costs tens of microseconds to start, so fewer than ~64k elements per worker stay serial.
template <class F>
void parallel_rows(const exec::host_t& ex, index_t n, index_t work_per_row, F&& f) {
  if (n <= 0) return;
  index_t workers = ex.threads == 0 ? static_cast<index_t>(std::max(1u, std::thread::hardware_concurrency()))
                                    : static_cast<index_t>(ex.threads);
  const index_t min_rows = std::max<index_t>(1, (index_t{1} << 16) / std::max<index_t>(1, work_per_row));
  workers = std::min(workers, (n + min_rows - 1) / min_rows);
  if (workers <= 1) {
    for (index_t i = 0; i < n; ++i) f(i);
    return;
  }
  const index_t chunk = (n + workers - 1) / workers;
  auto run = [&](index_t k) {
    const index_t lo = k * chunk, hi = std::min(n, lo + chunk);
    for (index_t i = lo; i < hi; ++i) f(i);
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<std::size_t>(workers - 1));
  try {
    for (index_t k = 1; k < workers; ++k) pool.emplace_back(run, k);
  } catch (...) {
    // Could not start every worker: finish the blocks that have none on this thread.
    for (auto& t : pool) t.join();
    for (index_t k = static_cast<index_t>(pool.size()) + 1; k < workers; ++k) run(k);
    run(0);
    return;
  }
  run(0);
  for (auto& t : pool) t.join();
}

}  // namespace grun::loss::detail
