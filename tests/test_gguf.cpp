// tests/test_gguf.cpp — the GGUF reader: one crafted file per validation rule, dequantization of
// hand-computed blocks, a mutation fuzz loop, and the real example model when it is present.
#include <catch2/catch.hpp>

#include <grun/io/gguf.hpp>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <vector>

using namespace grun::io;
using Catch::Matchers::Contains;

namespace {

// ---- a small GGUF writer for crafted files ---------------------------------------------------
using bytes = std::vector<std::byte>;

template <class U>
void put(bytes& b, U v) {
  const auto* p = reinterpret_cast<const std::byte*>(&v);
  b.insert(b.end(), p, p + sizeof(U));
}
void put_str(bytes& b, std::string_view s) {
  put<std::uint64_t>(b, s.size());
  const auto* p = reinterpret_cast<const std::byte*>(s.data());
  b.insert(b.end(), p, p + s.size());
}
void put_raw(bytes& b, const bytes& r) { b.insert(b.end(), r.begin(), r.end()); }

constexpr std::uint32_t t_u8 = 0, t_i8 = 1, t_u32 = 4, t_i32 = 5, t_f32 = 6, t_bool = 7, t_str = 8, t_arr = 9,
                        t_u64 = 10, t_i64 = 11;

struct kv {
  std::string key;
  std::uint32_t type;
  bytes payload;  // everything after the type id
};
template <class U>
kv kv_scalar(std::string key, std::uint32_t type, U v) {
  kv k{std::move(key), type, {}};
  put<U>(k.payload, v);
  return k;
}
kv kv_str(std::string key, std::string_view s) {
  kv k{std::move(key), t_str, {}};
  put_str(k.payload, s);
  return k;
}
kv kv_str_array(std::string key, const std::vector<std::string>& v) {
  kv k{std::move(key), t_arr, {}};
  put<std::uint32_t>(k.payload, t_str);
  put<std::uint64_t>(k.payload, v.size());
  for (const auto& s : v) put_str(k.payload, s);
  return k;
}
template <class U>
kv kv_array(std::string key, std::uint32_t elem_type, const std::vector<U>& v) {
  kv k{std::move(key), t_arr, {}};
  put<std::uint32_t>(k.payload, elem_type);
  put<std::uint64_t>(k.payload, v.size());
  for (auto x : v) put<U>(k.payload, x);
  return k;
}

struct tensor_spec {
  std::string name;
  std::vector<std::int64_t> dims;
  std::uint32_t type;
  bytes data;
  std::optional<std::uint64_t> offset;  // default: the running aligned sum
};

struct crafted {
  char magic[4] = {'G', 'G', 'U', 'F'};
  std::uint32_t version = 3;
  std::vector<kv> kvs;
  std::vector<tensor_spec> tensors;
  std::uint64_t alignment = 32;  // the layout the writer uses (set general.alignment yourself)
  std::optional<std::uint64_t> n_tensors, n_kv;

  bytes build() const {
    bytes b;
    b.insert(b.end(), reinterpret_cast<const std::byte*>(magic), reinterpret_cast<const std::byte*>(magic) + 4);
    put<std::uint32_t>(b, version);
    put<std::uint64_t>(b, n_tensors.value_or(tensors.size()));
    put<std::uint64_t>(b, n_kv.value_or(kvs.size()));
    for (const auto& k : kvs) {
      put_str(b, k.key);
      put<std::uint32_t>(b, k.type);
      put_raw(b, k.payload);
    }
    const auto pad = [&](std::uint64_t x) { return (x + alignment - 1) / alignment * alignment; };
    std::uint64_t running = 0;
    for (const auto& t : tensors) {
      put_str(b, t.name);
      put<std::uint32_t>(b, static_cast<std::uint32_t>(t.dims.size()));
      for (auto d : t.dims) put<std::int64_t>(b, d);
      put<std::uint32_t>(b, t.type);
      put<std::uint64_t>(b, t.offset.value_or(running));
      running += pad(t.data.size());
    }
    b.resize(pad(b.size()));
    for (const auto& t : tensors) {
      put_raw(b, t.data);
      b.resize(pad(b.size()));
    }
    return b;
  }
  gguf_file open() const { return gguf_file::from_bytes(build()); }
};

std::byte operator""_b(unsigned long long v) { return static_cast<std::byte>(v); }

bytes f32_bytes(std::initializer_list<float> v) {
  bytes b;
  for (float x : v) put<float>(b, x);
  return b;
}
bytes u16_bytes(std::initializer_list<std::uint16_t> v) {
  bytes b;
  for (auto x : v) put<std::uint16_t>(b, x);
  return b;
}

// Hand-made blocks with known values (fp16: 0x3800 = 0.5, 0x3400 = 0.25, 0xBC00 = −1, 0x3C00 = 1).
bytes q8_0_block(std::uint16_t d_bits, int first) {  // q_i = first + i
  bytes b;
  put<std::uint16_t>(b, d_bits);
  for (int i = 0; i < 32; ++i) b.push_back(static_cast<std::byte>(static_cast<std::int8_t>(first + i)));
  return b;
}
bytes nibbles() {  // byte j: low nibble j, high nibble 15 − j
  bytes b;
  for (int j = 0; j < 16; ++j) b.push_back(static_cast<std::byte>(j | ((15 - j) << 4)));
  return b;
}
bytes q4_0_block() {
  bytes b;
  put<std::uint16_t>(b, 0x3400);  // d = 0.25
  put_raw(b, nibbles());
  return b;
}
bytes q4_1_block() {
  bytes b;
  put<std::uint16_t>(b, 0x3800);  // d = 0.5
  put<std::uint16_t>(b, 0xBC00);  // m = −1
  put_raw(b, nibbles());
  return b;
}

/// A valid file using every dequantizable type, a few metadata kinds and two rows where it matters.
crafted valid_file() {
  crafted f;
  f.kvs.push_back(kv_str("general.architecture", "llama"));
  f.kvs.push_back(kv_scalar<std::uint32_t>("llama.block_count", t_u32, 2));
  f.kvs.push_back(kv_scalar<float>("llama.rope.freq_base", t_f32, 10000.0f));
  f.kvs.push_back(kv_scalar<std::uint8_t>("tokenizer.ggml.add_bos_token", t_bool, 1));
  f.kvs.push_back(kv_scalar<std::int32_t>("test.negative", t_i32, -5));
  f.kvs.push_back(kv_str_array("tokenizer.ggml.tokens", {"<unk>", "a", "b c"}));
  f.kvs.push_back(kv_array<std::int32_t>("tokenizer.ggml.token_type", t_i32, {2, 1, 1}));
  f.kvs.push_back(kv_array<float>("test.floats", t_f32, {0.5f, -1.25f}));
  f.kvs.push_back(kv_str("tokenizer.chat_template", "{{ bos_token }}{% for m in messages %}%s%n{{ m['content'] }}{% endfor %}"));
  bytes q8 = q8_0_block(0x3800, -16);
  put_raw(q8, q8_0_block(0x3C00, 0));
  bytes q41 = q4_1_block();
  put_raw(q41, q4_1_block());
  f.tensors.push_back({"w.f32", {3, 2}, 0, f32_bytes({1, 2, 3, -4, 5.5f, 1e-3f}), {}});
  f.tensors.push_back({"w.q8_0", {32, 2}, 8, q8, {}});
  f.tensors.push_back({"w.q4_0", {32}, 2, q4_0_block(), {}});
  f.tensors.push_back({"w.q4_1", {64}, 3, q41, {}});
  f.tensors.push_back({"w.f16", {4}, 1, u16_bytes({0x3C00, 0xC000, 0x7BFF, 0x0001}), {}});
  f.tensors.push_back({"w.bf16", {3}, 30, u16_bytes({0x3F80, 0xC040, 0x4049}), {}});
  return f;
}

void require_rule(const crafted& f, const std::string& rule) {
  REQUIRE_THROWS_AS(f.open(), grun::format_error);
  REQUIRE_THROWS_WITH(f.open(), Contains(rule));
}
void require_rule(const bytes& b, const std::string& rule) {
  REQUIRE_THROWS_AS(gguf_file::from_bytes(b), grun::format_error);
  REQUIRE_THROWS_WITH(gguf_file::from_bytes(b), Contains(rule));
}

constexpr std::uint64_t huge = std::uint64_t(1) << 62;

}  // namespace

// ---- the valid file ---------------------------------------------------------------------------
TEST_CASE("gguf: a valid crafted file reads back", "[gguf]") {
  const crafted c = valid_file();
  const gguf_file f = c.open();
  CHECK(f.version() == 3);
  CHECK(f.alignment() == 32);
  CHECK(f.data_offset() % 32 == 0);
  CHECK(f.has("general.architecture"));
  CHECK_FALSE(f.has("general.nope"));
  CHECK(f.get_string("general.architecture") == "llama");
  CHECK(f.get_uint("llama.block_count") == 2);
  CHECK(f.get_int("test.negative") == -5);
  CHECK(f.get_float("llama.rope.freq_base") == 10000.0);
  CHECK(f.get_bool("tokenizer.ggml.add_bos_token"));
  CHECK(f.get_string_array("tokenizer.ggml.tokens") == std::vector<std::string>{"<unk>", "a", "b c"});
  CHECK(f.get_int_array("tokenizer.ggml.token_type") == std::vector<std::int64_t>{2, 1, 1});
  CHECK(f.get_float_array("test.floats") == std::vector<double>{0.5, -1.25});
  CHECK(f.keys().size() == c.kvs.size());
  CHECK(f.keys().front() == "general.architecture");
  // Metadata strings are data: format characters and template syntax come back verbatim.
  CHECK(f.get_string("tokenizer.chat_template") ==
        "{{ bos_token }}{% for m in messages %}%s%n{{ m['content'] }}{% endfor %}");

  REQUIRE(f.tensors().size() == 6);
  const auto& q8 = f.tensor("w.q8_0");
  CHECK(q8.shape == std::vector<std::int64_t>{32, 2});
  CHECK(q8.type == gguf_type::Q8_0);
  CHECK(q8.nbytes == 68);
  CHECK(q8.offset == 32);  // after w.f32's 24 bytes padded to 32
  CHECK(q8.n_elements() == 64);
  CHECK(f.tensor_bytes(q8).size() == 68);
  CHECK(f.find("w.none") == nullptr);
  CHECK(name_of(gguf_type::Q4_1) == "Q4_1");
  CHECK(block_size(gguf_type::Q4_K) == 256);
  CHECK(type_size(gguf_type::Q8_0) == 34);
}

TEST_CASE("gguf: version 2 files and a custom alignment are accepted", "[gguf]") {
  crafted c = valid_file();
  c.version = 2;
  c.alignment = 64;
  c.kvs.push_back(kv_scalar<std::uint32_t>("general.alignment", t_u32, 64));
  const gguf_file f = c.open();
  CHECK(f.version() == 2);
  CHECK(f.alignment() == 64);
  CHECK(f.data_offset() % 64 == 0);
  CHECK(f.tensor("w.q8_0").offset == 64);
  CHECK(f.dequantize(f.tensor("w.f32")) == std::vector<float>{1, 2, 3, -4, 5.5f, 1e-3f});
}

TEST_CASE("gguf: a file with no tensors and no padding is valid", "[gguf]") {
  crafted c;
  c.kvs.push_back(kv_str("general.architecture", "llama"));
  bytes b = c.build();  // the writer pads the header to 32; cut the padding
  const std::size_t unpadded = 24 + 8 + 20 + 4 + 8 + 5;
  REQUIRE(b.size() >= unpadded);
  b.resize(unpadded);
  const auto f = gguf_file::from_bytes(b);
  CHECK(f.tensors().empty());
}

// ---- dequantization against hand-computed blocks ---------------------------------------------
TEST_CASE("gguf: dequantization of each type matches hand-computed values", "[gguf][dequant]") {
  const gguf_file f = valid_file().open();

  SECTION("F32") { CHECK(f.dequantize(f.tensor("w.f32")) == std::vector<float>{1, 2, 3, -4, 5.5f, 1e-3f}); }
  SECTION("F16") {
    const auto x = f.dequantize(f.tensor("w.f16"));
    CHECK(x == std::vector<float>{1.0f, -2.0f, 65504.0f, std::ldexp(1.0f, -24)});
  }
  SECTION("BF16") { CHECK(f.dequantize(f.tensor("w.bf16")) == std::vector<float>{1.0f, -3.0f, 3.140625f}); }
  SECTION("Q8_0: x = d·q, two rows with their own scales") {
    const auto x = f.dequantize(f.tensor("w.q8_0"));
    REQUIRE(x.size() == 64);
    for (int i = 0; i < 32; ++i) {
      CHECK(x[i] == 0.5f * static_cast<float>(i - 16));
      CHECK(x[32 + i] == 1.0f * static_cast<float>(i));
    }
  }
  SECTION("Q4_0: x = (q − 8)·d, low nibbles first") {
    const auto x = f.dequantize(f.tensor("w.q4_0"));
    REQUIRE(x.size() == 32);
    for (int j = 0; j < 16; ++j) {
      CHECK(x[j] == 0.25f * static_cast<float>(j - 8));
      CHECK(x[16 + j] == 0.25f * static_cast<float>((15 - j) - 8));
    }
  }
  SECTION("Q4_1: x = q·d + m, low nibbles first") {
    const auto x = f.dequantize(f.tensor("w.q4_1"));
    REQUIRE(x.size() == 64);
    for (int blk = 0; blk < 2; ++blk)
      for (int j = 0; j < 16; ++j) {
        CHECK(x[32 * blk + j] == 0.5f * static_cast<float>(j) - 1.0f);
        CHECK(x[32 * blk + 16 + j] == 0.5f * static_cast<float>(15 - j) - 1.0f);
      }
  }
  SECTION("a tensor_info that is not this file's is rejected, not read out of bounds") {
    gguf_tensor_info forged = f.tensor("w.q4_0");
    forged.nbytes = 1u << 30;
    CHECK_THROWS_WITH(f.tensor_bytes(forged), Contains("GGUF tensor data") && Contains("w.q4_0"));
    forged = f.tensor("w.q4_0");
    forged.shape = {std::int64_t(1) << 40};
    CHECK_THROWS_AS(f.dequantize(forged), grun::format_error);
    forged.name = "elsewhere";
    CHECK_THROWS_AS(f.tensor_bytes(forged), grun::format_error);
  }
  SECTION("dequantize_into checks the output size") {
    std::vector<float> out(31);
    CHECK_THROWS_AS(f.dequantize_into(f.tensor("w.q4_0"), out), grun::shape_error);
    out.resize(32);
    f.dequantize_into(f.tensor("w.q4_0"), out);
    CHECK(out[0] == -2.0f);
  }
}

TEST_CASE("gguf: types without a decoder parse but refuse to dequantize", "[gguf][dequant]") {
  crafted c;
  c.tensors.push_back({"k", {256}, 12, bytes(144), {}});  // Q4_K, one 256-element super-block
  const auto f = c.open();
  CHECK(f.tensor("k").type == gguf_type::Q4_K);
  CHECK(f.tensor("k").nbytes == 144);
  CHECK_THROWS_WITH(f.dequantize(f.tensor("k")), Contains("GGUF dequantize") && Contains("Q4_K"));
}

// ---- one crafted file per rule -----------------------------------------------------------------
TEST_CASE("gguf rule: magic", "[gguf][rules]") {
  crafted c = valid_file();
  std::memcpy(c.magic, "GGML", 4);
  require_rule(c, "GGUF magic");
  require_rule(bytes{}, "GGUF magic");
  require_rule(bytes{0x47_b, 0x47_b}, "GGUF magic");  // "GG": shorter than the magic
}

TEST_CASE("gguf rule: version is 2 or 3", "[gguf][rules]") {
  crafted c = valid_file();
  c.version = 1;
  require_rule(c, "GGUF version: expected 2 or 3, got 1");
  c.version = 4;
  require_rule(c, "GGUF version: expected 2 or 3, got 4");
  c.version = 0x03000000;
  require_rule(c, "big-endian");
  bytes b = valid_file().build();
  b.resize(6);
  require_rule(b, "GGUF truncated file");
}

TEST_CASE("gguf rule: tensor and key counts are bounded by the bytes that remain", "[gguf][rules]") {
  crafted c = valid_file();
  c.n_tensors = huge;
  require_rule(c, "GGUF tensor count");
  c = valid_file();
  c.n_tensors = std::numeric_limits<std::uint64_t>::max();
  require_rule(c, "GGUF tensor count");
  c = valid_file();
  c.n_kv = huge;
  require_rule(c, "GGUF key count");
  c = valid_file();
  c.n_kv = c.kvs.size() + 1;  // one more than present: the parser runs into the tensor directory
  REQUIRE_THROWS_AS(c.open(), grun::format_error);
}

TEST_CASE("gguf rule: string lengths are bounded by the bytes that remain", "[gguf][rules]") {
  crafted c = valid_file();
  bytes b = c.build();
  // The first key's length field sits right after the 24-byte header.
  const std::uint64_t bad = std::numeric_limits<std::uint64_t>::max();
  std::memcpy(b.data() + 24, &bad, 8);
  require_rule(b, "GGUF string length");

  c = valid_file();
  kv k{"x.str", t_str, {}};
  put<std::uint64_t>(k.payload, huge);  // value string longer than the file
  c.kvs.insert(c.kvs.begin(), k);
  require_rule(c, "GGUF string length");

  // A tensor name length pointing past the end: patch the 8 bytes before the name "w.f32".
  crafted d = valid_file();
  d.tensors.resize(1);
  bytes b2 = d.build();
  const std::string needle = "w.f32";
  auto it = std::search(b2.begin(), b2.end(), reinterpret_cast<const std::byte*>(needle.data()),
                        reinterpret_cast<const std::byte*>(needle.data()) + needle.size());
  REQUIRE(it != b2.end());
  const std::uint64_t long_name = 1u << 20;
  std::memcpy(&*(it - 8), &long_name, 8);
  require_rule(b2, "GGUF string length");
}

TEST_CASE("gguf rule: array counts are bounded by the bytes that remain", "[gguf][rules]") {
  crafted c = valid_file();
  kv k{"x.arr", t_arr, {}};
  put<std::uint32_t>(k.payload, t_str);
  put<std::uint64_t>(k.payload, huge);  // 2^62 strings: would be a 2^67-byte allocation
  c.kvs.insert(c.kvs.begin(), k);
  require_rule(c, "GGUF array count");

  c = valid_file();
  kv k2{"x.arr", t_arr, {}};
  put<std::uint32_t>(k2.payload, t_u64);
  put<std::uint64_t>(k2.payload, std::numeric_limits<std::uint64_t>::max() / 8 + 1);  // count·8 wraps around
  c.kvs.push_back(k2);
  require_rule(c, "GGUF array count");

  c = valid_file();
  kv k3{"x.arr", t_arr, {}};
  put<std::uint32_t>(k3.payload, t_arr);  // array of arrays, each at least 12 bytes
  put<std::uint64_t>(k3.payload, huge);
  c.kvs.push_back(k3);
  require_rule(c, "GGUF array count");
}

TEST_CASE("gguf rule: nested arrays are bounded in depth", "[gguf][rules]") {
  const auto nested = [](int depth) {
    kv k{"x.nested", t_arr, {}};
    for (int i = 1; i < depth; ++i) {
      put<std::uint32_t>(k.payload, t_arr);
      put<std::uint64_t>(k.payload, 1);
    }
    put<std::uint32_t>(k.payload, t_u8);
    put<std::uint64_t>(k.payload, 2);
    k.payload.push_back(1_b);
    k.payload.push_back(2_b);
    return k;
  };
  crafted c = valid_file();
  c.kvs.push_back(nested(gguf_max_array_depth));
  const auto f = c.open();
  CHECK(f.value("x.nested").type_name() == "array of array");
  CHECK_THROWS_WITH(f.get_int_array("x.nested"), Contains("expected array of integers, got array of array"));
  c = valid_file();
  c.kvs.push_back(nested(gguf_max_array_depth + 1));
  require_rule(c, "GGUF array nesting");
  c = valid_file();
  c.kvs.push_back(nested(100000));
  require_rule(c, "GGUF array nesting");
}

TEST_CASE("gguf rule: value types are known", "[gguf][rules]") {
  crafted c = valid_file();
  c.kvs.push_back(kv_scalar<std::uint32_t>("x.bad", 13, 0));
  require_rule(c, "GGUF value type");
  c = valid_file();
  kv k{"x.arr", t_arr, {}};
  put<std::uint32_t>(k.payload, 0xffffffffu);
  put<std::uint64_t>(k.payload, 0);
  c.kvs.push_back(k);
  require_rule(c, "GGUF value type");
}

TEST_CASE("gguf rule: bool values are 0 or 1", "[gguf][rules]") {
  crafted c = valid_file();
  c.kvs.push_back(kv_scalar<std::uint8_t>("x.flag", t_bool, 2));
  require_rule(c, "GGUF bool value");
}

TEST_CASE("gguf rule: duplicate keys are rejected", "[gguf][rules]") {
  crafted c = valid_file();
  c.kvs.push_back(kv_str("general.architecture", "gpt2"));
  require_rule(c, "GGUF duplicate key");
  require_rule(c, "general.architecture");
}

TEST_CASE("gguf rule: general.alignment is a non-zero power of two integer", "[gguf][rules]") {
  for (std::uint32_t a : {0u, 3u, 48u}) {
    crafted c = valid_file();
    c.kvs.push_back(kv_scalar<std::uint32_t>("general.alignment", t_u32, a));
    require_rule(c, "GGUF alignment");
  }
  crafted c = valid_file();
  c.kvs.push_back(kv_str("general.alignment", "32"));
  require_rule(c, "GGUF alignment: expected general.alignment to be an integer, got string");
  c = valid_file();
  c.kvs.push_back(kv_scalar<std::int64_t>("general.alignment", t_i64, -32));
  require_rule(c, "GGUF alignment");
  c = valid_file();  // an enormous power of two: the data section starts past the file's end
  c.kvs.push_back(kv_scalar<std::uint64_t>("general.alignment", t_u64, std::uint64_t(1) << 63));
  REQUIRE_THROWS_AS(c.open(), grun::format_error);
}

TEST_CASE("gguf rule: 1 <= n_dims <= 4", "[gguf][rules]") {
  crafted c = valid_file();
  c.tensors[0].dims = {1, 1, 1, 1, 6};
  require_rule(c, "GGUF n_dims");
  c.tensors[0].dims = {};
  require_rule(c, "GGUF n_dims");
  c = valid_file();
  c.tensors[0].dims = {3, 1, 1, 2};  // four is fine
  CHECK(c.open().tensor("w.f32").n_elements() == 6);
}

TEST_CASE("gguf rule: dimensions are non-negative", "[gguf][rules]") {
  crafted c = valid_file();
  c.tensors[0].dims = {3, -2};
  require_rule(c, "GGUF dimension");
  c.tensors[0].dims = {std::numeric_limits<std::int64_t>::min()};
  require_rule(c, "GGUF dimension");
}

TEST_CASE("gguf rule: element counts do not overflow", "[gguf][rules]") {
  crafted c = valid_file();
  c.tensors[0].dims = {std::int64_t(1) << 40, std::int64_t(1) << 40};
  require_rule(c, "GGUF element count");
  c.tensors[0].dims = {std::numeric_limits<std::int64_t>::max(), 2};
  require_rule(c, "GGUF element count");
  c.tensors[0].dims = {std::int64_t(1) << 31, std::int64_t(1) << 31, 2};  // exactly 2^63
  require_rule(c, "GGUF element count");
}

TEST_CASE("gguf rule: byte counts do not overflow", "[gguf][rules]") {
  crafted c = valid_file();
  c.tensors[0].type = 28;  // F64: 2^62 elements fit int64, 2^65 bytes do not fit uint64
  c.tensors[0].dims = {std::int64_t(1) << 62};
  require_rule(c, "GGUF byte count");
}

TEST_CASE("gguf rule: tensor types are known", "[gguf][rules]") {
  for (std::uint32_t t : {4u, 5u, 31u, 36u, 40u, 1000u, 0xffffffffu}) {
    crafted c = valid_file();
    c.tensors[0].type = t;
    require_rule(c, "GGUF tensor type");
  }
  crafted c = valid_file();
  c.tensors[0].type = 4;
  require_rule(c, "removed");
}

TEST_CASE("gguf rule: the row length is a multiple of the block size", "[gguf][rules]") {
  crafted c = valid_file();
  c.tensors[1].dims = {16, 4};  // Q8_0: 64 elements, but rows of 16
  require_rule(c, "GGUF block size: tensor 'w.q8_0': expected the row length ne[0] to be a multiple of 32 for type Q8_0, got 16");
  c = valid_file();
  c.tensors[2].dims = {31};  // Q4_0
  require_rule(c, "GGUF block size");
  c = valid_file();
  c.tensors.push_back({"k", {255}, 14, bytes(210), {}});  // Q6_K: 256
  require_rule(c, "GGUF block size");
}

TEST_CASE("gguf rule: each offset equals the running aligned sum", "[gguf][rules]") {
  crafted c = valid_file();
  c.tensors[0].offset = 32;  // a gap before the first tensor
  require_rule(c, "GGUF tensor offset: tensor 'w.f32': expected offset 0");
  c = valid_file();
  c.tensors[1].offset = 24;  // unpadded
  require_rule(c, "GGUF tensor offset");
  c = valid_file();
  c.tensors[2].offset = 0;  // overlapping
  require_rule(c, "GGUF tensor offset");
  c = valid_file();
  c.tensors[3].offset = std::numeric_limits<std::uint64_t>::max() - 3;
  require_rule(c, "GGUF tensor offset");
}

TEST_CASE("gguf rule: tensor data lies inside the file", "[gguf][rules]") {
  bytes b = valid_file().build();
  b.resize(b.size() - 40);  // cut into the last tensor
  require_rule(b, "GGUF tensor data");
  // A big tensor with a consistent directory but no data.
  crafted c = valid_file();
  c.tensors.push_back({"big", {std::int64_t(1) << 40}, 0, bytes{}, {}});
  require_rule(c, "GGUF tensor data: tensor 'big'");
  // Trailing padding after the last tensor is optional.
  bytes ok = valid_file().build();
  const gguf_file f = gguf_file::from_bytes(ok);
  const auto& last = f.tensors().back();
  ok.resize(f.data_offset() + last.offset + last.nbytes);
  CHECK_NOTHROW(gguf_file::from_bytes(ok));
}

TEST_CASE("gguf rule: duplicate tensor names are rejected", "[gguf][rules]") {
  crafted c = valid_file();
  c.tensors[2].name = "w.f32";
  require_rule(c, "GGUF duplicate tensor");
  require_rule(c, "w.f32");
}

TEST_CASE("gguf: getters name the key, the wanted type and the type found", "[gguf]") {
  const gguf_file f = valid_file().open();
  CHECK_THROWS_AS(f.get_string("general.missing"), grun::format_error);
  CHECK_THROWS_WITH(f.get_string("general.missing"), Contains("general.missing") && Contains("no such key"));
  CHECK_THROWS_WITH(f.get_string("llama.block_count"), Contains("'llama.block_count'") && Contains("expected string, got uint32"));
  CHECK_THROWS_WITH(f.get_uint("general.architecture"), Contains("expected an unsigned integer, got string"));
  CHECK_THROWS_WITH(f.get_uint("test.negative"), Contains("non-negative"));
  CHECK_THROWS_WITH(f.get_float("llama.block_count"), Contains("expected float32 or float64, got uint32"));
  CHECK_THROWS_WITH(f.get_string_array("tokenizer.ggml.token_type"), Contains("expected array of string, got array of int32"));
  CHECK_THROWS_WITH(f.get_int_array("tokenizer.ggml.tokens"), Contains("got array of string"));
  CHECK_THROWS_WITH(f.get_float_array("general.architecture"), Contains("got string"));
  CHECK_THROWS_WITH(f.get_bool("llama.block_count"), Contains("expected bool"));
  CHECK_THROWS_WITH(f.tensor("w.missing"), Contains("'w.missing'") && Contains("no such tensor"));

  crafted c = valid_file();
  c.kvs.push_back(kv_array<std::uint64_t>("x.big", t_u64, {1, std::uint64_t(1) << 63}));
  c.kvs.push_back(kv_scalar<std::uint64_t>("x.bigone", t_u64, std::uint64_t(1) << 63));
  c.kvs.push_back(kv_array<std::uint8_t>("x.small", t_u8, {7, 255}));
  c.kvs.push_back(kv_array<std::int8_t>("x.empty", t_i8, {}));
  const auto g = c.open();
  CHECK_THROWS_WITH(g.get_int_array("x.big"), Contains("fit int64"));
  CHECK(g.get_uint("x.bigone") == (std::uint64_t(1) << 63));
  CHECK_THROWS_WITH(g.get_int("x.bigone"), Contains("expected an integer that fits int64"));
  CHECK(g.get_int_array("x.small") == std::vector<std::int64_t>{7, 255});
  CHECK(g.get_int_array("x.empty").empty());
}

TEST_CASE("gguf: a file that cannot be opened is a grun::error", "[gguf]") {
  CHECK_THROWS_AS(gguf_file::open("/nonexistent/grun/model.gguf"), grun::error);
  CHECK_THROWS_WITH(gguf_file::open("/nonexistent/grun/model.gguf"), Contains("cannot read GGUF file"));
  CHECK_THROWS_AS(gguf_file::open(std::filesystem::temp_directory_path()), grun::error);
}

TEST_CASE("gguf: open() reads a file written to disk", "[gguf]") {
  const auto path = std::filesystem::temp_directory_path() / ("grun_test_gguf_" + std::to_string(::getpid()) + ".gguf");
  const bytes b = valid_file().build();
  {
    std::FILE* fp = std::fopen(path.c_str(), "wb");
    REQUIRE(fp);
    REQUIRE(std::fwrite(b.data(), 1, b.size(), fp) == b.size());
    std::fclose(fp);
  }
  const auto f = gguf_file::open(path);
  std::filesystem::remove(path);  // the mapping stays valid
  CHECK(f.source() == path.string());
  CHECK(f.dequantize(f.tensor("w.bf16")) == std::vector<float>{1.0f, -3.0f, 3.140625f});
}

// ---- fuzz: random mutations never crash ---------------------------------------------------------
TEST_CASE("gguf: random mutations (2000 by default) give a valid file or a format_error, never a crash", "[gguf][fuzz]") {
  // GRUN_GGUF_FUZZ_ITERATIONS / GRUN_GGUF_FUZZ_SEED run a longer campaign (e.g. under ASan).
  const char* env_iters = std::getenv("GRUN_GGUF_FUZZ_ITERATIONS");
  const char* env_seed = std::getenv("GRUN_GGUF_FUZZ_SEED");
  const long iterations = env_iters ? std::atol(env_iters) : 2000;
  const bytes seed = valid_file().build();
  std::mt19937_64 rng(env_seed ? std::strtoull(env_seed, nullptr, 10) : 20250217);
  long ok = 0, rejected = 0;
  for (long iter = 0; iter < iterations; ++iter) {
    bytes b = seed;
    const int n_mut = 1 + static_cast<int>(rng() % 6);
    for (int m = 0; m < n_mut; ++m) {
      const std::size_t at = rng() % b.size();
      switch (rng() % 5) {
        case 0: b[at] = static_cast<std::byte>(rng()); break;               // random byte
        case 1: b[at] ^= static_cast<std::byte>(1u << (rng() % 8)); break;  // bit flip
        case 2: b[at] = 0xff_b; break;
        case 3: b.resize(at); break;                                        // truncate
        case 4: if (at + 8 <= b.size()) { const std::uint64_t v = rng() % 3 == 0 ? rng() : rng() % 512; std::memcpy(b.data() + at, &v, 8); } break;
      }
      if (b.empty()) break;
    }
    try {
      const gguf_file f = gguf_file::from_bytes(b);
      for (const auto& k : f.keys()) (void)f.value(k).type_name();
      for (const auto& t : f.tensors())
        if (can_dequantize(t.type)) {
          const auto x = f.dequantize(t);
          CHECK(x.size() == static_cast<std::size_t>(t.n_elements()));
        }
      ++ok;
    } catch (const grun::format_error&) {
      ++rejected;
    }
  }
  INFO("accepted " << ok << ", rejected " << rejected);
  CHECK(ok + rejected == iterations);
  CHECK(rejected > 0);
}

// ---- the real example model ---------------------------------------------------------------------
namespace {
std::filesystem::path model_path() {
  if (const char* p = std::getenv("GRUN_MODEL"); p && *p) return p;
  std::filesystem::path cache;
  if (const char* c = std::getenv("GRUN_CACHE_DIR"); c && *c) cache = c;
  else if (const char* h = std::getenv("HOME"); h && *h) cache = std::filesystem::path(h) / ".cache" / "grun";
  else cache = "/tmp/.cache/grun";
  return cache / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf";
}

struct reference_tensor {
  const char* name;
  std::vector<std::int64_t> shape;
  gguf_type type;
  double sum, abs_sum, sq_sum;
  std::vector<std::pair<std::size_t, float>> samples;
};
// Generated by tests/reference/gguf_reference.py (gguf 0.17+ Python package, numpy dequantize).
const std::vector<reference_tensor>& reference_tensors() {
  static const std::vector<reference_tensor> r = {
{"token_embd.weight", {576, 49152}, gguf_type::Q8_0, -15353.04449415207, 2802153.619805813, 520415.71544763993,
 {{0, -0.10654449462890625f}, {1, 0.032978057861328125f}, {15, 0.020294189453125f}, {16, -0.007610321044921875f}, {31, -0.20040512084960938f}, {32, -0.09348678588867188f}, {14155783, 0.12355613708496094f}, {28311551, -0.0417022705078125f}}},
{"blk.0.attn_q.weight", {576, 576}, gguf_type::Q4_1, 59.22322082519531, 63395.39872741699, 26749.573275085306,
 {{0, -0.0963134765625f}, {1, 0.1573486328125f}, {15, 0.537841796875f}, {16, -0.22314453125f}, {31, -0.0963134765625f}, {32, -0.34619140625f}, {165895, 0.171875f}, {331775, -0.255859375f}}},
{"blk.0.ffn_down.weight", {1536, 576}, gguf_type::Q4_1, 150.63577270507812, 128458.06286621094, 33220.11995097203,
 {{0, -0.330810546875f}, {1, 0.3460693359375f}, {15, 0.4814453125f}, {16, -0.6015625f}, {31, -0.06005859375f}, {32, 0.0416259765625f}, {442375, 0.208892822265625f}, {884735, -0.181365966796875f}}},
{"blk.29.attn_v.weight", {576, 192}, gguf_type::Q4_1, -23.565185546875, 24516.71484375, 9188.002153100446,
 {{0, 0.1417236328125f}, {1, -0.277587890625f}, {15, 0.2255859375f}, {16, 0.057861328125f}, {31, -0.1937255859375f}, {32, 0.0234375f}, {55303, 0.063262939453125f}, {110591, 0.05322265625f}}},
{"blk.0.attn_norm.weight", {576}, gguf_type::F32, 0.6129436492919922, 15.815359115600586, 0.9180835409024439,
 {{0, 0.01397705078125f}, {1, 0.0238037109375f}, {15, -0.035888671875f}, {16, -0.015625f}, {31, -0.0201416015625f}, {32, 0.0303955078125f}, {295, 0.03515625f}, {575, -0.038330078125f}}},
{"output_norm.weight", {576}, gguf_type::F32, 1038.33203125, 1045.09765625, 1921.7355499267578,
 {{0, 1.7578125f}, {1, 1.8203125f}, {15, 2.328125f}, {16, 1.71875f}, {31, 1.828125f}, {32, 1.875f}, {295, 1.78125f}, {575, 1.984375f}}},
  };
  return r;
}
}  // namespace

TEST_CASE("gguf: the SmolLM2-135M example model matches the gguf Python package", "[gguf][model]") {
  const auto path = model_path();
  if (!std::filesystem::exists(path)) {
    WARN("SKIPPED: example model not found at " << path.string()
                                                << " (run cmake/fetch_model.sh or set GRUN_MODEL)");
    return;
  }
  const gguf_file f = gguf_file::open(path);
  CHECK(f.version() == 3);
  CHECK(f.get_string("general.architecture") == "llama");
  CHECK(f.tensors().size() == 272);
  CHECK(f.keys().size() == 33);
  CHECK(f.get_uint("llama.block_count") == 30);
  CHECK(f.get_uint("llama.embedding_length") == 576);
  CHECK(f.get_uint("llama.feed_forward_length") == 1536);
  CHECK(f.get_uint("llama.attention.head_count") == 9);
  CHECK(f.get_uint("llama.attention.head_count_kv") == 3);
  CHECK(f.get_uint("llama.context_length") == 8192);
  CHECK(f.get_uint("llama.vocab_size") == 49152);
  CHECK(f.get_uint("llama.rope.dimension_count") == 64);
  CHECK(f.get_float("llama.rope.freq_base") == 100000.0);
  CHECK(f.get_float("llama.attention.layer_norm_rms_epsilon") == Approx(1e-5).epsilon(1e-6));
  CHECK(f.get_string("tokenizer.ggml.model") == "gpt2");
  CHECK(f.get_string("tokenizer.ggml.pre") == "smollm");
  CHECK(f.get_string_array("tokenizer.ggml.tokens").size() == 49152);
  CHECK(f.get_int_array("tokenizer.ggml.token_type").size() == 49152);
  CHECK(f.get_string_array("tokenizer.ggml.merges").size() == 48900);
  CHECK(f.get_uint("tokenizer.ggml.bos_token_id") == 1);
  CHECK(f.get_uint("tokenizer.ggml.eos_token_id") == 2);
  CHECK_FALSE(f.get_bool("tokenizer.ggml.add_bos_token"));
  CHECK_THAT(f.get_string("tokenizer.chat_template"), Catch::Matchers::StartsWith("{% for message in messages %}"));
  CHECK_FALSE(f.has("output.weight"));  // tied embeddings: the LM head is token_embd.weight

  // Every tensor decodes or is a known type; the data section ends at the file's end.
  std::uint64_t last_end = 0;
  for (const auto& t : f.tensors()) {
    CHECK((t.type == gguf_type::F32 || t.type == gguf_type::Q4_1 || t.type == gguf_type::Q8_0));
    last_end = std::max(last_end, f.data_offset() + t.offset + t.nbytes);
  }
  CHECK(last_end == std::filesystem::file_size(path));
  CHECK(f.tensor("blk.0.attn_k.weight").shape == std::vector<std::int64_t>{576, 192});
  CHECK(f.tensor("blk.0.ffn_gate.weight").shape == std::vector<std::int64_t>{576, 1536});

  for (const auto& r : reference_tensors()) {
    INFO("tensor " << r.name);
    const auto& t = f.tensor(r.name);
    CHECK(t.shape == r.shape);
    CHECK(t.type == r.type);
    const auto x = f.dequantize(t);
    REQUIRE(x.size() == static_cast<std::size_t>(t.n_elements()));
    double s = 0, a = 0, q = 0;
    for (float v : x) { s += v; a += std::fabs(v); q += double(v) * v; }
    CHECK(s == Approx(r.sum).epsilon(1e-9).margin(1e-9 * r.abs_sum));
    CHECK(a == Approx(r.abs_sum).epsilon(1e-9));
    CHECK(q == Approx(r.sq_sum).epsilon(1e-9));
    for (const auto& [i, v] : r.samples) {
      INFO("index " << i);
      CHECK(x[i] == v);  // same float32 operations as numpy: bit-exact
    }
  }
}
