// Safetensors reader/writer and the atomic file writer: round trips, and every malformed-file
// rule rejected with format_error (each bad file crafted byte by byte below).
#include <catch2/catch.hpp>

#include "test_files.hpp"

#include <grun/io/atomic_file.hpp>
#include <grun/io/safetensors.hpp>

#include <sys/stat.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using namespace grun;
using namespace grun::io;

using grun_test::temp_dir;

namespace {

std::vector<std::byte> raw_file(std::uint64_t header_len, const std::string& header, std::size_t data_bytes,
                                std::byte fill = std::byte{0}) {
  std::vector<std::byte> out(8 + header.size() + data_bytes, fill);
  for (int i = 0; i < 8; ++i) out[i] = static_cast<std::byte>((header_len >> (8 * i)) & 0xff);
  std::memcpy(out.data() + 8, header.data(), header.size());
  return out;
}
/// A file whose header length field matches the header text.
std::vector<std::byte> file_with(const std::string& header, std::size_t data_bytes) {
  return raw_file(header.size(), header, data_bytes);
}
safetensors_file parse(std::vector<std::byte> b, read_options o = {}) {
  return safetensors_file::from_bytes(std::move(b), o, "test.safetensors");
}

#define REQUIRE_FORMAT_ERROR(expr, fragment) REQUIRE_THROWS_CONTAINING(expr, grun::format_error, fragment)

}  // namespace

TEST_CASE("safetensors: F32/F64 round trip is bitwise, metadata preserved", "[safetensors]") {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  std::vector<float> a(2 * 3);
  for (auto& x : a) x = nd(rng);
  a[0] = -0.0f;
  a[1] = std::numeric_limits<float>::denorm_min();
  std::vector<double> b = {1.0 / 3.0, -2.5e-300, 7.0};
  std::vector<tensor_record> recs;
  recs.push_back(make_tensor<float>("a", {2, 3}, a));
  recs.push_back(make_tensor<double>("b", {3}, b));
  const metadata_map meta = {{"format", "grun"}, {"rank", "4"}};

  temp_dir dir("grun_st_");
  const auto path = dir.path / "x.safetensors";
  write_safetensors(path, recs, meta);
  REQUIRE(dir.entries() == 1);  // no temp file left
  const auto f = safetensors_file::read(path);
  REQUIRE(f.tensors().size() == 2);
  REQUIRE(f.metadata() == meta);
  const auto& ta = f.at("a");
  REQUIRE(ta.dtype == st_dtype::f32);
  REQUIRE(ta.shape == std::vector<index_t>{2, 3});
  const auto ra = decode<float>(f, "a", std::vector<index_t>{2, 3});
  REQUIRE(std::memcmp(ra.data(), a.data(), a.size() * sizeof(float)) == 0);
  const auto rb = decode<double>(f, "b");
  REQUIRE(std::memcmp(rb.data(), b.data(), b.size() * sizeof(double)) == 0);
  // header is padded so the data section starts 8-byte aligned
  const auto bytes = fs::file_size(path);
  REQUIRE((bytes - f.data().size()) % 8 == 0);
  REQUIRE_THROWS_AS(decode<float>(f, "a", std::vector<index_t>{3, 2}), grun::shape_error);
  REQUIRE_FORMAT_ERROR(f.at("missing"), "missing");
}

TEST_CASE("safetensors: BF16/F16 round trip of representable values", "[safetensors]") {
  // values exactly representable in both bf16 and f16
  std::vector<float> v = {0.0f, -0.0f, 1.0f, -2.5f, 0.15625f, 96.0f, -0.0078125f, 3.0f};
  for (st_dtype t : {st_dtype::bf16, st_dtype::f16}) {
    std::vector<tensor_record> recs{make_tensor<float>("w", {2, 4}, v, t)};
    const auto f = parse(serialize_safetensors(recs));
    REQUIRE(f.at("w").dtype == t);
    const auto back = decode<float>(f, "w");
    REQUIRE(std::memcmp(back.data(), v.data(), v.size() * 4) == 0);
    // storage types round trip bit for bit
    if (t == st_dtype::bf16) {
      const auto s = decode<bfloat16>(f, "w");
      std::vector<tensor_record> again{make_tensor<bfloat16>("w", {2, 4}, s)};
      REQUIRE(serialize_safetensors(again) == serialize_safetensors(recs));
    } else {
      const auto s = decode<half>(f, "w");
      std::vector<tensor_record> again{make_tensor<half>("w", {2, 4}, s)};
      REQUIRE(serialize_safetensors(again) == serialize_safetensors(recs));
    }
  }
  // rounding to bf16 is round-to-nearest-even
  std::vector<float> r = {1.0f + 1.0f / 256.0f};  // halfway between two bf16 values → even (1.0)
  const auto f = parse(serialize_safetensors(std::vector<tensor_record>{make_tensor<float>("r", {1}, r, st_dtype::bf16)}));
  REQUIRE(decode<float>(f, "r")[0] == 1.0f);
}

TEST_CASE("safetensors: doubles round to 16 bits once (nearest even of the double, not of a float)", "[safetensors]") {
  // Just above the halfway point between two 16-bit values by 2^-40: a float in between would land
  // exactly on the halfway point and round to even (down); the double's nearest is up.
  const double up16 = 1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40);  // F16: 1 + 2^-10
  const double upbf = 1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40);   // BF16: 1 + 2^-7
  const double down = -(1.0 + std::ldexp(1.0, -11) - std::ldexp(1.0, -40));  // just below halfway: -1
  const std::vector<double> v = {up16, upbf, down, 1e-30, -7.0};
  for (st_dtype t : {st_dtype::f16, st_dtype::bf16}) {
    const auto bytes = encode<double>(std::span<const double>(v), t);
    std::vector<std::uint16_t> bits(v.size());
    std::memcpy(bits.data(), bytes.data(), bytes.size());  // little-endian host
    const bool h = t == st_dtype::f16;
    CHECK(bits[0] == (h ? 0x3c01 : 0x3f80));                // bf16: 1 + 2^-11 + 2^-40 is below its halfway: 1
    CHECK(bits[1] == (h ? 0x3c04 : 0x3f81));                // f16: 1 + 2^-8 (+ 2^-40, far below its ulp)
    CHECK(bits[2] == (h ? 0xbc00 : 0xbf80));
    CHECK(bits[3] == (h ? 0x0000 : 0x0da2));                // f16 underflows to +0; bf16 holds 1e-30 ≈ 0x0da2
    CHECK(bits[4] == (h ? 0xc700 : 0xc0e0));
    // an F64 file decoded into 16-bit storage rounds once too
    const auto f = parse(serialize_safetensors(std::vector<tensor_record>{make_tensor<double>("x", {5}, v, st_dtype::f64)}));
    if (h) CHECK(decode<half>(f, "x")[0].bits == 0x3c01);
    else CHECK(decode<bfloat16>(f, "x")[1].bits == 0x3f81);
  }
}

TEST_CASE("safetensors: zero-size tensors, empty file and padded header are accepted", "[safetensors]") {
  SECTION("zero-size tensor among others") {
    const std::string h = R"({"e":{"dtype":"F32","shape":[0,5],"data_offsets":[4,4]},)"
                          R"("a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                          R"("z":{"dtype":"BF16","shape":[3,0],"data_offsets":[0,0]}})";
    const auto f = parse(file_with(h, 4));
    REQUIRE(f.tensors().size() == 3);
    REQUIRE(f.at("e").numel == 0);
    REQUIRE(decode<float>(f, "e").empty());
  }
  SECTION("no tensors at all") {
    const auto f = parse(file_with("{}", 0));
    REQUIRE(f.tensors().empty());
  }
  SECTION("trailing spaces pad the header") {
    const std::string h = R"({"a":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}})" + std::string(13, ' ');
    const auto f = parse(file_with(h, 4));
    REQUIRE(f.at("a").shape == std::vector<index_t>{2});
  }
  SECTION("a zero dimension makes an otherwise overflowing shape empty") {
    const std::string h = R"({"a":{"dtype":"F32","shape":[0,18446744073709551615,18446744073709551615],"data_offsets":[0,0]}})";
    REQUIRE_FORMAT_ERROR(parse(file_with(h, 0)), "2^63-1");
    const std::string h2 = R"({"a":{"dtype":"F32","shape":[0,4611686018427387904,4611686018427387904],"data_offsets":[0,0]}})";
    REQUIRE(parse(file_with(h2, 0)).at("a").numel == 0);
  }
}

TEST_CASE("safetensors: malformed files are rejected with format_error", "[safetensors]") {
  const std::string good_entry = R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";

  SECTION("file shorter than the length field") {
    REQUIRE_FORMAT_ERROR(parse(std::vector<std::byte>(5)), "8-byte header length");
  }
  SECTION("header length larger than the file") {
    const std::string h = "{" + good_entry + "}";
    REQUIRE_FORMAT_ERROR(parse(raw_file(h.size() + 100, h, 8)), "truncated");
  }
  SECTION("header length above 100 MB") {
    REQUIRE_FORMAT_ERROR(parse(raw_file(100'000'001, "{}", 0)), "at most 100000000");
  }
  SECTION("header length near 2^64 (no wrap-around)") {
    REQUIRE_FORMAT_ERROR(parse(raw_file(~std::uint64_t{0}, "{}", 0)), "at most");
  }
  SECTION("truncated data section") {
    const std::string h = "{" + good_entry + "}";
    REQUIRE_FORMAT_ERROR(parse(file_with(h, 5)), "data section");
  }
  SECTION("invalid JSON") {
    REQUIRE_FORMAT_ERROR(parse(file_with(R"({"a":{"dtype":"F32",)", 0)), "valid JSON");
    REQUIRE_FORMAT_ERROR(parse(file_with(R"({"a" 1})", 0)), "valid JSON");
  }
  SECTION("header not an object") {
    REQUIRE_FORMAT_ERROR(parse(file_with("[1, 2]", 0)), "JSON object");
  }
  SECTION("invalid UTF-8 in a key") {
    std::string h = "{\"\xff\xfe\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}}";
    REQUIRE_FORMAT_ERROR(parse(file_with(h, 0)), "UTF-8");
    std::string overlong = "{\"\xc0\xaf\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}}";
    REQUIRE_FORMAT_ERROR(parse(file_with(overlong, 0)), "UTF-8");
    std::string surrogate = "{\"\xed\xa0\x80\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}}";
    REQUIRE_FORMAT_ERROR(parse(file_with(surrogate, 0)), "UTF-8");
  }
  SECTION("duplicate tensor names") {
    const std::string h = "{" + good_entry + "," + good_entry + "}";
    REQUIRE_FORMAT_ERROR(parse(file_with(h, 8)), "twice");
  }
  SECTION("duplicate key inside an entry or metadata") {
    const std::string h = R"({"a":{"dtype":"F32","dtype":"F16","shape":[2],"data_offsets":[0,8]}})";
    REQUIRE_FORMAT_ERROR(parse(file_with(h, 8)), "\"dtype\" twice");
    const std::string m = R"({"__metadata__":{"k":"1","k":"2"}})";
    REQUIRE_FORMAT_ERROR(parse(file_with(m, 0)), "\"k\" twice");
    const std::string mm = R"({"__metadata__":{},"__metadata__":{}})";
    REQUIRE_FORMAT_ERROR(parse(file_with(mm, 0)), "twice");
  }
  SECTION("unknown dtype") {
    REQUIRE_FORMAT_ERROR(parse(file_with(R"({"a":{"dtype":"F31","shape":[2],"data_offsets":[0,8]}})", 8)), "\"F31\"");
    REQUIRE_FORMAT_ERROR(parse(file_with(R"({"a":{"dtype":4,"shape":[2],"data_offsets":[0,8]}})", 8)), "dtype");
  }
  SECTION("dtype the format knows but grun does not convert") {
    const auto f = parse(file_with(R"({"a":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})", 8));
    REQUIRE_FORMAT_ERROR(decode<float>(f, "a"), "got I64");
  }
  SECTION("negative, fractional or non-numeric dimension") {
    REQUIRE_FORMAT_ERROR(parse(file_with(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8)),
                         "negative integer -2");
    REQUIRE_FORMAT_ERROR(parse(file_with(R"({"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", 8)),
                         "non-integer number");
    REQUIRE_FORMAT_ERROR(parse(file_with(R"({"a":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}})", 8)),
                         "non-negative integer");
    REQUIRE_FORMAT_ERROR(parse(file_with(R"({"a":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", 8)),
                         "shape");
  }
  SECTION("missing or extra fields, entry not an object") {
    REQUIRE_FORMAT_ERROR(parse(file_with(R"({"a":{"dtype":"F32","shape":[2]}})", 8)), "data_offsets");
    REQUIRE_FORMAT_ERROR(
        parse(file_with(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}})", 8)), "\"x\"");
    REQUIRE_FORMAT_ERROR(parse(file_with(R"({"a":[1]})", 0)), "expected an object");
  }
  SECTION("offsets malformed") {
    REQUIRE_FORMAT_ERROR(parse(file_with(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8)),
                         "[begin, end]");
    REQUIRE_FORMAT_ERROR(parse(file_with(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8)),
                         "begin <= end");
    REQUIRE_FORMAT_ERROR(parse(file_with(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,-8]}})", 8)),
                         "data_offsets[1]");
  }
  SECTION("gap between tensors") {
    const std::string h = R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                          R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})";
    REQUIRE_FORMAT_ERROR(parse(file_with(h, 12)), "gap of 4 bytes");
  }
  SECTION("overlapping tensors") {
    const std::string h = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                          R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})";
    REQUIRE_FORMAT_ERROR(parse(file_with(h, 12)), "overlaps");
  }
  SECTION("first tensor not at offset 0") {
    const std::string h = R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})";
    REQUIRE_FORMAT_ERROR(parse(file_with(h, 8)), "the data start");
  }
  SECTION("trailing bytes after the last tensor") {
    const std::string h = "{" + good_entry + "}";
    REQUIRE_FORMAT_ERROR(parse(file_with(h, 9)), "1 trailing bytes");
  }
  SECTION("byte count differs from shape × dtype") {
    const std::string h = R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})";
    REQUIRE_FORMAT_ERROR(parse(file_with(h, 8)), "expected 12 bytes");
    const std::string h2 = R"({"a":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,16]}})";
    REQUIRE_FORMAT_ERROR(parse(file_with(h2, 16)), "expected 8 bytes");
  }
  SECTION("element count overflows 64 bits") {
    const std::string h =
        R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,2],"data_offsets":[0,8]}})";
    REQUIRE_FORMAT_ERROR(parse(file_with(h, 8)), "overflowing product");
  }
  SECTION("byte count overflows 64 bits") {
    const std::string h = R"({"a":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,8]}})";
    REQUIRE_FORMAT_ERROR(parse(file_with(h, 8)), "byte count");
  }
  SECTION("metadata value not a string") {
    REQUIRE_FORMAT_ERROR(parse(file_with(R"({"__metadata__":{"rank":4}})", 0)), "__metadata__[\"rank\"]");
    REQUIRE_FORMAT_ERROR(parse(file_with(R"({"__metadata__":["x"]})", 0)), "__metadata__");
  }
  SECTION("deeply nested values are refused by description, never dumped (a dump recursed off the stack)") {
    const std::string deep = std::string(100000, '[') + std::string(100000, ']');
    REQUIRE_FORMAT_ERROR(parse(file_with(R"({"t":{"dtype":"F32","shape":)" + deep + R"(,"data_offsets":[0,0]}})", 0)),
                         "array of 1 elements");
    REQUIRE_FORMAT_ERROR(parse(file_with(R"({"__metadata__":{"k":)" + deep + "}}", 0)), "array of 1 elements");
    REQUIRE_FORMAT_ERROR(parse(file_with(R"({"t":)" + deep + "}", 0)), "array of 1 elements");
  }
  SECTION("header padded with something other than whitespace") {
    const std::string h = "{}" + std::string(6, '\0');
    REQUIRE_FORMAT_ERROR(parse(file_with(h, 0)), "NUL byte");
    REQUIRE_FORMAT_ERROR(parse(file_with("{}  x   ", 0)), "valid JSON");
  }
}

TEST_CASE("safetensors: reads a file written by the reference Python implementation", "[safetensors]") {
  // safetensors 0.8.0 (numpy API): save({"w": f32 [2,3], "h": f16 [2], "x": f64 [1], "e": f32 [0,3],
  // "i": i64 [2]}, metadata={"format": "pt", "note": "café"}) — bytes verbatim, header padded with spaces.
  const std::string hex =
    "48010000000000007b225f5f6d657461646174615f5f223a7b226e6f7465223a22636166c3a9222c22666f726d617422"
    "3a227074227d2c2269223a7b226474797065223a22493634222c227368617065223a5b325d2c22646174615f6f666673"
    "657473223a5b302c31365d7d2c2278223a7b226474797065223a22463634222c227368617065223a5b315d2c22646174"
    "615f6f666673657473223a5b31362c32345d7d2c2265223a7b226474797065223a22463332222c227368617065223a5b"
    "302c335d2c22646174615f6f666673657473223a5b32342c32345d7d2c2277223a7b226474797065223a22463332222c"
    "227368617065223a5b322c335d2c22646174615f6f666673657473223a5b32342c34385d7d2c2268223a7b2264747970"
    "65223a22463136222c227368617065223a5b325d2c22646174615f6f666673657473223a5b34382c35325d7d7d202020"
    "0700000000000000f8ffffffffffffff555555555555d53f0000c03f000010c0000040400000003e000000800000e040"
    "003800bc";
  std::vector<std::byte> bytes(hex.size() / 2);
  for (std::size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<std::byte>(std::stoi(hex.substr(2 * i, 2), nullptr, 16));
  const auto f = parse(bytes);
  REQUIRE(f.tensors().size() == 5);
  CHECK(f.metadata().at("note") == "caf\xc3\xa9");
  CHECK(decode<float>(f, "w", std::vector<index_t>{2, 3}) == std::vector<float>{1.5f, -2.25f, 3.0f, 0.125f, -0.0f, 7.0f});
  CHECK(decode<float>(f, "h") == std::vector<float>{0.5f, -1.0f});
  CHECK(decode<double>(f, "x")[0] == 1.0 / 3.0);
  CHECK(f.at("e").numel == 0);
  CHECK(f.at("i").dtype == st_dtype::i64);
  CHECK(f.tensors().front().name == "i");  // sorted by offset
}

TEST_CASE("safetensors: finite check is opt-in and names the tensor", "[safetensors]") {
  std::vector<float> v = {1.0f, std::numeric_limits<float>::quiet_NaN()};
  std::vector<tensor_record> recs{make_tensor<float>("ok", {1}, std::span<const float>(v.data(), 1)),
                                  make_tensor<float>("bad", {2}, v, st_dtype::bf16)};
  const auto image = serialize_safetensors(recs);
  REQUIRE_NOTHROW(parse(image));
  REQUIRE_THROWS_CONTAINING(parse(image, read_options{.check_finite = true}), grun::numeric_error,
                            "tensor \"bad\": expected finite values, got nan at flat index 1");
  std::vector<double> inf = {-std::numeric_limits<double>::infinity()};
  REQUIRE_THROWS_AS(parse(serialize_safetensors(std::vector<tensor_record>{make_tensor<double>("d", {1}, inf)}),
                          read_options{.check_finite = true}),
                    grun::numeric_error);
}

TEST_CASE("safetensors: writer rejects inconsistent records", "[safetensors]") {
  std::vector<float> v(4);
  std::vector<tensor_record> dup{make_tensor<float>("a", {4}, v), make_tensor<float>("a", {4}, v)};
  REQUIRE_THROWS_AS(serialize_safetensors(dup), grun::format_error);
  std::vector<tensor_record> reserved{make_tensor<float>("__metadata__", {4}, v)};
  REQUIRE_THROWS_AS(serialize_safetensors(reserved), grun::format_error);
  std::vector<tensor_record> wrong{make_tensor<float>("a", {5}, v)};
  REQUIRE_THROWS_AS(serialize_safetensors(wrong), grun::shape_error);
  std::vector<tensor_record> bad_utf8{make_tensor<float>("\xff", {4}, v)};
  REQUIRE_THROWS_AS(serialize_safetensors(bad_utf8), grun::format_error);
  // shape × dtype wraps to 0 bytes in 64 bits: refused, not written as a file the reader refuses
  std::vector<tensor_record> wraps{tensor_record{"t", st_dtype::f32, {index_t(1) << 62}, {}}};
  REQUIRE_THROWS_CONTAINING(serialize_safetensors(wraps), grun::shape_error, "overflows");
  // a header the reader would refuse (over 100 MB) is not written
  std::vector<tensor_record> none;
  REQUIRE_THROWS_CONTAINING(serialize_safetensors(none, {{"chat", std::string(max_header_bytes, 'a')}}),
                            grun::format_error, "header of at most");
}

TEST_CASE("safetensors: the bytes of a tensor_info not from this file are refused, not read", "[safetensors]") {
  std::vector<float> v{1, 2};
  const auto f = parse(serialize_safetensors(std::vector<tensor_record>{make_tensor<float>("t", {2}, v)}));
  tensor_info t = f.at("t");
  t.begin = std::uint64_t(1) << 30;
  t.end = t.begin + 8;
  REQUIRE_THROWS_CONTAINING(f.bytes(t), grun::shape_error, "tensor \"t\": expected data offsets inside");
  std::vector<float> out(2);
  REQUIRE_THROWS_AS(decode<float>(f, t, out), grun::shape_error);
}

TEST_CASE("atomic_file: unwritable path fails clearly and leaves nothing behind", "[safetensors][atomic]") {
  temp_dir dir("grun_st_");
  std::vector<tensor_record> recs{make_tensor<float>("a", {1}, std::vector<float>{1.0f})};

  SECTION("directory does not exist") {
    const auto p = dir.path / "no_such_dir" / "x.safetensors";
    REQUIRE_THROWS_CONTAINING(write_safetensors(p, recs), grun::error, p.string());
    REQUIRE(dir.entries() == 0);
  }
  SECTION("parent is a regular file") {
    { std::ofstream(dir.path / "file") << "x"; }
    const auto p = dir.path / "file" / "x.safetensors";
    REQUIRE_THROWS_CONTAINING(write_safetensors(p, recs), grun::error, p.string());
    REQUIRE(dir.entries() == 1);
  }
  SECTION("target is a directory: rename fails after the data was written, temp file removed") {
    fs::create_directory(dir.path / "target");
    const auto p = dir.path / "target";
    REQUIRE_THROWS_CONTAINING(write_safetensors(p, recs), grun::error, "rename");
    REQUIRE(dir.entries() == 1);
    REQUIRE(fs::is_directory(p));
  }
  SECTION("an uncommitted atomic_file leaves the old file untouched") {
    const auto p = dir.path / "keep.bin";
    { std::ofstream(p) << "old"; }
    {
      atomic_file f(p);
      f.write(std::string_view("new contents"));
      REQUIRE(fs::exists(f.temp_path()));
    }  // destroyed without commit
    REQUIRE(dir.entries() == 1);
    std::ifstream in(p);
    std::string s;
    in >> s;
    REQUIRE(s == "old");
  }
  SECTION("commit replaces the old file") {
    const auto p = dir.path / "keep.bin";
    { std::ofstream(p) << "old"; }
    write_file_atomic(p, std::as_bytes(std::span<const char>("new", 3)));
    std::ifstream in(p);
    std::string s;
    in >> s;
    REQUIRE(s == "new");
    REQUIRE(dir.entries() == 1);
  }
  SECTION("a replaced file keeps its permissions; a new one takes the umask's") {
    const auto p = dir.path / "private.bin";
    { std::ofstream(p) << "old"; }
    fs::permissions(p, fs::perms::owner_read | fs::perms::owner_write, fs::perm_options::replace);
    write_file_atomic(p, std::as_bytes(std::span<const char>("new", 3)));
    CHECK((fs::status(p).permissions() & fs::perms::all) == (fs::perms::owner_read | fs::perms::owner_write));
    const mode_t old_mask = ::umask(027);
    const auto q = dir.path / "fresh.bin";
    write_file_atomic(q, std::as_bytes(std::span<const char>("x", 1)));
    ::umask(old_mask);
    CHECK((fs::status(q).permissions() & fs::perms::all) ==
          (fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read));
  }
  SECTION("a FIFO is refused as not a regular file, without blocking") {
    const auto p = dir.path / "pipe";
    REQUIRE(::mkfifo(p.c_str(), 0600) == 0);
    REQUIRE_THROWS_CONTAINING(safetensors_file::read(p), grun::error, "expected a regular file");
  }
  SECTION("reading a missing file is a grun::error naming it") {
    REQUIRE_THROWS_CONTAINING(safetensors_file::read(dir.path / "nope.safetensors"), grun::error,
                              "nope.safetensors");
  }
}
