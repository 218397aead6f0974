#pragma once
// grun/cuda/fused/schedules.cuh — how the fused kernels read and compute, per kernel: the forward,
// the backward's coefficient kernel and its slot kernel. Tuning knobs for benchmarks and tests, not
// an interface: every schedule of a kernel is held to the host by the agreement tests, bench_cuda
// times each, and a GPU run (benchmarks/gpu_slot.sh, fastest.txt) says which one each default
// should be. Set them before any call. Part of intervention_fused.cuh (include that).

#include <grun/core/config.hpp>  // index_t

namespace grun::cuda::fused::detail {

/// How the forward kernel reads its tile of ROWS rows. A tuning knob for benchmarks and tests (every
/// schedule gives the same bits — each thread sums the same columns in the same order — and the
/// tests check it; bench_cuda times each), not an interface: set it before any call.
///   stream    one 16-byte vector of each row of the tile in flight per thread at a time, the tile
///             copied to shared memory on the way for the write of h' (or re-read when it does not
///             fit). Measured on an H200 (BENCHMARKS.md): 35% of copy bandwidth at d = 4096 bf16,
///             latency-bound (every unit under 60% busy, ~11 cycles per issue).
///   resident  every vector the thread owns (d ≤ max_resident·block·V: 4096 in 16-bit storage, 2048
///             in fp32) loaded at once, up front — ROWS·⌈d/(V·block)⌉ loads in flight per thread,
///             16 at d = 4096 bf16 — and kept in registers for the dots of every module and the
///             write of h': no staging and no second read, at the price of registers (≈190 at
///             d = 4096 bf16: 2 CTAs per SM).
///   staged    the whole tile copied to shared memory by cp.async (cooperative_groups::memcpy_async):
///             all of it in flight at once without holding registers, then the dots and the write
///             read shared memory. Needs the tile in shared memory (ROWS·d·sizeof(T) + coef ≤ 40 KiB).
///   tensor    (the default) the dots on tensor cores (forward_tensor_kernel, forward_tensor.cuh),
///             tiles of 8 rows held in registers by 256 threads; one module: its parameters staged
///             in shared memory once per CTA and the CTAs persistent; a stack: parameters read in
///             place (packed when not 16-byte aligned). 16-bit storage, d ≤ 4096, K ≤ 8, sm_80+. Not
///             the same bits as the three above (another summation order; the same bits run to run);
///             the agreement tests hold it to the host like every other path.
///   tensor_apply  tensor, and with one module in bf16 (the staged kernel) the write of h' on tensor
///             cores too (apply_on_tensor_cores); other calls as tensor. Not yet timed on a GPU.
///   tensor_pipelined  tensor, and with one module whose parameters and two tiles fit in shared
///             memory (pipelined_fits) one CTA per SM that double-buffers its tiles by cp.async: the
///             next tile lands while this one is reduced and written. The tensor schedule's bits.
///             Other calls as tensor. Not yet timed on a GPU.
/// Calls a schedule cannot take (fp32 storage, rows that are not 16-byte vectors, rows too wide)
/// run `stream`.
enum class forward_schedule { stream, resident, staged, tensor, tensor_apply, tensor_pipelined };
inline forward_schedule forward_plan = forward_schedule::tensor;

/// Most vectors per thread and row the resident schedule keeps in registers.
inline constexpr int max_resident = 4;

/// How the coefficient kernel reads h and dout (a tuning knob like forward_schedule: same bits, tested
/// and timed; not an interface):
///   stream    one vector of each row of h and of dout in flight per thread at a time (measured on an
///             H200: 121 µs at d = 4096, T = 16384 bf16, 47% of DRAM bandwidth);
///   resident  every vector the thread owns of both (d ≤ max_resident·block·V) loaded up front,
///             2·ROWS·⌈d/(V·block)⌉ loads in flight per thread (16 at d = 4096 bf16), then the dots.
///   tensor    coef_tensor_kernel: the dots on tensor cores as in the forward's tensor schedule, the
///             module's parameter rows staged in shared memory by persistent CTAs, h and dout streamed
///             with the next batch of loads in flight. 16-bit storage, one module, 16-byte vector rows,
///             sm_80+, the rows fitting in shared memory twice per SM; other calls run `stream`. Other
///             bits than stream and resident (summation order), held to the host like them. Not yet
///             timed on a GPU.
enum class coef_schedule { stream, resident, tensor };
inline coef_schedule coef_plan = coef_schedule::stream;

/// How the backward's second kernel forms dh and the slots' gradient rows (a tuning knob like
/// forward_schedule; not an interface):
///   cuda_cores  slot_kernel (measured on an H200: 274 µs at d = 4096, T = 16384 bf16, 36% of DRAM
///               bandwidth, latency-bound at 164 registers);
///   tensor      slot_tensor_kernel: both products on tensor cores, 16 positions per step, larger
///               slots (fewer partial sums to write and add). bf16 storage, one module (the one
///               trained), rows in 16-byte vectors, sm_80+; other calls run cuda_cores. Other bits than
///               cuda_cores (summation order), held to the host like every path. Not yet timed on a GPU.
enum class slot_schedule { cuda_cores, tensor };
inline slot_schedule slot_plan = slot_schedule::cuda_cores;

/// Most slots of slot_kernel (the cuda_cores schedule; the tensor one takes at most 128). A slot is a
/// run of consecutive positions whose gradient rows one column of CTAs sums into a partial
/// [module size] fp32 buffer; sum_slots_kernel then adds the slots. More slots, more CTAs (the grid is
/// slots × d/512) and a smaller tail, but every slot's partial sums are written once and read once:
/// at d = 4096, r = 4, 147 KB a slot — 75 MB each way at 512 slots, beside the 384 MiB the slot kernel
/// must move (h and dout read, dh written), against 19 MB at 128. A tuning knob like the schedules
/// (bench_cuda --slots, rows …_fwdbwd_slots128 and …_slots256). The slot count changes the order in
/// which the partial sums are added: other bits, held to the host like every path (dh keeps its
/// bits). 512 was chosen for parallelism, not measured against fewer; not yet timed on a GPU.
inline index_t slot_limit = 512;

}  // namespace grun::cuda::fused::detail
