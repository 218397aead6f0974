#pragma once
// examples/llm/tokenizer.hpp — byte-level BPE (GPT-2 style) as stored in a GGUF, for SmolLM2 and kin.
//
// encode(bytes) = concat over pieces p of bpe(byte_level(p)), where the pieces come from
//   1. added tokens (GGUF token_type CONTROL = 3 / USER_DEFINED = 4, e.g. <|im_start|>) matched literally,
//      leftmost-longest, before anything else (Hugging Face's AddedVocabulary does the same);
//   2. UTF-8 validation: maximal invalid byte runs become pieces of their own (HF only sees valid str);
//   3. the model's pre-tokenizer, a Unicode regex run with PCRE2 (UTF + UCP, JIT when available):
//        gpt2   : 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//                 (HF tokenizers' ByteLevel(use_regex=true) pattern)
//        smollm : every \p{N} character isolated first (HF Digits(individual_digits=true)), then gpt2 on
//                 the rest — SmolLM2's tokenizer.json and llama.cpp's "smollm" pre-tokenizer.
//   4. per piece, BPE over byte-level symbols: repeatedly merge the adjacent pair with the lowest merge
//      rank, leftmost first on ties (HF BPE::merge_word); a heap + linked list makes this O(n log n).
//
// PCRE2 never fails an encode: on a match/heap/JIT-stack limit the rest of that run goes through
// detail::exact_splitter, a hand-written linear scan with the same semantics as the gpt2 pattern
// (character classes still come from PCRE2), and tests check it against the reference ids.
// Link with pcre2-8.
#ifndef PCRE2_CODE_UNIT_WIDTH
#  define PCRE2_CODE_UNIT_WIDTH 8
#endif
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <queue>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <grun/core/error.hpp>
#include <grun/io/gguf.hpp>

namespace llm {

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
enum class token_kind : std::int32_t { normal = 1, unknown = 2, control = 3, user_defined = 4, unused = 5, byte = 6 };

/// How text is cut into words before BPE (`tokenizer.ggml.pre`).
enum class pre_tokenizer {
  gpt2,    ///< GPT-2 / HF ByteLevel regex only ("gpt2", and what transformers' GGUF loader builds for "smollm")
  smollm,  ///< each \p{N} character alone, then the gpt2 regex ("smollm", "starcoder", "refact", "codeshell")
};

/// What a byte whose byte-level symbol is not in the vocabulary becomes. SmolLM2's vocabulary lacks the
/// symbols of 0x04 0x06 0x13 0x14 0x16 0x1D and of the bytes UTF-8 never uses (0xC0 0xC1 0xF5–0xFF).
enum class missing_byte {
  drop,           ///< skipped, as Hugging Face's BPE does when the model has no unk token (default)
  unknown_token,  ///< emitted as the vocabulary's unknown token id
  fail,           ///< throw grun::format_error
};

/// Everything a GGUF says about its tokenizer, in GGUF terms. Tokens are spelled in the byte-level
/// alphabet (space = "Ġ"); merges are "left right" with rank = position.
struct vocabulary {
  std::vector<std::string> tokens;
  std::vector<std::int32_t> types;  ///< token_kind per token; empty = all normal
  std::vector<std::string> merges;
  std::string model = "gpt2";       ///< tokenizer.ggml.model
  std::string pre = "gpt2";         ///< tokenizer.ggml.pre
  std::int32_t bos_id = -1, eos_id = -1, unk_id = -1, pad_id = -1;
  std::string chat_template;        ///< tokenizer.chat_template (Jinja source; never evaluated)
};

struct tokenizer_options {
  std::optional<llm::pre_tokenizer> pre;  ///< override what `vocabulary::pre` names
  missing_byte on_missing_byte = missing_byte::drop;
  std::uint32_t match_limit = 50'000'000;  ///< PCRE2 match limit per match call (then: exact splitter)
  std::uint32_t heap_limit_kib = 64 * 1024;
  bool force_fallback = false;  ///< testing: split with the hand-written scanner instead of the regex
};

/// Maps a `tokenizer.ggml.pre` name to the split it means; throws format_error for names not supported.
inline pre_tokenizer pre_tokenizer_for(std::string_view name) {
  if (name == "gpt2" || name == "default" || name == "gpt-2") return pre_tokenizer::gpt2;
  if (name == "smollm" || name == "starcoder" || name == "refact" || name == "codeshell") return pre_tokenizer::smollm;
  grun::fail<grun::format_error>("tokenizer: pre-tokenizer '", name,
                                 "' is not supported (expected gpt2, default, smollm, starcoder, refact or codeshell)");
}

namespace detail {

// ---- GPT-2's byte ↔ unicode alphabet ------------------------------------------------------------
// Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other 68 bytes get
// code points 256, 257, … in byte order, so every byte has a visible, non-space symbol.
struct byte_alphabet {
  std::array<char32_t, 256> symbol{};
  std::array<std::int16_t, 324> byte_of{};  // code point → byte, -1 if not a symbol
  byte_alphabet() {
    byte_of.fill(-1);
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      symbol[b] = printable ? static_cast<char32_t>(b) : next++;
      byte_of[symbol[b]] = static_cast<std::int16_t>(b);
    }
  }
};
inline const byte_alphabet& alphabet() {
  static const byte_alphabet a;
  return a;
}

inline void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

/// Length of the well-formed UTF-8 sequence at s[i] (Unicode Table 3-7: no overlongs, no surrogates,
/// ≤ U+10FFFF — the same rule PCRE2 checks), or 0 if the bytes there are not one.
inline std::size_t utf8_length(std::string_view s, std::size_t i) {
  const auto at = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = at(i);
  const std::size_t left = s.size() - i;
  const auto cont = [&](std::size_t k, unsigned lo = 0x80, unsigned hi = 0xBF) { return at(i + k) >= lo && at(i + k) <= hi; };
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) return left >= 2 && cont(1) ? 2 : 0;
  if (c >= 0xE0 && c <= 0xEF) {
    if (left < 3) return 0;
    const unsigned lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
    return cont(1, lo, hi) && cont(2) ? 3 : 0;
  }
  if (c >= 0xF0 && c <= 0xF4) {
    if (left < 4) return 0;
    const unsigned lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
    return cont(1, lo, hi) && cont(2) && cont(3) ? 4 : 0;
  }
  return 0;
}

/// Decodes a well-formed sequence (checked by utf8_length) at s[i].
inline char32_t utf8_decode(std::string_view s, std::size_t i, std::size_t len) {
  const auto at = [&](std::size_t k) { return static_cast<char32_t>(static_cast<unsigned char>(s[i + k])); };
  switch (len) {
    case 1: return at(0);
    case 2: return ((at(0) & 0x1F) << 6) | (at(1) & 0x3F);
    case 3: return ((at(0) & 0x0F) << 12) | ((at(1) & 0x3F) << 6) | (at(2) & 0x3F);
    default: return ((at(0) & 0x07) << 18) | ((at(1) & 0x3F) << 12) | ((at(2) & 0x3F) << 6) | (at(3) & 0x3F);
  }
}

// ---- PCRE2 handles ----------------------------------------------------------------------------------
struct pcre2_code_free_fn { void operator()(pcre2_code_8* p) const { pcre2_code_free_8(p); } };
struct pcre2_context_free_fn { void operator()(pcre2_match_context_8* p) const { pcre2_match_context_free_8(p); } };
struct pcre2_data_free_fn { void operator()(pcre2_match_data_8* p) const { pcre2_match_data_free_8(p); } };
using pcre2_code_ptr = std::unique_ptr<pcre2_code_8, pcre2_code_free_fn>;
using pcre2_context_ptr = std::unique_ptr<pcre2_match_context_8, pcre2_context_free_fn>;
using pcre2_data_ptr = std::unique_ptr<pcre2_match_data_8, pcre2_data_free_fn>;

inline std::string pcre2_message(int code) {
  std::array<PCRE2_UCHAR8, 256> buf{};
  pcre2_get_error_message_8(code, buf.data(), buf.size());
  return reinterpret_cast<const char*>(buf.data());
}

/// Compiles `pattern` with UTF + UCP (\s, \d, \w and POSIX classes follow Unicode properties) and
/// JIT-compiles it when the library supports JIT; the interpreter is used otherwise.
inline pcre2_code_ptr compile_regex(std::string_view pattern) {
  int err = 0;
  PCRE2_SIZE offset = 0;
  pcre2_code_ptr code(pcre2_compile_8(reinterpret_cast<PCRE2_SPTR8>(pattern.data()), pattern.size(),
                                      PCRE2_UTF | PCRE2_UCP, &err, &offset, nullptr));
  if (!code) grun::fail<grun::error>("tokenizer: PCRE2 rejected the pattern ", pattern, " at offset ", offset, ": ", pcre2_message(err));
  (void)pcre2_jit_compile_8(code.get(), PCRE2_JIT_COMPLETE);  // optional speed-up; failure is fine
  return code;
}

// Character classes the gpt2 pattern distinguishes.
enum class char_class : std::uint8_t { letter, number, space, other };

/// Splits one well-formed UTF-8 segment exactly as the gpt2 pattern would, in one linear pass:
///   's|'t|'re|'ve|'m|'ll|'d | ␣?L+ | ␣?N+ | ␣?O+ | \s+(?!\S) | \s+
/// where O = not space, letter or number. At each position the first alternative that matches wins,
/// and every alternative is a greedy run of one class, so no backtracking beyond one character is
/// needed: `\s+(?!\S)` gives back only the last space of a run that is followed by a non-space.
template <class Classify, class Emit>
void exact_split(std::string_view s, std::size_t pos, Classify&& classify, Emit&& emit) {
  const std::size_t end = s.size();
  const auto len_at = [&](std::size_t i) { return utf8_length(s, i); };
  const auto run_of = [&](std::size_t i, char_class c) {  // end of the run of class c starting at i
    while (i < end) {
      const std::size_t n = len_at(i);
      if (classify(i, n) != c) break;
      i += n;
    }
    return i;
  };
  while (pos < end) {
    const std::size_t n = len_at(pos);
    const char ch = s[pos];
    if (ch == '\'' && pos + 1 < end) {  // contractions, case-sensitive like the pattern
      const std::string_view rest = s.substr(pos + 1, 2);
      std::size_t k = 0;
      if (rest.starts_with("re") || rest.starts_with("ve") || rest.starts_with("ll")) k = 3;
      else if (rest[0] == 's' || rest[0] == 't' || rest[0] == 'm' || rest[0] == 'd') k = 2;
      if (k) { emit(pos, pos + k); pos += k; continue; }
    }
    const char_class c = classify(pos, n);
    if (ch == ' ' && pos + 1 < end) {
      const char_class next = classify(pos + 1, len_at(pos + 1));
      if (next != char_class::space) {
        const std::size_t stop = run_of(pos + 1, next);
        emit(pos, stop);
        pos = stop;
        continue;
      }
    }
    if (c != char_class::space) {
      const std::size_t stop = run_of(pos, c);
      emit(pos, stop);
      pos = stop;
      continue;
    }
    // Whitespace run [pos, stop) and where its last character starts.
    std::size_t stop = pos, last = pos, count = 0;
    while (stop < end) {
      const std::size_t k = len_at(stop);
      if (classify(stop, k) != char_class::space) break;
      last = stop;
      stop += k;
      ++count;
    }
    const std::size_t cut = (stop == end || count == 1) ? stop : last;  // \s+(?!\S), else \s+ (one char)
    emit(pos, cut);
    pos = cut;
  }
}

// ---- BPE merge of one word ----------------------------------------------------------------------------
struct merge_rule {
  std::int32_t rank;
  std::int32_t result;
};
inline std::uint64_t pair_key(std::int32_t a, std::int32_t b) {
  return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(a)) << 32) | static_cast<std::uint32_t>(b);
}

/// Merges `ids` in place (byte-level symbols in, tokens out). Each step merges the live adjacent pair
/// of lowest rank, the leftmost one on ties — HF's BPE::merge_word order. Stale heap entries (a side
/// already merged into something else) are skipped when popped. O(n log n) for n symbols.
inline void bpe_merge(std::vector<std::int32_t>& ids, const std::unordered_map<std::uint64_t, merge_rule>& merges) {
  const std::size_t n = ids.size();
  if (n < 2) return;
  struct candidate {
    std::int32_t rank;
    std::uint32_t left;  // index of the left symbol (its original position: orders ties left to right)
    std::int32_t left_id, right_id, result;
    bool operator>(const candidate& o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
  };
  std::vector<std::uint32_t> next(n), prev(n);
  std::vector<bool> alive(n, true);
  constexpr std::uint32_t none = 0xFFFFFFFFu;
  for (std::size_t i = 0; i < n; ++i) {
    next[i] = i + 1 < n ? static_cast<std::uint32_t>(i + 1) : none;
    prev[i] = i > 0 ? static_cast<std::uint32_t>(i - 1) : none;
  }
  std::vector<candidate> storage;
  storage.reserve(n);
  std::priority_queue<candidate, std::vector<candidate>, std::greater<>> heap(std::greater<>{}, std::move(storage));
  const auto consider = [&](std::uint32_t l) {
    if (l == none || next[l] == none) return;
    const auto it = merges.find(pair_key(ids[l], ids[next[l]]));
    if (it != merges.end()) heap.push({it->second.rank, l, ids[l], ids[next[l]], it->second.result});
  };
  for (std::uint32_t i = 0; i + 1 < n; ++i) consider(i);
  while (!heap.empty()) {
    const candidate c = heap.top();
    heap.pop();
    const std::uint32_t r = next[c.left];
    if (!alive[c.left] || r == none || ids[c.left] != c.left_id || ids[r] != c.right_id) continue;  // stale
    ids[c.left] = c.result;
    alive[r] = false;
    next[c.left] = next[r];
    if (next[r] != none) prev[next[r]] = c.left;
    consider(prev[c.left]);
    consider(c.left);
  }
  std::size_t w = 0;
  for (std::uint32_t i = 0; i != none; i = next[i]) ids[w++] = ids[i];
  ids.resize(w);
}

}  // namespace detail

/// Byte-level BPE tokenizer over a GGUF vocabulary. Immutable after construction; encode/decode are
/// const and safe to call from several threads at once.
class bpe_tokenizer {
 public:
  /// The gpt2 pattern (HF tokenizers' ByteLevel regex, including its final `\s+`).
  static constexpr std::string_view gpt2_pattern =
      R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

  explicit bpe_tokenizer(vocabulary v, tokenizer_options o = {}) : vocab_(std::move(v)), opt_(o) {
    using grun::format_error;
    grun::require<format_error>(vocab_.model == "gpt2", "tokenizer: expected a byte-level BPE vocabulary (tokenizer.ggml.model "
                                "'gpt2'), got '", vocab_.model, "'");
    const std::size_t count = vocab_.tokens.size();
    grun::require<format_error>(count > 0 && count < 0x7FFFFFFF, "tokenizer: expected 1..2^31-2 tokens, got ", count);
    grun::require<format_error>(vocab_.types.empty() || vocab_.types.size() == count, "tokenizer: expected ", count,
                                " token types (one per token), got ", vocab_.types.size());
    for (const auto id : {vocab_.bos_id, vocab_.eos_id, vocab_.unk_id, vocab_.pad_id})
      grun::require<format_error>(id >= -1 && id < static_cast<std::int64_t>(count), "tokenizer: special token id ", id,
                                  " outside the vocabulary of ", count, " tokens");
    pre_ = opt_.pre ? *opt_.pre : pre_tokenizer_for(vocab_.pre);

    const auto& abc = detail::alphabet();
    ids_.reserve(count * 2);
    bytes_.resize(count);
    byte_token_.fill(-1);
    for (std::size_t i = 0; i < count; ++i) {
      const std::string& spelling = vocab_.tokens[i];
      const auto id = static_cast<std::int32_t>(i);
      ids_.try_emplace(spelling, id);  // first spelling wins, like a vocab dict built in order
      const auto kind = vocab_.types.empty() ? token_kind::normal : static_cast<token_kind>(vocab_.types[i]);
      if (kind == token_kind::control || kind == token_kind::user_defined) {
        // Matched literally in text and decoded to its own spelling (HF AddedToken, normalized = false).
        // HF skips control tokens spelled outside the byte alphabet; so do we (they still decode).
        if (!spelling.empty() && (kind == token_kind::user_defined || in_alphabet(spelling)))
          added_.push_back({spelling, id, kind == token_kind::control});
        bytes_[i] = spelling;
        continue;
      }
      bytes_[i] = from_alphabet(spelling);
      if (kind == token_kind::normal || kind == token_kind::byte) {
        // Single-symbol tokens are where BPE starts: one per byte.
        std::size_t len = detail::utf8_length(spelling, 0);
        if (!spelling.empty() && len == spelling.size()) {
          const char32_t cp = detail::utf8_decode(spelling, 0, len);
          if (cp < abc.byte_of.size() && abc.byte_of[cp] >= 0 && byte_token_[abc.byte_of[cp]] < 0)
            byte_token_[abc.byte_of[cp]] = id;
        }
      }
    }
    // Longest first, so the first literal that matches at a position is the leftmost-longest one.
    std::stable_sort(added_.begin(), added_.end(), [](const auto& a, const auto& b) { return a.text.size() > b.text.size(); });
    for (const auto& a : added_) added_first_byte_[static_cast<unsigned char>(a.text[0])] = true;

    merges_.reserve(vocab_.merges.size() * 2);
    for (std::size_t r = 0; r < vocab_.merges.size(); ++r) {
      const std::string& m = vocab_.merges[r];
      const auto sp = m.find(' ');
      grun::require<format_error>(sp != std::string::npos && sp > 0 && sp + 1 < m.size() && m.find(' ', sp + 1) == std::string::npos,
                                  "tokenizer: merge ", r, ": expected 'left right', got '", m, "'");
      const std::string_view left(m.data(), sp), right(m.data() + sp + 1, m.size() - sp - 1);
      const auto l = token_to_id(left), rr = token_to_id(right), res = token_to_id(std::string(left) + std::string(right));
      grun::require<format_error>(l && rr && res, "tokenizer: merge ", r, " '", m, "': expected both sides and their "
                                  "concatenation in the vocabulary, but one is missing");
      merges_.try_emplace(detail::pair_key(*l, *rr), detail::merge_rule{static_cast<std::int32_t>(r), *res});
    }

    regex_ = detail::compile_regex(gpt2_pattern);
    digit_ = detail::compile_regex(R"(\p{N})");
    classify_ = detail::compile_regex(R"((\p{L})|(\p{N})|(\s))");
    context_.reset(pcre2_match_context_create_8(nullptr));
    if (!context_) grun::fail<grun::error>("tokenizer: out of memory creating a PCRE2 match context");
    pcre2_set_match_limit_8(context_.get(), opt_.match_limit);
    pcre2_set_heap_limit_8(context_.get(), opt_.heap_limit_kib);
    for (int c = 0; c < 128; ++c) {
      const char ch = static_cast<char>(c);
      ascii_class_[c] = classify_slow(std::string_view(&ch, 1), 0, 1);
    }
  }

  /// Reads the vocabulary, merges, special ids, pre-tokenizer name and chat template of a GGUF.
  static bpe_tokenizer from_gguf(const grun::io::gguf_file& f, tokenizer_options o = {}) {
    vocabulary v;
    v.tokens = f.get_string_array("tokenizer.ggml.tokens");
    if (f.has("tokenizer.ggml.token_type"))
      for (const auto t : f.get_int_array("tokenizer.ggml.token_type")) v.types.push_back(static_cast<std::int32_t>(t));
    if (f.has("tokenizer.ggml.merges")) v.merges = f.get_string_array("tokenizer.ggml.merges");
    v.model = f.has("tokenizer.ggml.model") ? f.get_string("tokenizer.ggml.model") : std::string("gpt2");
    v.pre = f.has("tokenizer.ggml.pre") ? f.get_string("tokenizer.ggml.pre") : std::string("default");
    const auto id = [&](std::string_view key) -> std::int32_t {
      if (!f.has(key)) return -1;
      const auto u = f.get_uint(key);
      grun::require<grun::format_error>(u < v.tokens.size(), "tokenizer: ", key, " = ", u, " outside the vocabulary of ",
                                        v.tokens.size(), " tokens");
      return static_cast<std::int32_t>(u);
    };
    v.bos_id = id("tokenizer.ggml.bos_token_id");
    v.eos_id = id("tokenizer.ggml.eos_token_id");
    v.unk_id = id("tokenizer.ggml.unknown_token_id");
    v.pad_id = id("tokenizer.ggml.padding_token_id");
    if (f.has("tokenizer.chat_template")) v.chat_template = f.get_string("tokenizer.chat_template");
    return bpe_tokenizer(std::move(v), o);
  }
  static bpe_tokenizer from_gguf(const std::filesystem::path& path, tokenizer_options o = {}) {
    return from_gguf(grun::io::gguf_file::open(path), o);
  }

  bpe_tokenizer(bpe_tokenizer&&) noexcept = default;
  bpe_tokenizer& operator=(bpe_tokenizer&&) noexcept = default;

  /// Token ids of `text` (any bytes). With parse_special, added tokens written in the text (e.g.
  /// "<|im_start|>") become their ids; without, control tokens are tokenized as plain text
  /// (HF's split_special_tokens / encode_special_tokens). No BOS/EOS is added.
  std::vector<std::int32_t> encode(std::string_view text, bool parse_special = true) const {
    std::vector<std::int32_t> out;
    out.reserve(text.size() / 3 + 1);
    std::vector<std::int32_t> word;
    const auto bpe_piece = [&](std::string_view piece) { encode_piece(piece, word, out); };
    std::size_t start = 0, i = 0;
    while (i < text.size()) {
      const added_token* hit = added_first_byte_[static_cast<unsigned char>(text[i])] ? match_added(text, i, parse_special) : nullptr;
      if (!hit) { ++i; continue; }
      split_text(text.substr(start, i - start), bpe_piece);
      out.push_back(hit->id);
      i += hit->text.size();
      start = i;
    }
    split_text(text.substr(start), bpe_piece);
    return out;
  }

  /// The bytes the ids stand for; decode(encode(x)) == x for every x whose bytes all have a token.
  /// Unlike HF, invalid UTF-8 is returned as is (HF would put U+FFFD there).
  std::string decode(std::span<const std::int32_t> ids, bool skip_special = false) const {
    std::string out;
    for (const auto id : ids) {
      check_id(id);
      if (skip_special && kind(id) == token_kind::control) continue;
      out += bytes_[static_cast<std::size_t>(id)];
    }
    return out;
  }

  /// The pre-tokenizer's pieces of `text` (no added-token matching), as byte ranges' contents.
  std::vector<std::string> pre_tokenize(std::string_view text) const {
    std::vector<std::string> pieces;
    split_text(text, [&](std::string_view p) { pieces.emplace_back(p); });
    return pieces;
  }
  /// Whether PCRE2 JIT-compiled the pre-tokenizer pattern (else its interpreter runs).
  bool regex_jit() const {
    std::size_t size = 0;
    return pcre2_pattern_info_8(regex_.get(), PCRE2_INFO_JITSIZE, &size) == 0 && size > 0;
  }

  std::int32_t vocab_size() const { return static_cast<std::int32_t>(vocab_.tokens.size()); }
  std::optional<std::int32_t> token_to_id(std::string_view spelling) const {
    const auto it = ids_.find(std::string(spelling));
    return it == ids_.end() ? std::nullopt : std::optional<std::int32_t>(it->second);
  }
  /// The token's spelling in the GGUF (byte-level alphabet, e.g. "Ġthe").
  const std::string& token_spelling(std::int32_t id) const { check_id(id); return vocab_.tokens[static_cast<std::size_t>(id)]; }
  /// The bytes the token stands for (e.g. " the").
  const std::string& token_bytes(std::int32_t id) const { check_id(id); return bytes_[static_cast<std::size_t>(id)]; }
  token_kind kind(std::int32_t id) const {
    check_id(id);
    return vocab_.types.empty() ? token_kind::normal : static_cast<token_kind>(vocab_.types[static_cast<std::size_t>(id)]);
  }
  bool is_special(std::int32_t id) const { return kind(id) == token_kind::control; }
  /// Whether byte b has a byte-level token (others follow tokenizer_options::on_missing_byte).
  bool byte_has_token(unsigned char b) const { return byte_token_[b] >= 0; }

  std::int32_t bos_id() const { return vocab_.bos_id; }
  std::int32_t eos_id() const { return vocab_.eos_id; }
  std::int32_t unk_id() const { return vocab_.unk_id; }
  std::int32_t pad_id() const { return vocab_.pad_id; }
  const std::string& chat_template() const { return vocab_.chat_template; }
  llm::pre_tokenizer pre() const { return pre_; }
  const vocabulary& vocab() const { return vocab_; }

 private:
  struct added_token {
    std::string text;
    std::int32_t id;
    bool special;
  };

  void check_id(std::int32_t id) const {
    if (id < 0 || id >= vocab_size())
      grun::fail<grun::error>("tokenizer: token id ", id, " outside the vocabulary of ", vocab_size(), " tokens");
  }

  static bool in_alphabet(std::string_view s) {
    const auto& abc = detail::alphabet();
    for (std::size_t i = 0; i < s.size();) {
      const std::size_t n = detail::utf8_length(s, i);
      if (n == 0) return false;
      const char32_t cp = detail::utf8_decode(s, i, n);
      if (cp >= abc.byte_of.size() || abc.byte_of[cp] < 0) return false;
      i += n;
    }
    return true;
  }

  /// Byte-level spelling → bytes. Characters outside the alphabet (not in a GPT-2 vocabulary, but a
  /// file may have them) stand for their own UTF-8.
  static std::string from_alphabet(std::string_view s) {
    const auto& abc = detail::alphabet();
    std::string out;
    for (std::size_t i = 0; i < s.size();) {
      const std::size_t n = detail::utf8_length(s, i);
      if (n == 0) { out += s[i++]; continue; }
      const char32_t cp = detail::utf8_decode(s, i, n);
      if (cp < abc.byte_of.size() && abc.byte_of[cp] >= 0) out += static_cast<char>(abc.byte_of[cp]);
      else out.append(s.substr(i, n));
      i += n;
    }
    return out;
  }

  const added_token* match_added(std::string_view text, std::size_t i, bool parse_special) const {
    const std::string_view rest = text.substr(i);
    for (const auto& a : added_)
      if ((parse_special || !a.special) && rest.starts_with(a.text)) return &a;
    return nullptr;
  }

  void encode_piece(std::string_view piece, std::vector<std::int32_t>& word, std::vector<std::int32_t>& out) const {
    word.clear();
    const auto flush = [&] {
      detail::bpe_merge(word, merges_);
      out.insert(out.end(), word.begin(), word.end());
      word.clear();
    };
    for (const char ch : piece) {
      const auto b = static_cast<unsigned char>(ch);
      const std::int32_t id = byte_token_[b];
      if (id >= 0) { word.push_back(id); continue; }
      switch (opt_.on_missing_byte) {
        case missing_byte::drop: break;  // HF: a symbol not in the vocab and no unk token → skipped
        case missing_byte::unknown_token:
          grun::require<grun::format_error>(vocab_.unk_id >= 0, "tokenizer: byte 0x", hex(b),
                                            " has no token and the vocabulary has no unknown token");
          flush();  // the unknown token never merges
          out.push_back(vocab_.unk_id);
          break;
        case missing_byte::fail:
          grun::fail<grun::format_error>("tokenizer: byte 0x", hex(b), " has no byte-level token in this vocabulary");
      }
    }
    flush();
  }
  static std::string hex(unsigned char b) {
    constexpr char digits[] = "0123456789ABCDEF";
    return {digits[b >> 4], digits[b & 15]};
  }

  // ---- pre-tokenization ----------------------------------------------------------------------------
  template <class Emit>
  void split_text(std::string_view text, Emit&& emit) const {
    if (text.empty()) return;
    pcre2_data_ptr data(pcre2_match_data_create_8(4, nullptr));
    if (!data) grun::fail<grun::error>("tokenizer: out of memory creating PCRE2 match data");
    std::size_t i = 0;
    while (i < text.size()) {
      // Valid UTF-8 run [i, j), then invalid bytes [j, k) as one piece of their own.
      std::size_t j = i;
      for (std::size_t n; j < text.size() && (n = detail::utf8_length(text, j)) != 0;) j += n;
      if (j > i) split_valid(text.substr(i, j - i), data.get(), emit);
      std::size_t k = j;
      while (k < text.size() && detail::utf8_length(text, k) == 0) ++k;
      if (k > j) emit(text.substr(j, k - j));
      i = k;
    }
  }

  template <class Emit>
  void split_valid(std::string_view s, pcre2_match_data_8* data, Emit& emit) const {
    if (pre_ == pre_tokenizer::gpt2) return split_gpt2(s, data, emit);
    // smollm: each \p{N} character is a piece; the stretches between go through gpt2.
    std::size_t pos = 0;
    while (pos < s.size()) {
      std::size_t begin = s.size(), end = s.size();
      if (opt_.force_fallback) {
        for (std::size_t p = pos; p < s.size(); p += detail::utf8_length(s, p))
          if (classify(s, p, detail::utf8_length(s, p)) == detail::char_class::number) {
            begin = p;
            end = p + detail::utf8_length(s, p);
            break;
          }
      } else {
        const int rc = pcre2_match_8(digit_.get(), reinterpret_cast<PCRE2_SPTR8>(s.data()), s.size(), pos, PCRE2_NO_UTF_CHECK,
                                     data, context_.get());
        if (rc >= 0) {
          const PCRE2_SIZE* ov = pcre2_get_ovector_pointer_8(data);
          begin = ov[0];
          end = ov[1];
        } else if (rc != PCRE2_ERROR_NOMATCH) {  // a limit: find the next number by class instead
          for (std::size_t p = pos; p < s.size(); p += detail::utf8_length(s, p))
            if (classify(s, p, detail::utf8_length(s, p)) == detail::char_class::number) {
              begin = p;
              end = p + detail::utf8_length(s, p);
              break;
            }
        }
      }
      if (begin > pos) split_gpt2(s.substr(pos, begin - pos), data, emit);
      if (end > begin) emit(s.substr(begin, end - begin));
      pos = end;
    }
  }

  template <class Emit>
  void split_gpt2(std::string_view s, pcre2_match_data_8* data, Emit& emit) const {
    std::size_t pos = 0;
    const auto fallback = [&](std::size_t from) {
      detail::exact_split(s, from, [&](std::size_t i, std::size_t n) { return classify(s, i, n); },
                          [&](std::size_t b, std::size_t e) { emit(s.substr(b, e - b)); });
    };
    if (opt_.force_fallback) return fallback(0);
    while (pos < s.size()) {
      const int rc = pcre2_match_8(regex_.get(), reinterpret_cast<PCRE2_SPTR8>(s.data()), s.size(), pos, PCRE2_NO_UTF_CHECK,
                                   data, context_.get());
      if (rc < 0) {
        // NOMATCH cannot happen (the pattern covers every character); anything else is a resource
        // limit. Either way the exact scanner finishes the segment.
        return fallback(pos);
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer_8(data);
      if (ov[0] > pos) emit(s.substr(pos, ov[0] - pos));  // unmatched gap: keep the bytes
      if (ov[1] == ov[0]) return fallback(ov[0]);         // empty match: impossible for this pattern
      emit(s.substr(ov[0], ov[1] - ov[0]));
      pos = ov[1];
    }
  }

  detail::char_class classify(std::string_view s, std::size_t i, std::size_t n) const {
    const auto c = static_cast<unsigned char>(s[i]);
    return c < 0x80 ? ascii_class_[c] : classify_slow(s, i, n);
  }
  detail::char_class classify_slow(std::string_view s, std::size_t i, std::size_t n) const {
    pcre2_data_ptr data(pcre2_match_data_create_from_pattern_8(classify_.get(), nullptr));
    if (!data) grun::fail<grun::error>("tokenizer: out of memory creating PCRE2 match data");
    const int rc = pcre2_match_8(classify_.get(), reinterpret_cast<PCRE2_SPTR8>(s.data() + i), n, 0,
                                 PCRE2_ANCHORED | PCRE2_NO_UTF_CHECK, data.get(), nullptr);
    // rc is one more than the highest group that matched: 2 letter, 3 number, 4 space.
    switch (rc) {
      case 2: return detail::char_class::letter;
      case 3: return detail::char_class::number;
      case 4: return detail::char_class::space;
      default: return detail::char_class::other;
    }
  }

  using pcre2_code_ptr = detail::pcre2_code_ptr;
  using pcre2_data_ptr = detail::pcre2_data_ptr;

  vocabulary vocab_;
  tokenizer_options opt_;
  llm::pre_tokenizer pre_ = llm::pre_tokenizer::gpt2;
  std::unordered_map<std::string, std::int32_t> ids_;
  std::vector<std::string> bytes_;
  std::array<std::int32_t, 256> byte_token_{};
  std::vector<added_token> added_;
  std::array<bool, 256> added_first_byte_{};
  std::unordered_map<std::uint64_t, detail::merge_rule> merges_;
  pcre2_code_ptr regex_, digit_, classify_;
  detail::pcre2_context_ptr context_;
  std::array<detail::char_class, 128> ascii_class_{};
};

}  // namespace llm
