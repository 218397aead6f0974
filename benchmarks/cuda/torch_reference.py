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
Usage: torch_reference.py [--quick] [--no-compile]
"""
import sys
import time

import torch
import torch.nn.functional as F

QUICK = "--quick" in sys.argv
COMPILE = "--no-compile" not in sys.argv
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

    def variants():
        yield "eager", fn_eager
        if COMPILE:
            yield "compile", torch.compile(fn_eager)

    for tag, fn in variants():
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

    def variants():
        yield "eager", nll
        if COMPILE:
            yield "compile", torch.compile(nll)

    for tag, fn in variants():
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

    def variants():
        yield "eager", kl
        if COMPILE:
            yield "compile", torch.compile(kl)

    for tag, fn in variants():
        with torch.no_grad():
            result(f"kl_fwd_{tag}", time_ms(lambda: fn(x, r)))
        xx = x.clone().requires_grad_(True)

        def fwdbwd():
            xx.grad = None
            fn(xx, r).sum().backward()  # dkl = 1 per token, as in bench_cuda

        result(f"kl_fwdbwd_{tag}", time_ms(fwdbwd, 2, 5))
        del xx
        torch.cuda.empty_cache()


def bench_copy(nbytes):
    a = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    result("copy_d2d_torch", time_ms(lambda: b.copy_(a)))


if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("SKIPPED: torch sees no CUDA device", file=sys.stderr)
        sys.exit(77)
    print(f"TORCH {torch.__version__} on {torch.cuda.get_device_name(0)}", flush=True)
    bench_copy((64 << 20) if QUICK else (1 << 30))
    bench_intervention(1024 if QUICK else 16384, 4096)
    bench_intervention(1024 if QUICK else 16384, 4096, fn_eager=intervention_direft, name="intervention_linear_direft4")
    bench_nll(512 if QUICK else 8192, 32768 if QUICK else 131072)
    bench_kl(512 if QUICK else 8192, 32768 if QUICK else 131072)
