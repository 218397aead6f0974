#pragma once
// grun/cuda/intervention_row_gate.cuh — a gate of the user's (any gate policy grun has no kernels
// for) with a shipped ReFT (loreft / noreft / direft, r ≤ 32) on exec::cuda, in float, half or
// bfloat16: the gate on the row path, the ReFT on the fused kernels.
//
// The gate's own GRUN_HD row math is the only code that knows it, so it runs as on the generic path:
// one thread per selected row (row_path.cuh). But it is one pass or two over the row, where the
// rest of a module — the 2r+1 dots of the ReFT, the write of h', their backward — is most of the
// work, and the fused kernels already do that part for any gate whose value they are given
// (fused::detail::gate_value):
//
//   forward   g_k(h) for every module and selected row   gate_values_kernel → fp32 [K][P]
//             h' = h + s Σ_k g_k Δ_k(h)                     fused::forward_impl<…, gate_value>
//   backward  g_k again, then the fused coefficient kernel, which exports dL/dg_k [K][P];
//             the gate's backward per row (its forward again first, for its scratch) adds its path
//             of dL/dh into an fp32 [P, d] buffer — summed over k — and its parameter gradients into
//             per-slot aggregates (row_path.cuh's two deterministic stages); the fused slot kernel
//             adds that buffer to dh before the single rounding of dh, as the mlp gate's does.
//
// The gate's value and dL/dg pass between the two parts in fp32, which is the gate's compute type
// (acc_t of a 16-bit or fp32 storage): g is the bits the row math returned. Double storage stays
// on the generic path (the fused kernels compute in fp32). Deterministic like both parts.

#include <algorithm>
#include <span>
#include <type_traits>
#include <vector>

#include "check.cuh"  // first: exec::host_t before exec/cuda.hpp
#include "intervention_fused.cuh"
#include "intervention_mlp.cuh"
#include "row_path.cuh"
#include "scratch.cuh"

#include <grun/intervention.hpp>

namespace grun::cuda::row_gate {

/// Gates with their own fused kernels (linear, always) or the mlp gate's path are not taken here.
template <class G>
inline constexpr bool shipped_gate = fused::gate_kind<G>::value >= 0 || mlp_gate::mlp_kind<G>::value;

/// Whether a gated_intervention<G, R, O> takes this path (storage: fused::takes_storage<T>).
template <class G, class R, class O>
inline constexpr bool supported = !shipped_gate<G> && fused::reft_kind<R>::value >= 0 && fused::reft_kind<R>::rank >= 1 &&
                                  fused::reft_kind<R>::rank <= fused::max_rank && !O::is_parametrization;

namespace detail {

/// g[k][q] = G::forward of module k's gate on selected row q, for q in [q0, q1) (one thread each).
/// work: per thread, the row widened to Acc (when T is not Acc) and the gate's scratch.
template <class G, class T, class PG>
__global__ void gate_values_kernel(const PG* gates, index_t K, matrix_view<const T, cuda_space> h,
                                   const index_t* pos, index_t q0, index_t q1, index_t P, float* g, acc_t<T>* work) {
  using Acc = acc_t<T>;
  const index_t q = q0 + index_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q >= q1) return;
  const index_t d = h.extent(1), widened = cuda::detail::widened_row_size<Acc, T>(d);
  Acc* buf = work + (q - q0) * (widened + G::scratch_size(d));
  const Acc* hx = cuda::detail::widened_row(h.row(fused::detail::row_at(pos, q)), d, buf);
  for (index_t k = 0; k < K; ++k) g[k * P + q] = float(G::forward(gates[k], hx, d, buf + widened));
}

/// Stage 1 of the gate's backward: slot b takes positions [b·block, (b+1)·block) in order; for each,
/// every module's gate forward (for its scratch) and backward with dL/dg = dg[k][q]: the path of dL/dh
/// into dhg row q (fp32, set here: Σ_k in order), the trained module's parameter gradients into the
/// slot's aggregate, the others' into its sink.
template <class G, class T, class PG, class PA>
__global__ void gate_backward_kernel(const PG* gates, index_t K, index_t trained, matrix_view<const T, cuda_space> h,
                                     const index_t* pos, index_t P, index_t block, const float* dg, float* dhg,
                                     const PA* slot_params, const PA* sink_params, index_t np, acc_t<T>* slots,
                                     acc_t<T>* work, index_t nslots) {
  using Acc = acc_t<T>;
  static_assert(std::is_same_v<Acc, float>, "the gate's path of dL/dh is an fp32 buffer");
  const index_t b = index_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= nslots) return;
  const index_t d = h.extent(1), widened = cuda::detail::widened_row_size<Acc, T>(d);
  const PA& slot = slot_params[b];
  const PA& sink = sink_params[b];
  for (index_t i = 0; i < np; ++i) slots[b * np + i] = Acc(0);
  Acc* buf = work + b * (widened + G::scratch_size(d));
  Acc* scratch = buf + widened;
  const index_t qend = P < (b + 1) * block ? P : (b + 1) * block;
  for (index_t q = b * block; q < qend; ++q) {
    const Acc* hx = cuda::detail::widened_row(h.row(fused::detail::row_at(pos, q)), d, buf);
    Acc* dhx = dhg + q * d;
    for (index_t j = 0; j < d; ++j) dhx[j] = Acc(0);
    for (index_t k = 0; k < K; ++k) {
      const Acc g = G::forward(gates[k], hx, d, scratch);
      G::backward(gates[k], k == trained ? slot : sink, hx, d, scratch, g, Acc(dg[k * P + q]), dhx);
    }
  }
}

/// Every module's gate parameters, on the device.
template <class I, class T>
struct device_gates {
  using PG = typename I::gate_type::template params<T, cuda_space>;
  cuda::detail::stream_scratch<PG> list;
  device_gates(std::span<const module_params<I, T, cuda_space>> modules, cudaStream_t s)
      : list(index_t(modules.size()), s) {
    std::vector<PG> host;
    for (const auto& m : modules) host.push_back(m.gate);
    GRUN_CUDA_CHECK(cudaMemcpyAsync(list.ptr, host.data(), sizeof(PG) * host.size(), cudaMemcpyHostToDevice, s));
  }
};

/// g [K][P] (device fp32) of every module's gate on every selected row (dpos: the device position
/// list, null for every row in order).
template <class I, class T>
void gate_values(const device_gates<I, T>& gates, index_t K, matrix_view<const T, cuda_space> h, const index_t* dpos,
                 index_t P, float* g, cudaStream_t s) {
  using G = typename I::gate_type;
  using Acc = acc_t<T>;
  using PG = typename device_gates<I, T>::PG;
  const index_t d = h.extent(1);
  const index_t ws = cuda::detail::widened_row_size<Acc, T>(d) + G::scratch_size(d);
  const index_t chunk = std::clamp<index_t>(cuda::detail::row_work_budget / std::max<index_t>(index_t(sizeof(Acc)) * ws, 1), 1, P);
  cuda::detail::stream_scratch<Acc> work(chunk * ws, s);
  for (index_t q0 = 0; q0 < P; q0 += chunk) {
    const index_t q1 = std::min(P, q0 + chunk);
    gate_values_kernel<G, T, PG><<<unsigned(cuda::ceil_div(q1 - q0, 64)), 64, 0, s>>>(gates.list.ptr, K, h, dpos, q0, q1,
                                                                                       P, g, work.ptr);
    GRUN_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace detail

/// Forward (see the file comment). Returns false, having done nothing, when the call is not one the
/// fused kernels take (the caller runs the generic path).
template <class I, class T>
bool forward(const exec::cuda_t& ex, std::span<const module_params<I, T, cuda_space>> modules, double scale,
             matrix_view<const T, cuda_space> h, const positions& pos, matrix_view<T, cuda_space> out,
             matrix_view<T, cuda_space> gates) {
  static_assert(supported<typename I::gate_type, typename I::reft_type, typename I::ortho_type>);
  constexpr int GM = fused::detail::gate_value;
  const index_t N = h.extent(0), P = pos.size(), K = index_t(modules.size());
  if (h.stride(1) != 1 || out.stride(1) != 1) return false;
  if (N == 0 || P == 0 || K == 0) return fused::forward_impl<I, T, GM>(ex, modules, scale, h, pos, out, gates, nullptr);
  require_device("gated_intervention::forward");
  const cudaStream_t s = stream_of(ex);
  cuda::detail::stream_scratch<float> g(K * P, s);
  const detail::device_gates<I, T> device_gates(modules, s);
  const fused::detail::device_positions dpos(pos, N, s);
  detail::gate_values<I, T>(device_gates, K, h, dpos.ptr(), P, g.ptr, s);
  return fused::forward_impl<I, T, GM>(ex, modules, scale, h, pos, out, gates, g.ptr);
}

/// Backward (see the file comment): dh and the trained module's gradients (gate and ReFT, overwritten).
template <class I, class T, class DG>
bool backward(const exec::cuda_t& ex, std::span<const module_params<I, T, cuda_space>> modules, double scale,
              index_t trained, matrix_view<const T, cuda_space> h, const positions& pos,
              matrix_view<const T, cuda_space> dout, matrix_view<const DG, cuda_space> dgates,
              matrix_view<T, cuda_space> dh, const module_params<I, T, cuda_space>& grads) {
  using G = typename I::gate_type;
  using Acc = acc_t<T>;
  using PA = typename G::template params<Acc, cuda_space>;
  static_assert(supported<G, typename I::reft_type, typename I::ortho_type>);
  constexpr int GM = fused::detail::gate_value;
  const index_t d = h.extent(1), P = pos.size(), K = index_t(modules.size());
  if (h.stride(1) != 1 || dout.stride(1) != 1 || dh.stride(1) != 1 || K < 1) return false;
  require_device("gated_intervention::backward");
  const cudaStream_t s = stream_of(ex);

  const index_t ws = cuda::detail::widened_row_size<Acc, T>(d) + G::scratch_size(d);
  PA shaped{};
  G::shape(shaped, d);
  // Up to one slot per position: a gate's aggregate is small, and each slot is one thread running
  // whole rows, so parallelism comes from slots (the generic path's 4,096 would give each thread 4
  // rows at T = 16384, on 64 CTAs).
  const cuda::detail::slot_aggregates<Acc, T, PA> slots(shaped, grads.gate, P, ws, K > 1, s, index_t(1) << 15);
  cuda::detail::stream_scratch<float> g(K * P, s), dhg(P * d, s);
  const detail::device_gates<I, T> gates(modules, s);  // for both gate kernels
  const fused::detail::device_positions dpos(pos, h.extent(0), s);
  if (P > 0) detail::gate_values<I, T>(gates, K, h, dpos.ptr(), P, g.ptr, s);
  auto gate_path = [&](const float* dg) {
    const index_t nslots = slots.count();
    detail::gate_backward_kernel<G, T><<<unsigned(cuda::ceil_div(nslots, 64)), 64, 0, s>>>(
        gates.list.ptr, K, trained, h, dpos.ptr(), P, slots.positions_per_slot(), dg, dhg.ptr, slots.slot_params(),
        slots.sink_params(), slots.size(), slots.slot_storage(), slots.work(), nslots);
    GRUN_CUDA_CHECK_LAUNCH();
    return fused::detail::gate_path<T>{dhg.ptr, d, false};  // fp32, Σ_k per row
  };
  const bool ok = fused::backward_impl<I, T, GM>(ex, modules, scale, trained, h, pos, dout, dgates, dh, grads, g.ptr,
                                                 gate_path);
  slots.sum_into_grads(P > 0, s);  // (no rows: the coefficient kernel and gate_path did not run)
  return ok;
}

}  // namespace grun::cuda::row_gate
