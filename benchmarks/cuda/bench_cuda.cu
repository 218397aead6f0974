// benchmarks/cuda/bench_cuda.cu — timings of grun's CUDA kernels with cudaEvents, printed as
//   RESULT <name> <milliseconds> <bytes_moved_at_minimum>
// lines for benchmarks/gpu_check.sh, which joins them with the PyTorch timings into one table.
// The copy bandwidth (cudaMemcpy device→device, read + write counted) is measured in the same run,
// so "% of copy bandwidth" compares like with like on whatever GPU this runs on.
//
//   bench_cuda [--quick | --smoke] [--only NAME[,NAME…]] [--schedule stream|resident|staged|tensor|tensor_apply|tensor_pipelined]
//              [--coef-schedule NAME] [--slot-schedule NAME] [--slots N] [--saved] [--fail-row KEY]
//              [--profile KEY[,KEY…]]
//     --quick  smaller sizes (smoke test of the script itself)
//     --smoke  the fewest rows that keep every benchmark's d and V, each timed once: every path a GPU
//              run takes, in seconds on the CPU emulation (tests/emulation runs it so)
//     --schedule  the fused forward's schedule for the whole run (fused::detail::forward_plan), e.g.
//              for ncu to profile that one; the others are still timed as …_fwd_<schedule>
//     --coef-schedule stream|resident|tensor, --slot-schedule cuda_cores|tensor  the backward's two
//              kernels' schedules for the whole run (coef_plan, slot_plan)
//     --slots N  the most slots of the CUDA-core slot kernel (slot_limit; 512 by default) for the run
//     --saved  the …_fwdbwd rows run the backward from what the forward kept (saved_activations: the
//              libtorch adapter's path), not recomputing it
//   A line "SCHEDULES forward=… coef=… slot=… slots=… fwdbwd=recompute|saved defaults forward=… …" says which
//   schedules the run's default rows ran and which are the library's defaults, and before each row of
//   another schedule a line "OPTIONS <key> <options…>" gives the options above that make that row's
//   configuration the run's default (what gpu_table.py --fastest-flags reads).
//     --fail-row KEY  the opt-in row KEY throws instead of running (a test of the FAILED path)
//     --profile KEY[,KEY…]  each row named runs its call once more after its timing, alone, between
//              cudaProfilerStart() and cudaProfilerStop(), and prints "PROFILED <key>": under
//              `ncu --profile-from-start off` every kernel of one call, in launch order (gpu_slot.sh
//              reads it with benchmarks/cuda/kernel_times.py); a KEY no row of the run has: exit 2
//     --only   run only the named benchmarks (copy_d2d, intervention_linear_loreft4, …_direft4,
//              …_loreft4_generic, intervention_mlp_loreft4, …_loreft4_householder, intervention_user_gate_loreft4,
//              intervention_scaling, nll,
//              kl, losses, adamw,
//              intervention_schedules) — e.g. to profile one kernel under ncu without running the rest
//
// intervention_schedules (the fused kernels' opt-in schedules, loreft4 and direft4) runs last. A row of
// it that throws prints "FAILED <key> <what>" instead of its RESULT, the run goes on (unless the CUDA
// context is lost), and bench_cuda exits 1 at the end.
#include <cuda_profiler_api.h>

#include <grun/cuda/adamw.cuh>
#include <grun/cuda/intervention.cuh>
#include <grun/cuda/kl.cuh>
#include <grun/cuda/losses.cuh>
#include <grun/cuda/nll.cuh>
#include <grun/gate/linear.hpp>
#include <grun/gate/mlp.hpp>
#include <grun/ortho/householder.hpp>
#include <grun/reft/direft.hpp>
#include <grun/reft/loreft.hpp>

#include "../../tests/cuda/norm_gate.hpp"  // a gate of the user's: g = σ(β‖h‖²/d − τ)

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace gc = grun::cuda;
using grun::cuda_space;
using grun::index_t;
using bf16 = grun::bfloat16;

namespace {

/// --smoke: every timing is one run, no warm-up.
bool smoke = false;

/// --saved: the _fwdbwd rows run the backward from what the forward kept (the libtorch adapter's path
/// for CUDA tensors) instead of recomputing it; the _fwdbwd_saved rows, the same then, are not repeated.
bool fwdbwd_saved = false;

namespace fd = gc::fused::detail;
/// The fused kernels' schedules as the options and the SCHEDULES line spell them.
constexpr std::pair<fd::forward_schedule, const char*> forward_names[] = {
    {fd::forward_schedule::stream, "stream"}, {fd::forward_schedule::resident, "resident"},
    {fd::forward_schedule::staged, "staged"}, {fd::forward_schedule::tensor, "tensor"},
    {fd::forward_schedule::tensor_apply, "tensor_apply"}, {fd::forward_schedule::tensor_pipelined, "tensor_pipelined"}};
constexpr std::pair<fd::coef_schedule, const char*> coef_names[] = {
    {fd::coef_schedule::stream, "stream"}, {fd::coef_schedule::resident, "resident"}, {fd::coef_schedule::tensor, "tensor"}};
constexpr std::pair<fd::slot_schedule, const char*> slot_names[] = {{fd::slot_schedule::cuda_cores, "cuda_cores"},
                                                                    {fd::slot_schedule::tensor, "tensor"}};

template <class E, std::size_t N>
const char* name_of(E e, const std::pair<E, const char*> (&names)[N]) {
  for (const auto& [value, name] : names)
    if (value == e) return name;
  return "?";
}
/// Sets `plan` to the schedule named v; false, having said what `option` expects, when v names none.
template <class E, std::size_t N>
bool parse_schedule(const char* option, const std::string& v, const std::pair<E, const char*> (&names)[N], E& plan) {
  std::string known;
  for (const auto& [value, name] : names) {
    if (v == name) {
      plan = value;
      return true;
    }
    known += std::string(known.empty() ? "" : ", ") + name;
  }
  std::fprintf(stderr, "bench_cuda: %s expects one of %s, got '%s'\n", option, known.c_str(), v.c_str());
  return false;
}

/// One row's configuration of the fused kernels' schedules (fused::detail's plans) and the backward's
/// source; by default the run's.
struct schedules {
  fd::forward_schedule forward = fd::forward_plan;
  fd::coef_schedule coef = fd::coef_plan;
  fd::slot_schedule slot = fd::slot_plan;
  index_t slots = fd::slot_limit;
  bool from_kept = fwdbwd_saved;

  void set() const { fd::forward_plan = forward, fd::coef_plan = coef, fd::slot_plan = slot, fd::slot_limit = slots; }
  /// Prints "OPTIONS <key> <options>": the bench_cuda options that make this configuration the run's
  /// default, spelled from the same tables the options are parsed with. A forward row's (backward =
  /// false) names its forward schedule only: nothing else changes a forward.
  void print_options(const std::string& key, bool backward) const {
    std::string options = std::string("--schedule ") + name_of(forward, forward_names);
    if (backward) {
      options += std::string(" --coef-schedule ") + name_of(coef, coef_names) + " --slot-schedule " +
                 name_of(slot, slot_names) + " --slots " + std::to_string(slots) + (from_kept ? " --saved" : "");
    }
    std::printf("OPTIONS %s %s\n", key.c_str(), options.c_str());
  }
};

/// Median of `reps` timed runs after `warmup` untimed ones, in milliseconds.
double time_ms(const std::function<void()>& f, int warmup = 3, int reps = 10) {
  if (smoke) warmup = 0, reps = 1;
  for (int i = 0; i < warmup; ++i) f();
  GRUN_CUDA_CHECK(cudaDeviceSynchronize());
  cudaEvent_t a, b;
  GRUN_CUDA_CHECK(cudaEventCreate(&a));
  GRUN_CUDA_CHECK(cudaEventCreate(&b));
  std::vector<float> ms;
  for (int i = 0; i < reps; ++i) {
    GRUN_CUDA_CHECK(cudaEventRecord(a));
    f();
    GRUN_CUDA_CHECK(cudaEventRecord(b));
    GRUN_CUDA_CHECK(cudaEventSynchronize(b));
    float t = 0;
    GRUN_CUDA_CHECK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  GRUN_CUDA_CHECK(cudaEventDestroy(a));
  GRUN_CUDA_CHECK(cudaEventDestroy(b));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

/// --profile: the rows whose call runs once more, alone, after its timing, between cudaProfilerStart()
/// and cudaProfilerStop() — what `ncu --profile-from-start off` then profiles: every kernel of one
/// call, in launch order (gpu_slot.sh's per-kernel times, benchmarks/cuda/kernel_times.py) — and the
/// rows that did (a name in --profile that no row of the run has is refused at the end).
std::vector<std::string> profile_rows, profiled_rows;

/// Times f (time_ms) and prints
///   RESULT <key> <milliseconds> <bytes moved at minimum>
/// then, when --profile names the row, runs f once more between cudaProfilerStart and cudaProfilerStop
/// and prints "PROFILED <key>".
void timed_row(const std::string& key, double bytes, const std::function<void()>& f, int warmup = 3, int reps = 10) {
  std::printf("RESULT %s %.6f %.0f\n", key.c_str(), time_ms(f, warmup, reps), bytes);
  if (std::find(profile_rows.begin(), profile_rows.end(), key) == profile_rows.end()) return;
  GRUN_CUDA_CHECK(cudaDeviceSynchronize());
  GRUN_CUDA_CHECK(cudaProfilerStart());
  f();
  GRUN_CUDA_CHECK(cudaDeviceSynchronize());
  GRUN_CUDA_CHECK(cudaProfilerStop());
  std::printf("PROFILED %s\n", key.c_str());
  profiled_rows.push_back(key);
}

/// --only: the comma-separated benchmark names to run (empty: all), each one of these.
std::vector<std::string> only;
const char* const benchmark_names[] = {"copy_d2d", "intervention_linear_loreft4", "intervention_linear_direft4",
                                       "intervention_linear_loreft4_generic", "intervention_mlp_loreft4",
                                       "intervention_linear_loreft4_householder", "intervention_user_gate_loreft4", "intervention_scaling", "nll", "kl", "losses", "adamw",
                                       "intervention_schedules"};
/// Whether benchmark `name` runs. A name missing from benchmark_names is this file's bug (--only could
/// not select it): thrown, so every run (the emulated smoke test in CI included) fails on the drift.
bool wanted(const std::string& name) {
  if (std::find(std::begin(benchmark_names), std::end(benchmark_names), name) == std::end(benchmark_names))
    throw std::logic_error("benchmark '" + name + "' is missing from benchmark_names (so --only cannot select it)");
  return only.empty() || std::find(only.begin(), only.end(), name) != only.end();
}

template <class T>
void fill(gc::device_buffer<T>& d, unsigned seed, float lo, float hi) {
  std::vector<T> h(std::size_t(d.size()));
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  for (auto& x : h) x = grun::store<T>(u(g));
  d.copy_from_host(h);
}

void bench_copy(index_t bytes) {
  gc::device_buffer<unsigned char> a(bytes), b(bytes);
  timed_row("copy_d2d", 2.0 * double(bytes),  // one read + one write
            [&] { GRUN_CUDA_CHECK(cudaMemcpy(b.data(), a.data(), std::size_t(bytes), cudaMemcpyDeviceToDevice)); });
}

/// What bench_intervention times: the path exec::cuda takes (fused kernels where the policies have
/// them), the generic per-thread path instead (the fallback for other policies), or the fused path and
/// then fwd+bwd with a saved_activations (the backward from what the forward kept).
enum class timing { fused, generic, fused_and_saved };

/// One intervention benchmark's inputs: one module (bf16, parameters ~U(−0.05, 0.05)) over every row of
/// h [T, d], dout, and the calls the rows time.
template <class I>
struct intervention_inputs {
  using P = typename I::template params<bf16, cuda_space>;
  using impl = grun::detail::intervention_impl<grun::exec::cuda_t, I>;
  index_t T_, d;
  bool generic;
  gc::device_params<P> p, g;
  gc::device_buffer<bf16> h, out, dout, dh, gates;
  grun::positions pos;
  grun::saved_activations<bf16> kept;

  intervention_inputs(index_t rows, index_t dim, bool gen)
      : T_(rows), d(dim), generic(gen), p(I::template shape<bf16, cuda_space>(dim)), g(*p), h(rows * dim),
        out(rows * dim), dout(rows * dim), dh(rows * dim), gates(rows), pos(grun::positions::all(rows)) {
    gc::device_buffer<bf16> tmp(p.size());
    fill(tmp, 1, -0.05f, 0.05f);
    GRUN_CUDA_CHECK(cudaMemcpy(p.data(), tmp.data(), sizeof(bf16) * std::size_t(p.size()), cudaMemcpyDeviceToDevice));
    fill(h, 2, -1.f, 1.f);
    fill(dout, 3, -1.f, 1.f);
  }
  grun::matrix_view<const bf16, cuda_space> hv() const { return {h.data(), {T_, d}}; }
  grun::matrix_view<const bf16, cuda_space> dv() const { return {dout.data(), {T_, d}}; }
  grun::matrix_view<bf16, cuda_space> outv() { return out.template view<2>({T_, d}); }
  grun::matrix_view<bf16, cuda_space> dhv() { return dh.template view<2>({T_, d}); }
  grun::matrix_view<bf16, cuda_space> gv() { return gates.template view<2>({1, T_}); }
  std::span<const P> mods() const { return {&*p, 1}; }
  static grun::matrix_view<const bf16, cuda_space> no_dgates() { return {nullptr, {0, 0}}; }
  /// Elements of h: the rows' byte counts are multiples of it (2 bytes each).
  double elems() const { return double(T_ * d); }

  void fwd(grun::matrix_view<bf16, cuda_space> o) {
    if (generic) impl::template generic_forward<bf16, cuda_space>(grun::exec::cuda, mods(), 1.0, hv(), pos, o, gv());
    else impl::forward(grun::exec::cuda, mods(), 1.0, hv(), pos, o, gv());
  }
  void bwd() {
    if (generic)
      impl::template generic_backward<bf16, cuda_space>(grun::exec::cuda, mods(), 1.0, 0, hv(), pos, dv(), no_dgates(),
                                                        dhv(), *g);
    else impl::backward(grun::exec::cuda, mods(), 1.0, 0, hv(), pos, dv(), no_dgates(), dhv(), *g);
  }
  /// The forward keeping what it can (16-bit storage: e and z, so the coefficient kernel reads dout
  /// only; the mlp gate's activations too), then the backward from it.
  void fwd_bwd_kept() {
    grun::detail::run_forward<I>(grun::exec::cuda, mods(), 1.0, hv(), pos, outv(), gv(), &kept);
    grun::detail::run_backward<I>(grun::exec::cuda, mods(), 1.0, 0, hv(), pos, dv(), no_dgates(), dhv(), *g, &kept,
                                  "bench_cuda");
  }
};

/// Forward, in-place forward and forward+backward of one module over every row of h [T, d] (bf16), under
/// the run's schedules. Policies with fused kernels (intervention_fused.cuh, intervention_mlp.cuh) take
/// them through exec::cuda.
template <class I>
void bench_intervention(const std::string& name, index_t T_, index_t d, timing what = timing::fused) {
  using impl = grun::detail::intervention_impl<grun::exec::cuda_t, I>;
  const bool generic = what == timing::generic;
  intervention_inputs<I> in(T_, d, generic);
  // The per-thread path for the whole module: few repetitions. (A parametrized rotation runs the plain
  // intervention's path once R is materialized; a user's gate beside a fused ReFT is not this slow.)
  const bool slow = generic || !grun::cuda::runs_fused_reft<I, bf16>;
  const int warm = slow ? 1 : 3, reps = slow ? 3 : 10;
  const double elems = in.elems();
  // Minimum traffic: read h, write h' (gates and parameters are negligible).
  timed_row(name + "_fwd", 2.0 * elems * 2, [&] { in.fwd(in.outv()); }, warm, reps);
  if (!slow) {
    // In place (out = h): h' overwrites h; values drift over repetitions, the timing does not.
    gc::device_buffer<bf16> hh(T_ * d);
    GRUN_CUDA_CHECK(cudaMemcpy(hh.data(), in.h.data(), sizeof(bf16) * std::size_t(T_ * d), cudaMemcpyDeviceToDevice));
    const grun::matrix_view<bf16, cuda_space> hhv(hh.data(), {T_, d});
    timed_row(name + "_fwd_inplace", 2.0 * elems * 2, [&] {
      impl::forward(grun::exec::cuda, in.mods(), 1.0, grun::matrix_view<const bf16, cuda_space>(hhv), in.pos, hhv, in.gv());
    }, warm, reps);
  }
  // fwd + bwd minimum: fwd reads h, writes h'; bwd reads h and dout, writes dh. (--saved: from the kept values.)
  const bool from_kept = fwdbwd_saved && what == timing::fused_and_saved;
  timed_row(name + "_fwdbwd", 5.0 * elems * 2,
            [&] { from_kept ? in.fwd_bwd_kept() : (in.fwd(in.outv()), in.bwd()); }, 1, slow ? 2 : 5);
  if (what == timing::fused_and_saved && !from_kept) {
    const std::string saved_row = name + "_fwdbwd_saved";
    schedules{.from_kept = true}.print_options(saved_row, true);
    timed_row(saved_row, 5.0 * elems * 2, [&] { in.fwd_bwd_kept(); }, 1, 5);
  }
}

/// Rows of the opt-in schedules that failed (printed as FAILED lines; the run then exits 1).
int failed_rows = 0;
/// --fail-row KEY: that opt-in row throws instead of running (how the emulated smoke test checks
/// that a failing row is reported and the run goes on).
std::string fail_row;

/// Times one opt-in schedule's row under `config` (its OPTIONS line first; `backward`: a fwd + bwd row),
/// and puts the run's plans back after it, whatever happens. A row that throws is reported as
///   FAILED <key> <what>
/// and the run goes on, unless the CUDA context is lost (a sticky error: nothing after it can run).
/// The schedules are timed after every default row, so a broken one costs only its own rows.
template <class Body>
void opt_in_row(const std::string& key, const schedules& config, bool backward, Body&& body) {
  struct restore {
    schedules run;
    ~restore() { run.set(); }
  } const plans;
  config.print_options(key, backward);
  try {
    config.set();
    if (key == fail_row) throw std::runtime_error("--fail-row " + key + ": failed on request");
    body();
  } catch (const std::exception& e) {
    std::string what = e.what();
    std::replace(what.begin(), what.end(), '\n', ' ');
    std::printf("FAILED %s %s\n", key.c_str(), what.c_str());
    std::fflush(stdout);
    ++failed_rows;
    (void)cudaGetLastError();  // a launch error that is not sticky
    if (const cudaError_t e2 = cudaDeviceSynchronize(); e2 != cudaSuccess)
      throw std::runtime_error("the CUDA context is lost after " + key + " (" + cudaGetErrorString(e2) +
                               "): the rows after it cannot run");
  }
}

/// The fused kernels' other schedules (fused::detail::forward_plan / coef_plan / slot_plan; tuning
/// knobs, opt-in until a GPU run says which is faster) at bench_intervention's sizes: the forward under
/// each but the run's default (timed there as _fwd), then fwd + bwd under each backward schedule.
template <class I>
void bench_schedules(const std::string& name, index_t T_, index_t d) {
  using impl = grun::detail::intervention_impl<grun::exec::cuda_t, I>;
  static_assert(impl::fused);
  intervention_inputs<I> in(T_, d, false);
  const double elems = in.elems();
  const schedules run;  // the run's: each row below changes some of it
  for (const auto& [plan, schedule] : forward_names) {  // rows …_fwd_<schedule>
    if (plan == run.forward) continue;
    const std::string key = name + "_fwd_" + schedule;
    schedules config = run;
    config.forward = plan;
    opt_in_row(key, config, false, [&] { timed_row(key, 2.0 * elems * 2, [&] { in.fwd(in.outv()); }); });
  }
  // fwd + bwd minimum: fwd reads h, writes h'; bwd reads h and dout, writes dh. Recomputing
  // (from_kept false) or from what the forward kept (true).
  const struct {
    schedules config;
    const char* suffix;
  } fwdbwd_plans[] = {
      // The forward and the coefficient kernel both resident.
      {{fd::forward_schedule::resident, fd::coef_schedule::resident, run.slot, run.slots, false}, "_fwdbwd_resident"},
      // The CUDA-core slot kernel with fewer slots: less partial-sum traffic, fewer CTAs (slot_limit).
      {{run.forward, run.coef, fd::slot_schedule::cuda_cores, 128, false}, "_fwdbwd_slots128"},
      {{run.forward, run.coef, fd::slot_schedule::cuda_cores, 256, false}, "_fwdbwd_slots256"},
      // The backward's kernels on tensor cores, each alone and both together.
      {{run.forward, run.coef, fd::slot_schedule::tensor, run.slots, false}, "_fwdbwd_slot_tensor"},
      {{run.forward, fd::coef_schedule::tensor, run.slot, run.slots, false}, "_fwdbwd_coef_tensor"},
      {{run.forward, fd::coef_schedule::tensor, fd::slot_schedule::tensor, run.slots, false}, "_fwdbwd_tensor"},
      // The backward from what the forward kept (bench_intervention's _fwdbwd_saved) with the
      // coefficient kernel on tensor cores, and with both backward kernels on tensor cores.
      {{run.forward, fd::coef_schedule::tensor, run.slot, run.slots, true}, "_fwdbwd_coef_tensor_saved"},
      {{run.forward, fd::coef_schedule::tensor, fd::slot_schedule::tensor, run.slots, true}, "_fwdbwd_tensor_saved"},
      // Every schedule not yet timed, together: the pipelined forward keeping e and z, and the
      // backward from them with both its kernels on tensor cores.
      {{fd::forward_schedule::tensor_pipelined, fd::coef_schedule::tensor, fd::slot_schedule::tensor, run.slots, true},
       "_fwdbwd_pipelined_tensor_saved"}};
  for (const auto& plan : fwdbwd_plans) {  // a member, not a structured binding: the lambdas capture it
    const std::string key = name + plan.suffix;
    opt_in_row(key, plan.config, true, [&] {
      timed_row(key, 5.0 * elems * 2, [&] { plan.config.from_kept ? in.fwd_bwd_kept() : (in.fwd(in.outv()), in.bwd()); },
                1, 5);
    });
  }
}

void bench_nll(index_t T_, index_t V) {
  gc::device_buffer<bf16> x(T_ * V);
  fill(x, 4, -4.f, 4.f);
  std::vector<std::int64_t> y(static_cast<std::size_t>(T_));
  for (index_t t = 0; t < T_; ++t) y[std::size_t(t)] = (t * 7919) % V;
  gc::device_buffer<std::int64_t> yd{std::span<const std::int64_t>(y)};
  gc::device_buffer<float> nll(T_), lse(T_), dn(T_);
  fill(dn, 5, 1.f, 1.f);
  const grun::matrix_view<const bf16, cuda_space> xv(x.data(), {T_, V});
  const grun::vector_view<const std::int64_t, cuda_space> yv(yd.data(), {T_});
  timed_row("nll_fwd", double(T_ * V) * 2,
            [&] { grun::loss::token_nll_forward(grun::exec::cuda, xv, yv, nll.view(), lse.view()); });
  // fwd + bwd, gradient written in place over the logits (values change; timing does not)
  gc::device_buffer<bf16> dx(T_ * V);
  // The issue's yardstick: one read + one write.
  timed_row("nll_fwdbwd", 2.0 * double(T_ * V) * 2, [&] {
    grun::loss::token_nll_forward(grun::exec::cuda, xv, yv, nll.view(), lse.view());
    grun::loss::token_nll_backward(grun::exec::cuda, xv, yv, grun::vector_view<const float, cuda_space>(lse.data(), {T_}),
                                   grun::vector_view<const float, cuda_space>(dn.data(), {T_}), dx.view<2>({T_, V}));
  });
}

/// Uniform [lo, hi) straight on the device (a hash of the index, not a quality RNG): the KL rows
/// fill 2 × 2 GiB of logits without building them on the host first.
template <class T>
__global__ void fill_hash_kernel(T* p, index_t n, unsigned seed, float lo, float hi) {
  for (index_t i = blockIdx.x * index_t(blockDim.x) + threadIdx.x; i < n; i += index_t(gridDim.x) * blockDim.x) {
    std::uint64_t h = std::uint64_t(i) * 0x9E3779B97F4A7C15ull + seed;
    h ^= h >> 31; h *= 0xBF58476D1CE4E5B9ull; h ^= h >> 29;
    gc::dstore(p + i, lo + (hi - lo) * float(h >> 40) * 0x1p-24f);
  }
}
template <class T>
void fill_device(gc::device_buffer<T>& d, unsigned seed, float lo, float hi) {
  fill_hash_kernel<<<1024, 256>>>(d.data(), d.size(), seed, lo, hi);
  GRUN_CUDA_CHECK_LAUNCH();
  GRUN_CUDA_CHECK(cudaDeviceSynchronize());
}

void bench_kl(index_t T_, index_t V) {
  gc::device_buffer<bf16> x(T_ * V), r(T_ * V);
  fill_device(x, 6, -4.f, 4.f);
  fill_device(r, 7, -4.f, 4.f);
  std::vector<std::int64_t> y(static_cast<std::size_t>(T_), 0);  // labels are only a mask here: every row counts
  gc::device_buffer<std::int64_t> yd{std::span<const std::int64_t>(y)};
  gc::device_buffer<float> kl(T_), lse(T_), lse_ref(T_), dk(T_);
  fill(dk, 8, 1.f, 1.f);
  const grun::matrix_view<const bf16, cuda_space> xv(x.data(), {T_, V}), rv(r.data(), {T_, V});
  const grun::vector_view<const std::int64_t, cuda_space> yv(yd.data(), {T_});
  timed_row("kl_fwd", 2.0 * double(T_ * V) * 2,  // one read of each logit tensor
            [&] { grun::loss::token_kl_forward(grun::exec::cuda, xv, rv, yv, kl.view(), lse.view(), lse_ref.view()); });
  gc::device_buffer<bf16> dx(T_ * V);
  // The yardstick: read both logit tensors once, write dlogits once (the fused kernels read both
  // twice, since backward needs the saved log-sum-exps).
  timed_row("kl_fwdbwd", 3.0 * double(T_ * V) * 2, [&] {
    grun::loss::token_kl_forward(grun::exec::cuda, xv, rv, yv, kl.view(), lse.view(), lse_ref.view());
    grun::loss::token_kl_backward(grun::exec::cuda, xv, rv, yv, grun::vector_view<const float, cuda_space>(lse.data(), {T_}),
                                  grun::vector_view<const float, cuda_space>(lse_ref.data(), {T_}),
                                  grun::vector_view<const float, cuda_space>(dk.data(), {T_}), dx.view<2>({T_, V}));
  });
}

/// The unlearning losses on exec::cuda: RMU's retain term over P × d hidden states (bandwidth:
/// read h and h_ref, read + write dh), and the one-block sequence / gate terms (latency: one
/// launch, one 16-byte copy back, one stream synchronization each).
void bench_losses(index_t P, index_t d, index_t B, index_t G) {
  namespace loss = grun::loss;
  gc::device_buffer<bf16> h(P * d), h0(P * d), dh(P * d);
  fill_device(h, 11, -2.f, 2.f);
  fill_device(h0, 12, -2.f, 2.f);
  loss::inputs<bf16, cuda_space> in;
  in.retain.hidden = {h.data(), {P, d}};
  in.retain.hidden_ref = {h0.data(), {P, d}};
  loss::grads<bf16, cuda_space> g;
  g.retain.hidden = {dh.data(), {P, d}};
  timed_row("rmu_retain_fwdbwd", 4.0 * double(P * d) * 2, [&] { loss::rmu_retain{}.evaluate(grun::exec::cuda, in, g, 1.f); });
  gc::device_buffer<float> nll(B), nll_ref(B), dnll(B), gates(G), dgates(G);
  fill(nll, 13, 5.f, 40.f);
  fill(nll_ref, 14, 5.f, 40.f);
  fill(gates, 15, 0.f, 1.f);
  std::vector<index_t> count(static_cast<std::size_t>(B), 12);
  gc::device_buffer<index_t> cd{std::span<const index_t>(count)};
  loss::inputs<bf16, cuda_space> seq;
  seq.forget.nll = {nll.data(), {B}};
  seq.forget.nll_ref = {nll_ref.data(), {B}};
  seq.forget.count = {cd.data(), {B}};
  seq.forget.gate = {gates.data(), {G}};
  loss::grads<bf16, cuda_space> sg;
  sg.forget.nll = {dnll.data(), {B}};
  sg.forget.gate = {dgates.data(), {G}};
  timed_row("npo_b64", 0, [&] { loss::npo{}.evaluate(grun::exec::cuda, seq, sg, 1.f); });
  timed_row("gate_bce_g16384", 0, [&] { loss::gate_bce{}.evaluate(grun::exec::cuda, seq, sg, 1.f); });
}

void bench_adamw(index_t d) {
  using I = grun::gated_intervention<grun::gate::mlp<>, grun::reft::loreft<4>>;
  using P = I::params<float, cuda_space>;
  gc::device_params<P> p(I::shape<float, cuda_space>(d)), g(*p);
  gc::device_param_state<float> m(*p), v(*p);
  grun::optim::adamw_coeffs<float> c{4e-3f, 0.9f, 0.999f, 1e-8f, 1.f - 4e-5f, 0.1f, 0.001f, 1.f};
  timed_row("adamw_mlp_loreft4", 7.0 * double(p.size()) * 4,  // read θ g m v, write θ m v
            [&] { grun::optim::detail::adamw_impl<grun::exec::cuda_t>::step(grun::exec::cuda, *p, *g, m, v, c); });
}

/// Appends the comma-separated names of `list` (an option's value) to `names`.
void append_names(const std::string& list, std::vector<std::string>& names) {
  for (std::size_t a = 0, b; a <= list.size(); a = b + 1) {
    b = std::min(list.find(',', a), list.size());
    if (b > a) names.push_back(list.substr(a, b - a));
  }
}

}  // namespace

int main(int argc, char** argv) {
  // The library's defaults, before the options change them (the SCHEDULES line names both).
  const auto forward_default = fd::forward_plan;
  const auto coef_default = fd::coef_plan;
  const auto slot_default = fd::slot_plan;
  const auto slots_default = fd::slot_limit;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else if (std::strcmp(argv[i], "--smoke") == 0) {
      smoke = true;
    } else if (std::strcmp(argv[i], "--only") == 0 && i + 1 < argc) {
      append_names(argv[++i], only);
    } else if (std::strcmp(argv[i], "--profile") == 0 && i + 1 < argc) {
      append_names(argv[++i], profile_rows);
    } else if (std::strcmp(argv[i], "--fail-row") == 0 && i + 1 < argc) {
      fail_row = argv[++i];
    } else if (std::strcmp(argv[i], "--schedule") == 0 && i + 1 < argc) {
      if (!parse_schedule("--schedule", argv[++i], forward_names, fd::forward_plan)) return 2;
    } else if (std::strcmp(argv[i], "--coef-schedule") == 0 && i + 1 < argc) {
      if (!parse_schedule("--coef-schedule", argv[++i], coef_names, fd::coef_plan)) return 2;
    } else if (std::strcmp(argv[i], "--slot-schedule") == 0 && i + 1 < argc) {
      if (!parse_schedule("--slot-schedule", argv[++i], slot_names, fd::slot_plan)) return 2;
    } else if (std::strcmp(argv[i], "--slots") == 0 && i + 1 < argc) {
      const std::string v = argv[++i];
      char* end = nullptr;
      const long long n = std::strtoll(v.c_str(), &end, 10);
      if (v.empty() || *end != '\0' || n < 1 || n > 1 << 20) {
        std::fprintf(stderr, "bench_cuda: --slots expects a whole number of slots from 1 to 1048576, got '%s'\n", v.c_str());
        return 2;
      }
      fd::slot_limit = index_t(n);
    } else if (std::strcmp(argv[i], "--saved") == 0) {
      fwdbwd_saved = true;
    } else {
      std::fprintf(stderr,
                   "bench_cuda: unknown argument '%s' (expected --quick, --smoke, --only NAME[,NAME...], --schedule NAME, "
                   "--coef-schedule NAME, --slot-schedule NAME, --slots N, --saved, --fail-row KEY, --profile KEY[,KEY...])\n",
                   argv[i]);
      return 2;
    }
  }
  for (const auto& name : only) {
    if (std::find(std::begin(benchmark_names), std::end(benchmark_names), name) != std::end(benchmark_names)) continue;
    std::string known;
    for (const char* n : benchmark_names) known += std::string(known.empty() ? "" : ", ") + n;
    std::fprintf(stderr, "bench_cuda: --only: no benchmark named '%s' (expected %s)\n", name.c_str(), known.c_str());
    return 2;
  }
  if (quick && smoke) {
    std::fprintf(stderr, "bench_cuda: --quick and --smoke are two sizes; give one\n");
    return 2;
  }
  if (!gc::device_available()) {
    std::fprintf(stderr, "SKIPPED: no CUDA device\n");
    return 77;
  }
  cudaDeviceProp prop{};
  GRUN_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("DEVICE %s\n", prop.name);
  std::printf("SCHEDULES forward=%s coef=%s slot=%s slots=%lld fwdbwd=%s defaults forward=%s coef=%s slot=%s slots=%lld "
              "fwdbwd=recompute\n",
              name_of(fd::forward_plan, forward_names), name_of(fd::coef_plan, coef_names),
              name_of(fd::slot_plan, slot_names), static_cast<long long>(fd::slot_limit),
              fwdbwd_saved ? "saved" : "recompute", name_of(forward_default, forward_names),
              name_of(coef_default, coef_names), name_of(slot_default, slot_names), static_cast<long long>(slots_default));
  // Rows: full (the issue's sizes), --quick, --smoke. d and V stay: they set the kernels' tiling.
  const auto rows = [&](index_t full, index_t quick_rows, index_t smoke_rows) {
    return smoke ? smoke_rows : quick ? quick_rows : full;
  };
  try {
    bench_copy(rows(index_t(1) << 30, index_t(64) << 20, index_t(1) << 20));  // always: the yardstick
    using lin = grun::gated_intervention<grun::gate::linear, grun::reft::loreft<4>>;
    using lin_di = grun::gated_intervention<grun::gate::linear, grun::reft::direft<4>>;
    using mlp = grun::gated_intervention<grun::gate::mlp<>, grun::reft::loreft<4>>;
    using lin_hh = grun::gated_intervention<grun::gate::linear, grun::reft::loreft<4>, grun::ortho::householder>;
    using user_gate = grun::gated_intervention<grun::test::norm_gate, grun::reft::loreft<4>>;
    const index_t T_ = rows(16384, 1024, 48);
    if (wanted("intervention_linear_loreft4"))
      bench_intervention<lin>("intervention_linear_loreft4", T_, 4096, timing::fused_and_saved);
    if (wanted("intervention_linear_direft4"))
      bench_intervention<lin_di>("intervention_linear_direft4", T_, 4096, timing::fused_and_saved);
    if (wanted("intervention_linear_loreft4_generic"))  // the fallback path, for scale
      bench_intervention<lin>("intervention_linear_loreft4_generic", rows(1024, 1024, 8), 4096, timing::generic);
    if (wanted("intervention_mlp_loreft4"))  // cuBLASLt first layer + fused ReFT
      bench_intervention<mlp>("intervention_mlp_loreft4", T_, 4096, timing::fused_and_saved);
    if (wanted("intervention_linear_loreft4_householder"))  // R materialized from raw vectors every call
      bench_intervention<lin_hh>("intervention_linear_loreft4_householder", T_, 4096);
    if (wanted("intervention_user_gate_loreft4"))  // the gate's row math one thread per row, the ReFT fused
      bench_intervention<user_gate>("intervention_user_gate_loreft4", T_, 4096);
    if (wanted("intervention_scaling") && !quick && !smoke) {
      // The fused path at 1/4 and 4× the rows: a per-call cost shows as time that does not scale with T.
      bench_intervention<lin>("intervention_linear_loreft4_T4096", 4096, 4096);
      bench_intervention<lin>("intervention_linear_loreft4_T65536", 65536, 4096);
    }
    if (wanted("nll")) bench_nll(rows(8192, 512, 4), quick ? 32768 : 131072);
    if (wanted("kl")) bench_kl(rows(8192, 512, 4), quick ? 32768 : 131072);
    if (wanted("losses")) bench_losses(rows(16384, 1024, 48), 4096, 64, 16384);
    if (wanted("adamw")) bench_adamw(4096);
    // Last: the opt-in schedules (new kernels, not yet timed on a GPU), so that one which fails, even
    // one that takes the CUDA context down with it, costs no default row.
    if (wanted("intervention_schedules")) {
      bench_schedules<lin>("intervention_linear_loreft4", T_, 4096);
      bench_schedules<lin_di>("intervention_linear_direft4", T_, 4096);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda: %s\n", e.what());
    return 1;
  }
  for (const auto& key : profile_rows) {
    if (std::find(profiled_rows.begin(), profiled_rows.end(), key) != profiled_rows.end()) continue;
    std::fprintf(stderr, "bench_cuda: --profile: no row named '%s' ran (expected a key of a RESULT line of this run)\n",
                 key.c_str());
    return 2;
  }
  if (failed_rows > 0) {
    std::fprintf(stderr, "bench_cuda: %d opt-in schedule row(s) FAILED (see the FAILED lines)\n", failed_rows);
    return 1;
  }
  return 0;
}
