// Adapter save/load: bitwise round trips (module, multi-site stacks), pyreft-compatible key names and
// the rotate_layer transposition, 16-bit dtypes, and every metadata / tensor mismatch rejected.
#include <catch2/catch.hpp>

#include "test_files.hpp"

#include <grun/gate/always.hpp>
#include <grun/gate/linear.hpp>
#include <grun/gate/mlp.hpp>
#include <grun/io/adapter.hpp>
#include <grun/ortho/householder.hpp>
#include <grun/reft/direft.hpp>
#include <grun/reft/loreft.hpp>

#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using namespace grun;
using namespace grun::io;

using grun_test::temp_dir;

namespace {

template <class Owned>
bool same_bytes(const Owned& a, const Owned& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), sizeof(*a.data()) * a.size()) == 0;
}
template <class P>
bool same_params(const P& a, const P& b) {
  bool ok = true;
  for_each_param_pair(a, b, [&](const auto& x, const auto& y) {
    ok = ok && x.rows == y.rows && x.cols == y.cols &&
         std::memcmp(x.data, y.data, sizeof(*x.data) * static_cast<std::size_t>(x.size())) == 0;
  });
  return ok;
}

using linear_loreft = gated_intervention<gate::linear, reft::loreft<4>>;
using mlp_loreft = gated_intervention<gate::mlp<8, 4>, reft::loreft<4>>;

adapter_info one_site(index_t layer = 20) {
  adapter_info info;
  info.layers = {layer};
  info.model_fingerprint = "smollm2-135m:q4_1:abc123";
  return info;
}

}  // namespace

TEST_CASE("adapter io: a module round-trips bitwise with pyreft key names", "[adapter_io]") {
  temp_dir dir("grun_adapter_");
  const auto path = dir.path / "a.safetensors";
  const index_t d = 16;
  linear_loreft::module<float> m(d, 1);
  save_adapter(path, m, one_site());
  REQUIRE(dir.entries() == 1);

  const auto f = safetensors_file::read(path);
  const std::string p = "layers.20.modules.0.";
  REQUIRE(f.tensors().size() == 5);
  CHECK(f.at(p + "rotate_layer").shape == std::vector<index_t>{d, 4});  // pyreft [d, r]
  CHECK(f.at(p + "weight").shape == std::vector<index_t>{4, d});        // learned_source.weight
  CHECK(f.at(p + "bias").shape == std::vector<index_t>{4});
  CHECK(f.at(p + "gate_func.weight").shape == std::vector<index_t>{1, d});
  CHECK(f.at(p + "gate_func.bias").shape == std::vector<index_t>{1});
  // the file's rotate_layer is Rᵀ
  const auto rt = decode<float>(f, p + "rotate_layer");
  const auto& R = m.parameters().reft.rotate_layer;
  for (index_t i = 0; i < 4; ++i)
    for (index_t j = 0; j < d; ++j) REQUIRE(rt[std::size_t(j * 4 + i)] == R(i, j));
  const auto& md = f.metadata();
  CHECK(md.at("format") == "grun.adapter");
  CHECK(md.at("format_version") == "1");
  CHECK(md.at("gate") == "gate::linear");
  CHECK(md.at("reft") == "reft::loreft");
  CHECK(md.at("ortho") == "ortho::qr_retraction");
  CHECK(md.at("rank") == "4");
  CHECK(md.at("hidden_size") == "16");
  CHECK(md.at("layers") == "20");
  CHECK(md.at("modules") == "1");
  CHECK(md.at("positions") == "last_prompt_token");
  CHECK(md.at("stack_scale_a") == "0");
  CHECK(md.at("stack_scale_b") == "1");
  CHECK(md.at("dtype") == "F32");
  CHECK(md.at("model_fingerprint") == "smollm2-135m:q4_1:abc123");

  linear_loreft::module<float> back(d, 99);
  REQUIRE_FALSE(same_params(back.parameters(), m.parameters()));
  const adapter_info info = load_module(path, back, {.expected_fingerprint = "smollm2-135m:q4_1:abc123"});
  CHECK(same_params(back.parameters(), m.parameters()));
  CHECK(info.layers == std::vector<index_t>{20});
}

TEST_CASE("adapter io: multi-site stacks round-trip bitwise (mlp gate, K = 2, stack scale)", "[adapter_io]") {
  using stack = intervention_stack<gate::mlp<8, 4>, reft::loreft<4>>;
  temp_dir dir("grun_adapter_");
  const auto path = dir.path / "s.safetensors";
  const index_t d = 12;
  std::vector<stack> sites;
  for (int s = 0; s < 3; ++s) {
    stack st(d, 0.6, 0.6);
    st.append(100 + s);
    st.append(200 + s);
    sites.push_back(std::move(st));
  }
  adapter_info info;
  info.layers = {20, 25, 31};
  info.positions = "all";
  info.stack_scale_a = 0.6;
  info.stack_scale_b = 0.6;
  save_adapter(path, sites, info);

  const auto f = safetensors_file::read(path);
  CHECK(f.tensors().size() == 3 * 2 * (6 + 3));
  CHECK(f.at("layers.31.modules.1.gate_func.0.weight").shape == std::vector<index_t>{8, d});
  CHECK(f.at("layers.31.modules.1.gate_func.2.weight").shape == std::vector<index_t>{4, 8});
  CHECK(f.at("layers.31.modules.1.gate_func.4.weight").shape == std::vector<index_t>{1, 4});
  CHECK(f.at("layers.25.modules.0.gate_func.4.bias").shape == std::vector<index_t>{1});
  CHECK(f.metadata().at("layers") == "20,25,31");
  CHECK(f.metadata().at("modules") == "2");
  CHECK(f.metadata().at("gate") == "gate::mlp");

  const auto back = load_adapter<stack>(path);
  REQUIRE(back.sites.size() == 3);
  CHECK(back.info.layers == info.layers);
  CHECK(back.info.positions == "all");
  CHECK(back.info.stack_scale_a == 0.6);
  for (int s = 0; s < 3; ++s) {
    REQUIRE(back.sites[s].size() == 2);
    CHECK(back.sites[s].scale() == sites[s].scale());
    for (int k = 0; k < 2; ++k) CHECK(same_params(back.sites[s].module(k), sites[s].module(k)));
  }
  // from the file already read (a caller that looked at its metadata first): the same stacks
  const auto again = load_adapter<stack>(f);
  REQUIRE(again.sites.size() == 3);
  CHECK(again.info.layers == info.layers);
  for (int s = 0; s < 3; ++s)
    for (int k = 0; k < 2; ++k) CHECK(same_params(again.sites[s].module(k), sites[s].module(k)));
  // the loaded stack computes the same edit
  const index_t n = 3;
  std::vector<float> h(n * d), o1(n * d), o2(n * d), g1(2 * n), g2(2 * n);
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  for (auto& x : h) x = nd(rng);
  const auto pos = positions::all(n);
  sites[1].forward(exec::host, matrix_view<const float>(h.data(), {n, d}), pos, matrix_view<float>(o1.data(), {n, d}),
                   matrix_view<float>(g1.data(), {2, n}));
  back.sites[1].forward(exec::host, matrix_view<const float>(h.data(), {n, d}), pos,
                        matrix_view<float>(o2.data(), {n, d}), matrix_view<float>(g2.data(), {2, n}));
  CHECK(o1 == o2);
  CHECK(g1 == g2);

  // a stack scale that does not match info is refused
  adapter_info wrong = info;
  wrong.stack_scale_a = 0.0;
  REQUIRE_THROWS_CONTAINING(save_adapter(path, sites, wrong), shape_error, "stack scale");
}

TEST_CASE("adapter io: BF16 / F16 saves", "[adapter_io]") {
  temp_dir dir("grun_adapter_");
  const index_t d = 8;
  linear_loreft::module<float> m(d, 5);
  // make every parameter exactly representable in bf16 and f16 (few mantissa bits, moderate range)
  auto& own = m.owned_parameters();
  for (index_t i = 0; i < own.size(); ++i) own.data()[i] = std::ldexp(std::round(std::ldexp(own.data()[i], 6)), -6);
  for (st_dtype t : {st_dtype::bf16, st_dtype::f16}) {
    const auto path = dir.path / "h.safetensors";
    save_adapter(path, m, one_site(3), {.dtype = t});
    const auto f = safetensors_file::read(path);
    CHECK(f.at("layers.3.modules.0.weight").dtype == t);
    CHECK(f.metadata().at("dtype") == std::string(name_of(t)));
    linear_loreft::module<float> back(d, 77);
    load_module(path, back);
    CHECK(same_params(back.parameters(), m.parameters()));
  }
  // general values round to nearest even
  linear_loreft::module<float> g(d, 6);
  const auto path = dir.path / "r.safetensors";
  save_adapter(path, g, one_site(3), {.dtype = st_dtype::bf16});
  linear_loreft::module<float> back(d, 77);
  load_module(path, back);
  const auto& a = g.owned_parameters();
  const auto& b = back.owned_parameters();
  for (index_t i = 0; i < a.size(); ++i) REQUIRE(b.data()[i] == static_cast<float>(bfloat16(a.data()[i])));
  REQUIRE_THROWS_AS(save_adapter(path, g, one_site(3), {.dtype = st_dtype::i32}), format_error);
}

TEST_CASE("adapter io: loading checks kinds, rank, hidden size and fingerprint", "[adapter_io]") {
  temp_dir dir("grun_adapter_");
  const auto path = dir.path / "a.safetensors";
  linear_loreft::module<float> m(16, 1);
  save_adapter(path, m, one_site());

  SECTION("gate kind") {
    mlp_loreft::module<float> other(16, 1);
    REQUIRE_THROWS_CONTAINING(load_module(path, other), format_error,
                              "expected gate \"gate::mlp\", the file holds \"gate::linear\"");
  }
  SECTION("reft kind") {
    gated_intervention<gate::linear, reft::noreft<4>>::module<float> other(16, 1);
    REQUIRE_THROWS_CONTAINING(load_module(path, other), format_error,
                              "expected reft \"reft::noreft\", the file holds \"reft::loreft\"");
  }
  SECTION("rank") {
    gated_intervention<gate::linear, reft::loreft<2>>::module<float> other(16, 1);
    REQUIRE_THROWS_CONTAINING(load_module(path, other), shape_error, "expected rank 2, the file holds rank 4");
  }
  SECTION("hidden size") {
    linear_loreft::module<float> other(32, 1);
    REQUIRE_THROWS_CONTAINING(load_module(path, other), shape_error,
                              "expected hidden size 32, the file holds hidden size 16");
    using stack = intervention_stack<gate::linear, reft::loreft<4>>;
    REQUIRE_THROWS_AS(load_adapter<stack>(path, {}, 32), shape_error);
  }
  SECTION("fingerprint") {
    linear_loreft::module<float> other(16, 1);
    REQUIRE_THROWS_CONTAINING(load_module(path, other, {.expected_fingerprint = "llama-3.1-8b"}), format_error,
                              "expected model fingerprint \"llama-3.1-8b\", the adapter was trained on "
                              "\"smollm2-135m:q4_1:abc123\"");
    REQUIRE_NOTHROW(load_module(path, other));  // not checked unless asked
    // an unknown (empty) fingerprint passes only when the caller accepts unknown ones
    linear_loreft::module<float> m2(16, 1);
    auto info = one_site();
    info.model_fingerprint.clear();
    save_adapter(path, m2, info);
    REQUIRE_THROWS_CONTAINING(load_module(path, other, {.expected_fingerprint = "llama-3.1-8b"}), format_error,
                              "the adapter was trained on \"\"");
    REQUIRE_NOTHROW(load_module(path, other, {.expected_fingerprint = "llama-3.1-8b", .accept_unknown_fingerprint = true}));
  }
  SECTION("site and module index") {
    linear_loreft::module<float> other(16, 1);
    REQUIRE_THROWS_CONTAINING(load_module(path, other, {}, 7), format_error, "expected a site at layer 7");
    REQUIRE_THROWS_CONTAINING(load_module(path, other, {}, 20, 1), format_error, "module index");
  }
  SECTION("a plain safetensors file is not an adapter") {
    std::vector<float> v(4);
    write_safetensors(path, std::vector<tensor_record>{make_tensor<float>("x", {4}, v)});
    linear_loreft::module<float> other(16, 1);
    REQUIRE_THROWS_CONTAINING(load_module(path, other), format_error, "__metadata__[\"format\"]");
  }
}

TEST_CASE("adapter io: missing, unexpected, misshapen or non-finite tensors are rejected", "[adapter_io]") {
  temp_dir dir("grun_adapter_");
  const auto path = dir.path / "a.safetensors";
  const index_t d = 8;
  linear_loreft::module<float> m(d, 1);
  save_adapter(path, m, one_site());
  const auto good = safetensors_file::read(path);
  // Rebuild variants of the file from its records.
  auto rebuild = [&](auto&& edit) {
    std::vector<tensor_record> recs;
    for (const auto& t : good.tensors()) {
      const auto b = good.bytes(t);
      recs.push_back({t.name, t.dtype, t.shape, std::vector<std::byte>(b.begin(), b.end())});
    }
    metadata_map meta = good.metadata();
    edit(recs, meta);
    write_safetensors(path, recs, meta);
  };
  using stack = intervention_stack<gate::linear, reft::loreft<4>>;
  linear_loreft::module<float> other(d, 2);
  const auto before = other.owned_parameters();

  SECTION("missing tensor") {
    rebuild([](auto& recs, auto&) {
      std::erase_if(recs, [](const tensor_record& r) { return r.name.ends_with(".bias") && !r.name.ends_with("gate_func.bias"); });
    });
    REQUIRE_THROWS_CONTAINING(load_module(path, other), format_error, "layers.20.modules.0.bias");
    CHECK(same_bytes(other.owned_parameters(), before));  // untouched on failure
  }
  SECTION("unexpected extra tensor") {
    rebuild([](auto& recs, auto&) {
      recs.push_back(make_tensor<float>("layers.20.modules.0.extra", {1}, std::vector<float>{1.0f}));
    });
    REQUIRE_THROWS_CONTAINING(load_adapter<stack>(path), format_error, "unexpected tensor \"layers.20.modules.0.extra\"");
  }
  SECTION("rotate_layer stored [r, d] instead of pyreft's [d, r]") {
    rebuild([&](auto& recs, auto&) {
      for (auto& r : recs) if (r.name.ends_with("rotate_layer")) r.shape = {4, d};
    });
    REQUIRE_THROWS_CONTAINING(load_module(path, other), shape_error, "expected shape [8, 4], got [4, 8]");
  }
  SECTION("metadata says two modules, file holds one") {
    rebuild([](auto&, auto& meta) { meta["modules"] = "2"; });
    REQUIRE_THROWS_CONTAINING(load_adapter<stack>(path), format_error, "layers.20.modules.1.");
  }
  SECTION("malformed metadata numbers") {
    rebuild([](auto&, auto& meta) { meta["rank"] = "4x"; });
    REQUIRE_THROWS_CONTAINING(load_module(path, other), format_error, "__metadata__[\"rank\"]: expected an integer");
  }
  SECTION("a hidden size the file's data cannot hold is refused before anything is sized by it") {
    rebuild([](auto&, auto& meta) { meta["hidden_size"] = "1000000000000"; });
    REQUIRE_THROWS_CONTAINING(load_adapter<stack>(path), format_error, "hidden_size 1000000000000 at rank 4 needs more");
    rebuild([](auto&, auto& meta) { meta["hidden_size"] = "2305843009213693952"; });  // 2^61: r·d overflows
    REQUIRE_THROWS_AS(load_adapter<stack>(path), format_error);
  }
  SECTION("a layer listed twice") {
    rebuild([](auto&, auto& meta) { meta["layers"] = "20,20"; });
    REQUIRE_THROWS_CONTAINING(load_adapter<stack>(path), format_error, "expected each layer once, got layer 20 twice");
  }
  SECTION("NaN parameter") {
    rebuild([](auto& recs, auto&) {
      for (auto& r : recs)
        if (r.name.ends_with("modules.0.weight")) {
          const float nan = std::nanf("");
          std::memcpy(r.bytes.data() + 4, &nan, 4);
        }
    });
    REQUIRE_THROWS_AS(load_module(path, other), numeric_error);
    CHECK(same_bytes(other.owned_parameters(), before));
  }
}

TEST_CASE("adapter io: householder saves R for pyreft and the raw vectors for itself", "[adapter_io]") {
  using hh = gated_intervention<gate::linear, reft::loreft<4>, ortho::householder>;
  temp_dir dir("grun_adapter_");
  const auto path = dir.path / "h.safetensors";
  const index_t d = 10;
  hh::module<double> m(d, 4);
  save_adapter(path, m, one_site(), {.dtype = st_dtype::f64});
  const auto f = safetensors_file::read(path);
  CHECK(f.at("layers.20.modules.0.rotate_layer_raw").shape == std::vector<index_t>{4, d});
  const auto rt = decode<double>(f, "layers.20.modules.0.rotate_layer");
  const auto R = m.rotation();  // materialized [r, d]
  for (index_t i = 0; i < 4; ++i)
    for (index_t j = 0; j < d; ++j) REQUIRE(rt[std::size_t(j * 4 + i)] == R(i, j));

  hh::module<double> back(d, 8);
  load_module(path, back);
  CHECK(same_params(back.parameters(), m.parameters()));
  // a QR-retraction module reads the materialized R
  linear_loreft::module<double> qr(d, 8);
  load_module(path, qr);
  for (index_t i = 0; i < 4; ++i)
    for (index_t j = 0; j < d; ++j) REQUIRE(qr.parameters().reft.rotate_layer(i, j) == R(i, j));
  // and a householder module cannot load a file without raw vectors
  const auto p2 = dir.path / "q.safetensors";
  save_adapter(p2, qr, one_site());
  REQUIRE_THROWS_CONTAINING(load_module(p2, back), format_error, "rotate_layer_raw");
}

TEST_CASE("adapter io: gate::always and direft have their own key sets", "[adapter_io]") {
  temp_dir dir("grun_adapter_");
  const auto path = dir.path / "x.safetensors";
  gated_intervention<gate::always, reft::loreft<2>>::module<float> plain(6, 1);
  save_adapter(path, plain, one_site(1));
  const auto f = safetensors_file::read(path);
  CHECK(f.tensors().size() == 3);
  CHECK(f.find("layers.1.modules.0.gate_func.weight") == nullptr);
  gated_intervention<gate::always, reft::loreft<2>>::module<float> back(6, 2);
  load_module(path, back);
  CHECK(same_params(back.parameters(), plain.parameters()));

  gated_intervention<gate::linear, reft::direft<3>>::module<float> di(6, 1);
  save_adapter(path, di, one_site(1));
  const auto g = safetensors_file::read(path);
  CHECK(g.at("layers.1.modules.0.rotate_layer").shape == std::vector<index_t>{6, 3});
  CHECK(g.metadata().at("ortho") == "ortho::none");
  gated_intervention<gate::linear, reft::direft<3>>::module<float> di2(6, 2);
  load_module(path, di2);
  CHECK(same_params(di2.parameters(), di.parameters()));
}

TEST_CASE("adapter io: bad save requests and unwritable paths", "[adapter_io]") {
  temp_dir dir("grun_adapter_");
  linear_loreft::module<float> m(8, 1);
  adapter_info none;
  REQUIRE_THROWS_AS(save_adapter(dir.path / "a.safetensors", m, none), shape_error);  // no layer
  adapter_info bad = one_site();
  bad.positions = "every_other";
  REQUIRE_THROWS_CONTAINING(save_adapter(dir.path / "a.safetensors", m, bad), format_error, "positions");
  const auto p = dir.path / "missing_dir" / "a.safetensors";
  REQUIRE_THROWS_CONTAINING(save_adapter(p, m, one_site()), grun::error, p.string());
  CHECK(dir.entries() == 0);
}

TEST_CASE("adapter io: half parameters' AdamW state is saved in fp32; files with half moments still load",
          "[adapter_io][optim]") {
  temp_dir dir("grun_adapter_");
  using params = linear_loreft::params<half>;
  linear_loreft::module<half> m(8, 1);
  auto& grads = m.owned_gradients();
  for (index_t i = 0; i < grads.size(); ++i) grads.data()[i] = store<half>(0.01f * float(i % 7) - 0.02f);
  optim::adamw<params> opt(m.parameters(), {.lr = 1e-2});
  for (int t = 0; t < 3; ++t) opt.step(m.parameters(), m.gradients());
  const auto now = dir.path / "now.safetensors";
  save_optimizer_state(now, opt);
  const auto f = safetensors_file::read(now);
  for (const auto& t : f.tensors()) CHECK(t.dtype == st_dtype::f32);

  // What save_optimizer_state wrote before the moments moved to acc_t: the same keys and metadata,
  // the moments in the parameters' dtype (f16).
  std::vector<tensor_record> records;
  for (const char* prefix : {"m.", "v."}) {
    const auto& state = std::string(prefix) == "m." ? opt.first_moment() : opt.second_moment();
    index_t i = 0;
    for (const auto& leaf : state.leaves())
      records.push_back(make_tensor<float>(prefix + std::to_string(i++), leaf.shape(),
                                           std::span<const float>(leaf.data, std::size_t(leaf.size())), st_dtype::f16));
  }
  const auto old = dir.path / "old.safetensors";
  write_safetensors(old, records, f.metadata());
  optim::adamw<params> resumed(m.parameters(), {.lr = 1e-2});
  load_optimizer_state(old, resumed);
  CHECK(resumed.steps() == 3);
  const float* a = resumed.first_moment().data();
  const float* b = opt.first_moment().data();
  const float* va = resumed.second_moment().data();
  const float* vb = opt.second_moment().data();
  for (index_t i = 0; i < opt.first_moment().size(); ++i) {
    INFO("element " << i);
    CHECK(a[i] == load<float>(store<half>(b[i])));  // the f16 file's values, widened exactly
    CHECK(va[i] == load<float>(store<half>(vb[i])));
  }
}

TEST_CASE("adapter io: AdamW state round-trips and training resumes bit for bit", "[adapter_io][optim]") {
  temp_dir dir("grun_adapter_");
  const auto path = dir.path / "opt.safetensors";
  using params = linear_loreft::params<float>;
  linear_loreft::module<float> m(8, 1);
  auto& grads = m.owned_gradients();
  for (index_t i = 0; i < grads.size(); ++i) grads.data()[i] = 0.01f * float(i % 7) - 0.02f;
  optim::adamw<params> opt(m.parameters(), {.lr = 1e-2});
  for (int t = 0; t < 3; ++t) opt.step(m.parameters(), m.gradients());
  save_optimizer_state(path, opt);

  optim::adamw<params> resumed(m.parameters(), {.lr = 1e-2});
  load_optimizer_state(path, resumed);
  CHECK(resumed.steps() == 3);
  CHECK(same_bytes(resumed.first_moment(), opt.first_moment()));
  CHECK(same_bytes(resumed.second_moment(), opt.second_moment()));
  linear_loreft::module<float> copy(8, 1);
  copy.owned_parameters() = m.owned_parameters();
  opt.step(m.parameters(), m.gradients());
  resumed.step(copy.parameters(), m.gradients());
  CHECK(same_bytes(copy.owned_parameters(), m.owned_parameters()));

  // a state for another shape is refused and leaves the optimizer untouched
  linear_loreft::module<float> wide(16, 1);
  optim::adamw<params> other(wide.parameters());
  REQUIRE_THROWS_AS(load_optimizer_state(path, other), shape_error);
  CHECK(other.steps() == 0);
  REQUIRE_THROWS_CONTAINING(load_optimizer_state(dir.path / "nope", other), grun::error, "nope");
}
