#!/usr/bin/env python3
"""Reference numbers for tests/test_gguf.cpp, computed with the `gguf` Python package.

    pip install gguf numpy
    python3 tests/reference/gguf_reference.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]

Prints, for a few tensors of the example model, the ggml shape, the type and, over the
dequantized values in ggml order (ne[0] fastest, i.e. numpy's C order of the reversed shape):
the sum, the sum of |x|, the sum of squares (all in float64) and the values at a few flat
indices. test_gguf.cpp stores these numbers as constants; rerun this script when the model or
the reference changes and paste its output over them.
"""
import os
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

TENSORS = [
    "token_embd.weight",        # Q8_0
    "blk.0.attn_q.weight",      # Q4_1
    "blk.0.ffn_down.weight",    # Q4_1, ne[0] = 1536
    "blk.29.attn_v.weight",     # Q4_1, last layer
    "blk.0.attn_norm.weight",   # F32
    "output_norm.weight",       # F32
]


def default_model():
    cache = os.environ.get("GRUN_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "grun"))
    return os.environ.get("GRUN_MODEL", os.path.join(cache, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else default_model()
    reader = GGUFReader(path)
    print(f"// {len(reader.tensors)} tensors")
    for name in TENSORS:
        t = next(t for t in reader.tensors if t.name == name)
        x = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
        x64 = x.astype(np.float64)
        n = x.size
        idx = [0, 1, 15, 16, 31, 32, n // 2 + 7, n - 1]
        samples = ", ".join(f"{{{i}, {float(x[i])!r}f}}" for i in idx)
        print(f'{{"{name}", {{{", ".join(str(int(d)) for d in t.shape)}}}, gguf_type::{t.tensor_type.name}, '
              f"{float(x64.sum())!r}, {float(np.abs(x64).sum())!r}, {float((x64 * x64).sum())!r},\n"
              f" {{{samples}}}}},")


if __name__ == "__main__":
    main()
