#pragma once
// grun/loss/concepts.hpp — what a loss consumes, what it produces, and the loss_policy concept.
//
// The trainer runs the model, computes whatever the chosen policies declare they need (NLL of
// the answers, the frozen reference model's outputs, refusal answers, hidden states, logits,
// gate values) and hands it over as `inputs<T>`. A policy returns its value and *adds*
// weight · ∂L/∂x into every non-empty view of `grads<T>`; empty gradient views are skipped, so
// the same call computes a value only. loss::objective zeroes the gradients once and then lets
// each policy accumulate, so forget, retain and gate terms can share buffers.
//
// Chain back to the model: per-sequence ∂L/∂NLL_b → sequence_nll_backward → per-token ∂L/∂nll_t
// → token_nll_backward → ∂L/∂logits; ∂L/∂hidden and ∂L/∂gate go to the intervention's backward.
#include <concepts>
#include <cstdint>
#include <type_traits>

#include "../core/tensor.hpp"
#include "../exec/host.hpp"  // before cuda.hpp, whose executor check names exec::host_t
#include "../exec/cuda.hpp"

namespace grun::loss {

/// Which slot of loss::objective a policy fills (any: loss::none, fits every slot).
enum class loss_role { forget, retain, gate, any };

/// One side (forget or retain) of a batch. T is the storage type of logits and hidden states;
/// sequence-level values and gates are in the accumulate type acc_t<T>. Leave what the policy
/// does not need empty. Every view lives in memory space Sp: host_space for exec::host,
/// cuda_space for exec::cuda (the losses then run on the device, see detail/terms.hpp).
template <class T, memory_space Sp = host_space>
struct side_inputs {
  using acc = acc_t<T>;
  template <class U> using vector_view = tensor_view<U, 1, Sp>;
  template <class U> using matrix_view = tensor_view<U, 2, Sp>;
  // Sequence level, B sequences (sequence_nll):
  vector_view<const acc> nll;                // [B] NLL_θ(y_b|x_b): summed token NLL with the intervention
  vector_view<const acc> nll_ref;            // [B] the same under the frozen reference model
  vector_view<const index_t> count;          // [B] |y_b|: answer tokens (labels ≠ −100); 0 = no answer
  vector_view<const acc> refusal_nll;        // [B] NLL_θ of a refusal answer ("I don't know") to x_b
  vector_view<const acc> refusal_nll_ref;    // [B] the same under the reference model
  vector_view<const index_t> refusal_count;  // [B] refusal answer lengths
  // Token level, T tokens (retain_kl):
  matrix_view<const T> logits;               // [T, V] with the intervention
  matrix_view<const T> logits_ref;           // [T, V] frozen reference model
  vector_view<const std::int64_t> labels;    // [T] −100 = not an answer token (mask)
  // Representation level, P rows at the RMU layer (rmu, rmu_retain):
  matrix_view<const T> hidden;               // [P, d] with the intervention
  matrix_view<const T> hidden_ref;           // [P, d] frozen model (rmu_retain)
  vector_view<const acc> direction;          // [d] RMU's fixed random unit vector u (rmu_direction)
  // Gates, G values = every gate output on this side's rows, all layers concatenated (gate_bce*):
  vector_view<const acc> gate;               // [G] g ∈ (0, 1)
  vector_view<const acc> gate_logit;         // [G] z with g = σ(z), when the gate exposes it
};

/// Where ∂L/∂(input) goes; same shapes and memory space as side_inputs. Leave a view empty to
/// skip that gradient.
template <class T, memory_space Sp = host_space>
struct side_grads {
  using acc = acc_t<T>;
  template <class U> using vector_view = tensor_view<U, 1, Sp>;
  template <class U> using matrix_view = tensor_view<U, 2, Sp>;
  vector_view<acc> nll;           // [B]
  vector_view<acc> refusal_nll;   // [B]
  matrix_view<T> logits;          // [T, V]
  matrix_view<T> hidden;          // [P, d]
  vector_view<acc> gate;          // [G]
  vector_view<acc> gate_logit;    // [G]
};

template <class T, memory_space Sp = host_space>
struct inputs {
  using memory_space = Sp;
  side_inputs<T, Sp> forget, retain;
};
template <class T, memory_space Sp = host_space>
struct grads {
  using memory_space = Sp;
  side_grads<T, Sp> forget, retain;
};

/// What a loss reads of inputs<T, Sp>, so that a training loop computes only that. Every member is
/// false unless a policy says otherwise: a policy names only what it reads.
struct loss_needs {
  bool nll = false;        ///< side.nll / count (the side's own answers, under θ)
  bool reference = false;  ///< the frozen model's outputs (nll_ref, logits_ref or hidden_ref)
  bool refusal = false;    ///< refusal_nll / refusal_count (and refusal_nll_ref if reference)
  bool hidden = false;     ///< hidden [P, d] at the intervention / RMU layer
  bool logits = false;     ///< logits [T, V] and labels
  bool gates = false;      ///< gate (or gate_logit) values
};

/// grun::loss::loss_policy — the contract of every loss.
///   name             const char*, for logs and error messages
///   slot             loss_role: which objective slot it fills (forget, retain, gate, any)
///   needs            loss_needs, a constant: which inputs it reads (a training loop computes only
///                    those), e.g. static constexpr loss_needs needs{.nll = true, .reference = true};
///   evaluate(ex, in, g, weight) -> acc_t<T>: returns L (unweighted) and adds weight · ∂L/∂x into
///                    the non-empty views of g; an input with nothing to average gives 0, not NaN.
///                    in and g live in ex's memory space (inputs<T, cuda_space> with exec::cuda;
///                    the value then comes back to the host, one stream synchronization per term).
/// Policies are small copyable structs whose data members are runtime knobs (β, γ, c, eps).
template <class P>
concept loss_policy = std::copyable<P> && std::default_initializable<P> &&
    requires {
      { P::name } -> std::convertible_to<const char*>;
      { P::slot } -> std::convertible_to<loss_role>;
      { P::needs } -> std::convertible_to<loss_needs>;
      typename std::bool_constant<loss_needs(P::needs).nll>;  // a constant expression: read in if constexpr
    } &&
    requires(const P& p, const inputs<double>& in, const grads<double>& g, const inputs<float>& inf,
             const grads<float>& gf) {
      { p.evaluate(exec::host, in, g, 1.0) } -> std::same_as<double>;
      { p.evaluate(exec::host, inf, gf, 1.0f) } -> std::same_as<float>;
    };

}  // namespace grun::loss
