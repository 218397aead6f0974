// The libtorch adapter (grun/adapters/torch.hpp, and its runtime kinds, torch_kinds.hpp): autograd
// through the modules equals grun's direct host calls, training with torch's and grun's AdamW reduces a
// toy loss, the runtime kinds equal the typed calls and round-trip adapter files, bad input is rejected
// by name.
// libtorch first: its logging (glog) defines CHECK, which Catch's CHECK must replace.
#include <grun/adapters/torch_kinds.hpp>
#include <grun/optim/adamw.hpp>
#include <grun/stack.hpp>

#include <torch/optim/adamw.h>

#include <ATen/DLConvertor.h>  // PyTorch's own DLPack producer and consumer (DLPack 0.6, as Debian's header)
#if __has_include(<dlpack/dlpack.h>)
#include <grun/adapters/dlpack.hpp>
#define GRUN_TEST_DLPACK 1
#endif

#undef CHECK
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <vector>

#include <unistd.h>

namespace ta = grun::torch_adapter;
using grun::index_t;
using torch::Tensor;

namespace {

Tensor randn(std::vector<int64_t> shape, int64_t seed, at::ScalarType dt = at::kDouble) {
  torch::manual_seed(uint64_t(seed));
  return torch::randn(shape, at::TensorOptions().dtype(dt));
}
Tensor rows_of(std::vector<int64_t> r) { return torch::tensor(r, at::kLong); }

double max_abs(const Tensor& a, const Tensor& b) { return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>(); }

template <class P>
Tensor flat_of(const P& p) {  // copies an aggregate's leaves, in layout order, into a 1-D double tensor
  std::vector<double> v;
  auto copy = p;
  grun::for_each_param(copy, [&](auto& leaf) {
    for (index_t i = 0; i < leaf.size(); ++i) v.push_back(grun::load<double>(leaf[i]));
  });
  return torch::tensor(v, at::kDouble);
}

/// Module forward + autograd backward vs grun's forward/backward on the same parameters.
template <class Gate, class Reft>
void check_against_grun(index_t d, int64_t seed) {
  using M = ta::intervention<Gate, Reft>;
  using I = typename M::grun_type;
  auto m = std::make_shared<M>(d, uint64_t(seed), at::kDouble);
  {  // move the gates off 0.5 so the gate path matters
    torch::NoGradGuard ng;
    m->flat().add_(0.3 * randn({m->parameter_count()}, seed + 1));
  }
  const Tensor h = randn({2, 3, d}, seed + 2).requires_grad_(true);
  const Tensor rows = rows_of({4, 0, 5});
  auto [y, g] = m->forward(h, rows);
  const Tensor wy = randn({2, 3, d}, seed + 3), wg = randn({3}, seed + 4);
  ((y * wy).sum() + (g * wg).sum()).backward();

  const auto pos = grun::positions::rows({4, 0, 5});
  const Tensor hc = h.detach().reshape({6, d}).contiguous();
  Tensor out = torch::empty_like(hc), gates = torch::empty({3}, hc.options());
  const auto p = m->template params_view<double>();
  I::forward(grun::exec::host, p, ta::view<const double, 2>(hc), pos, ta::view<double, 2>(out),
             ta::view<double, 1>(gates));
  CHECK(max_abs(y.reshape({6, d}), out) == 0.0);
  CHECK(max_abs(g, gates) == 0.0);

  grun::owned_params<typename I::template params<double>> grads(I::template shape<double>(d));
  const Tensor dout = wy.reshape({6, d}).contiguous();
  Tensor dh = torch::empty_like(hc);
  I::backward(grun::exec::host, p, ta::view<const double, 2>(hc), pos, ta::view<const double, 2>(dout),
              ta::view<const double, 1>(wg), ta::view<double, 2>(dh), *grads);
  CHECK(max_abs(h.grad().reshape({6, d}), dh) == 0.0);
  CHECK(max_abs(m->flat().grad(), flat_of(*grads)) == 0.0);
}

/// A torch stack's autograd gradients (of h and of its trainable module) against
/// grun::intervention_stack's backward on the same upstream gradients wy, wg: bit for bit.
template <class Stack, class Ref>
void check_stack_backward(const Stack& s, const Ref& ref, const Tensor& h, const grun::positions& pos,
                          const Tensor& wy, const Tensor& wg) {
  using I = typename Ref::intervention;
  const Tensor hc = h.detach().contiguous();
  Tensor dh = torch::empty_like(hc);
  grun::owned_params<typename I::template params<double>> grads(I::template shape<double>(hc.size(1)));
  ref.backward(grun::exec::host, ta::view<const double, 2>(hc), pos, ta::view<const double, 2>(wy),
               ta::view<const double, 2>(wg), ta::view<double, 2>(dh), *grads);
  CHECK(max_abs(h.grad(), dh) == 0.0);
  CHECK(max_abs(s.trainable().grad(), flat_of(*grads)) == 0.0);
}

}  // namespace

TEST_CASE("torch adapter: module autograd equals grun's host forward/backward", "[torch_adapter]") {
  check_against_grun<grun::gate::linear, grun::reft::loreft<4>>(8, 10);
  check_against_grun<grun::gate::mlp<>, grun::reft::loreft<2>>(6, 20);
  check_against_grun<grun::gate::always, grun::reft::direft<4>>(8, 30);
  check_against_grun<grun::gate::linear, grun::reft::noreft<1>>(5, 40);
}

TEST_CASE("torch adapter: mlp-gate module and stack keep their forward's activations: same bits as recomputing",
          "[torch_adapter]") {
  // The adapter keeps a saved_activations in the autograd context (exec::host, gate::mlp), so the
  // backward skips the gate's forward; grun's own calls here recompute it. 40 positions: past the
  // gate's block of rows.
  using G = grun::gate::mlp<16, 8>;
  using R = grun::reft::loreft<3>;
  using I = grun::gated_intervention<G, R>;
  const index_t d = 20, n = 45;
  std::vector<int64_t> r;
  for (int64_t i = 0; i < 40; ++i) r.push_back((i * 7) % n);
  const auto pos = grun::positions::rows(std::vector<index_t>(r.begin(), r.end()));
  const index_t P = pos.size();
  const Tensor h = randn({n, d}, 51).requires_grad_(true);
  const Tensor hc = h.detach().contiguous();
  const Tensor wy = randn({n, d}, 52);

  SECTION("module") {
    auto m = std::make_shared<ta::intervention<G, R>>(d, 53, at::kDouble);
    auto [y, g] = m->forward(h, rows_of(r));
    const Tensor wg = randn({P}, 54);
    ((y * wy).sum() + (g * wg).sum()).backward();
    grun::owned_params<I::params<double>> grads(I::shape<double>(d));
    Tensor dh = torch::empty_like(hc);
    I::backward(grun::exec::host, m->params_view<double>(), ta::view<const double, 2>(hc), pos,
                ta::view<const double, 2>(wy), ta::view<const double, 1>(wg), ta::view<double, 2>(dh), *grads);
    CHECK(max_abs(h.grad(), dh) == 0.0);
    CHECK(max_abs(m->flat().grad(), flat_of(*grads)) == 0.0);
  }
  SECTION("stack: one frozen module, one trainable") {
    ta::intervention_stack<G, R> s(d, 0.5, 0.8, at::kDouble);
    s.append(55);
    s.append(56);
    grun::intervention_stack<G, R, grun::ortho::qr_retraction, double> ref(d, 0.5, 0.8);
    ref.append(ta::bind_params<I, double>(s.module_flat(0).detach(), d));
    ref.append(ta::bind_params<I, double>(s.module_flat(1).detach(), d));
    auto [y, g] = s.forward(h, rows_of(r));
    const Tensor wg = randn({2, P}, 57);
    ((y * wy).sum() + (g * wg).sum()).backward();
    check_stack_backward(s, ref, h, pos, wy, wg);
  }
  SECTION("a forward under NoGradGuard (nothing recorded, nothing kept) still runs") {
    auto m = std::make_shared<ta::intervention<G, R>>(d, 58, at::kDouble);
    torch::NoGradGuard ng;
    auto [y, g] = m->forward(hc, rows_of(r));
    CHECK(y.sizes() == hc.sizes());
  }
}

TEST_CASE("torch adapter: flat layout and named views match owned_params", "[torch_adapter]") {
  using I = grun::gated_intervention<grun::gate::linear, grun::reft::loreft<4>>;
  const index_t d = 7;
  CHECK(ta::flat_size<I>(d) == (d + 1) + (2 * 4 * d + 4));
  ta::intervention<grun::gate::linear, grun::reft::loreft<4>> m(d, 3);
  typename I::template module<float> ref(d, 3);  // same seed, grun's own storage
  const Tensor expect = flat_of(ref.parameters()).to(at::kFloat);
  CHECK(max_abs(m.flat(), expect) == 0.0);
  const auto named = m.named_params();
  REQUIRE(named.size() == 5);
  CHECK(named[0].name == "gate.weight");
  CHECK(named[0].tensor.sizes() == at::IntArrayRef({1, d}));
  CHECK(named[1].name == "gate.bias");
  CHECK(named[1].tensor.sizes() == at::IntArrayRef({1}));
  CHECK(named[2].name == "reft.rotate_layer");
  CHECK(named[2].tensor.sizes() == at::IntArrayRef({4, d}));
  CHECK(named[4].name == "reft.bias");
  // views alias flat: IO writes through them
  {
    torch::NoGradGuard ng;
    named[4].tensor.fill_(2.5f);
  }
  CHECK(m.params_view<float>().reft.bias[3] == 2.5f);
}

TEST_CASE("torch adapter: stack equals grun::intervention_stack (frozen + trainable, scale)", "[torch_adapter]") {
  using G = grun::gate::linear;
  using R = grun::reft::loreft<2>;
  using I = grun::gated_intervention<G, R>;
  const index_t d = 6;
  ta::intervention_stack<G, R> s(d, 0.6, 0.6, at::kDouble);
  s.append(1);
  s.append(2);  // module0 frozen, module1 trainable
  CHECK(s.size() == 2);
  CHECK_FALSE(s.module_flat(0).requires_grad());
  CHECK(s.trainable().requires_grad());
  CHECK(s.scale() == Approx(1.8));

  grun::intervention_stack<G, R, grun::ortho::qr_retraction, double> ref(d, 0.6, 0.6);
  ref.append(ta::bind_params<I, double>(s.module_flat(0).detach(), d));
  ref.append(ta::bind_params<I, double>(s.module_flat(1).detach(), d));

  const Tensor h = randn({5, d}, 3).requires_grad_(true);
  const Tensor rows = rows_of({1, 3, 4});
  auto [y, g] = s.forward(h, rows);
  CHECK(g.sizes() == at::IntArrayRef({2, 3}));
  const Tensor wy = randn({5, d}, 4), wg = randn({2, 3}, 5);
  ((y * wy).sum() + (g * wg).sum()).backward();

  const auto pos = grun::positions::rows({1, 3, 4});
  const Tensor hc = h.detach();
  Tensor out = torch::empty_like(hc), gates = torch::empty({2, 3}, hc.options());
  ref.forward(grun::exec::host, ta::view<const double, 2>(hc), pos, ta::view<double, 2>(out),
              ta::view<double, 2>(gates));
  CHECK(max_abs(y, out) == 0.0);
  CHECK(max_abs(g, gates) == 0.0);
  check_stack_backward(s, ref, h, pos, wy, wg);
  CHECK_FALSE(s.module_flat(0).grad().defined());

  // all frozen: still differentiable in h
  ta::intervention_stack<G, R> f(d, 0.0, 1.0, at::kDouble);
  f.append_frozen(s.module_flat(0));
  CHECK_FALSE(f.trainable().defined());
  const Tensor h2 = randn({5, d}, 6).requires_grad_(true);
  auto [y2, g2] = f.forward(h2, rows);
  y2.sum().backward();
  CHECK(h2.grad().defined());
}

TEST_CASE("torch adapter: token_nll equals torch's cross entropy, gradient included", "[torch_adapter]") {
  const Tensor logits = randn({5, 11}, 7).requires_grad_(true);
  const Tensor labels = torch::tensor(std::vector<int64_t>{3, -100, 0, 10, 5}, at::kLong);
  const Tensor nll = ta::token_nll(logits, labels);
  const Tensor w = randn({5}, 8);
  (nll * w).sum().backward();

  const Tensor l2 = logits.detach().clone().requires_grad_(true);
  const Tensor keep = labels.ne(-100);
  const Tensor picked = l2.gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1);
  const Tensor ref = torch::where(keep, torch::logsumexp(l2, {1}) - picked, torch::zeros_like(picked));
  (ref * w).sum().backward();
  CHECK(max_abs(nll, ref) < 1e-12);
  CHECK(max_abs(logits.grad(), l2.grad()) < 1e-12);

  const Tensor lh = logits.detach().to(at::kBFloat16);
  CHECK(ta::token_nll(lh, labels).scalar_type() == at::kFloat);
}

namespace {
/// A toy objective: gates → 1 on the first half of the rows, → 0 on the rest (BCE), and the edited
/// rows of the first half pulled towards a target.
Tensor toy_loss(ta::any_intervention& m, const Tensor& h, const Tensor& target) {
  const int64_t n = h.size(0);
  const Tensor rows = torch::arange(n, at::kLong);
  auto [y, g] = m.forward(h, rows);
  const Tensor label = torch::cat({torch::ones({n / 2}, g.options()), torch::zeros({n - n / 2}, g.options())});
  return torch::binary_cross_entropy(g, label) + (y.narrow(0, 0, n / 2) - target).pow(2).mean();
}
}  // namespace

TEST_CASE("torch adapter: training reduces a toy loss with torch's AdamW and with grun's AdamW", "[torch_adapter]") {
  const index_t d = 8;
  const Tensor h = torch::cat({randn({8, d}, 11, at::kFloat) + 1.0, randn({8, d}, 12, at::kFloat) - 1.0});
  const Tensor target = randn({8, d}, 13, at::kFloat);

  SECTION("torch::optim::AdamW + retract()") {
    auto m = ta::make_intervention("linear", "loreft", 4, d, 5);
    torch::optim::AdamW opt(m->parameters(), torch::optim::AdamWOptions(2e-2));
    const double first = toy_loss(*m, h, target).item<double>();
    double last = first;
    for (int step = 0; step < 60; ++step) {
      opt.zero_grad();
      Tensor loss = toy_loss(*m, h, target);
      loss.backward();
      opt.step();
      m->retract();
      last = loss.item<double>();
    }
    CHECK(last < 0.5 * first);
    const Tensor R = m->named_params()[2].tensor;  // reft.rotate_layer [4, d]: rows stay orthonormal
    CHECK(max_abs(R.matmul(R.t()), torch::eye(4)) < 1e-5);
  }
  SECTION("grun::optim::adamw over params_view / grads_view") {
    using M = ta::intervention<grun::gate::mlp<>, grun::reft::loreft<4>>;
    M m(d, 5);
    grun::optim::adamw<M::params_type<float>> opt(m.params_view<float>(), {.lr = 1e-2});
    const double first = toy_loss(m, h, target).item<double>();
    double last = first;
    for (int step = 0; step < 60; ++step) {
      m.zero_grad();
      Tensor loss = toy_loss(m, h, target);
      loss.backward();
      opt.step(m.params_view<float>(), m.grads_view<float>());
      m.mark_written();
      last = loss.item<double>();
    }
    CHECK(last < 0.5 * first);
    const Tensor R = m.named_params()[6].tensor;
    CHECK(m.named_params()[6].name == "reft.rotate_layer");
    CHECK(max_abs(R.matmul(R.t()), torch::eye(4)) < 1e-5);
  }
}

TEST_CASE("torch adapter: runtime factory", "[torch_adapter]") {
  for (const char* gate : {"linear", "mlp", "always"})
    for (const char* reft : {"loreft", "noreft", "direft"})
      for (int64_t r : {1, 2, 4, 8, 16, 32}) {
        auto m = ta::make_intervention(gate, reft, r, 40, 1);
        CHECK(m->gate_kind() == gate);
        CHECK(m->reft_kind() == reft);
        CHECK(m->rank() == r);
        CHECK(m->dim() == 40);
      }
  auto m = ta::make_intervention("always", "direft", 2, 5, 1);
  CHECK(m->parameter_count() == 2 * 2 * 5 + 2);
  CHECK(m->parameters().size() == 1);
  CHECK_THROWS_AS(ta::make_intervention("relu", "loreft", 4, 8, 1), grun::error);
  CHECK_THROWS_WITH(ta::make_intervention("linear", "lora", 4, 8, 1), Catch::Contains("loreft, noreft or direft"));
  CHECK_THROWS_WITH(ta::make_intervention("linear", "loreft", 3, 8, 1), Catch::Contains("1, 2, 4, 8, 16, 32"));

  auto s = ta::make_intervention_stack("mlp", "loreft", 4, 8);
  CHECK(s->size() == 0);
  const Tensor h = randn({3, 8}, 1, at::kFloat);
  auto [y0, g0] = s->forward(h, rows_of({2}));
  CHECK(max_abs(y0, h) == 0.0);
  CHECK(g0.sizes() == at::IntArrayRef({0, 1}));
  s->append(1);
  s->append(2);
  CHECK(s->size() == 2);
  CHECK(s->named_params(1).size() == 9);
  auto [y, g] = s->forward(h, rows_of({2}));
  CHECK(g.sizes() == at::IntArrayRef({2, 1}));
}

TEST_CASE("torch adapter: a runtime kind's operations equal the typed calls", "[torch_adapter]") {
  using I = grun::gated_intervention<grun::gate::mlp<>, grun::reft::loreft<4>>;
  const ta::intervention_kind& k = ta::intervention_kind_of("mlp", "loreft", 4);
  CHECK(&k == &ta::intervention_kind_of("mlp", "loreft", 4));  // one object per kind
  CHECK(k.gate() == "mlp");
  CHECK(k.reft() == "loreft");
  CHECK(k.rank() == 4);
  const index_t d = 12;
  CHECK(k.flat_size(d) == ta::flat_size<I>(d));
  const Tensor flat = k.init_flat(d, 7, at::kDouble);
  CHECK(max_abs(flat, ta::detail::init_flat<I>(d, 7, at::kDouble)) == 0.0);

  const Tensor h = randn({5, d}, 2);
  auto [y1, g1] = k.apply(h, flat, rows_of({4, 1}));
  auto [y2, g2] = ta::apply_intervention<I>(h, flat, rows_of({4, 1}));
  CHECK(max_abs(y1, y2) == 0.0);
  CHECK(max_abs(g1, g2) == 0.0);
  const Tensor frozen = k.init_flat(d, 8, at::kDouble).unsqueeze(0);
  auto [z1, s1] = k.apply_stack(h, frozen, flat, rows_of({0}), 0.5);
  auto [z2, s2] = ta::apply_stack<I>(h, frozen, flat, rows_of({0}), 0.5);
  CHECK(max_abs(z1, z2) == 0.0);
  CHECK(s1.sizes() == at::IntArrayRef({2, 1}));

  Tensor r1 = flat.clone(), r2 = flat.clone();
  r1.add_(0.1);
  r2.add_(0.1);
  k.retract_flat(r1, d);
  ta::detail::retract_flat<I>(r2, d);
  CHECK(max_abs(r1, r2) == 0.0);
  CHECK(max_abs(r1, flat + 0.1) > 0.0);  // loreft retracts R (noreft/direft would not)
}

TEST_CASE("torch adapter: runtime-kind stacks round-trip through a grun adapter file", "[torch_adapter]") {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("grun_torch_kinds_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const fs::path file = dir / "adapter.safetensors";
  const index_t d = 10;
  std::vector<std::shared_ptr<ta::any_intervention_stack>> sites;
  for (int s = 0; s < 2; ++s) {
    auto st = ta::make_intervention_stack("linear", "direft", 2, d, 0.25, 0.5);
    st->append(uint64_t(10 + s));
    st->append(uint64_t(20 + s));
    sites.push_back(st);
  }
  grun::io::adapter_info info;
  info.layers = {3, 7};
  info.model_fingerprint = "toy";
  info.stack_scale_a = 0.25;
  info.stack_scale_b = 0.5;
  ta::save_adapter(file, sites, info);

  const ta::loaded_stacks back = ta::load_adapter(file, d, {.expected_fingerprint = "toy"});
  REQUIRE(back.sites.size() == 2);
  CHECK(back.kind == &ta::intervention_kind_of("linear", "direft", 2));
  CHECK(back.info.layers == std::vector<index_t>{3, 7});
  const Tensor h = randn({4, d}, 5, at::kFloat);
  for (std::size_t s = 0; s < 2; ++s) {
    REQUIRE(back.sites[s]->size() == 2);
    CHECK(back.sites[s]->trainable().defined() == false);  // loaded modules are frozen
    CHECK(back.sites[s]->scale() == sites[s]->scale());
    for (index_t m = 0; m < 2; ++m) CHECK(max_abs(back.sites[s]->module_flat(m), sites[s]->module_flat(m)) == 0.0);
    CHECK(max_abs(std::get<0>(back.sites[s]->forward(h, rows_of({1, 3}))),
                  std::get<0>(sites[s]->forward(h, rows_of({1, 3})))) == 0.0);
  }

  using Catch::Contains;
  CHECK_THROWS_WITH(ta::load_adapter(file, d + 1), Contains("expected hidden size 11"));
  CHECK_THROWS_WITH(ta::load_adapter(file, d, {.expected_fingerprint = "other"}), Contains("expected model fingerprint"));
  // A stack of another kind, or whose scale info does not reproduce, is refused and nothing is written.
  const fs::path refused = dir / "refused.safetensors";
  auto other = ta::make_intervention_stack("mlp", "direft", 2, d, 0.25, 0.5);
  other->append(1);
  std::vector<std::shared_ptr<ta::any_intervention_stack>> mixed{sites[0], other};
  CHECK_THROWS_WITH(ta::save_adapter(refused, mixed, info), Contains("site 1: expected a linear/direft/rank 2 stack"));
  grun::io::adapter_info wrong_scale = info;
  wrong_scale.stack_scale_b = 1.0;
  CHECK_THROWS_WITH(ta::save_adapter(refused, sites, wrong_scale), Contains("differs from info's"));
  CHECK_THROWS_AS(ta::save_adapter(refused, {}, info), grun::shape_error);
  CHECK_FALSE(fs::exists(refused));
  // A file whose kind is not a runtime kind: named.
  {
    std::ofstream junk(refused, std::ios::binary);
    junk << "not a safetensors file";
  }
  CHECK_THROWS_AS(ta::load_adapter(refused), grun::error);
  fs::remove_all(dir);
}

TEST_CASE("torch adapter: half and bfloat16 inputs", "[torch_adapter]") {
  auto m = ta::make_intervention("linear", "loreft", 4, 16, 2);
  const Tensor h = randn({4, 16}, 3, at::kFloat);
  auto [yf, gf] = m->forward(h, rows_of({0, 3}));
  for (auto dt : {at::kHalf, at::kBFloat16}) {
    const Tensor hx = h.to(dt).requires_grad_(true);
    auto [y, g] = m->forward(hx, rows_of({0, 3}));  // module casts to its float parameters and back
    CHECK(y.scalar_type() == dt);
    CHECK(max_abs(y, yf) < 0.05);
    y.sum().backward();
    CHECK(hx.grad().scalar_type() == dt);
    // native half / bf16 storage: flat in the same dtype
    using I = grun::gated_intervention<grun::gate::linear, grun::reft::loreft<4>>;
    auto [y2, g2] = ta::apply_intervention<I>(h.to(dt), m->flat().detach().to(dt), rows_of({0, 3}));
    CHECK(y2.scalar_type() == dt);
    CHECK(max_abs(y2, yf) < 0.1);
    CHECK(max_abs(g2, gf) < 0.01);
  }
}

TEST_CASE("torch adapter: non-contiguous inputs are copied, not rejected", "[torch_adapter]") {
  using I = grun::gated_intervention<grun::gate::linear, grun::reft::direft<2>>;
  const index_t d = 5;
  const Tensor flat = ta::detail::init_flat<I>(d, 4, at::kDouble);
  const Tensor ht = randn({d, 6}, 9).t();  // [6, d], column-major
  REQUIRE_FALSE(ht.is_contiguous());
  auto [y1, g1] = ta::apply_intervention<I>(ht, flat, rows_of({5, 2}));
  auto [y2, g2] = ta::apply_intervention<I>(ht.contiguous(), flat, rows_of({5, 2}));
  CHECK(max_abs(y1, y2) == 0.0);
  CHECK(max_abs(g1, g2) == 0.0);
}

TEST_CASE("torch adapter: bad input throws shape_error naming expected and got", "[torch_adapter]") {
  using I = grun::gated_intervention<grun::gate::linear, grun::reft::loreft<2>>;
  const index_t d = 4;
  const Tensor flat = ta::detail::init_flat<I>(d, 1, at::kFloat);
  const Tensor h = randn({3, d}, 1, at::kFloat);
  using grun::shape_error;
  using Catch::Contains;
  CHECK_THROWS_WITH(ta::apply_intervention<I>(h, flat, rows_of({3})), Contains("expected a row in [0, 3)"));
  CHECK_THROWS_AS(ta::apply_intervention<I>(h, flat, rows_of({1, 1})), shape_error);
  CHECK_THROWS_WITH(ta::apply_intervention<I>(h, flat, rows_of({-1})), Contains(">= 0"));
  CHECK_THROWS_WITH(ta::apply_intervention<I>(h, flat, torch::tensor({0}, at::kInt)), Contains("expected dtype Long"));
  CHECK_THROWS_WITH(ta::apply_intervention<I>(h, flat, torch::zeros({1, 1}, at::kLong)), Contains("expected 1 dimension"));
  CHECK_THROWS_WITH(ta::apply_intervention<I>(h, flat.narrow(0, 0, 5), rows_of({0})), Contains("expected 23 parameters"));
  CHECK_THROWS_WITH(ta::apply_intervention<I>(h, flat.to(at::kDouble), rows_of({0})), Contains("expected the dtype of h"));
  CHECK_THROWS_WITH(ta::apply_intervention<I>(h.to(at::kInt), flat.to(at::kInt), rows_of({0})),
                    Contains("expected dtype Float, Double, Half or BFloat16"));
  CHECK_THROWS_AS(ta::apply_intervention<I>(randn({3, 5}, 1, at::kFloat), flat, rows_of({0})), shape_error);
  CHECK_THROWS_AS(ta::apply_intervention<I>(torch::Tensor(), flat, rows_of({0})), shape_error);

  auto m = ta::make_intervention("linear", "loreft", 2, d, 1);
  CHECK_THROWS_WITH(m->forward(randn({2, 5}, 1, at::kFloat), rows_of({0})), Contains("expected [.., 4]"));

  CHECK_THROWS_WITH(ta::token_nll(randn({2, 3}, 1), torch::tensor(std::vector<int64_t>{0, 3}, at::kLong)),
                    Contains("outside the vocabulary"));
  CHECK_THROWS_WITH(ta::token_nll(randn({2, 3}, 1), torch::tensor(std::vector<int64_t>{0}, at::kLong)),
                    Contains("expected shape [2]"));
  CHECK_THROWS_WITH(ta::token_nll(randn({2, 3}, 1), torch::tensor({0, 1}, at::kInt)), Contains("expected dtype Long"));

  ta::intervention_stack<grun::gate::linear, grun::reft::loreft<2>> s(d);
  s.append(1);
  CHECK_THROWS_WITH(s.append_frozen(torch::zeros({3})), Contains("expected a 1-D tensor of 23 parameters"));
  CHECK_THROWS_AS(s.module_flat(5), shape_error);
}

TEST_CASE("torch adapter: the backward uses the forward's positions, even if the rows tensor changed since",
          "[torch_adapter]") {
  // A reused position buffer refilled between forward and backward: the backward read the tensor
  // again (wrong gradients; in the stack, rows past h wrote out of bounds).
  using I = grun::gated_intervention<grun::gate::linear, grun::reft::loreft<2>>;
  const index_t d = 6;
  const Tensor flat = ta::detail::init_flat<I>(d, 3, at::kDouble).requires_grad_(true);
  const Tensor h = randn({5, d}, 2).requires_grad_(true);
  const Tensor w = randn({5, d}, 3);
  auto grads = [&](bool refill, bool stack) {
    Tensor rows = rows_of({1, 3});
    auto [y, g] = stack ? ta::apply_stack<I>(h, torch::empty({0, flat.numel()}, flat.options()), flat, rows, 0.7)
                        : ta::apply_intervention<I>(h, flat, rows);
    if (refill) rows.fill_(7);  // past the 5 rows of h
    return torch::autograd::grad({(y * w).sum() + g.sum()}, {h, flat});
  };
  for (bool stack : {false, true}) {
    INFO("stack " << stack);
    const auto ref = grads(false, stack), got = grads(true, stack);
    CHECK(max_abs(ref[0], got[0]) == 0.0);
    CHECK(max_abs(ref[1], got[1]) == 0.0);
  }
}

TEST_CASE("torch adapter: a double backward is refused, not answered without grun's second order", "[torch_adapter]") {
  using I = grun::gated_intervention<grun::gate::linear, grun::reft::loreft<2>>;
  const index_t d = 4;
  const Tensor flat = ta::detail::init_flat<I>(d, 1, at::kDouble).requires_grad_(true);
  const Tensor h = randn({3, d}, 1).requires_grad_(true);
  auto [y, g] = ta::apply_intervention<I>(h, flat, rows_of({0, 2}));
  CHECK_THROWS_WITH(torch::autograd::grad({y.pow(2).sum()}, {h}, {}, /*retain_graph=*/true, /*create_graph=*/true),
                    Catch::Contains("double backward is not supported"));
  auto [ys, gs] = ta::apply_stack<I>(h, torch::empty({0, flat.numel()}, flat.options()), flat, rows_of({1}), 1.0);
  CHECK_THROWS_WITH(torch::autograd::grad({ys.pow(2).sum()}, {h}, {}, true, true),
                    Catch::Contains("double backward is not supported"));
  const Tensor logits = randn({2, 5}, 4).requires_grad_(true);
  const Tensor nll = ta::token_nll(logits, rows_of({1, 4}));
  CHECK_THROWS_WITH(torch::autograd::grad({nll.sum()}, {logits}, {}, true, true),
                    Catch::Contains("double backward is not supported"));
  // a first-order backward is unaffected
  CHECK(torch::autograd::grad({y.pow(2).sum()}, {h})[0].defined());
}

TEST_CASE("torch adapter: outputs may be modified in place; empty batches; an integer h; dtype moves",
          "[torch_adapter]") {
  using I = grun::gated_intervention<grun::gate::linear, grun::reft::loreft<2>>;
  const index_t d = 4;
  const Tensor flat = ta::detail::init_flat<I>(d, 1, at::kFloat).requires_grad_(true);
  // a residual update on the returned hidden state (it was a view of an internal tensor: refused)
  const Tensor h = randn({2, 3, d}, 1, at::kFloat).requires_grad_(true);
  auto [y, g] = ta::apply_intervention<I>(h, flat, rows_of({0, 4}));
  CHECK_NOTHROW(y.add_(1.0));
  y.sum().backward();
  CHECK(h.grad().defined());
  // N = 0 rows: y.sum()'s gradient arrives expanded (stride 0)
  const Tensor h0 = torch::zeros({0, d}, at::kFloat).requires_grad_(true);
  auto [y0, g0] = ta::apply_intervention<I>(h0, flat, torch::zeros({0}, at::kLong));
  CHECK_NOTHROW(y0.sum().backward());
  // an integer h is refused by name, not cast to the parameters' dtype
  auto m = ta::make_intervention("linear", "loreft", 2, d, 1);
  CHECK_THROWS_WITH(m->forward(torch::zeros({2, d}, at::kLong), rows_of({0})),
                    Catch::Contains("expected dtype Float, Double, Half or BFloat16"));
  // gates come back in h's dtype, as the output does
  CHECK(std::get<1>(m->forward(randn({2, d}, 2, at::kDouble), rows_of({0}))).scalar_type() == at::kDouble);
  // a module appended after ->to(kDouble) joins the others' dtype
  ta::intervention_stack<grun::gate::linear, grun::reft::loreft<2>> s(d);
  s.append(1);
  s.to(at::kDouble);
  s.append(2);
  s.append_frozen(ta::detail::init_flat<I>(d, 3, at::kFloat));
  for (index_t k = 0; k < s.size(); ++k) CHECK(s.module_flat(k).scalar_type() == at::kDouble);
  CHECK_NOTHROW(s.forward(randn({3, d}, 3), rows_of({1})));
}

#if GRUN_TEST_DLPACK
TEST_CASE("torch adapter: PyTorch's DLPack tensors run through grun::dlpack, and grun's through torch", "[torch_adapter]") {
  using I = grun::gated_intervention<grun::gate::linear, grun::reft::loreft<2>>;
  const index_t d = 6;
  grun::gated_intervention<grun::gate::linear, grun::reft::loreft<2>>::module<float> m(d, 4);
  // torch → grun: at::toDLPack's tensors, read in place by grun's module
  const Tensor h = randn({4, d}, 5, at::kFloat);
  Tensor out = torch::empty({4, d}), gates = torch::empty({2});
  {
    grun::dlpack::managed_tensor ht(at::toDLPack(h)), ot(at::toDLPack(out)), gt(at::toDLPack(gates));
    CHECK(ht.view<const float, 2>().data() == h.data_ptr<float>());
    grun::dlpack::forward(m, grun::exec::host, ht.tensor(), grun::positions::rows({3, 1}), ot.tensor(), gt.tensor());
  }
  const Tensor flat = flat_of(m.parameters()).to(at::kFloat);
  auto [y, g] = ta::apply_intervention<I>(h, flat, rows_of({3, 1}));
  CHECK(max_abs(out, y) == 0.0);
  CHECK(max_abs(gates, g) == 0.0);
  // grun → torch: a grun matrix seen by torch without a copy; torch's deleter releases grun's storage
  auto storage = std::make_shared<grun::host_matrix<float>>(2, 3);
  for (index_t i = 0; i < 6; ++i) storage->storage[i] = float(i);
  {
    const Tensor t = at::fromDLPack(grun::dlpack::to_dlpack(storage->view(), storage));
    CHECK(t.data_ptr<float>() == storage->storage.data());
    CHECK(t.sizes() == at::IntArrayRef({2, 3}));
    CHECK(t[1][2].item<float>() == 5.f);
    CHECK(storage.use_count() == 2);
  }
  CHECK(storage.use_count() == 1);
}
#endif

TEST_CASE("torch adapter: raw writes to the parameters are counted by autograd; freezing drops the gradient",
          "[torch_adapter]") {
  const index_t d = 6;
  const Tensor h = randn({4, d}, 21, at::kFloat);
  SECTION("retract() after a forward: the stale graph refuses its backward") {
    auto m = ta::make_intervention("linear", "loreft", 2, d, 3);
    auto [y, g] = m->forward(h, rows_of({0, 2}));
    const auto before = m->flat()._version();
    m->retract();  // in place, through grun's raw view of flat (CPU float: no copy)
    CHECK(m->flat()._version() > before);
    CHECK_THROWS_WITH(y.sum().backward(), Catch::Contains("modified by an inplace operation"));
  }
  SECTION("grun's AdamW over params_view, then mark_written()") {
    using M = ta::intervention<grun::gate::linear, grun::reft::loreft<2>>;
    M m(d, 4);
    auto [y, g] = m.forward(h, rows_of({1}));
    y.sum().backward();
    grun::optim::adamw<M::params_type<float>> opt(m.params_view<float>(), {.lr = 1e-2});
    auto [y2, g2] = m.forward(h, rows_of({1}));
    opt.step(m.params_view<float>(), m.grads_view<float>());
    m.mark_written();
    CHECK_THROWS_WITH(y2.sum().backward(), Catch::Contains("modified by an inplace operation"));
  }
  SECTION("append() freezes the trainable module and drops its gradient") {
    auto st = ta::make_intervention_stack("linear", "loreft", 2, d, 0.0, 1.0);
    st->append(1);
    auto [y, g] = st->forward(h, rows_of({0, 3}));
    y.sum().backward();
    REQUIRE(st->module_flat(0).grad().defined());
    st->append(2);
    CHECK_FALSE(st->module_flat(0).grad().defined());
    CHECK_FALSE(st->module_flat(0).requires_grad());
    CHECK(st->trainable().requires_grad());
  }
}
