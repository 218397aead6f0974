#pragma once
// examples/llm/chat_template.hpp — renders chat messages the way a GGUF's Jinja chat template would,
// without evaluating Jinja. Only ChatML is understood:
//
//   [<|im_start|>system\n{default}<|im_end|>\n]    when the template writes a default system prompt and
//                                                  the first message is not a system message
//   <|im_start|>{role}\n{content}<|im_end|>\n      for every message
//   <|im_start|>assistant\n                        when add_generation_prompt
//
// SmolLM2-Instruct's template is exactly this, with the default "You are a helpful AI assistant named
// SmolLM, trained by Hugging Face" written inside the message loop (so no messages → no system block);
// Qwen2-style templates write it outside the loop. Any other template is refused with a format_error
// naming it, rather than rendered wrongly.
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <grun/core/error.hpp>

#include "tokenizer.hpp"

namespace llm {

struct chat_message {
  std::string role;  ///< "system", "user", "assistant", …
  std::string content;
};

class chat_template {
 public:
  /// Recognizes `jinja_source` (a GGUF's tokenizer.chat_template); throws grun::format_error when it is
  /// empty or not ChatML.
  explicit chat_template(std::string_view jinja_source) {
    const auto excerpt = [&] {
      std::string e(jinja_source.substr(0, 120));
      if (jinja_source.size() > 120) e += "...";
      return e;
    };
    grun::require<grun::format_error>(!jinja_source.empty(), "chat template: the model has no tokenizer.chat_template");
    const auto has = [&](std::string_view s) { return jinja_source.find(s) != std::string_view::npos; };
    const bool chatml = has("<|im_start|>") && has("<|im_end|>") &&
                        (has("message['content']") || has("message[\"content\"]") || has("message.content"));
    grun::require<grun::format_error>(chatml,
        "chat template: unsupported template (expected ChatML: <|im_start|>{role}\\n{content}<|im_end|>), got: ", excerpt());
    find_default_system(jinja_source);
    // Inside `{% for message in messages %}` guarded by loop.first, the default needs a first message.
    default_needs_message_ = default_system_ && jinja_source.find("loop.first") != std::string_view::npos;
  }

  /// The template text a model carries, e.g. bpe_tokenizer::chat_template().
  static chat_template of(const bpe_tokenizer& tok) { return chat_template(tok.chat_template()); }

  std::string render(std::span<const chat_message> messages, bool add_generation_prompt) const {
    std::string out;
    const bool has_system = !messages.empty() && messages.front().role == "system";
    if (default_system_ && !has_system && !(default_needs_message_ && messages.empty()))
      out += "<|im_start|>system\n" + *default_system_ + "<|im_end|>\n";
    for (const auto& m : messages) out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
    if (add_generation_prompt) out += "<|im_start|>assistant\n";
    return out;
  }
  std::string render(std::initializer_list<chat_message> messages, bool add_generation_prompt) const {
    return render(std::span<const chat_message>(messages.begin(), messages.size()), add_generation_prompt);
  }

  /// The system prompt the template inserts when the conversation has none, if any.
  const std::optional<std::string>& default_system_prompt() const { return default_system_; }

 private:
  // Finds a Jinja string literal holding "<|im_start|>system\n…<|im_end|>" entirely (a default prompt,
  // not a message's content concatenated in) and keeps the text between, with Jinja escapes resolved.
  void find_default_system(std::string_view src) {
    constexpr std::string_view head = "<|im_start|>system";
    for (std::size_t at = src.find(head); at != std::string_view::npos; at = src.find(head, at + 1)) {
      // The literal's opening quote: the nearest ' or " before `at` on the same side of any '{{'.
      const std::size_t open = src.find_last_of("'\"", at);
      if (open == std::string_view::npos) continue;
      const char quote = src[open];
      std::string text;  // literal content after the head, unescaped
      std::size_t i = at + head.size();
      bool closed = false;
      for (; i < src.size(); ++i) {
        char c = src[i];
        if (c == quote) { closed = true; break; }
        if (c == '\\' && i + 1 < src.size()) {
          const char e = src[++i];
          c = e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e;
        }
        text += c;
      }
      if (!closed || !text.starts_with("\n")) continue;
      const auto end = text.find("<|im_end|>");
      if (end == std::string::npos) continue;  // '<|im_start|>system\n' + message['content'] + …
      default_system_ = text.substr(1, end - 1);
      return;
    }
  }

  std::optional<std::string> default_system_;
  bool default_needs_message_ = false;
};

/// Renders and tokenizes a conversation (special tokens parsed), as HF's apply_chat_template(tokenize=True).
inline std::vector<std::int32_t> encode_chat(const bpe_tokenizer& tok, const chat_template& tmpl,
                                             std::span<const chat_message> messages, bool add_generation_prompt) {
  return tok.encode(tmpl.render(messages, add_generation_prompt), /*parse_special=*/true);
}

}  // namespace llm
