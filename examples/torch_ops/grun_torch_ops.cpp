// grun_torch_ops — a TORCH_LIBRARY op library so Python (and TorchScript) can call grun:
//
//   import torch; torch.ops.load_library("libgrun_torch_ops.so")
//   h2, gates = torch.ops.grun.gated_intervention(h, flat, rows, "mlp", "loreft", 4)
//   nll = torch.ops.grun.token_nll(logits, labels)
//
// Ops (schemas below). Every op is registered as a CompositeImplicitAutograd kernel that calls the
// torch::autograd::Functions of grun/adapters/torch.hpp, so autograd works from Python as from C++.
//   grun::gated_intervention(Tensor h, Tensor flat, Tensor rows, str gate, str reft, int rank) -> (Tensor, Tensor)
//   grun::intervention_stack(Tensor h, Tensor frozen, Tensor flat, Tensor rows, str gate, str reft, int rank,
//                            float scale) -> (Tensor, Tensor)
//   grun::token_nll(Tensor logits, Tensor labels) -> Tensor
//   grun::param_count(str gate, str reft, int rank, int d) -> int
//   grun::init_params(str gate, str reft, int rank, int d, int seed, ScalarType? dtype=None) -> Tensor
//   grun::retract_(Tensor(a!) flat, str gate, str reft, int rank, int d) -> ()
// The flat layout is grun/adapters/torch.hpp's; kinds and ranks those of grun/adapters/torch_kinds.hpp
// (compiled once in grun::torch_kinds, which this library links). grun errors surface in
// Python as RuntimeError carrying grun's message.
#include <torch/library.h>

#include <grun/adapters/torch_kinds.hpp>

namespace {

namespace ta = grun::torch_adapter;
using at::Tensor;

const ta::intervention_kind& kind_of(c10::string_view gate, c10::string_view reft, int64_t rank) {
  return ta::intervention_kind_of(std::string_view(gate.data(), gate.size()), std::string_view(reft.data(), reft.size()),
                                  rank);
}

std::tuple<Tensor, Tensor> gated_intervention(const Tensor& h, const Tensor& flat, const Tensor& rows,
                                              c10::string_view gate, c10::string_view reft, int64_t rank) {
  return kind_of(gate, reft, rank).apply(h, flat, rows);
}

std::tuple<Tensor, Tensor> intervention_stack(const Tensor& h, const Tensor& frozen, const Tensor& flat,
                                              const Tensor& rows, c10::string_view gate, c10::string_view reft,
                                              int64_t rank, double scale) {
  return kind_of(gate, reft, rank).apply_stack(h, frozen, flat, rows, scale);
}

Tensor token_nll(const Tensor& logits, const Tensor& labels) { return ta::token_nll(logits, labels); }

int64_t param_count(c10::string_view gate, c10::string_view reft, int64_t rank, int64_t d) {
  return kind_of(gate, reft, rank).flat_size(d);
}

Tensor init_params(c10::string_view gate, c10::string_view reft, int64_t rank, int64_t d, int64_t seed,
                   c10::optional<at::ScalarType> dtype) {
  return kind_of(gate, reft, rank).init_flat(d, static_cast<std::uint64_t>(seed), dtype.value_or(at::kFloat));
}

void retract_(Tensor& flat, c10::string_view gate, c10::string_view reft, int64_t rank, int64_t d) {
  kind_of(gate, reft, rank).retract_flat(flat, d);
}

}  // namespace

TORCH_LIBRARY(grun, m) {
  m.def("gated_intervention(Tensor h, Tensor flat, Tensor rows, str gate, str reft, int rank) -> (Tensor, Tensor)",
        &gated_intervention);
  m.def("intervention_stack(Tensor h, Tensor frozen, Tensor flat, Tensor rows, str gate, str reft, int rank, "
        "float scale) -> (Tensor, Tensor)",
        &intervention_stack);
  m.def("token_nll(Tensor logits, Tensor labels) -> Tensor", &token_nll);
  m.def("param_count(str gate, str reft, int rank, int d) -> int", &param_count);
  m.def("init_params(str gate, str reft, int rank, int d, int seed, ScalarType? dtype=None) -> Tensor", &init_params);
  m.def("retract_(Tensor(a!) flat, str gate, str reft, int rank, int d) -> ()", &retract_);
}
