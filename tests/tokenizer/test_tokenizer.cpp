// Byte-level BPE tokenizer and ChatML template (examples/llm/{tokenizer,chat_template}.hpp).
//
// [model] cases compare with Hugging Face on the SmolLM2-135M-Instruct GGUF: token ids of 300+ strings
// and chat renderings in tests/data/tokenizer_reference.json (written by
// tests/reference/make_tokenizer_reference.py). The other cases build small vocabularies by hand.
#include <catch2/catch.hpp>

#include <llm/chat_template.hpp>
#include <llm/tokenizer.hpp>

#include <nlohmann/json.hpp>

#include <chrono>
#include <ctime>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>
#include <string>
#include <vector>

using llm::bpe_tokenizer;
using llm::chat_message;
using llm::chat_template;
using llm::missing_byte;
using llm::pre_tokenizer;
using llm::tokenizer_options;
using llm::vocabulary;

namespace {

std::string utf8(char32_t cp) {
  std::string s;
  llm::detail::append_utf8(s, cp);
  return s;
}
std::string spell(std::string_view bytes) {  // bytes → byte-level spelling
  std::string s;
  for (const char c : bytes) s += utf8(llm::detail::alphabet().symbol[static_cast<unsigned char>(c)]);
  return s;
}

/// 256 byte symbols (ids = byte values, except those in `missing`), then merges, then added tokens.
vocabulary tiny_vocabulary(const std::vector<std::string>& merges_bytes = {}, const std::string& missing = {}) {
  vocabulary v;
  v.pre = "gpt2";
  for (int b = 0; b < 256; ++b) {
    const char c = static_cast<char>(b);
    if (missing.find(c) != std::string::npos) continue;
    v.tokens.push_back(spell(std::string_view(&c, 1)));
    v.types.push_back(1);
  }
  for (const auto& m : merges_bytes) {  // "left right" in bytes
    const auto sp = m.find(' ', 1);
    const std::string l = spell(m.substr(0, sp)), r = spell(m.substr(sp + 1));
    v.merges.push_back(l + " " + r);
    if (std::find(v.tokens.begin(), v.tokens.end(), l + r) == v.tokens.end()) {
      v.tokens.push_back(l + r);
      v.types.push_back(1);
    }
  }
  for (const char* special : {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}) {
    v.tokens.emplace_back(special);
    v.types.push_back(3);
  }
  v.unk_id = static_cast<std::int32_t>(v.tokens.size()) - 3;
  return v;
}

std::vector<std::string> pieces(const bpe_tokenizer& t, std::string_view s) { return t.pre_tokenize(s); }

std::string random_text(std::mt19937& rng, std::size_t length) {
  static const std::vector<std::string> pool = {
      "a", "b", "Z", "0", "7", " ", " ", "  ", "\t", "\n", "\r\n", "'", "'s", "'re", "'ll", "'x", ".", ",", "!", "?", "(",
      "$", "_", "-", "é", "ß", "日", "本", "語", "한", "Ж", "١", "٢", "४", "½", "²", "Ⅻ", "😀", "👍🏽", "\u0301", "\u00a0",
      "\u3000", "\u2028", "\u0085", "\u200b", "\u180e", "\x0b", "\x0c", "\x1c", "<|im_end|>", "x", "yz"};
  std::uniform_int_distribution<std::size_t> pick(0, pool.size() - 1);
  std::string s;
  for (std::size_t i = 0; i < length; ++i) s += pool[pick(rng)];
  return s;
}

std::filesystem::path model_path() {
  if (const char* p = std::getenv("GRUN_MODEL"); p && *p) return p;
  std::filesystem::path cache;
  if (const char* c = std::getenv("GRUN_CACHE_DIR"); c && *c) cache = c;
  else if (const char* h = std::getenv("HOME"); h && *h) cache = std::filesystem::path(h) / ".cache" / "grun";
  else cache = "/tmp/.cache/grun";
  return cache / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf";
}

/// The example model's tokenizer (loaded once), or exit 77 — ctest's SKIP_RETURN_CODE — without it.
const bpe_tokenizer& model_tokenizer(pre_tokenizer pre = pre_tokenizer::smollm, bool fallback = false) {
  const auto path = model_path();
  if (!std::filesystem::exists(path)) {
    std::cout << "SKIPPED: example model not found at " << path.string()
              << " (run cmake/fetch_model.sh or set GRUN_MODEL)" << std::endl;
    std::exit(77);
  }
  static const bpe_tokenizer smollm = bpe_tokenizer::from_gguf(path);
  static const bpe_tokenizer gpt2 = bpe_tokenizer::from_gguf(path, {.pre = pre_tokenizer::gpt2});
  static const bpe_tokenizer exact = bpe_tokenizer::from_gguf(path, {.force_fallback = true});
  if (fallback) return exact;
  return pre == pre_tokenizer::smollm ? smollm : gpt2;
}

const nlohmann::json& reference() {
  static const nlohmann::json j = [] {
    std::ifstream in(std::string(GRUN_TEST_DATA_DIR) + "/tokenizer_reference.json");
    REQUIRE(in.good());
    return nlohmann::json::parse(in);
  }();
  return j;
}

std::string printable(const std::string& s) {
  std::string out;
  for (const unsigned char c : s) {
    if (c < 0x20 || c == 0x7F) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02X", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

/// Wall-clock and process CPU seconds of f() (CPU time is what to compare on a shared machine).
template <class F>
std::pair<double, double> seconds(F&& f) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::clock_t c0 = std::clock();
  f();
  const double cpu = static_cast<double>(std::clock() - c0) / CLOCKS_PER_SEC;
  return {std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), cpu};
}

}  // namespace

// ---- building blocks ---------------------------------------------------------------------------------

TEST_CASE("tokenizer: GPT-2 byte alphabet is a bijection onto visible code points", "[tokenizer]") {
  const auto& abc = llm::detail::alphabet();
  std::vector<bool> seen(abc.byte_of.size(), false);
  for (int b = 0; b < 256; ++b) {
    const char32_t cp = abc.symbol[b];
    REQUIRE(cp < abc.byte_of.size());
    CHECK(!seen[cp]);
    seen[cp] = true;
    CHECK(abc.byte_of[cp] == b);
  }
  CHECK(abc.symbol[' '] == U'\u0120');  // Ġ
  CHECK(abc.symbol['\n'] == U'\u010A');  // Ċ
  CHECK(abc.symbol['A'] == U'A');
  CHECK(abc.symbol[0xAD] == U'\u0143');  // soft hyphen is not printable: 256 + 67
}

TEST_CASE("tokenizer: UTF-8 validation follows Unicode Table 3-7", "[tokenizer]") {
  using llm::detail::utf8_length;
  CHECK(utf8_length("a", 0) == 1);
  CHECK(utf8_length("\xC3\xA9", 0) == 2);
  CHECK(utf8_length("\xE6\x97\xA5", 0) == 3);
  CHECK(utf8_length("\xF0\x9F\x98\x80", 0) == 4);
  CHECK(utf8_length("\xC0\xAF", 0) == 0);          // overlong '/'
  CHECK(utf8_length("\xE0\x80\xAF", 0) == 0);      // overlong
  CHECK(utf8_length("\xED\xA0\x80", 0) == 0);      // surrogate
  CHECK(utf8_length("\xF4\x90\x80\x80", 0) == 0);  // > U+10FFFF
  CHECK(utf8_length("\x80", 0) == 0);              // lone continuation
  CHECK(utf8_length("\xE6\x97", 0) == 0);          // truncated
  CHECK(utf8_length("\xFF", 0) == 0);
}

TEST_CASE("tokenizer: gpt2 and smollm pre-tokenizers split like the HF regex", "[tokenizer]") {
  const bpe_tokenizer gpt2(tiny_vocabulary());
  vocabulary v = tiny_vocabulary();
  v.pre = "smollm";
  const bpe_tokenizer smollm(v);
  using P = std::vector<std::string>;
  CHECK(pieces(gpt2, "Hello world's  end") == P{"Hello", " world", "'s", " ", " end"});
  CHECK(pieces(gpt2, "I'M here") == P{"I", "'", "M", " here"});  // contractions are case-sensitive
  CHECK(pieces(gpt2, "x  12 34") == P{"x", " ", " 12", " 34"});
  CHECK(pieces(smollm, "x  12 34") == P{"x", "  ", "1", "2", " ", "3", "4"});
  CHECK(pieces(gpt2, "a\n\n b") == P{"a", "\n\n", " b"});
  CHECK(pieces(gpt2, "a\n\nb") == P{"a", "\n", "\n", "b"});
  CHECK(pieces(gpt2, "end   ") == P{"end", "   "});
  CHECK(pieces(gpt2, "?'s !!") == P{"?'", "s", " !!"});
  CHECK(pieces(gpt2, "日本語 テスト") == P{"日本語", " テスト"});
  CHECK(pieces(gpt2, "e\u0301") == P{"e", "\u0301"});  // a combining mark is \p{M}: not a letter
  CHECK(pieces(smollm, "Ⅻ½") == P{"Ⅻ", "½"});
  CHECK(pieces(gpt2, "a\xFF\xFE b") == P{"a", "\xFF\xFE", " b"});  // invalid bytes: a piece of their own
}

TEST_CASE("tokenizer: the exact splitter agrees with PCRE2 on random text", "[tokenizer]") {
  for (const char* pre : {"gpt2", "smollm"}) {
    vocabulary v = tiny_vocabulary();
    v.pre = pre;
    const bpe_tokenizer regex(v);
    const bpe_tokenizer exact(v, {.force_fallback = true});
    std::mt19937 rng(7);
    for (int i = 0; i < 2000; ++i) {
      const std::string s = random_text(rng, 1 + i % 40);
      INFO(pre << ": " << printable(s));
      REQUIRE(pieces(exact, s) == pieces(regex, s));
    }
  }
}

TEST_CASE("tokenizer: PCRE2 resource limits fall back to the exact splitter", "[tokenizer]") {
  vocabulary v = tiny_vocabulary({"a a"});
  const bpe_tokenizer normal(v);
  const bpe_tokenizer starved(v, {.match_limit = 1});  // every pcre2_match fails with MATCHLIMIT
  std::mt19937 rng(11);
  for (int i = 0; i < 200; ++i) {
    const std::string s = random_text(rng, 30);
    INFO(printable(s));
    REQUIRE(starved.encode(s) == normal.encode(s));
  }
  const std::string long_run(100000, 'a');
  CHECK(starved.encode(long_run) == normal.encode(long_run));
}

TEST_CASE("tokenizer: BPE merges lowest rank first, leftmost on ties", "[tokenizer]") {
  const bpe_tokenizer t(tiny_vocabulary({"a a", "aa aa", "b c", "a b"}));
  const auto id = [&](std::string_view bytes) { return *t.token_to_id(spell(bytes)); };
  CHECK(t.encode("aaa") == std::vector<std::int32_t>{id("aa"), id("a")});
  CHECK(t.encode("aaaa") == std::vector<std::int32_t>{id("aaaa")});
  CHECK(t.encode("aaaaa") == std::vector<std::int32_t>{id("aaaa"), id("a")});
  // "a b" ranks below "b c": in "abc" the pair (b, c) merges first, then nothing more applies.
  CHECK(t.encode("abc") == std::vector<std::int32_t>{id("a"), id("bc")});
  CHECK(t.encode("ab") == std::vector<std::int32_t>{id("ab")});
  CHECK(t.decode(t.encode("aaaaa bc")) == "aaaaa bc");
}

TEST_CASE("tokenizer: added tokens are matched literally, leftmost-longest, only when asked", "[tokenizer]") {
  const bpe_tokenizer t(tiny_vocabulary());
  const auto start = *t.token_to_id("<|im_start|>"), end = *t.token_to_id("<|im_end|>");
  const auto ids = t.encode("<|im_start|>hi<|im_end|><|im_end");
  REQUIRE(ids.size() == 1 + 2 + 1 + 8);
  CHECK(ids[0] == start);
  CHECK(ids[3] == end);
  CHECK(t.decode(ids) == "<|im_start|>hi<|im_end|><|im_end");
  CHECK(t.decode(ids, /*skip_special=*/true) == "hi<|im_end");
  const auto literal = t.encode("<|im_start|>", /*parse_special=*/false);
  CHECK(literal.size() == 12);
  CHECK(t.decode(literal) == "<|im_start|>");
  CHECK(t.is_special(start));
}

TEST_CASE("tokenizer: bytes without a token are dropped, mapped to unk, or refused", "[tokenizer]") {
  const std::string missing = "\x04\xFF";
  const std::string text = "a\x04" "b\xFF";
  const bpe_tokenizer drop(tiny_vocabulary({}, missing));
  CHECK(!drop.byte_has_token(0x04));
  CHECK(drop.decode(drop.encode(text)) == "ab");
  const bpe_tokenizer unk(tiny_vocabulary({}, missing), {.on_missing_byte = missing_byte::unknown_token});
  const auto ids = unk.encode(text);
  REQUIRE(ids.size() == 4);
  CHECK(ids[1] == unk.unk_id());
  CHECK(ids[3] == unk.unk_id());
  const bpe_tokenizer strict(tiny_vocabulary({}, missing), {.on_missing_byte = missing_byte::fail});
  CHECK_THROWS_AS(strict.encode(text), grun::format_error);
  CHECK_NOTHROW(strict.encode("ab"));
}

TEST_CASE("tokenizer: bad vocabularies and ids are refused with a grun::error", "[tokenizer]") {
  vocabulary v = tiny_vocabulary();
  v.merges.push_back("a zz");
  CHECK_THROWS_AS(bpe_tokenizer(v), grun::format_error);
  v = tiny_vocabulary();
  v.merges.push_back("nospace");
  CHECK_THROWS_AS(bpe_tokenizer(v), grun::format_error);
  v = tiny_vocabulary();
  v.pre = "llama3";
  CHECK_THROWS_WITH(bpe_tokenizer(v), Catch::Contains("llama3"));
  v = tiny_vocabulary();
  v.model = "llama";
  CHECK_THROWS_AS(bpe_tokenizer(v), grun::format_error);
  v = tiny_vocabulary();
  v.types.pop_back();
  CHECK_THROWS_AS(bpe_tokenizer(v), grun::format_error);
  v = tiny_vocabulary();
  v.eos_id = 1 << 20;
  CHECK_THROWS_AS(bpe_tokenizer(v), grun::format_error);
  const bpe_tokenizer t(tiny_vocabulary());
  const std::vector<std::int32_t> bad = {0, t.vocab_size()};
  CHECK_THROWS_AS(t.decode(bad), grun::error);
  CHECK_THROWS_AS(t.decode(std::vector<std::int32_t>{-1}), grun::error);
}

TEST_CASE("tokenizer: any bytes round-trip, long runs finish (synthetic vocabulary)", "[tokenizer]") {
  const bpe_tokenizer t(tiny_vocabulary({"a a", "aa aa", "aaaa aaaa", "\x20 \x20", "\n \n"}));
  std::mt19937 rng(3);
  std::uniform_int_distribution<int> byte(0, 255);
  for (int i = 0; i < 300; ++i) {
    std::string s(1 + i, '\0');
    for (auto& c : s) c = static_cast<char>(byte(rng));
    REQUIRE(t.decode(t.encode(s)) == s);
    REQUIRE(t.encode(s) == t.encode(s));  // deterministic
  }
  for (const std::string& s : {std::string(1'000'000, 'a'), std::string(1'000'000, ' '), std::string(100'000, '\n')})
    CHECK(t.decode(t.encode(s)) == s);
}

// ---- chat template ------------------------------------------------------------------------------------

namespace {
const char* smollm2_template =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|im_start|>assistant\n' }}{% endif %}";
}

TEST_CASE("chat template: SmolLM2's ChatML with its default system prompt", "[tokenizer][chat]") {
  const chat_template t(smollm2_template);
  REQUIRE(t.default_system_prompt());
  CHECK(*t.default_system_prompt() == "You are a helpful AI assistant named SmolLM, trained by Hugging Face");
  CHECK(t.render({{"user", "Hi"}}, true) ==
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
  CHECK(t.render({{"system", "S"}, {"user", "U"}}, false) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n");
  CHECK(t.render(std::span<const chat_message>{}, true) == "<|im_start|>assistant\n");  // default sits inside the loop
}

TEST_CASE("chat template: escaped newlines and a default outside the loop (Qwen2 style)", "[tokenizer][chat]") {
  const chat_template t(
      "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
      "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, a \\'helpful\\' assistant.<|im_end|>\\n' }}{%- endif %}"
      "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
      "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}");
  REQUIRE(t.default_system_prompt());
  CHECK(*t.default_system_prompt() == "You are Qwen, a 'helpful' assistant.");
  CHECK(t.render(std::span<const chat_message>{}, false) == "<|im_start|>system\nYou are Qwen, a 'helpful' assistant.<|im_end|>\n");
}

TEST_CASE("chat template: templates that are not ChatML are refused by name", "[tokenizer][chat]") {
  CHECK_THROWS_WITH(chat_template("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
                                  "{{ m['content'] }}<|eot_id|>{% endfor %}"),
                    Catch::Contains("unsupported") && Catch::Contains("start_header_id"));
  CHECK_THROWS_AS(chat_template(""), grun::format_error);
  const chat_template plain("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                            "'<|im_end|>' + '\n'}}{% endfor %}");
  CHECK(!plain.default_system_prompt());
  CHECK(plain.render({{"user", "x"}}, true) == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n");
}

// ---- against Hugging Face on the example model -----------------------------------------------------------

TEST_CASE("tokenizer: SmolLM2 token ids match Hugging Face", "[tokenizer][model]") {
  const auto& tok = model_tokenizer();
  const auto& ref = reference();
  INFO("reference made with transformers " << ref["versions"]["transformers"].get<std::string>() << ", tokenizers "
                                           << ref["versions"]["tokenizers"].get<std::string>());
  CHECK(tok.pre() == pre_tokenizer::smollm);
  CHECK(tok.vocab().pre == ref["tokenizer_ggml_pre"].get<std::string>());
  const auto& cases = ref["cases"];
  REQUIRE(cases.size() >= 200);
  std::size_t matched = 0, literal_matched = 0, dropped = 0;
  for (const auto& c : cases) {
    const auto text = c["text"].get<std::string>();
    INFO("text: " << printable(text));
    const auto ids = tok.encode(text);
    CHECK(ids == c["ids"].get<std::vector<std::int32_t>>());
    matched += ids == c["ids"].get<std::vector<std::int32_t>>();
    const auto literal = tok.encode(text, /*parse_special=*/false);
    CHECK(literal == c["ids_literal"].get<std::vector<std::int32_t>>());
    literal_matched += literal == c["ids_literal"].get<std::vector<std::int32_t>>();
    std::string kept;
    for (const char ch : text)
      if (tok.byte_has_token(static_cast<unsigned char>(ch))) kept += ch;
    dropped += kept != text;
    CHECK(tok.decode(ids) == kept);
  }
  std::cout << "tokenizer: PCRE2 " << (tok.regex_jit() ? "JIT" : "interpreter") << "; " << matched << "/" << cases.size() << " strings match HF ids (" << literal_matched
            << " with special tokens as text; " << dropped << " contain bytes without a token)" << std::endl;
}

TEST_CASE("tokenizer: the gpt2 pre-tokenizer reproduces transformers' GGUF loader", "[tokenizer][model]") {
  const auto& tok = model_tokenizer(pre_tokenizer::gpt2);
  std::size_t differ = 0;
  for (const auto& c : reference()["cases"]) {
    INFO("text: " << printable(c["text"].get<std::string>()));
    const auto& expected = c.contains("ids_gguf_loader") ? c["ids_gguf_loader"] : c["ids"];
    differ += c.contains("ids_gguf_loader");
    CHECK(tok.encode(c["text"].get<std::string>()) == expected.get<std::vector<std::int32_t>>());
  }
  CHECK(differ > 0);  // the reference does tell the two pre-tokenizers apart
}

TEST_CASE("tokenizer: the exact splitter matches Hugging Face on the model", "[tokenizer][model]") {
  const auto& tok = model_tokenizer(pre_tokenizer::smollm, /*fallback=*/true);
  for (const auto& c : reference()["cases"]) {
    INFO("text: " << printable(c["text"].get<std::string>()));
    CHECK(tok.encode(c["text"].get<std::string>()) == c["ids"].get<std::vector<std::int32_t>>());
  }
}

TEST_CASE("chat template: SmolLM2 renderings match HF apply_chat_template", "[tokenizer][chat][model]") {
  const auto& tok = model_tokenizer();
  const auto tmpl = chat_template::of(tok);
  for (const auto& c : reference()["chats"]) {
    std::vector<chat_message> messages;
    for (const auto& m : c["messages"]) messages.push_back({m["role"].get<std::string>(), m["content"].get<std::string>()});
    const bool gen = c["add_generation_prompt"].get<bool>();
    INFO("expected: " << printable(c["text"].get<std::string>()));
    CHECK(tmpl.render(messages, gen) == c["text"].get<std::string>());
    CHECK(llm::encode_chat(tok, tmpl, messages, gen) == c["ids"].get<std::vector<std::int32_t>>());
  }
}

TEST_CASE("tokenizer: hostile input on the model vocabulary round-trips and finishes", "[tokenizer][model]") {
  const auto& tok = model_tokenizer();
  const auto kept = [&](const std::string& s) {
    std::string k;
    for (const char ch : s)
      if (tok.byte_has_token(static_cast<unsigned char>(ch))) k += ch;
    return k;
  };
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> byte(0, 255);
  for (int i = 0; i < 200; ++i) {
    std::string s(1 + 7 * i, '\0');
    for (auto& c : s) c = static_cast<char>(byte(rng));
    const auto ids = tok.encode(s);
    REQUIRE(tok.encode(s) == ids);
    REQUIRE(tok.decode(ids) == kept(s));
  }
  std::string mixed;
  for (int i = 0; i < 20000; ++i) mixed += random_text(rng, 3);
  mixed += std::string(50000, ' ') + "x" + std::string(50000, '\n') + std::string(50000, '7') + "\xC3";
  const std::vector<std::pair<const char*, std::string>> inputs = {
      {"1,000,000 x 'a'", std::string(1'000'000, 'a')},
      {"1,000,000 x ' '", std::string(1'000'000, ' ')},
      {"100,000 x '\\n'", std::string(100'000, '\n')},
      {"1,000,000 x '1'", std::string(1'000'000, '1')},
      {"500,000 x 'ab '", [] { std::string s; for (int i = 0; i < 500'000; ++i) s += "ab "; return s; }()},
      {"mixed", mixed},
  };
  for (const auto& input : inputs) {
    const auto& name = input.first;
    const std::string& s = input.second;  // not a structured binding: the lambda below captures it (clang < 16)
    std::vector<std::int32_t> ids;
    const auto [wall, cpu] = seconds([&] { ids = tok.encode(s); });
    std::cout << "tokenizer: encode " << name << " (" << s.size() << " bytes) -> " << ids.size() << " tokens in " << wall
              << " s wall, " << cpu << " s CPU" << std::endl;
    CHECK(tok.decode(ids) == kept(s));
  }
}
