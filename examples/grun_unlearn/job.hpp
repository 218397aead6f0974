#pragma once
// examples/grun_unlearn/job.hpp — the unlearning job on a real LLM: data preparation with
// cached frozen computation, the training loop (grun interventions through the libtorch adapter,
// grun's fused NLL and unlearning objective), evaluation and adapter IO.
//
// Efficiency: an intervention at layer l on the last prompt token p changes nothing at layers ≤ l
// and nothing at positions < p. So each example runs through the frozen model ONCE (prep): its
// prompt prefix (positions < p) leaves keys/values at every layer above the first intervened
// layer l0, and its suffix (p and the answer) leaves the block-l0 output. A training step then runs
// only the suffix (≈ answer length + 1 tokens) through blocks l0+1 … L−1, attending to the cached
// prefix keys/values. The frozen model's answer NLLs (NPO/DPO references) are cached in the same pass.
#include <torch/torch.h>

#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include <grun/adapters/torch_kinds.hpp>
#include <grun/io/adapter.hpp>
#include <grun/loss/objective.hpp>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <map>
#include <memory>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "llm/chat_template.hpp"
#include "llm/dataset.hpp"
#include "llm/metrics.hpp"
#include "llm/model.hpp"
#include "llm/progress.hpp"
#include "llm/tokenizer.hpp"

namespace unlearn {

using torch::Tensor;
using grun::index_t;

// ---- configuration ------------------------------------------------------------------------------
struct job_config {
  std::string gate = "mlp";       // linear | mlp | always
  std::string reft = "loreft";    // loreft | noreft | direft
  std::int64_t rank = 4;
  std::string loss = "gd";        // ga | gd | npo | simnpo | idk | dpo | rmu
  std::string retain = "";        // nll | kl | none ("" = the loss's default)
  std::vector<int> layers;        // empty = three layers in the upper half, chosen from the model depth
  std::string positions = "last_prompt_token";
  int steps = 120;
  double lr = 4e-3;
  int batch = 8;                  // forget examples per step (and as many retain examples)
  double w_retain = 1.0, w_gate = 10.0;
  int warmup = 0;
  double beta = 0.1, gamma = 0.0, rmu_c = 20.0;
  std::uint64_t seed = 0;
  double stack_a = 0.0, stack_b = 1.0;
  int threads = 0;
};

// ---- encoded examples ---------------------------------------------------------------------------
struct encoded {
  std::vector<std::int64_t> prompt;                 // chat-templated question + generation prompt
  std::vector<std::int64_t> answer;                 // answer tokens (no special tokens)
  std::vector<std::vector<std::int64_t>> options;   // MCQ option answers
  std::optional<std::size_t> correct;
  std::string answer_text;
  std::vector<std::int64_t> refusal;                // a refusal answer (IDK / DPO)
};

inline const std::vector<std::string>& refusal_answers() {
  static const std::vector<std::string> r = {"I don't know.", "I'm not sure about that.", "I have no idea.",
                                             "I can't answer that.", "That's not something I know."};
  return r;
}

class text_codec {
 public:
  text_codec(const llm::bpe_tokenizer& tok) : tok_(tok), tmpl_(llm::chat_template::of(tok)) {
    if (auto id = tok.token_to_id("<|im_end|>")) stop_ids_.push_back(*id);
    if (tok.eos_id() >= 0) stop_ids_.push_back(tok.eos_id());
  }
  std::vector<std::int64_t> prompt(const std::string& question) const {
    const llm::chat_message m{"user", question};
    return widen(llm::encode_chat(tok_, tmpl_, std::span<const llm::chat_message>(&m, 1), true));
  }
  std::vector<std::int64_t> text(const std::string& s) const { return widen(tok_.encode(s, false)); }
  std::string decode(const std::vector<std::int64_t>& ids) const {
    std::vector<std::int32_t> n(ids.begin(), ids.end());
    return tok_.decode(n, true);
  }
  const std::vector<std::int64_t>& stop_ids() const { return stop_ids_; }

 private:
  static std::vector<std::int64_t> widen(const std::vector<std::int32_t>& v) { return {v.begin(), v.end()}; }
  const llm::bpe_tokenizer& tok_;
  llm::chat_template tmpl_;
  std::vector<std::int64_t> stop_ids_;
};

inline std::vector<encoded> encode_all(const text_codec& codec, const std::vector<llm::qa_example>& qa, std::uint64_t seed) {
  std::vector<encoded> out;
  std::mt19937_64 rng(seed);
  for (const auto& ex : qa) {
    encoded e;
    e.prompt = codec.prompt(ex.question);
    // The assistant turn starts right after "<|im_start|>assistant\n": answers carry no leading space.
    e.answer = codec.text(ex.answer);
    e.answer_text = ex.answer;
    for (const auto& o : ex.options) e.options.push_back(codec.text(o));
    e.correct = ex.correct_option;
    e.refusal = codec.text(refusal_answers()[rng() % refusal_answers().size()]);
    out.push_back(std::move(e));
  }
  return out;
}

// ---- cached frozen computation ------------------------------------------------------------------
/// What one example keeps from its single frozen pass (see the header comment).
struct cached_example {
  std::vector<Tensor> prefix_k, prefix_v;  // per layer above l0: [Hkv, P, hd]
  Tensor suffix_hidden;                    // [Ss, d] block-l0 output of the suffix (last prompt token + answer)
  std::vector<std::int64_t> suffix_ids;    // [Ss]
  std::vector<std::int64_t> labels;        // [Ss]: suffix[i + 1], the last −100
  double nll_ref = 0;                      // frozen model's answer NLL (summed)
  index_t count = 0;                       // answer tokens
  Tensor hidden_ref;                       // [Ss, d] frozen output of the last intervened layer (RMU)
  Tensor final_ref;                        // [Ss, d] frozen output of the last block (KL retain)
};

// ---- sites: one intervention stack per intervened layer ------------------------------------------
struct sites {
  std::vector<int> layers;
  std::vector<std::shared_ptr<grun::torch_adapter::any_intervention_stack>> stacks;

  index_t modules() const { return stacks.empty() ? 0 : stacks.front()->size(); }
  int first() const { return layers.front(); }
  int last() const { return layers.back(); }
  std::vector<Tensor> trainable() const {
    std::vector<Tensor> t;
    for (auto& s : stacks)
      if (auto p = s->trainable(); p.defined()) t.push_back(p);
    return t;
  }
  index_t trainable_params() const {
    index_t n = 0;
    for (auto& t : trainable()) n += t.numel();
    return n;
  }
};

/// A hook that applies each site's stack to `rows` of the hidden state and records the gates.
struct gate_record {
  std::map<int, Tensor> gates;  // layer → [K, P]
};
inline llm::block_hook make_hook(const sites& s, Tensor rows, gate_record* rec) {
  return [&s, rows, rec](int layer, Tensor h) -> Tensor {
    const auto it = std::find(s.layers.begin(), s.layers.end(), layer);
    if (it == s.layers.end() || s.modules() == 0) return h;
    auto [out, g] = s.stacks[std::size_t(it - s.layers.begin())]->forward(h, rows);
    if (rec) rec->gates[layer] = g;
    return out;
  };
}

// ---- the frozen pass ------------------------------------------------------------------------------
/// Summed NLL of `labels` (−100 ignored) under logits [N, V], per row group; no autograd.
inline double summed_nll(const Tensor& logits, const std::vector<std::int64_t>& labels) {
  const Tensor lab = torch::tensor(labels, torch::kInt64);
  return grun::torch_adapter::token_nll(logits, lab).sum().item<double>();
}

/// One frozen forward of prompt + answer per example; caches what training needs.
inline std::vector<cached_example> cache_examples(const llm::llama_model& model, const std::vector<encoded>& data,
                                                  const sites& s, bool refusal, const char* label) {
  torch::NoGradGuard no_grad;
  const int l0 = s.first(), L = static_cast<int>(model.config().n_layers);
  std::vector<cached_example> out;
  llm::progress_bar bar(fmt::format("caching {:<7}", label), static_cast<long>(data.size()));
  for (std::size_t i = 0; i < data.size(); ++i) {
    const encoded& e = data[i];
    const auto& answer = refusal ? e.refusal : e.answer;
    std::vector<std::int64_t> ids = e.prompt;
    ids.insert(ids.end(), answer.begin(), answer.end());
    const auto n = static_cast<std::int64_t>(ids.size()), p = static_cast<std::int64_t>(e.prompt.size()) - 1;
    llm::kv_cache cache = model.make_cache(1, n);
    llm::forward_options fo;
    fo.capture = {l0, s.last()};
    fo.logits = llm::logits_mode::none;
    const auto r = model.forward(torch::tensor(ids, torch::kInt64).view({1, n}), {}, fo, &cache);
    cached_example c;
    for (int l = l0 + 1; l < L; ++l) {
      c.prefix_k.push_back(cache.k[std::size_t(l)][0].narrow(1, 0, p).clone());
      c.prefix_v.push_back(cache.v[std::size_t(l)][0].narrow(1, 0, p).clone());
    }
    c.suffix_hidden = r.captured.at(l0)[0].narrow(0, p, n - p).clone();
    c.hidden_ref = r.captured.at(s.last())[0].narrow(0, p, n - p).clone();
    c.suffix_ids.assign(ids.begin() + p, ids.end());
    c.labels.assign(ids.begin() + p + 1, ids.end());
    c.labels.push_back(-100);
    c.count = static_cast<index_t>(answer.size());
    c.final_ref = r.hidden[0].narrow(0, p, n - p).clone();
    c.nll_ref = summed_nll(model.head(r.hidden[0].narrow(0, p, n - p)), c.labels);
    out.push_back(std::move(c));
    bar.update(static_cast<long>(i + 1));
  }
  return out;
}

/// Right-padded batch of cached suffixes with their prefix keys/values.
struct suffix_batch {
  Tensor hidden;          // [B, Ss, d]
  Tensor mask;            // [B, Ss] bool
  llm::prefix_kv prefix;  // per layer [B, Hkv, P, hd], valid [B, P], length [B]
  Tensor rows;            // [B]: the last prompt token of each = row b·Ss
  Tensor label_index;     // [N]: flattened positions with a label
  Tensor labels;          // [N]
  Tensor seq_of_label;    // [N]: sequence of each label
  std::vector<index_t> count;
  std::vector<double> nll_ref;
  Tensor hidden_ref;      // [B, Ss, d]
  Tensor final_ref;       // [B, Ss, d]
};

inline suffix_batch make_suffix_batch(const std::vector<const cached_example*>& ex, std::int64_t n_layers, int l0) {
  const auto B = static_cast<std::int64_t>(ex.size());
  std::int64_t Ss = 0, P = 0;
  for (auto* c : ex) { Ss = std::max<std::int64_t>(Ss, c->suffix_hidden.size(0)); P = std::max<std::int64_t>(P, c->prefix_k.empty() ? 0 : c->prefix_k[0].size(1)); }
  const auto d = ex.front()->suffix_hidden.size(1);
  suffix_batch b;
  b.hidden = torch::zeros({B, Ss, d});
  b.hidden_ref = torch::zeros({B, Ss, d});
  b.final_ref = torch::zeros({B, Ss, d});
  b.mask = torch::zeros({B, Ss}, torch::kBool);
  b.prefix.valid = torch::zeros({B, P}, torch::kBool);
  b.prefix.length = torch::zeros({B}, torch::kInt64);
  b.prefix.k.resize(std::size_t(n_layers));
  b.prefix.v.resize(std::size_t(n_layers));
  const std::size_t above = ex.front()->prefix_k.size();
  for (std::size_t j = 0; j < above; ++j) {
    const auto& k0 = ex.front()->prefix_k[j];
    b.prefix.k[std::size_t(l0) + 1 + j] = torch::zeros({B, k0.size(0), P, k0.size(2)});
    b.prefix.v[std::size_t(l0) + 1 + j] = torch::zeros({B, k0.size(0), P, k0.size(2)});
  }
  std::vector<std::int64_t> rows, lidx, labels, seq;
  for (std::int64_t i = 0; i < B; ++i) {
    const auto& c = *ex[std::size_t(i)];
    const auto s = c.suffix_hidden.size(0), p = c.prefix_k.empty() ? 0 : c.prefix_k[0].size(1);
    b.hidden[i].narrow(0, 0, s).copy_(c.suffix_hidden);
    b.hidden_ref[i].narrow(0, 0, s).copy_(c.hidden_ref);
    b.final_ref[i].narrow(0, 0, s).copy_(c.final_ref);
    b.mask[i].narrow(0, 0, s).fill_(true);
    b.prefix.valid[i].narrow(0, 0, p).fill_(true);
    b.prefix.length[i] = p;
    for (std::size_t j = 0; j < above; ++j) {
      b.prefix.k[std::size_t(l0) + 1 + j][i].narrow(1, 0, p).copy_(c.prefix_k[j]);
      b.prefix.v[std::size_t(l0) + 1 + j][i].narrow(1, 0, p).copy_(c.prefix_v[j]);
    }
    rows.push_back(i * Ss);
    for (std::int64_t t = 0; t < s; ++t)
      if (c.labels[std::size_t(t)] != -100) {
        lidx.push_back(i * Ss + t);
        labels.push_back(c.labels[std::size_t(t)]);
        seq.push_back(i);
      }
    b.count.push_back(c.count);
    b.nll_ref.push_back(c.nll_ref);
  }
  b.rows = torch::tensor(rows, torch::kInt64);
  b.label_index = torch::tensor(lidx, torch::kInt64);
  b.labels = torch::tensor(labels, torch::kInt64);
  b.seq_of_label = torch::tensor(seq, torch::kInt64);
  return b;
}

// ---- the objective, chosen at run time -----------------------------------------------------------
/// Type-erased loss::objective<Forget, Retain, gate_bce>: what it needs and one evaluation.
struct objective_fn {
  bool needs_reference = false, needs_refusal = false, needs_hidden = false, needs_logits = false, retain_hidden = false;
  std::string name;
  std::function<grun::loss::objective_terms<float>(const grun::loss::inputs<float>&, const grun::loss::grads<float>&, index_t)> run;
};

template <class Forget, class Retain>
objective_fn make_objective(Forget f, Retain r, const job_config& cfg, std::string name) {
  using obj_t = grun::loss::objective<Forget, Retain, grun::loss::gate_bce>;
  obj_t obj{.forget = f, .retain = r, .gate = {}, .w_retain = cfg.w_retain, .w_gate = cfg.w_gate, .warmup_steps = cfg.warmup};
  objective_fn o;
  o.name = std::move(name);
  o.needs_reference = Forget::needs.reference || Retain::needs.reference;
  o.needs_refusal = Forget::needs.refusal;
  o.needs_hidden = Forget::needs.hidden || Retain::needs.hidden;
  o.retain_hidden = Retain::needs.hidden;
  o.needs_logits = Retain::needs.logits;
  o.run = [obj](const grun::loss::inputs<float>& in, const grun::loss::grads<float>& g, index_t step) {
    return obj.value_and_grad(grun::exec::host, in, g, step);
  };
  return o;
}

template <class Forget>
objective_fn with_retain(Forget f, const job_config& cfg, const std::string& retain, const std::string& name) {
  namespace L = grun::loss;
  if (retain == "nll") return make_objective(f, L::retain_nll{}, cfg, name + "+retain_nll");
  if (retain == "kl") return make_objective(f, L::retain_kl{}, cfg, name + "+retain_kl");
  if (retain == "rmu") return make_objective(f, L::rmu_retain{}, cfg, name + "+rmu_retain");
  if (retain == "none") return make_objective(f, L::none{}, cfg, name);
  grun::fail<grun::error>("--retain-loss: expected nll, kl, rmu or none, got \"", retain, "\"");
}

inline objective_fn choose_objective(const job_config& cfg) {
  namespace L = grun::loss;
  const std::string& l = cfg.loss;
  auto retain = [&](const char* dflt) { return cfg.retain.empty() ? std::string(dflt) : cfg.retain; };
  if (l == "ga") return with_retain(L::ga{}, cfg, retain("none"), "ga");
  if (l == "gd" || l == "graddiff") return with_retain(L::ga{}, cfg, retain("nll"), "ga");
  if (l == "npo") { L::npo f; f.beta = cfg.beta; return with_retain(f, cfg, retain("nll"), "npo"); }
  if (l == "simnpo") { L::simnpo f; f.beta = cfg.beta; f.gamma = cfg.gamma; return with_retain(f, cfg, retain("nll"), "simnpo"); }
  if (l == "idk") return with_retain(L::idk{}, cfg, retain("nll"), "idk");
  if (l == "dpo") { L::dpo f; f.beta = cfg.beta; return with_retain(f, cfg, retain("nll"), "dpo"); }
  if (l == "rmu") { L::rmu f; f.c = cfg.rmu_c; return with_retain(f, cfg, retain("rmu"), "rmu"); }
  grun::fail<grun::error>("--loss: expected ga, gd, npo, simnpo, idk, dpo or rmu, got \"", l, "\"");
}

// ---- training -------------------------------------------------------------------------------------
struct step_log {
  double total = 0, forget = 0, retain = 0, gate = 0;
};

class trainer {
 public:
  trainer(const llm::llama_model& model, sites& s, const job_config& cfg, objective_fn obj,
          std::vector<cached_example> forget, std::vector<cached_example> retain, std::vector<cached_example> refusal)
      : model_(model), sites_(s), cfg_(cfg), obj_(std::move(obj)), forget_(std::move(forget)), retain_(std::move(retain)),
        refusal_(std::move(refusal)), rng_(cfg.seed + 17),
        opt_(s.trainable(), torch::optim::AdamWOptions(cfg.lr).weight_decay(0.0)) {
    if (obj_.needs_hidden) {
      const auto u = grun::loss::rmu_direction<float>(model.config().d_model, cfg.seed + 1);
      direction_ = torch::from_blob(const_cast<float*>(u.data()), {u.size()}, torch::kFloat32).clone();
    }
  }

  step_log step(index_t step) {
    const auto bf = std::min<std::size_t>(std::size_t(cfg_.batch), forget_.size());
    const auto br = std::min<std::size_t>(std::size_t(cfg_.batch), retain_.size());
    std::vector<std::size_t> fi = sample(forget_.size(), bf), ri = sample(retain_.size(), br);
    std::vector<const cached_example*> ex;
    for (auto i : fi) ex.push_back(&forget_[i]);
    if (obj_.needs_refusal) for (auto i : fi) ex.push_back(&refusal_[i]);
    for (auto i : ri) ex.push_back(&retain_[i]);
    const auto nf = std::int64_t(bf), nref = obj_.needs_refusal ? nf : 0, nr = std::int64_t(br);
    const suffix_batch b = make_suffix_batch(ex, model_.config().n_layers, sites_.first());

    gate_record rec;
    llm::forward_options fo;
    fo.hook = make_hook(sites_, b.rows, &rec);
    fo.logits = llm::logits_mode::none;
    if (obj_.needs_hidden) fo.capture = {sites_.last()};
    const auto r = model_.forward_with_prefix(sites_.first(), b.hidden, b.mask, b.prefix, fo);
    const auto d = r.hidden.size(-1);
    const Tensor h_lab = r.hidden.reshape({-1, d}).index_select(0, b.label_index);  // [N, d]
    const Tensor logits = model_.head(h_lab);                                       // [N, V]
    const Tensor nll_tok = grun::torch_adapter::token_nll(logits, b.labels);         // [N]
    const auto B = std::int64_t(ex.size());
    const Tensor nll_seq = torch::zeros({B}).index_add(0, b.seq_of_label, nll_tok); // [B]

    // Host copies for grun's objective (values only; gradients come back through autograd).
    const Tensor nll_host = nll_seq.detach().contiguous();
    std::vector<index_t> count(b.count.begin(), b.count.end());
    std::vector<float> nll_ref(b.nll_ref.begin(), b.nll_ref.end());
    const index_t K = sites_.modules();
    std::vector<Tensor> gf_parts, gr_parts;
    for (int l : sites_.layers) {
      const Tensor g = rec.gates.at(l)[K - 1];  // the trainable module's gates [B]
      gf_parts.push_back(g.narrow(0, 0, nf));
      gr_parts.push_back(g.narrow(0, nf + nref, nr));
    }
    const Tensor gf = torch::cat(gf_parts), gr = torch::cat(gr_parts);
    const Tensor gf_host = gf.detach().contiguous().to(torch::kFloat32), gr_host = gr.detach().contiguous().to(torch::kFloat32);

    namespace L = grun::loss;
    using fv = grun::vector_view<const float>;
    using iv = grun::vector_view<const index_t>;
    const float* nh = nll_host.data_ptr<float>();
    L::inputs<float> in;
    in.forget.nll = fv(nh, {nf});
    in.forget.nll_ref = fv(nll_ref.data(), {nf});
    in.forget.count = iv(count.data(), {nf});
    if (nref) {
      in.forget.refusal_nll = fv(nh + nf, {nref});
      in.forget.refusal_nll_ref = fv(nll_ref.data() + nf, {nref});
      in.forget.refusal_count = iv(count.data() + nf, {nref});
    }
    in.retain.nll = fv(nh + nf + nref, {nr});
    in.retain.nll_ref = fv(nll_ref.data() + nf + nref, {nr});
    in.retain.count = iv(count.data() + nf + nref, {nr});
    in.forget.gate = fv(gf_host.data_ptr<float>(), {gf_host.numel()});
    in.retain.gate = fv(gr_host.data_ptr<float>(), {gr_host.numel()});

    Tensor grad_nll = torch::zeros({B}), grad_gf = torch::zeros_like(gf_host), grad_gr = torch::zeros_like(gr_host);
    L::grads<float> g;
    float* gn = grad_nll.data_ptr<float>();
    g.forget.nll = {gn, {nf}};
    if (nref) g.forget.refusal_nll = {gn + nf, {nref}};
    g.retain.nll = {gn + nf + nref, {nr}};
    g.forget.gate = {grad_gf.data_ptr<float>(), {gf_host.numel()}};
    g.retain.gate = {grad_gr.data_ptr<float>(), {gr_host.numel()}};

    // Token-level retain (KL) and representation-level (RMU) inputs.
    Tensor logits_r, logits_ref_r, labels_r, grad_logits_r, hid_f, hid_r, hid_ref_r, grad_hid_f, grad_hid_r;
    if (obj_.needs_logits) {
      const Tensor sel = b.seq_of_label.ge(nf + nref).nonzero().squeeze(1);
      logits_r = logits.index_select(0, sel);
      {
        torch::NoGradGuard ng;
        logits_ref_r = model_.head(b.final_ref.reshape({-1, d}).index_select(0, b.label_index.index_select(0, sel)));
      }
      labels_r = b.labels.index_select(0, sel).contiguous();
      const Tensor lr_host = logits_r.detach().contiguous();
      logits_r_host_ = lr_host;
      in.retain.logits = grun::matrix_view<const float>(lr_host.data_ptr<float>(), {lr_host.size(0), lr_host.size(1)});
      in.retain.logits_ref = grun::matrix_view<const float>(logits_ref_r.data_ptr<float>(), {lr_host.size(0), lr_host.size(1)});
      in.retain.labels = grun::vector_view<const std::int64_t>(labels_r.data_ptr<std::int64_t>(), {labels_r.numel()});
      grad_logits_r = torch::zeros_like(lr_host);
      g.retain.logits = {grad_logits_r.data_ptr<float>(), {lr_host.size(0), lr_host.size(1)}};
    }
    Tensor dir = direction_;
    if (obj_.needs_hidden) {
      const Tensor cap = r.captured.at(sites_.last());  // [B, Ss, d]
      const Tensor mf = b.mask.narrow(0, 0, nf).reshape({-1}).nonzero().squeeze(1);
      hid_f = cap.narrow(0, 0, nf).reshape({-1, d}).index_select(0, mf);
      const Tensor hf_host = hid_f.detach().contiguous();
      hid_host_f_ = hf_host;
      in.forget.hidden = grun::matrix_view<const float>(hf_host.data_ptr<float>(), {hf_host.size(0), d});
      in.forget.direction = fv(dir.data_ptr<float>(), {d});
      grad_hid_f = torch::zeros_like(hf_host);
      g.forget.hidden = {grad_hid_f.data_ptr<float>(), {hf_host.size(0), d}};
      if (obj_.retain_hidden) {
        const Tensor mr = b.mask.narrow(0, nf + nref, nr).reshape({-1}).nonzero().squeeze(1);
        hid_r = cap.narrow(0, nf + nref, nr).reshape({-1, d}).index_select(0, mr);
        hid_ref_r = b.hidden_ref.narrow(0, nf + nref, nr).reshape({-1, d}).index_select(0, mr).contiguous();
        const Tensor hr_host = hid_r.detach().contiguous();
        hid_host_r_ = hr_host;
        in.retain.hidden = grun::matrix_view<const float>(hr_host.data_ptr<float>(), {hr_host.size(0), d});
        in.retain.hidden_ref = grun::matrix_view<const float>(hid_ref_r.data_ptr<float>(), {hr_host.size(0), d});
        grad_hid_r = torch::zeros_like(hr_host);
        g.retain.hidden = {grad_hid_r.data_ptr<float>(), {hr_host.size(0), d}};
      }
    }

    const auto terms = obj_.run(in, g, step);

    std::vector<Tensor> outs = {nll_seq, gf, gr}, grads = {grad_nll, grad_gf, grad_gr};
    if (logits_r.defined()) { outs.push_back(logits_r); grads.push_back(grad_logits_r); }
    if (hid_f.defined()) { outs.push_back(hid_f); grads.push_back(grad_hid_f); }
    if (hid_r.defined()) { outs.push_back(hid_r); grads.push_back(grad_hid_r); }
    opt_.zero_grad();
    torch::autograd::backward(outs, grads);
    opt_.step();
    for (auto& st : sites_.stacks) st->retract();
    tokens_ += b.mask.sum().item<std::int64_t>();
    return {terms.total, terms.forget, terms.retain, terms.gate};
  }
  std::int64_t tokens() const { return tokens_; }

 private:
  std::vector<std::size_t> sample(std::size_t n, std::size_t k) {
    std::vector<std::size_t> idx(n);
    std::iota(idx.begin(), idx.end(), 0);
    std::shuffle(idx.begin(), idx.end(), rng_);
    idx.resize(k);
    return idx;
  }
  const llm::llama_model& model_;
  sites& sites_;
  job_config cfg_;
  objective_fn obj_;
  std::vector<cached_example> forget_, retain_, refusal_;
  std::mt19937_64 rng_;
  torch::optim::AdamW opt_;
  Tensor direction_, logits_r_host_, hid_host_f_, hid_host_r_;
  std::int64_t tokens_ = 0;
};

// ---- evaluation -----------------------------------------------------------------------------------
struct split_metrics {
  double mcq_accuracy = 0, answer_nll = 0, rouge_l_recall = 0, gate_mean = 0, gate_fire_rate = 0;
  index_t examples = 0, mcq_examples = 0;
  index_t gated_rows = 0;  // gate values seen (0 without an adapter)
  /// MCQ accuracy needs examples with options; gate numbers need an adapter. Without them the value
  /// is not 0, it is absent: null in JSON (and "—" in the table).
  bool has_mcq() const { return mcq_examples > 0; }
  bool has_gate() const { return gated_rows > 0; }
  nlohmann::json to_json() const {
    auto maybe = [](bool has, double x) { return has ? nlohmann::json(x) : nlohmann::json(nullptr); };
    return {{"mcq_accuracy", maybe(has_mcq(), mcq_accuracy)}, {"answer_nll", answer_nll},
            {"rougeL_recall", rouge_l_recall}, {"gate_mean", maybe(has_gate(), gate_mean)},
            {"gate_fire_rate", maybe(has_gate(), gate_fire_rate)}, {"examples", examples},
            {"mcq_examples", mcq_examples}};
  }
};

/// A deep copy of a KV cache, optionally with each sequence repeated `times` (b → b·times … b·times+times−1).
inline llm::kv_cache fork(const llm::kv_cache& c, std::int64_t times = 1) {
  llm::kv_cache out;
  auto rep = [&](const Tensor& t) { return times == 1 ? t.clone() : t.repeat_interleave(times, 0); };
  for (const auto& k : c.k) out.k.push_back(rep(k));
  for (const auto& v : c.v) out.v.push_back(rep(v));
  out.valid = rep(c.valid);
  out.n_tokens = rep(c.n_tokens);
  out.used = c.used;
  out.capacity = c.capacity;
  return out;
}

/// Summed NLL of each continuation given the logits that predict its first token (`first` [B, V]) and a
/// cached prompt: one forward of the right-padded continuations through the cache.
inline std::vector<double> continuation_nll(const llm::llama_model& model, llm::kv_cache cache, const Tensor& first,
                                            const std::vector<const std::vector<std::int64_t>*>& conts) {
  const auto B = static_cast<std::int64_t>(conts.size());
  std::vector<std::vector<std::int64_t>> seqs;
  for (auto* c : conts) seqs.push_back(*c);
  const auto batch = llm::make_batch(seqs, 0);
  llm::forward_options fo;
  fo.logits = llm::logits_mode::all;
  const Tensor logits = model.forward(batch.ids, batch.mask, fo, &cache).logits;  // [B, L, V]
  // Token t of continuation b is predicted by `first` (t = 0) or by the continuation's position t − 1.
  std::vector<Tensor> rows;
  std::vector<std::int64_t> labels, seq;
  for (std::int64_t b = 0; b < B; ++b) {
    const auto& c = *conts[std::size_t(b)];
    for (std::size_t t = 0; t < c.size(); ++t) {
      rows.push_back(t == 0 ? first[b] : logits[b][std::int64_t(t) - 1]);
      labels.push_back(c[t]);
      seq.push_back(b);
    }
  }
  const Tensor nll = grun::torch_adapter::token_nll(torch::stack(rows), torch::tensor(labels, torch::kInt64));
  const Tensor sums = torch::zeros({B}, torch::kFloat64).index_add(0, torch::tensor(seq, torch::kInt64), nll.to(torch::kFloat64));
  std::vector<double> out(static_cast<std::size_t>(B));
  for (std::int64_t b = 0; b < B; ++b) out[std::size_t(b)] = sums[b].item<double>();
  return out;
}

/// Greedy continuation of cached prompts (interventions already applied to the prompt; generated
/// tokens are never edited).
inline std::vector<std::vector<std::int64_t>> greedy(const llm::llama_model& model, llm::kv_cache cache, Tensor logits,
                                                     int max_new, const std::vector<std::int64_t>& stop_ids) {
  const auto B = logits.size(0);
  std::vector<std::vector<std::int64_t>> out(static_cast<std::size_t>(B));
  std::vector<bool> done(static_cast<std::size_t>(B), false);
  llm::forward_options fo;
  fo.logits = llm::logits_mode::last;
  for (int step = 0; step < max_new; ++step) {
    const Tensor next = logits.argmax(-1);  // [B]
    bool all_done = true;
    for (std::int64_t b = 0; b < B; ++b) {
      if (done[std::size_t(b)]) continue;
      const auto t = next[b].item<std::int64_t>();
      if (std::find(stop_ids.begin(), stop_ids.end(), t) != stop_ids.end()) done[std::size_t(b)] = true;
      else out[std::size_t(b)].push_back(t);
      all_done = all_done && done[std::size_t(b)];
    }
    if (all_done || step + 1 == max_new) break;
    logits = model.forward(next.view({B, 1}), {}, fo, &cache).logits;
  }
  return out;
}

/// Every metric of a split from ONE pass over each prompt: the prompt (with the interventions at its
/// last token) fills a KV cache; the gold answer, the four options and the greedy answer then run as
/// short continuations of copies of that cache.
inline split_metrics evaluate(const llm::llama_model& model, const text_codec& codec, const sites& s,
                              const std::vector<encoded>& data, int max_new_tokens, const char* label) {
  torch::NoGradGuard no_grad;
  split_metrics m;
  m.examples = index_t(data.size());
  double nll_sum = 0, tokens = 0, rouge = 0;
  std::size_t mcq = 0, right = 0;
  std::vector<double> gates;
  const std::size_t chunk = 8;
  llm::progress_bar bar(fmt::format("eval {:<10}", label), static_cast<long>(data.size()));
  for (std::size_t i0 = 0; i0 < data.size(); i0 += chunk) {
    const std::size_t n = std::min(chunk, data.size() - i0);
    std::vector<std::vector<std::int64_t>> prompts;
    std::int64_t longest = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const auto& e = data[i0 + i];
      prompts.push_back(e.prompt);
      std::int64_t cont = std::max<std::int64_t>(max_new_tokens, std::int64_t(e.answer.size()));
      for (const auto& o : e.options) cont = std::max<std::int64_t>(cont, std::int64_t(o.size()));
      longest = std::max<std::int64_t>(longest, cont);
    }
    const auto batch = llm::make_batch(prompts, 0);
    const auto P = batch.ids.size(1), B = std::int64_t(n);
    std::vector<std::int64_t> rows;
    for (std::size_t i = 0; i < n; ++i) rows.push_back(std::int64_t(i) * P + std::int64_t(prompts[i].size()) - 1);
    gate_record rec;
    llm::forward_options fo;
    fo.hook = make_hook(s, torch::tensor(rows, torch::kInt64), &rec);
    fo.logits = llm::logits_mode::last;
    llm::kv_cache cache = model.make_cache(B, P + longest + 1);
    const Tensor first = model.forward(batch.ids, batch.mask, fo, &cache).logits;  // [B, V]
    for (std::size_t i = 0; i < n; ++i)
      for (auto& [layer, g] : rec.gates) gates.push_back(g.select(1, std::int64_t(i)).max().item<double>());

    std::vector<const std::vector<std::int64_t>*> answers;
    for (std::size_t i = 0; i < n; ++i) answers.push_back(&data[i0 + i].answer);
    const auto nll = continuation_nll(model, fork(cache), first, answers);
    for (std::size_t i = 0; i < n; ++i) { nll_sum += nll[i]; tokens += double(answers[i]->size()); }

    // MCQ over the examples of this chunk that have options: the four options continue the same prompt.
    std::vector<std::int64_t> with_options;
    std::vector<const std::vector<std::int64_t>*> options;
    for (std::size_t i = 0; i < n; ++i)
      if (data[i0 + i].correct) {
        with_options.push_back(std::int64_t(i));
        for (const auto& o : data[i0 + i].options) options.push_back(&o);
      }
    if (!with_options.empty()) {
      const Tensor sel = torch::tensor(with_options, torch::kInt64);
      llm::kv_cache sub = fork(cache);
      for (auto& k : sub.k) k = k.index_select(0, sel);
      for (auto& v : sub.v) v = v.index_select(0, sel);
      sub.valid = sub.valid.index_select(0, sel);
      sub.n_tokens = sub.n_tokens.index_select(0, sel);
      const auto opt_nll = continuation_nll(model, fork(sub, 4), first.index_select(0, sel).repeat_interleave(4, 0), options);
      for (std::size_t j = 0; j < with_options.size(); ++j) {
        std::size_t best = 0;
        for (std::size_t o = 1; o < 4; ++o)
          if (opt_nll[4 * j + o] < opt_nll[4 * j + best]) best = o;
        right += best == *data[i0 + std::size_t(with_options[j])].correct ? 1 : 0;
        ++mcq;
      }
    }
    if (max_new_tokens > 0) {
      const auto gen = greedy(model, fork(cache), first, max_new_tokens, codec.stop_ids());
      for (std::size_t i = 0; i < n; ++i) rouge += llm::rouge_l_recall(codec.decode(gen[i]), data[i0 + i].answer_text);
    }
    bar.update(static_cast<long>(i0 + n));
  }
  m.answer_nll = tokens > 0 ? nll_sum / tokens : 0;
  m.mcq_examples = index_t(mcq);
  m.mcq_accuracy = mcq ? double(right) / double(mcq) : 0;
  m.rouge_l_recall = data.empty() ? 0 : rouge / double(data.size());
  for (double g : gates) { m.gate_mean += g; m.gate_fire_rate += g > 0.5 ? 1 : 0; }
  m.gated_rows = index_t(gates.size());
  if (!gates.empty()) { m.gate_mean /= double(gates.size()); m.gate_fire_rate /= double(gates.size()); }
  return m;
}

// ---- adapter files ----------------------------------------------------------------------------------
/// Identifies the base model: architecture numbers plus an FNV-1a hash of the GGUF's first 4 MiB.
inline std::string model_fingerprint(const std::filesystem::path& gguf, const llm::llama_model& model) {
  std::ifstream in(gguf, std::ios::binary);
  std::vector<char> buf(std::size_t(4) << 20);
  in.read(buf.data(), std::streamsize(buf.size()));
  std::uint64_t h = 1469598103934665603ull;
  for (std::streamsize i = 0; i < in.gcount(); ++i) { h ^= static_cast<unsigned char>(buf[std::size_t(i)]); h *= 1099511628211ull; }
  const auto& c = model.config();
  return fmt::format("llama:L{}:d{}:v{}:fnv{:016x}", c.n_layers, c.d_model, c.vocab_size, h);
}

/// Saves every site's stack as one grun adapter (safetensors, atomic; the runtime kinds' IO of
/// grun/adapters/torch_kinds.hpp, compiled once in grun::torch_kinds).
inline void save_sites(const std::filesystem::path& path, const sites& s, const std::string& fingerprint,
                       const job_config& cfg) {
  grun::io::adapter_info info;
  info.layers.assign(s.layers.begin(), s.layers.end());
  info.model_fingerprint = fingerprint;
  info.stack_scale_a = cfg.stack_a;
  info.stack_scale_b = cfg.stack_b;
  grun::torch_adapter::save_adapter(path, s.stacks, info);
}

/// Loads an adapter into frozen modules, one stack per site, in layer order; its kinds, rank, layers
/// and stack scale come from the file (written into cfg). Checks the model fingerprint, and that every
/// layer is one of the model's.
inline sites load_sites(const std::filesystem::path& path, index_t d, index_t n_layers, const std::string& fingerprint,
                        job_config& cfg) {
  grun::io::adapter_load_options opt;
  opt.expected_fingerprint = fingerprint;
  opt.accept_unknown_fingerprint = true;  // a file another tool wrote (converted from pyreft): warned below
  auto loaded = grun::torch_adapter::load_adapter(path, d, opt);
  if (loaded.info.model_fingerprint.empty())
    fmt::print(stderr, "warning: {} does not say which model it was trained on; its hidden size {} matches this one's\n",
               path.string(), d);
  cfg.gate = loaded.kind->gate();
  cfg.reft = loaded.kind->reft();
  cfg.rank = loaded.kind->rank();
  cfg.stack_a = loaded.info.stack_scale_a;
  cfg.stack_b = loaded.info.stack_scale_b;
  const auto& layers = loaded.info.layers;
  // The hook finds a layer's stack by its index and the caches start at the first site: sites in
  // layer order (a file not written by grun may list them otherwise; io refuses a repeated layer).
  std::vector<std::size_t> order(layers.size());
  std::iota(order.begin(), order.end(), std::size_t(0));
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return layers[a] < layers[b]; });
  sites s;
  for (std::size_t i : order) {
    grun::require<grun::shape_error>(layers[i] < n_layers, path.string(), ": expected layers in [0, ", n_layers,
                                     ") of the model, the adapter holds layer ", layers[i]);
    s.layers.push_back(int(layers[i]));
    s.stacks.push_back(std::move(loaded.sites[i]));
  }
  return s;
}

}  // namespace unlearn
