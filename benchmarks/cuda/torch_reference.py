#!/usr/bin/env python3
"""PyTorch timings of the computations bench_cuda times, for the ratios in gpu_check.sh's table.

Prints lines  RESULT <name>_<variant> <milliseconds>  with variant eager or compile (torch.compile).
Same sizes, dtype (bf16) and math as benchmarks/cuda/bench_cuda.cu:
  intervention: h' = h + sigmoid(h w + c) * ((h W^T + b - h R^T) R) on every row (linear gate + LoReFT r = 4)
                h' = h + sigmoid(h w + c) * ((h W1^T + b) W2)          (linear gate + DiReFT r = 4)
                h' = h + sigmoid(w3 relu(W2 relu(G1 h + b1) + b2) + b3) * LoReFT   (mlp<256, 64> gate, the
                     paper's and grun-unlearn's default: its first layer a [T, d] x [d, 256] GEMM)
  nll:          sum of token cross entropy over logits [T, V] (fp32 accumulate), forward and backward
  kl:           per-token KL(softmax(r) || softmax(x)) over logits x, r [T, V] (fp32 accumulate),
                forward and backward to x (r is a frozen reference: no gradient)
  copy:         torch copy_ device to device (a sanity check of bench_cuda's copy bandwidth)
  nll, Liger:   LigerCrossEntropyLoss (Triton, reads the bf16 logits directly) at the NLL size, as
                RESULT nll_fwd_liger / nll_fwdbwd_liger — only if liger_kernel imports (gpu_check.sh tries pip only with GRUN_TRY_LIGER=1).

One harness (time_computation) times every entry of the table COMPUTATIONS (name, math, inputs):
eagerly first (variant eager), then again under torch.compile (variant compile) while time remains: a compile pass that would start after --compile-deadline is skipped and
says so on a NOTE line, so a slow first compile cannot crowd out the eager numbers.
Other lines: TORCH <version> on <gpu>, LIGER <version>, NOTE <text> (read by gpu_table.py).
Usage: torch_reference.py [--quick] [--no-compile] [--compile-deadline UNIX_SECONDS]
"""
import sys
import time
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

QUICK = "--quick" in sys.argv
COMPILE = "--no-compile" not in sys.argv
# Wall-clock time (time.time()) after which no torch.compile pass starts; None: no limit.
DEADLINE = float(sys.argv[sys.argv.index("--compile-deadline") + 1]) if "--compile-deadline" in sys.argv else None
dev = "cuda"
bf16 = torch.bfloat16
T, D = (1024 if QUICK else 16384), 4096                             # intervention: tokens, hidden width
T_LOGITS, V = (512 if QUICK else 8192), (32768 if QUICK else 131072)  # nll, kl: tokens, vocabulary
COPY_BYTES = (64 << 20) if QUICK else (1 << 30)


def time_ms(fn, warmup=3, reps=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def result(name, ms):
    print(f"RESULT {name} {ms:.6f}", flush=True)


def note(text):
    print(f"NOTE {text}", flush=True)


def compile_allowed(what):
    if not COMPILE:
        return False
    if DEADLINE is not None and time.time() > DEADLINE:
        note(f"torch.compile of {what} skipped: past gpu_check's compile cutoff")
        return False
    return True


# ------------------------------------------------------------------------------ the harness
def time_fwd(fn, args):
    """Median ms of fn(*args) without autograd."""
    with torch.no_grad():
        return time_ms(lambda: fn(*args))


def time_fwdbwd(fn, args, trainable, backward, clear_grads):
    """Median ms of forward + backward: the args at the indices in trainable are copied into leaves that
    require grad, and backward(fn(*leaves)) runs the backward. clear_grads: the leaves' .grad is reset
    before each repetition (the backward writes fresh gradients); otherwise autograd adds into .grad."""
    leaves = [a.clone().requires_grad_(True) if i in trainable else a for i, a in enumerate(args)]

    def fwdbwd():
        if clear_grads:
            for i in trainable:
                leaves[i].grad = None
        backward(fn(*leaves))

    return time_ms(fwdbwd, 2, 5)


class Computation(NamedTuple):
    name: str          # RESULT <name>_fwd_<variant> and <name>_fwdbwd_<variant>
    what: str          # the words of the NOTE that skips its compile pass
    math: Callable     # timed eagerly, then as torch.compile(math)
    inputs: Callable   # () -> (the math's args, indices of the args that get gradients, backward(math's output))
    clear_grads: bool  # see time_fwdbwd


def time_computation(name, inputs, clear_grads, tag, fn):
    """RESULT <name>_fwd_<tag> and <name>_fwdbwd_<tag> of fn (the math, eager or compiled) on fresh inputs
    (same seeds in every pass); each line is printed as soon as it is measured, so a run that is stopped
    keeps what finished."""
    args, trainable, backward = inputs()
    result(f"{name}_fwd_{tag}", time_fwd(fn, args))
    result(f"{name}_fwdbwd_{tag}", time_fwdbwd(fn, args, trainable, backward, clear_grads))


# ---------------------------------------------------------------------- the computations
def intervention(h, w, c, W, b, R):
    g = torch.sigmoid(h @ w + c)  # [T, 1]
    delta = (h @ W.t() + b - h @ R.t()) @ R  # [T, d]
    return h + g * delta, g


def intervention_direft(h, w, c, W1, b, W2):
    g = torch.sigmoid(h @ w + c)  # [T, 1]
    delta = (h @ W1.t() + b) @ W2  # [T, d]
    return h + g * delta, g


def intervention_mlp(h, G1, b1, G2, b2, G3, b3, W, b, R):
    a1 = torch.relu(h @ G1.t() + b1)  # [T, 256]
    a2 = torch.relu(a1 @ G2.t() + b2)  # [T, 64]
    g = torch.sigmoid(a2 @ G3.t() + b3)  # [T, 1]
    delta = (h @ W.t() + b - h @ R.t()) @ R  # [T, d]
    return h + g * delta, g


def intervention_inputs(gate_shapes=((D, 1), (1,)), r=4):
    """h [T, d] and the parameters of a gate (gate_shapes: the linear gate's w, c by default) and of a
    rank-r edit: W (or W1), b, R (or W2); the backward is dout^T d(out)/d(h, parameters)."""
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.rand(T, D, device=dev, dtype=bf16, generator=g) * 2 - 1
    dout = torch.rand(T, D, device=dev, dtype=bf16, generator=g) * 2 - 1
    shapes = [*gate_shapes, (r, D), (r,), (r, D)]
    params = [(torch.rand(*s, device=dev, dtype=bf16, generator=g) - 0.5) * 0.1 for s in shapes]
    return [h, *params], range(1 + len(params)), lambda out_and_gates: torch.autograd.backward(out_and_gates[0], dout)


def intervention_mlp_inputs():
    """As intervention_inputs, with the mlp<256, 64> gate's G1 [256, d], b1, G2 [64, 256], b2, G3 [1, 64], b3."""
    return intervention_inputs(gate_shapes=((256, D), (256,), (64, 256), (64,), (1, 64), (1,)))


def nll(x, y):
    return F.cross_entropy(x.float(), y, reduction="sum")


def nll_inputs():
    """Logits x [T, V] and targets y; the backward is that of the summed loss."""
    g = torch.Generator(device=dev).manual_seed(1)
    x = (torch.rand(T_LOGITS, V, device=dev, dtype=bf16, generator=g) * 8 - 4)
    y = torch.arange(T_LOGITS, device=dev) * 7919 % V
    return [x, y], (0,), lambda loss: loss.backward()


def kl(x, r):
    # KL(p_ref || p_theta) per token; the logits are upcast like nll's, to match grun's fp32 accumulate.
    return F.kl_div(F.log_softmax(x.float(), -1), F.log_softmax(r.float(), -1), log_target=True,
                    reduction="none").sum(-1)


def kl_inputs():
    """Logits x and the frozen reference r, both [T, V]; the backward has dkl = 1 per token, as in bench_cuda."""
    g = torch.Generator(device=dev).manual_seed(2)
    x = (torch.rand(T_LOGITS, V, device=dev, dtype=bf16, generator=g) * 8 - 4)
    r = (torch.rand(T_LOGITS, V, device=dev, dtype=bf16, generator=g) * 8 - 4)
    return [x, r], (0,), lambda kl_per_token: kl_per_token.sum().backward()


# tests/gpu_check/test_gpu_check.py lists the RESULT keys from this file's text: the name="…" literals
# below, expanded into the literal key patterns of the result calls above. Keep that spelling.
COMPUTATIONS = [
    # The intervention's gradients add into .grad over the repetitions: grun's backward (bench_cuda)
    # adds into its gradient buffers too (grads += dL/dθ), so both sides pay the same read-modify-write.
    Computation(name="intervention_linear_loreft4", what="intervention linear+loreft4", math=intervention,
                inputs=intervention_inputs, clear_grads=False),
    Computation(name="intervention_linear_direft4", what="intervention linear+direft4", math=intervention_direft,
                inputs=intervention_inputs, clear_grads=False),
    Computation(name="intervention_mlp_loreft4", what="intervention mlp+loreft4", math=intervention_mlp,
                inputs=intervention_mlp_inputs, clear_grads=False),
    Computation(name="nll", what="nll", math=nll, inputs=nll_inputs, clear_grads=True),
    Computation(name="kl", what="kl", math=kl, inputs=kl_inputs, clear_grads=True),
]


def time_liger_nll():
    """Liger-Kernel's fused cross entropy at the NLL size and inputs (sum over tokens), when it imports.

    Liger reads the bf16 logits directly (fp32 math inside). With an input that requires grad its
    forward also writes dloss/dlogits over the logits in place, so its backward is (nearly) free:
    fwd+bwd ~ one read + one write. Without grad (liger >= 0.4) the forward computes the loss only.
    The in-place writes change the logits' values over the repetitions, not the timing.
    """
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except Exception as e:  # not installed, or installed against another torch / triton
        note(f"liger_kernel not importable ({type(e).__name__}: {str(e)[:80]}): no Liger rows")
        return
    try:
        from importlib.metadata import version
        print(f"LIGER {version('liger-kernel')}", flush=True)
    except Exception:
        print("LIGER (version unknown)", flush=True)
    args, trainable, backward = nll_inputs()
    try:
        loss = LigerCrossEntropyLoss(reduction="sum")  # older versions take mean: same work
        result("nll_fwd_liger", time_fwd(loss, args))
        result("nll_fwdbwd_liger", time_fwdbwd(loss, args, trainable, backward, clear_grads=True))
    except Exception as e:  # a Triton / driver mismatch must not cost the other rows
        note(f"Liger cross entropy failed ({type(e).__name__}: {str(e)[:120]})")
    torch.cuda.empty_cache()


def time_copy():
    a = torch.empty(COPY_BYTES, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    result("copy_d2d_torch", time_ms(lambda: b.copy_(a)))


def main():
    if not torch.cuda.is_available():
        print("SKIPPED: torch sees no CUDA device", file=sys.stderr)
        return 77
    print(f"TORCH {torch.__version__} on {torch.cuda.get_device_name(0)}", flush=True)
    time_copy()
    for c in COMPUTATIONS:
        time_computation(c.name, c.inputs, c.clear_grads, "eager", c.math)
        torch.cuda.empty_cache()
    time_liger_nll()
    for c in COMPUTATIONS:
        if compile_allowed(c.what):
            time_computation(c.name, c.inputs, c.clear_grads, "compile", torch.compile(c.math))
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
