#!/usr/bin/env python3
"""PyTorch timings of the computations bench_cuda times, for the ratios in gpu_check.sh's table.

Prints lines  RESULT <name>_<variant> <milliseconds>  with variant eager or compile (torch.compile).
Same sizes, dtype (bf16) and math as benchmarks/cuda/bench_cuda.cu:
  intervention: h' = h + sigmoid(h w + c) * ((h W^T + b - h R^T) R) on every row (linear gate + LoReFT r = 4)
                h' = h + sigmoid(h w + c) * ((h W1^T + b) W2)          (linear gate + DiReFT r = 4)
  nll:          sum of token cross entropy over logits [T, V] (fp32 accumulate), forward and backward
  kl:           per-token KL(softmax(r) || softmax(x)) over logits x, r [T, V] (fp32 accumulate),
                forward and backward to x (r is a frozen reference: no gradient)
  copy:         torch copy_ device to device (a sanity check of bench_cuda's copy bandwidth)
  nll, Liger:   LigerCrossEntropyLoss (Triton, reads the bf16 logits directly) at the NLL size, as
                RESULT nll_fwd_liger / nll_fwdbwd_liger — only if liger_kernel imports (gpu_check.sh tries pip only with GRUN_TRY_LIGER=1).

Every computation is timed eagerly first (variant eager), then again under torch.compile (variant
compile) while time remains: a compile pass that would start after --compile-deadline is skipped and
says so on a NOTE line, so a slow first compile cannot crowd out the eager numbers.
Other lines: TORCH <version> on <gpu>, LIGER <version>, NOTE <text> (read by gpu_table.py).
Usage: torch_reference.py [--quick] [--no-compile] [--compile-deadline UNIX_SECONDS]
"""
import sys
import time

import torch
import torch.nn.functional as F

QUICK = "--quick" in sys.argv
COMPILE = "--no-compile" not in sys.argv
# Wall-clock time (time.time()) after which no torch.compile pass starts; None: no limit.
DEADLINE = float(sys.argv[sys.argv.index("--compile-deadline") + 1]) if "--compile-deadline" in sys.argv else None
PASS = "eager"  # the variant timed now: main() runs every computation eagerly, then under torch.compile
dev = "cuda"
bf16 = torch.bfloat16


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


def variants(fn):
    """(tag, callable) of the current pass: fn itself, or torch.compile(fn) in the compile pass."""
    yield PASS, (fn if PASS == "eager" else torch.compile(fn))


def compile_allowed(what):
    if not COMPILE:
        return False
    if DEADLINE is not None and time.time() > DEADLINE:
        note(f"torch.compile of {what} skipped: past gpu_check's compile cutoff")
        return False
    return True


def intervention(h, w, c, W, b, R):
    g = torch.sigmoid(h @ w + c)  # [T, 1]
    delta = (h @ W.t() + b - h @ R.t()) @ R  # [T, d]
    return h + g * delta, g


def intervention_direft(h, w, c, W1, b, W2):
    g = torch.sigmoid(h @ w + c)  # [T, 1]
    delta = (h @ W1.t() + b) @ W2  # [T, d]
    return h + g * delta, g


def bench_intervention(T, d, r=4, fn_eager=intervention, name="intervention_linear_loreft4"):
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.rand(T, d, device=dev, dtype=bf16, generator=g) * 2 - 1
    dout = torch.rand(T, d, device=dev, dtype=bf16, generator=g) * 2 - 1
    params = [(torch.rand(*s, device=dev, dtype=bf16, generator=g) - 0.5) * 0.1 for s in [(d, 1), (1,), (r, d), (r,), (r, d)]]

    for tag, fn in variants(fn_eager):
        with torch.no_grad():
            result(f"{name}_fwd_{tag}", time_ms(lambda: fn(h, *params)))
        hh = h.clone().requires_grad_(True)
        ps = [p.clone().requires_grad_(True) for p in params]

        def fwdbwd():
            out, _ = fn(hh, *ps)
            torch.autograd.backward(out, dout)

        result(f"{name}_fwdbwd_{tag}", time_ms(fwdbwd, 2, 5))


def nll(x, y):
    return F.cross_entropy(x.float(), y, reduction="sum")


def bench_nll(T, V):
    g = torch.Generator(device=dev).manual_seed(1)
    x = (torch.rand(T, V, device=dev, dtype=bf16, generator=g) * 8 - 4)
    y = torch.arange(T, device=dev) * 7919 % V

    for tag, fn in variants(nll):
        with torch.no_grad():
            result(f"nll_fwd_{tag}", time_ms(lambda: fn(x, y)))
        xx = x.clone().requires_grad_(True)

        def fwdbwd():
            xx.grad = None
            fn(xx, y).backward()

        result(f"nll_fwdbwd_{tag}", time_ms(fwdbwd, 2, 5))
        del xx
        torch.cuda.empty_cache()


def kl(x, r):
    # KL(p_ref || p_theta) per token; the logits are upcast like nll's, to match grun's fp32 accumulate.
    return F.kl_div(F.log_softmax(x.float(), -1), F.log_softmax(r.float(), -1), log_target=True,
                    reduction="none").sum(-1)


def bench_kl(T, V):
    g = torch.Generator(device=dev).manual_seed(2)
    x = (torch.rand(T, V, device=dev, dtype=bf16, generator=g) * 8 - 4)
    r = (torch.rand(T, V, device=dev, dtype=bf16, generator=g) * 8 - 4)

    for tag, fn in variants(kl):
        with torch.no_grad():
            result(f"kl_fwd_{tag}", time_ms(lambda: fn(x, r)))
        xx = x.clone().requires_grad_(True)

        def fwdbwd():
            xx.grad = None
            fn(xx, r).sum().backward()  # dkl = 1 per token, as in bench_cuda

        result(f"kl_fwdbwd_{tag}", time_ms(fwdbwd, 2, 5))
        del xx
        torch.cuda.empty_cache()


def bench_liger_nll(T, V):
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
    g = torch.Generator(device=dev).manual_seed(1)
    x = (torch.rand(T, V, device=dev, dtype=bf16, generator=g) * 8 - 4)
    y = torch.arange(T, device=dev) * 7919 % V
    try:
        loss = LigerCrossEntropyLoss(reduction="sum")  # older versions take mean: same work
        with torch.no_grad():
            result("nll_fwd_liger", time_ms(lambda: loss(x, y)))
        xx = x.clone().requires_grad_(True)

        def fwdbwd():
            xx.grad = None
            loss(xx, y).backward()

        result("nll_fwdbwd_liger", time_ms(fwdbwd, 2, 5))
    except Exception as e:  # a Triton / driver mismatch must not cost the other rows
        note(f"Liger cross entropy failed ({type(e).__name__}: {str(e)[:120]})")
    torch.cuda.empty_cache()


def bench_copy(nbytes):
    a = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    result("copy_d2d_torch", time_ms(lambda: b.copy_(a)))


def main():
    global PASS
    if not torch.cuda.is_available():
        print("SKIPPED: torch sees no CUDA device", file=sys.stderr)
        return 77
    print(f"TORCH {torch.__version__} on {torch.cuda.get_device_name(0)}", flush=True)
    T, d = (1024 if QUICK else 16384), 4096
    T_logits, V = (512 if QUICK else 8192), (32768 if QUICK else 131072)
    bench_copy((64 << 20) if QUICK else (1 << 30))
    computations = [
        ("intervention linear+loreft4", lambda: bench_intervention(T, d)),
        ("intervention linear+direft4",
         lambda: bench_intervention(T, d, fn_eager=intervention_direft, name="intervention_linear_direft4")),
        ("nll", lambda: bench_nll(T_logits, V)),
        ("kl", lambda: bench_kl(T_logits, V)),
    ]
    PASS = "eager"
    for what, run in computations:
        run()
    bench_liger_nll(T_logits, V)
    PASS = "compile"
    for what, run in computations:
        if compile_allowed(what):
            run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
