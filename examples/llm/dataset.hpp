#pragma once
// examples/llm/dataset.hpp — question/answer sets in TOFU's JSONL format.
//
// One JSON object a line: "question" and "answer" (strings, required), optionally "option1".."option4",
// "perturbed_answer" (string or list), "paraphrased_question". A whole-file JSON array is accepted too
// (TOFU ships some files that way). A UTF-8 byte-order mark and very long lines are fine; a malformed
// line is reported with its line number.
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include <grun/core/error.hpp>

namespace llm {

struct qa_example {
  std::string question;
  std::string answer;
  std::vector<std::string> options;         // empty, or the four MCQ options
  std::optional<std::size_t> correct_option;  // index into options of the one equal to answer
  std::vector<std::string> perturbed_answers;
  std::string paraphrased_question;
};

namespace detail {
inline std::string required_string(const nlohmann::json& j, const char* key, const std::string& where) {
  auto it = j.find(key);
  if (it == j.end()) grun::fail<grun::format_error>(where, ": expected a \"", key, "\" field, found none");
  if (!it->is_string())
    grun::fail<grun::format_error>(where, ": expected \"", key, "\" to be a string, got ", it->type_name());
  return it->get<std::string>();
}

inline qa_example parse_example(const nlohmann::json& j, const std::string& where) {
  if (!j.is_object()) grun::fail<grun::format_error>(where, ": expected a JSON object, got ", j.type_name());
  qa_example ex;
  ex.question = required_string(j, "question", where);
  ex.answer = required_string(j, "answer", where);
  if (ex.question.empty()) grun::fail<grun::format_error>(where, ": \"question\" is empty");
  if (ex.answer.empty()) grun::fail<grun::format_error>(where, ": \"answer\" is empty");
  for (int k = 1; k <= 4; ++k) {
    const std::string key = "option" + std::to_string(k);
    if (j.contains(key)) ex.options.push_back(required_string(j, key.c_str(), where));
  }
  if (!ex.options.empty()) {
    if (ex.options.size() != 4)
      grun::fail<grun::format_error>(where, ": expected option1..option4 (all four), got ", ex.options.size());
    for (std::size_t i = 0; i < ex.options.size(); ++i)
      if (ex.options[i] == ex.answer) ex.correct_option = i;
    if (!ex.correct_option)
      grun::fail<grun::format_error>(where, ": the answer \"", ex.answer, "\" is not among the four options");
  }
  if (auto it = j.find("perturbed_answer"); it != j.end()) {
    if (it->is_string()) ex.perturbed_answers.push_back(it->get<std::string>());
    else if (it->is_array())
      for (const auto& a : *it)
        if (a.is_string()) ex.perturbed_answers.push_back(a.get<std::string>());
  }
  if (auto it = j.find("paraphrased_question"); it != j.end() && it->is_string())
    ex.paraphrased_question = it->get<std::string>();
  return ex;
}
}  // namespace detail

/// Reads a JSONL (or JSON array) file of QA examples. Throws grun::format_error naming the file and line.
inline std::vector<qa_example> load_qa(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) grun::fail<grun::format_error>("cannot open data file ", path.string());
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (text.size() >= 3 && text.compare(0, 3, "\xEF\xBB\xBF") == 0) text.erase(0, 3);

  std::vector<qa_example> out;
  std::size_t first = text.find_first_not_of(" \t\r\n");
  if (first != std::string::npos && text[first] == '[') {  // a JSON array
    nlohmann::json arr = nlohmann::json::parse(text, nullptr, false);
    if (arr.is_discarded()) grun::fail<grun::format_error>(path.string(), ": not valid JSON");
    for (std::size_t i = 0; i < arr.size(); ++i)
      out.push_back(detail::parse_example(arr[i], path.string() + ": element " + std::to_string(i)));
  } else {
    std::size_t line_no = 0, pos = 0;
    while (pos <= text.size()) {
      std::size_t end = text.find('\n', pos);
      if (end == std::string::npos) end = text.size();
      ++line_no;
      std::string_view line(text.data() + pos, end - pos);
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
      if (line.find_first_not_of(" \t") != std::string_view::npos) {
        const std::string where = path.string() + ":" + std::to_string(line_no);
        nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
        if (j.is_discarded()) grun::fail<grun::format_error>(where, ": expected a JSON object, the line is not valid JSON");
        out.push_back(detail::parse_example(j, where));
      }
      pos = end + 1;
    }
  }
  if (out.empty()) grun::fail<grun::format_error>(path.string(), ": expected at least one example, found none");
  return out;
}

}  // namespace llm
