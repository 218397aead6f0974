#pragma once
// examples/llm/model.hpp — a Llama-architecture decoder on libtorch (CPU, fp32), loaded from a
// GGUF file, with the hook points grun interventions need.
//
// The stack the unlearning CLI drives: the model weights are dequantized once to fp32 and frozen
// (requires_grad = false); the forward is differentiable with respect to the hidden states, so a
// hook that edits a block output with trainable parameters gets gradients through every block
// above it.
//
// Math (Touvron et al. 2023, "LLaMA"; the GGUF conventions of llama.cpp's converter):
//   h_0     = E[ids]                                               // [B, S, d]
//   a_l     = h_{l-1} + W_o · attn(RoPE(W_q n), RoPE(W_k n), W_v n),   n = rmsnorm(h_{l-1}) ⊙ g_attn
//   h_l     = a_l + W_down · (silu(W_gate m) ⊙ W_up m),                m = rmsnorm(a_l) ⊙ g_ffn
//   h_l    ← hook(l, h_l)                                          // "block_output" edit point
//   logits  = W_out · (rmsnorm(h_{L-1}) ⊙ g_out)                   // W_out = E when output.weight is absent
//   rmsnorm(x) = x / sqrt(mean(x²) + ε)
// Attention is causal, grouped-query (query head j reads key/value head j / (H / H_kv)), scaled by
// 1/sqrt(head_dim), and masked by the padding mask.
//
// RoPE layout. HF checkpoints rotate the two halves of each head, (x[i], x[i + hd/2]). llama.cpp's
// converter permutes the rows of W_q and W_k so that ggml's "normal" RoPE, which rotates adjacent
// pairs (x[2i], x[2i+1]), computes the same function. We use the stored (permuted) weights, so we
// rotate adjacent pairs: for position p and pair i < rope_dim/2,
//   θ_i = p · base^(−2i / rope_dim)
//   (x[2i], x[2i+1]) ← (x[2i] cos θ_i − x[2i+1] sin θ_i,  x[2i] sin θ_i + x[2i+1] cos θ_i)
// Dimensions at and above rope_dim (when rope_dim < head_dim) pass unrotated. Checked numerically
// against transformers (which un-permutes on load and rotates halves) by tests/torch/test_model.cpp.
//
// Padding: any padding works (right padding is the usual); a sequence's RoPE positions count its
// real tokens only (position = number of unmasked tokens before it), and masked keys are never
// attended to. Rows of padding tokens hold garbage and must be ignored by the caller.
#include <torch/types.h>
#include <torch/utils.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <grun/core/error.hpp>
#include <grun/io/gguf.hpp>

namespace llm {

// ---- configuration -------------------------------------------------------------------------------

/// Hyper-parameters of a Llama decoder, read from GGUF metadata ("llama.*" keys).
struct llama_config {
  std::int64_t n_layers = 0;        // llama.block_count
  std::int64_t d_model = 0;         // llama.embedding_length
  std::int64_t d_ff = 0;            // llama.feed_forward_length
  std::int64_t n_heads = 0;         // llama.attention.head_count
  std::int64_t n_kv_heads = 0;      // llama.attention.head_count_kv (defaults to n_heads)
  std::int64_t head_dim = 0;        // d_model / n_heads
  std::int64_t rope_dim = 0;        // llama.rope.dimension_count (defaults to head_dim)
  std::int64_t vocab_size = 0;      // llama.vocab_size, else rows of token_embd.weight
  std::int64_t context_length = 0;  // llama.context_length
  double rope_base = 10000.0;       // llama.rope.freq_base
  double rms_eps = 1e-5;            // llama.attention.layer_norm_rms_epsilon

  static llama_config from_gguf(const grun::io::gguf_file& f) {
    using grun::format_error;
    const std::string& src = f.source();
    const std::string arch = f.has("general.architecture") ? f.get_string("general.architecture") : std::string("<missing>");
    grun::require<format_error>(arch == "llama", src, ": general.architecture: expected \"llama\", got \"", arch, "\"");
    const auto req_int = [&](std::string_view key) -> std::int64_t {
      grun::require<format_error>(f.has(key), src, ": GGUF key '", key, "': expected it (a Llama model needs it), the file has none");
      const auto v = f.get_int(key);
      grun::require<format_error>(v > 0, src, ": GGUF key '", key, "': expected a positive integer, got ", v);
      return v;
    };
    llama_config c;
    c.n_layers = req_int("llama.block_count");
    c.d_model = req_int("llama.embedding_length");
    c.d_ff = req_int("llama.feed_forward_length");
    c.n_heads = req_int("llama.attention.head_count");
    c.n_kv_heads = f.has("llama.attention.head_count_kv") ? req_int("llama.attention.head_count_kv") : c.n_heads;
    c.context_length = req_int("llama.context_length");
    grun::require<format_error>(c.d_model % c.n_heads == 0, src, ": expected embedding_length (", c.d_model,
                                ") divisible by attention.head_count (", c.n_heads, ")");
    grun::require<format_error>(c.n_heads % c.n_kv_heads == 0, src, ": expected attention.head_count (", c.n_heads,
                                ") divisible by attention.head_count_kv (", c.n_kv_heads, ")");
    c.head_dim = c.d_model / c.n_heads;
    c.rope_dim = f.has("llama.rope.dimension_count") ? req_int("llama.rope.dimension_count") : c.head_dim;
    grun::require<format_error>(c.rope_dim <= c.head_dim && c.rope_dim % 2 == 0, src,
                                ": llama.rope.dimension_count: expected an even number <= head_dim (", c.head_dim, "), got ",
                                c.rope_dim);
    if (f.has("llama.rope.freq_base")) c.rope_base = f.get_float("llama.rope.freq_base");
    grun::require<format_error>(c.rope_base > 0, src, ": llama.rope.freq_base: expected > 0, got ", c.rope_base);
    grun::require<format_error>(f.has("llama.attention.layer_norm_rms_epsilon"), src,
                                ": GGUF key 'llama.attention.layer_norm_rms_epsilon': expected it, the file has none");
    c.rms_eps = f.get_float("llama.attention.layer_norm_rms_epsilon");
    grun::require<format_error>(c.rms_eps > 0, src, ": llama.attention.layer_norm_rms_epsilon: expected > 0, got ", c.rms_eps);
    if (f.has("llama.vocab_size")) {
      c.vocab_size = req_int("llama.vocab_size");
    } else {
      const auto& t = f.tensor("token_embd.weight");
      grun::require<format_error>(t.shape.size() == 2, src, ": token_embd.weight: expected 2 dimensions, got ", t.shape.size());
      c.vocab_size = t.shape[1];
    }
    return c;
  }
};

/// Where the model lives: $GRUN_MODEL, else ${GRUN_CACHE_DIR:-$HOME/.cache/grun}/models/SmolLM2-135M-Instruct.Q4_1.gguf
/// (cmake/fetch_model.sh puts it there).
inline std::filesystem::path default_model_path() {
  if (const char* m = std::getenv("GRUN_MODEL"); m && *m) return m;
  std::filesystem::path cache;
  if (const char* c = std::getenv("GRUN_CACHE_DIR"); c && *c) {
    cache = c;
  } else {
    const char* home = std::getenv("HOME");
    cache = std::filesystem::path(home && *home ? home : "/tmp") / ".cache" / "grun";  // as cmake/fetch_model.sh
  }
  return cache / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf";
}

/// Intra-op threads for libtorch (0 → all hardware threads). Results do not depend on it beyond
/// floating-point summation order.
inline void set_threads(int n = 0) {
  if (n <= 0) n = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  at::set_num_threads(n);
}

// ---- batches -------------------------------------------------------------------------------------

/// Token sequences packed for one forward, right-padded.
struct token_batch {
  torch::Tensor ids;                  // [B, S] int64, padding = pad_id
  torch::Tensor mask;                 // [B, S] bool, true = real token
  std::vector<std::int64_t> lengths;  // real tokens per sequence
};

/// Right-pads `seqs` to the longest one. Empty sequences are allowed (their rows are all padding).
inline token_batch make_batch(const std::vector<std::vector<std::int64_t>>& seqs, std::int64_t pad_id = 0) {
  grun::require<grun::shape_error>(!seqs.empty(), "make_batch: expected at least one sequence, got none");
  std::int64_t S = 0;
  for (const auto& s : seqs) S = std::max<std::int64_t>(S, static_cast<std::int64_t>(s.size()));
  S = std::max<std::int64_t>(S, 1);
  const auto B = static_cast<std::int64_t>(seqs.size());
  token_batch b;
  b.ids = torch::full({B, S}, pad_id, torch::kInt64);
  b.mask = torch::zeros({B, S}, torch::kBool);
  auto ids = b.ids.accessor<std::int64_t, 2>();
  auto mask = b.mask.accessor<bool, 2>();
  for (std::int64_t i = 0; i < B; ++i) {
    const auto& s = seqs[static_cast<std::size_t>(i)];
    for (std::size_t j = 0; j < s.size(); ++j) {
      ids[i][static_cast<std::int64_t>(j)] = s[j];
      mask[i][static_cast<std::int64_t>(j)] = true;
    }
    b.lengths.push_back(static_cast<std::int64_t>(s.size()));
  }
  return b;
}

// ---- forward options and results -----------------------------------------------------------------

/// Edits the residual stream after block `layer` ("block_output"): receives h_l [B, S, d] and
/// returns its replacement (same shape). Return `hidden` unchanged for layers you do not touch.
using block_hook = std::function<torch::Tensor(int layer, torch::Tensor hidden)>;

enum class logits_mode {
  all,   // [B, S, V]
  last,  // [B, V]: at each sequence's last real token among the inputs
  none,  // no head: only `hidden` / `captured`
};

struct forward_options {
  block_hook hook;                 // empty: no edits
  std::vector<int> capture;        // layers whose block_output (after the hook) to return
  logits_mode logits = logits_mode::all;
  int stop_after = -1;             // ≥ 0: run blocks up to and including this layer only (no head)
};

struct forward_result {
  torch::Tensor logits;                   // see logits_mode; undefined for none / stop_after
  torch::Tensor hidden;                   // [B, S, d] residual stream after the last block run (after its hook)
  std::map<int, torch::Tensor> captured;  // layer → [B, S, d] block_output after the hook
};

/// Keys and values of earlier tokens, for incremental decoding. Slots fill left to right, one
/// per input position for every sequence; masked slots are never attended to.
struct kv_cache {
  std::vector<torch::Tensor> k, v;  // per layer [B, H_kv, capacity, head_dim], keys after RoPE
  torch::Tensor valid;              // [B, capacity] bool: slot holds a real token
  torch::Tensor n_tokens;           // [B] int64: real tokens so far (the next RoPE position)
  std::int64_t used = 0;            // slots filled
  std::int64_t capacity = 0;
  std::int64_t batch() const { return valid.size(0); }
};

/// Keys and values of a fixed prompt prefix per sequence, read only (training: the prefix cannot
/// change, so it is computed once; see forward_with_prefix).
struct prefix_kv {
  std::vector<torch::Tensor> k, v;  // per layer [B, H_kv, P, head_dim] (keys after RoPE); only layers that run
  torch::Tensor valid;              // [B, P] bool: slot holds a real prefix token
  torch::Tensor length;             // [B] int64: prefix tokens of each sequence (the suffix's first RoPE position)
};

struct generate_options {
  std::int64_t max_new_tokens = 32;
  std::vector<std::int64_t> stop_ids;  // a sequence ends when it produces one (not included in the output)
  block_hook prompt_hook;              // applied while reading the prompts
  block_hook step_hook;                // applied to each generated token's forward
};

// ---- the model ------------------------------------------------------------------------------------

class llama_model {
 public:
  struct layer_weights {
    torch::Tensor attn_norm;  // [d]
    torch::Tensor wqkv;       // [(H + 2 H_kv) hd, d]: W_q, W_k, W_v stacked (one matmul)
    torch::Tensor wo;         // [d, H hd]
    torch::Tensor ffn_norm;   // [d]
    torch::Tensor w_gate_up;  // [2 d_ff, d]: W_gate, W_up stacked
    torch::Tensor w_down;     // [d, d_ff]
  };

  /// Opens and loads a GGUF file (grun::error / format_error on failure).
  static llama_model load(const std::filesystem::path& path) { return llama_model(grun::io::gguf_file::open(path)); }

  explicit llama_model(const grun::io::gguf_file& f) : cfg_(llama_config::from_gguf(f)) {
    torch::NoGradGuard no_grad;
    const auto d = cfg_.d_model, hd = cfg_.head_dim;
    token_embd_ = load_matrix(f, "token_embd.weight", cfg_.vocab_size, d);  // ne = [d, V] → [V, d]
    output_norm_ = load_vector(f, "output_norm.weight", d);
    output_ = f.find("output.weight") ? load_matrix(f, "output.weight", cfg_.vocab_size, d) : token_embd_;
    layers_.reserve(static_cast<std::size_t>(cfg_.n_layers));
    for (std::int64_t l = 0; l < cfg_.n_layers; ++l) {
      const std::string p = "blk." + std::to_string(l) + ".";
      layer_weights w;
      w.attn_norm = load_vector(f, p + "attn_norm.weight", d);
      w.wqkv = torch::cat({load_matrix(f, p + "attn_q.weight", cfg_.n_heads * hd, d),
                           load_matrix(f, p + "attn_k.weight", cfg_.n_kv_heads * hd, d),
                           load_matrix(f, p + "attn_v.weight", cfg_.n_kv_heads * hd, d)},
                          0).contiguous();
      w.wo = load_matrix(f, p + "attn_output.weight", d, cfg_.n_heads * hd);
      w.ffn_norm = load_vector(f, p + "ffn_norm.weight", d);
      w.w_gate_up = torch::cat({load_matrix(f, p + "ffn_gate.weight", cfg_.d_ff, d),
                                load_matrix(f, p + "ffn_up.weight", cfg_.d_ff, d)},
                               0).contiguous();
      w.w_down = load_matrix(f, p + "ffn_down.weight", d, cfg_.d_ff);
      layers_.push_back(std::move(w));
    }
    // inv_freq_i = base^(−2i / rope_dim), computed in double, stored fp32 like the references.
    std::vector<float> inv(static_cast<std::size_t>(cfg_.rope_dim / 2));
    for (std::size_t i = 0; i < inv.size(); ++i)
      inv[i] = static_cast<float>(std::pow(cfg_.rope_base, -2.0 * static_cast<double>(i) / static_cast<double>(cfg_.rope_dim)));
    inv_freq_ = torch::from_blob(inv.data(), {static_cast<std::int64_t>(inv.size())}, torch::kFloat32).clone();
  }

  const llama_config& config() const { return cfg_; }
  const std::vector<layer_weights>& layers() const { return layers_; }
  const torch::Tensor& token_embedding() const { return token_embd_; }  // [V, d]
  const torch::Tensor& output_weight() const { return output_; }        // [V, d] (tied: same storage)
  bool tied_output() const { return output_.is_same(token_embd_); }

  /// h_0 = E[ids]: [B, S] int64 → [B, S, d]. Ids outside [0, V) throw grun::shape_error.
  torch::Tensor embed(const torch::Tensor& ids) const {
    grun::require<grun::shape_error>(ids.dim() == 2 && ids.scalar_type() == torch::kInt64,
                                     "llama_model: token ids: expected a [B, S] int64 tensor, got ", ids.dim(), " dims of ",
                                     std::string(c10::toString(ids.scalar_type())));
    if (ids.numel() > 0) {
      const auto lo = ids.min().item<std::int64_t>(), hi = ids.max().item<std::int64_t>();
      grun::require<grun::shape_error>(lo >= 0 && hi < cfg_.vocab_size, "llama_model: token ids: expected values in [0, ",
                                       cfg_.vocab_size, "), got [", lo, ", ", hi, "]");
    }
    return token_embd_.index_select(0, ids.reshape({-1})).view({ids.size(0), ids.size(1), cfg_.d_model});
  }

  /// logits = W_out · (rmsnorm(h) ⊙ g_out): [..., d] → [..., V].
  torch::Tensor head(const torch::Tensor& hidden) const { return torch::linear(rms_norm(hidden, output_norm_), output_); }

  /// Full forward over token ids [B, S] (int64) with a padding mask [B, S] (bool or integer,
  /// nonzero = real token; undefined = no padding). With `cache`, the tokens continue the cached
  /// sequences (and the forward runs without gradient).
  forward_result forward(const torch::Tensor& ids, const torch::Tensor& mask = {}, const forward_options& opt = {},
                         kv_cache* cache = nullptr) const {
    return run(embed(ids), -1, mask, opt, cache);
  }
  forward_result forward(const token_batch& b, const forward_options& opt = {}) const { return forward(b.ids, b.mask, opt); }

  /// Runs only the layers above `layer`: `block_output` [B, S, d] is the residual stream after
  /// block `layer` *before* its hook (as captured from an unhooked forward); the hook for `layer`
  /// is applied to it, then blocks layer+1 … L−1 and the head run. layer = −1 means `block_output`
  /// is the embedding output (all blocks run). Differentiable with respect to `block_output`.
  forward_result forward_from(int layer, const torch::Tensor& block_output, const torch::Tensor& mask = {},
                              const forward_options& opt = {}) const {
    grun::require<grun::shape_error>(layer >= -1 && layer < cfg_.n_layers, "llama_model::forward_from: expected a layer in [-1, ",
                                     cfg_.n_layers, "), got ", layer);
    check_hidden(block_output, "forward_from");
    return run(block_output, layer, mask, opt, nullptr);
  }

  /// forward_from for a suffix that continues fixed prefixes: `block_output` [B, S, d] is the
  /// residual stream of the suffix tokens after block `layer` (before its hook), `prefix` holds the
  /// keys/values of the earlier tokens at every layer above `layer`. Differentiable with respect to
  /// `block_output` (the prefix is constant). Training's fast path: the suffix is the last prompt
  /// token and the answer, a handful of tokens, instead of the whole sequence.
  forward_result forward_with_prefix(int layer, const torch::Tensor& block_output, const torch::Tensor& mask,
                                     const prefix_kv& prefix, const forward_options& opt = {}) const {
    grun::require<grun::shape_error>(layer >= 0 && layer < cfg_.n_layers, "llama_model::forward_with_prefix: expected a layer in [0, ",
                                     cfg_.n_layers, "), got ", layer);
    check_hidden(block_output, "forward_with_prefix");
    return run(block_output, layer, mask, opt, nullptr, &prefix);
  }

  /// An empty cache for `batch` sequences of up to `capacity` slots in total.
  kv_cache make_cache(std::int64_t batch, std::int64_t capacity) const {
    grun::require<grun::shape_error>(batch > 0 && capacity > 0, "llama_model::make_cache: expected batch > 0 and capacity > 0, got ",
                                     batch, " and ", capacity);
    kv_cache c;
    c.capacity = capacity;
    for (std::int64_t l = 0; l < cfg_.n_layers; ++l) {
      c.k.push_back(torch::zeros({batch, cfg_.n_kv_heads, capacity, cfg_.head_dim}, torch::kFloat32));
      c.v.push_back(torch::zeros({batch, cfg_.n_kv_heads, capacity, cfg_.head_dim}, torch::kFloat32));
    }
    c.valid = torch::zeros({batch, capacity}, torch::kBool);
    c.n_tokens = torch::zeros({batch}, torch::kInt64);
    return c;
  }

  /// Greedy decoding of every prompt (batched, right-padded, KV-cached). Returns the generated
  /// ids of each prompt, without the stop token.
  std::vector<std::vector<std::int64_t>> generate(const std::vector<std::vector<std::int64_t>>& prompts,
                                                  const generate_options& opt = {}) const {
    torch::NoGradGuard no_grad;
    for (const auto& p : prompts)
      grun::require<grun::shape_error>(!p.empty(), "llama_model::generate: expected non-empty prompts, got an empty one");
    grun::require<grun::shape_error>(opt.max_new_tokens >= 0, "llama_model::generate: expected max_new_tokens >= 0, got ",
                                     opt.max_new_tokens);
    const token_batch b = make_batch(prompts, 0);
    const auto B = b.ids.size(0), S = b.ids.size(1);
    std::vector<std::vector<std::int64_t>> out(static_cast<std::size_t>(B));
    if (opt.max_new_tokens == 0) return out;
    kv_cache cache = make_cache(B, S + opt.max_new_tokens);
    forward_options fo;
    fo.hook = opt.prompt_hook;
    fo.logits = logits_mode::last;
    torch::Tensor logits = forward(b.ids, b.mask, fo, &cache).logits;  // [B, V]
    std::vector<bool> done(static_cast<std::size_t>(B), false);
    fo.hook = opt.step_hook;
    for (std::int64_t step = 0; step < opt.max_new_tokens; ++step) {
      const torch::Tensor next = logits.argmax(-1);  // [B]
      const auto nx = next.accessor<std::int64_t, 1>();
      bool all_done = true;
      for (std::int64_t i = 0; i < B; ++i) {
        const auto ui = static_cast<std::size_t>(i);
        if (done[ui]) continue;
        const auto t = nx[i];
        if (std::find(opt.stop_ids.begin(), opt.stop_ids.end(), t) != opt.stop_ids.end()) {
          done[ui] = true;
        } else {
          out[ui].push_back(t);
        }
        all_done = all_done && done[ui];
      }
      if (all_done || step + 1 == opt.max_new_tokens) break;
      logits = forward(next.view({B, 1}), {}, fo, &cache).logits;
    }
    return out;
  }

 private:
  llama_config cfg_;
  torch::Tensor token_embd_, output_norm_, output_, inv_freq_;
  std::vector<layer_weights> layers_;

  // -- loading
  static torch::Tensor load_tensor(const grun::io::gguf_file& f, const std::string& name, std::vector<std::int64_t> ne) {
    const grun::io::gguf_tensor_info* t = f.find(name);
    grun::require<grun::format_error>(t != nullptr, f.source(), ": GGUF tensor '", name,
                                      "': expected it (a Llama model needs it), the file has no such tensor");
    if (t->shape != ne) {
      std::string want, got;
      for (auto x : ne) want += (want.empty() ? "" : ", ") + std::to_string(x);
      for (auto x : t->shape) got += (got.empty() ? "" : ", ") + std::to_string(x);
      grun::fail<grun::format_error>(f.source(), ": GGUF tensor '", name, "': expected shape (ggml ne) [", want, "], got [", got, "]");
    }
    // ggml ne is innermost-first; torch sizes are outermost-first.
    std::vector<std::int64_t> sizes(ne.rbegin(), ne.rend());
    torch::Tensor out = torch::empty(sizes, torch::kFloat32);
    f.dequantize_into(*t, std::span<float>(out.data_ptr<float>(), static_cast<std::size_t>(out.numel())));
    return out;
  }
  static torch::Tensor load_matrix(const grun::io::gguf_file& f, const std::string& name, std::int64_t rows, std::int64_t cols) {
    return load_tensor(f, name, {cols, rows});  // torch [rows, cols] = nn.Linear's [out, in]
  }
  static torch::Tensor load_vector(const grun::io::gguf_file& f, const std::string& name, std::int64_t n) {
    return load_tensor(f, name, {n});
  }

  // -- math
  torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& g) const {
    return x * torch::rsqrt(x.pow(2).mean(-1, /*keepdim=*/true) + cfg_.rms_eps) * g;
  }

  // Adjacent-pair rotation (see the header comment). x: [B, N, S, hd]; cos, sin: [B, 1, S, rope_dim/2].
  torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) const {
    const auto rd = cfg_.rope_dim;
    const torch::Tensor xr = (rd == cfg_.head_dim ? x : x.narrow(-1, 0, rd)).unflatten(-1, {rd / 2, 2});
    const torch::Tensor x0 = xr.select(-1, 0), x1 = xr.select(-1, 1);
    torch::Tensor y = torch::stack({x0 * cos - x1 * sin, x0 * sin + x1 * cos}, -1).flatten(-2);
    return rd == cfg_.head_dim ? y : torch::cat({y, x.narrow(-1, rd, cfg_.head_dim - rd)}, -1);
  }

  struct attention_context {
    torch::Tensor bias;      // [B, 1, 1, S, T] additive: 0 where allowed, −1e30 elsewhere
    torch::Tensor cos, sin;  // [B, 1, S, rope_dim/2]
    kv_cache* cache = nullptr;
    const prefix_kv* prefix = nullptr;  // read-only keys/values before these tokens (differentiable path)
    std::int64_t slot0 = 0;  // first cache slot of these tokens
  };

  torch::Tensor block(std::size_t l, const torch::Tensor& x, const attention_context& ctx) const {
    const layer_weights& w = layers_[l];
    const auto B = x.size(0), S = x.size(1);
    const auto H = cfg_.n_heads, Hkv = cfg_.n_kv_heads, hd = cfg_.head_dim, G = H / Hkv;

    const torch::Tensor qkv = torch::linear(rms_norm(x, w.attn_norm), w.wqkv);  // [B, S, (H + 2 Hkv) hd]
    torch::Tensor q = qkv.narrow(-1, 0, H * hd).view({B, S, H, hd}).transpose(1, 2);             // [B, H, S, hd]
    torch::Tensor k = qkv.narrow(-1, H * hd, Hkv * hd).view({B, S, Hkv, hd}).transpose(1, 2);    // [B, Hkv, S, hd]
    torch::Tensor v = qkv.narrow(-1, (H + Hkv) * hd, Hkv * hd).view({B, S, Hkv, hd}).transpose(1, 2);
    q = rope(q, ctx.cos, ctx.sin);
    k = rope(k, ctx.cos, ctx.sin);
    if (ctx.cache) {
      ctx.cache->k[l].narrow(2, ctx.slot0, S).copy_(k);
      ctx.cache->v[l].narrow(2, ctx.slot0, S).copy_(v);
      k = ctx.cache->k[l].narrow(2, 0, ctx.slot0 + S);  // [B, Hkv, T, hd]
      v = ctx.cache->v[l].narrow(2, 0, ctx.slot0 + S);
    } else if (ctx.prefix) {
      k = torch::cat({ctx.prefix->k[l], k}, 2);  // [B, Hkv, P + S, hd]
      v = torch::cat({ctx.prefix->v[l], v}, 2);
    }
    const auto T = k.size(2);
    // Grouped-query attention without copying K/V: query heads j·G … j·G+G−1 share KV head j, so
    // view q as [B, Hkv, G·S, hd] and do one matmul per KV head.
    const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
    const torch::Tensor qg = (q * scale).reshape({B, Hkv, G * S, hd});
    torch::Tensor scores = torch::matmul(qg, k.transpose(-1, -2)).view({B, Hkv, G, S, T}) + ctx.bias;  // [B, Hkv, G, S, T]
    const torch::Tensor p = torch::softmax(scores, -1).view({B, Hkv, G * S, T});
    const torch::Tensor o = torch::matmul(p, v)                                          // [B, Hkv, G·S, hd]
                                .view({B, H, S, hd})
                                .transpose(1, 2)
                                .reshape({B, S, H * hd});
    const torch::Tensor a = x + torch::linear(o, w.wo);  // [B, S, d]

    const torch::Tensor gu = torch::linear(rms_norm(a, w.ffn_norm), w.w_gate_up);  // [B, S, 2 d_ff]
    const torch::Tensor m = torch::silu(gu.narrow(-1, 0, cfg_.d_ff)) * gu.narrow(-1, cfg_.d_ff, cfg_.d_ff);
    return a + torch::linear(m, w.w_down);
  }

  void check_hidden(const torch::Tensor& h, const char* what) const {
    grun::require<grun::shape_error>(h.dim() == 3 && h.size(2) == cfg_.d_model && h.scalar_type() == torch::kFloat32,
                                     "llama_model::", what, ": expected a [B, S, ", cfg_.d_model,
                                     "] float32 hidden state, got ", h.dim(), " dims (last ", h.dim() ? h.size(-1) : 0,
                                     ") of ", std::string(c10::toString(h.scalar_type())));
  }

  // Runs blocks first+1 … (after applying the hook at `first` when first ≥ 0) and the head.
  forward_result run(torch::Tensor x, int first, const torch::Tensor& mask_in, const forward_options& opt, kv_cache* cache,
                     const prefix_kv* prefix = nullptr) const {
    std::optional<torch::NoGradGuard> no_grad;
    if (cache) no_grad.emplace();  // the cache is written in place: inference only
    const auto B = x.size(0), S = x.size(1);
    grun::require<grun::shape_error>(S > 0, "llama_model: expected at least one position, got S = 0");
    torch::Tensor mask;  // [B, S] bool
    if (mask_in.defined()) {
      grun::require<grun::shape_error>(mask_in.dim() == 2 && mask_in.size(0) == B && mask_in.size(1) == S,
                                       "llama_model: mask: expected [", B, ", ", S, "], got ", mask_in.sizes());
      mask = mask_in.to(torch::kBool);
    } else {
      mask = torch::ones({B, S}, torch::kBool);
    }
    for (int c : opt.capture)
      grun::require<grun::shape_error>(c >= 0 && c < cfg_.n_layers, "llama_model: capture: expected layers in [0, ", cfg_.n_layers,
                                       "), got ", c);
    const int last = opt.stop_after >= 0 ? opt.stop_after : static_cast<int>(cfg_.n_layers) - 1;
    grun::require<grun::shape_error>(last < cfg_.n_layers && last >= first, "llama_model: stop_after: expected a layer in [",
                                     std::max(first, 0), ", ", cfg_.n_layers, "), got ", opt.stop_after);

    attention_context ctx;
    ctx.cache = cache;
    torch::Tensor pos = mask.to(torch::kInt64).cumsum(1) - 1;  // [B, S]: real tokens before each one
    torch::Tensor key_valid;                                    // [B, T]
    if (cache) {
      grun::require<grun::shape_error>(cache->batch() == B, "llama_model: kv_cache: expected batch ", cache->batch(), ", got ", B);
      grun::require<grun::shape_error>(cache->used + S <= cache->capacity, "llama_model: kv_cache: expected room for ", S,
                                       " more slots, ", cache->capacity - cache->used, " left");
      grun::require<grun::shape_error>(first == -1, "llama_model: kv_cache: expected a full forward (forward_from has no cache)");
      ctx.slot0 = cache->used;
      pos = pos + cache->n_tokens.unsqueeze(1);
      cache->valid.narrow(1, ctx.slot0, S).copy_(mask);
      key_valid = cache->valid.narrow(1, 0, ctx.slot0 + S);
    } else if (prefix) {
      const auto P = prefix->valid.size(1);
      grun::require<grun::shape_error>(prefix->valid.dim() == 2 && prefix->valid.size(0) == B && prefix->length.numel() == B,
                                       "llama_model: prefix_kv: expected valid [", B, ", P] and length [", B, "]");
      for (int l = first + 1; l < cfg_.n_layers; ++l)
        grun::require<grun::shape_error>(std::size_t(l) < prefix->k.size() && prefix->k[std::size_t(l)].defined() &&
                                             prefix->k[std::size_t(l)].size(0) == B && prefix->k[std::size_t(l)].size(2) == P,
                                         "llama_model: prefix_kv: expected keys [", B, ", H_kv, ", P, ", hd] at layer ", l);
      ctx.prefix = prefix;
      ctx.slot0 = P;
      pos = pos + prefix->length.unsqueeze(1);
      key_valid = torch::cat({prefix->valid.to(torch::kBool), mask}, 1);
    } else {
      key_valid = mask;
    }
    pos = pos.clamp_min(0);
    const auto T = key_valid.size(1);
    const torch::Tensor ang = pos.to(torch::kFloat32).unsqueeze(-1) * inv_freq_;  // [B, S, rope_dim/2]
    ctx.cos = ang.cos().unsqueeze(1);                                                // [B, 1, S, rope_dim/2]
    ctx.sin = ang.sin().unsqueeze(1);
    // Query at slot slot0+s sees key slot t iff t ≤ slot0+s (causal) and t holds a real token.
    const torch::Tensor qslot = torch::arange(ctx.slot0, ctx.slot0 + S, torch::kInt64).unsqueeze(1);  // [S, 1]
    const torch::Tensor kslot = torch::arange(0, T, torch::kInt64).unsqueeze(0);                      // [1, T]
    const torch::Tensor allowed = kslot.le(qslot).unsqueeze(0) & key_valid.unsqueeze(1);               // [B, S, T]
    ctx.bias = torch::zeros({B, S, T}, torch::kFloat32).masked_fill_(allowed.logical_not(), -1e30).view({B, 1, 1, S, T});

    forward_result r;
    const auto visit = [&](int l) {
      if (opt.hook) {
        torch::Tensor y = opt.hook(l, x);
        grun::require<grun::shape_error>(y.defined() && y.sizes() == x.sizes(), "llama_model: hook at layer ", l,
                                         ": expected a tensor of shape ", x.sizes(), ", got ",
                                         y.defined() ? y.sizes() : torch::IntArrayRef{});
        x = std::move(y);
      }
      if (std::find(opt.capture.begin(), opt.capture.end(), l) != opt.capture.end()) r.captured[l] = x;
    };
    if (first >= 0) visit(first);
    for (int l = first + 1; l <= last; ++l) {
      x = block(static_cast<std::size_t>(l), x, ctx);
      visit(l);
    }
    if (cache) {
      cache->used += S;
      cache->n_tokens += mask.to(torch::kInt64).sum(1);
    }
    r.hidden = x;
    if (opt.stop_after >= 0 && opt.stop_after < cfg_.n_layers - 1) return r;
    switch (opt.logits) {
      case logits_mode::all: r.logits = head(x); break;
      case logits_mode::last: {
        // Last real token among the inputs: the largest s with mask[b, s] (0 when none).
        const torch::Tensor idx = (mask.to(torch::kInt64) * torch::arange(1, S + 1, torch::kInt64)).argmax(1);  // [B]
        const torch::Tensor rows = x.gather(1, idx.view({B, 1, 1}).expand({B, 1, x.size(2)})).squeeze(1);  // [B, d]
        r.logits = head(rows);  // [B, V]
        break;
      }
      case logits_mode::none: break;
    }
    return r;
  }
};

}  // namespace llm
