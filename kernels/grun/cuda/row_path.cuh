#pragma once
// grun/cuda/row_path.cuh — what the row path's kernels share. There one thread runs a policy's own
// GRUN_HD row math over whole rows, the code exec::host runs: gated_intervention::forward_row /
// backward_row on the generic path (intervention.cuh), a user's gate's forward / backward beside the
// fused ReFT kernels (intervention_row_gate.cuh).
//
// Parameter gradients are reduced in two deterministic stages, like the host's: stage 1 gives each
// slot (one thread, a fixed run of consecutive positions) its own gradient aggregate — and, in a
// stack, a sink for the frozen modules' gradients, which are computed and dropped —; stage 2 sums
// the slots in slot order per parameter (one thread per parameter, in double). No atomics: the
// result is bitwise repeatable whatever the launch order, so exec::cuda_t::deterministic holds.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "check.cuh"  // first: exec::host_t before exec/cuda.hpp
#include "scratch.cuh"

#include <grun/intervention.hpp>

namespace grun::cuda::detail {

/// Bytes of work space a row-path launch may take: beyond it, rows are processed in chunks (forward)
/// or each slot holds more positions (backward).
inline constexpr index_t row_work_budget = index_t(256) << 20;

/// Elements of T a thread widens one row of d into when the row math's type Acc is not T (none when
/// it is: the row is read in place).
template <class Acc, class T>
constexpr index_t widened_row_size(index_t d) {
  return std::is_same_v<Acc, T> ? 0 : d;
}

/// Row hr [d] as the row math reads it, in Acc: the row itself when T is Acc, else widened into buf [d].
template <class Acc, class T>
__device__ const Acc* widened_row(const T* hr, index_t d, Acc* buf) {
  if constexpr (std::is_same_v<Acc, T>) {
    return hr;
  } else {
    for (index_t j = 0; j < d; ++j) buf[j] = load<Acc>(hr[j]);
    return buf;
  }
}

/// Stage 2: grads[i] = Σ_b slots[b][i], b in order, in double (one thread per parameter).
template <class T, class Acc>
__global__ void sum_slots_kernel(const Acc* slots, index_t nslots, index_t np, T* const* leaves, const index_t* offsets,
                                 int nleaves) {
  const index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= np) return;
  double s = 0;
  for (index_t b = 0; b < nslots; ++b) s += double(slots[b * np + i]);
  int leaf = 0;
  while (leaf + 1 < nleaves && i >= offsets[leaf + 1]) ++leaf;
  leaves[leaf][i - offsets[leaf]] = store<T>(s);
}

/// bound[i] for i < n: the aggregate protos[i / per] (slot 0's, then sink 0's) with every leaf's data
/// pointer — an Acc* at byte data_at[f] of the aggregate — moved on by (i % per)·np elements: the
/// aggregate of slot (or sink) i % per. Device code never reflects over fields; the host found where
/// the pointers are, and each slot's aggregate is made here instead of on the host and copied over
/// (at T = 16384 a user's gate has 16,384 slots: ~1 MB of pageable memory per backward).
template <class Acc, class PA>
__global__ void bind_slots_kernel(const PA* protos, const std::uint32_t* data_at, int nleaves, index_t np, index_t per,
                                  index_t n, PA* bound) {
  const index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  PA p = protos[i / per];
  unsigned char* bytes = reinterpret_cast<unsigned char*>(&p);
  for (int f = 0; f < nleaves; ++f) {
    Acc* data;
    memcpy(&data, bytes + data_at[f], sizeof data);
    data += (i % per) * np;
    memcpy(bytes + data_at[f], &data, sizeof data);
  }
  bound[i] = p;
}

/// The slots of one row-path backward over P positions: for each, a gradient aggregate PA (Acc leaves
/// shaped like `shaped`, zeroed by its thread before use), a sink when `sinks`, and `work` Acc of work
/// space; then stage 2 into `grads` (T leaves, the same extents in the same order), overwritten.
/// How many slots — at most max_slots, and what row_work_budget holds — and so the order of stage 2's
/// sum, depends on (P, the aggregate's size, work, max_slots) only.
template <class Acc, class T, class PA>
class slot_aggregates {
  struct layout {  // where each leaf of the aggregate starts, and stage 2's destination leaves
    std::vector<index_t> offsets;  // one past the last: the aggregate's size
    std::vector<T*> leaves;
  };

 public:
  template <class Grads>
  slot_aggregates(const PA& shaped, const Grads& grads, index_t P, index_t work, bool sinks, cudaStream_t s,
                  index_t max_slots = 4096)
      : slot_aggregates(shaped, layout_of(shaped, grads), P, work, sinks, s, max_slots) {}

  index_t count() const { return plan_.nslots; }
  /// Consecutive positions per slot (the last may hold fewer).
  index_t positions_per_slot() const { return plan_.block; }
  /// Parameters in one aggregate.
  index_t size() const { return plan_.np; }
  const PA* slot_params() const { return bound_.ptr; }
  /// The sinks' aggregates (the slots' own without sinks).
  const PA* sink_params() const { return bound_.ptr + (sinks_present_ ? plan_.nslots : 0); }
  Acc* slot_storage() const { return slots_.ptr; }
  Acc* work() const { return work_.ptr; }

  /// Stage 2 into grads; `ran`: whether stage 1 ran (else the gradients are zero).
  void sum_into_grads(bool ran, cudaStream_t s) const {
    const index_t np = plan_.np;
    if (np == 0) return;
    if (!ran) GRUN_CUDA_CHECK(cudaMemsetAsync(slots_.ptr, 0, sizeof(Acc) * std::size_t(np), s));
    sum_slots_kernel<T, Acc><<<unsigned(cuda::ceil_div(np, 256)), 256, 0, s>>>(slots_.ptr, ran ? plan_.nslots : 1, np,
                                                                              leaves_.ptr, offsets_.ptr, nleaves_);
    GRUN_CUDA_CHECK_LAUNCH();
  }

 private:
  struct plan {
    index_t np, block, nslots;
  };
  static plan plan_for(index_t np, index_t P, index_t work, bool sinks, index_t most) {
    const index_t per_slot = index_t(sizeof(Acc)) * (np * (sinks ? 2 : 1) + work);
    const index_t max_slots = std::clamp<index_t>(row_work_budget / std::max<index_t>(per_slot, 1), 1, most);
    const index_t block = std::max<index_t>(1, cuda::ceil_div(std::max<index_t>(P, 1), max_slots));
    return {np, block, std::max<index_t>(1, cuda::ceil_div(P, block))};
  }
  template <class Grads>
  static layout layout_of(const PA& shaped, const Grads& grads) {
    layout l;
    index_t np = 0;
    for_each_param_pair(shaped, grads, [&](const auto& sl, const auto& gl) {
      l.offsets.push_back(np);
      l.leaves.push_back(gl.data);
      np += sl.size();
    });
    l.offsets.push_back(np);
    return l;
  }

  slot_aggregates(const PA& shaped, const layout& l, index_t P, index_t work, bool sinks, cudaStream_t s,
                  index_t max_slots)
      : plan_(plan_for(l.offsets.back(), P, work, sinks, max_slots)),
        slots_(plan_.nslots * plan_.np, s),
        sinks_(sinks ? plan_.nslots * plan_.np : 0, s),
        work_(plan_.nslots * work, s),
        bound_(plan_.nslots * (sinks ? 2 : 1), s),
        protos_(2, s),
        data_at_(index_t(l.leaves.size()), s),
        offsets_(index_t(l.offsets.size()), s),
        leaves_(index_t(l.leaves.size()), s),
        nleaves_(int(l.leaves.size())),
        sinks_present_(sinks) {
    // (Host memory handed to cudaMemcpyAsync is pageable: staged before each call returns.)
    GRUN_CUDA_CHECK(cudaMemcpyAsync(offsets_.ptr, l.offsets.data(), sizeof(index_t) * l.offsets.size(),
                                    cudaMemcpyHostToDevice, s));
    if (nleaves_ > 0)
      GRUN_CUDA_CHECK(cudaMemcpyAsync(leaves_.ptr, l.leaves.data(), sizeof(T*) * l.leaves.size(), cudaMemcpyHostToDevice, s));
    // One aggregate per slot (and per sink): slot 0's and sink 0's bound here, where the leaves' data
    // pointers sit in them found here too, and the rest made from those on the device (bind_slots_kernel).
    static_assert(std::is_trivially_copyable_v<PA>, "a gradient aggregate is copied to the device as bytes");
    const PA protos[2] = {grun::detail::bind_params(shaped, slots_.ptr),
                          sinks ? grun::detail::bind_params(shaped, sinks_.ptr) : PA{}};
    std::vector<std::uint32_t> data_at;
    for_each_param(protos[0], [&](const auto& leaf) {
      static_assert(std::is_same_v<std::remove_cvref_t<decltype(leaf.data)>, Acc*>, "an aggregate's leaves hold Acc");
      data_at.push_back(std::uint32_t(reinterpret_cast<const unsigned char*>(&leaf.data) -
                                      reinterpret_cast<const unsigned char*>(&protos[0])));
    });
    const index_t n = plan_.nslots * (sinks ? 2 : 1);
    GRUN_CUDA_CHECK(cudaMemcpyAsync(protos_.ptr, protos, sizeof(PA) * 2, cudaMemcpyHostToDevice, s));
    if (!data_at.empty())
      GRUN_CUDA_CHECK(cudaMemcpyAsync(data_at_.ptr, data_at.data(), sizeof(std::uint32_t) * data_at.size(),
                                      cudaMemcpyHostToDevice, s));
    bind_slots_kernel<Acc, PA><<<unsigned(cuda::ceil_div(n, 256)), 256, 0, s>>>(
        protos_.ptr, data_at_.ptr, int(data_at.size()), plan_.np, plan_.nslots, n, bound_.ptr);
    GRUN_CUDA_CHECK_LAUNCH();
  }

  plan plan_;
  stream_scratch<Acc> slots_, sinks_, work_;
  stream_scratch<PA> bound_, protos_;
  stream_scratch<std::uint32_t> data_at_;
  stream_scratch<index_t> offsets_;
  stream_scratch<T*> leaves_;
  int nleaves_;
  bool sinks_present_;
};

}  // namespace grun::cuda::detail
