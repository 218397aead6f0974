// The libtorch adapter on CUDA tensors (grun/adapters/torch.hpp built by nvcc with GRUN_TORCH_CUDA):
// the same calls on CUDA and on CPU tensors agree — forward, gates, autograd's gradients of h and of
// the parameters, for a single module (linear and mlp gates, LoReFT and DiReFT; float32 and bfloat16,
// whose bf16 forward keeps its activations for the backward), a stack, the fused token NLL, and a few
// training steps of torch's AdamW with the retraction — and grun runs on the stream torch has current.
// CUDA results are exec::cuda's kernels; CPU results are exec::host's, which tests/torch_adapter
// holds to grun's own calls bit for bit. Tolerances are issue 4's (fp32 rel 1e-5, bf16 rel 2e-2).
//
// libtorch_cuda.so is loaded at run time (dlopen, before main) where a GPU is visible: see
// CMakeLists.txt. Without a GPU the device cases skip, visibly (exit 77).
#include <grun/cuda/intervention.cuh>
#include <grun/cuda/nll.cuh>

#include <grun/adapters/torch.hpp>

#include <torch/cuda.h>
#include <torch/optim/adamw.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#undef CHECK  // libtorch's logging defines CHECK; Catch's replaces it
#include "cuda_test.hpp"

#include <dlfcn.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

namespace ta = grun::torch_adapter;
using grun::index_t;
using torch::Tensor;

namespace {

/// torch's CUDA half — its kernels, allocator and hooks, in libtorch_cuda.so — from the torch this
/// machine has (LD_LIBRARY_PATH or the build's rpath), loaded where a GPU is visible. It must be in
/// before anything asks torch about CUDA: torch creates its CUDA hooks at the first question and
/// keeps what it found, and questions come early — torch::manual_seed asks for the device count — so
/// it is loaded during static initialization, before main and any test case (libtorch_cpu's own
/// initialization, which asks nothing, has run by then). Empty: loaded; otherwise why not.
std::string load_torch_cuda() {
  if (!grun::test::device_present()) return "not loaded: no CUDA device";
  if (dlopen("libtorch_cuda.so", RTLD_NOW | RTLD_GLOBAL) != nullptr) return {};
  return dlerror();
}
const std::string torch_cuda_load_error = load_torch_cuda();

#define GRUN_REQUIRE_TORCH_CUDA()                                                                    \
  GRUN_REQUIRE_DEVICE();                                                                             \
  INFO("dlopen(libtorch_cuda.so): " << torch_cuda_load_error);                                       \
  REQUIRE(torch_cuda_load_error.empty());                                                            \
  REQUIRE(torch::cuda::is_available())

Tensor randn(std::vector<int64_t> shape, int64_t seed, at::ScalarType dt = at::kFloat) {
  torch::manual_seed(uint64_t(seed));
  return torch::randn(shape, at::TensorOptions().dtype(at::kFloat)).to(dt);
}
Tensor rows_of(std::vector<int64_t> r) { return torch::tensor(r, at::kLong); }
/// A new leaf on `device` that autograd fills .grad() of. (t.to(kCPU) of a CPU tensor is t itself:
/// marking that would make t require grad, and its later .to(kCUDA) a non-leaf without a .grad().)
Tensor leaf_on(const Tensor& t, at::Device device) { return t.detach().clone().to(device).requires_grad_(true); }

/// Norm-wise relative error max|a − b| / max|b| (tests/cuda/agreement.hpp's), on the CPU in double.
double rel_error(const Tensor& a, const Tensor& b) {
  REQUIRE(a.sizes() == b.sizes());
  const Tensor x = a.detach().cpu().to(at::kDouble), y = b.detach().cpu().to(at::kDouble);
  const double den = y.abs().max().item<double>();
  return (x - y).abs().max().item<double>() / std::max(den, 1e-30);
}
double tolerance(at::ScalarType dt) { return dt == at::kFloat ? 1e-5 : 2e-2; }

/// 24 distinct rows of 37, out of order.
std::vector<int64_t> some_rows() {
  std::vector<int64_t> r;
  for (int64_t i = 0; i < 24; ++i) r.push_back((i * 11 + 5) % 37);
  return r;
}

/// forward + autograd backward of apply_intervention<I> on `device`: (h', gates, dh, dflat) on the CPU.
template <class I>
std::vector<Tensor> module_step(const Tensor& h0, const Tensor& flat0, const std::vector<int64_t>& rows,
                                const Tensor& wy, const Tensor& wg, at::Device device) {
  const Tensor h = leaf_on(h0, device), flat = leaf_on(flat0, device);
  auto [y, g] = ta::apply_intervention<I>(h, flat, rows_of(rows));
  ((y.to(at::kFloat) * wy.to(device)).sum() + (g.to(at::kFloat) * wg.to(device)).sum()).backward();
  return {y.cpu(), g.cpu(), h.grad().cpu(), flat.grad().cpu()};
}

template <class I>
void check_module(index_t d, at::ScalarType dt, int64_t seed) {
  const int64_t n = 37;
  const auto rows = some_rows();
  // Parameters off grun::init's starting point, so the gate is neither 0.5 everywhere nor saturated.
  const Tensor flat0 = (ta::detail::init_flat<I>(d, uint64_t(seed), at::kFloat) +
                        0.05 * randn({ta::flat_size<I>(d)}, seed + 1)).to(dt);
  const Tensor h0 = randn({n, d}, seed + 2, dt);
  const Tensor wy = randn({n, d}, seed + 3), wg = randn({int64_t(rows.size())}, seed + 4);
  const auto cpu = module_step<I>(h0, flat0, rows, wy, wg, at::kCPU);
  const auto gpu = module_step<I>(h0, flat0, rows, wy, wg, at::kCUDA);
  const char* names[] = {"h'", "gates", "dh", "dflat"};
  INFO(I::gate_type::name << " + " << I::reft_type::name << ", d = " << d << ", dtype " << c10::toString(dt));
  for (int i = 0; i < 4; ++i) {
    INFO(names[i]);
    CHECK(gpu[i].scalar_type() == dt);
    CHECK(rel_error(gpu[i], cpu[i]) <= tolerance(dt));
  }
}

}  // namespace

TEST_CASE("torch adapter, CUDA build: CPU tensors still run on exec::host, bit for bit grun's host call",
          "[torch_cuda][nodevice]") {
  // No CUDA here at all: the CUDA build's CPU branch (compute dtype, dispatch) alone.
  using I = grun::gated_intervention<grun::gate::linear, grun::reft::loreft<4>>;
  const index_t d = 24;
  const Tensor flat = ta::detail::init_flat<I>(d, 3, at::kDouble);
  const Tensor h = randn({9, d}, 4, at::kDouble);
  auto [y, g] = ta::apply_intervention<I>(h, flat, rows_of({7, 1, 4}));
  Tensor out = torch::empty_like(h), gates = torch::empty({3}, h.options());
  I::forward(grun::exec::host, ta::bind_params<I, double>(flat, d), ta::view<const double, 2>(h),
             grun::positions::rows({7, 1, 4}), ta::view<double, 2>(out), ta::view<double, 1>(gates));
  CHECK((y - out).abs().max().item<double>() == 0.0);
  CHECK((g - gates).abs().max().item<double>() == 0.0);
}

TEST_CASE("torch adapter on CUDA tensors: a module's forward and autograd backward equal the CPU's", "[torch_cuda]") {
  GRUN_REQUIRE_TORCH_CUDA();
  using linear_loreft = grun::gated_intervention<grun::gate::linear, grun::reft::loreft<4>>;
  using mlp_loreft = grun::gated_intervention<grun::gate::mlp<>, grun::reft::loreft<4>>;
  using always_direft = grun::gated_intervention<grun::gate::always, grun::reft::direft<4>>;
  for (at::ScalarType dt : {at::kFloat, at::kBFloat16}) {
    check_module<linear_loreft>(256, dt, 10);  // the fused kernels
    check_module<linear_loreft>(200, dt, 20);  // d not a multiple of 32
    check_module<mlp_loreft>(256, dt, 30);     // cuBLASLt for the gate's layers
    check_module<always_direft>(96, dt, 40);
  }
}

TEST_CASE("torch adapter on CUDA tensors: a stack (two frozen modules and a trainable one) equals the CPU's",
          "[torch_cuda]") {
  GRUN_REQUIRE_TORCH_CUDA();
  using G = grun::gate::linear;
  using R = grun::reft::loreft<4>;
  const index_t d = 128;
  const int64_t n = 37;
  const auto rows = some_rows();
  ta::intervention_stack<G, R> cpu(d, 0.25, 0.5);
  for (uint64_t seed : {1, 2, 3}) cpu.append(seed);
  ta::intervention_stack<G, R> gpu(d, 0.25, 0.5);
  for (index_t k = 0; k < 2; ++k) gpu.append_frozen(cpu.module_flat(k));
  gpu.append(9);
  {
    torch::NoGradGuard no_grad;
    gpu.trainable().copy_(cpu.trainable());
  }
  gpu.to(torch::kCUDA);
  CHECK(gpu.trainable().is_cuda());
  const Tensor h0 = randn({n, d}, 5), wy = randn({n, d}, 6), wg = randn({3, int64_t(rows.size())}, 7);
  std::vector<Tensor> got[2];
  int side = 0;
  for (ta::any_intervention_stack* s : {static_cast<ta::any_intervention_stack*>(&cpu),
                                        static_cast<ta::any_intervention_stack*>(&gpu)}) {
    const at::Device dev = s->trainable().device();
    const Tensor h = leaf_on(h0, dev);
    auto [y, g] = s->forward(h, rows_of(rows));
    ((y * wy.to(dev)).sum() + (g * wg.to(dev)).sum()).backward();
    got[side++] = {y.cpu(), g.cpu(), h.grad().cpu(), s->trainable().grad().cpu()};
  }
  const char* names[] = {"h'", "gates", "dh", "d trainable"};
  for (int i = 0; i < 4; ++i) {
    INFO(names[i]);
    CHECK(rel_error(got[1][i], got[0][i]) <= 1e-5);
  }
}

TEST_CASE("torch adapter on CUDA tensors: token_nll and its gradient equal the CPU's", "[torch_cuda]") {
  GRUN_REQUIRE_TORCH_CUDA();
  const std::vector<int64_t> labels{3, -100, 0, 1000, 517, 999, -100, 42};
  for (at::ScalarType dt : {at::kFloat, at::kBFloat16}) {
    INFO("logits " << c10::toString(dt));
    const Tensor logits0 = (4.0 * randn({8, 1001}, 8)).to(dt), w = randn({8}, 9);
    std::vector<Tensor> got[2];
    int side = 0;
    for (at::Device dev : {at::Device(at::kCPU), at::Device(at::kCUDA)}) {
      const Tensor logits = leaf_on(logits0, dev);
      const Tensor nll = ta::token_nll(logits, rows_of(labels).to(dev));
      CHECK(nll.scalar_type() == at::kFloat);
      (nll * w.to(dev)).sum().backward();
      got[side++] = {nll.cpu(), logits.grad().cpu()};
    }
    CHECK(rel_error(got[1][0], got[0][0]) <= 1e-5);  // fp32 accumulation on both sides
    CHECK(rel_error(got[1][1], got[0][1]) <= tolerance(dt));
    CHECK(got[1][0][1].item<float>() == 0.0f);  // ignored label
  }
}

TEST_CASE("torch adapter on CUDA tensors: training steps with torch's AdamW and the retraction follow the CPU's",
          "[torch_cuda]") {
  GRUN_REQUIRE_TORCH_CUDA();
  using M = ta::intervention<grun::gate::linear, grun::reft::loreft<4>>;
  const index_t d = 64;
  const Tensor h = torch::cat({randn({16, d}, 11) + 1.0, randn({16, d}, 12) - 1.0});
  const Tensor target = randn({16, d}, 13);
  const Tensor label = torch::cat({torch::ones({16}), torch::zeros({16})});
  std::vector<double> losses[2];
  int side = 0;
  for (at::Device dev : {at::Device(at::kCPU), at::Device(at::kCUDA)}) {
    auto m = std::make_shared<M>(d, 5);
    m->to(dev);
    REQUIRE(m->flat().device() == dev);
    torch::optim::AdamW opt(m->parameters(), torch::optim::AdamWOptions(1e-2));
    const Tensor hd = h.to(dev), td = target.to(dev), ld = label.to(dev);
    for (int step = 0; step < 8; ++step) {
      opt.zero_grad();
      auto [y, g] = m->forward(hd, torch::arange(32, at::kLong));
      Tensor loss = torch::binary_cross_entropy(g, ld) + (y.narrow(0, 0, 16) - td).pow(2).mean();
      loss.backward();
      opt.step();
      m->retract();  // on a CUDA module: through a CPU copy, written back
      losses[side].push_back(loss.item<double>());
    }
    CHECK(m->flat().device() == dev);
    const auto params = m->named_params();
    const auto rotate = std::find_if(params.begin(), params.end(), [](const auto& p) { return p.name == "reft.rotate_layer"; });
    REQUIRE(rotate != params.end());
    const Tensor R = rotate->tensor.detach().cpu();  // [4, d]: rows orthonormal again after the retraction
    CHECK((R.matmul(R.t()) - torch::eye(4)).abs().max().item<float>() < 1e-5f);
    ++side;
  }
  CHECK(losses[1].back() < 0.9 * losses[1].front());
  // The losses, not the parameters, are compared: Adam divides each gradient entry by its own
  // magnitude, so an entry that is ~0 on both sides may step ±lr apart; the loss averages that out.
  for (std::size_t i = 0; i < losses[0].size(); ++i) {
    INFO("step " << i);
    CHECK(losses[1][i] == Approx(losses[0][i]).epsilon(1e-3));
  }
}

TEST_CASE("torch adapter on CUDA tensors: grun runs on torch's current stream", "[torch_cuda]") {
  GRUN_REQUIRE_TORCH_CUDA();
  using I = grun::gated_intervention<grun::gate::linear, grun::reft::loreft<4>>;
  const index_t d = 512;
  const Tensor flat = ta::detail::init_flat<I>(d, 7, at::kFloat).cuda();
  const Tensor h = randn({4096, d}, 8).cuda();
  const Tensor all = torch::arange(4096, at::kLong);
  auto [y_default, g_default] = ta::apply_intervention<I>(h, flat, all);
  const c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool();
  Tensor y_side, g_side;
  {
    // Inputs made on the default stream: the side stream waits for them, as torch's own ops would
    // need; grun's kernels then queue on the side stream, and the copies below wait for them there.
    side.synchronize();
    c10::cuda::getDefaultCUDAStream().synchronize();
    const c10::cuda::CUDAStreamGuard guard(side);
    std::tie(y_side, g_side) = ta::apply_intervention<I>(h, flat, all);
    y_side = y_side.cpu();  // on the side stream: ordered after grun's kernels only if they ran there
    g_side = g_side.cpu();
  }
  CHECK((y_side - y_default.cpu()).abs().max().item<float>() == 0.0f);
  CHECK((g_side - g_default.cpu()).abs().max().item<float>() == 0.0f);
}

TEST_CASE("torch adapter on CUDA tensors: mixed devices are refused by name", "[torch_cuda]") {
  GRUN_REQUIRE_TORCH_CUDA();
  using I = grun::gated_intervention<grun::gate::linear, grun::reft::loreft<4>>;
  using Catch::Contains;
  const index_t d = 32;
  const Tensor flat = ta::detail::init_flat<I>(d, 1, at::kFloat);
  const Tensor h = randn({5, d}, 2).cuda();
  CHECK_THROWS_WITH(ta::apply_intervention<I>(h, flat, rows_of({0, 2})), Contains("expected the same device"));
  ta::intervention<grun::gate::linear, grun::reft::loreft<4>> m(d, 1);  // parameters on the CPU
  CHECK_THROWS_WITH(m.forward(h, rows_of({0})), Contains("move the module with ->to(device)"));
  CHECK_THROWS_WITH(ta::token_nll(randn({2, 9}, 3).cuda(), rows_of({1, 2})), Contains("expected the same device"));
  // rows may live on the device: they are copied to the host (positions are host data)
  auto [y, g] = ta::apply_intervention<I>(h, flat.cuda(), rows_of({0, 2}).cuda());
  CHECK(g.numel() == 2);
}
