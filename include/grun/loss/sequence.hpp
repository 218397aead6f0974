#pragma once
// grun/loss/sequence.hpp — per-token quantities summed per sequence.
//
// Tokens of a batch are laid out sequence after sequence; `seq_offsets` [B+1] gives the first
// token of each sequence and the end: sequence b owns tokens [offsets[b], offsets[b+1]).
// For a padded batch [B, S] flattened to T = B·S rows, offsets[b] = b·S (uniform_offsets).
// Offsets were chosen over per-token sequence ids because they also describe packed (unpadded)
// batches, validate in O(B), and make "sequence b" a contiguous range for the device.
//
//   NLL_b = Σ_{t ∈ b} nll_t             (summed token NLL of answer y_b; ignored tokens add 0)
//   |y_b| = #{t ∈ b : labels[t] ≠ −100}  (answer length)
//   backward: ∂L/∂nll_t = ∂L/∂NLL_b for t ∈ b
#include <cstdint>
#include <type_traits>

#include "../core/tensor.hpp"
#include "../exec/host.hpp"  // before cuda.hpp, whose executor check names exec::host_t
#include "../exec/cuda.hpp"
#include "detail/parallel.hpp"
#include "token_nll.hpp"

namespace grun::loss {

/// Throws shape_error unless offsets [B+1] starts at 0, never decreases and ends at `tokens`.
template <class O, memory_space Sp>
void require_sequence_offsets(const tensor_view<O, 1, Sp>& offsets, index_t tokens, const char* what) {
  static_assert(std::is_integral_v<std::remove_const_t<O>>, "grun::loss: seq_offsets must be integers (int64)");
  static_assert(std::is_same_v<Sp, host_space>, "grun::loss: seq_offsets must be a host view (B+1 integers)");
  require<shape_error>(offsets.extent(0) >= 1, what, ": seq_offsets: expected B+1 >= 1 entries, got shape ",
                       grun::detail::shape_string(offsets));
  const index_t B = offsets.extent(0) - 1;
  require<shape_error>(offsets(0) == 0, what, ": seq_offsets[0]: expected 0, got ", static_cast<index_t>(offsets(0)));
  for (index_t b = 0; b < B; ++b)
    require<shape_error>(offsets(b + 1) >= offsets(b), what, ": seq_offsets must not decrease, got seq_offsets[",
                         b, "] = ", static_cast<index_t>(offsets(b)), " > seq_offsets[", b + 1,
                         "] = ", static_cast<index_t>(offsets(b + 1)));
  require<shape_error>(offsets(B) == tokens, what, ": seq_offsets[", B, "]: expected the token count ", tokens,
                       ", got ", static_cast<index_t>(offsets(B)));
}

/// seq_offsets for a padded batch of B sequences of S tokens each: {0, S, 2S, …, B·S}.
inline buffer<index_t> uniform_offsets(index_t B, index_t S) {
  require<shape_error>(B >= 0 && S >= 0, "uniform_offsets: expected B >= 0 and S >= 0, got B = ", B, ", S = ", S);
  buffer<index_t> o(B + 1);
  for (index_t b = 0; b <= B; ++b) o[b] = b * S;
  return o;
}

/// NLL_b and |y_b| from per-token nll [T] and labels [T]; seq_nll [B] (acc type), seq_count [B] (int64).
template <executor E, class N, class L, class O, class A, class C>
void sequence_nll(const E&, vector_view<N> token_nll, vector_view<L> labels, vector_view<O> offsets,
                  vector_view<A> seq_nll, vector_view<C> seq_count) {
  if constexpr (!std::is_same_v<E, exec::host_t>)
    static_assert(detail::always_false_v<E>, "grun: no sequence_nll for loss::sequence_nll on this executor");
  static_assert(!std::is_const_v<A> && !std::is_const_v<C> && std::is_integral_v<C>,
                "grun::loss::sequence_nll: seq_nll (floating) and seq_count (integer) are mutable outputs");
  const index_t T = token_nll.extent(0);
  require_extent(labels, 0, T, "sequence_nll: labels");
  require_sequence_offsets(offsets, T, "sequence_nll");
  const index_t B = offsets.extent(0) - 1;
  require_extent(seq_nll, 0, B, "sequence_nll: seq_nll");
  require_extent(seq_count, 0, B, "sequence_nll: seq_count");
  for (index_t b = 0; b < B; ++b) {
    A sum = A(0);
    C cnt = 0;
    for (index_t t = offsets(b); t < offsets(b + 1); ++t) {
      if (labels(t) == ignore_index) continue;
      sum += static_cast<A>(token_nll(t));
      ++cnt;
    }
    seq_nll(b) = sum;
    seq_count(b) = cnt;
  }
}

/// dtoken_nll[t] = dseq_nll[b] for t in sequence b (ignored tokens too: token_nll_backward zeroes them).
template <executor E, class A, class O, class G>
void sequence_nll_backward(const E&, vector_view<O> offsets, vector_view<A> dseq_nll, vector_view<G> dtoken_nll) {
  if constexpr (!std::is_same_v<E, exec::host_t>)
    static_assert(detail::always_false_v<E>, "grun: no sequence_nll_backward for loss::sequence_nll on this executor");
  static_assert(!std::is_const_v<G>, "grun::loss::sequence_nll_backward: dtoken_nll is an output (mutable view)");
  require_sequence_offsets(offsets, dtoken_nll.extent(0), "sequence_nll_backward");
  const index_t B = offsets.extent(0) - 1;
  require_extent(dseq_nll, 0, B, "sequence_nll_backward: dseq_nll");
  for (index_t b = 0; b < B; ++b)
    for (index_t t = offsets(b); t < offsets(b + 1); ++t) dtoken_nll(t) = static_cast<G>(dseq_nll(b));
}

}  // namespace grun::loss
