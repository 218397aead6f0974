#pragma once
// grun/io/gguf.hpp — a validating reader for GGUF v2 / v3 files (ggml's model format).
//
// Layout (ggml docs/gguf.md; all integers little-endian):
//
//   "GGUF"  u32 version  u64 n_tensors  u64 n_kv
//   n_kv ×      { string key, u32 value_type, value }          metadata
//   n_tensors × { string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset }
//   padding to general.alignment (default 32)
//   data section: tensor i at offset_i from its start, offset_i = Σ_{j<i} pad(nbytes_j)
//
//   string = u64 length + bytes (no terminator); array = u32 element type, u64 count, elements.
//   ne[0] is the row length (fastest axis): ggml order is the reverse of PyTorch's shape.
//
// GGUF parsers have a record of heap overflows on crafted files (llama.cpp CVE-2024-21802,
// CVE-2025-53630, CVE-2026-27940): a count or length read from the file was trusted before the
// allocation or the pointer arithmetic it fed. So this reader trusts nothing: every count and
// length is compared with the bytes that remain BEFORE anything is allocated, every size product
// and sum is overflow-checked, and every rule below throws grun::format_error naming the rule,
// what was expected and what came:
//
//   magic "GGUF"; version 2 or 3 (v1's 32-bit counts and big-endian files rejected by name);
//   tensor / key counts, string lengths and array counts bounded by the bytes that remain;
//   value types known; bool bytes 0 or 1; arrays nested at most gguf_max_array_depth deep;
//   no duplicate key; general.alignment an integer, a non-zero power of two;
//   1 ≤ n_dims ≤ 4; every ne[i] ≥ 0; element and byte counts without overflow;
//   tensor types known (removed ids such as 4, 5, 31–33 rejected); ne[0] a multiple of the
//   block size of block-quantized types; no duplicate tensor name; each offset equal to the
//   running aligned sum; each tensor's bytes inside the file.
//
// Metadata strings (chat template included) are stored as bytes and never interpreted here.
// Host byte order is assumed little-endian (static_assert below). open() maps the file read-only
// (MAP_PRIVATE): like any mmap reader, it assumes nobody truncates the file while it is open.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/numeric.hpp"
#include "dequant.hpp"

namespace grun::io {

static_assert(std::endian::native == std::endian::little,
              "grun::io::gguf_file: the reader assumes a little-endian host");

// ---- tensor types ---------------------------------------------------------------------------
/// ggml tensor types as numbered in GGUF files (ggml.h `enum ggml_type`). Ids 4, 5, 31–33 and
/// 36–38 belonged to formats ggml has removed; they are not members and files using them are
/// rejected.
enum class gguf_type : std::uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15,
  IQ2_XXS = 16, IQ2_XS = 17, IQ3_XXS = 18, IQ1_S = 19, IQ4_NL = 20, IQ3_S = 21, IQ2_S = 22, IQ4_XS = 23,
  I8 = 24, I16 = 25, I32 = 26, I64 = 27, F64 = 28, IQ1_M = 29, BF16 = 30,
  TQ1_0 = 34, TQ2_0 = 35, MXFP4 = 39,
};

/// Block geometry of a tensor type: `block_size` elements of a row take `type_size` bytes.
struct gguf_type_traits {
  gguf_type type;
  std::string_view name;
  std::uint64_t block_size;
  std::uint64_t type_size;
};

namespace detail {
// Sizes from ggml-common.h's static_asserts on each block struct.
inline constexpr gguf_type_traits gguf_type_table[] = {
    {gguf_type::F32, "F32", 1, 4},           {gguf_type::F16, "F16", 1, 2},
    {gguf_type::Q4_0, "Q4_0", 32, 18},       {gguf_type::Q4_1, "Q4_1", 32, 20},
    {gguf_type::Q5_0, "Q5_0", 32, 22},       {gguf_type::Q5_1, "Q5_1", 32, 24},
    {gguf_type::Q8_0, "Q8_0", 32, 34},       {gguf_type::Q8_1, "Q8_1", 32, 36},  // (the Python package says 40: stale)
    {gguf_type::Q2_K, "Q2_K", 256, 84},      {gguf_type::Q3_K, "Q3_K", 256, 110},
    {gguf_type::Q4_K, "Q4_K", 256, 144},     {gguf_type::Q5_K, "Q5_K", 256, 176},
    {gguf_type::Q6_K, "Q6_K", 256, 210},     {gguf_type::Q8_K, "Q8_K", 256, 292},
    {gguf_type::IQ2_XXS, "IQ2_XXS", 256, 66}, {gguf_type::IQ2_XS, "IQ2_XS", 256, 74},
    {gguf_type::IQ3_XXS, "IQ3_XXS", 256, 98}, {gguf_type::IQ1_S, "IQ1_S", 256, 50},
    {gguf_type::IQ4_NL, "IQ4_NL", 32, 18},   {gguf_type::IQ3_S, "IQ3_S", 256, 110},
    {gguf_type::IQ2_S, "IQ2_S", 256, 82},    {gguf_type::IQ4_XS, "IQ4_XS", 256, 136},
    {gguf_type::I8, "I8", 1, 1},             {gguf_type::I16, "I16", 1, 2},
    {gguf_type::I32, "I32", 1, 4},           {gguf_type::I64, "I64", 1, 8},
    {gguf_type::F64, "F64", 1, 8},           {gguf_type::IQ1_M, "IQ1_M", 256, 56},
    {gguf_type::BF16, "BF16", 1, 2},         {gguf_type::TQ1_0, "TQ1_0", 256, 54},
    {gguf_type::TQ2_0, "TQ2_0", 256, 66},    {gguf_type::MXFP4, "MXFP4", 32, 17},
};
}  // namespace detail

/// The traits of a raw type id from a file, or nullptr when the id names no known type.
constexpr const gguf_type_traits* find_gguf_type(std::uint32_t raw) {
  for (const auto& t : detail::gguf_type_table)
    if (static_cast<std::uint32_t>(t.type) == raw) return &t;
  return nullptr;
}
constexpr const gguf_type_traits& traits_of(gguf_type t) {
  const gguf_type_traits* p = find_gguf_type(static_cast<std::uint32_t>(t));
  return p ? *p : detail::gguf_type_table[0];  // unreachable for enum members
}
constexpr std::string_view name_of(gguf_type t) { return traits_of(t).name; }
constexpr std::uint64_t block_size(gguf_type t) { return traits_of(t).block_size; }
constexpr std::uint64_t type_size(gguf_type t) { return traits_of(t).type_size; }
/// Types gguf_file::dequantize decodes.
constexpr bool can_dequantize(gguf_type t) {
  return t == gguf_type::F32 || t == gguf_type::F16 || t == gguf_type::BF16 || t == gguf_type::Q8_0 ||
         t == gguf_type::Q4_0 || t == gguf_type::Q4_1;
}

// ---- metadata values --------------------------------------------------------------------------
/// GGUF metadata value types (gguf.md `gguf_metadata_value_type`).
enum class gguf_value_type : std::uint32_t {
  uint8 = 0, int8 = 1, uint16 = 2, int16 = 3, uint32 = 4, int32 = 5, float32 = 6, boolean = 7,
  string = 8, array = 9, uint64 = 10, int64 = 11, float64 = 12,
};
constexpr std::string_view name_of(gguf_value_type t) {
  constexpr std::string_view names[] = {"uint8", "int8",    "uint16", "int16", "uint32", "int32",  "float32",
                                        "bool",  "string",  "array",  "uint64", "int64", "float64"};
  const auto i = static_cast<std::uint32_t>(t);
  return i < 13 ? names[i] : std::string_view("?");
}

/// Arrays may hold arrays; deeper nesting than this is rejected (it bounds the parser's recursion).
inline constexpr int gguf_max_array_depth = 4;

/// One metadata value. Scalars are stored as arrays of one element; nested arrays keep only their
/// element type and count (their contents are validated and skipped: no known key uses them).
struct gguf_value {
  gguf_value_type type = gguf_value_type::uint8;          // `array` for arrays
  gguf_value_type element_type = gguf_value_type::uint8;  // the scalar type, or the array's element type
  std::uint64_t count = 1;                                // array length; 1 for scalars
  std::vector<std::uint64_t> uints;                       // uint8/16/32/64 and bool
  std::vector<std::int64_t> ints;                         // int8/16/32/64
  std::vector<double> floats;                             // float32/64
  std::vector<std::string> strings;                       // string

  bool is_array() const { return type == gguf_value_type::array; }
  /// "uint32", "string", "array of int32", ...
  std::string type_name() const {
    return is_array() ? std::string("array of ").append(name_of(element_type)) : std::string(name_of(type));
  }
};

// ---- tensors ---------------------------------------------------------------------------------
struct gguf_tensor_info {
  std::string name;
  std::vector<std::int64_t> shape;  // ggml order: shape[0] = ne[0] = row length (fastest axis)
  gguf_type type = gguf_type::F32;
  std::uint64_t offset = 0;         // from the start of the data section
  std::uint64_t nbytes = 0;

  /// Product of the dimensions (checked against overflow when the file was read).
  std::int64_t n_elements() const {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

namespace detail::gguf {

inline constexpr std::uint64_t default_alignment = 32;
inline constexpr std::uint32_t max_dims = 4;

struct mapping {
  void* addr = nullptr;
  std::size_t size = 0;
  mapping() = default;
  mapping(const mapping&) = delete;
  mapping& operator=(const mapping&) = delete;
  ~mapping() { if (addr) ::munmap(addr, size); }
};

/// Checked arithmetic: false on overflow.
inline bool mul(std::uint64_t a, std::uint64_t b, std::uint64_t& out) { return !__builtin_mul_overflow(a, b, &out); }
inline bool add(std::uint64_t a, std::uint64_t b, std::uint64_t& out) { return !__builtin_add_overflow(a, b, &out); }
/// x rounded up to a multiple of the power of two `align`; false on overflow.
inline bool pad(std::uint64_t x, std::uint64_t align, std::uint64_t& out) {
  if (!add(x, align - 1, out)) return false;
  out &= ~(align - 1);
  return true;
}

/// Bounds-checked little-endian reader over the file bytes.
class cursor {
 public:
  cursor(std::span<const std::byte> bytes, const std::string& where) : bytes_(bytes), where_(where) {}

  std::uint64_t pos() const { return pos_; }
  std::uint64_t remaining() const { return bytes_.size() - pos_; }
  const std::string& where() const { return where_; }

  /// Throws "truncated" unless n more bytes exist.
  void need(std::uint64_t n, std::string_view what) const {
    if (n > remaining())
      fail<format_error>(where_, ": GGUF truncated file: ", what, ": expected ", n, " more bytes at offset ", pos_,
                         ", got ", remaining());
  }
  template <class U>
  U read(std::string_view what) {
    need(sizeof(U), what);
    U v;
    std::memcpy(&v, bytes_.data() + pos_, sizeof(U));
    pos_ += sizeof(U);
    return v;
  }
  void skip(std::uint64_t n, std::string_view what) { need(n, what); pos_ += n; }
  std::string read_string(std::string_view what) {
    const auto len = read<std::uint64_t>(what);
    if (len > remaining())
      fail<format_error>(where_, ": GGUF string length: ", what, ": expected at most ", remaining(),
                         " bytes (what remains of the file at offset ", pos_, "), got ", len);
    std::string s(reinterpret_cast<const char*>(bytes_.data() + pos_), static_cast<std::size_t>(len));
    pos_ += len;
    return s;
  }

 private:
  std::span<const std::byte> bytes_;
  const std::string& where_;
  std::uint64_t pos_ = 0;
};

/// Bytes one element of `t` takes at least (0 for unknown types).
constexpr std::uint64_t min_value_bytes(std::uint32_t t) {
  switch (static_cast<gguf_value_type>(t)) {
    case gguf_value_type::uint8: case gguf_value_type::int8: case gguf_value_type::boolean: return 1;
    case gguf_value_type::uint16: case gguf_value_type::int16: return 2;
    case gguf_value_type::uint32: case gguf_value_type::int32: case gguf_value_type::float32: return 4;
    case gguf_value_type::uint64: case gguf_value_type::int64: case gguf_value_type::float64: return 8;
    case gguf_value_type::string: return 8;   // the length
    case gguf_value_type::array: return 12;   // element type + count
  }
  return 0;
}

inline gguf_value_type read_value_type(cursor& c, std::string_view what) {
  const auto t = c.read<std::uint32_t>(what);
  if (min_value_bytes(t) == 0)
    fail<format_error>(c.where(), ": GGUF value type: ", what, ": expected a type id in 0..12, got ", t);
  return static_cast<gguf_value_type>(t);
}

/// Appends one element of scalar type t to v (t is not `array`).
inline void read_element(cursor& c, gguf_value_type t, gguf_value& v, const std::string& what) {
  switch (t) {
    case gguf_value_type::uint8: v.uints.push_back(c.read<std::uint8_t>(what)); break;
    case gguf_value_type::uint16: v.uints.push_back(c.read<std::uint16_t>(what)); break;
    case gguf_value_type::uint32: v.uints.push_back(c.read<std::uint32_t>(what)); break;
    case gguf_value_type::uint64: v.uints.push_back(c.read<std::uint64_t>(what)); break;
    case gguf_value_type::int8: v.ints.push_back(c.read<std::int8_t>(what)); break;
    case gguf_value_type::int16: v.ints.push_back(c.read<std::int16_t>(what)); break;
    case gguf_value_type::int32: v.ints.push_back(c.read<std::int32_t>(what)); break;
    case gguf_value_type::int64: v.ints.push_back(c.read<std::int64_t>(what)); break;
    case gguf_value_type::float32: v.floats.push_back(c.read<float>(what)); break;
    case gguf_value_type::float64: v.floats.push_back(c.read<double>(what)); break;
    case gguf_value_type::boolean: {
      const auto b = c.read<std::uint8_t>(what);
      if (b > 1) fail<format_error>(c.where(), ": GGUF bool value: ", what, ": expected 0 or 1, got ", unsigned(b));
      v.uints.push_back(b);
      break;
    }
    case gguf_value_type::string: v.strings.push_back(c.read_string(what)); break;
    case gguf_value_type::array: break;  // handled by read_array
  }
}

/// Reads an array header and its elements. Nested arrays are validated recursively and skipped.
inline void read_array(cursor& c, gguf_value& v, const std::string& what, int depth) {
  if (depth > gguf_max_array_depth)
    fail<format_error>(c.where(), ": GGUF array nesting: ", what, ": expected arrays nested at most ",
                       gguf_max_array_depth, " deep, got deeper");
  v.type = gguf_value_type::array;
  v.element_type = read_value_type(c, what + " (array element type)");
  v.count = c.read<std::uint64_t>(what + " (array count)");
  const std::uint64_t min_bytes = min_value_bytes(static_cast<std::uint32_t>(v.element_type));
  if (v.count > c.remaining() / min_bytes)
    fail<format_error>(c.where(), ": GGUF array count: ", what, ": expected at most ", c.remaining() / min_bytes,
                       " elements of ", name_of(v.element_type), " (", min_bytes, "+ bytes each, ", c.remaining(),
                       " bytes remain), got ", v.count);
  const auto n = static_cast<std::size_t>(v.count);
  switch (v.element_type) {
    case gguf_value_type::array: {
      for (std::size_t i = 0; i < n; ++i) {
        gguf_value inner;  // validated, then dropped
        read_array(c, inner, what, depth + 1);
      }
      return;
    }
    case gguf_value_type::string: v.strings.reserve(n); break;
    case gguf_value_type::int8: case gguf_value_type::int16: case gguf_value_type::int32:
    case gguf_value_type::int64: v.ints.reserve(n); break;
    case gguf_value_type::float32: case gguf_value_type::float64: v.floats.reserve(n); break;
    default: v.uints.reserve(n); break;
  }
  for (std::size_t i = 0; i < n; ++i) read_element(c, v.element_type, v, what);
}

}  // namespace detail::gguf

// ---- the file --------------------------------------------------------------------------------
/// A validated GGUF file: metadata, tensor directory, and the bytes (mmap'd or owned).
/// Immutable after construction; copies share the bytes.
class gguf_file {
 public:
  /// Maps `path` read-only and validates it. I/O failures throw grun::error, malformed
  /// contents grun::format_error.
  static gguf_file open(const std::filesystem::path& path) {
    const std::string where = path.string();
    // O_NONBLOCK: a FIFO is refused below (not a regular file) instead of blocking open() forever.
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) { const int e = errno; fail<error>("cannot read GGUF file '", where, "' (", std::strerror(e), ")"); }
    struct ::stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      fail<error>("cannot read GGUF file '", where, "': expected a regular file");
    }
    auto owner = std::make_shared<detail::gguf::mapping>();
    const auto size = static_cast<std::size_t>(st.st_size);
    if (size > 0) {
      void* a = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
      if (a == MAP_FAILED) {
        const int e = errno;
        ::close(fd);
        fail<error>("cannot read GGUF file '", where, "': mmap failed (", std::strerror(e), ")");
      }
      owner->addr = a;
      owner->size = size;
    }
    ::close(fd);
    std::span<const std::byte> bytes(static_cast<const std::byte*>(owner->addr), owner->size);
    return gguf_file(std::move(owner), bytes, where);
  }

  /// Validates an in-memory file (kept alive by the result). `source` names it in errors.
  static gguf_file from_bytes(std::vector<std::byte> bytes, std::string source = "<memory>") {
    auto owner = std::make_shared<std::vector<std::byte>>(std::move(bytes));
    std::span<const std::byte> view(owner->data(), owner->size());
    return gguf_file(std::move(owner), view, std::move(source));
  }

  std::uint32_t version() const { return version_; }
  /// The path (or "<memory>"), as used in error messages.
  const std::string& source() const { return source_; }
  std::uint64_t alignment() const { return alignment_; }
  /// Offset of the data section from the start of the file.
  std::uint64_t data_offset() const { return data_offset_; }

  // -- metadata
  bool has(std::string_view key) const { return kv_.find(key) != kv_.end(); }
  /// Keys in file order.
  const std::vector<std::string>& keys() const { return key_order_; }
  /// The raw value; format_error when absent.
  const gguf_value& value(std::string_view key) const {
    const auto it = kv_.find(key);
    if (it == kv_.end()) fail<format_error>(source_, ": GGUF key '", key, "': expected it in the metadata, the file has no such key");
    return it->second;
  }

  std::string get_string(std::string_view key) const {
    const gguf_value& v = expect(key, "string", !v_is_array(key) && value(key).type == gguf_value_type::string);
    return v.strings[0];
  }
  bool get_bool(std::string_view key) const {
    const gguf_value& v = expect(key, "bool", !v_is_array(key) && value(key).type == gguf_value_type::boolean);
    return v.uints[0] != 0;
  }
  /// Any integer type whose value is non-negative.
  std::uint64_t get_uint(std::string_view key) const {
    const gguf_value& v = expect(key, "an unsigned integer", !v_is_array(key) && is_integer(value(key).type));
    if (!v.ints.empty()) {
      if (v.ints[0] < 0) fail<format_error>(source_, ": GGUF key '", key, "': expected a non-negative integer, got ", v.ints[0]);
      return static_cast<std::uint64_t>(v.ints[0]);
    }
    return v.uints[0];
  }
  /// Any integer type whose value fits int64.
  std::int64_t get_int(std::string_view key) const {
    const gguf_value& v = expect(key, "an integer", !v_is_array(key) && is_integer(value(key).type));
    if (!v.ints.empty()) return v.ints[0];
    if (v.uints[0] > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
      fail<format_error>(source_, ": GGUF key '", key, "': expected an integer that fits int64, got ", v.uints[0]);
    return static_cast<std::int64_t>(v.uints[0]);
  }
  /// float32 or float64.
  double get_float(std::string_view key) const {
    const gguf_value& v = expect(key, "float32 or float64", !v_is_array(key) && is_float(value(key).type));
    return v.floats[0];
  }
  std::vector<std::string> get_string_array(std::string_view key) const {
    return expect(key, "array of string", v_is_array(key) && value(key).element_type == gguf_value_type::string).strings;
  }
  /// Arrays of any integer type; uint64 values above int64's range are rejected.
  std::vector<std::int64_t> get_int_array(std::string_view key) const {
    const gguf_value& v = expect(key, "array of integers", v_is_array(key) && is_integer(value(key).element_type));
    if (!v.ints.empty() || v.count == 0) return v.ints;
    std::vector<std::int64_t> out;
    out.reserve(v.uints.size());
    for (auto u : v.uints) {
      if (u > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
        fail<format_error>(source_, ": GGUF key '", key, "': expected integers that fit int64, got ", u);
      out.push_back(static_cast<std::int64_t>(u));
    }
    return out;
  }
  std::vector<double> get_float_array(std::string_view key) const {
    return expect(key, "array of float32 or float64", v_is_array(key) && is_float(value(key).element_type)).floats;
  }

  // -- tensors
  /// Tensor directory in file order.
  const std::vector<gguf_tensor_info>& tensors() const { return tensors_; }
  const gguf_tensor_info* find(std::string_view name) const {
    const auto it = tensor_index_.find(name);
    return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
  }
  const gguf_tensor_info& tensor(std::string_view name) const {
    const gguf_tensor_info* t = find(name);
    if (!t) fail<format_error>(source_, ": GGUF tensor '", name, "': expected it in the tensor directory, the file has no such tensor");
    return *t;
  }
  /// The tensor's bytes inside the file (valid as long as any copy of this gguf_file lives).
  /// `t` must describe a tensor of this file (checked: a tensor_info from another file, or one
  /// edited by the caller, is a format_error rather than an out-of-bounds read).
  std::span<const std::byte> tensor_bytes(const gguf_tensor_info& t) const {
    const gguf_tensor_info& own = owned(t);
    return bytes_.subspan(static_cast<std::size_t>(data_offset_ + own.offset), static_cast<std::size_t>(own.nbytes));
  }

  /// Decodes F32 / F16 / BF16 / Q8_0 / Q4_0 / Q4_1 into `out` (n_elements floats), in ggml
  /// order (ne[0] fastest): element (i0, i1, ...) lands at i0 + ne0·(i1 + ne1·(...)).
  void dequantize_into(const gguf_tensor_info& t, std::span<float> out) const {
    (void)owned(t);  // first: shape, type and bytes are then the validated ones
    if (!can_dequantize(t.type))
      fail<format_error>(source_, ": GGUF dequantize: tensor '", t.name, "': expected type F32, F16, BF16, Q8_0, Q4_0 or Q4_1, got ",
                         name_of(t.type));
    const auto n = t.n_elements();
    require<shape_error>(out.size() == static_cast<std::size_t>(n), "GGUF dequantize: tensor '", t.name, "': expected an output of ",
                         n, " floats, got ", out.size());
    const auto bytes = tensor_bytes(t);  // nbytes matches shape and type: checked when the file was read
    const auto* src = reinterpret_cast<const unsigned char*>(bytes.data());
    float* dst = out.data();
    // Rows are contiguous and ne[0] is a multiple of the block size, so the whole tensor is one
    // run of blocks.
    switch (t.type) {
      case gguf_type::F32: dequant::row_f32(src, dst, n); break;
      case gguf_type::F16: dequant::row_f16(src, dst, n); break;
      case gguf_type::BF16: dequant::row_bf16(src, dst, n); break;
      case gguf_type::Q8_0: dequant::row_q8_0(src, dst, n); break;
      case gguf_type::Q4_0: dequant::row_q4_0(src, dst, n); break;
      case gguf_type::Q4_1: dequant::row_q4_1(src, dst, n); break;
      default: break;  // excluded by can_dequantize
    }
  }
  std::vector<float> dequantize(const gguf_tensor_info& t) const {
    (void)owned(t);  // before allocating n floats
    if (!can_dequantize(t.type))
      fail<format_error>(source_, ": GGUF dequantize: tensor '", t.name, "': expected type F32, F16, BF16, Q8_0, Q4_0 or Q4_1, got ",
                         name_of(t.type));
    std::vector<float> out(static_cast<std::size_t>(t.n_elements()));
    dequantize_into(t, out);
    return out;
  }

 private:
  gguf_file(std::shared_ptr<const void> owner, std::span<const std::byte> bytes, std::string source)
      : owner_(std::move(owner)), bytes_(bytes), source_(std::move(source)) {
    parse();
  }

  static bool is_integer(gguf_value_type t) {
    switch (t) {
      case gguf_value_type::uint8: case gguf_value_type::int8: case gguf_value_type::uint16: case gguf_value_type::int16:
      case gguf_value_type::uint32: case gguf_value_type::int32: case gguf_value_type::uint64: case gguf_value_type::int64:
        return true;
      default: return false;
    }
  }
  static bool is_float(gguf_value_type t) { return t == gguf_value_type::float32 || t == gguf_value_type::float64; }
  bool v_is_array(std::string_view key) const { return value(key).is_array(); }

  /// The value at key when `ok`; otherwise "expected <wanted>, got <type>".
  const gguf_value& expect(std::string_view key, std::string_view wanted, bool ok) const {
    const gguf_value& v = value(key);
    if (!ok) fail<format_error>(source_, ": GGUF key '", key, "': expected ", wanted, ", got ", v.type_name());
    return v;
  }

  /// This file's entry for t, when t is (a copy of) one of this file's tensor_infos.
  const gguf_tensor_info& owned(const gguf_tensor_info& t) const {
    const gguf_tensor_info* own = find(t.name);
    if (!own || own->offset != t.offset || own->nbytes != t.nbytes || own->type != t.type || own->shape != t.shape)
      fail<format_error>(source_, ": GGUF tensor data: tensor '", t.name,
                         "': expected a tensor_info of this file, got one that does not match its directory");
    return *own;
  }

  void parse() {
    namespace g = detail::gguf;
    const std::string& w = source_;
    g::cursor c(bytes_, w);

    // header
    if (c.remaining() < 4 || std::memcmp(bytes_.data(), "GGUF", 4) != 0) {
      std::string got(reinterpret_cast<const char*>(bytes_.data()), std::min<std::size_t>(4, bytes_.size()));
      for (auto& ch : got) if (ch < 0x20 || ch > 0x7e) ch = '?';
      fail<format_error>(w, ": GGUF magic: expected the file to start with \"GGUF\", got \"", got, "\" (", bytes_.size(),
                         " bytes in the file)");
    }
    c.skip(4, "magic");
    version_ = c.read<std::uint32_t>("header version");
    if (version_ == 1)
      fail<format_error>(w, ": GGUF version: expected 2 or 3, got 1 (GGUF v1, 32-bit counts, is not supported)");
    if (version_ == 0x02000000u || version_ == 0x03000000u)
      fail<format_error>(w, ": GGUF version: expected 2 or 3 (little-endian), got ", version_,
                         ", the byte-swapped ", __builtin_bswap32(version_), " of a big-endian file, which is not supported");
    if (version_ != 2 && version_ != 3) fail<format_error>(w, ": GGUF version: expected 2 or 3, got ", version_);
    const auto n_tensors = c.read<std::uint64_t>("header tensor count");
    const auto n_kv = c.read<std::uint64_t>("header key count");
    // Cheapest possible entries: key = 8-byte length + 4-byte type + 1-byte value; tensor info =
    // 8-byte name length + 4-byte n_dims + one 8-byte dim + 4-byte type + 8-byte offset.
    constexpr std::uint64_t min_kv_bytes = 13, min_tensor_bytes = 32;
    if (n_kv > c.remaining() / min_kv_bytes)
      fail<format_error>(w, ": GGUF key count: expected at most ", c.remaining() / min_kv_bytes, " keys (", min_kv_bytes,
                         "+ bytes each, ", c.remaining(), " bytes remain), got ", n_kv);
    if (n_tensors > c.remaining() / min_tensor_bytes)
      fail<format_error>(w, ": GGUF tensor count: expected at most ", c.remaining() / min_tensor_bytes, " tensors (",
                         min_tensor_bytes, "+ bytes each, ", c.remaining(), " bytes remain), got ", n_tensors);

    // metadata
    key_order_.reserve(static_cast<std::size_t>(n_kv));
    for (std::uint64_t i = 0; i < n_kv; ++i) {
      std::string key = c.read_string("key #" + std::to_string(i) + " name");
      const std::string what = "key '" + key + "'";
      if (kv_.find(key) != kv_.end())
        fail<format_error>(w, ": GGUF duplicate key: expected each key once, got '", key, "' again as key #", i);
      gguf_value v;
      v.type = g::read_value_type(c, what);
      if (v.type == gguf_value_type::array) {
        g::read_array(c, v, what, 1);
      } else {
        v.element_type = v.type;
        g::read_element(c, v.type, v, what);
      }
      key_order_.push_back(key);
      kv_.emplace(std::move(key), std::move(v));
    }

    alignment_ = g::default_alignment;
    if (has("general.alignment")) {
      const gguf_value& a = value("general.alignment");
      if (a.is_array() || !is_integer(a.type))
        fail<format_error>(w, ": GGUF alignment: expected general.alignment to be an integer, got ", a.type_name());
      const bool negative = !a.ints.empty() && a.ints[0] < 0;
      const std::uint64_t al = a.ints.empty() ? a.uints[0] : static_cast<std::uint64_t>(a.ints[0]);
      if (negative || !std::has_single_bit(al))
        fail<format_error>(w, ": GGUF alignment: expected general.alignment to be a non-zero power of two, got ",
                           negative ? std::to_string(a.ints[0]) : std::to_string(al));
      alignment_ = al;
    }

    // tensor directory
    if (n_tensors > c.remaining() / min_tensor_bytes)
      fail<format_error>(w, ": GGUF tensor count: expected at most ", c.remaining() / min_tensor_bytes, " tensors (",
                         min_tensor_bytes, "+ bytes each, ", c.remaining(), " bytes remain after the metadata), got ",
                         n_tensors);
    tensors_.reserve(static_cast<std::size_t>(n_tensors));
    std::uint64_t running = 0;  // Σ pad(nbytes) of the tensors before this one
    for (std::uint64_t i = 0; i < n_tensors; ++i) {
      gguf_tensor_info t;
      t.name = c.read_string("tensor #" + std::to_string(i) + " name");
      const std::string what = "tensor '" + t.name + "'";
      if (tensor_index_.find(t.name) != tensor_index_.end())
        fail<format_error>(w, ": GGUF duplicate tensor: expected each tensor name once, got '", t.name, "' again as tensor #", i);
      const auto n_dims = c.read<std::uint32_t>(what + " n_dims");
      if (n_dims < 1 || n_dims > g::max_dims)
        fail<format_error>(w, ": GGUF n_dims: ", what, ": expected 1 to ", g::max_dims, " dimensions, got ", n_dims);
      t.shape.resize(n_dims);
      std::uint64_t elements = 1;
      for (std::uint32_t d = 0; d < n_dims; ++d) {
        const auto ne = c.read<std::int64_t>(what + " dimension");
        if (ne < 0) fail<format_error>(w, ": GGUF dimension: ", what, ": expected ne[", d, "] >= 0, got ", ne);
        if (!g::mul(elements, static_cast<std::uint64_t>(ne), elements) ||
            elements > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
          fail<format_error>(w, ": GGUF element count: ", what, ": expected a product of dimensions below 2^63, got an overflow at ne[",
                             d, "] = ", ne);
        t.shape[d] = ne;
      }
      const auto raw_type = c.read<std::uint32_t>(what + " type");
      const gguf_type_traits* tr = find_gguf_type(raw_type);
      if (!tr)
        fail<format_error>(w, ": GGUF tensor type: ", what, ": expected a known ggml type id, got ", raw_type,
                           raw_type == 4 || raw_type == 5 || (raw_type >= 31 && raw_type <= 33) || (raw_type >= 36 && raw_type <= 38)
                               ? " (a format ggml has removed)" : "");
      t.type = tr->type;
      if (static_cast<std::uint64_t>(t.shape[0]) % tr->block_size != 0)
        fail<format_error>(w, ": GGUF block size: ", what, ": expected the row length ne[0] to be a multiple of ",
                           tr->block_size, " for type ", tr->name, ", got ", t.shape[0]);
      std::uint64_t nbytes = static_cast<std::uint64_t>(t.shape[0]) / tr->block_size;
      bool ok = g::mul(nbytes, tr->type_size, nbytes);
      for (std::uint32_t d = 1; d < n_dims && ok; ++d) ok = g::mul(nbytes, static_cast<std::uint64_t>(t.shape[d]), nbytes);
      if (!ok) fail<format_error>(w, ": GGUF byte count: ", what, ": expected a byte count below 2^64, got an overflow");
      t.nbytes = nbytes;
      t.offset = c.read<std::uint64_t>(what + " offset");
      if (t.offset != running)
        fail<format_error>(w, ": GGUF tensor offset: ", what, ": expected offset ", running,
                           " (the previous tensors' sizes, each padded to ", alignment_, "), got ", t.offset);
      std::uint64_t padded = 0;
      if (!g::pad(nbytes, alignment_, padded) || !g::add(running, padded, running))
        fail<format_error>(w, ": GGUF byte count: ", what, ": expected the data section size below 2^64, got an overflow");
      tensor_index_.emplace(t.name, tensors_.size());
      tensors_.push_back(std::move(t));
    }

    // data section
    if (!g::pad(c.pos(), alignment_, data_offset_))
      fail<format_error>(w, ": GGUF alignment: expected the data section start to fit 64 bits, got an overflow");
    for (const auto& t : tensors_) {
      std::uint64_t end = 0;
      if (!g::add(data_offset_, t.offset, end) || !g::add(end, t.nbytes, end) || end > bytes_.size())
        fail<format_error>(w, ": GGUF tensor data: tensor '", t.name, "': expected its ", t.nbytes,
                           " bytes inside the file, got data offset ", data_offset_, " + offset ", t.offset,
                           " + size ", t.nbytes, " past the file's end at ", bytes_.size());
    }
  }

  std::shared_ptr<const void> owner_;
  std::span<const std::byte> bytes_;
  std::string source_;
  std::uint32_t version_ = 0;
  std::uint64_t alignment_ = detail::gguf::default_alignment;
  std::uint64_t data_offset_ = 0;
  std::map<std::string, gguf_value, std::less<>> kv_;
  std::vector<std::string> key_order_;
  std::vector<gguf_tensor_info> tensors_;
  std::map<std::string, std::size_t, std::less<>> tensor_index_;
};

}  // namespace grun::io
