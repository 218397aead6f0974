#pragma once
// grun/positions.hpp — which hidden rows an intervention edits.
//
// Positions are row indices into h viewed as [N, d] (N = batch × seq_len tokens). The paper edits
// the last prompt token only (generated tokens are never edited); all tokens and explicit lists
// must work too. Rows are kept sorted-as-given, unique and non-negative; the upper bound is checked
// against N when an operation sees h.
#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "core/tensor.hpp"

namespace grun {

class positions {
 public:
  /// No rows: forward copies h, backward passes dout through.
  positions() = default;

  /// Every row 0..n-1 of an h with exactly n rows.
  static positions all(index_t n) {
    require<shape_error>(n >= 0, "positions::all: expected a non-negative row count, got ", n);
    positions p;
    p.rows_.resize(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) p.rows_[static_cast<std::size_t>(i)] = i;
    p.expected_rows_ = n;
    p.summarize();
    return p;
  }

  /// The last prompt token of each sequence b: row b·S + len_b − 1, for an h of exactly B·S rows.
  static positions last_prompt_token(std::span<const index_t> prompt_lengths, index_t seq_len) {
    require<shape_error>(seq_len >= 1, "positions::last_prompt_token: expected seq_len >= 1, got ", seq_len);
    positions p;
    p.rows_.reserve(prompt_lengths.size());
    for (std::size_t b = 0; b < prompt_lengths.size(); ++b) {
      const index_t len = prompt_lengths[b];
      require<shape_error>(len >= 1 && len <= seq_len, "positions::last_prompt_token: prompt length of sequence ", b,
                           " must be in 1..", seq_len, " (seq_len), got ", len);
      p.rows_.push_back(static_cast<index_t>(b) * seq_len + len - 1);
    }
    p.expected_rows_ = static_cast<index_t>(prompt_lengths.size()) * seq_len;
    p.summarize();
    return p;
  }
  static positions last_prompt_token(std::initializer_list<index_t> prompt_lengths, index_t seq_len) {
    return last_prompt_token(std::span<const index_t>(prompt_lengths.begin(), prompt_lengths.size()), seq_len);
  }

  /// An explicit list of rows (any order, no duplicates, each >= 0; each < N checked against h).
  static positions rows(std::vector<index_t> r) {
    for (std::size_t i = 0; i < r.size(); ++i)
      require<shape_error>(r[i] >= 0, "positions::rows: row indices must be >= 0, got ", r[i], " at entry ", i);
    std::vector<index_t> sorted = r;
    std::sort(sorted.begin(), sorted.end());
    const auto dup = std::adjacent_find(sorted.begin(), sorted.end());
    require<shape_error>(dup == sorted.end(), "positions::rows: expected distinct row indices, row ",
                         dup == sorted.end() ? 0 : *dup, " appears more than once");
    positions p;
    p.rows_ = std::move(r);
    p.summarize();
    return p;
  }

  index_t size() const { return static_cast<index_t>(rows_.size()); }
  bool empty() const { return rows_.empty(); }
  index_t operator[](index_t i) const { return rows_[static_cast<std::size_t>(i)]; }
  std::span<const index_t> span() const { return rows_; }
  const index_t* data() const { return rows_.data(); }
  vector_view<const index_t> view() const { return {rows_.data(), {size()}}; }
  /// The row count h must have (all / last_prompt_token), or -1 when any N > max row will do.
  index_t expected_rows() const { return expected_rows_; }
  /// Whether entry i selects row i for every i (positions::all, or a list that happens to be 0..n-1):
  /// a kernel then needs no list at all. Known at construction (positions never change), so asking
  /// costs nothing per call — it used to be an O(P) scan on every call of the CUDA forward.
  bool in_order() const { return in_order_; }
  /// The largest row selected (−1 when none).
  index_t max_row() const { return max_row_; }

  /// Throws shape_error unless these positions fit an h with n rows.
  void validate(index_t n, const char* what) const {
    if (expected_rows_ >= 0)
      require<shape_error>(n == expected_rows_, what, ": positions were built for ", expected_rows_,
                           " rows (batch × seq_len), but h has ", n, " rows");
    if (max_row_ < n) return;  // O(1) on every call; the scan below only names the offender
    for (std::size_t i = 0; i < rows_.size(); ++i)
      require<shape_error>(rows_[i] < n, what, ": position ", i, " selects row ", rows_[i], ", expected a row in [0, ",
                           n, ")");
  }

 private:
  void summarize() {
    in_order_ = true;
    max_row_ = -1;
    for (std::size_t i = 0; i < rows_.size(); ++i) {
      in_order_ = in_order_ && rows_[i] == static_cast<index_t>(i);
      max_row_ = std::max(max_row_, rows_[i]);
    }
  }

  std::vector<index_t> rows_;
  index_t expected_rows_ = -1;
  bool in_order_ = true;
  index_t max_row_ = -1;
};

}  // namespace grun
