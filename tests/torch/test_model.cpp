// The example Llama stack (examples/llm/model.hpp) against an independent implementation
// (Hugging Face transformers on the same GGUF; tests/reference/make_model_reference.py wrote
// tests/data/model_reference.json), plus its own laws: KV-cached decoding equals the full forward,
// padding does not change a sequence's logits, hooks edit exactly what they should and pass
// gradients.
//
// [model] cases need the example model; without it the program exits 77 (ctest: Skipped).
// libtorch first: it brings glog, whose CHECK(cond) would otherwise replace Catch's (an abort,
// not a reported, counted assertion).
#include "llm/model.hpp"
#undef CHECK

#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>

namespace {

const llm::llama_model& model() {
  static std::unique_ptr<llm::llama_model> m = [] {
    const auto path = llm::default_model_path();
    if (!std::filesystem::exists(path)) {
      std::printf("SKIPPED: example model not found at %s (run cmake/fetch_model.sh or set GRUN_MODEL)\n", path.c_str());
      std::fflush(stdout);
      std::exit(77);
    }
    // One intra-op thread: ctest may run other tests beside this one on a 2-core machine, and
    // OpenMP teams spinning at barriers on a contended core are several times slower.
    llm::set_threads(1);
    return std::make_unique<llm::llama_model>(llm::llama_model::load(path));
  }();
  return *m;
}

const nlohmann::json& reference() {
  static const nlohmann::json j = [] {
    std::ifstream in(std::string(GRUN_TEST_DATA_DIR) + "/model_reference.json");
    REQUIRE(in.good());
    return nlohmann::json::parse(in);
  }();
  return j;
}

std::vector<std::int64_t> ids_of(const nlohmann::json& c) { return c.at("ids").get<std::vector<std::int64_t>>(); }

torch::Tensor ids_tensor(const std::vector<std::int64_t>& ids) {
  return torch::tensor(ids, torch::kInt64).view({1, static_cast<std::int64_t>(ids.size())});
}

// Largest |ours − reference| over every stored value of one case; row: [V] logits.
double max_abs_error(const torch::Tensor& row, const nlohmann::json& c) {
  const auto r = row.to(torch::kFloat64).contiguous();
  const double* p = r.data_ptr<double>();
  double err = 0;
  const auto check = [&](const char* ids_key, const char* values_key) {
    const auto ids = c.at(ids_key).get<std::vector<std::int64_t>>();
    const auto vals = c.at(values_key).get<std::vector<double>>();
    for (std::size_t i = 0; i < ids.size(); ++i) err = std::max(err, std::abs(p[ids[i]] - vals[i]));
  };
  check("top_ids", "top_values");
  check("sample_ids", "sample_values");
  return err;
}

}  // namespace

TEST_CASE("llama_config is read from the GGUF metadata", "[model]") {
  const auto& cfg = model().config();
  const auto& ref = reference().at("config");
  CHECK(cfg.n_layers == ref.at("num_hidden_layers").get<std::int64_t>());
  CHECK(cfg.d_model == ref.at("hidden_size").get<std::int64_t>());
  CHECK(cfg.d_ff == ref.at("intermediate_size").get<std::int64_t>());
  CHECK(cfg.n_heads == ref.at("num_attention_heads").get<std::int64_t>());
  CHECK(cfg.n_kv_heads == ref.at("num_key_value_heads").get<std::int64_t>());
  CHECK(cfg.vocab_size == ref.at("vocab_size").get<std::int64_t>());
  CHECK(cfg.rope_base == Approx(ref.at("rope_theta").get<double>()));
  CHECK(cfg.rms_eps == Approx(ref.at("rms_norm_eps").get<double>()));
  CHECK(cfg.head_dim == 64);
  CHECK(cfg.rope_dim == 64);
  CHECK(model().tied_output() == ref.at("tied_output").get<bool>());
}

TEST_CASE("next-token logits match transformers on the same GGUF within 1e-2", "[model]") {
  torch::NoGradGuard no_grad;
  const auto& cases = reference().at("cases");
  REQUIRE(cases.size() >= 5);
  for (const auto& c : cases) {
    const auto ids = ids_of(c);
    const auto r = model().forward(ids_tensor(ids));
    const torch::Tensor row = r.logits[0][static_cast<std::int64_t>(ids.size()) - 1];  // [V]
    const double err = max_abs_error(row, c);
    std::printf("  reference prompt (%zu tokens): max |logit error| = %.3g\n", ids.size(), err);
    INFO("prompt: " << c.at("prompt").get<std::string>());
    CHECK(err < 1e-2);
    CHECK(row.argmax().item<std::int64_t>() == c.at("top_ids")[0].get<std::int64_t>());
    // Whole-row summaries: 49152 values, so the tolerance scales with √V · 1e-2 for the sum.
    CHECK(row.to(torch::kFloat64).sum().item<double>() == Approx(c.at("sum").get<double>()).margin(2.0));
    CHECK(row.to(torch::kFloat64).norm().item<double>() == Approx(c.at("l2").get<double>()).epsilon(1e-5));
  }
}

TEST_CASE("a right-padded batch gives every sequence its unpadded logits", "[model]") {
  torch::NoGradGuard no_grad;
  const auto& cases = reference().at("cases");
  std::vector<std::vector<std::int64_t>> seqs;
  for (const auto& c : cases) seqs.push_back(ids_of(c));
  const auto batch = llm::make_batch(seqs, /*pad_id=*/2);
  llm::forward_options opt;
  opt.logits = llm::logits_mode::last;
  const torch::Tensor logits = model().forward(batch, opt).logits;  // [B, V]
  const std::vector<std::int64_t> want{static_cast<std::int64_t>(seqs.size()), model().config().vocab_size};
  REQUIRE(logits.sizes() == torch::IntArrayRef(want));
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    INFO("sequence " << i);
    // Unpadded forwards agree with the reference to ~1e-5 (previous case), so 1e-3 here means
    // the padding changed nothing beyond summation order.
    CHECK(max_abs_error(logits[static_cast<std::int64_t>(i)], cases[i]) < 1e-3);
  }
}

TEST_CASE("KV-cached incremental decoding equals the full forward", "[model]") {
  torch::NoGradGuard no_grad;
  const auto ids = ids_of(reference().at("cases")[5]);  // the chat prompt, 37 tokens
  const auto n = static_cast<std::int64_t>(ids.size());
  const torch::Tensor full = model().forward(ids_tensor(ids)).logits[0];  // [S, V]

  // Prefill 3 tokens, then one at a time, then the rest in one chunk.
  auto cache = model().make_cache(1, n);
  const torch::Tensor all = ids_tensor(ids);
  std::vector<torch::Tensor> pieces;
  pieces.push_back(model().forward(all.narrow(1, 0, 3), {}, {}, &cache).logits[0]);
  for (std::int64_t t = 3; t < 6; ++t) pieces.push_back(model().forward(all.narrow(1, t, 1), {}, {}, &cache).logits[0]);
  pieces.push_back(model().forward(all.narrow(1, 6, n - 6), {}, {}, &cache).logits[0]);
  const torch::Tensor inc = torch::cat(pieces, 0);  // [S, V]
  CHECK(cache.used == n);
  CHECK((inc - full).abs().max().item<double>() < 1e-3);

  SECTION("the cache is bounded") {
    CHECK_THROWS_AS(model().forward(all.narrow(1, 0, 1), {}, {}, &cache), grun::shape_error);
  }
}

TEST_CASE("forward_with_prefix over cached prefix keys equals the full forward", "[model]") {
  // The trainer's fast path: prompts without their last token are a fixed prefix (right-padded,
  // different lengths); the suffix (last prompt token + answer) runs from a block output.
  torch::NoGradGuard no_grad;
  const auto& cases = reference().at("cases");
  const std::vector<std::vector<std::int64_t>> seqs = {ids_of(cases[1]), ids_of(cases[3])};
  const std::int64_t n_suffix = 4, layer = 14;
  std::vector<std::vector<std::int64_t>> prefixes;
  for (const auto& s : seqs) prefixes.emplace_back(s.begin(), s.end() - n_suffix);
  const auto pb = llm::make_batch(prefixes, 2);
  auto cache = model().make_cache(2, pb.ids.size(1));
  llm::forward_options none;
  none.logits = llm::logits_mode::none;
  model().forward(pb.ids, pb.mask, none, &cache);
  llm::prefix_kv prefix;
  for (std::size_t l = 0; l < cache.k.size(); ++l) {
    prefix.k.push_back(cache.k[l]);
    prefix.v.push_back(cache.v[l]);
  }
  prefix.valid = cache.valid;
  prefix.length = cache.n_tokens;

  std::vector<torch::Tensor> suffix_h, want;
  llm::forward_options cap;
  cap.capture = {static_cast<int>(layer)};
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    const auto r = model().forward(ids_tensor(seqs[i]), {}, cap);
    const auto P = static_cast<std::int64_t>(prefixes[i].size());
    suffix_h.push_back(r.captured.at(static_cast<int>(layer))[0].narrow(0, P, n_suffix));
    want.push_back(r.logits[0].narrow(0, P, n_suffix));
  }
  const auto got = model().forward_with_prefix(static_cast<int>(layer), torch::stack(suffix_h), torch::ones({2, n_suffix}, torch::kBool),
                                               prefix).logits;  // [2, n_suffix, V]
  CHECK((got - torch::stack(want)).abs().max().item<double>() < 1e-3);
}

TEST_CASE("greedy generate (batched, cached) equals argmax of repeated full forwards", "[model]") {
  torch::NoGradGuard no_grad;
  const auto& cases = reference().at("cases");
  // Different lengths, so the batch is right-padded while decoding.
  const std::vector<std::vector<std::int64_t>> prompts = {ids_of(cases[0]), ids_of(cases[3])};
  llm::generate_options g;
  g.max_new_tokens = 5;
  const auto out = model().generate(prompts, g);
  REQUIRE(out.size() == prompts.size());
  llm::forward_options last;
  last.logits = llm::logits_mode::last;
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    std::vector<std::int64_t> seq = prompts[i], expect;
    for (int s = 0; s < 5; ++s) {
      const auto t = model().forward(ids_tensor(seq), {}, last).logits[0].argmax().item<std::int64_t>();
      expect.push_back(t);
      seq.push_back(t);
    }
    INFO("prompt " << i);
    CHECK(out[i] == expect);
  }
  // Stop ids end a sequence and are not returned.
  g.stop_ids = {out[0][2]};
  const auto stopped = model().generate({prompts[0]}, g);
  CHECK(stopped[0] == std::vector<std::int64_t>(out[0].begin(), out[0].begin() + 2));
}

TEST_CASE("hooks on block outputs", "[model]") {
  const auto ids = ids_of(reference().at("cases")[1]);
  const torch::Tensor x = ids_tensor(ids);
  const auto S = static_cast<std::int64_t>(ids.size());
  const auto d = model().config().d_model;
  torch::Tensor base;
  {
    torch::NoGradGuard no_grad;
    base = model().forward(x).logits;
  }

  SECTION("an identity hook changes nothing, and sees every layer in order") {
    torch::NoGradGuard no_grad;
    std::vector<int> seen;
    llm::forward_options opt;
    opt.hook = [&](int l, torch::Tensor h) {
      seen.push_back(l);
      CHECK(h.sizes() == torch::IntArrayRef({1, S, d}));
      return h;
    };
    CHECK(torch::equal(model().forward(x, {}, opt).logits, base));
    REQUIRE(seen.size() == static_cast<std::size_t>(model().config().n_layers));
    for (std::size_t i = 0; i < seen.size(); ++i) CHECK(seen[i] == static_cast<int>(i));
  }

  SECTION("adding a vector at one layer changes the logits from that token on only") {
    torch::NoGradGuard no_grad;
    const torch::Tensor u = torch::randn({d}, torch::TensorOptions().dtype(torch::kFloat32)) * 4.0;
    llm::forward_options opt;
    opt.hook = [&](int l, torch::Tensor h) {
      if (l != 12) return h;
      h = h.clone();
      h.select(1, S - 2) += u;  // second-to-last token only
      return h;
    };
    const torch::Tensor edited = model().forward(x, {}, opt).logits;
    CHECK(torch::allclose(edited.narrow(1, 0, S - 2), base.narrow(1, 0, S - 2)));  // causal: earlier tokens untouched
    CHECK((edited.narrow(1, S - 2, 2) - base.narrow(1, S - 2, 2)).abs().max().item<double>() > 1e-1);
  }

  SECTION("forward_from a captured block output equals the full forward") {
    torch::NoGradGuard no_grad;
    llm::forward_options cap;
    cap.capture = {9, 20};
    cap.stop_after = 20;
    const auto low = model().forward(x, {}, cap);
    CHECK_FALSE(low.logits.defined());
    REQUIRE(low.captured.count(9) == 1);
    CHECK(torch::equal(low.captured.at(20), low.hidden));
    CHECK((model().forward_from(9, low.captured.at(9)).logits - base).abs().max().item<double>() < 1e-4);
    CHECK((model().forward_from(20, low.captured.at(20)).logits - base).abs().max().item<double>() < 1e-4);
    CHECK((model().forward_from(-1, model().embed(x)).logits - base).abs().max().item<double>() < 1e-4);
  }

  SECTION("gradients reach a trainable edit through the frozen layers above it") {
    const torch::Tensor delta = torch::zeros({d}, torch::kFloat32).requires_grad_(true);
    llm::forward_options opt;
    opt.hook = [&](int l, torch::Tensor h) {
      if (l != 20) return h;
      const torch::Tensor onehot = torch::zeros({1, S, 1}, torch::kFloat32).index_fill_(1, torch::tensor({S - 1}), 1.0);
      return h + onehot * delta;  // last token only
    };
    opt.logits = llm::logits_mode::last;
    const torch::Tensor logits = model().forward(x, {}, opt).logits;  // [1, V]
    const auto target = logits.argmax(-1);
    torch::nll_loss(torch::log_softmax(logits, -1), target).backward();
    REQUIRE(delta.grad().defined());
    CHECK(delta.grad().abs().max().item<double>() > 0);
    CHECK_FALSE(model().layers()[25].wqkv.requires_grad());
    CHECK_FALSE(model().layers()[25].wqkv.grad().defined());

    // Directional derivative check against a central difference (fp32, loose).
    const torch::Tensor dir = torch::randn({d}, torch::kFloat32);
    const auto loss_at = [&](double eps) {
      torch::NoGradGuard no_grad;
      llm::forward_options o = opt;
      o.hook = [&](int l, torch::Tensor h) {
        if (l != 20) return h;
        h = h.clone();
        h.select(1, S - 1) += dir * eps;
        return h;
      };
      const auto lg = model().forward(x, {}, o).logits;
      return torch::nll_loss(torch::log_softmax(lg, -1), target).item<double>();
    };
    const double eps = 1e-2;
    const double fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps);
    const double an = (delta.grad() * dir).sum().item<double>();
    CHECK(an == Approx(fd).epsilon(5e-2).margin(1e-3));
  }
}

TEST_CASE("bad input is rejected with grun errors") {
  CHECK_THROWS_AS(llm::llama_model::load("/nonexistent/model.gguf"), grun::error);
  CHECK_THROWS_AS(llm::make_batch({}), grun::shape_error);

  SECTION("make_batch right-pads and masks") {
    const auto b = llm::make_batch({{5, 6, 7}, {8}, {}}, 2);
    CHECK(b.ids.sizes() == torch::IntArrayRef({3, 3}));
    CHECK(b.lengths == std::vector<std::int64_t>({3, 1, 0}));
    const torch::Tensor want = torch::tensor({5, 6, 7, 8, 2, 2, 2, 2, 2}, torch::kInt64).view({3, 3});
    CHECK(torch::equal(b.ids, want));
    CHECK(b.mask.sum().item<std::int64_t>() == 4);
  }
}

TEST_CASE("bad input to a loaded model is rejected with grun errors", "[model]") {
  const auto& m = model();
  const auto V = m.config().vocab_size;
  CHECK_THROWS_AS(m.forward(torch::tensor({std::int64_t{0}, V}, torch::kInt64).view({1, 2})), grun::shape_error);
  CHECK_THROWS_AS(m.forward(torch::tensor({-1}, torch::kInt64).view({1, 1})), grun::shape_error);
  CHECK_THROWS_AS(m.forward(torch::tensor({1, 2}, torch::kInt32).view({1, 2})), grun::shape_error);
  CHECK_THROWS_AS(m.forward(torch::tensor({1, 2}, torch::kInt64).view({1, 2}), torch::ones({1, 3}, torch::kBool)),
                  grun::shape_error);
  CHECK_THROWS_AS(m.forward_from(m.config().n_layers, torch::zeros({1, 2, m.config().d_model})), grun::shape_error);
  CHECK_THROWS_AS(m.forward_from(3, torch::zeros({1, 2, m.config().d_model + 1})), grun::shape_error);
  llm::forward_options bad_hook;
  bad_hook.hook = [](int, torch::Tensor h) { return h.narrow(1, 0, 1); };
  CHECK_THROWS_AS(m.forward(torch::tensor({1, 2}, torch::kInt64).view({1, 2}), {}, bad_hook), grun::shape_error);
}

// Hidden (run with "[.bench]"): prints forward / generate times; asserts nothing about time.
TEST_CASE("forward throughput", "[.bench][model]") {
  const auto& m = model();
  const auto time_it = [](const char* what, int reps, const auto& f) {
    f();  // warm-up
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) f();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
    std::printf("  %-52s %8.3f s (threads %d)\n", what, s, at::get_num_threads());
  };
  for (int threads : {1, 2}) {
    at::set_num_threads(threads);
    torch::NoGradGuard no_grad;
    const torch::Tensor ids = torch::randint(0, m.config().vocab_size, {16, 64}, torch::kInt64);
    const torch::Tensor one = torch::randint(0, m.config().vocab_size, {1, 37}, torch::kInt64);
    llm::forward_options last;
    last.logits = llm::logits_mode::last;
    llm::forward_options all;
    time_it("forward 1 x 37, all logits", 3, [&] { return m.forward(one, {}, all); });
    time_it("forward 16 x 64, last-token logits", 2, [&] { return m.forward(ids, {}, last); });
    time_it("forward 16 x 64, all logits", 1, [&] { return m.forward(ids, {}, all); });
    llm::generate_options g;
    g.max_new_tokens = 16;
    std::vector<std::vector<std::int64_t>> prompts(8, std::vector<std::int64_t>(40, 100));
    time_it("generate 8 prompts x 40 tokens, 16 new", 1, [&] { return m.generate(prompts, g); });
  }
  llm::set_threads(1);
}
