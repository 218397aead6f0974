// tests/emulation/runtime.cpp — the CUDA runtime calls grun makes, over host memory, and the grid
// runner behind cuda_emulation.hpp's launches. One emulated device (device 0). Every stream — the
// legacy default stream and those made by cudaStreamCreateWithFlags — keeps its work in line until
// something waits for it (see stream_queue), so stream order is kept and nothing more.
//
// Device memory is host memory the runtime keeps a table of: cudaPointerGetAttributes answers
// from it, and every copy and memset checks its ranges against it (a copy that runs off an
// allocation, or names the wrong direction, fails with the error the runtime would give instead of
// scribbling). Fresh allocations are filled with 0xFF bytes (NaN in every float type, −1 in
// integers): a kernel that reads what no one wrote shows in the results.
#include <cuda_emulation.hpp>
#include <cuda_profiler_api.h>
#include "run_order.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <numeric>
#include <optional>
#include <random>
#include <string_view>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include <ucontext.h>
#include <unistd.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define GRUN_EMU_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define GRUN_EMU_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define GRUN_EMU_POISON(p, n) ((void)(p), (void)(n))
#define GRUN_EMU_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

namespace grun_emu {
namespace {

std::mutex table_mutex;
std::map<std::uintptr_t, std::size_t>& allocations() {
  static std::map<std::uintptr_t, std::size_t> table;  // start → size
  return table;
}
cudaError_t last_error = cudaSuccess;

constexpr std::size_t device_alignment = 256;  // what cudaMalloc guarantees
constexpr std::size_t dynamic_shared_limit = 48 * 1024;  // without cudaFuncSetAttribute opt-in
std::size_t rounded_size(std::size_t bytes) { return (bytes + device_alignment - 1) / device_alignment * device_alignment; }

}  // namespace

/// The allocation holding [p, p + bytes), or none.
bool in_device_memory(const void* p, std::size_t bytes) {
  const std::lock_guard lock(table_mutex);
  const auto a = std::uintptr_t(p);
  auto it = allocations().upper_bound(a);
  if (it == allocations().begin()) return false;
  --it;
  return a >= it->first && a + bytes <= it->first + it->second;
}

namespace {

bool is_device_pointer(const void* p) { return in_device_memory(p, 1); }

cudaError_t fail(cudaError_t e) {
  last_error = e;
  return e;
}

cudaError_t allocate(void** p, std::size_t bytes) {
  if (p == nullptr) return fail(cudaErrorInvalidValue);
  *p = nullptr;
  if (bytes == 0) return cudaSuccess;
  const std::size_t rounded = rounded_size(bytes);
  void* mem = std::aligned_alloc(device_alignment, rounded);
  if (mem == nullptr) return fail(cudaErrorMemoryAllocation);
  std::memset(mem, 0xFF, bytes);
  // The rounding is padding, not the allocation: an access past `bytes` is reported, as
  // compute-sanitizer reports it on the device (where it would pass silently otherwise).
  GRUN_EMU_POISON(static_cast<unsigned char*>(mem) + bytes, rounded - bytes);
  const std::lock_guard lock(table_mutex);
  allocations()[std::uintptr_t(mem)] = bytes;
  *p = mem;
  return cudaSuccess;
}

cudaError_t release(void* p) {
  if (p == nullptr) return cudaSuccess;
  std::size_t bytes = 0;
  {
    const std::lock_guard lock(table_mutex);
    const auto it = allocations().find(std::uintptr_t(p));
    if (it == allocations().end()) return fail(cudaErrorInvalidValue);
    bytes = it->second;
    allocations().erase(it);
  }
  GRUN_EMU_UNPOISON(p, rounded_size(bytes));
  std::free(p);
  return cudaSuccess;
}

/// One end of a copy: device memory (the whole span inside one allocation) where the kind says
/// device, memory the runtime does not know where it says host; cudaMemcpyDefault takes either.
enum class side { host, device, either };
bool end_allowed(const void* p, std::size_t span, side want) {
  if (want == side::device) return in_device_memory(p, span);
  if (want == side::host) return !is_device_pointer(p);
  return in_device_memory(p, span) || !is_device_pointer(p);
}
/// Whether a copy from [src, src + sspan) to [dst, dst + dspan) is legal for `kind`.
bool copy_allowed(void* dst, std::size_t dspan, const void* src, std::size_t sspan, cudaMemcpyKind kind) {
  if (dspan == 0) return true;
  switch (kind) {
    case cudaMemcpyHostToHost: return end_allowed(dst, dspan, side::host) && end_allowed(src, sspan, side::host);
    case cudaMemcpyHostToDevice: return end_allowed(dst, dspan, side::device) && end_allowed(src, sspan, side::host);
    case cudaMemcpyDeviceToHost: return end_allowed(dst, dspan, side::host) && end_allowed(src, sspan, side::device);
    case cudaMemcpyDeviceToDevice: return end_allowed(dst, dspan, side::device) && end_allowed(src, sspan, side::device);
    case cudaMemcpyDefault: return end_allowed(dst, dspan, side::either) && end_allowed(src, sspan, side::either);
  }
  return false;
}

/// Whether a 2D copy's pitches and ends are legal for `kind` (the error, made the last one, if not).
cudaError_t check_copy_2d(void* dst, std::size_t dpitch, const void* src, std::size_t spitch, std::size_t width,
                          std::size_t height, cudaMemcpyKind kind) {
  if (height == 0 || width == 0) return cudaSuccess;
  if (dpitch < width || spitch < width) return fail(cudaErrorInvalidPitchValue);
  if (!copy_allowed(dst, dpitch * (height - 1) + width, src, spitch * (height - 1) + width, kind))
    return fail(cudaErrorInvalidValue);
  return cudaSuccess;
}
/// The copy itself, row by row (checked before).
void move_rows(void* dst, std::size_t dpitch, const void* src, std::size_t spitch, std::size_t width,
               std::size_t height) {
  for (std::size_t row = 0; row < height; ++row)
    std::memmove(static_cast<unsigned char*>(dst) + row * dpitch, static_cast<const unsigned char*>(src) + row * spitch,
                 width);
}
cudaError_t copy_2d(void* dst, std::size_t dpitch, const void* src, std::size_t spitch, std::size_t width,
                    std::size_t height, cudaMemcpyKind kind) {
  const cudaError_t e = check_copy_2d(dst, dpitch, src, spitch, width, height, kind);
  if (e == cudaSuccess) move_rows(dst, dpitch, src, spitch, width, height);
  return e;
}

/// Whether a 2D memset's pitch and range are legal (the error, made the last one, if not).
cudaError_t check_set_2d(void* p, std::size_t pitch, std::size_t width, std::size_t height) {
  if (height == 0 || width == 0) return cudaSuccess;
  if (pitch < width) return fail(cudaErrorInvalidPitchValue);
  if (!in_device_memory(p, pitch * (height - 1) + width)) return fail(cudaErrorInvalidValue);
  return cudaSuccess;
}
/// The memset itself, row by row (checked before).
void set_rows(void* p, std::size_t pitch, int value, std::size_t width, std::size_t height) {
  for (std::size_t row = 0; row < height; ++row) std::memset(static_cast<unsigned char*>(p) + row * pitch, value, width);
}

/// A memory pool's accounting: what its live allocations hold, what it keeps mapped for reuse
/// after their frees, and its release threshold — at a synchronization a pool hands back what it
/// keeps beyond the threshold (0 for a new pool, as for the device's default one), and
/// cudaMemPoolTrimTo hands back down to its argument. The memory itself is plain allocations.
struct memory_pool {
  std::size_t live = 0, kept = 0;
  std::uint64_t release_threshold = 0;
  void shrink_to(std::uint64_t bytes) {
    const std::uint64_t reserved = live + kept;
    if (reserved > bytes) kept -= std::size_t(std::min<std::uint64_t>(kept, reserved - bytes));
  }
};
std::vector<std::unique_ptr<memory_pool>>& pools() {
  static std::vector<std::unique_ptr<memory_pool>> all;
  return all;
}
std::map<std::uintptr_t, memory_pool*>& pool_allocations() {  // allocation start → its pool
  static std::map<std::uintptr_t, memory_pool*> table;
  return table;
}
memory_pool* pool_of(cudaMemPool_t handle) { return reinterpret_cast<memory_pool*>(handle); }
void synchronize_pools() {
  const std::lock_guard lock(table_mutex);
  for (auto& pool : pools()) pool->shrink_to(pool->release_threshold);
}

}  // namespace

void fail_device(const char* what) {
  const auto& c = context;
  std::fprintf(stderr, "grun CUDA emulation: %s (block %u,%u,%u thread %u,%u,%u)\n", what, c.block.x, c.block.y,
               c.block.z, c.thread.x, c.thread.y, c.thread.z);
  std::abort();
}

namespace {

// ---- the CTA as fibers --------------------------------------------------------------------------
// AddressSanitizer follows stack switches only when told (the fibers' stacks are heap memory).
#if defined(__SANITIZE_ADDRESS__)
void start_switch(void** fake_stack, const void* bottom, std::size_t size) {
  __sanitizer_start_switch_fiber(fake_stack, bottom, size);
}
/// `from_bottom`/`from_size`, when given, receive the stack switched away from.
void finish_switch(void* fake_stack, const void** from_bottom = nullptr, std::size_t* from_size = nullptr) {
  __sanitizer_finish_switch_fiber(fake_stack, from_bottom, from_size);
}
#else
void start_switch(void**, const void*, std::size_t) {}
void finish_switch(void*, const void** = nullptr, std::size_t* = nullptr) {}
#endif

constexpr std::size_t fiber_stack_bytes = 64 * 1024;  // kernels keep register arrays on it; ASan pads frames

/// What a parked fiber waits for: the CTA's barrier (__syncthreads) or its warp's (a warp-synchronous
/// collective such as cub::WarpReduce).
enum class barrier { none, cta, warp };

/// One cp.async of 16 bytes, in flight.
struct async_copy {
  void* to;
  const void* from;
};

// ---- switching stacks ----------------------------------------------------------------------------
// A switch between fibers needs what a function call keeps: the callee-saved registers, the stack
// pointer and the floating-point control words. glibc's swapcontext also saves and restores the
// signal mask, a system call at every switch, and AddressSanitizer's interceptor of it clears the
// shadow of the whole target stack (8 KiB of shadow for 64 KiB) at every switch: together ~60% of an
// emulated test's time (perf, emulated_test_cuda_intervention_fused_ranks). On x86-64 the switch is
// switch_stack below. Elsewhere, or when this thread runs with a shadow stack (CET: a `ret` onto
// another stack's return address would fault), ucontext.

#if defined(__x86_64__)
// switch_stack(&from, to): pushes rbp, rbx, r12–r15 and the MXCSR / x87 control words on the current
// stack, stores the stack pointer in *from, loads `to` and pops the same from it, then returns there.
extern "C" void grun_emu_switch_stack(void** from, void* to);
asm(R"(
  .text
  .p2align 4
  .globl grun_emu_switch_stack
  .type grun_emu_switch_stack, @function
grun_emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size grun_emu_switch_stack, .-grun_emu_switch_stack
)");

/// Whether the kernel runs this process with a user shadow stack (Linux ≥ 6.6 says so in
/// /proc/self/status as "x86_Thread_features: shstk"): then ucontext, which glibc keeps consistent.
bool shadow_stack_enabled() {
  std::FILE* f = std::fopen("/proc/self/status", "r");
  if (f == nullptr) return false;
  char line[256];
  bool on = false;
  while (std::fgets(line, sizeof line, f) != nullptr)
    if (std::string_view(line).starts_with("x86_Thread_features:") && std::string_view(line).find("shstk") != std::string_view::npos)
      on = true;
  std::fclose(f);
  return on;
}
/// Decided once, at the first switch or fiber made (not at static initialization: whatever runs first).
bool use_switch_stack() {
  static const bool use = !shadow_stack_enabled();
  return use;
}
#else
constexpr bool use_switch_stack() { return false; }
#endif

/// Where a parked fiber (or the scheduler) resumes.
struct execution_context {
  void* sp = nullptr;  // switch_stack's saved stack pointer
  ucontext_t uc{};     // or ucontext's
};

/// Saves the running context in `from` and resumes `to`.
void switch_context(execution_context& from, execution_context& to) {
#if defined(__x86_64__)
  if (use_switch_stack()) {
    grun_emu_switch_stack(&from.sp, to.sp);
    return;
  }
#endif
  swapcontext(&from.uc, &to.uc);
}

/// Makes `c` start entry() at the top of [stack, stack + bytes) when first resumed. entry never returns.
void prepare_context(execution_context& c, unsigned char* stack, std::size_t bytes, void (*entry)()) {
#if defined(__x86_64__)
  if (use_switch_stack()) {
    // The fiber's last run ended in a switch from leave_fiber that never returned: the frames above
    // that switch's stack pointer (fiber_entry's, leave_fiber's) keep the shadow ASan gave them, and
    // this run lays other frames there (the kernel's body where leave_fiber's was), whose own
    // instrumentation rewrites only what it covers. Cleared here: a few hundred bytes per fiber.
    if (c.sp != nullptr) GRUN_EMU_UNPOISON(c.sp, std::size_t(stack + bytes - static_cast<unsigned char*>(c.sp)));
    // The frame switch_stack pops: control words, r15 … r12, rbx, rbp, then entry as the return
    // address; above it a null return address for entry, placed so that entry starts with the stack
    // pointer 8 past a multiple of 16 (as after a call).
    const auto top = (reinterpret_cast<std::uintptr_t>(stack) + bytes) & ~std::uintptr_t(15);
    auto* words = reinterpret_cast<std::uint64_t*>(top - 8 - 64);
    std::uint32_t mxcsr = 0;
    std::uint16_t x87 = 0;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(x87));
    words[0] = std::uint64_t(mxcsr) | std::uint64_t(x87) << 32;
    for (int i = 1; i <= 6; ++i) words[i] = 0;  // r15, r14, r13, r12, rbx, rbp
    words[7] = reinterpret_cast<std::uint64_t>(entry);
    words[8] = 0;
    c.sp = words;
    return;
  }
#endif
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}

/// A fiber's stack, its shadow cleared when made: ASan's interceptors of makecontext and swapcontext
/// did that at every switch. What a finished fiber leaves poisoned above its last switch (frames that
/// never returned) is cleared as the fiber is prepared again (prepare_context).
struct fiber_stack {
  std::unique_ptr<unsigned char[]> bytes{new unsigned char[fiber_stack_bytes]};
  fiber_stack() { GRUN_EMU_UNPOISON(bytes.get(), fiber_stack_bytes); }
  unsigned char* get() const { return bytes.get(); }
};

struct fiber {
  execution_context context;
  fiber_stack stack;
  uint3 thread{};
  bool done = false;
  barrier waiting = barrier::none;
  std::vector<async_copy> open_group;                // cp.async issued since the last commit
  std::deque<std::vector<async_copy>> committed;     // groups in flight, oldest first
};

/// The scheduler of the CTA that runs on this thread.
struct cta_scheduler {
  execution_context context;
  void* fake_stack = nullptr;
  const void* stack_bottom = nullptr;  // the launching thread's stack (ASan learns it at the first switch)
  std::size_t stack_size = 0;
  fiber* running = nullptr;
  std::size_t shared_bytes = 0;  // the running launch's dynamic shared memory
  void (*body)(void*) = nullptr;
  void* closure = nullptr;
};
thread_local cta_scheduler scheduler;
/// The fibers of this thread's CTAs, kept from launch to launch: stacks made per launch were mapped,
/// faulted in and unmapped again by the OS, which was most of the emulation's time.
std::vector<fiber>& fiber_pool() {
  static thread_local std::vector<fiber> pool;
  return pool;
}

/// Back to the scheduler: from a parked fiber (to be resumed) or a finished one (never resumed).
void leave_fiber(bool finished) {
  void* fake = nullptr;
  start_switch(finished ? nullptr : &fake, scheduler.stack_bottom, scheduler.stack_size);
  switch_context(scheduler.running->context, scheduler.context);
  finish_switch(fake);
}

void fiber_entry() {
  finish_switch(nullptr, &scheduler.stack_bottom, &scheduler.stack_size);
  scheduler.body(scheduler.closure);
  scheduler.running->done = true;
  leave_fiber(true);
}

void resume(fiber& f, const thread_context& where) {
  scheduler.running = &f;
  context = where;
  start_switch(&scheduler.fake_stack, f.stack.get(), fiber_stack_bytes);
  switch_context(scheduler.context, f.context);
  finish_switch(scheduler.fake_stack);
}

}  // namespace

void sync_cta() {
  scheduler.running->waiting = barrier::cta;
  leave_fiber(false);
}
void sync_warp() {
  scheduler.running->waiting = barrier::warp;
  leave_fiber(false);
}

void cp_async_16(void* shared_dst, const void* global_src) {
  const auto to = std::uintptr_t(shared_dst), base = std::uintptr_t(context.dynamic_shared);
  if (to % 16 || std::uintptr_t(global_src) % 16) fail_device("cp.async: an address not 16-byte aligned");
  if (to < base || to + 16 > base + scheduler.shared_bytes)
    fail_device("cp.async: the destination is not in the CTA's dynamic shared memory");
  if (!in_device_memory(global_src, 16)) fail_device("cp.async: the source is not device memory");
  std::memset(shared_dst, 0xFF, 16);  // what a reader sees until the copy lands
  scheduler.running->open_group.push_back({shared_dst, global_src});
}
void cp_async_commit() {
  fiber& f = *scheduler.running;
  f.committed.push_back(std::move(f.open_group));
  f.open_group.clear();
}
void cp_async_wait(int pending) {
  fiber& f = *scheduler.running;
  while (f.committed.size() > std::size_t(pending < 0 ? 0 : pending)) {
    for (const async_copy& c : f.committed.front()) std::memcpy(c.to, c.from, 16);
    f.committed.pop_front();
  }
}

namespace {

constexpr unsigned warp_size = 32;

/// Stops the emulation at `thread` of the launch `where` describes.
[[noreturn]] void fail_at(const thread_context& where, uint3 thread, const char* what) {
  context = where;
  context.thread = thread;
  fail_device(what);
}

/// Opens the barriers every live fiber they concern has reached: the CTA's when all live fibers
/// wait there (a returned thread no longer counts, as an exited thread does for bar.sync); a warp's
/// when all its lanes wait there. A warp barrier with a lane that has returned is a broken promise
/// (cub's warp collectives name the full warp in their shuffles), and a round where nothing opens
/// while fibers still wait is a deadlock: both stop the emulation. Returns whether a fiber is left.
bool open_barriers(std::span<fiber> cta, const thread_context& where) {
  std::size_t live = 0, at_cta = 0;
  for (const auto& f : cta) {
    live += !f.done;
    at_cta += !f.done && f.waiting == barrier::cta;
  }
  if (live == 0) return false;
  if (at_cta == live) {
    for (auto& f : cta) f.waiting = barrier::none;
    return true;
  }
  bool opened = false;
  for (std::size_t w0 = 0; w0 < cta.size(); w0 += warp_size) {
    const auto warp = cta.subspan(w0, std::min<std::size_t>(warp_size, cta.size() - w0));
    std::size_t arrived = 0, returned = 0;
    for (const auto& f : warp) {
      arrived += !f.done && f.waiting == barrier::warp;
      returned += f.done;
    }
    if (arrived == 0) continue;
    if (returned != 0)
      fail_at(where, warp.front().thread, "a warp-synchronous collective with lanes of the warp that have returned");
    if (arrived == warp.size()) {
      for (auto& f : warp) f.waiting = barrier::none;
      opened = true;
    }
  }
  if (!opened)
    fail_at(where, std::find_if(cta.begin(), cta.end(), [](const fiber& f) { return !f.done; })->thread,
            "deadlock: threads wait at barriers that cannot open (__syncthreads and a warp collective mixed)");
  return true;
}

}  // namespace

// ---- static shared memory ------------------------------------------------------------------------

namespace {
/// Serial numbers of CTAs (thread_context::cta), unique across the host threads that launch.
std::atomic<unsigned long long> ctas_started{0};
}  // namespace

// ---- the order fibers and CTAs run in (run_order.hpp) ------------------------------------------
// Thread order alone, the scheduler's first, hid every race whose writer has the lower rank (the
// reader always ran after it) and every intra-warp race of that shape; the default now runs each
// barrier interval both ways across CTAs, and GRUN_EMU_ORDER pins or shuffles it.

namespace {

/// GRUN_EMU_ORDER, read once; anything else stops the program with what it expected.
run_order order_from_environment() {
  const char* env = std::getenv("GRUN_EMU_ORDER");
  const std::string_view v = env ? env : "";
  if (v.empty() || v == "alternate") return {};
  if (v == "forward") return {run_order::forward};
  if (v == "reverse") return {run_order::reverse};
  if (v == "shuffle") return {run_order::shuffle};
  if (v.starts_with("shuffle:") && v.size() > 8 && v.find_first_not_of("0123456789", 8) == v.npos)
    return {run_order::shuffle, std::strtoull(env + 8, nullptr, 10)};
  std::fprintf(stderr, "GRUN_EMU_ORDER=%s: expected alternate, forward, reverse, shuffle or shuffle:<seed>\n", env);
  std::exit(2);
}
run_order current_order = order_from_environment();

/// The fibers of one round in the order they run: indices into the CTA.
void arrange(std::vector<unsigned>& sequence, unsigned long long cta, unsigned round, std::mt19937_64& rng) {
  std::iota(sequence.begin(), sequence.end(), 0u);
  switch (current_order.mode) {
    case run_order::forward: break;
    case run_order::reverse: std::reverse(sequence.begin(), sequence.end()); break;
    case run_order::alternate:
      if ((cta + round) % 2 == 1) std::reverse(sequence.begin(), sequence.end());
      break;
    case run_order::shuffle: std::shuffle(sequence.begin(), sequence.end(), rng); break;
  }
}

/// The CTA the i-th of n runs: i itself, n − 1 − i, or under shuffle an affine permutation
/// (a·i + b) mod n with gcd(a, n) = 1 — a fresh one per launch, and no table for a large grid.
struct cta_sequence {
  unsigned long long n, a = 1, b = 0;
  bool reversed = false;
  cta_sequence(unsigned long long count, std::mt19937_64& rng) : n(count) {
    if (current_order.mode == run_order::reverse) reversed = true;
    if (current_order.mode == run_order::shuffle && n > 1) {
      do a = 1 + rng() % (n - 1); while (std::gcd(a, n) != 1);
      b = rng() % n;
    }
  }
  unsigned long long operator[](unsigned long long i) const {
    if (reversed) return n - 1 - i;
    return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * i + b) % n);
  }
};

}  // namespace

run_order order() { return current_order; }
void set_order(run_order o) { current_order = o; }

bool launch_allowed(const launch_config& config) {
  const dim3 g = config.grid, b = config.block;
  const unsigned long long threads = 1ull * b.x * b.y * b.z;
  const bool shape_ok = g.x >= 1 && g.y >= 1 && g.z >= 1 && g.x <= 0x7fffffffu && g.y <= 65535 && g.z <= 65535 &&
                        b.x >= 1 && b.y >= 1 && b.z >= 1 && b.x <= 1024 && b.y <= 1024 && b.z <= 64 && threads <= 1024;
  if (!shape_ok || config.dynamic_shared_bytes > dynamic_shared_limit) {
    fail(cudaErrorInvalidConfiguration);
    return false;
  }
  return true;
}

namespace {
/// Grids run so far (run_grid), and their count at cudaProfilerStart while profiling: what a profiler
/// started there would have seen is said at cudaProfilerStop.
unsigned long long grids_run = 0;
std::optional<unsigned long long> profiling_since;
}  // namespace

void run_grid(const launch_config& config, void (*body)(void*), void* closure) {
  if (!launch_allowed(config)) return;
  ++grids_run;
  const dim3 g = config.grid, b = config.block;
  const unsigned long long threads = 1ull * b.x * b.y * b.z;
  if (scheduler.running != nullptr) fail_device("a kernel launched from a kernel (dynamic parallelism is not emulated)");
  scheduler.body = body;
  scheduler.closure = closure;
  scheduler.shared_bytes = config.dynamic_shared_bytes;
  std::vector<fiber>& pool = fiber_pool();
  if (pool.size() < threads) pool.resize(static_cast<std::size_t>(threads));
  const std::span<fiber> cta(pool.data(), static_cast<std::size_t>(threads));
  for (unsigned tz = 0, i = 0; tz < b.z; ++tz)
    for (unsigned ty = 0; ty < b.y; ++ty)
      for (unsigned tx = 0; tx < b.x; ++tx, ++i) cta[i].thread = {tx, ty, tz};
  // Dynamic shared memory: exactly the bytes the launch asked for are usable; the rounding is
  // poisoned like a device allocation's, so a tile that runs past its buffer is reported.
  struct shared_memory {
    std::size_t bytes, rounded = (bytes + 127) / 128 * 128 + 128;
    unsigned char* data = static_cast<unsigned char*>(std::aligned_alloc(128, rounded));
    explicit shared_memory(std::size_t n) : bytes(n) { GRUN_EMU_POISON(data + bytes, rounded - bytes); }
    ~shared_memory() {
      GRUN_EMU_UNPOISON(data, rounded);
      std::free(data);
    }
    unsigned char* get() const { return data; }
  };
  const std::size_t shared_bytes = config.dynamic_shared_bytes;
  const shared_memory shared(shared_bytes);
  // Each launch's shuffles come from the seed and the launch's number on this thread, so a run repeats.
  static thread_local unsigned long long launches = 0;
  std::mt19937_64 rng(current_order.seed + 0x9E3779B97F4A7C15ull * ++launches);
  std::vector<unsigned> sequence(static_cast<std::size_t>(threads));
  const unsigned long long ctas = 1ull * g.x * g.y * g.z;
  const cta_sequence cta_order(ctas, rng);
  for (unsigned long long i = 0; i < ctas; ++i) {
    const unsigned long long c = cta_order[i];
    const unsigned x = unsigned(c % g.x), y = unsigned(c / g.x % g.y), z = unsigned(c / g.x / g.y);
    // 0xFF-filled per CTA, static (as each declaration is first reached: shared_region) and dynamic:
    // the device's shared memory holds whatever the last CTA left, so a kernel must not count on any of it.
    std::memset(shared.get(), 0xFF, shared_bytes);
    for (auto& f : cta) {
      f.done = false;
      f.waiting = barrier::none;
      f.open_group.clear();
      f.committed.clear();
      prepare_context(f.context, f.stack.get(), fiber_stack_bytes, fiber_entry);
    }
    // Rounds: every fiber not waiting runs, in the round's order (arrange), until it parks at a
    // barrier or returns; then the barriers all their fibers have reached open, and the next starts.
    const thread_context where{{0, 0, 0}, {x, y, z}, b, g, shared.get(), ++ctas_started};
    unsigned round = 0;
    do {
      arrange(sequence, c, round++, rng);
      for (const unsigned t : sequence) {
        fiber& f = cta[t];
        if (f.done || f.waiting != barrier::none) continue;
        thread_context here = where;
        here.thread = f.thread;
        resume(f, here);
      }
      scheduler.running = nullptr;
    } while (open_barriers(cta, where));
    for (const auto& f : cta) {
      const bool in_flight = !f.open_group.empty() || std::any_of(f.committed.begin(), f.committed.end(),
                                                                  [](const auto& group) { return !group.empty(); });
      if (in_flight) fail_at(where, f.thread, "cp.async copies still in flight when the thread returned (no cp.async.wait_group covered them)");
    }
  }
}

}  // namespace grun_emu

using namespace grun_emu;

namespace grun_emu {

/// The work of a stream (made by cudaStreamCreateWithFlags, or the legacy default stream's:
/// legacy_line), in issue order, numbered from 1. It runs only when something waits for the stream:
/// cudaStreamSynchronize, cudaDeviceSynchronize, an event of it that is synchronized or that another
/// stream waits for (through that event's place), a copy from it to host memory (which returns once
/// done, as a copy to pageable memory does), cudaMalloc and cudaFree (which wait for the device), and
/// for the legacy stream a synchronous copy. Destroying a stream does not: its work stays in line
/// (orphaned_queues) until one of those — or the end of the program — runs it, as a device finishes
/// it after cudaStreamDestroy has returned.
///
/// That is as late as a device may run work: what a program orders runs in order, what it does not
/// may run late, and then shows — a kernel reading a block that was freed before it ran is an
/// AddressSanitizer report, a copy to the host from memory not yet written reads 0xFF bytes. (Work of
/// a live stream that nothing waits for before the program ends is never run: nothing could have
/// observed it.) One thread issues and drains (the tests are single-threaded).
struct stream_queue {
  bool blocking = false;  // made without cudaStreamNonBlocking: the legacy stream's work waits for it
  std::uint64_t issued = 0;
  std::deque<std::pair<std::uint64_t, std::function<void()>>> pending;
  /// Runs the work numbered up to `through`, in order (the work may drain other streams).
  void drain(std::uint64_t through = ~std::uint64_t(0)) {
    while (!pending.empty() && pending.front().first <= through) {
      std::function<void()> work = std::move(pending.front().second);
      pending.pop_front();
      work();
    }
  }
};

}  // namespace grun_emu

/// A stream created here: its line of work. Kept in a table while it lives (a library may keep a
/// stream of its own for the process, as a real runtime lets it).
struct CUstream_st {
  std::shared_ptr<grun_emu::stream_queue> queue = std::make_shared<grun_emu::stream_queue>();
};
static std::vector<std::unique_ptr<CUstream_st>>& streams() {
  static std::vector<std::unique_ptr<CUstream_st>> all;
  return all;
}

namespace grun_emu {
namespace {

/// The line of a stream created here; null for the legacy default stream (0, cudaStreamLegacy,
/// cudaStreamPerThread: legacy_line). A handle that is neither stops the run.
std::shared_ptr<stream_queue> queue_of(cudaStream_t stream) {
  if (stream == nullptr || stream == cudaStreamLegacy || stream == cudaStreamPerThread) return nullptr;
  const std::lock_guard lock(table_mutex);
  for (const auto& s : streams())
    if (s.get() == stream) return s->queue;
  std::fprintf(stderr, "grun CUDA emulation: work issued on stream %p, which is no live stream\n", static_cast<void*>(stream));
  std::abort();
}
/// The lines of destroyed streams that still held work: it runs when something waits for the
/// device (or, for a blocking stream's, the legacy stream does), when an event recorded on the
/// stream is reached, or at exit; a line leaves once it is empty.
std::vector<std::shared_ptr<stream_queue>>& orphaned_queues() {
  static std::vector<std::shared_ptr<stream_queue>> all;
  return all;
}
/// The legacy default stream's line (0, cudaStreamLegacy, cudaStreamPerThread). Its work waits
/// here like a created stream's, and the legacy stream's implicit synchronization is kept: each
/// piece first runs what the blocking streams held when it was issued, and a blocking stream's
/// piece first runs what this line held when it was issued (issue).
const std::shared_ptr<stream_queue>& legacy_line() {
  static const std::shared_ptr<stream_queue> line = [] {
    auto q = std::make_shared<stream_queue>();
    q->blocking = true;
    return q;
  }();
  return line;
}
/// Runs the queued work of the legacy stream and of every created stream, live or destroyed
/// (blocking_only: of the blocking ones), stream by stream.
void drain_streams(bool blocking_only) {
  std::vector<std::shared_ptr<stream_queue>> queues{legacy_line()};
  {
    const std::lock_guard lock(table_mutex);
    for (const auto& s : streams())
      if (!blocking_only || s->queue->blocking) queues.push_back(s->queue);
    for (const auto& q : orphaned_queues())
      if (!blocking_only || q->blocking) queues.push_back(q);
  }
  for (const auto& q : queues) q->drain();
  const std::lock_guard lock(table_mutex);
  std::erase_if(orphaned_queues(), [](const auto& q) { return q->pending.empty(); });
}

}  // namespace

/// Work no one waited for still runs, as a GPU runs what was launched: what is queued when the thread
/// that first issued work ends — the main thread: when the program exits — runs then, on every
/// stream, live or destroyed (a kernel that faults there still fails the run). From a thread_local's
/// destructor: those of a thread run before any static object's is (grun's and the runtime's tables
/// are whole), and in the reverse order of their construction, so the fibers and the scheduler,
/// made first here, are still there. (An atexit handler ran after them: it would have run kernels
/// on destroyed fibers.)
struct exit_drain {
  exit_drain() {
    (void)fiber_pool();
    (void)scheduler;
  }
  ~exit_drain() { drain_streams(false); }
};
void drain_when_thread_ends() {
  static thread_local exit_drain drain;
  (void)drain;
}

void issue(cudaStream_t stream, std::function<void()> work) {
  drain_when_thread_ends();
  std::shared_ptr<stream_queue> q = queue_of(stream);
  if (!q) {
    // The legacy stream: after everything the blocking streams hold now.
    std::vector<std::pair<std::shared_ptr<stream_queue>, std::uint64_t>> before;
    {
      const std::lock_guard lock(table_mutex);
      for (const auto& s : streams())
        if (s->queue->blocking) before.emplace_back(s->queue, s->queue->issued);
      for (const auto& o : orphaned_queues())
        if (o->blocking) before.emplace_back(o, o->issued);
    }
    work = [before = std::move(before), work = std::move(work)] {
      for (const auto& [line, through] : before) line->drain(through);
      work();
    };
    q = legacy_line();
  } else if (q->blocking) {
    // A blocking stream: after everything the legacy stream holds now.
    work = [through = legacy_line()->issued, work = std::move(work)] {
      legacy_line()->drain(through);
      work();
    };
  }
  q->pending.emplace_back(++q->issued, std::move(work));
}

}  // namespace grun_emu

/// An event: where its latest recording stands in a stream's line, and the host time it was
/// recorded at — the elapsed time between two is host time (what bench_cuda prints under the
/// emulation says nothing about a GPU's speed).
struct CUevent_st {
  std::chrono::steady_clock::time_point at;
  bool recorded = false;
  std::weak_ptr<grun_emu::stream_queue> queue;
  std::uint64_t place = 0;
  /// Runs what the recording follows.
  void reach() const {
    if (const auto q = queue.lock()) q->drain(place);
  }
};

extern "C" {

cudaError_t CUDARTAPI cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaGetDeviceProperties(struct cudaDeviceProp* prop, int device) {
  if (prop == nullptr) return fail(cudaErrorInvalidValue);
  if (device != 0) return fail(cudaErrorInvalidDevice);
  *prop = cudaDeviceProp{};
  std::snprintf(prop->name, sizeof(prop->name), "%s", "grun CPU emulation (tests/emulation)");
  prop->warpSize = 32;
  prop->maxThreadsPerBlock = 1024;
  prop->sharedMemPerBlock = dynamic_shared_limit;
  prop->multiProcessorCount = 1;
  prop->major = 9;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (value == nullptr) return fail(cudaErrorInvalidValue);
  if (device != 0) return fail(cudaErrorInvalidDevice);
  switch (attr) {  // the properties cudaGetDeviceProperties reports
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = 1; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = int(dynamic_shared_limit); return cudaSuccess;  // no opt-in here
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = 228 * 1024; return cudaSuccess;  // an H100's
    default: return fail(cudaErrorInvalidValue);
  }
}

/// Only the opt-in to more dynamic shared memory, up to what the emulation launches with anyway.
cudaError_t CUDARTAPI cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (func == nullptr) return fail(cudaErrorInvalidDeviceFunction);
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || std::size_t(value) > dynamic_shared_limit)
    return fail(cudaErrorInvalidValue);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaEventCreate(cudaEvent_t* event) {
  if (event == nullptr) return fail(cudaErrorInvalidValue);
  *event = new CUevent_st;
  return cudaSuccess;
}
/// Any flags: an event here only keeps the time it was recorded.
cudaError_t CUDARTAPI cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int) { return cudaEventCreate(event); }
cudaError_t CUDARTAPI cudaEventDestroy(cudaEvent_t event) {
  if (event == nullptr) return fail(cudaErrorInvalidResourceHandle);
  delete event;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  if (event == nullptr) return fail(cudaErrorInvalidResourceHandle);
  auto q = queue_of(stream);
  if (!q) {  // on the legacy stream: a mark in its line, which runs the blocking streams' work first
    issue(stream, [] {});
    q = legacy_line();
  }
  event->at = std::chrono::steady_clock::now();
  event->recorded = true;
  event->queue = q;
  event->place = q->issued;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaEventSynchronize(cudaEvent_t event) {
  if (event == nullptr) return fail(cudaErrorInvalidResourceHandle);
  event->reach();
  return cudaSuccess;
}
/// As the runtime: an event never recorded is cudaErrorInvalidResourceHandle.
cudaError_t CUDARTAPI cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  if (ms == nullptr) return fail(cudaErrorInvalidValue);
  if (start == nullptr || end == nullptr || !start->recorded || !end->recorded)
    return fail(cudaErrorInvalidResourceHandle);
  *ms = std::chrono::duration<float, std::milli>(end->at - start->at).count();
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaGetLastError(void) { return std::exchange(last_error, cudaSuccess); }
cudaError_t CUDARTAPI cudaPeekAtLastError(void) { return last_error; }
const char* CUDARTAPI cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidPitchValue: return "cudaErrorInvalidPitchValue";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    default: return "cudaError (emulated)";
  }
}
const char* CUDARTAPI cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidPitchValue: return "invalid pitch argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    default: return "error (emulated runtime)";
  }
}

/// Waits for the device first, as cudaFree does (the runtime may synchronize here; the thrust shim's
/// device_vector copies its elements right after it).
cudaError_t CUDARTAPI cudaMalloc(void** p, size_t bytes) {
  drain_streams(false);
  return allocate(p, bytes);
}
cudaError_t CUDARTAPI cudaFree(void* p) {
  drain_streams(false);  // cudaFree waits for the device
  return release(p);
}
/// The emulated device's memory is the host's: its physical memory, and what of it is free now.
cudaError_t CUDARTAPI cudaMemGetInfo(size_t* free, size_t* total) {
  if (free == nullptr || total == nullptr) return fail(cudaErrorInvalidValue);
  const auto page = std::size_t(sysconf(_SC_PAGESIZE));
  *total = std::size_t(sysconf(_SC_PHYS_PAGES)) * page;
  *free = std::size_t(sysconf(_SC_AVPHYS_PAGES)) * page;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaMallocFromPoolAsync(void** p, size_t bytes, cudaMemPool_t handle, cudaStream_t) {
  if (handle == nullptr) return fail(cudaErrorInvalidValue);
  const cudaError_t e = allocate(p, bytes);
  if (e != cudaSuccess || *p == nullptr) return e;
  const std::lock_guard lock(table_mutex);
  memory_pool& pool = *pool_of(handle);
  const std::size_t size = rounded_size(bytes);
  pool.kept -= std::min(pool.kept, size);  // served from what the pool keeps, as far as it goes
  pool.live += size;
  pool_allocations()[std::uintptr_t(*p)] = &pool;
  return cudaSuccess;
}
/// The free runs in the stream's order (its memory stays readable until then, and is freed memory
/// after: a kernel that reads it later is an AddressSanitizer report).
cudaError_t CUDARTAPI cudaFreeAsync(void* p, cudaStream_t stream) {
  if (p == nullptr) return cudaSuccess;
  if (!in_device_memory(p, 1)) return fail(cudaErrorInvalidValue);
  issue(stream, [p] {
    {
      const std::lock_guard lock(table_mutex);
      const auto it = pool_allocations().find(std::uintptr_t(p));
      if (it != pool_allocations().end()) {
        const std::size_t size = rounded_size(allocations().at(it->first));
        it->second->live -= size;
        it->second->kept += size;  // kept mapped until a synchronization or a trim hands it back
        pool_allocations().erase(it);
      }
    }
    (void)release(p);
  });
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaMemPoolCreate(cudaMemPool_t* pool, const struct cudaMemPoolProps*) {
  if (pool == nullptr) return fail(cudaErrorInvalidValue);
  const std::lock_guard lock(table_mutex);
  pools().push_back(std::make_unique<memory_pool>());
  *pool = reinterpret_cast<cudaMemPool_t>(pools().back().get());
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaMemPoolSetAttribute(cudaMemPool_t handle, enum cudaMemPoolAttr attr, void* value) {
  if (handle == nullptr || value == nullptr) return fail(cudaErrorInvalidValue);
  if (attr != cudaMemPoolAttrReleaseThreshold) return cudaSuccess;  // reuse policies: no effect here
  const std::lock_guard lock(table_mutex);
  pool_of(handle)->release_threshold = *static_cast<const std::uint64_t*>(value);
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaMemPoolGetAttribute(cudaMemPool_t handle, enum cudaMemPoolAttr attr, void* value) {
  if (handle == nullptr || value == nullptr) return fail(cudaErrorInvalidValue);
  const std::lock_guard lock(table_mutex);
  const memory_pool& pool = *pool_of(handle);
  auto& out = *static_cast<std::uint64_t*>(value);
  switch (attr) {
    case cudaMemPoolAttrReleaseThreshold: out = pool.release_threshold; return cudaSuccess;
    case cudaMemPoolAttrReservedMemCurrent: out = pool.live + pool.kept; return cudaSuccess;
    case cudaMemPoolAttrUsedMemCurrent: out = pool.live; return cudaSuccess;
    default: return fail(cudaErrorInvalidValue);  // not modelled: a test that needs it says so
  }
}
cudaError_t CUDARTAPI cudaMemPoolTrimTo(cudaMemPool_t handle, size_t keep_bytes) {
  if (handle == nullptr) return fail(cudaErrorInvalidValue);
  const std::lock_guard lock(table_mutex);
  pool_of(handle)->shrink_to(keep_bytes);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaPointerGetAttributes(struct cudaPointerAttributes* attr, const void* p) {
  *attr = cudaPointerAttributes{};
  if (is_device_pointer(p)) {
    attr->type = cudaMemoryTypeDevice;
    attr->device = 0;
    attr->devicePointer = const_cast<void*>(p);
  } else {
    attr->type = cudaMemoryTypeUnregistered;
    attr->hostPointer = const_cast<void*>(p);
  }
  return cudaSuccess;
}

// Synchronous copies and memsets run on the legacy stream; the async ones in their stream's order.
cudaError_t CUDARTAPI cudaMemcpy(void* dst, const void* src, size_t bytes, enum cudaMemcpyKind kind) {
  return cudaMemcpy2DAsync(dst, bytes, src, bytes, bytes, 1, kind, nullptr);
}
cudaError_t CUDARTAPI cudaMemcpyAsync(void* dst, const void* src, size_t bytes, enum cudaMemcpyKind kind,
                                      cudaStream_t stream) {
  return cudaMemcpy2DAsync(dst, bytes, src, bytes, bytes, 1, kind, stream);
}
cudaError_t CUDARTAPI cudaMemcpy2D(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height,
                                   enum cudaMemcpyKind kind) {
  return cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, kind, nullptr);
}
/// Checked when issued. On a stream created here: to host memory, the stream's work first and then
/// the copy (it returns once done, as a copy to pageable memory does); from host memory, the source
/// is taken now (as the runtime stages pageable memory) and written in stream order; device to
/// device, in stream order.
cudaError_t CUDARTAPI cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                                        size_t height, enum cudaMemcpyKind kind, cudaStream_t stream) {
  const auto q = queue_of(stream);
  if (!q) {
    drain_streams(true);
    return copy_2d(dst, dpitch, src, spitch, width, height, kind);
  }
  if (const cudaError_t e = check_copy_2d(dst, dpitch, src, spitch, width, height, kind); e != cudaSuccess) return e;
  if (height == 0 || width == 0) return cudaSuccess;
  if (!is_device_pointer(dst)) {
    q->drain();
    move_rows(dst, dpitch, src, spitch, width, height);
  } else if (!is_device_pointer(src)) {
    auto staged = std::make_shared<std::vector<unsigned char>>(width * height);
    move_rows(staged->data(), width, src, spitch, width, height);
    issue(stream, [=] { move_rows(dst, dpitch, staged->data(), width, width, height); });
  } else {
    issue(stream, [=] { move_rows(dst, dpitch, src, spitch, width, height); });
  }
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaMemset(void* p, int value, size_t bytes) { return cudaMemset2DAsync(p, bytes, value, bytes, 1, nullptr); }
cudaError_t CUDARTAPI cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t stream) {
  return cudaMemset2DAsync(p, bytes, value, bytes, 1, stream);
}
cudaError_t CUDARTAPI cudaMemset2D(void* p, size_t pitch, int value, size_t width, size_t height) {
  return cudaMemset2DAsync(p, pitch, value, width, height, nullptr);
}
/// Checked when issued, set in stream order.
cudaError_t CUDARTAPI cudaMemset2DAsync(void* p, size_t pitch, int value, size_t width, size_t height,
                                        cudaStream_t stream) {
  if (const cudaError_t e = check_set_2d(p, pitch, width, height); e != cudaSuccess) return e;
  issue(stream, [=] { set_rows(p, pitch, value, width, height); });
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int flags) {
  if (stream == nullptr) return fail(cudaErrorInvalidValue);
  const std::lock_guard lock(table_mutex);
  streams().push_back(std::make_unique<CUstream_st>());
  streams().back()->queue->blocking = (flags & cudaStreamNonBlocking) == 0;
  *stream = streams().back().get();
  return cudaSuccess;
}
/// Its work still runs, later, as a device finishes it (orphaned_queues; at the latest when the
/// thread that issued work ends: exit_drain). A stream destroyed twice, or never created here:
/// cudaErrorInvalidResourceHandle.
cudaError_t CUDARTAPI cudaStreamDestroy(cudaStream_t stream) {
  std::unique_ptr<CUstream_st> gone;
  {
    const std::lock_guard lock(table_mutex);
    auto& all = streams();
    const auto it = std::find_if(all.begin(), all.end(), [&](const auto& s) { return s.get() == stream; });
    if (stream == nullptr || it == all.end()) return fail(cudaErrorInvalidResourceHandle);
    gone = std::move(*it);
    all.erase(it);
    if (gone->queue->pending.empty()) return cudaSuccess;
    orphaned_queues().push_back(gone->queue);
  }
  return cudaSuccess;
}
/// The stream's later work waits for what the event's latest recording follows (taken now: a later
/// recording changes nothing for this wait). An event never recorded is no error, as on a GPU (the
/// wait is then empty).
cudaError_t CUDARTAPI cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int) {
  if (event == nullptr) return fail(cudaErrorInvalidResourceHandle);
  issue(stream, [recording = *event] { recording.reach(); });
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaSetDevice(int device) { return device == 0 ? cudaSuccess : fail(cudaErrorInvalidDevice); }
cudaError_t CUDARTAPI cudaStreamSynchronize(cudaStream_t stream) {
  if (const auto q = queue_of(stream)) q->drain();
  else drain_streams(true);
  synchronize_pools();
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaDeviceSynchronize(void) {
  drain_streams(false);
  synchronize_pools();
  return cudaSuccess;
}

// The profiler API (cuda_profiler_api.h). No profiler attaches here; cudaProfilerStop says how many
// grids ran since cudaProfilerStart (grun's kernels; the emulated cuBLASLt matmuls are not grids
// here), so a test can tell that the bracket held the work it was meant to.
cudaError_t CUDARTAPI cudaProfilerStart(void) {
  if (!profiling_since) profiling_since = grids_run;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaProfilerStop(void) {
  if (profiling_since)
    std::fprintf(stderr, "grun_emu: cudaProfilerStop: %llu grids ran since cudaProfilerStart\n",
                 grids_run - *std::exchange(profiling_since, std::nullopt));
  return cudaSuccess;
}

// Device intrinsics with C linkage. __expf is the SFU's ex2.approx of x·log2(e): the product
// rounded to float as on the device, the exponential then to the host's exp2f.
float __expf(float x) { return std::exp2f(x * 1.4426950408889634f); }

}  // extern "C"

