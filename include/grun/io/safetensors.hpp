#pragma once
// grun/io/safetensors.hpp — reading and writing safetensors files.
//
// Layout (https://github.com/huggingface/safetensors, "Format"):
//
//   [ 8 bytes ]  N, unsigned little-endian 64-bit: length of the header
//   [ N bytes ]  UTF-8 JSON object  { "<name>": {"dtype": "F32", "shape": [2, 3], "data_offsets": [b, e]},
//                                     ...,  "__metadata__": {"<key>": "<string>", ...} }
//                (writers may pad it with trailing spaces so the data starts 8-byte aligned)
//   [ rest    ]  the data section; tensor bytes are [b, e) relative to its start, row-major,
//                little-endian
//
// The reader trusts nothing in the file. It checks, in this order and before allocating anything a
// header field asks for: N ≤ 100 MB and N ≤ file size − 8; the header is valid UTF-8 JSON, an object,
// with no duplicate key at any depth (nlohmann::json would silently keep the last one, so duplicates
// are caught in its parser callback); every entry has exactly dtype / shape / data_offsets of the
// right JSON types, a known dtype, non-negative integer dimensions; the element count and byte count
// are computed with overflow checks and equal e − b; the tensors, sorted by offset, tile the data
// section from 0 with no gap, no overlap and no trailing bytes; `__metadata__` maps strings to
// strings. Every violation is a grun::format_error that names the file, what was expected and what
// came. NaN / Inf detection is opt-in (read_options::check_finite) and throws grun::numeric_error.
//
// All dtypes of the format are parsed; grun's numeric conversions (decode / encode) accept F32, F64,
// F16 and BF16 and reject the others by name.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "../core/error.hpp"
#include "../core/numeric.hpp"
#include "../core/tensor.hpp"
#include "atomic_file.hpp"

namespace grun::io {

// ---- dtypes --------------------------------------------------------------------------------
/// Every element type the safetensors format names (sub-byte F4/F6 types excepted: rejected).
enum class st_dtype : std::uint8_t { boolean, u8, i8, f8_e5m2, f8_e4m3, f8_e8m0, i16, u16, f16, bf16, i32, u32, f32, f64, i64, u64, c64 };

namespace detail {
struct st_dtype_entry { st_dtype type; std::string_view name; std::uint64_t size; };
inline constexpr st_dtype_entry st_dtype_table[] = {
    {st_dtype::boolean, "BOOL", 1}, {st_dtype::u8, "U8", 1},   {st_dtype::i8, "I8", 1},
    {st_dtype::f8_e5m2, "F8_E5M2", 1}, {st_dtype::f8_e4m3, "F8_E4M3", 1}, {st_dtype::f8_e8m0, "F8_E8M0", 1},
    {st_dtype::i16, "I16", 2},      {st_dtype::u16, "U16", 2},  {st_dtype::f16, "F16", 2},
    {st_dtype::bf16, "BF16", 2},    {st_dtype::i32, "I32", 4},  {st_dtype::u32, "U32", 4},
    {st_dtype::f32, "F32", 4},      {st_dtype::f64, "F64", 8},  {st_dtype::i64, "I64", 8},
    {st_dtype::u64, "U64", 8},      {st_dtype::c64, "C64", 8},
};
}  // namespace detail

/// The dtype's name as written in headers ("F32", "BF16", ...).
constexpr std::string_view name_of(st_dtype t) {
  for (const auto& e : detail::st_dtype_table) if (e.type == t) return e.name;
  return "?";
}
/// Bytes per element.
constexpr std::uint64_t size_of(st_dtype t) {
  for (const auto& e : detail::st_dtype_table) if (e.type == t) return e.size;
  return 0;
}
/// Parses a header dtype name; nullopt for a name the format does not define.
inline std::optional<st_dtype> parse_st_dtype(std::string_view s) {
  for (const auto& e : detail::st_dtype_table) if (e.name == s) return e.type;
  return std::nullopt;
}
/// True for the dtypes grun converts to and from (F32, F64, F16, BF16).
constexpr bool is_grun_float(st_dtype t) {
  return t == st_dtype::f32 || t == st_dtype::f64 || t == st_dtype::f16 || t == st_dtype::bf16;
}
/// The file dtype of a grun storage dtype.
constexpr st_dtype to_st_dtype(grun::dtype t) {
  switch (t) {
    case grun::dtype::f32: return st_dtype::f32;
    case grun::dtype::f64: return st_dtype::f64;
    case grun::dtype::f16: return st_dtype::f16;
    case grun::dtype::bf16: return st_dtype::bf16;
  }
  return st_dtype::f32;
}

// ---- what a file holds -----------------------------------------------------------------------
/// One tensor entry of a validated header. Offsets are relative to the data section.
struct tensor_info {
  std::string name;
  st_dtype dtype = st_dtype::f32;
  std::vector<index_t> shape;
  std::uint64_t begin = 0, end = 0;
  std::uint64_t numel = 0;
  std::uint64_t nbytes() const { return end - begin; }
};

using metadata_map = std::map<std::string, std::string>;

struct read_options {
  /// Scan F32/F64/F16/BF16 tensors for NaN / Inf and throw numeric_error naming the first one.
  bool check_finite = false;
};

/// Largest header the reader accepts (the reference implementation's limit).
inline constexpr std::uint64_t max_header_bytes = 100'000'000;

namespace detail {

inline std::uint64_t load_le64(const std::byte* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | std::to_integer<std::uint64_t>(p[i]);
  return v;
}
inline std::uint32_t load_le32(const std::byte* p) {
  std::uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | std::to_integer<std::uint32_t>(p[i]);
  return v;
}
inline std::uint16_t load_le16(const std::byte* p) {
  return static_cast<std::uint16_t>(std::to_integer<unsigned>(p[0]) | (std::to_integer<unsigned>(p[1]) << 8));
}
template <class U> void store_le(std::byte* p, U v) {
  for (std::size_t i = 0; i < sizeof(U); ++i) { p[i] = static_cast<std::byte>(v & 0xffu); v >>= 8; }
}

/// Byte offset of the first malformed UTF-8 sequence (overlong forms, surrogates and code points
/// above U+10FFFF are malformed, RFC 3629), or nullopt when `s` is valid.
inline std::optional<std::size_t> first_invalid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const std::size_t n = s.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned c = p[i];
    if (c < 0x80) { ++i; continue; }
    std::size_t len;
    std::uint32_t cp, min;
    if ((c & 0xe0) == 0xc0) { len = 2; cp = c & 0x1f; min = 0x80; }
    else if ((c & 0xf0) == 0xe0) { len = 3; cp = c & 0x0f; min = 0x800; }
    else if ((c & 0xf8) == 0xf0) { len = 4; cp = c & 0x07; min = 0x10000; }
    else return i;
    if (n - i < len) return i;
    for (std::size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xc0) != 0x80) return i;
      cp = (cp << 6) | (p[i + k] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return i;
    i += len;
  }
  return std::nullopt;
}

inline std::string shape_text(const std::vector<index_t>& s) {
  std::string out = "[";
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(s[i]);
  }
  return out + "]";
}
/// What a JSON value is, for an error message. Containers are described, never dumped: a dump
/// recurses (a hostile header of 100,000 nested '[' overflowed the stack) and copies the whole value,
/// and these texts are built for every check, passed or not.
inline std::string json_type_text(const nlohmann::json& j) {
  if (j.is_number_unsigned()) return "unsigned integer " + j.dump();
  if (j.is_number_integer()) return "negative integer " + j.dump();
  if (j.is_number_float()) return "non-integer number " + j.dump();
  if (j.is_array()) return "array of " + std::to_string(j.size()) + " elements";
  if (j.is_object()) return "object of " + std::to_string(j.size()) + " fields";
  if (j.is_string()) {
    const auto& s = j.get_ref<const std::string&>();
    return s.size() > 40 ? "string \"" + s.substr(0, 37) + "...\"" : "string \"" + s + "\"";
  }
  return j.dump();  // true, false, null
}

/// double → float rounded to odd: truncated toward zero, with the last bit set when inexact. Rounding
/// that to 16 bits (nearest even) gives exactly the nearest-even rounding of the double itself — a
/// plain double → float → 16-bit conversion rounds twice (1 + 2^-11 + 2^-40 → F16 came out 1, not
/// 1 + 2^-10). Valid because float keeps ≥ 2 more bits than half (11) and bfloat16 (8).
inline float float_round_to_odd(double x) {
  float f = static_cast<float>(x);
  if (std::isfinite(f) && static_cast<double>(f) != x) {
    auto bits = std::bit_cast<std::uint32_t>(f);
    if (std::fabs(static_cast<double>(f)) > std::fabs(x)) bits -= 1;  // rounded away from zero: step back
    f = std::bit_cast<float>(bits | 1u);
  }
  return f;
}
/// A stored value as the float a 16-bit rounding starts from (doubles rounded to odd, see above).
template <class T>
float to_float_for_16_bits(const T& v) {
  if constexpr (std::is_same_v<T, double>) return float_round_to_odd(v);
  else return static_cast<float>(v);
}

/// Owner of the bytes a safetensors_file refers to: a read-only memory mapping or a vector.
struct mapped_bytes {
  void* addr = nullptr;
  std::size_t size = 0;
  ~mapped_bytes() { if (addr) ::munmap(addr, size); }
};

/// Parses the header JSON, rejecting duplicate keys at any depth.
inline nlohmann::json parse_header_json(std::string_view text, const std::string& where) {
  std::vector<std::set<std::string>> keys;  // one set per open object
  auto cb = [&](int /*depth*/, nlohmann::json::parse_event_t ev, nlohmann::json& parsed) -> bool {
    using ev_t = nlohmann::json::parse_event_t;
    if (ev == ev_t::object_start) keys.emplace_back();
    else if (ev == ev_t::object_end) { if (!keys.empty()) keys.pop_back(); }
    else if (ev == ev_t::key) {
      const auto& k = parsed.get_ref<const std::string&>();
      if (!keys.empty() && !keys.back().insert(k).second)
        fail<format_error>(where, ": header: expected unique keys in every JSON object, got key \"", k,
                           "\" twice");
    }
    return true;
  };
  try {
    return nlohmann::json::parse(text.begin(), text.end(), cb, /*allow_exceptions=*/true, /*ignore_comments=*/false);
  } catch (const nlohmann::json::exception& e) {
    fail<format_error>(where, ": header: expected valid JSON, got a parse error (", e.what(), ")");
  }
}

inline std::uint64_t require_u64(const nlohmann::json& j, const std::string& where, const std::string& what) {
  require<format_error>(j.is_number_unsigned(), where, ": ", what, ": expected a non-negative integer, got ",
                        json_type_text(j));
  return j.get<std::uint64_t>();
}

}  // namespace detail

// ---- reader ----------------------------------------------------------------------------------
/// A validated safetensors file: its tensor entries (sorted by offset), metadata and the bytes.
class safetensors_file {
 public:
  /// Maps `path` read-only and validates it.
  static safetensors_file read(const std::filesystem::path& path, read_options opt = {}) {
    const std::string where = path.string();
    // O_NONBLOCK: a FIFO is refused below (not a regular file) instead of blocking open() forever.
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) { const int e = errno; fail<error>("cannot read '", where, "' (", detail::errno_text(e), ")"); }
    struct ::stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      fail<error>("cannot read '", where, "': expected a regular file");
    }
    auto owner = std::make_shared<detail::mapped_bytes>();
    const auto size = static_cast<std::uint64_t>(st.st_size);
    if (size > 0) {
      void* a = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
      if (a == MAP_FAILED) { const int e = errno; ::close(fd); fail<error>("cannot read '", where, "': mmap failed (", detail::errno_text(e), ")"); }
      owner->addr = a;
      owner->size = size;
    }
    ::close(fd);
    std::span<const std::byte> bytes(static_cast<const std::byte*>(owner->addr), owner->size);
    return safetensors_file(std::move(owner), bytes, where, opt);
  }
  /// Validates an in-memory file (the vector is kept alive by the result).
  static safetensors_file from_bytes(std::vector<std::byte> bytes, read_options opt = {},
                                     std::string source = "<memory>") {
    auto owner = std::make_shared<std::vector<std::byte>>(std::move(bytes));
    std::span<const std::byte> view(owner->data(), owner->size());
    return safetensors_file(std::move(owner), view, std::move(source), opt);
  }

  /// Tensor entries sorted by data offset.
  const std::vector<tensor_info>& tensors() const { return tensors_; }
  const metadata_map& metadata() const { return metadata_; }
  /// The whole data section.
  std::span<const std::byte> data() const { return data_; }
  /// Name used in error messages (the path).
  const std::string& source() const { return source_; }

  const tensor_info* find(std::string_view name) const {
    for (const auto& t : tensors_) if (t.name == name) return &t;
    return nullptr;
  }
  /// The entry named `name`; format_error naming the missing key otherwise.
  const tensor_info& at(std::string_view name) const {
    const tensor_info* t = find(name);
    if (!t) fail<format_error>(source_, ": expected a tensor named \"", name, "\", the file has none");
    return *t;
  }
  /// The bytes of an entry of this file (one with other offsets is refused, not read out of bounds).
  std::span<const std::byte> bytes(const tensor_info& t) const {
    require<shape_error>(t.begin <= t.end && t.end <= data_.size(), source_, ": tensor \"", t.name,
                         "\": expected data offsets inside the file's ", data_.size(), "-byte data section, got [",
                         t.begin, ", ", t.end, "] (a tensor_info of another file?)");
    return data_.subspan(t.begin, t.nbytes());
  }

 private:
  safetensors_file(std::shared_ptr<const void> owner, std::span<const std::byte> file, std::string source,
                   read_options opt)
      : owner_(std::move(owner)), source_(std::move(source)) {
    parse(file, opt);
  }

  void parse(std::span<const std::byte> file, read_options opt) {
    const std::string& w = source_;
    const std::uint64_t size = file.size();
    require<format_error>(size >= 8, w, ": expected at least the 8-byte header length, got a file of ", size,
                          " bytes");
    const std::uint64_t n = detail::load_le64(file.data());
    require<format_error>(n <= max_header_bytes, w, ": expected a header of at most ", max_header_bytes,
                          " bytes, got a header length of ", n);
    require<format_error>(n <= size - 8, w, ": header length ", n, " exceeds the ", size - 8,
                          " bytes that follow the length field (file truncated?)");
    require<format_error>(n >= 2, w, ": expected a JSON object header (at least 2 bytes), got a header length of ", n);
    const std::string_view text(reinterpret_cast<const char*>(file.data() + 8), n);
    if (auto bad = detail::first_invalid_utf8(text))
      fail<format_error>(w, ": header: expected valid UTF-8, got a malformed byte sequence at header byte ", *bad);
    // nlohmann's lexer stops at a NUL byte; JSON text never contains one raw (it must be escaped).
    if (const auto nul = text.find('\0'); nul != std::string_view::npos)
      fail<format_error>(w, ": header: expected JSON text (padding must be spaces), got a NUL byte at header byte ", nul);
    require<format_error>(text.front() == '{', w, ": header: expected a JSON object starting with '{', got '",
                          text.front(), "'");
    const nlohmann::json header = detail::parse_header_json(text, w);
    require<format_error>(header.is_object(), w, ": header: expected a JSON object, got ", header.type_name());

    data_ = file.subspan(8 + n);
    const std::uint64_t data_size = data_.size();

    for (const auto& [key, value] : header.items()) {
      if (key == "__metadata__") { parse_metadata(value); continue; }
      tensors_.push_back(parse_entry(key, value, data_size));
    }

    // The tensors must tile [0, data_size) exactly: sorted by (begin, end), each starts where the
    // previous ended. Zero-byte tensors sit anywhere on that chain.
    std::sort(tensors_.begin(), tensors_.end(), [](const tensor_info& a, const tensor_info& b) {
      return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    std::uint64_t expected = 0;
    const tensor_info* prev = nullptr;
    for (const auto& t : tensors_) {
      if (t.begin != expected) {
        if (t.begin > expected)
          fail<format_error>(w, ": expected tensor \"", t.name, "\" to start at data offset ", expected,
                             prev ? " (where \"" + prev->name + "\" ends)" : std::string(" (the data start)"),
                             ", got ", t.begin, ": a gap of ", t.begin - expected, " bytes");
        fail<format_error>(w, ": expected tensor \"", t.name, "\" to start at data offset ", expected,
                           " (where \"", prev->name, "\" ends), got ", t.begin, ": it overlaps \"", prev->name, "\"");
      }
      expected = t.end;
      prev = &t;
    }
    require<format_error>(expected == data_size, w, ": expected the data section to end with the last tensor at byte ",
                          expected, ", got ", data_size - expected, " trailing bytes");

    if (opt.check_finite) check_finite();
  }

  void parse_metadata(const nlohmann::json& m) {
    const std::string& w = source_;
    require<format_error>(m.is_object(), w, ": __metadata__: expected an object of string values, got ",
                          detail::json_type_text(m));
    for (const auto& [k, v] : m.items()) {
      require<format_error>(v.is_string(), w, ": __metadata__[\"", k, "\"]: expected a string, got ",
                            detail::json_type_text(v));
      metadata_.emplace(k, v.get<std::string>());
    }
  }

  tensor_info parse_entry(const std::string& name, const nlohmann::json& e, std::uint64_t data_size) const {
    const std::string w = source_ + ": tensor \"" + name + "\"";
    require<format_error>(e.is_object(), w, ": expected an object {dtype, shape, data_offsets}, got ",
                          detail::json_type_text(e));
    for (const auto& [k, v] : e.items()) {
      (void)v;
      require<format_error>(k == "dtype" || k == "shape" || k == "data_offsets", w,
                            ": expected only the fields dtype, shape, data_offsets, got field \"", k, "\"");
    }
    for (const char* f : {"dtype", "shape", "data_offsets"})
      require<format_error>(e.contains(f), w, ": expected a field \"", f, "\", it is missing");

    tensor_info t;
    t.name = name;
    const auto& jd = e["dtype"];
    require<format_error>(jd.is_string(), w, ": dtype: expected a string, got ", detail::json_type_text(jd));
    const auto dt = parse_st_dtype(jd.get_ref<const std::string&>());
    require<format_error>(dt.has_value(), w, ": dtype: expected one of BOOL, U8, I8, F8_E5M2, F8_E4M3, F8_E8M0, I16, "
                          "U16, F16, BF16, I32, U32, F32, F64, I64, U64, C64, got \"", jd.get_ref<const std::string&>(), "\"");
    t.dtype = *dt;

    const auto& js = e["shape"];
    require<format_error>(js.is_array(), w, ": shape: expected an array of non-negative integers, got ",
                          detail::json_type_text(js));
    std::uint64_t numel = 1;
    bool overflow = false;
    t.shape.reserve(js.size());  // bounded by the header bytes already in memory
    for (std::size_t i = 0; i < js.size(); ++i) {
      const std::uint64_t dim = detail::require_u64(js[i], w, "shape[" + std::to_string(i) + "]");
      require<format_error>(dim <= static_cast<std::uint64_t>(std::numeric_limits<index_t>::max()), w, ": shape[", i,
                            "]: expected at most 2^63-1, got ", dim);
      t.shape.push_back(static_cast<index_t>(dim));
      overflow = overflow || __builtin_mul_overflow(numel, dim, &numel);
    }
    // A zero dimension makes the tensor empty whatever the others are; an overflowed product does not.
    const bool has_zero = std::find(t.shape.begin(), t.shape.end(), index_t(0)) != t.shape.end();
    if (has_zero) { numel = 0; overflow = false; }
    require<format_error>(!overflow, w, ": shape ", detail::shape_text(t.shape),
                          ": expected an element count that fits in 64 bits, got an overflowing product");
    std::uint64_t nbytes = 0;
    require<format_error>(!__builtin_mul_overflow(numel, size_of(t.dtype), &nbytes), w, ": shape ",
                          detail::shape_text(t.shape), " × ", name_of(t.dtype),
                          ": expected a byte count that fits in 64 bits, got an overflowing product");
    t.numel = numel;

    const auto& jo = e["data_offsets"];
    require<format_error>(jo.is_array() && jo.size() == 2, w, ": data_offsets: expected [begin, end], got ",
                          detail::json_type_text(jo));
    t.begin = detail::require_u64(jo[0], w, "data_offsets[0]");
    t.end = detail::require_u64(jo[1], w, "data_offsets[1]");
    require<format_error>(t.begin <= t.end, w, ": data_offsets: expected begin <= end, got [", t.begin, ", ", t.end, "]");
    require<format_error>(t.end <= data_size, w, ": data_offsets: expected end <= ", data_size,
                          " (the data section's size), got [", t.begin, ", ", t.end, "]");
    require<format_error>(t.end - t.begin == nbytes, w, ": expected ", nbytes, " bytes (shape ",
                          detail::shape_text(t.shape), " × ", name_of(t.dtype), " of ", size_of(t.dtype),
                          " bytes), got data_offsets [", t.begin, ", ", t.end, "] spanning ", t.end - t.begin);
    return t;
  }

  void check_finite() const {
    for (const auto& t : tensors_) {
      if (!is_grun_float(t.dtype)) continue;
      const std::byte* p = data_.data() + t.begin;
      for (std::uint64_t i = 0; i < t.numel; ++i) {
        double x;
        switch (t.dtype) {
          case st_dtype::f32: x = std::bit_cast<float>(detail::load_le32(p + 4 * i)); break;
          case st_dtype::f64: x = std::bit_cast<double>(detail::load_le64(p + 8 * i)); break;
          case st_dtype::f16: x = half::to_float(detail::load_le16(p + 2 * i)); break;
          default: x = bfloat16::to_float(detail::load_le16(p + 2 * i)); break;
        }
        if (!std::isfinite(x))
          fail<numeric_error>(source_, ": tensor \"", t.name, "\": expected finite values, got ", x,
                              " at flat index ", i);
      }
    }
  }

  std::shared_ptr<const void> owner_;
  std::string source_;
  std::span<const std::byte> data_;
  std::vector<tensor_info> tensors_;
  metadata_map metadata_;
};

// ---- numeric conversions -----------------------------------------------------------------------
/// Decodes a tensor's elements into `out` (size must equal the element count). T: float, double,
/// half, bfloat16; the file dtype: F32, F64, F16, BF16. Same-dtype copies are bitwise.
template <class T>
void decode(const safetensors_file& f, const tensor_info& t, std::span<T> out) {
  static_assert(is_storage_type_v<T>, "grun::io::decode: T must be float, double, grun::half or grun::bfloat16");
  require<format_error>(is_grun_float(t.dtype), f.source(), ": tensor \"", t.name,
                        "\": expected dtype F32, F64, F16 or BF16, got ", name_of(t.dtype),
                        " (grun stores adapter parameters as floating point)");
  require<shape_error>(out.size() == t.numel, f.source(), ": tensor \"", t.name, "\": destination holds ",
                       out.size(), " elements, the tensor has ", t.numel);
  const std::span<const std::byte> src = f.bytes(t);
  require<shape_error>(src.size() / size_of(t.dtype) >= out.size(), f.source(), ": tensor \"", t.name, "\": ",
                       src.size(), " bytes hold fewer than its ", t.numel, " elements (a tensor_info of another file?)");
  const std::byte* p = src.data();
  for (std::size_t i = 0; i < out.size(); ++i) {
    if constexpr (std::is_same_v<T, half>) {
      if (t.dtype == st_dtype::f16) { out[i].bits = detail::load_le16(p + 2 * i); continue; }
    } else if constexpr (std::is_same_v<T, bfloat16>) {
      if (t.dtype == st_dtype::bf16) { out[i].bits = detail::load_le16(p + 2 * i); continue; }
    }
    switch (t.dtype) {
      case st_dtype::f32: out[i] = store<T>(std::bit_cast<float>(detail::load_le32(p + 4 * i))); break;
      case st_dtype::f64: {
        const double x = std::bit_cast<double>(detail::load_le64(p + 8 * i));
        if constexpr (std::is_same_v<T, double>) out[i] = x;
        else if constexpr (std::is_same_v<T, float>) out[i] = static_cast<float>(x);
        else out[i] = store<T>(detail::float_round_to_odd(x));  // one rounding to 16 bits, not two
        break;
      }
      case st_dtype::f16: out[i] = store<T>(half::to_float(detail::load_le16(p + 2 * i))); break;
      default: out[i] = store<T>(bfloat16::to_float(detail::load_le16(p + 2 * i))); break;
    }
  }
}

/// Decodes the tensor named `name`, checking its shape when `expected_shape` is given.
template <class T>
std::vector<T> decode(const safetensors_file& f, std::string_view name,
                      std::optional<std::vector<index_t>> expected_shape = std::nullopt) {
  const tensor_info& t = f.at(name);
  if (expected_shape)
    require<shape_error>(t.shape == *expected_shape, f.source(), ": tensor \"", name, "\": expected shape ",
                         detail::shape_text(*expected_shape), ", got ", detail::shape_text(t.shape));
  std::vector<T> out(t.numel);
  decode<T>(f, t, std::span<T>(out));
  return out;
}

/// Encodes values as little-endian `target` bytes (F32, F64, F16, BF16; round to nearest even).
template <class T>
std::vector<std::byte> encode(std::span<const T> values, st_dtype target) {
  static_assert(is_storage_type_v<T>, "grun::io::encode: T must be float, double, grun::half or grun::bfloat16");
  require<format_error>(is_grun_float(target), "safetensors encode: expected target dtype F32, F64, F16 or BF16, got ",
                        name_of(target));
  std::vector<std::byte> out(values.size() * size_of(target));
  std::byte* p = out.data();
  for (std::size_t i = 0; i < values.size(); ++i) {
    const T& v = values[i];
    if constexpr (std::is_same_v<T, half>) {
      if (target == st_dtype::f16) { detail::store_le(p + 2 * i, v.bits); continue; }
    } else if constexpr (std::is_same_v<T, bfloat16>) {
      if (target == st_dtype::bf16) { detail::store_le(p + 2 * i, v.bits); continue; }
    }
    switch (target) {
      case st_dtype::f64: {
        double x;
        if constexpr (std::is_same_v<T, double>) x = v; else x = static_cast<double>(static_cast<float>(v));
        detail::store_le(p + 8 * i, std::bit_cast<std::uint64_t>(x));
        break;
      }
      case st_dtype::f32: detail::store_le(p + 4 * i, std::bit_cast<std::uint32_t>(static_cast<float>(v))); break;
      case st_dtype::f16: detail::store_le(p + 2 * i, half::from_float(detail::to_float_for_16_bits(v))); break;
      default: detail::store_le(p + 2 * i, bfloat16::from_float(detail::to_float_for_16_bits(v))); break;
    }
  }
  return out;
}

// ---- writer ------------------------------------------------------------------------------------
/// One tensor to write: its bytes already in the file's dtype (see encode / make_tensor).
struct tensor_record {
  std::string name;
  st_dtype dtype = st_dtype::f32;
  std::vector<index_t> shape;
  std::vector<std::byte> bytes;
};

/// A record from typed values, converted to `target`.
template <class T>
tensor_record make_tensor(std::string name, std::vector<index_t> shape, std::span<const T> values,
                          st_dtype target = to_st_dtype(dtype_of<T>())) {
  return {std::move(name), target, std::move(shape), encode<T>(values, target)};
}

/// The complete file image: header (space-padded so the data starts 8-byte aligned) then the data,
/// tensors laid out in the order given.
inline std::vector<std::byte> serialize_safetensors(std::span<const tensor_record> tensors,
                                                    const metadata_map& metadata = {}) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    header["__metadata__"] = std::move(m);
  }
  std::set<std::string_view> names;
  std::uint64_t offset = 0;
  for (const auto& t : tensors) {
    require<format_error>(t.name != "__metadata__", "safetensors write: expected a tensor name other than the "
                          "reserved \"__metadata__\"");
    require<format_error>(names.insert(t.name).second, "safetensors write: expected unique tensor names, got \"",
                          t.name, "\" twice");
    std::uint64_t numel = 1;
    for (index_t d : t.shape) {
      require<shape_error>(d >= 0, "safetensors write: tensor \"", t.name, "\": expected non-negative dimensions, got ",
                           detail::shape_text(t.shape));
      require<shape_error>(!__builtin_mul_overflow(numel, static_cast<std::uint64_t>(d), &numel),
                           "safetensors write: tensor \"", t.name, "\": element count overflows");
    }
    std::uint64_t nbytes = 0;
    require<shape_error>(!__builtin_mul_overflow(numel, size_of(t.dtype), &nbytes), "safetensors write: tensor \"",
                         t.name, "\": byte count of shape ", detail::shape_text(t.shape), " × ", name_of(t.dtype),
                         " overflows");
    require<shape_error>(nbytes == t.bytes.size(), "safetensors write: tensor \"", t.name, "\": shape ",
                         detail::shape_text(t.shape), " × ", name_of(t.dtype), " needs ", nbytes, " bytes, got ",
                         t.bytes.size());
    header[t.name] = {{"dtype", name_of(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.bytes.size()}}};
    offset += t.bytes.size();
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception& e) {
    fail<format_error>("safetensors write: expected UTF-8 tensor names and metadata, got (", e.what(), ")");
  }
  text.append((8 - (8 + text.size()) % 8) % 8, ' ');
  // What the reader accepts, so that nothing is written that could not be read back.
  require<format_error>(text.size() <= max_header_bytes, "safetensors write: expected a header of at most ",
                        max_header_bytes, " bytes (names, shapes and metadata), got ", text.size());
  std::vector<std::byte> out(8 + text.size() + offset);
  detail::store_le<std::uint64_t>(out.data(), text.size());
  std::memcpy(out.data() + 8, text.data(), text.size());
  std::byte* p = out.data() + 8 + text.size();
  for (const auto& t : tensors) {
    if (!t.bytes.empty()) std::memcpy(p, t.bytes.data(), t.bytes.size());
    p += t.bytes.size();
  }
  return out;
}

/// Writes a safetensors file atomically (temp file + fsync + rename).
inline void write_safetensors(const std::filesystem::path& path, std::span<const tensor_record> tensors,
                              const metadata_map& metadata = {}) {
  const std::vector<std::byte> image = serialize_safetensors(tensors, metadata);
  write_file_atomic(path, image);
}

}  // namespace grun::io
