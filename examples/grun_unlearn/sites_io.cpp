// examples/grun_unlearn/sites_io.cpp — adapter files for the CLI's runtime-chosen interventions:
// the torch modules' flat parameters become grun::intervention_stack modules, which grun::io writes
// and reads with the reference key names (include/grun/io/adapter.hpp).
#include "job.hpp"

namespace unlearn {

void save_sites(const std::filesystem::path& path, const sites& s, const std::string& fingerprint,
                       const job_config& cfg) {
  namespace TA = grun::torch_adapter;
  const auto& st0 = *s.stacks.front();
  TA::detail::with_kinds(st0.gate_kind(), st0.reft_kind(), st0.rank(), [&](auto tag) {
    using I = typename decltype(tag)::type;
    using stack_t = grun::intervention_stack<typename I::gate_type, typename I::reft_type, typename I::ortho_type, float>;
    std::vector<stack_t> out;
    for (const auto& st : s.stacks) {
      stack_t g(st->dim(), cfg.stack_a, cfg.stack_b);
      for (index_t k = 0; k < st->size(); ++k) {
        const Tensor flat = st->module_flat(k).detach().to(torch::kCPU).to(torch::kFloat32).contiguous();
        g.append(TA::bind_params<I, float>(flat, st->dim()));
      }
      out.push_back(std::move(g));
    }
    grun::io::adapter_info info;
    info.layers.assign(s.layers.begin(), s.layers.end());
    info.model_fingerprint = fingerprint;
    info.stack_scale_a = cfg.stack_a;
    info.stack_scale_b = cfg.stack_b;
    grun::io::save_adapter(path, out, info);
  });
}

sites load_sites(const std::filesystem::path& path, index_t d, const std::string& fingerprint, job_config& cfg) {
  namespace TA = grun::torch_adapter;
  const auto f = grun::io::safetensors_file::read(path);
  const auto& meta = f.metadata();
  auto get = [&](const char* k) -> std::string {
    auto it = meta.find(k);
    grun::require<grun::format_error>(it != meta.end(), path.string(), ": not a grun adapter (no \"", k, "\" in __metadata__)");
    return it->second;
  };
  auto strip = [](std::string v) { auto p = v.find("::"); return p == std::string::npos ? v : v.substr(p + 2); };
  cfg.gate = strip(get("gate"));
  cfg.reft = strip(get("reft"));
  cfg.rank = std::stoll(get("rank"));
  if (auto it = meta.find("stack_scale_a"); it != meta.end()) cfg.stack_a = std::stod(it->second);
  if (auto it = meta.find("stack_scale_b"); it != meta.end()) cfg.stack_b = std::stod(it->second);
  sites s;
  TA::detail::with_kinds(cfg.gate, cfg.reft, cfg.rank, [&](auto tag) {
    using I = typename decltype(tag)::type;
    using stack_t = grun::intervention_stack<typename I::gate_type, typename I::reft_type, typename I::ortho_type, float>;
    grun::io::adapter_load_options opt;
    opt.expected_fingerprint = fingerprint;
    auto loaded = grun::io::load_adapter<stack_t>(path, opt, d);
    for (std::size_t i = 0; i < loaded.sites.size(); ++i) {
      s.layers.push_back(int(loaded.info.layers[i]));
      auto st = TA::make_intervention_stack(cfg.gate, cfg.reft, cfg.rank, d, loaded.info.stack_scale_a, loaded.info.stack_scale_b);
      auto& g = loaded.sites[i];
      for (index_t k = 0; k < g.size(); ++k) {
        auto& own = g.owned_module(k);
        st->append_frozen(torch::from_blob(own.data(), {own.size()}, torch::kFloat32).clone());
      }
      s.stacks.push_back(st);
    }
  });
  return s;
}

}  // namespace unlearn
