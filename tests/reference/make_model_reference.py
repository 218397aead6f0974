#!/usr/bin/env python3
"""Writes tests/data/model_reference.json: next-token logits of SmolLM2-135M-Instruct (Q4_1 GGUF)
computed by an implementation independent of ours (Hugging Face transformers, which dequantizes the
GGUF with gguf-py and runs its own Llama forward in fp32).

The C++ test (tests/torch/test_model.cpp) runs examples/llm/model.hpp on the same token ids and
compares. Token ids are produced here with the Hugging Face tokenizer built from the GGUF, so the
model test does not depend on our tokenizer.

The full last-position logit row (49152 floats per prompt) is too big to commit; we store the top-20
ids and values, the sum and L2 norm of the row, and 100 values at fixed pseudo-random indices.

Usage: make_model_reference.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf] [out.json]
Needs: transformers (with GGUF support, >= 4.41), torch, gguf, numpy. Used here: a venv on Debian's
python3-torch 1.13 with transformers 4.46.3 (see the "versions" field of the JSON).
"""
import importlib.metadata
import json
import os
import random
import sys

import numpy as np
import torch
import transformers
import gguf

PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little",
    "def fibonacci(n):\n    ",
    "Harry Potter and the Philosopher's Stone was written by",
    "1, 2, 3, 4, 5,",
    # Chat-formatted prompt, as the unlearning CLI will send it.
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWho wrote Pride and Prejudice?<|im_end|>\n<|im_start|>assistant\n",
    "Water boils at a temperature of",
]


def default_model_path():
    env = os.environ.get("GRUN_MODEL")
    if env:
        return env
    cache = os.environ.get("GRUN_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "grun"))
    return os.path.join(cache, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")


def main():
    model_path = sys.argv[1] if len(sys.argv) > 1 else default_model_path()
    here = os.path.dirname(os.path.abspath(__file__))
    out_path = sys.argv[2] if len(sys.argv) > 2 else os.path.join(here, "..", "data", "model_reference.json")
    d, f = os.path.split(os.path.abspath(model_path))

    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    model.eval()
    # transformers 4.46 leaves lm_head randomly initialized for GGUF files without output.weight
    # (tied embeddings, as in SmolLM2); tie it by hand, as llama.cpp does.
    reader = gguf.GGUFReader(model_path)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    if tied:
        with torch.no_grad():
            model.lm_head.weight = model.model.embed_tokens.weight

    rng = random.Random(1234)
    vocab = model.config.vocab_size
    sample_ids = sorted(rng.sample(range(vocab), 100))

    cases = []
    with torch.no_grad():
        for text in PROMPTS:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            out = model(torch.tensor([ids], dtype=torch.long))
            row = out.logits[0, -1].double()  # [V]
            top = torch.topk(row, 20)
            cases.append({
                "prompt": text,
                "ids": ids,
                "top_ids": top.indices.tolist(),
                "top_values": top.values.tolist(),
                "sum": float(row.sum()),
                "l2": float(row.norm()),
                "sample_ids": sample_ids,
                "sample_values": row[sample_ids].tolist(),
            })

    cfg = model.config
    doc = {
        "model": f,
        "generator": "tests/reference/make_model_reference.py",
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "gguf": importlib.metadata.version("gguf"),
            "numpy": np.__version__,
        },
        "config": {
            "num_hidden_layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "rope_theta": cfg.rope_theta,
            "rms_norm_eps": cfg.rms_norm_eps,
            "vocab_size": cfg.vocab_size,
            "tied_output": tied,
        },
        "cases": cases,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, out_path)
    print(f"wrote {out_path}: {len(cases)} prompts")


if __name__ == "__main__":
    main()
