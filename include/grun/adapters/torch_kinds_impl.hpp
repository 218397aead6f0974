#pragma once
// grun/adapters/torch_kinds_impl.hpp — the definitions behind torch_kinds.hpp. Include it in the one
// translation unit (or three) that instantiates the runtime kinds, with
//   GRUN_INSTANTIATE_TORCH_KINDS(grun::gate::linear)   // 18 kinds: 3 refts × 6 ranks
//   GRUN_INSTANTIATE_TORCH_KINDS(grun::gate::mlp<>)
//   GRUN_INSTANTIATE_TORCH_KINDS(grun::gate::always)
// (CMake's grun::torch_kinds does exactly this, one gate family per TU). Everything here is glue over
// torch.hpp's typed API and grun::io; no number is computed here.
#include <grun/adapters/torch_kinds.hpp>

#include <utility>

namespace grun::torch_adapter::detail {

/// intervention_kind for gated_intervention I.
template <class I>
class kind_model final : public intervention_kind {
  using gate_t = typename I::gate_type;
  using reft_t = typename I::reft_type;
  using ortho_t = typename I::ortho_type;
  using module_t = intervention<gate_t, reft_t, ortho_t>;
  using stack_t = intervention_stack<gate_t, reft_t, ortho_t>;
  using grun_stack_t = grun::intervention_stack<gate_t, reft_t, ortho_t, float>;  // what grun::io reads and writes

 public:
  std::string_view gate() const noexcept override { return gate_kind_of<gate_t>(); }
  std::string_view reft() const noexcept override { return reft_kind_of<reft_t>(); }
  index_t rank() const noexcept override { return I::rank; }

  index_t flat_size(index_t d) const override { return torch_adapter::flat_size<I>(d); }
  Tensor init_flat(index_t d, std::uint64_t seed, at::ScalarType dtype) const override {
    return detail::init_flat<I>(d, seed, dtype);
  }
  void retract_flat(Tensor& flat, index_t d) const override { detail::retract_flat<I>(flat, d); }
  std::tuple<Tensor, Tensor> apply(const Tensor& h, const Tensor& flat, const Tensor& rows) const override {
    return apply_intervention<I>(h, flat, rows);
  }
  std::tuple<Tensor, Tensor> apply_stack(const Tensor& h, const Tensor& frozen, const Tensor& flat, const Tensor& rows,
                                         double scale) const override {
    return torch_adapter::apply_stack<I>(h, frozen, flat, rows, scale);
  }
  std::shared_ptr<any_intervention> make_module(index_t d, std::uint64_t seed, at::ScalarType dtype) const override {
    return std::make_shared<module_t>(d, seed, dtype);
  }
  std::shared_ptr<any_intervention_stack> make_stack(index_t d, double a, double b,
                                                     at::ScalarType dtype) const override {
    return std::make_shared<stack_t>(d, a, b, dtype);
  }

  void save_adapter(const std::filesystem::path& path, std::span<const std::shared_ptr<any_intervention_stack>> sites,
                    const io::adapter_info& info, io::adapter_save_options opt) const override {
    std::vector<grun_stack_t> out;
    out.reserve(sites.size());
    for (std::size_t s = 0; s < sites.size(); ++s) {
      require<shape_error>(sites[s] != nullptr, "torch_adapter::save_adapter: site ", s, ": a null stack");
      const any_intervention_stack& st = *sites[s];
      require<shape_error>(st.gate_kind() == gate() && st.reft_kind() == reft() && st.rank() == rank(),
                           "torch_adapter::save_adapter: site ", s, ": expected a ", gate(), "/", reft(), "/rank ",
                           rank(), " stack (as site 0), got ", st.gate_kind(), "/", st.reft_kind(), "/rank ",
                           st.rank());
      // The stack's own s(K) = a·K + b: io::save_adapter checks it against info's.
      grun_stack_t g(st.dim(), st.scale_a(), st.scale_b());
      for (index_t k = 0; k < st.size(); ++k) {
        const Tensor flat = st.module_flat(k).detach().to(at::kCPU, at::kFloat).contiguous();
        g.append(bind_params<I, float>(flat, st.dim(), "module_flat"));
      }
      out.push_back(std::move(g));
    }
    io::save_adapter(path, std::span<const grun_stack_t>(out), info, opt);
  }

  std::vector<std::shared_ptr<any_intervention_stack>> load_adapter(const io::safetensors_file& file, index_t d,
                                                                    const io::adapter_load_options& opt,
                                                                    io::adapter_info& info) const override {
    auto loaded = io::load_adapter<grun_stack_t>(file, opt, d);
    std::vector<std::shared_ptr<any_intervention_stack>> sites;
    for (auto& g : loaded.sites) {
      auto st = std::make_shared<stack_t>(g.dim(), loaded.info.stack_scale_a, loaded.info.stack_scale_b, at::kFloat);
      for (index_t k = 0; k < g.size(); ++k) {
        auto& own = g.owned_module(k);
        st->append_frozen(at::from_blob(own.data(), {index_t(own.size())}, at::kFloat).clone());
      }
      sites.push_back(std::move(st));
    }
    info = std::move(loaded.info);
    return sites;
  }
};

template <class I>
const intervention_kind& kind_instance() {
  static const kind_model<I> kind;
  return kind;
}

/// The 18 kinds of gate family Gate: 3 refts × the instantiated ranks. reft and rank were validated
/// by intervention_kind_of (an unknown one here is a caller's bug, still reported, never UB).
template <class Gate>
const intervention_kind& kind_with_gate(std::string_view reft, std::int64_t rank) {
  const intervention_kind* found = nullptr;
  auto try_rank = [&]<std::int64_t R>(std::integral_constant<std::int64_t, R>) {
    if (rank != R) return;
    if (reft == "loreft") found = &kind_instance<gated_intervention<Gate, reft::loreft<R>>>();
    else if (reft == "noreft") found = &kind_instance<gated_intervention<Gate, reft::noreft<R>>>();
    else if (reft == "direft") found = &kind_instance<gated_intervention<Gate, reft::direft<R>>>();
  };
  [&]<std::size_t... N>(std::index_sequence<N...>) {
    (try_rank(std::integral_constant<std::int64_t, instantiated_ranks[N]>{}), ...);
  }(std::make_index_sequence<std::size(instantiated_ranks)>{});
  require<error>(found != nullptr, "torch_adapter: no ", Gate::name, " kind with reft \"", reft, "\" and rank ", rank,
                 "; expected loreft, noreft or direft and one of 1, 2, 4, 8, 16, 32");
  return *found;
}

}  // namespace grun::torch_adapter::detail

/// Explicit instantiation of one gate family's 18 runtime kinds (see torch_kinds.hpp).
#define GRUN_INSTANTIATE_TORCH_KINDS(Gate)                                                                       \
  template const ::grun::torch_adapter::intervention_kind& ::grun::torch_adapter::detail::kind_with_gate<Gate>( \
      std::string_view, std::int64_t);
