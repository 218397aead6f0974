// grun-unlearn — remove a body of knowledge from a frozen LLM with GRUN, evaluate, generate.
//
//   grun-unlearn                      the main job: SmolLM2-135M-Instruct, the bundled forget/retain
//                                     sets, mlp gate + LoReFT r = 4 at three upper layers, GradDiff + gate BCE
//   grun-unlearn train  --forget F.jsonl --retain R.jsonl [--adapter old.safetensors] --out new.safetensors
//   grun-unlearn eval   --adapter A.safetensors --forget F.jsonl --retain R.jsonl [--extra X.jsonl] --json report.json
//   grun-unlearn generate --adapter A.safetensors --prompt "Who wrote The Hobbit?"
#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <unistd.h>

#include <grun/io/atomic_file.hpp>

#include "job.hpp"

namespace fs = std::filesystem;
using namespace unlearn;

namespace {

/// Fails now (not after minutes of training) when `path` cannot be written: it must name a file (not
/// a directory), and its directory must exist and accept a new file. The probe file is removed again.
void check_writable(const fs::path& path, const char* flag) {
  grun::require<grun::error>(!path.empty() && path.has_filename(), flag, ": expected a file path, got \"",
                             path.string(), "\"");
  grun::require<grun::error>(!fs::is_directory(path), flag, ": expected a file path, got ", path.string(),
                             ", which is a directory");
  const fs::path dir = path.has_parent_path() ? path.parent_path() : fs::path(".");
  grun::require<grun::error>(fs::is_directory(dir), "cannot write ", path.string(), ": directory ", dir.string(),
                             " does not exist");
  const fs::path probe = dir / (".grun-probe-" + std::to_string(::getpid()));
  {
    std::ofstream f(probe);
    grun::require<grun::error>(bool(f), "cannot write ", path.string(), ": directory ", dir.string(), " is not writable");
  }
  fs::remove(probe);
}

void write_text_atomic(const fs::path& path, const std::string& text) {
  grun::io::write_file_atomic(path, std::as_bytes(std::span<const char>(text.data(), text.size())));
}

struct cli_options {
  std::string model;
  std::string forget = std::string(GRUN_EXAMPLE_DATA_DIR) + "/forget_authors.jsonl";
  std::string retain = std::string(GRUN_EXAMPLE_DATA_DIR) + "/retain_general.jsonl";
  std::vector<std::string> extra;
  std::string adapter_in, adapter_out = "grun_adapter.safetensors", json;
  std::vector<std::string> prompts;
  int max_new_tokens = 24;
  bool skip_before = false;
  job_config job;
  std::set<std::string> given;  // the flags the command line set (train --adapter checks them)
};

struct loaded {
  llm::llama_model model;
  llm::bpe_tokenizer tok;
  std::string fingerprint;
};

loaded load_model(const cli_options& o) {
  const fs::path path = o.model.empty() ? llm::default_model_path() : fs::path(o.model);
  if (!fs::exists(path))
    grun::fail<grun::format_error>("model file ", path.string(), " not found (run cmake/setup.sh, which fetches it, or pass --model)");
  fmt::print(stderr, "loading {}\n", path.string());
  auto f = grun::io::gguf_file::open(path);
  loaded l{llm::llama_model(f), llm::bpe_tokenizer::from_gguf(f), ""};
  l.fingerprint = model_fingerprint(path, l.model);
  return l;
}

std::vector<int> default_layers(std::int64_t n_layers) {
  // Three layers in the upper part of the model, as the GRUN reference's 20, 25, 31 of 32 (fewer,
  // distinct, when the model is too shallow for three).
  const auto L = static_cast<double>(n_layers);
  std::vector<int> l = {int(0.625 * L + 0.5), int(0.78 * L + 0.5), int(n_layers - 1)};
  for (int& x : l) x = std::clamp(x, 0, int(n_layers - 1));
  std::sort(l.begin(), l.end());
  l.erase(std::unique(l.begin(), l.end()), l.end());
  return l;
}

/// A number, or "—" where the split has none (no MCQ options, no adapter's gate).
std::string cell(bool has, double x, int width) {
  return has ? fmt::format("{:>{}.3f}", x, width) : fmt::format("{:>{}}", "—", width);  // fmt pads by display width
}

void print_table(const std::vector<std::pair<std::string, std::map<std::string, split_metrics>>>& runs) {
  fmt::print("\n{:<10} {:<8} {:>8} {:>10} {:>8} {:>9} {:>9}\n", "split", "model", "mcq_acc", "answer_nll", "rougeL",
             "gate_mean", "gate_fire");
  for (const auto& [name, splits] : runs)
    for (const auto& [split, m] : splits)
      fmt::print("{:<10} {:<8} {} {:>10.3f} {:>8.3f} {} {}\n", split, name, cell(m.has_mcq(), m.mcq_accuracy, 8),
                 m.answer_nll, m.rouge_l_recall, cell(m.has_gate(), m.gate_mean, 9),
                 cell(m.has_gate(), m.gate_fire_rate, 9));
}

std::map<std::string, split_metrics> evaluate_splits(const loaded& L, const text_codec& codec, const sites& s,
                                                     const std::map<std::string, std::vector<encoded>>& data, int max_new) {
  std::map<std::string, split_metrics> out;
  for (const auto& [name, d] : data) out[name] = evaluate(L.model, codec, s, d, max_new, name.c_str());
  return out;
}

void write_json(const std::string& path, const nlohmann::json& j) {
  if (path.empty()) return;
  write_text_atomic(path, j.dump(2) + "\n");
  fmt::print(stderr, "report written to {}\n", path);
}

/// The name an --extra set is reported under: its file name without the extension.
std::string extra_name(const std::string& path) { return fs::path(path).stem().string(); }

/// Every split needs its own name: an --extra set named "forget" or "retain" (or two extras with one
/// name) would silently take another's place in the table, or in training.
void check_extra_names(const cli_options& o) {
  std::set<std::string> seen = {"forget", "retain"};
  for (const auto& x : o.extra)
    grun::require<grun::error>(seen.insert(extra_name(x)).second, "--extra ", x, ": expected a file name other than ",
                               "forget.*, retain.* and the other --extra sets' (sets are reported by file name), got \"",
                               extra_name(x), "\", a name another set already has");
}

/// The splits by name (run_train / run_eval checked the names with check_extra_names first).
std::map<std::string, std::vector<encoded>> load_splits(const cli_options& o, const text_codec& codec) {
  std::map<std::string, std::vector<encoded>> d;
  d["forget"] = encode_all(codec, llm::load_qa(o.forget), o.job.seed);
  d["retain"] = encode_all(codec, llm::load_qa(o.retain), o.job.seed + 1);
  for (const auto& x : o.extra) d[extra_name(x)] = encode_all(codec, llm::load_qa(x), o.job.seed + 2);
  return d;
}

/// Two outputs of one run must not be one file (the second write would replace the first).
void check_distinct_outputs(const fs::path& adapter, const std::string& json) {
  if (json.empty()) return;
  grun::require<grun::error>(fs::weakly_canonical(adapter) != fs::weakly_canonical(json), "--json ", json,
                             ": expected a path other than the adapter's (--out ", adapter.string(), ")");
}

/// train --adapter appends a module of the file's kinds at the file's layers: a flag that asks for
/// other kinds, layers or stack scale contradicts the file, and is refused rather than ignored.
void check_flags_match_adapter(const cli_options& o, const job_config& given, const job_config& file,
                               const std::vector<int>& file_layers) {
  auto refuse = [&](const char* flag, const auto& wanted, const auto& held) {
    grun::fail<grun::error>(flag, " ", wanted, ": the adapter ", o.adapter_in, " holds ", held,
                            " (train --adapter appends a module like the file's; drop ", flag, ")");
  };
  auto given_flag = [&](const char* flag) { return o.given.count(flag) > 0; };
  if (given_flag("--gate") && given.gate != file.gate) refuse("--gate", given.gate, file.gate);
  if (given_flag("--reft") && given.reft != file.reft) refuse("--reft", given.reft, file.reft);
  if (given_flag("--rank") && given.rank != file.rank) refuse("--rank", given.rank, file.rank);
  if (given_flag("--stack-scale") && given.stack_b != file.stack_b) refuse("--stack-scale", given.stack_b, file.stack_b);
  if (given_flag("--stack-scale-a") && given.stack_a != file.stack_a)
    refuse("--stack-scale-a", given.stack_a, file.stack_a);
  if (given_flag("--layers")) {
    std::vector<int> want = given.layers;
    std::sort(want.begin(), want.end());
    if (want != file_layers) refuse("--layers", fmt::format("{}", fmt::join(want, ",")),
                                    fmt::format("layers {}", fmt::join(file_layers, ",")));
  }
}

int run_train(cli_options& o) {
  auto& cfg = o.job;
  llm::set_threads(cfg.threads);
  torch::manual_seed(cfg.seed);
  // Check every output path and every setting before the long work: a bad one fails now, not after
  // training.
  check_writable(o.adapter_out, "--out");
  if (!o.json.empty()) check_writable(o.json, "--json");
  check_distinct_outputs(o.adapter_out, o.json);
  check_extra_names(o);
  if (!cfg.layers.empty()) {
    std::set<int> seen;
    for (int l : cfg.layers)
      grun::require<grun::error>(seen.insert(l).second, "--layers: expected distinct layers, got layer ", l, " twice");
  }
  const objective_fn obj = choose_objective(cfg);
  const auto t0 = std::chrono::steady_clock::now();
  loaded L = load_model(o);
  const text_codec codec(L.tok);
  const auto data = load_splits(o, codec);
  const auto d = L.model.config().d_model;

  sites s;
  if (!o.adapter_in.empty()) {
    const job_config given = cfg;
    s = load_sites(o.adapter_in, d, L.model.config().n_layers, L.fingerprint, cfg);
    check_flags_match_adapter(o, given, cfg, s.layers);
    fmt::print(stderr, "appending module {} to {} ({} {} r={}, layers {})\n", s.modules() + 1, o.adapter_in, cfg.gate,
               cfg.reft, cfg.rank, fmt::join(s.layers, ","));
  } else {
    s.layers = cfg.layers.empty() ? default_layers(L.model.config().n_layers) : cfg.layers;
    std::sort(s.layers.begin(), s.layers.end());
    for (int l : s.layers) {
      grun::require<grun::shape_error>(l >= 0 && l < L.model.config().n_layers, "--layers: expected layers in [0, ",
                                       L.model.config().n_layers, "), got ", l);
      s.stacks.push_back(grun::torch_adapter::make_intervention_stack(cfg.gate, cfg.reft, cfg.rank, d, cfg.stack_a, cfg.stack_b));
    }
  }
  std::vector<std::pair<std::string, std::map<std::string, split_metrics>>> table;
  if (!o.skip_before) table.emplace_back("before", evaluate_splits(L, codec, s, data, o.max_new_tokens));

  for (std::size_t i = 0; i < s.stacks.size(); ++i) s.stacks[i]->append(cfg.seed * 1000 + i + 1 + 97 * s.modules());
  const auto& forget = data.at("forget");
  const auto& retain = data.at("retain");
  auto cf = cache_examples(L.model, forget, s, false, "forget");
  auto cr = cache_examples(L.model, retain, s, false, "retain");
  std::vector<cached_example> cref;
  if (obj.needs_refusal) cref = cache_examples(L.model, forget, s, true, "refusal");

  trainer tr(L.model, s, cfg, obj, std::move(cf), std::move(cr), std::move(cref));
  llm::progress_bar bar("train", cfg.steps);
  const auto t_train = std::chrono::steady_clock::now();
  for (int step = 1; step <= cfg.steps; ++step) {
    const auto lg = tr.step(step);
    if (!std::isfinite(lg.total))
      grun::fail<grun::numeric_error>("training diverged at step ", step, " (loss ", lg.total, "); nothing was saved");
    bar.update(step, fmt::format("L {:+.3f} forget {:+.3f} retain {:.3f} gate {:.3f}", lg.total, lg.forget, lg.retain, lg.gate));
  }
  const double train_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_train).count();
  save_sites(o.adapter_out, s, L.fingerprint, cfg);
  fmt::print(stderr, "adapter saved to {} ({} module(s) per site)\n", o.adapter_out, s.modules());

  table.emplace_back("after", evaluate_splits(L, codec, s, data, o.max_new_tokens));
  print_table(table);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  fmt::print("\nsteps {}  trainable params {}  train {:.1f}s  total {:.1f}s  {:.0f} tokens/s\n", cfg.steps,
             s.trainable_params(), train_s, seconds, double(tr.tokens()) / train_s);

  nlohmann::json j;
  for (const auto& [name, splits] : table)
    for (const auto& [split, m] : splits) j[name][split] = m.to_json();
  j["run"] = {{"steps", cfg.steps}, {"seconds", seconds}, {"train_seconds", train_s},
              {"trainable_params", s.trainable_params()}, {"tokens_per_second", double(tr.tokens()) / train_s},
              {"gate", cfg.gate}, {"reft", cfg.reft}, {"rank", cfg.rank}, {"loss", obj.name}, {"layers", s.layers},
              {"modules", s.modules()}, {"batch", cfg.batch}, {"lr", cfg.lr}, {"seed", cfg.seed},
              {"adapter", o.adapter_out}};
  write_json(o.json, j);
  return 0;
}

int run_eval(cli_options& o) {
  llm::set_threads(o.job.threads);
  if (!o.json.empty()) check_writable(o.json, "--json");
  check_extra_names(o);
  const auto t0 = std::chrono::steady_clock::now();
  loaded L = load_model(o);
  const text_codec codec(L.tok);
  const auto data = load_splits(o, codec);
  sites s;
  if (!o.adapter_in.empty()) s = load_sites(o.adapter_in, L.model.config().d_model, L.model.config().n_layers, L.fingerprint, o.job);
  const auto m = evaluate_splits(L, codec, s, data, o.max_new_tokens);
  print_table({{o.adapter_in.empty() ? "original" : "adapter", m}});
  // The same layout as train's report: splits under the model's row name, then the run.
  nlohmann::json j;
  const std::string row = o.adapter_in.empty() ? "original" : "adapter";
  for (const auto& [split, x] : m) j[row][split] = x.to_json();
  j["run"] = {{"seconds", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()},
              {"adapter", o.adapter_in.empty() ? nlohmann::json(nullptr) : nlohmann::json(o.adapter_in)},
              {"layers", s.layers}, {"modules", s.modules()}, {"model_fingerprint", L.fingerprint}};
  write_json(o.json, j);
  return 0;
}

int run_generate(cli_options& o) {
  llm::set_threads(o.job.threads);
  loaded L = load_model(o);
  const text_codec codec(L.tok);
  sites s;
  if (!o.adapter_in.empty()) s = load_sites(o.adapter_in, L.model.config().d_model, L.model.config().n_layers, L.fingerprint, o.job);
  grun::require<grun::error>(!o.prompts.empty(), "generate: expected at least one --prompt");
  for (const auto& p : o.prompts) {
    std::vector<std::vector<std::int64_t>> ids = {codec.prompt(p)};
    gate_record rec;
    llm::generate_options go;
    go.max_new_tokens = o.max_new_tokens;
    go.stop_ids = codec.stop_ids();
    go.prompt_hook = make_hook(s, torch::tensor(std::vector<std::int64_t>{std::int64_t(ids[0].size()) - 1}), &rec);
    const auto out = L.model.generate(ids, go);
    std::string gates;
    for (auto& [layer, g] : rec.gates) gates += fmt::format(" L{}:{:.2f}", layer, g.max().item<double>());
    fmt::print("> {}\n{}\n{}\n", p, codec.decode(out[0]), gates.empty() ? "" : "  gates" + gates);
  }
  return 0;
}

void add_model_flags(CLI::App* app, cli_options& o) {
  app->add_option("--model", o.model, "GGUF model file (default: $GRUN_MODEL or the cache from cmake/setup.sh)");
  app->add_option("--threads", o.job.threads, "CPU threads (0 = all)")->check(CLI::NonNegativeNumber);
  app->add_option("--max-new-tokens", o.max_new_tokens, "greedy tokens for ROUGE-L / generate (0: no ROUGE-L)")
      ->check(CLI::Range(0, 4096));
}
void add_data_flags(CLI::App* app, cli_options& o) {
  app->add_option("--forget", o.forget, "forget set (JSONL: question, answer, option1..4)");
  app->add_option("--retain", o.retain, "retain set (JSONL)");
  app->add_option("--extra", o.extra, "more sets to evaluate (repeatable)");
  app->add_option("--json", o.json, "write a JSON report here");
}
/// CLI11's PositiveNumber lets NaN through (NaN <= 0 is false); these do not.
const CLI::Validator finite(
    [](std::string& s) {
      double x = 0;
      return CLI::detail::lexical_cast(s, x) && std::isfinite(x) ? std::string() : "expected a finite number, got " + s;
    },
    "FINITE");
const CLI::Validator finite_positive(
    [](std::string& s) {
      double x = 0;
      return CLI::detail::lexical_cast(s, x) && std::isfinite(x) && x > 0 ? std::string()
                                                                         : "expected a finite number > 0, got " + s;
    },
    "POSITIVE");

void add_train_flags(CLI::App* app, cli_options& o) {
  auto& c = o.job;
  app->add_option("--gate", c.gate, "linear | mlp | always")->check(CLI::IsMember({"linear", "mlp", "always"}));
  app->add_option("--reft", c.reft, "loreft | noreft | direft")->check(CLI::IsMember({"loreft", "noreft", "direft"}));
  app->add_option("--rank", c.rank, "ReFT rank (1, 2, 4, 8, 16, 32)")->check(CLI::IsMember({1, 2, 4, 8, 16, 32}));
  app->add_option("--loss", c.loss, "ga | gd | npo | simnpo | idk | dpo | rmu")
      ->check(CLI::IsMember({"ga", "gd", "graddiff", "npo", "simnpo", "idk", "dpo", "rmu"}));
  app->add_option("--retain-loss", c.retain, "nll | kl | rmu | none (default: the loss's own)")
      ->check(CLI::IsMember({"nll", "kl", "rmu", "none"}));
  app->add_option("--layers", c.layers, "intervened decoder layers (default: three in the upper part)")->delimiter(',');
  app->add_option("--positions", c.positions, "intervened positions (the CLI trains last_prompt_token)")
      ->check(CLI::IsMember({"last_prompt_token"}));
  app->add_option("--steps", c.steps, "optimizer steps")->check(CLI::PositiveNumber);
  app->add_option("--lr", c.lr, "AdamW learning rate")->check(finite_positive);
  app->add_option("--batch", c.batch, "forget (and retain) examples per step")->check(CLI::PositiveNumber);
  app->add_option("--seed", c.seed, "seed for initialization and sampling");
  app->add_option("--w-retain", c.w_retain, "retain loss weight")->check(finite);
  app->add_option("--w-gate", c.w_gate, "gate BCE weight")->check(finite);
  app->add_option("--warmup", c.warmup, "linear warm-up steps of the forget term")->check(CLI::NonNegativeNumber);
  app->add_option("--beta", c.beta, "NPO / SimNPO / DPO beta")->check(finite_positive);
  app->add_option("--stack-scale", c.stack_b, "s(K) = a*K + b: b (with --stack-scale-a)")->check(finite);
  app->add_option("--stack-scale-a", c.stack_a, "s(K) = a*K + b: a")->check(finite);
  app->add_option("--adapter", o.adapter_in, "existing adapter: append a new module (sequential unlearning)");
  app->add_option("--out", o.adapter_out, "where to save the adapter (safetensors)");
  app->add_flag("--skip-before", o.skip_before, "do not evaluate before training");
}

}  // namespace

/// Debian's OpenBLAS names this virtual CPU "Prescott" and runs SSE3 kernels, 4.6× slower than its
/// SkylakeX kernels on the same machine (measured on a 2-core AVX-512 VM: 4.7 vs 21.5 GFLOPS for the
/// model's FFN matmul). OpenBLAS reads OPENBLAS_CORETYPE when it loads, before main, so when the user has
/// not chosen one we pick the best the CPU supports and re-execute once. GRUN_KEEP_BLAS=1 opts out.
void choose_blas_kernels(char** argv) {
  if (std::getenv("OPENBLAS_CORETYPE") || std::getenv("GRUN_KEEP_BLAS")) return;
  __builtin_cpu_init();
  const char* core = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") ? "SkylakeX"
                     : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")   ? "Haswell"
                                                                                          : nullptr;
  if (!core) return;
  ::setenv("OPENBLAS_CORETYPE", core, 1);
  ::setenv("GRUN_KEEP_BLAS", "1", 1);  // never loop
  std::error_code ec;
  const auto self = fs::read_symlink("/proc/self/exe", ec);  // the real path keeps the process name
  if (!ec) ::execv(self.c_str(), argv);  // on failure, carry on with the kernels we have
}

int main(int argc, char** argv) {
  choose_blas_kernels(argv);
  CLI::App app{"grun-unlearn: Gated Representation UNlearning on a frozen LLM"};
  app.option_defaults()->always_capture_default();  // --help shows every default (subcommands inherit it)
  cli_options o;
  o.job.steps = 120;
  auto* train = app.add_subcommand("train", "train a gated intervention (append one with --adapter)");
  auto* eval = app.add_subcommand("eval", "evaluate the model, with or without an adapter");
  auto* gen = app.add_subcommand("generate", "greedy answers to --prompt questions");
  for (auto* sc : {train, eval, gen}) add_model_flags(sc, o);
  add_data_flags(train, o);
  add_train_flags(train, o);
  add_data_flags(eval, o);
  eval->add_option("--adapter", o.adapter_in, "adapter to evaluate (none: the original model)");
  gen->add_option("--adapter", o.adapter_in, "adapter (none: the original model)");
  gen->add_option("--prompt", o.prompts, "question (repeatable)")->required();
  add_model_flags(&app, o);
  add_data_flags(&app, o);
  add_train_flags(&app, o);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  for (const CLI::App* sc : {static_cast<const CLI::App*>(&app), static_cast<const CLI::App*>(train)})
    for (const CLI::Option* opt : sc->get_options())
      if (opt->count() > 0) o.given.insert(opt->get_name());
  try {
    if (*eval) return run_eval(o);
    if (*gen) return run_generate(o);
    return run_train(o);  // `train`, or no subcommand: the main job on the bundled defaults
  } catch (const grun::error& e) {
    fmt::print(stderr, "grun-unlearn: {}\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "grun-unlearn: error: {}\n", e.what());
    return 1;
  }
}
