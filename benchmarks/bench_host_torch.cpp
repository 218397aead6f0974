// Host (CPU) benchmarks of grun against the same math as libtorch eager ops, side by side in
// one run. After Google Benchmark's table it prints the ratios (libtorch time / grun time) and
// grun's effective bandwidth next to a plain memory copy measured in the same process.
//
//   ./build/benchmarks/bench_host_torch --benchmark_min_time=0.2
//
// Both sides use the same thread count (GRUN_BENCH_THREADS, default 1: the most repeatable on a
// shared machine); torch::set_num_threads is set to match.
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <grun/gate/linear.hpp>
#include <grun/gate/mlp.hpp>
#include <grun/init.hpp>
#include <grun/intervention.hpp>
#include <grun/loss/token_nll.hpp>
#include <grun/reft/loreft.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

namespace {

unsigned bench_threads() {
  const char* s = std::getenv("GRUN_BENCH_THREADS");
  return s ? static_cast<unsigned>(std::atoi(s)) : 1u;
}

void fill_random(float* p, grun::index_t n, unsigned seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  for (grun::index_t i = 0; i < n; ++i) p[i] = dist(rng);
}

// ---- gated LoReFT forward + backward ----------------------------------------------------------
template <class Gate>
using loreft4 = grun::gated_intervention<Gate, grun::reft::loreft<4>>;

/// Save: the forward keeps what the backward would recompute (grun::saved_activations), as a
/// training step would — and as libtorch's autograd does; for gate::mlp the gate's hidden activations.
template <class Gate, bool Save = true>
void grun_intervention(benchmark::State& state) {
  using I = loreft4<Gate>;
  const grun::index_t T = state.range(0), d = state.range(1);
  typename I::template module<float> m(d, 7);
  grun::host_matrix<float> h(T, d), out(T, d), dout(T, d), dh(T, d);
  fill_random(h.storage.data(), T * d, 1);
  fill_random(dout.storage.data(), T * d, 2);
  grun::buffer<float> gates(T);
  const auto pos = grun::positions::all(T);
  const auto ex = grun::exec::host(bench_threads());
  grun::saved_activations<float> saved;
  for (auto _ : state) {
    if constexpr (Save) {
      m.forward(ex, h.view(), pos, out.view(), gates.view(), saved);
      m.backward(ex, h.view(), pos, dout.view(), grun::vector_view<const float>(), dh.view(), saved);
    } else {
      m.forward(ex, h.view(), pos, out.view(), gates.view());
      m.backward(ex, h.view(), pos, dout.view(), grun::vector_view<const float>(), dh.view());
    }
    benchmark::DoNotOptimize(dh.storage.data());
    benchmark::ClobberMemory();
  }
  // Compulsory traffic: read h, write h'; read h and dout, write dh (fp32).
  state.counters["GB/s"] = benchmark::Counter(double(T * d) * 4 * 5, benchmark::Counter::kIsIterationInvariantRate);
}

// The same math as libtorch eager ops: g = σ(gate(h)), Δ = Rᵀ(Wh + b − Rh), h' = h + gΔ; backward
// through autograd with upstream dout.
template <class Gate>
void torch_intervention(benchmark::State& state) {
  torch::set_num_threads(static_cast<int>(bench_threads()));
  const int64_t T = state.range(0), d = state.range(1), r = 4;
  auto opt = torch::TensorOptions().dtype(torch::kFloat32);
  torch::manual_seed(0);
  auto h = torch::randn({T, d}, opt).requires_grad_(true);
  auto dout = torch::randn({T, d}, opt);
  auto R = std::get<0>(torch::linalg_qr(torch::randn({d, r}, opt))).t().contiguous().requires_grad_(true);  // [r, d]
  auto W = (torch::randn({r, d}, opt) * 0.01).requires_grad_(true);
  auto b = torch::zeros({r}, opt).requires_grad_(true);
  auto w = (torch::randn({d}, opt) * 0.01).requires_grad_(true);
  auto c = torch::zeros({1}, opt).requires_grad_(true);
  auto W1 = (torch::randn({256, d}, opt) * 0.01).requires_grad_(true);
  auto b1 = torch::zeros({256}, opt).requires_grad_(true);
  auto W2 = (torch::randn({64, 256}, opt) * 0.05).requires_grad_(true);
  auto b2 = torch::zeros({64}, opt).requires_grad_(true);
  auto w3 = (torch::randn({64}, opt) * 0.05).requires_grad_(true);
  auto b3 = torch::zeros({1}, opt).requires_grad_(true);
  for (auto _ : state) {
    torch::Tensor z;
    if constexpr (std::is_same_v<Gate, grun::gate::linear>) {
      z = torch::matmul(h, w) + c;  // [T]
    } else {
      auto a1 = torch::relu(torch::linear(h, W1, b1));
      auto a2 = torch::relu(torch::linear(a1, W2, b2));
      z = torch::matmul(a2, w3) + b3;
    }
    auto g = torch::sigmoid(z).unsqueeze(1);                        // [T, 1]
    auto u = torch::linear(h, W, b) - torch::matmul(h, R.t());      // [T, r]
    auto out = h + g * torch::matmul(u, R);                         // [T, d]
    out.backward(dout);
    benchmark::DoNotOptimize(h.grad().data_ptr());
    for (torch::Tensor* p : {&h, &R, &W, &b, &w, &c, &W1, &b1, &W2, &b2, &w3, &b3})
      if (p->grad().defined()) p->mutable_grad().zero_();
  }
}

// ---- fused token NLL forward + backward -------------------------------------------------------
void grun_nll(benchmark::State& state) {
  const grun::index_t T = state.range(0), V = state.range(1);
  grun::host_matrix<float> logits(T, V), dlogits(T, V);
  fill_random(logits.storage.data(), T * V, 3, 3.0f);
  grun::buffer<std::int64_t> labels(T);
  for (grun::index_t t = 0; t < T; ++t) labels[t] = (t * 7919) % V;
  grun::buffer<float> nll(T), lse(T), dnll(T);
  for (grun::index_t t = 0; t < T; ++t) dnll[t] = 1.0f / float(T);
  const auto ex = grun::exec::host(bench_threads());
  for (auto _ : state) {
    grun::loss::token_nll_forward(ex, grun::matrix_view<const float>(logits.view()),
                                  grun::vector_view<const std::int64_t>(labels.view()), nll.view(), lse.view());
    grun::loss::token_nll_backward(ex, grun::matrix_view<const float>(logits.view()),
                                   grun::vector_view<const std::int64_t>(labels.view()),
                                   grun::vector_view<const float>(lse.view()), grun::vector_view<const float>(dnll.view()),
                                   dlogits.view());
    benchmark::DoNotOptimize(dlogits.storage.data());
    benchmark::ClobberMemory();
  }
  // Two reads of the logits and one write of dlogits.
  state.counters["GB/s"] = benchmark::Counter(double(T * V) * 4 * 3, benchmark::Counter::kIsIterationInvariantRate);
}

void torch_nll(benchmark::State& state) {
  torch::set_num_threads(static_cast<int>(bench_threads()));
  const int64_t T = state.range(0), V = state.range(1);
  torch::manual_seed(0);
  auto logits = (torch::randn({T, V}) * 3.0).requires_grad_(true);
  auto labels = torch::arange(T, torch::kLong).mul(7919).remainder(V);
  for (auto _ : state) {
    auto loss = torch::nn::functional::cross_entropy(logits, labels);  // mean over T, as dnll = 1/T above
    loss.backward();
    benchmark::DoNotOptimize(logits.grad().data_ptr());
    logits.mutable_grad().zero_();
  }
}

// ---- the memory-copy yardstick ----------------------------------------------------------------
void memcpy_bandwidth(benchmark::State& state) {
  const std::size_t bytes = std::size_t(state.range(0)) << 20;
  std::vector<char> a(bytes, 1), b(bytes, 0);
  for (auto _ : state) {
    std::memcpy(b.data(), a.data(), bytes);
    benchmark::DoNotOptimize(b.data());
    benchmark::ClobberMemory();
  }
  state.counters["GB/s"] = benchmark::Counter(double(bytes) * 2, benchmark::Counter::kIsIterationInvariantRate);
}

void intervention_args(benchmark::internal::Benchmark* b) {
  for (int64_t d : {576, 4096})
    for (int64_t T : {1, 128, 2048}) b->Args({T, d});
  b->Unit(benchmark::kMicrosecond)->UseRealTime();
}
void nll_args(benchmark::internal::Benchmark* b) {
  for (int64_t V : {49152, 128256}) b->Args({256, V});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

BENCHMARK(grun_intervention<grun::gate::linear>)->Name("grun/linear_loreft4")->Apply(intervention_args);
BENCHMARK(torch_intervention<grun::gate::linear>)->Name("torch/linear_loreft4")->Apply(intervention_args);
BENCHMARK(grun_intervention<grun::gate::mlp<>>)->Name("grun/mlp_loreft4")->Apply(intervention_args);
BENCHMARK(grun_intervention<grun::gate::mlp<>, false>)->Name("grun/mlp_loreft4_recompute")->Apply(intervention_args);
BENCHMARK(torch_intervention<grun::gate::mlp<>>)->Name("torch/mlp_loreft4")->Apply(intervention_args);
BENCHMARK(grun_nll)->Name("grun/nll")->Apply(nll_args);
BENCHMARK(torch_nll)->Name("torch/nll")->Apply(nll_args);
BENCHMARK(memcpy_bandwidth)->Name("memcpy")->Arg(256)->Unit(benchmark::kMillisecond)->UseRealTime();

/// Keeps every run's real time per iteration (in ns) and GB/s counter, for the ratio table.
class ratio_reporter : public benchmark::ConsoleReporter {
 public:
  std::map<std::string, double> time_ns, gbps;
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const auto& r : runs) {
      if (r.run_type != Run::RT_Iteration && r.aggregate_name != "median") continue;
      std::string name = r.run_name.str();
      time_ns[name] = r.GetAdjustedRealTime() * multiplier(r.time_unit);
      if (auto it = r.counters.find("GB/s"); it != r.counters.end()) gbps[name] = it->second.value / 1e9;
    }
    ConsoleReporter::ReportRuns(runs);
  }
  static double multiplier(benchmark::TimeUnit u) {
    switch (u) {
      case benchmark::kNanosecond: return 1;
      case benchmark::kMicrosecond: return 1e3;
      case benchmark::kMillisecond: return 1e6;
      default: return 1e9;
    }
  }
};

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  ratio_reporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  double copy = 0;
  for (auto& [k, v] : reporter.gbps)
    if (k.rfind("memcpy", 0) == 0) copy = v;
  std::printf("\nthreads = %u; memcpy bandwidth (read + write) = %.2f GB/s\n", bench_threads(), copy);
  std::printf("%-34s %12s %12s %9s %10s %8s\n", "case", "grun", "libtorch", "speedup", "grun GB/s", "% copy");
  for (auto& [name, t] : reporter.time_ns) {
    if (name.rfind("grun/", 0) != 0) continue;
    // grun/X_recompute: grun without saved activations, against the same libtorch row as grun/X.
    std::string other = "torch/" + name.substr(5);
    if (const auto at = other.find("_recompute"); at != std::string::npos) other.erase(at, 10);
    auto it = reporter.time_ns.find(other);
    if (it == reporter.time_ns.end()) continue;
    const double g = reporter.gbps.count(name) ? reporter.gbps[name] : 0;
    std::printf("%-34s %10.3fms %10.3fms %8.2fx %10.2f %7.0f%%\n", name.substr(5).c_str(), t / 1e6, it->second / 1e6,
                it->second / t, g, copy > 0 ? 100 * g / copy : 0.0);
  }
  benchmark::Shutdown();
  return 0;
}
