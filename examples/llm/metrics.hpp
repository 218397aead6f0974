#pragma once
// examples/llm/metrics.hpp — ROUGE-L recall as TOFU reports it.
//
// recall = LCS(generated, gold) / |gold| over lower-cased word tokens (letters and digits; every
// other byte separates words). O(|gen|·|gold|) time, O(|gold|) memory.
#include <algorithm>
#include <cctype>
#include <string>
#include <string_view>
#include <vector>

namespace llm {

inline std::vector<std::string> rouge_tokens(std::string_view s) {
  std::vector<std::string> out;
  std::string cur;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c >= 0x80) cur.push_back(static_cast<char>(std::tolower(c)));
    else if (!cur.empty()) { out.push_back(std::move(cur)); cur.clear(); }
  }
  if (!cur.empty()) out.push_back(std::move(cur));
  return out;
}

inline double rouge_l_recall(std::string_view generated, std::string_view gold) {
  const auto g = rouge_tokens(generated), r = rouge_tokens(gold);
  if (r.empty()) return 0.0;
  std::vector<std::size_t> prev(r.size() + 1, 0), cur(r.size() + 1, 0);
  for (const auto& tok : g) {
    for (std::size_t j = 1; j <= r.size(); ++j)
      cur[j] = tok == r[j - 1] ? prev[j - 1] + 1 : std::max(prev[j], cur[j - 1]);
    std::swap(prev, cur);
  }
  return static_cast<double>(prev[r.size()]) / static_cast<double>(r.size());
}

}  // namespace llm
