#pragma once
// grun/cuda/intervention.cuh — exec::cuda for gated_intervention (and intervention_stack, which
// reaches the same seam with K modules): detail::intervention_impl<exec::cuda_t, gated_intervention<G, R, O>>.
//
//   forward   h' = h + s · Σ_k g_k(h) Δ_k(h)   on the rows named by the position list
//   backward  dh (identity + gate + ReFT paths), parameter gradients of module `trained`
//
// The shipped rank-r policies (gate::linear / gate::always × reft::loreft / noreft / direft,
// r ≤ 32) stored as float / half / bfloat16 take the block-cooperative FUSED kernels of
// intervention_fused.cuh (fused::supported<G, R, O> and fused::takes_storage<T>; they compute in
// fp32). gate::mlp × those ReFTs takes intervention_mlp.cuh: the first gate layer as cuBLASLt GEMMs
// on tensor cores, then the same fused ReFT kernels (link CUDA::cublasLt). A gate of the user's ×
// those ReFTs takes intervention_row_gate.cuh: the gate's own row math one thread per row, the ReFT
// on the same fused kernels. Everything else — a ReFT of the user's, double storage (computed in
// double, like exec::host) — takes the GENERIC path below: one thread per selected row runs the
// policies' own GRUN_HD row math (gated_intervention::forward_row / backward_row) — the very code
// exec::host runs — so it works for every gate/ReFT policy and agrees with the host by
// construction. All K modules of a stack are evaluated in the same launch; its parameter gradients
// are reduced in row_path.cuh's two deterministic stages (no atomics: bitwise repeatable, so
// exec::cuda_t::deterministic holds).
//
// A parametrized rotation (ortho::householder) is a change of variables around all of this: R is
// materialized from the raw tensor on the device before each call (householder.cuh), the same
// intervention with R as an ordinary matrix (ortho::none) runs — on whichever path it takes — and the
// backward pulls dL/dR back to dL/draw. Materializing waits for the stream once per call, to report
// a degenerate raw vector as exec::host does.

#include <algorithm>
#include <memory>
#include <span>
#include <type_traits>
#include <vector>

#include "check.cuh"  // first: exec::host_t before exec/cuda.hpp
#include "householder.cuh"
#include "intervention_fused.cuh"
#include "intervention_mlp.cuh"
#include "intervention_row_gate.cuh"
#include "row_path.cuh"
#include "scratch.cuh"

#include <grun/intervention.hpp>
#include <grun/ortho/none.hpp>

namespace grun::cuda {

namespace detail {

template <class I, class T>
__global__ void intervention_forward_kernel(const module_params<I, T, cuda_space>* modules, index_t K, double scale,
                                            matrix_view<const T, cuda_space> h, const index_t* pos, index_t q0,
                                            index_t q1, matrix_view<T, cuda_space> out,
                                            matrix_view<T, cuda_space> gates, acc_t<T>* work) {
  using Acc = acc_t<T>;
  const index_t q = q0 + index_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q >= q1) return;
  const index_t d = h.extent(1);
  Acc* hx = work + (q - q0) * (3 * d + I::scratch_size(d));
  Acc* delta = hx + d;
  Acc* sum = delta + d;
  Acc* scratch = sum + d;
  const index_t row = pos[q];
  const T* hr = h.row(row);
  for (index_t j = 0; j < d; ++j) { hx[j] = load<Acc>(hr[j]); sum[j] = Acc(0); }
  for (index_t k = 0; k < K; ++k) {
    const Acc g = I::forward_row(modules[k], hx, d, delta, scratch);
    gates(k, q) = store<T>(g);
    for (index_t j = 0; j < d; ++j) sum[j] += g * delta[j];
  }
  T* o = out.row(row);
  for (index_t j = 0; j < d; ++j) o[j] = store<T>(hx[j] + Acc(scale) * sum[j]);
}

/// Stage 1 of backward: slot b handles positions [b·block, (b+1)·block) serially and accumulates
/// the trained module's gradients into its own aggregate (slots[b]); frozen modules' into a sink.
template <class I, class T, class PA, class DG>
__global__ void intervention_backward_kernel(const module_params<I, T, cuda_space>* modules, index_t K, index_t trained,
                                             double scale, matrix_view<const T, cuda_space> h, const index_t* pos,
                                             index_t P, index_t block, matrix_view<const T, cuda_space> dout,
                                             matrix_view<const DG, cuda_space> dgates, matrix_view<T, cuda_space> dh,
                                             const PA* slot_params, const PA* sink_params, index_t np,
                                             acc_t<T>* slots, acc_t<T>* work, index_t nslots) {
  using Acc = acc_t<T>;
  const index_t b = index_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= nslots) return;
  const index_t d = h.extent(1);
  const PA& slot = slot_params[b];  // bound on the host: device code never reflects over fields
  const PA& sink = K > 1 ? sink_params[b] : slot;
  for (index_t i = 0; i < np; ++i) slots[b * np + i] = Acc(0);
  Acc* hx = work + b * (5 * d + I::scratch_size(d));
  Acc* dx = hx + d;
  Acc* dhx = dx + d;
  Acc* delta = dhx + d;
  Acc* tmp = delta + d;
  Acc* scratch = tmp + d;
  const bool has_dgates = dgates.size() != 0;
  const index_t qend = P < (b + 1) * block ? P : (b + 1) * block;
  for (index_t q = b * block; q < qend; ++q) {
    const index_t row = pos[q];
    const T* hr = h.row(row);
    const T* dr = dout.row(row);
    for (index_t j = 0; j < d; ++j) { hx[j] = load<Acc>(hr[j]); dx[j] = load<Acc>(dr[j]); dhx[j] = dx[j]; }
    for (index_t k = 0; k < K; ++k) {
      const Acc g = I::forward_row(modules[k], hx, d, delta, scratch);
      const Acc dg = has_dgates ? load<Acc>(dgates(k, q)) : Acc(0);
      I::backward_row(modules[k], k == trained ? slot : sink, hx, d, scratch, g, delta, dx, dg, Acc(scale), tmp, dhx);
    }
    T* o = dh.row(row);
    for (index_t j = 0; j < d; ++j) o[j] = store<T>(dhx[j]);
  }
}

/// A stream of grun's on the current device (non-blocking, kept for the process): where saved
/// activations are released, after the event of their last use — not on a caller's stream, which may
/// be gone by then.
inline cudaStream_t release_stream() {
  return per_device<cudaStream_t>([](int) {
    cudaStream_t s = nullptr;
    GRUN_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    return s;
  });
}

/// What a saved_activations' device block carries beside its memory: an event recorded after each
/// call that touched it (whether it has been yet), and its device.
struct saved_block {
  cudaEvent_t last_use = nullptr;
  bool recorded = false;
  int device = 0;
};

/// Device memory for a saved_activations (saved_access::begin_on_device), stream-ordered from grun's
/// pool (scratch_pool) on the forward's stream s. cudaMalloc and cudaFree would each synchronize:
/// cudaFree waits for the whole device, and the libtorch adapter keeps a fresh saved_activations per
/// training forward, so every step would stall the host until the backward had run before it could
/// queue the next step. Each forward and backward that touches the block records its event on its
/// stream (saved_access::touching); the release makes release_stream() wait for that event and
/// frees there (cudaFreeAsync): nothing on the host waits, and the pool hands the memory to a later
/// allocation only once the free has run. An event waits for its latest recording only, and the
/// last call to touch the block need not be the last to finish (two backwards on streams B and C
/// read one forward's values; C's was queued first behind other work): so before each recording
/// after the first, release_stream() is made to wait for the one it replaces. The frees queued
/// there thus pass only once every call that touched the block has run, whatever their streams, and
/// no caller's stream waits for another's.
inline grun::detail::foreign_storage allocate_saved(std::size_t bytes, cudaStream_t s) {
  auto block = std::make_unique<saved_block>();
  GRUN_CUDA_CHECK(cudaGetDevice(&block->device));
  GRUN_CUDA_CHECK(cudaEventCreateWithFlags(&block->last_use, cudaEventDisableTiming));
  void* p = nullptr;
  if (const cudaError_t e = cudaMallocFromPoolAsync(&p, bytes, scratch_pool(), s); e != cudaSuccess) {
    (void)cudaEventDestroy(block->last_use);
    GRUN_CUDA_CHECK(e);
  }
  const auto release = [](void* data, void* context) noexcept {
    const std::unique_ptr<saved_block> b(static_cast<saved_block*>(context));
    int current = 0;
    (void)cudaGetDevice(&current);
    if (current != b->device) (void)cudaSetDevice(b->device);
    try {
      const cudaStream_t rs = release_stream();
      (void)cudaStreamWaitEvent(rs, b->last_use, 0);
      (void)cudaFreeAsync(data, rs);
    } catch (...) {  // no stream of grun's (the context is going): wait for the last use here instead
      (void)cudaEventSynchronize(b->last_use);
      (void)cudaFreeAsync(data, nullptr);
    }
    (void)cudaEventDestroy(b->last_use);  // its resources go once the wait above has passed it
    if (current != b->device) (void)cudaSetDevice(current);
  };
  const auto note = [](void* context, void* where) {
    saved_block& b = *static_cast<saved_block*>(context);
    if (b.recorded) GRUN_CUDA_CHECK(cudaStreamWaitEvent(release_stream(), b.last_use, 0));
    GRUN_CUDA_CHECK(cudaEventRecord(b.last_use, static_cast<cudaStream_t>(where)));
    b.recorded = true;
  };
  return grun::detail::foreign_storage(p, bytes, release, block.release(), note);
}

}  // namespace detail

}  // namespace grun::cuda

namespace grun::detail {

template <class G, class R, class O>
struct intervention_impl<exec::cuda_t, gated_intervention<G, R, O>> {
  using I = gated_intervention<G, R, O>;
  static_assert(!O::is_parametrization || cuda::device_parametrization<O>::available,
                "grun: this parametrized rotation has no device kernels (grun::cuda::device_parametrization<O>); "
                "ortho::householder has them, or use exec::host");

  /// The fused kernels take this policy (intervention_fused.cuh) for float / half / bfloat16
  /// storage (cuda::fused::takes_storage<T>); otherwise the generic path runs.
  static constexpr bool fused = cuda::fused::supported<G, R, O>;
  /// gate::mlp with a rank-r ReFT: cuBLASLt first layer + fused ReFT kernels (intervention_mlp.cuh),
  /// for the same storage types.
  static constexpr bool fused_mlp = cuda::mlp_gate::supported<G, R, O>;
  /// A gate of the user's with a rank-r ReFT: the gate's row math on the row path, the ReFT on the
  /// fused kernels (intervention_row_gate.cuh), for the same storage types.
  static constexpr bool fused_reft = cuda::row_gate::supported<G, R, O>;

  /// With a parametrized rotation: the same intervention with R an ordinary matrix, which runs once
  /// R is materialized (named only where O::is_parametrization).
  using plain = gated_intervention<G, R, ortho::none>;
  using plain_impl = intervention_impl<exec::cuda_t, plain>;
  /// Whose flags above say which path a call takes: the plain intervention's with a parametrization.
  using path_of = std::conditional_t<O::is_parametrization, plain_impl, intervention_impl>;

  /// One call's modules as `plain` modules, each R materialized from its raw tensor into call-scoped
  /// device scratch on ex's stream, with the dots the pullback replays.
  template <class T>
  struct materialized {
    using device = cuda::device_parametrization<O>;
    using plain_params = module_params<plain, T, cuda_space>;
    static constexpr index_t r = I::rank;
    cuda::detail::stream_scratch<T> rotations;  // [K][r][d]
    cuda::detail::stream_scratch<double> dots;  // [K][dots_size(r)]
    std::vector<plain_params> modules;

    materialized(const exec::cuda_t& ex, std::span<const module_params<I, T, cuda_space>> mods, index_t d)
        : rotations(index_t(mods.size()) * r * d, cuda::stream_of(ex)),
          dots(index_t(mods.size()) * device::dots_size(r), cuda::stream_of(ex)) {
      std::vector<param<T, cuda_space>> raws;
      for (const auto& m : mods) raws.push_back(R::rotation(m.reft));
      device::template materialize<T>(ex, std::span<const param<T, cuda_space>>(raws), rotations.ptr, dots.ptr);
      for (std::size_t k = 0; k < mods.size(); ++k) {
        modules.push_back(as_plain(mods[k]));
        R::rotation(modules.back().reft).data = rotations.ptr + index_t(k) * r * d;
      }
    }
    std::span<const plain_params> view() const { return modules; }
    /// The same leaves (the raw tensor's leaf holds R, or dL/dR in a gradient aggregate).
    static plain_params as_plain(const module_params<I, T, cuda_space>& p) { return {p.gate, p.reft}; }
    /// grads' rotation leaf: dL/dR (the plain backward's) → dL/draw of module `trained`.
    void pull_back(const exec::cuda_t& ex, std::span<const module_params<I, T, cuda_space>> mods, index_t trained,
                   const module_params<I, T, cuda_space>& grads) const {
      if (trained < 0 || trained >= index_t(mods.size())) return;  // (the public front ends refuse it first)
      const auto& dR = R::rotation(grads.reft);
      device::template pullback<r, T, T>(ex, R::rotation(mods[std::size_t(trained)].reft), dR.data, dR.data,
                                         dots.ptr + trained * device::dots_size(r));
    }
  };

  // The entry points below are defined after the class, so they are not inline: a program can then
  // compile each (policy, storage) pair's kernels once, not once per .cu file that calls them
  // (GRUN_CUDA_EXTERN_INTERVENTION, after the definitions below; an explicit instantiation declaration does
  // not stop a compiler from instantiating an inline function, to inline it).
  template <class T, class S>
  static void forward(const exec::cuda_t& ex, std::span<const module_params<I, T, S>> modules, double scale,
                      matrix_view<const T, S> h, const positions& pos, matrix_view<T, S> out, matrix_view<T, S> gates);

  /// Whether a forward of storage T may keep something for its backward (saved_activations: the fused
  /// forward's e and z, 16-bit storage; it decides for sure when it runs — a call the fused kernels
  /// do not take keeps nothing). Adapters ask it before they keep a saved_activations alive.
  template <class T>
  static constexpr bool may_save(index_t d) {
    if constexpr (O::is_parametrization) return plain_impl::template may_save<T>(d);
    else return (fused || fused_mlp) && (std::is_same_v<T, half> || std::is_same_v<T, bfloat16>);
  }

  /// The forward keeping in `saved` what the fused backward would otherwise recompute (16-bit storage,
  /// a call the fused kernels take: device memory, grown by allocate_saved when too small) — e and z of
  /// the ReFT, and with gate::mlp its hidden activations and logits too; else nothing — run_forward
  /// has recorded width 0 — and the backward recomputes.
  template <class T, class S>
  static void forward_keeping(const exec::cuda_t& ex, std::span<const module_params<I, T, S>> modules, double scale,
                              matrix_view<const T, S> h, const positions& pos, matrix_view<T, S> out,
                              matrix_view<T, S> gates, saved_activations<T>& saved);

  /// The backward from what the forward kept (kept: device, [K][P][r + 1]; see forward_keeping).
  template <class T, class S, class DG>
  static void backward_from_kept(const exec::cuda_t& ex, std::span<const module_params<I, T, S>> modules,
                                 double scale, index_t trained, matrix_view<const T, S> h, const positions& pos,
                                 matrix_view<const T, S> dout, matrix_view<const DG, S> dgates, matrix_view<T, S> dh,
                                 const module_params<I, T, S>& grads, const acc_t<T>* kept);

  template <class T, class S, class DG>
  static void backward(const exec::cuda_t& ex, std::span<const module_params<I, T, S>> modules, double scale,
                       index_t trained, matrix_view<const T, S> h, const positions& pos, matrix_view<const T, S> dout,
                       matrix_view<const DG, S> dgates, matrix_view<T, S> dh, const module_params<I, T, S>& grads);

  /// The generic path (one thread per row, the policies' own row math); public so tests can compare.
  /// A parametrized rotation's R is materialized first, as forward and backward do.
  template <class T, class S>
  static void generic_forward(const exec::cuda_t& ex, std::span<const module_params<I, T, S>> modules, double scale,
                              matrix_view<const T, S> h, const positions& pos, matrix_view<T, S> out,
                              matrix_view<T, S> gates);
  template <class T, class S, class DG>
  static void generic_backward(const exec::cuda_t& ex, std::span<const module_params<I, T, S>> modules, double scale,
                               index_t trained, matrix_view<const T, S> h, const positions& pos,
                               matrix_view<const T, S> dout, matrix_view<const DG, S> dgates, matrix_view<T, S> dh,
                               const module_params<I, T, S>& grads);

 private:
  template <class T, class S>
  static void generic_forward_rows(const exec::cuda_t& ex, std::span<const module_params<I, T, S>> modules,
                                   double scale, matrix_view<const T, S> h, const positions& pos,
                                   matrix_view<T, S> out, matrix_view<T, S> gates) {
    static_assert(std::is_same_v<S, cuda_space>, "grun: exec::cuda needs cuda_space views");
    using Acc = acc_t<T>;
    const cudaStream_t s = cuda::stream_of(ex);
    const index_t d = h.extent(1), P = pos.size(), K = index_t(modules.size());
    if (h.extent(0) == 0) return;
    cuda::require_device("gated_intervention::forward");
    cuda::detail::copy_rows<T>(h, out, s);
    if (P == 0 || K == 0) return;
    cuda::detail::stream_scratch<module_params<I, T, cuda_space>> mods(K, s);
    GRUN_CUDA_CHECK(cudaMemcpyAsync(mods.ptr, modules.data(), sizeof(modules[0]) * std::size_t(K), cudaMemcpyHostToDevice, s));
    cuda::detail::stream_scratch<index_t> dpos(P, s);
    GRUN_CUDA_CHECK(cudaMemcpyAsync(dpos.ptr, pos.data(), sizeof(index_t) * std::size_t(P), cudaMemcpyHostToDevice, s));
    const index_t ws = 3 * d + I::scratch_size(d);
    const index_t chunk = std::clamp<index_t>(cuda::detail::row_work_budget / index_t(sizeof(Acc) * ws), 1, P);
    cuda::detail::stream_scratch<Acc> work(chunk * ws, s);
    for (index_t q0 = 0; q0 < P; q0 += chunk) {
      const index_t q1 = std::min(P, q0 + chunk);
      cuda::detail::intervention_forward_kernel<I, T><<<unsigned(cuda::ceil_div(q1 - q0, 128)), 128, 0, s>>>(
          mods.ptr, K, scale, h, dpos.ptr, q0, q1, out, gates, work.ptr);
      GRUN_CUDA_CHECK_LAUNCH();
    }
    // Host memory handed to cudaMemcpyAsync (modules, pos) is pageable: the copies have been
    // staged before the call returned, so the caller may free them at once.
  }

  template <class T, class S, class DG>
  static void generic_backward_rows(const exec::cuda_t& ex, std::span<const module_params<I, T, S>> modules,
                                    double scale, index_t trained, matrix_view<const T, S> h, const positions& pos,
                                    matrix_view<const T, S> dout, matrix_view<const DG, S> dgates,
                                    matrix_view<T, S> dh, const module_params<I, T, S>& grads) {
    static_assert(std::is_same_v<S, cuda_space>, "grun: exec::cuda needs cuda_space views");
    using Acc = acc_t<T>;
    using PA = typename I::template params<Acc, cuda_space>;
    const cudaStream_t s = cuda::stream_of(ex);
    const index_t d = h.extent(1), P = pos.size(), K = index_t(modules.size());
    if (h.extent(0) == 0 && parameter_count(grads) == 0) return;
    cuda::require_device("gated_intervention::backward");
    cuda::detail::copy_rows<T>(dout, dh, s);

    const index_t ws = 5 * d + I::scratch_size(d);
    const cuda::detail::slot_aggregates<Acc, T, PA> slots(I::template shape<Acc, cuda_space>(d), grads, P, ws, K > 1, s);
    const bool run = P > 0 && K > 0;
    if (run) {
      cuda::detail::stream_scratch<module_params<I, T, cuda_space>> mods(K, s);
      GRUN_CUDA_CHECK(cudaMemcpyAsync(mods.ptr, modules.data(), sizeof(modules[0]) * std::size_t(K), cudaMemcpyHostToDevice, s));
      cuda::detail::stream_scratch<index_t> dpos(P, s);
      GRUN_CUDA_CHECK(cudaMemcpyAsync(dpos.ptr, pos.data(), sizeof(index_t) * std::size_t(P), cudaMemcpyHostToDevice, s));
      const index_t nslots = slots.count();
      cuda::detail::intervention_backward_kernel<I, T, PA, DG><<<unsigned(cuda::ceil_div(nslots, 64)), 64, 0, s>>>(
          mods.ptr, K, trained, scale, h, dpos.ptr, P, slots.positions_per_slot(), dout, dgates, dh, slots.slot_params(),
          slots.sink_params(), slots.size(), slots.slot_storage(), slots.work(), nslots);
      GRUN_CUDA_CHECK_LAUNCH();
    }
    slots.sum_into_grads(run, s);
  }
};

template <class G, class R, class O>
template <class T, class S>
void intervention_impl<exec::cuda_t, gated_intervention<G, R, O>>::forward(
    const exec::cuda_t& ex, std::span<const module_params<I, T, S>> modules, double scale,
    matrix_view<const T, S> h, const positions& pos, matrix_view<T, S> out, matrix_view<T, S> gates) {
  static_assert(std::is_same_v<S, cuda_space>, "grun: exec::cuda needs cuda_space views");
  if constexpr (O::is_parametrization) {
    const materialized<T> m(ex, modules, h.extent(1));
    return plain_impl::forward(ex, m.view(), scale, h, pos, out, gates);
  } else if constexpr (fused && cuda::fused::takes_storage<T>) {
    if (cuda::fused::forward<I, T>(ex, modules, scale, h, pos, out, gates)) return;
  } else if constexpr (fused_mlp && cuda::fused::takes_storage<T>) {
    if (cuda::mlp_gate::forward<I, T>(ex, modules, scale, h, pos, out, gates)) return;
  } else if constexpr (fused_reft && cuda::fused::takes_storage<T>) {
    if (cuda::row_gate::forward<I, T>(ex, modules, scale, h, pos, out, gates)) return;
  }
  generic_forward<T, S>(ex, modules, scale, h, pos, out, gates);
}

template <class G, class R, class O>
template <class T, class S>
void intervention_impl<exec::cuda_t, gated_intervention<G, R, O>>::forward_keeping(
    const exec::cuda_t& ex, std::span<const module_params<I, T, S>> modules, double scale,
    matrix_view<const T, S> h, const positions& pos, matrix_view<T, S> out, matrix_view<T, S> gates,
    saved_activations<T>& saved) {
  if constexpr (O::is_parametrization) {
    const materialized<T> m(ex, modules, h.extent(1));
    return plain_impl::forward_keeping(ex, m.view(), scale, h, pos, out, gates, saved);
  } else if constexpr ((fused || fused_mlp) && cuda::fused::takes_storage<T>) {
    const index_t K = index_t(modules.size()), P = pos.size(), d = h.extent(1);
    auto keep = [&](index_t width) -> float* {
      return saved_access::begin_on_device(saved, K, P, d, width, [&](std::size_t bytes) {
        return cuda::detail::allocate_saved(bytes, cuda::stream_of(ex));
      });
    };
    bool taken = false;
    if constexpr (fused) taken = cuda::fused::forward<I, T>(ex, modules, scale, h, pos, out, gates, keep);
    else taken = cuda::mlp_gate::forward<I, T>(ex, modules, scale, h, pos, out, gates, keep);
    if (taken) return;
    saved_access::begin(saved, K, P, d, 0);  // (a call not taken keeps nothing, whatever it reserved)
  }
  forward(ex, modules, scale, h, pos, out, gates);
}

template <class G, class R, class O>
template <class T, class S, class DG>
void intervention_impl<exec::cuda_t, gated_intervention<G, R, O>>::backward_from_kept(
    const exec::cuda_t& ex, std::span<const module_params<I, T, S>> modules, double scale, index_t trained,
    matrix_view<const T, S> h, const positions& pos, matrix_view<const T, S> dout, matrix_view<const DG, S> dgates,
    matrix_view<T, S> dh, const module_params<I, T, S>& grads, const acc_t<T>* kept) {
  if constexpr (O::is_parametrization) {
    const materialized<T> m(ex, modules, h.extent(1));
    plain_impl::backward_from_kept(ex, m.view(), scale, trained, h, pos, dout, dgates, dh, m.as_plain(grads), kept);
    return m.pull_back(ex, modules, trained, grads);
  } else if constexpr (fused && cuda::fused::takes_storage<T>) {
    if (cuda::fused::backward<I, T>(ex, modules, scale, trained, h, pos, dout, dgates, dh, grads, kept)) return;
  } else if constexpr (fused_mlp && cuda::fused::takes_storage<T>) {
    if (cuda::mlp_gate::backward<I, T>(ex, modules, scale, trained, h, pos, dout, dgates, dh, grads, kept)) return;
  }
  backward(ex, modules, scale, trained, h, pos, dout, dgates, dh, grads);  // (never kept: only the fused forwards keep)
}

template <class G, class R, class O>
template <class T, class S, class DG>
void intervention_impl<exec::cuda_t, gated_intervention<G, R, O>>::backward(
    const exec::cuda_t& ex, std::span<const module_params<I, T, S>> modules, double scale, index_t trained,
    matrix_view<const T, S> h, const positions& pos, matrix_view<const T, S> dout, matrix_view<const DG, S> dgates,
    matrix_view<T, S> dh, const module_params<I, T, S>& grads) {
  static_assert(std::is_same_v<S, cuda_space>, "grun: exec::cuda needs cuda_space views");
  if constexpr (O::is_parametrization) {
    const materialized<T> m(ex, modules, h.extent(1));
    plain_impl::backward(ex, m.view(), scale, trained, h, pos, dout, dgates, dh, m.as_plain(grads));
    return m.pull_back(ex, modules, trained, grads);
  } else if constexpr (fused && cuda::fused::takes_storage<T>) {
    if (cuda::fused::backward<I, T>(ex, modules, scale, trained, h, pos, dout, dgates, dh, grads)) return;
  } else if constexpr (fused_mlp && cuda::fused::takes_storage<T>) {
    if (cuda::mlp_gate::backward<I, T>(ex, modules, scale, trained, h, pos, dout, dgates, dh, grads)) return;
  } else if constexpr (fused_reft && cuda::fused::takes_storage<T>) {
    if (cuda::row_gate::backward<I, T>(ex, modules, scale, trained, h, pos, dout, dgates, dh, grads)) return;
  }
  generic_backward<T, S>(ex, modules, scale, trained, h, pos, dout, dgates, dh, grads);
}

template <class G, class R, class O>
template <class T, class S>
void intervention_impl<exec::cuda_t, gated_intervention<G, R, O>>::generic_forward(
    const exec::cuda_t& ex, std::span<const module_params<I, T, S>> modules, double scale,
    matrix_view<const T, S> h, const positions& pos, matrix_view<T, S> out, matrix_view<T, S> gates) {
  if constexpr (O::is_parametrization) {
    const materialized<T> m(ex, modules, h.extent(1));
    plain_impl::template generic_forward<T, S>(ex, m.view(), scale, h, pos, out, gates);
  } else {
    generic_forward_rows<T, S>(ex, modules, scale, h, pos, out, gates);
  }
}

template <class G, class R, class O>
template <class T, class S, class DG>
void intervention_impl<exec::cuda_t, gated_intervention<G, R, O>>::generic_backward(
    const exec::cuda_t& ex, std::span<const module_params<I, T, S>> modules, double scale, index_t trained,
    matrix_view<const T, S> h, const positions& pos, matrix_view<const T, S> dout, matrix_view<const DG, S> dgates,
    matrix_view<T, S> dh, const module_params<I, T, S>& grads) {
  if constexpr (O::is_parametrization) {
    const materialized<T> m(ex, modules, h.extent(1));
    plain_impl::template generic_backward<T, S>(ex, m.view(), scale, trained, h, pos, dout, dgates, dh,
                                                m.as_plain(grads));
    m.pull_back(ex, modules, trained, grads);
  } else {
    generic_backward_rows<T, S>(ex, modules, scale, trained, h, pos, dout, dgates, dh, grads);
  }
}

}  // namespace grun::detail

// Build time. The exec::cuda path of one gated_intervention I stored as T is a few hundred kernels
// (every schedule the runtime may pick, for every row width); each .cu file that calls it compiles
// them again. To compile them once per program, name the pair in a header those files include
//     GRUN_CUDA_EXTERN_INTERVENTION(my_intervention, grun::bfloat16)
// and in exactly one .cu file (built with the same flags)
//     GRUN_CUDA_INSTANTIATE_INTERVENTION(my_intervention, grun::bfloat16)
// Both at global scope, I a name without unparenthesized commas (a `using` alias). They cover
// forward, forward_keeping, backward and backward_from_kept (the front ends' run_forward / run_backward
// reach nothing else) and the generic path, with gate gradients stored as T; the _DGATES forms add the
// backward ones for gate gradients stored as DG (float: what grun's gate losses write for 16-bit T).
#define GRUN_CUDA_INTERVENTION_FORWARDS_(EXT, I, T)                                                           \
  EXT template void ::grun::detail::intervention_impl<::grun::exec::cuda_t, I>::forward<T, ::grun::cuda_space>( \
      const ::grun::exec::cuda_t&, std::span<const ::grun::module_params<I, T, ::grun::cuda_space>>, double,   \
      ::grun::matrix_view<const T, ::grun::cuda_space>, const ::grun::positions&,                               \
      ::grun::matrix_view<T, ::grun::cuda_space>, ::grun::matrix_view<T, ::grun::cuda_space>);                  \
  EXT template void                                                                                             \
      ::grun::detail::intervention_impl<::grun::exec::cuda_t, I>::forward_keeping<T, ::grun::cuda_space>(     \
          const ::grun::exec::cuda_t&, std::span<const ::grun::module_params<I, T, ::grun::cuda_space>>,       \
          double, ::grun::matrix_view<const T, ::grun::cuda_space>, const ::grun::positions&,                  \
          ::grun::matrix_view<T, ::grun::cuda_space>, ::grun::matrix_view<T, ::grun::cuda_space>,              \
          ::grun::saved_activations<T>&);                                                                       \
  EXT template void                                                                                             \
      ::grun::detail::intervention_impl<::grun::exec::cuda_t, I>::generic_forward<T, ::grun::cuda_space>(     \
          const ::grun::exec::cuda_t&, std::span<const ::grun::module_params<I, T, ::grun::cuda_space>>,       \
          double, ::grun::matrix_view<const T, ::grun::cuda_space>, const ::grun::positions&,                  \
          ::grun::matrix_view<T, ::grun::cuda_space>, ::grun::matrix_view<T, ::grun::cuda_space>);

#define GRUN_CUDA_INTERVENTION_BACKWARDS_(EXT, I, T, DG)                                                           \
  EXT template void ::grun::detail::intervention_impl<::grun::exec::cuda_t, I>::backward<T, ::grun::cuda_space, DG>( \
      const ::grun::exec::cuda_t&, std::span<const ::grun::module_params<I, T, ::grun::cuda_space>>, double,        \
      ::grun::index_t, ::grun::matrix_view<const T, ::grun::cuda_space>, const ::grun::positions&,                  \
      ::grun::matrix_view<const T, ::grun::cuda_space>, ::grun::matrix_view<const DG, ::grun::cuda_space>,          \
      ::grun::matrix_view<T, ::grun::cuda_space>, const ::grun::module_params<I, T, ::grun::cuda_space>&);          \
  EXT template void                                                                                                  \
      ::grun::detail::intervention_impl<::grun::exec::cuda_t, I>::backward_from_kept<T, ::grun::cuda_space, DG>(  \
          const ::grun::exec::cuda_t&, std::span<const ::grun::module_params<I, T, ::grun::cuda_space>>,            \
          double, ::grun::index_t, ::grun::matrix_view<const T, ::grun::cuda_space>, const ::grun::positions&,      \
          ::grun::matrix_view<const T, ::grun::cuda_space>, ::grun::matrix_view<const DG, ::grun::cuda_space>,      \
          ::grun::matrix_view<T, ::grun::cuda_space>, const ::grun::module_params<I, T, ::grun::cuda_space>&,       \
          const ::grun::acc_t<T>*);                                                                                  \
  EXT template void                                                                                                  \
      ::grun::detail::intervention_impl<::grun::exec::cuda_t, I>::generic_backward<T, ::grun::cuda_space, DG>(    \
          const ::grun::exec::cuda_t&, std::span<const ::grun::module_params<I, T, ::grun::cuda_space>>,            \
          double, ::grun::index_t, ::grun::matrix_view<const T, ::grun::cuda_space>, const ::grun::positions&,      \
          ::grun::matrix_view<const T, ::grun::cuda_space>, ::grun::matrix_view<const DG, ::grun::cuda_space>,      \
          ::grun::matrix_view<T, ::grun::cuda_space>, const ::grun::module_params<I, T, ::grun::cuda_space>&);

#define GRUN_CUDA_EXTERN_INTERVENTION(I, T) \
  GRUN_CUDA_INTERVENTION_FORWARDS_(extern, I, T) GRUN_CUDA_INTERVENTION_BACKWARDS_(extern, I, T, T)
#define GRUN_CUDA_INSTANTIATE_INTERVENTION(I, T) \
  GRUN_CUDA_INTERVENTION_FORWARDS_(, I, T) GRUN_CUDA_INTERVENTION_BACKWARDS_(, I, T, T)
#define GRUN_CUDA_EXTERN_INTERVENTION_DGATES(I, T, DG) GRUN_CUDA_INTERVENTION_BACKWARDS_(extern, I, T, DG)
#define GRUN_CUDA_INSTANTIATE_INTERVENTION_DGATES(I, T, DG) GRUN_CUDA_INTERVENTION_BACKWARDS_(, I, T, DG)

namespace grun::cuda {

/// Whether exec::cuda runs gated_intervention I — or a stack of I — stored as T on the fused kernels:
/// gate::linear, gate::always or gate::mlp with reft::loreft, noreft or direft of rank ≤ 32, in float,
/// half or bfloat16. Otherwise the generic path runs — one thread per selected row executes the
/// policies' own row math, the code exec::host runs: correct for every policy, but two to three
/// orders of magnitude slower per row (on an H200 at d = 4096, bf16: the forward 4.6 ms for 1,024
/// rows against 0.039 ms for 4,096 fused; BENCHMARKS.md) — or, for a gate of the user's with one of
/// those ReFTs (runs_fused_reft), the gate alone runs that way and the ReFT fused. Check it where a
/// configuration must be fast, e.g. static_assert(grun::cuda::runs_fused<I, grun::bfloat16>). At run
/// time the fused kernels also hand a call to the generic path when its rows' elements are not
/// contiguous (a view with a column stride other than 1) or a stack holds more modules than its
/// launch can carry coefficients for (more than 256 at rank 32, 512 at rank 4).
template <class I, class T>
inline constexpr bool runs_fused = (grun::detail::intervention_impl<exec::cuda_t, I>::path_of::fused ||
                                    grun::detail::intervention_impl<exec::cuda_t, I>::path_of::fused_mlp) &&
                                   fused::takes_storage<T>;

/// Whether I's ReFT — the 2r+1 dots of every row, the write of h', their backward: most of the work —
/// runs on the fused kernels: runs_fused, or a gate of the user's (its row math one thread per row,
/// intervention_row_gate.cuh) with reft::loreft, noreft or direft of rank ≤ 32 in float, half or bfloat16.
template <class I, class T>
inline constexpr bool runs_fused_reft =
    runs_fused<I, T> ||
    (grun::detail::intervention_impl<exec::cuda_t, I>::path_of::fused_reft && fused::takes_storage<T>);

}  // namespace grun::cuda
