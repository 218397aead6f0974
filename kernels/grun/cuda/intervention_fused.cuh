#pragma once
// grun/cuda/intervention_fused.cuh — block-cooperative fused kernels for the shipped rank-r
// policies: gate::linear / gate::always × reft::loreft<r> / noreft<r> / direft<r>, r ≤ 32.
// intervention.cuh dispatches here (fused::supported<G, R, O>, storage float / half / bfloat16:
// fused::takes_storage<T>), as do the mlp gate's path and a user's gate's (intervention_mlp.cuh,
// intervention_row_gate.cuh: the gate computed outside, its value or logit given per row); every
// other policy (a user's ReFT) and double storage take the generic per-thread path.
//
// The math, for one selected row h [d] and module k (U, D [r, d] rows, b [r], gate w [d], c):
//   loreft/noreft (U = R, D = W):   e = D h + b − U h,   Δ = Uᵀ e            (ReFT eq. 2)
//   direft        (U = W2, D = W1): e = D h + b,         Δ = Uᵀ e
//   g = σ(wᵀh + c) (linear) or 1 (always);     h' = h + s Σ_k g_k Δ_k
// so a row needs 2r+1 dots over d, then one axpy pass over d. Backward (x = dout row, δ = s g x):
//   ux_i = U_i·x,  de_i = s g ux_i,  dL/dg = dg_ext + s Σ_i e_i ux_i,  dz = dL/dg · g(1 − g)
//   dh = x + Σ_k [ Σ_i de_i (D_i − [lo] U_i) + dz w ]
//   dU_i += s g e_i x − [lo] de_i h,   dD_i += de_i h,   db += de,   dw += dz h,   dc += dz
// i.e. 3r+1 dots per row and module, then rank-(2r+1) updates of the gradients.
//
// Kernels (one stream, no host round trip; positions gathered on the device):
//   pack_kernel      parameters of the K modules → [K][2r+1 rows of dp | b | c] as stored (T; dp = d
//                    rounded up to 8: every row 16-byte aligned, so vector loads). Small and L2-resident,
//                    but every CTA streams all of it, so it is kept at the storage width: with fp32
//                    packing a bf16 tile of 4 rows pulled 4.5× its own bytes of parameters through L2
//                    (measured on an H200: the forward at 23% of copy bandwidth).
//   forward_kernel   one CTA per tile of ROWS selected rows: 16-byte vector loads of h (bf16/fp16 × 8,
//                    fp32 × 4; scalar when d or the rows are not 16-byte aligned), the 2r+1 dots of every
//                    row of the tile reduced in ONE cub::BlockReduce over a small array type, then the
//                    write of h' in the same kernel. How the tile is read — streamed through registers
//                    and staged in shared memory, held in registers, or copied by cp.async — is a
//                    schedule (forward_schedule, fused/schedules.cuh). All K modules of a stack in the
//                    same launch.
//   forward_tensor_kernel  the default forward for 16-bit storage (d ≤ 4096, K ≤ 8, sm_80+): tiles
//                    of 8 rows held in registers by 256 threads, the dots on tensor cores (mma.sync,
//                    fp32 accumulate); one module's parameters staged in shared memory by persistent
//                    CTAs, a stack's read in place. See fused/forward_tensor.cuh. Opt-in
//                    (forward_schedule::tensor_pipelined): one module, one CTA of 512 threads per SM,
//                    its tiles double-buffered in shared memory by cp.async — the same bits.
//   Both forwards can keep e and z of every position for the backward (saved_activations; 16-bit
//   storage): fp32 [K][P][r+1].
//   Positions: when the list selects every row in order, nothing is uploaded (row q is position q).
//   coef_kernel      backward, per tile of rows: the 3r+1 dots of each module reduced like the forward
//                    (h and dout streamed or held in registers: coef_schedule; accumulated in fp64 for
//                    fp32 storage, see the kernel); per-row coefficients (de, dz, s g e) to a small
//                    fp32 buffer [P][K][2r+1]. coef_tensor_kernel: the same on tensor cores (16-bit
//                    storage, one module; opt-in, coef_schedule::tensor).
//                    When the forward kept e = D h + b − [lo] U h and z per position (saved_activations,
//                    16-bit storage), both read dout only and form U·x alone — half their bytes.
//   slot_kernel      backward, grid (slot, column block): each slot is a fixed run of consecutive
//                    positions; a thread owns 4 (or 1) columns, walks the slot's rows, accumulates the
//                    trained module's 2r+1 gradient rows in registers and writes them to the slot's own
//                    partial-sum area, and writes dh for its columns (dout re-read, parameters held in
//                    registers for K = 1, r ≤ 8). slot_tensor_kernel: the same on tensor cores (bf16,
//                    one module; opt-in, slot_schedule::tensor).
//   sum_slots_kernel the deterministic second stage: every gradient entry = Σ over slots in double,
//                    in a grouping fixed by the slot count (8 runs, each in slot order), stored into the
//                    gradient leaves. No atomics anywhere, and the slot size depends only on (P, d, r):
//                    bitwise-repeatable on a given GPU.
//
// Files (kernels/grun/cuda/fused/, included here; include this header, not those):
//   common.cuh           policy traits, packed parameters, vector loads, the CUDA-core dot loops
//   schedules.cuh        the tuning knobs: forward_plan, coef_plan, slot_plan
//   forward.cuh          forward_kernel (CUDA cores)
//   tensor_core.cuh      mma.sync fragments, movmatrix, cp.async, staged parameter rows
//   forward_tensor.cuh   forward_tensor_kernel
//   backward.cuh         coef_kernel, slot_kernel, sum_slots_kernel (CUDA cores)
//   backward_tensor.cuh  coef_tensor_kernel, slot_tensor_kernel
// and this file the host side: positions, packing, which kernel and schedule a call takes, launches.
#include <algorithm>
#include <span>
#include <type_traits>
#include <vector>

#include "scratch.cuh"

#include "fused/common.cuh"
#include "fused/schedules.cuh"
#include "fused/forward.cuh"
#include "fused/forward_tensor.cuh"
#include "fused/backward.cuh"
#include "fused/backward_tensor.cuh"

namespace grun::cuda::fused {
namespace detail {

template <int R> constexpr int forward_rows() { return 2 * R + 1 <= 9 ? 4 : 2 * R + 1 <= 17 ? 2 : 1; }
template <int R> constexpr int backward_rows() { return 3 * R + 1 <= 13 ? 2 : 1; }  // x and dout rows both in registers

inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }
/// A view whose rows can be read with 16-byte vectors of V elements.
template <class T, class View>
bool vector_rows(const View& v, int V) {
  return v.extent(1) % V == 0 && aligned16(v.data()) && (v.stride(0) * index_t(sizeof(T))) % 16 == 0;
}

/// The position list on the device for the fused kernels: nothing at all when it selects every row
/// in order (ptr() null; the kernels then read row q for position q — no upload, no host round trip
/// at the common "every token" call), else a stream-ordered copy of it.
class device_positions {
 public:
  device_positions(const positions& pos, index_t n, cudaStream_t s)
      : list_(cuda::detail::selects_every_row(pos, n) ? 0 : pos.size(), s) {
    if (list_.ptr != nullptr)
      GRUN_CUDA_CHECK(cudaMemcpyAsync(list_.ptr, pos.data(), sizeof(index_t) * std::size_t(pos.size()),
                                      cudaMemcpyHostToDevice, s));
  }
  const index_t* ptr() const { return list_.ptr; }

 private:
  cuda::detail::stream_scratch<index_t> list_;
};

/// Where one module's parameters live (w, c null for gate::always).
template <class I, class T>
src_ptrs<T> sources_of(const module_params<I, T, cuda_space>& m) {
  src_ptrs<T> p{m.reft.rotate_layer.data, m.reft.weight.data, m.reft.bias.data, nullptr, nullptr};
  if constexpr (gate_kind<typename I::gate_type>::value == 1) {
    p.w = m.gate.weight.data;
    p.c = m.gate.bias.data;
  }
  return p;
}

/// Packs K modules' parameters (as stored, rows padded to dp) into `packed` [K][ms]. Up to
/// tensor_max_modules modules, their sources travel by value in the launch; a larger stack's go
/// host → device first.
template <class I, class T>
void pack(std::span<const module_params<I, T, cuda_space>> modules, index_t d, index_t dp, index_t ms, T* packed,
          cudaStream_t s) {
  constexpr int R = int(I::rank);
  const index_t K = index_t(modules.size());
  const unsigned grid = unsigned(std::min<index_t>(cuda::ceil_div(K * ms, 256), 4096));
  if (K <= tensor_max_modules) {
    module_ptrs<T> mods{};
    for (index_t k = 0; k < K; ++k) mods.m[k] = sources_of<I, T>(modules[std::size_t(k)]);
    pack_kernel<T><<<grid, 256, 0, s>>>(mods, K, R, d, dp, ms, packed);
  } else {
    std::vector<src_ptrs<T>> host(static_cast<std::size_t>(K));
    for (index_t k = 0; k < K; ++k) host[std::size_t(k)] = sources_of<I, T>(modules[std::size_t(k)]);
    cuda::detail::stream_scratch<src_ptrs<T>> srcs(K, s);
    GRUN_CUDA_CHECK(cudaMemcpyAsync(srcs.ptr, host.data(), sizeof(src_ptrs<T>) * host.size(), cudaMemcpyHostToDevice, s));
    pack_kernel<T><<<grid, 256, 0, s>>>(static_cast<const src_ptrs<T>*>(srcs.ptr), K, R, d, dp, ms, packed);
  }
  GRUN_CUDA_CHECK_LAUNCH();
}

/// Storage and ranks the tensor schedule takes: 16-bit storage (mma.sync's operands), 2r + 1 ≤ 32
/// parameter rows (two m16 tiles).
template <class T, int R>
inline constexpr bool tensor_takes = (std::is_same_v<T, half> || std::is_same_v<T, bfloat16>) && 2 * R + 1 <= 32;

/// What the tensor schedule asks of the current device, asked once per device: compute capability
/// ≥ 8.0 (mma.sync m16n8k16 on 16-bit operands), its shared memory limits and SM count.
struct device_limits {
  bool mma = false;
  int smem_per_block_optin = 48 * 1024, smem_per_sm = 0, sms = 1;
};
inline device_limits limits_of_device() {
  return per_device<device_limits>([](int dev) {
    device_limits l;
    int major = 0;
    GRUN_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    l.mma = major >= 8;
    GRUN_CUDA_CHECK(cudaDeviceGetAttribute(&l.smem_per_block_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    GRUN_CUDA_CHECK(cudaDeviceGetAttribute(&l.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev));
    GRUN_CUDA_CHECK(cudaDeviceGetAttribute(&l.sms, cudaDevAttrMultiProcessorCount, dev));
    return l;
  });
}

/// The staged tensor kernel's dynamic shared memory for dimension d, and whether a device takes it
/// with 2 CTAs per SM (else the unstaged kernel runs).
template <class T, int R>
std::size_t staged_bytes(index_t d) {
  return std::size_t(2 * R + 1) * std::size_t(staged_row_stride(d)) * sizeof(T);
}
/// Whether the current device runs a staged tensor kernel — the 2r+1 parameter rows (staged_bytes) in
/// dynamic shared memory beside `fixed` bytes of static shared memory (the kernel's own) — with 2 CTAs
/// per SM (1 KiB per CTA is the system's).
template <class T, int R>
bool staged_fits(index_t d, const device_limits& lim, std::size_t fixed) {
  const std::size_t bytes = staged_bytes<T, R>(d);
  return bytes + fixed <= std::size_t(lim.smem_per_block_optin) && 2 * (bytes + fixed + 1024) <= std::size_t(lim.smem_per_sm);
}
/// The pipelined tensor forward's dynamic shared memory: the 2r+1 parameter rows and two tiles of
/// tensor_rows rows, staged_row_stride(d) apart.
template <class T, int R>
std::size_t pipelined_bytes(index_t d) {
  return std::size_t(2 * R + 1 + 2 * tensor_rows) * std::size_t(staged_row_stride(d)) * sizeof(T);
}
/// Whether the current device runs the pipelined tensor forward (one CTA per SM) beside `fixed` bytes
/// of static shared memory: at d = 4096, loreft<4> bf16, 206 KiB of an H100's or H200's 227; not an
/// A100's 163 (those calls run the tensor schedule).
template <class T, int R>
bool pipelined_fits(index_t d, const device_limits& lim, std::size_t fixed) {
  const std::size_t bytes = pipelined_bytes<T, R>(d);
  return bytes + fixed <= std::size_t(lim.smem_per_block_optin) && bytes + fixed + 1024 <= std::size_t(lim.smem_per_sm);
}
/// Opts Kernel, whose static shared memory is `fixed` bytes, in to all the dynamic shared memory a CTA
/// can have beside it, once per device (an attribute of the function on the current device). The
/// driver refuses a value that, with the static part, passes the device's per-CTA opt-in limit.
template <auto Kernel>
void allow_large_shared_memory(const device_limits& lim, std::size_t fixed) {
  (void)per_device<bool>([&](int) {
    GRUN_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(Kernel), cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         lim.smem_per_block_optin - int(fixed)));
    return true;
  });
}

/// The tensor schedule's launch, when the call is one it takes (16-byte vector rows of h and out,
/// d ≤ 4096, at most tensor_max_modules modules, an sm_80+ device); false, having done nothing,
/// otherwise. One module whose parameter rows fit in shared memory twice per SM: the staged,
/// persistent kernel (any alignment of the parameters). Else one CTA per tile, parameters read in
/// place when their rows are 16-byte vectors, packed first when not.
template <class I, class T, int GM, class Keep>
bool launch_forward_tensor(std::span<const module_params<I, T, cuda_space>> modules, double scale,
                           matrix_view<const T, cuda_space> h, const positions& pos, matrix_view<T, cuda_space> out,
                           matrix_view<T, cuda_space> gates, const float* gext, Keep&& keep, cudaStream_t s) {
  constexpr int R = int(I::rank);
  constexpr bool LO = reft_kind<typename I::reft_type>::value == 1;
  const index_t d = h.extent(1), P = pos.size(), K = index_t(modules.size());
  const index_t nvec = d / 8, per_thread = cuda::ceil_div(nvec, index_t(tensor_block / 8));
  if (K > tensor_max_modules || !vector_rows<T>(h, 8) || !vector_rows<T>(out, 8) || per_thread > tensor_max_held)
    return false;
  const device_limits lim = limits_of_device();
  if (!lim.mma) return false;
  float* const kept = keep(index_t(kept_width<R>));  // the call is taken: where to keep e and z (or null)
  module_ptrs<T> mods{};
  bool aligned = true;
  for (index_t k = 0; k < K; ++k) {
    const src_ptrs<T> p = sources_of<I, T>(modules[std::size_t(k)]);
    aligned = aligned && aligned16(p.U) && aligned16(p.D) && (p.w == nullptr || aligned16(p.w));
    mods.m[k] = p;
  }
  const device_positions dpos(pos, h.extent(0), s);
  const index_t tiles = cuda::ceil_div(P, index_t(tensor_rows));
  const std::size_t staged = staged_bytes<T, R>(d);
  const bool stage = K == 1 && tiles > 1 && staged_fits<T, R>(d, lim, forward_tensor_static_bytes<R>());
  auto launch = [&](auto held, auto staged_kernel, auto apply_on_tensor_cores, auto pipelined_kernel) {
    constexpr bool S = decltype(staged_kernel)::value, PL = decltype(pipelined_kernel)::value;
    constexpr auto kernel =
        forward_tensor_kernel<T, R, LO, GM, decltype(held)::value, S, decltype(apply_on_tensor_cores)::value, PL>;
    if constexpr (PL) {  // one CTA per SM
      allow_large_shared_memory<kernel>(lim, forward_tensor_static_bytes<R>());
      const unsigned grid = unsigned(std::min<index_t>(tiles, index_t(lim.sms)));
      kernel<<<grid, pipelined_block, pipelined_bytes<T, R>(d), s>>>(mods, K, float(scale), h, dpos.ptr(), P, out,
                                                                     gates, gext, kept);
    } else if constexpr (S) {
      allow_large_shared_memory<kernel>(lim, forward_tensor_static_bytes<R>());
      const unsigned grid = unsigned(std::min<index_t>(tiles, index_t(2) * lim.sms));
      kernel<<<grid, tensor_block, staged, s>>>(mods, K, float(scale), h, dpos.ptr(), P, out, gates, gext, kept);
    } else {
      kernel<<<unsigned(tiles), tensor_block, 0, s>>>(mods, K, float(scale), h, dpos.ptr(), P, out, gates, gext, kept);
    }
  };
  using small = std::integral_constant<int, 4>;
  using large = std::integral_constant<int, tensor_max_held>;
  using yes = std::true_type;
  using no = std::false_type;
  // forward_schedule::tensor_pipelined: one module, the tile double-buffered in shared memory.
  if (forward_plan == forward_schedule::tensor_pipelined && K == 1 && tiles > 1 && d > 0 &&
      pipelined_fits<T, R>(d, lim, forward_tensor_static_bytes<R>())) {
    per_thread <= 4 ? launch(small{}, yes{}, no{}, yes{}) : launch(large{}, yes{}, no{}, yes{});
    GRUN_CUDA_CHECK_LAUNCH();
    return true;
  }
  if (stage) {
    // forward_schedule::tensor_apply: the write of h' on tensor cores too (bf16, r ≤ 8).
    bool applied = false;
    if constexpr (std::is_same_v<T, bfloat16> && R <= 8)
      if (forward_plan == forward_schedule::tensor_apply) {
        per_thread <= 4 ? launch(small{}, yes{}, yes{}, no{}) : launch(large{}, yes{}, yes{}, no{});
        applied = true;
      }
    if (!applied) per_thread <= 4 ? launch(small{}, yes{}, no{}, no{}) : launch(large{}, yes{}, no{}, no{});
    GRUN_CUDA_CHECK_LAUNCH();
    return true;
  }
  // Parameter rows read in place when they are 16-byte vectors (d % 8 == 0 here, so when each
  // tensor starts aligned); else packed first (one small kernel, the sources by value) — e.g. one
  // flat buffer per module, where the tensors after a bias of r elements start mid-vector.
  const index_t ms = module_stride(R, d);
  cuda::detail::stream_scratch<T> packed(aligned ? 0 : K * ms, s);
  if (!aligned) {
    pack<I, T>(modules, d, d, ms, packed.ptr, s);
    for (index_t k = 0; k < K; ++k) mods.m[k] = packed_sources<T>(packed.ptr + k * ms, R, d, mods.m[k].w != nullptr);
  }
  per_thread <= 4 ? launch(small{}, no{}, no{}, no{}) : launch(large{}, no{}, no{}, no{});
  GRUN_CUDA_CHECK_LAUNCH();
  return true;
}

/// coef_tensor_kernel's launch for one packed module (pm, rows dp apart), when the call is one it
/// takes (h and dout in 16-byte vector rows, an sm_80+ device that holds the staged parameter rows
/// twice per SM); false, having done nothing, otherwise.
template <class T, int R, bool LO, int GM, class DG>
bool launch_coef_tensor(const T* pm, index_t dp, index_t trained, float scale, matrix_view<const T, cuda_space> h,
                        matrix_view<const T, cuda_space> dout, matrix_view<const DG, cuda_space> dgates,
                        const index_t* pos, index_t P, float* cf, float* rc, const float* gext, float* dz,
                        const float* kept, cudaStream_t s) {
  static_assert(tensor_takes<T, R>);
  const index_t d = h.extent(1);
  if (!vector_rows<T>(h, 8) || !vector_rows<T>(dout, 8) || P < 1) return false;
  const device_limits lim = limits_of_device();
  if (!lim.mma || !staged_fits<T, R>(d, lim, coef_tensor_static_bytes<R>())) return false;
  const index_t tiles = cuda::ceil_div(P, index_t(tensor_rows));
  const unsigned grid = unsigned(std::min<index_t>(tiles, index_t(2) * lim.sms));
  auto launch_as = [&](auto from_kept) {
    constexpr auto kernel = coef_tensor_kernel<T, R, LO, GM, decltype(from_kept)::value, DG>;
    allow_large_shared_memory<kernel>(lim, coef_tensor_static_bytes<R>());
    kernel<<<grid, tensor_block, staged_bytes<T, R>(d), s>>>(pm, dp, trained, scale, h, dout, dgates, pos, P, cf, rc,
                                                             gext, dz, kept);
  };
  kept ? launch_as(std::true_type{}) : launch_as(std::false_type{});
  GRUN_CUDA_CHECK_LAUNCH();
  return true;
}

}  // namespace detail

/// Fused forward core for gate mode GM (gext: [K][P] fp32 gate logits when GM = gate_external, the gate
/// values themselves when GM = gate_value).
/// Returns false, having done nothing, when this call is not one the fused kernels take (rows not
/// contiguous, too many modules for shared memory); the caller then runs the generic path.
template <class I, class T, int GM, class Keep = keep_nothing>
bool forward_impl(const exec::cuda_t& ex, std::span<const module_params<I, T, cuda_space>> modules, double scale,
                  matrix_view<const T, cuda_space> h, const positions& pos, matrix_view<T, cuda_space> out,
                  matrix_view<T, cuda_space> gates, const float* gext, Keep&& keep = {}) {
  using Rf = typename I::reft_type;
  static_assert(reft_kind<Rf>::value >= 0 && I::rank <= max_rank);
  static_assert(takes_storage<T>, "grun::cuda::fused: float, half or bfloat16 storage (double takes the generic path)");
  constexpr int R = int(I::rank);
  constexpr bool LO = reft_kind<Rf>::value == 1;
  constexpr int ROWS = detail::forward_rows<R>();
  const index_t N = h.extent(0), d = h.extent(1), P = pos.size(), K = index_t(modules.size());
  const index_t coef_floats = (K * ROWS * R + 3) / 4 * 4;
  if (h.stride(1) != 1 || out.stride(1) != 1 || coef_floats * index_t(sizeof(float)) > 32 * 1024) return false;
  if (N == 0) return true;
  require_device("gated_intervention::forward");
  const cudaStream_t s = stream_of(ex);
  if (!cuda::detail::selects_every_row(pos, N)) cuda::detail::copy_rows<T>(h, out, s);
  if (P == 0 || K == 0) return true;

  if constexpr (detail::tensor_takes<T, R>) {
    if ((detail::forward_plan == detail::forward_schedule::tensor ||
         detail::forward_plan == detail::forward_schedule::tensor_apply ||
         detail::forward_plan == detail::forward_schedule::tensor_pipelined) &&
        detail::launch_forward_tensor<I, T, GM>(modules, scale, h, pos, out, gates, gext, keep, s))
      return true;
  }

  const index_t dp = detail::padded_dim(d), ms = detail::module_stride(R, dp);
  cuda::detail::stream_scratch<T> packed(K * ms, s);
  detail::pack<I, T>(modules, d, dp, ms, packed.ptr, s);
  const detail::device_positions dpos(pos, N, s);
  // e and z kept for the backward: 16-bit storage only (fp32's coefficient kernel forms them from
  // fp64 dots, which this forward's fp32 dots would not match — see coef_kernel).
  float* kept = nullptr;
  if constexpr (!std::is_same_v<T, float>) kept = keep(index_t(detail::kept_width<R>));

  constexpr int VW = vec_width<T>;
  const bool vec = detail::vector_rows<T>(h, VW) && detail::vector_rows<T>(out, VW);
  const index_t per_thread = cuda::ceil_div(d / VW, index_t(detail::block));  // vectors per thread and row
  const index_t tile_bytes = index_t(ROWS) * d * index_t(sizeof(T));
  const bool fits = coef_floats * index_t(sizeof(float)) + tile_bytes <= 40 * 1024;
  const auto plan = detail::forward_plan;
  const bool resident = plan == detail::forward_schedule::resident && vec && per_thread <= detail::max_resident;
  const bool staged = plan == detail::forward_schedule::staged && vec && fits;
  const bool stage = !resident && fits;
  const std::size_t smem = std::size_t(coef_floats * index_t(sizeof(float)) + (stage ? tile_bytes : 0));
  const unsigned grid = unsigned(cuda::ceil_div(P, ROWS));
  auto launch = [&](auto vw, auto res, auto async) {
    const auto kernel = detail::forward_kernel<T, decltype(vw)::value, R, ROWS, LO, GM, decltype(res)::value,
                                               decltype(async)::value>;
    kernel<<<grid, detail::block, smem, s>>>(packed.ptr, ms, dp, K, float(scale), h, dpos.ptr(), P, out, gates, gext,
                                             stage, coef_floats, kept);
  };
  using vw = std::integral_constant<int, VW>;
  using none = std::integral_constant<int, 0>;
  if (resident) {
    if (per_thread == 1) launch(vw{}, std::integral_constant<int, 1>{}, std::false_type{});
    else if (per_thread == 2) launch(vw{}, std::integral_constant<int, 2>{}, std::false_type{});
    else launch(vw{}, std::integral_constant<int, detail::max_resident>{}, std::false_type{});  // 3 or 4
  } else if (staged) {
    launch(vw{}, none{}, std::true_type{});
  } else {
    vec ? launch(vw{}, none{}, std::false_type{}) : launch(std::integral_constant<int, 1>{}, none{}, std::false_type{});
  }
  GRUN_CUDA_CHECK_LAUNCH();
  return true;
}

/// Fused forward (see the file comment) for gate::linear / gate::always.
/// keep(width) → float*: called (16-bit storage) once a fused forward kernel takes the call, with the
/// scalars a position and module it can keep (e and z); returns where ([K][P][width] fp32, device),
/// or null for nothing.
template <class I, class T, class Keep = keep_nothing>
bool forward(const exec::cuda_t& ex, std::span<const module_params<I, T, cuda_space>> modules, double scale,
             matrix_view<const T, cuda_space> h, const positions& pos, matrix_view<T, cuda_space> out,
             matrix_view<T, cuda_space> gates, Keep&& keep = {}) {
  using G = typename I::gate_type;
  static_assert(supported<G, typename I::reft_type, typename I::ortho_type>);
  constexpr int GM = gate_kind<G>::value == 1 ? detail::gate_linear : detail::gate_none;
  return forward_impl<I, T, GM>(ex, modules, scale, h, pos, out, gates, nullptr, keep);
}

/// Fused backward core for gate mode GM: dh and the ReFT (and linear gate) gradients of module
/// `trained` (overwritten). With gate_external, gext [K][P] holds the logits z, and after the coefficient
/// kernel `mid(dz)` runs with dz [K][P] = dL/dz (the gate's last pre-activation, device fp32); with
/// gate_value, gext holds g and mid gets dL/dg. mid returns the gate's path of dL/dh, added to dh
/// (detail::gate_path; empty when there is none). kept: null, or what the forward kept ([K][P][R + 1]
/// fp32: e and z; 16-bit storage) — then the coefficient kernel reads dout only. Returns false,
/// having done nothing, when the call is not one the fused kernels take.
template <class I, class T, int GM, class DG, class Mid>
bool backward_impl(const exec::cuda_t& ex, std::span<const module_params<I, T, cuda_space>> modules, double scale,
                   index_t trained, matrix_view<const T, cuda_space> h, const positions& pos,
                   matrix_view<const T, cuda_space> dout, matrix_view<const DG, cuda_space> dgates,
                   matrix_view<T, cuda_space> dh, const module_params<I, T, cuda_space>& grads, const float* gext,
                   Mid&& mid, const float* kept = nullptr) {
  using Rf = typename I::reft_type;
  static_assert(reft_kind<Rf>::value >= 0 && I::rank <= max_rank);
  static_assert(takes_storage<T>, "grun::cuda::fused: float, half or bfloat16 storage (double takes the generic path)");
  // The vector path reads rows in VW-element vectors (d % VW == 0, rows 16-byte aligned) and the slot
  // kernel then gives each thread 4 columns: 4 | VW keeps those columns inside d and their loads aligned.
  static_assert(vec_width<T> % 4 == 0);
  constexpr int R = int(I::rank);
  constexpr bool LO = reft_kind<Rf>::value == 1, GATED = GM == detail::gate_linear;
  constexpr int ROWS = detail::backward_rows<R>();
  constexpr int NP = 2 * R + 1;
  const index_t N = h.extent(0), d = h.extent(1), P = pos.size(), K = index_t(modules.size());
  if (h.stride(1) != 1 || dout.stride(1) != 1 || dh.stride(1) != 1 || K < 1) return false;
  const cudaStream_t s = stream_of(ex);
  require_device("gated_intervention::backward");
  if (!cuda::detail::selects_every_row(pos, N)) cuda::detail::copy_rows<T>(dout, dh, s);

  const index_t dp = detail::padded_dim(d), ms = detail::module_stride(R, dp);
  constexpr int VW = vec_width<T>;
  const bool vec = detail::vector_rows<T>(h, VW) && detail::vector_rows<T>(dout, VW) && detail::vector_rows<T>(dh, VW);
  bool tensor_slots = false;
  if constexpr (detail::slot_tensor_takes<T, R>)
    tensor_slots = detail::slot_plan == detail::slot_schedule::tensor && K == 1 && trained == 0 && vec &&
                   detail::limits_of_device().mma;
  // Slots: runs of rps consecutive positions; their number and size depend on (P, d, r) and the
  // schedule only. The tensor schedule's hold whole steps of 16 positions, at least 4 of them, and
  // are at most 128 (the slot kernel on CUDA cores: up to slot_limit, 512 unless a benchmark set it).
  const index_t max_slots = std::clamp<index_t>((index_t(256) << 20) / (ms * index_t(sizeof(float))), 1,
                                                tensor_slots ? 128 : std::max<index_t>(1, detail::slot_limit));
  const index_t rps = tensor_slots ? std::max<index_t>(64, cuda::ceil_div(cuda::ceil_div(P, max_slots), 16) * 16)
                                   : std::max<index_t>(16, cuda::ceil_div(P, max_slots));
  const index_t nslots = P > 0 ? cuda::ceil_div(P, rps) : 0;

  detail::dst_ptrs<T> dst{grads.reft.rotate_layer.data, grads.reft.weight.data, grads.reft.bias.data, nullptr, nullptr};
  if constexpr (GATED) {
    dst.w = grads.gate.weight.data;
    dst.c = grads.gate.bias.data;
  }
  cuda::detail::stream_scratch<float> slots(nslots * ms, s);
  if (P > 0) {
    cuda::detail::stream_scratch<T> packed(K * ms, s);
    detail::pack<I, T>(modules, d, dp, ms, packed.ptr, s);
    const detail::device_positions dpos(pos, N, s);
    cuda::detail::stream_scratch<float> cf(P * K * NP, s), rc(P * NP, s), dz(detail::gate_from_outside<GM> ? K * P : 0, s);
    // The coefficient kernels write every position's rc row for the trained module; a trained index
    // outside [0, K) leaves them unset: then zero (no gradient). (Unconditional, this was a launch
    // and a 590 KB write per backward at T = 16384, r = 4.)
    if (trained < 0 || trained >= K) GRUN_CUDA_CHECK(cudaMemsetAsync(rc.ptr, 0, sizeof(float) * std::size_t(P * NP), s));

    const unsigned grid1 = unsigned(cuda::ceil_div(P, ROWS));
    const index_t per_thread = cuda::ceil_div(d / VW, index_t(detail::block));  // vectors per thread and row
    const bool resident = detail::coef_plan == detail::coef_schedule::resident && vec && per_thread <= detail::max_resident;
    bool tensor_coefs = false;
    if constexpr (detail::tensor_takes<T, R>)
      tensor_coefs = detail::coef_plan == detail::coef_schedule::tensor && K == 1 &&
                     detail::launch_coef_tensor<T, R, LO, GM, DG>(packed.ptr, dp, trained, float(scale), h, dout, dgates,
                                                                  dpos.ptr(), P, cf.ptr, rc.ptr, gext, dz.ptr, kept, s);
    auto coefs = [&](auto vw, auto res) {
      auto launch_as = [&](auto from_kept) {
        const auto kernel =
            detail::coef_kernel<T, decltype(vw)::value, R, ROWS, LO, GM, decltype(res)::value, decltype(from_kept)::value, DG>;
        kernel<<<grid1, detail::block, 0, s>>>(packed.ptr, ms, dp, K, trained, float(scale), h, dout, dgates,
                                               dpos.ptr(), P, cf.ptr, rc.ptr, gext, dz.ptr, kept);
      };
      if constexpr (std::is_same_v<T, float>) launch_as(std::false_type{});  // (fp32: never kept)
      else kept ? launch_as(std::true_type{}) : launch_as(std::false_type{});
    };
    using vw = std::integral_constant<int, VW>;
    if (!tensor_coefs) {
      if (resident) {
        if (per_thread == 1) coefs(vw{}, std::integral_constant<int, 1>{});
        else if (per_thread == 2) coefs(vw{}, std::integral_constant<int, 2>{});
        else coefs(vw{}, std::integral_constant<int, detail::max_resident>{});  // 3 or 4
      } else {
        vec ? coefs(vw{}, std::integral_constant<int, 0>{}) : coefs(std::integral_constant<int, 1>{}, std::integral_constant<int, 0>{});
      }
      GRUN_CUDA_CHECK_LAUNCH();
    }
    const detail::gate_path<T> dhg = mid(static_cast<const float*>(dz.ptr));

    auto launch_tensor = [&] {
      if constexpr (detail::slot_tensor_takes<T, R>) {
        const dim3 grid(unsigned(nslots), unsigned(cuda::ceil_div(d, index_t(detail::slot_tensor_block))));
        detail::slot_tensor_kernel<R><<<grid, detail::slot_tensor_block, 0, s>>>(
            packed.ptr, ms, dp, h, dout, dpos.ptr(), P, rps, cf.ptr, rc.ptr, dhg, dh, slots.ptr);
      }
    };
    const bool hold = K == 1 && R <= 8;
    const int CW = vec ? 4 : 1;
    const dim3 grid2(unsigned(nslots), unsigned(std::max<index_t>(1, cuda::ceil_div(d / CW, detail::block))));
    auto launch = [&](auto cw, auto hd) {
      constexpr int C = decltype(cw)::value;
      constexpr bool H = decltype(hd)::value && R <= 8;
      detail::slot_kernel<T, C, R, LO, GATED, H><<<grid2, detail::block, 0, s>>>(
          packed.ptr, ms, dp, K, h, dout, dpos.ptr(), P, rps, cf.ptr, rc.ptr, dhg, dh, slots.ptr);
    };
    if (tensor_slots) {
      launch_tensor();
    } else if (vec) {
      if (hold) launch(std::integral_constant<int, 4>{}, std::true_type{});
      else launch(std::integral_constant<int, 4>{}, std::false_type{});
    } else {
      if (hold) launch(std::integral_constant<int, 1>{}, std::true_type{});
      else launch(std::integral_constant<int, 1>{}, std::false_type{});
    }
    GRUN_CUDA_CHECK_LAUNCH();
  }
  const index_t nout = NP * d + R + 1;
  detail::sum_slots_kernel<T, R, GATED><<<unsigned(cuda::ceil_div(nout, 32)), detail::sum_block, 0, s>>>(
      slots.ptr, nslots, ms, dp, d, dst);
  GRUN_CUDA_CHECK_LAUNCH();
  return true;
}

/// Fused backward (see the file comment) for gate::linear / gate::always: dh and the trained
/// module's gradients (overwritten).
template <class I, class T, class DG>
bool backward(const exec::cuda_t& ex, std::span<const module_params<I, T, cuda_space>> modules, double scale,
              index_t trained, matrix_view<const T, cuda_space> h, const positions& pos,
              matrix_view<const T, cuda_space> dout, matrix_view<const DG, cuda_space> dgates,
              matrix_view<T, cuda_space> dh, const module_params<I, T, cuda_space>& grads,
              const float* kept = nullptr) {
  using G = typename I::gate_type;
  static_assert(supported<G, typename I::reft_type, typename I::ortho_type>);
  constexpr int GM = gate_kind<G>::value == 1 ? detail::gate_linear : detail::gate_none;
  return backward_impl<I, T, GM>(ex, modules, scale, trained, h, pos, dout, dgates, dh, grads, nullptr,
                                 [](const float*) { return detail::gate_path<T>{}; }, kept);
}

}  // namespace grun::cuda::fused
