#!/usr/bin/env python3
"""Checks of benchmarks/gpu_check.sh and benchmarks/cuda/gpu_table.py that need no GPU.

Usage: test_gpu_check.py {no_gpu|keys|table|prebuilt|slot|kernels|sass} REPO_ROOT     (registered by tests/gpu_check/CMakeLists.txt)
Exit 0 when every check of the group holds; otherwise each failure is printed and the exit status is 1.
"""
import os
import re
import subprocess
import sys
import tarfile
import tempfile

MODE, ROOT = sys.argv[1], sys.argv[2]
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "cuda"))
import gpu_table  # noqa: E402

failures = []


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        failures.append(what)


def run(args, env=None):
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)


# ---------------------------------------------------------------------------------------------- no_gpu
def test_no_gpu():
    with tempfile.TemporaryDirectory() as tmp:
        build = os.path.join(tmp, "build")
        env = dict(os.environ, GRUN_NVIDIA_SMI="false")  # a device query that finds nothing
        p = run(["bash", SCRIPT, "--build-dir", build, "--quick"], env)
        check(p.returncode == 3, f"no GPU: exit 3 (got {p.returncode})")
        check("no NVIDIA GPU visible" in p.stderr, f"no GPU: says 'no NVIDIA GPU visible' (stderr: {p.stderr.strip()!r})")
        check(not os.path.exists(build) and not os.path.exists(build + ".configure.log"),
              "no GPU: stops before configuring (no build directory, no configure log)")
        env = dict(os.environ, GRUN_NVIDIA_SMI=os.path.join(tmp, "no-such-nvidia-smi"))
        p = run(["bash", SCRIPT, "--build-dir", build], env)
        check(p.returncode == 3 and "no NVIDIA GPU visible" in p.stderr, "missing nvidia-smi: exit 3 with the message")
        # nvidia-smi present but without a device prints this and exits 6 on a driver-only machine.
        fake = os.path.join(tmp, "smi-no-devices")
        with open(fake, "w") as f:
            f.write("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
        os.chmod(fake, 0o755)
        p = run(["bash", SCRIPT, "--build-dir", build], dict(os.environ, GRUN_NVIDIA_SMI=fake))
        check(p.returncode == 3 and not os.path.exists(build), "nvidia-smi without devices: exit 3, nothing built")
    p = run(["bash", SCRIPT, "--no-such-option"])
    check(p.returncode == 2 and "unknown argument" in p.stderr, "unknown argument: exit 2")
    p = run(["bash", SCRIPT, "--table-only"])
    check(p.returncode == 2, "--table-only without a file: exit 2")


# ------------------------------------------------------------------------------------------------ keys
def source(*path):
    with open(os.path.join(ROOT, *path), encoding="utf-8") as f:
        return f.read()


def bench_cuda_keys():
    """Every RESULT key bench_cuda.cu can print: literal names, and bench_intervention's name + suffix."""
    src = source("benchmarks", "cuda", "bench_cuda.cu")
    keys = set(re.findall(r'\btimed_row\("([A-Za-z0-9_]+)"', src))
    suffixes = re.findall(r'\btimed_row\(name \+ "([A-Za-z0-9_]+)"', src)
    calls = re.findall(r'\bbench_intervention<\w+>\("([A-Za-z0-9_]+)"([^;]*)\);', src)
    assert suffixes and calls, "bench_cuda.cu: bench_intervention's result names not found (update this test)"
    # bench_schedules<I>(name, …) adds the schedule rows: every "_fwd…_<schedule>" name in the file
    # (and the backward-from-saved rows, "_fwdbwd…_saved", and the slot counts', "_fwdbwd_slots<N>").
    schedules = set(re.findall(r'"(_fwdbwd\w*_(?:resident|tensor|saved|slots\d+))"', src))
    # The forward's schedule rows: "_fwd_" + every name of bench_cuda's forward_names table.
    names = re.search(r'forward_names\[\] = \{(.*?)\};', src, re.S)
    assert names, "bench_cuda.cu: forward_names not found (update this test)"
    schedules |= {"_fwd_" + n for n in re.findall(r'fd::forward_schedule::\w+, "(\w+)"', names.group(1))}
    schedule_calls = re.findall(r'\bbench_schedules<\w+>\("([A-Za-z0-9_]+)"', src)
    assert schedules and schedule_calls, "bench_cuda.cu: the schedule result names not found (update this test)"
    for name, rest in calls:
        generic = "timing::generic" in rest
        for s in suffixes:
            if generic and s == "_fwd_inplace":  # the generic path is timed without an in-place run
                continue
            keys.add(name + s)
        if "timing::fused_and_saved" in rest:
            keys.add(name + "_fwdbwd_saved")
    for name in schedule_calls:
        keys.update(name + s for s in schedules)
    return keys


def torch_reference_keys():
    """Every RESULT key torch_reference.py can print: f-strings expanded over tags and intervention names."""
    src = source("benchmarks", "cuda", "torch_reference.py")
    patterns = re.findall(r'\bresult\(f?"([^"]+)"', src)
    names = set(re.findall(r'\bname="([A-Za-z0-9_]+)"', src))
    assert patterns and names, "torch_reference.py: result names not found (update this test)"
    keys = set()
    for p in patterns:
        for tag in ("eager", "compile"):
            for name in names:
                keys.add(p.replace("{tag}", tag).replace("{name}", name))
    return keys


def test_keys():
    row_keys = {k for k, _, _ in gpu_table.ROWS}
    check(len(row_keys) == len(gpu_table.ROWS), "gpu_table.ROWS: no key twice")
    for k, label, _ in gpu_table.ROWS:
        check(len(label) <= 48, f"gpu_table.ROWS: {k}'s label fits the table's 48 columns ({len(label)}: {label!r})")
    known = row_keys | {k + v for k in row_keys for v in ("_eager", "_compile")} | set(gpu_table.OTHER_KEYS)
    grun, torch = bench_cuda_keys(), torch_reference_keys()
    print(f"bench_cuda.cu keys: {sorted(grun)}\ntorch_reference.py keys: {sorted(torch)}")
    for k in sorted(grun | torch):
        check(k in known, f"RESULT {k} has a place in gpu_table.py")
    for k in sorted(row_keys):
        check(k in grun, f"table row {k} is printed by bench_cuda.cu")
    for k in gpu_table.OTHER_KEYS:
        check(k in grun | torch, f"{k} is printed by bench_cuda.cu or torch_reference.py")
    for k in sorted(torch):
        base = re.sub(r"_(eager|compile)$", "", k)
        if base != k:
            check(base in row_keys, f"torch's {k} sits beside a grun row ({base})")


# ----------------------------------------------------------------------------------------------- table
COPY_BYTES, COPY_MS = 2e9, 1.0  # fake copy bandwidth: 2000 GB/s
ROW_BYTES = 1e9                 # every row: 1e9 bytes -> 0.5 ms at copy bandwidth


def synthetic():
    """A results file with every key, each target row MET or MISSED in turn; returns (text, expectations)."""
    lines = ["SMI Fake GPU 9000, 80000 MiB, 999.1", "DEVICE Fake GPU 9000", "TORCH 9.9.9 on Fake GPU 9000",
             "LIGER 0.0.1", f"RESULT copy_d2d {COPY_MS:.6f} {COPY_BYTES:.0f}", "RESULT copy_d2d_torch 1.250000",
             "NOTE a note from the run", "PHASE configure 7", "PHASE build 61"]
    expect = []  # (key, label, [substrings the row's line must contain], verdict or None)
    met_next = True
    for key, label, kind in gpu_table.ROWS:
        t, eager, comp, want = 1.0, 3.0, 2.0, []
        verdict = None
        if kind == "fwd":  # % copy = 100 * (1e9 / t / 1e6) / 2000 = 50 / t
            t = 0.625 if met_next else 1.0
            want = ["80.0%" if met_next else "50.0%"]
            eager, comp = 3 * t, 2 * t
        elif kind == "fwdbwd":
            eager = 6.0 if met_next else 4.0
            want = ["6.00×" if met_next else "4.00×"]
        elif kind == "rw":  # × read+write = t / 0.5
            t = 0.9 if met_next else 1.5
            want = ["1.80" if met_next else "3.00"]
            eager, comp = 3 * t, 2 * t
        if kind:
            verdict = "MET" if met_next else "MISSED"
            want.append(f"{gpu_table.TARGETS[kind]}: {verdict}")
            met_next = not met_next
        if kind != "fwdbwd":
            want.append("3.00×")
        want.append("2.00×")
        want.append(f"{t:9.3f}")
        lines.append(f"RESULT {key} {t:.6f} {ROW_BYTES:.0f}")
        lines.append(f"RESULT {key}_eager {eager:.6f}")
        lines.append(f"RESULT {key}_compile {comp:.6f}")
        expect.append((key, label, want, verdict))
    t_nll = dict((k, float(l.split()[2])) for l in lines if l.startswith("RESULT") for k in [l.split()[1]])
    lines.append(f"RESULT nll_fwd_liger {1.5 * t_nll['nll_fwd']:.6f}")
    lines.append(f"RESULT nll_fwdbwd_liger {0.5 * t_nll['nll_fwdbwd']:.6f}")
    lines.append("RESULT brand_new_benchmark 2.000000 1000000000")  # a key without a row: listed apart
    lines.append("some unrelated log line the parser must ignore")
    return "\n".join(lines) + "\n", expect


def test_table():
    text, expect = synthetic()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "results.txt")
        with open(path, "w") as f:
            f.write(text)
        p = run([sys.executable, os.path.join(ROOT, "benchmarks", "cuda", "gpu_table.py"), path])
        check(p.returncode == 0, f"gpu_table.py exits 0 (stderr: {p.stderr.strip()!r})")
        out = p.stdout
        print(out)
        via_script = run(["bash", SCRIPT, "--table-only", path])
        check(via_script.returncode == 0 and via_script.stdout == out, "gpu_check.sh --table-only prints the same table")

        lines = out.splitlines()
        check(any(l.startswith("GPU: Fake GPU 9000") for l in lines), "the GPU's name is shown")
        check(any("copy bandwidth" in l and "2000 GB/s" in l for l in lines), "the copy bandwidth (2000 GB/s) is shown")
        check(any("torch copy_ of the same size: 1600 GB/s" in l for l in lines), "torch's copy bandwidth is shown")
        check(any("Liger: 0.0.1" in l for l in lines), "the Liger version is shown")
        # The main table: every row once, in order, each with its numbers and verdict.
        header = next(i for i, l in enumerate(lines) if l.startswith("computation"))
        body = lines[header + 2: header + 2 + len(expect)]
        check(len(body) == len(expect), f"the table has {len(expect)} rows")
        for (key, label, want, _), line in zip(expect, body):
            check(line.startswith(label), f"row {key}: labelled {label.strip()!r}")
            for w in want:
                check(w in line, f"row {key}: shows {w!r}  [{line}]")
        # The cross-entropy comparison: each reference against grun.
        ce = next(i for i, l in enumerate(lines) if l.startswith("cross entropy"))
        block = "\n".join(lines[ce:ce + 6])
        check(re.search(r"PyTorch F\.cross_entropy eager.*3\.00×.*3\.00×", block) is not None,
              "cross entropy: PyTorch eager fwd and fwd+bwd against grun (3.00×)")
        check(re.search(r"torch\.compile.*2\.00×.*2\.00×", block) is not None, "cross entropy: torch.compile (2.00×)")
        check(re.search(r"Liger.*1\.50×.*0\.50×", block) is not None, "cross entropy: Liger fwd 1.50×, fwd+bwd 0.50×")
        # The targets summary.
        verdicts = [v for _, _, _, v in expect if v]
        n_met, n_missed = verdicts.count("MET"), verdicts.count("MISSED")
        check(f"Issue 4 targets: {n_met} MET, {n_missed} MISSED, 0 not measured" in out,
              f"summary: {n_met} MET, {n_missed} MISSED, 0 not measured")
        first = next(i for i, l in enumerate(lines) if l.startswith("Issue 4 targets")) + 1
        summary = lines[first:first + len(verdicts)]
        for (key, _, _, v), line in zip([e for e in expect if e[3]], summary):
            check(line.split()[0] == v, f"summary lists {key} as {v}  [{line.strip()}]")
        check(re.search(r"other results.*\n\s+brand_new_benchmark\s+2\.000 ms\s+500 GB/s", out) is not None,
              "a key without a row is listed under 'other results' with its time and GB/s")
        check("a note from the run" in out, "NOTE lines are printed")
        check("Phases: configure 7 s, build 61 s  (total 68 s)" in out, "phases and their total are printed")

        # The fastest other schedule of a target row, where it beats the default, and where the target
        # would stand with it (the synthetic rows above: every schedule row as slow as the default or slower).
        check("Fastest other schedule per target row" in out, "the fastest-schedule section is printed")
        check(re.search(r"fused fwd linear\+loreft4 d=4096 T=16384 bf16\s+the default is the fastest", out) is not None,
              "fastest schedules: a default no schedule beats is named so")
        with open(path, "w") as f:
            f.write(f"RESULT copy_d2d {COPY_MS:.6f} {COPY_BYTES:.0f}\n"
                    "RESULT intervention_linear_loreft4_fwd 1.0 1000000000\n"
                    "RESULT intervention_linear_loreft4_fwd_inplace 0.9 1000000000\n"
                    "RESULT intervention_linear_loreft4_fwd_tensor_pipelined 0.625 1000000000\n"
                    "RESULT intervention_linear_loreft4_fwd_stream 2.0 1000000000\n"
                    "RESULT intervention_linear_loreft4_fwdbwd 1.0 1000000000\n"
                    "RESULT intervention_linear_loreft4_fwdbwd_eager 4.0\n"
                    "RESULT intervention_linear_loreft4_fwdbwd_saved 0.8 1000000000\n"
                    "RESULT intervention_linear_loreft4_fwdbwd_pipelined_tensor_saved 0.5 1000000000\n"
                    # bench_cuda's OPTIONS lines: what --fastest-flags gives back
                    "OPTIONS intervention_linear_loreft4_fwd_tensor_pipelined --schedule tensor_pipelined\n"
                    "OPTIONS intervention_linear_loreft4_fwd_stream --schedule stream\n"
                    "OPTIONS intervention_linear_loreft4_fwdbwd_saved --schedule tensor --coef-schedule stream "
                    "--slot-schedule cuda_cores --saved\n"
                    "OPTIONS intervention_linear_loreft4_fwdbwd_pipelined_tensor_saved --schedule tensor_pipelined "
                    "--coef-schedule tensor --slot-schedule tensor --saved\n")
        p = run([sys.executable, os.path.join(ROOT, "benchmarks", "cuda", "gpu_table.py"), path])
        print(p.stdout)
        check(re.search(r"loreft4 d=4096 T=16384 bf16\s+tensor_pipelined: 0\.625 ms, 1\.60× the default's speed, "
                        r"80\.0% of copy BW \(MET if it were the default\)", p.stdout) is not None,
              "fastest schedules: the forward's (not the in-place row), its speed-up and its target")
        check(re.search(r"fused fwd\+bwd linear\+loreft4 \(same sizes\)\s+pipelined_tensor_saved: 0\.500 ms, 2\.00× "
                        r"the default's speed, 8\.00× faster than eager \(MET if it were the default\)", p.stdout) is not None,
              "fastest schedules: fwd+bwd against eager")
        check("Issue 4 targets: 0 MET, 3 MISSED" in p.stdout, "the verdicts still count the defaults only")
        table_py = os.path.join(ROOT, "benchmarks", "cuda", "gpu_table.py")
        flags = run([sys.executable, table_py, "--fastest-flags", path])
        check(flags.returncode == 0 and flags.stdout.strip() ==
              "--schedule tensor_pipelined --coef-schedule tensor --slot-schedule tensor --saved",
              f"--fastest-flags: the fastest forward's schedule, then the fastest fwd+bwd's backward options "
              f"(got {flags.stdout.strip()!r})")
        # The forward's default is the fastest; the fwd+bwd's fastest sets a forward schedule of its own
        # (resident), which gives way to the default's; the in-place row is no schedule; a faster row
        # without an OPTIONS line (an older bench_cuda's) cannot be made the default and is passed over.
        with open(path, "w") as f:
            f.write("RESULT intervention_linear_loreft4_fwd 1.0 1000000000\n"
                    "RESULT intervention_linear_loreft4_fwd_inplace 0.5 1000000000\n"
                    "RESULT intervention_linear_loreft4_fwd_stream 2.0 1000000000\n"
                    "RESULT intervention_linear_loreft4_fwdbwd 1.0 1000000000\n"
                    "RESULT intervention_linear_loreft4_fwdbwd_resident 0.9 1000000000\n"
                    "RESULT intervention_linear_loreft4_fwdbwd_tensor 0.95 1000000000\n"
                    "RESULT intervention_linear_loreft4_fwdbwd_slot_tensor 0.85 1000000000\n"
                    "RESULT intervention_linear_direft4_fwd_stream 0.1 1000000000\n"
                    "OPTIONS intervention_linear_loreft4_fwd_stream --schedule stream\n"
                    "OPTIONS intervention_linear_loreft4_fwdbwd_resident --schedule resident --coef-schedule resident "
                    "--slot-schedule cuda_cores\n"
                    "OPTIONS intervention_linear_loreft4_fwdbwd_tensor --schedule tensor --coef-schedule tensor "
                    "--slot-schedule tensor\n"
                    "OPTIONS intervention_linear_direft4_fwd_stream --schedule stream\n")
        flags = run([sys.executable, table_py, "--fastest-flags", path])
        check(flags.returncode == 0 and flags.stdout.strip() == "--coef-schedule resident --slot-schedule cuda_cores",
              f"--fastest-flags: a default forward stays, the fwd+bwd's backward options come (got {flags.stdout.strip()!r})")
        check("no OPTIONS line for intervention_linear_loreft4_fwdbwd_slot_tensor: passed over" in flags.stderr,
              f"--fastest-flags: a row without options is passed over, and said so (stderr {flags.stderr.strip()!r})")
        with open(path, "w") as f:
            f.write("RESULT intervention_linear_loreft4_fwd 1.0 1000000000\n"
                    "RESULT intervention_linear_loreft4_fwd_stream 2.0 1000000000\n"
                    "RESULT intervention_linear_loreft4_fwdbwd 1.0 1000000000\n"
                    "RESULT intervention_linear_loreft4_fwdbwd_tensor 1.5 1000000000\n")
        flags = run([sys.executable, table_py, "--fastest-flags", path])
        check(flags.returncode == 0 and flags.stdout.strip() == "", "--fastest-flags: nothing when the defaults are the fastest")
        bad = run([sys.executable, table_py, "--fastest", path])
        check(bad.returncode == 2 and "--fastest-flags" in bad.stderr, "a bad option: exit 2 and the usage")

        # The SCHEDULES line: the schedules the default rows ran, and whether they are the library's.
        for line, want in (("SCHEDULES forward=tensor coef=stream slot=cuda_cores fwdbwd=recompute defaults forward=tensor "
                            "coef=stream slot=cuda_cores fwdbwd=recompute",
                            "schedules of the default rows: forward tensor, coef stream, slot cuda_cores, fwdbwd recompute  "
                            "(the library's defaults)"),
                           ("SCHEDULES forward=tensor_pipelined coef=tensor slot=cuda_cores fwdbwd=saved defaults "
                            "forward=tensor coef=stream slot=cuda_cores fwdbwd=recompute",
                            "schedules of the default rows: forward tensor_pipelined, coef tensor, slot cuda_cores, fwdbwd "
                            "saved  (bench_cuda options; the library's defaults: forward tensor, coef stream, slot "
                            "cuda_cores, fwdbwd recompute)")):
            with open(path, "w") as f:
                f.write(line + "\n")
            p = run([sys.executable, table_py, path])
            check(want in p.stdout, f"SCHEDULES shown as {want!r}")

        # Rows bench_cuda could not time (FAILED <key> <what>): shown in their place, a target among
        # them not measured, a key without a row listed apart, and what each said, whole, in the notes.
        long_what = "cudaFuncSetAttribute: invalid argument " + "x" * 80
        with open(path, "w") as f:
            f.write(f"RESULT copy_d2d {COPY_MS:.6f} {COPY_BYTES:.0f}\n"
                    "RESULT intervention_linear_loreft4_fwd 1.0 1000000000\n"
                    f"FAILED intervention_linear_loreft4_fwd_tensor_pipelined {long_what}\n"
                    "FAILED intervention_linear_loreft4_fwdbwd out of memory\n"
                    "FAILED no_such_row the CUDA context is lost\n")
        p = run([sys.executable, os.path.join(ROOT, "benchmarks", "cuda", "gpu_table.py"), path])
        print(p.stdout)
        check(p.returncode == 0, "FAILED lines: gpu_table.py exits 0")
        check(re.search(r"\n  same, tensor, tiles double-buffered \(cp\.async\)\s+FAILED: cudaFuncSetAttribute: "
                        r"invalid argument x+…\n", p.stdout) is not None,
              "a failed schedule row is shown in its place, what it said cut to the line")
        check(re.search(r"NOT MEASURED\s+fused fwd\+bwd linear\+loreft4 \(same sizes\)\s+FAILED: out of memory",
                        p.stdout) is not None, "a failed target row counts as not measured, saying why")
        check(re.search(r"other results.*\n\s+no_such_row\s+FAILED: the CUDA context is lost", p.stdout, re.S) is not None,
              "a failed key without a row is listed apart")
        check(f"intervention_linear_loreft4_fwd_tensor_pipelined: {long_what}" in p.stdout,
              "the notes keep what each failed row said, whole")

        # A run that stopped early: only nvidia-smi's line and the copy; nothing may crash.
        with open(path, "w") as f:
            f.write("SMI Fake GPU 9000, 80000 MiB, 999.1\nMODE quick\nNOTE bench_cuda was not built\n")
        p = run([sys.executable, os.path.join(ROOT, "benchmarks", "cuda", "gpu_table.py"), path])
        n_targets = len(verdicts)
        check(p.returncode == 0 and "GPU: Fake GPU 9000" in p.stdout, "no bench results: GPU name from nvidia-smi")
        check(f"0 MET, 0 MISSED, {n_targets} not measured" in p.stdout, "no bench results: every target 'not measured'")
        check("MODE quick" in p.stdout, "quick mode is flagged")
        # grun rows but no torch and no copy: fwd / rw targets and fwd+bwd targets cannot be judged.
        with open(path, "w") as f:
            f.write("".join(f"RESULT {k} 1.0 1000000000\n" for k, _, _ in gpu_table.ROWS))
        p = run([sys.executable, os.path.join(ROOT, "benchmarks", "cuda", "gpu_table.py"), path])
        check(p.returncode == 0 and f"0 MET, 0 MISSED, {n_targets} not measured" in p.stdout,
              "no copy row and no torch: targets 'not measured', no crash")


# -------------------------------------------------------------------------------------------- prebuilt
def write_program(path, body):
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body + "\n")
    os.chmod(path, 0o755)


def test_prebuilt():
    """--prebuilt BUNDLE: no build; each test program's exit code counts (0 passed, 77 skipped, else failed)."""
    with tempfile.TemporaryDirectory() as tmp:
        build = os.path.join(tmp, "build")
        p = run(["bash", SCRIPT, "--build-dir", build, "--prebuilt", os.path.join(tmp, "no-bundle")])
        check(p.returncode == 2 and "expected a bundle made by benchmarks/gpu_bundle.sh" in p.stderr,
              f"--prebuilt without a bundle: exit 2 naming gpu_bundle.sh (got {p.returncode}: {p.stderr.strip()!r})")
        check(not os.path.exists(build), "--prebuilt without a bundle: nothing written")

        bundle = os.path.join(tmp, "bundle")
        os.makedirs(os.path.join(bundle, "bin"))
        with open(os.path.join(bundle, "MANIFEST"), "w") as f:
            f.write("commit 0000000 (fake)\narchs 90\n")
        smi = os.path.join(tmp, "smi")
        write_program(smi, "echo 'Fake GPU 9000, 80000 MiB, 999.1'")
        write_program(os.path.join(bundle, "bin", "bench_cuda"), "echo 'DEVICE Fake GPU 9000'")
        write_program(os.path.join(bundle, "bin", "test_cuda_passes"), "echo 'All tests passed (3 assertions in 1 test case)'")
        write_program(os.path.join(bundle, "bin", "device_loop_cuda"), "echo 'loss 0.8 -> 0.03'")
        os.chmod(os.path.join(bundle, "bin", "bench_cuda"), 0o644)  # a copy that lost its execute bit
        env = dict(os.environ, GRUN_NVIDIA_SMI=smi)
        args = ["bash", SCRIPT, "--build-dir", build, "--prebuilt", bundle, "--quick", "--no-compile"]
        p = run(args, env)
        check(p.returncode == 0 and "2 of 2 test programs passed, 0 failed, 0 skipped" in p.stdout,
              f"bundle whose programs pass: exit 0, '2 of 2 … passed' (got {p.returncode}; {p.stdout[-600:]!r})")
        check(not os.path.exists(os.path.join(build, "gpu_check.configure.log")), "bundle: nothing configured or built")
        check("bench_cuda was not built" not in p.stdout and "bench_cuda failed" not in p.stdout,
              "bundle: a program that lost its execute bit still runs")
        check("prebuilt bundle: commit 0000000" in p.stdout, "bundle: its MANIFEST commit is in the table's notes")

        # The libtorch adapter's CUDA test runs against the machine's torch, only at the version it
        # was linked with (MANIFEST "torch X"); a stand-in torch package says which version is here.
        with open(os.path.join(bundle, "MANIFEST"), "a") as f:
            f.write("torch 2.11.0\n")
        write_program(os.path.join(bundle, "bin", "test_torch_adapter_cuda"), 'echo "library path: $LD_LIBRARY_PATH"')
        fake = os.path.join(tmp, "site")
        os.makedirs(os.path.join(fake, "torch", "lib"))
        for version, runs in (("2.11.0+cu130", True), ("2.12.0", False)):
            with open(os.path.join(fake, "torch", "__init__.py"), "w") as f:
                f.write(f"__version__ = {version!r}\n")
            p = run(args, dict(env, PYTHONPATH=fake))
            if runs:
                check(p.returncode == 0 and "3 of 3 test programs passed" in p.stdout
                      and os.path.join(fake, "torch", "lib") in p.stdout,
                      f"torch 2.11.0 here: test_torch_adapter_cuda runs with this torch's lib/ on the library path "
                      f"(got {p.returncode}; {p.stdout[-800:]!r})")
            else:
                check(p.returncode == 0 and "2 of 2 test programs passed" in p.stdout
                      and "linked it with torch 2.11.0, this machine has 2.12.0" in p.stdout,
                      f"torch 2.12.0 here: test_torch_adapter_cuda not run, and the note says why "
                      f"(got {p.returncode}; {p.stdout[-800:]!r})")
        p = run(args, dict(env, PYTHONPATH=os.path.join(tmp, "nothing")))  # python3's own torch, if any: not 2.11.0's stand-in
        check(p.returncode == 0 and "2 of 2 test programs passed" in p.stdout
              and "test_torch_adapter_cuda not run: " in p.stdout,
              f"no torch here (or another): test_torch_adapter_cuda not run, and the note says why ({p.stdout[-600:]!r})")
        os.remove(os.path.join(bundle, "bin", "test_torch_adapter_cuda"))

        write_program(os.path.join(bundle, "bin", "test_cuda_skips"), "exit 77")
        write_program(os.path.join(bundle, "bin", "test_cuda_fails"), "echo 'expected 1 == 2'; exit 1")
        p = run(args, env)
        check(p.returncode == 1 and "2 of 4 test programs passed, 1 failed, 1 skipped" in p.stdout,
              f"a failing and a skipping program: exit 1 and counted (got {p.returncode}; {p.stdout[-600:]!r})")
        check("test_cuda_fails: FAILED (exit 1)" in p.stdout and "expected 1 == 2" in p.stdout,
              "a failing program is named, with its output")
        check("CUDA tests were SKIPPED" in p.stdout, "a skipping program is reported as skipped, not passed")


def test_slot():
    """benchmarks/gpu_slot.sh: one lent-machine call over a bundle; every result file lands in --out."""
    slot = os.path.join(ROOT, "benchmarks", "gpu_slot.sh")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        p = run(["bash", slot, "--bundle", os.path.join(tmp, "no-bundle"), "--out", out])
        check(p.returncode == 2 and "expected a bundle made by benchmarks/gpu_bundle.sh" in p.stderr and not os.path.exists(out),
              f"no bundle: exit 2 naming gpu_bundle.sh, nothing written (got {p.returncode}: {p.stderr.strip()!r})")
        p = run(["bash", slot, "--frobnicate", "1"])
        check(p.returncode == 2 and "unknown argument --frobnicate" in p.stderr, "unknown argument: exit 2")

        bundle = os.path.join(tmp, "bundle")
        os.makedirs(os.path.join(bundle, "bin"))
        with open(os.path.join(bundle, "MANIFEST"), "w") as f:
            f.write("commit 1111111 (fake)\narchs 90\n")
        # A bench_cuda whose pipelined forward and saved tensor-core fwd+bwd beat the defaults, and which
        # under the options that make them the defaults prints those rows faster.
        write_program(os.path.join(bundle, "bin", "bench_cuda"), "\n".join([
            "echo 'DEVICE Fake GPU 9000'; echo \"args $*\"",
            "k=intervention_linear_loreft4",
            "case \"$*\" in",
            "  *--saved*) echo \"RESULT ${k}_fwd 0.5 1000000000\"; echo \"RESULT ${k}_fwdbwd 0.7 1000000000\" ;;",
            "  *--only*) ;;",
            "  *) for r in fwd:1.0 fwd_inplace:0.9 fwd_tensor_pipelined:0.5 fwdbwd:1.0 fwdbwd_tensor_saved:0.7; do",
            "       echo \"RESULT ${k}_${r%%:*} ${r#*:} 1000000000\"; done",
            "     echo \"OPTIONS ${k}_fwd_tensor_pipelined --schedule tensor_pipelined\"",
            "     echo \"OPTIONS ${k}_fwdbwd_tensor_saved --schedule tensor --coef-schedule tensor --slot-schedule tensor --saved\" ;;",
            "esac"]))
        write_program(os.path.join(bundle, "bin", "test_cuda_passes"), "echo 'All tests passed (1 assertion in 1 test case)'")
        write_program(os.path.join(bundle, "bin", "device_loop_cuda"), "echo 'loss 0.8 -> 0.03'")
        p = run(["bash", slot, "--bundle", bundle, "--out", out], dict(os.environ, GRUN_NVIDIA_SMI=os.path.join(tmp, "none")))
        check(p.returncode == 3, f"no GPU: exit 3 (got {p.returncode})")
        smi = os.path.join(tmp, "smi")
        write_program(smi, "echo 'Fake GPU 9000, 80000 MiB, 999.1'")
        # An ncu that reports how it was called, and given --log-file writes a profile there (step 3b's).
        fakebin = os.path.join(tmp, "fakebin")
        os.makedirs(fakebin)
        csv_sample = os.path.join(tmp, "ncu.csv")
        with open(csv_sample, "w") as f:
            f.write(NCU_CSV)
        write_program(os.path.join(fakebin, "ncu"), "\n".join([
            'echo "ncu $*"',
            'while [ $# -gt 0 ]; do if [ "$1" = --log-file ]; then cp "' + csv_sample + '" "$2"; fi; shift; done']))
        # A compute-sanitizer that reports a clean run of each tool it is given.
        write_program(os.path.join(fakebin, "compute-sanitizer"),
                      'echo "sanitizer $*"; echo "========= ERROR SUMMARY: 0 errors"')
        p = run(["bash", slot, "--bundle", bundle, "--out", out],
                dict(os.environ, GRUN_NVIDIA_SMI=smi, PATH=f"{fakebin}:/usr/bin:/bin"))
        check(p.returncode == 0, f"passing bundle: exit 0 (got {p.returncode}; {p.stdout[-600:]!r})")
        files = sorted(os.listdir(out)) if os.path.isdir(out) else []
        want = ["env.txt", "extra.txt", "fastest.txt", "gpu_check.log", "logs.tgz", "memcheck.txt", "ncu.txt", "results.txt"]
        check(files == want, f"--out holds {want} (at most 8 files: a device call returns no more), got {files}")
        if "results.txt" in files:
            with open(os.path.join(out, "results.txt")) as f:
                check("DEVICE Fake GPU 9000" in f.read(), "results.txt holds bench_cuda's lines")
        if "extra.txt" in files:
            with open(os.path.join(out, "extra.txt")) as f:
                check("args --only intervention_scaling" in f.read(), "extra.txt: bench_cuda --only intervention_scaling")
        if "fastest.txt" in files:
            with open(os.path.join(out, "fastest.txt")) as f:
                fastest = f.read()
            print(fastest)
            check(fastest.startswith("bench_cuda --schedule tensor_pipelined --coef-schedule tensor "
                                     "--slot-schedule tensor --saved: the fastest"),
                  "fastest.txt: bench_cuda run again with the fastest schedules' options")
            check(re.search(r"fused fwd linear\+loreft4 d=4096 T=16384 bf16\s+0\.500\s", fastest) is not None
                  and re.search(r"fused fwd\+bwd linear\+loreft4 \(same sizes\)\s+0\.700\s", fastest) is not None,
                  "fastest.txt: the table's target rows are the second run's")
            check(re.search(r"NOT MEASURED\s+fused fwd linear\+loreft4 d=4096 T=16384 bf16, in place\s+no grun result",
                            fastest) is not None,
                  "fastest.txt: a row the second run did not print is not measured (not the first run's default)")
        if "ncu.txt" in files:
            with open(os.path.join(out, "ncu.txt")) as f:
                ncu = f.read()
            for kernel, options in [("forward_tensor_kernel", "--schedule tensor"),
                                    ("forward_tensor_kernel", "--schedule tensor_apply"),
                                    ("forward_tensor_kernel", "--schedule tensor_pipelined"),
                                    ("forward_kernel", "--schedule stream"), ("forward_kernel", "--schedule resident"),
                                    ("coef_kernel", "--coef-schedule stream"), ("coef_kernel", "--saved"),
                                    ("coef_tensor_kernel", "--coef-schedule tensor"),
                                    ("slot_kernel", "--slot-schedule cuda_cores"),
                                    ("slot_tensor_kernel", "--slot-schedule tensor"),
                                    ("sum_slots_kernel", "--slot-schedule cuda_cores")]:
                check(any(f"-k regex:{kernel} -c 1" in line
                          and line.endswith(f"--only intervention_linear_loreft4 {options}")
                          for line in ncu.splitlines()),
                      f"ncu.txt: {kernel} profiled under bench_cuda {options}")
            for group, row in [("intervention_mlp_loreft4", "intervention_mlp_loreft4_fwdbwd"),
                               ("intervention_mlp_loreft4", "intervention_mlp_loreft4_fwdbwd_saved"),
                               ("intervention_linear_loreft4", "intervention_linear_loreft4_fwdbwd"),
                               ("intervention_user_gate_loreft4", "intervention_user_gate_loreft4_fwdbwd")]:
                check(f"== ncu --profile-from-start off: bench_cuda --only {group} --profile {row}\n"
                      f"== kernels of one {row} call (ncu gpu__time_duration.sum, launch order)\n" in ncu
                      and "sum of 4 kernels" in ncu.split(f"--profile {row}\n")[1].split("== ")[1],
                      f"ncu.txt: every kernel of one {row} call (bench_cuda --profile), listed by kernel_times.py")

        if "memcheck.txt" in files:
            with open(os.path.join(out, "memcheck.txt")) as f:
                sanitized = f.read()
            for tool, program in [("memcheck", "test_cuda_intervention_fused"), ("memcheck", "test_cuda_intervention"),
                                  ("memcheck", "test_cuda_intervention_fused_mlp"), ("memcheck", "test_cuda_core"),
                                  ("racecheck", "test_cuda_intervention_fused"),
                                  ("synccheck", "test_cuda_intervention_fused")]:
                check(f"== {tool} {program}\n========= ERROR SUMMARY: 0 errors\nexit 0\n" in sanitized,
                      f"memcheck.txt: compute-sanitizer --tool {tool} on {program}, its summary and exit status")

        # A call whose earlier steps ran long: no profile starts past GRUN_SLOT_NCU_UNTIL_S (330 s by
        # default), each says it was skipped, and compute-sanitizer still runs.
        late = os.path.join(tmp, "late")
        p = run(["bash", slot, "--bundle", bundle, "--out", late],
                dict(os.environ, GRUN_NVIDIA_SMI=smi, PATH=f"{fakebin}:/usr/bin:/bin", GRUN_SLOT_NCU_UNTIL_S="-1"))
        with open(os.path.join(late, "ncu.txt")) as f:
            ncu_late = f.read()
        with open(os.path.join(late, "memcheck.txt")) as f:
            sanitized_late = f.read()
        skipped = re.findall(r"^== (.*): skipped, \d+ s into the call \(profiles start until -1 s\)$", ncu_late, re.M)
        check(p.returncode == 0 and len(skipped) == 15 and "ncu --clock-control" not in ncu_late
              and "kernels of one intervention_mlp_loreft4_fwdbwd call" in skipped
              and sanitized_late.count("ERROR SUMMARY: 0 errors") == 6,
              f"past the profiles' deadline: all 15 skipped, each said, the sanitizer runs (got {p.returncode}, "
              f"{len(skipped)} skipped: {ncu_late[:300]!r})")

        # The archive gpu_bundle.sh writes beside the folder (what a device call carries): unpacked and run.
        archive = os.path.join(tmp, "bundle.tar.gz")
        subprocess.run(["tar", "czf", archive, "-C", bundle, "."], check=True)
        out2 = os.path.join(tmp, "out2")
        p = run(["bash", slot, "--bundle", archive, "--out", out2],
                dict(os.environ, GRUN_NVIDIA_SMI=smi, PATH=f"{fakebin}:/usr/bin:/bin"))
        check(p.returncode == 0 and "prebuilt bundle: commit 1111111" in p.stdout,
              f"bundle as .tar.gz: unpacked, exit 0, its MANIFEST read (got {p.returncode}; {p.stdout[-600:]!r})")
        with tarfile.open(os.path.join(out2, "logs.tgz")) as logs:
            names = logs.getnames()
        check(not any("bundle/" in n for n in names), f"logs.tgz does not carry the unpacked bundle back: {names[:8]}")
        broken = os.path.join(tmp, "broken.tar.gz")
        with open(broken, "wb") as f:
            f.write(b"not a tar archive")
        out3 = os.path.join(tmp, "out3")
        p = run(["bash", slot, "--bundle", broken, "--out", out3], dict(os.environ, GRUN_NVIDIA_SMI=smi))
        check(p.returncode == 2 and "expected a .tar.gz made by benchmarks/gpu_bundle.sh" in p.stderr
              and not os.path.exists(out3),
              f"a broken archive: exit 2 naming what was expected, nothing written (got {p.returncode}: {p.stderr.strip()!r})")


# --------------------------------------------------------------------------------------------- kernels
# What `ncu --csv --metrics gpu__time_duration.sum --log-file F` writes (the details page): its own
# ==PROF== lines, a header, then a row per kernel and metric, in the unit ncu picked for each value.
NCU_CSV = "\n".join([
    "==PROF== Connected to process 4242 (/tmp/bundle/bin/bench_cuda)",
    '==PROF== Profiling "widen_kernel" - 0: 0%....50%....100% - 1 pass',
    '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
    '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"',
    '"0","4242","bench_cuda","127.0.0.1","void grun::cuda::mlp_gate::detail::widen_kernel<__nv_bfloat16>'
    '(const T1 *, long, float *)","1","7","(256, 1, 1)","(64, 1, 1)","0","9.0","Command line profiler metrics",'
    '"gpu__time_duration.sum","nsecond","2,144"',
    '"1","4242","bench_cuda","127.0.0.1","sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_cublas",'
    '"1","7","(384, 1, 1)","(2, 128, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum",'
    '"usecond","61.28"',
    '"2","4242","bench_cuda","127.0.0.1","void grun::cuda::mlp_gate::detail::widen_kernel<__nv_bfloat16>'
    '(const T1 *, long, float *)","1","7","(256, 1, 1)","(64, 1, 1)","0","9.0","Command line profiler metrics",'
    '"gpu__time_duration.sum","us","1.856"',
    '"3","4242","bench_cuda","127.0.0.1","void grun::cuda::fused::detail::slot_kernel<grun::bfloat16, 4>'
    '(grun::cuda::fused::detail::slot_args<grun::bfloat16>)","1","7","(128, 1, 1)","(512, 8, 1)","0","9.0",'
    '"Command line profiler metrics","gpu__time_duration.sum","msecond","0.274"',
    "==PROF== Disconnected from process 4242", ""])


def test_kernels():
    """benchmarks/cuda/kernel_times.py: ncu's CSV of one profiled call (gpu_slot.sh step 3b) as a list of
    kernels in launch order with their sum beside the row's median, and the time per kernel name."""
    import kernel_times
    kernels = kernel_times.parse(NCU_CSV.splitlines())
    check([(i, round(us, 3)) for i, _, us in kernels] == [(0, 2.144), (1, 61.28), (2, 1.856), (3, 274.0)],
          f"ncu's rows in launch order, in µs whatever the unit (ns with a thousands comma, us, ms): {kernels}")
    text = kernel_times.render("intervention_mlp_loreft4_fwdbwd", kernels, 0.5)
    print(text)
    check("     339.3  sum of 4 kernels: 68% of the row's median, 0.500 ms" in text,
          "the kernels' sum beside the row's median")
    check("       4.0    1%   2×  widen_kernel<__nv_bfloat16>" in text and
          "     274.0   81%   1×  slot_kernel<bfloat16, 4>" in text,
          "per kernel name: the sum of its launches and their count, largest first, names shortened")
    check("no kernel rows" in kernel_times.render("x", [], None), "no rows: said, not an empty table")
    try:
        kernel_times.parse(NCU_CSV.replace('"usecond","61.28"', '"cycle","61.28"').splitlines())
        check(False, "a unit that is not a time is refused")
    except ValueError as e:
        check("in unit 'cycle', expected one of nsecond" in str(e), f"a unit that is not a time is refused: {e}")
    script = os.path.join(ROOT, "benchmarks", "cuda", "kernel_times.py")
    with tempfile.TemporaryDirectory() as tmp:
        log, results = os.path.join(tmp, "ncu.csv"), os.path.join(tmp, "results.txt")
        with open(log, "w") as f:
            f.write(NCU_CSV)
        with open(results, "w") as f:
            f.write("RESULT intervention_mlp_loreft4_fwd 0.2 1\nRESULT intervention_mlp_loreft4_fwdbwd 0.678 1\n")
        p = run([sys.executable, script, "--row", "intervention_mlp_loreft4_fwdbwd", "--results", results, log])
        check(p.returncode == 0 and "50% of the row's median, 0.678 ms" in p.stdout,
              f"the command line: the row's median read from --results (got {p.returncode}: {p.stdout[-300:]!r})")
        p = run([sys.executable, script, "--row", "x", "--results", os.path.join(tmp, "none"), log])
        check(p.returncode == 0 and "sum of 4 kernels\n" in p.stdout, "no results file: the sum alone")
        p = run([sys.executable, script, "--row", "x", os.path.join(tmp, "none.csv")])
        check(p.returncode == 2 and "none.csv" in p.stderr, f"no log: exit 2 naming it ({p.stderr.strip()!r})")


# ------------------------------------------------------------------------------------------------ sass
def test_sass():
    """benchmarks/cuda/sass_report.py's parsing and table over a synthetic ptxas -v log and nvdisasm
    listing (the formats those tools print), and its refusals; nothing is compiled or fetched."""
    import sass_report
    ptxas = ("ptxas info    : Compiling entry function '_Z3fooIfEvv' for 'sm_90'\n"
             "ptxas info    : Function properties for _Z3fooIfEvv\n"
             "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
             "ptxas info    : Used 128 registers, used 1 barriers, 1024 bytes smem, 380 bytes cmem[0]\n"
             "ptxas info    : Compiling entry function '_Z3barv' for 'sm_90'\n"
             "ptxas info    : Function properties for _Z3barv\n"
             "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
             "ptxas info    : Used 32 registers, 360 bytes cmem[0]\n")
    res = sass_report.parse_ptxas(ptxas)
    check(res == {"_Z3fooIfEvv": (128, 8, 4, 12, 1024), "_Z3barv": (32, 0, 0, 0, 0)}, f"ptxas -v parsed: {res}")
    sass = ("\t.text._Z3fooIfEvv:\n"
            "        /*0000*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;\n"
            "        /*0010*/                   HMMA.16816.F32.BF16 R8, R4, R12, R8 ;\n"
            "        /*0020*/              @!P0 LDG.E.U16 R1, desc[UR4][R2.64] ;\n"
            "        /*0030*/                   FFMA R1, R2, R3, R1 ;\n"
            "        /*0040*/               @P1 STL [R1], R2 ;\n"
            "        /*0050*/                   STG.E.EF.128 desc[UR4][R2.64], R4 ;\n"
            "        /*0060*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;\n"
            "\t.text._Z3barv:\n"
            "        /*0000*/                   LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64] ;\n"
            "        /*0010*/                   EXIT ;\n")
    ops = sass_report.parse_sass(sass)
    check(sum(ops["_Z3fooIfEvv"].values()) == 7 and sum(ops["_Z3barv"].values()) == 2,
          f"nvdisasm listing parsed per kernel, predicated ones too: {dict((k, dict(v)) for k, v in ops.items())}")
    info = ("\t.section\t.nv.info._Z3fooIfEvv,\"\",@\"SHT_CUDA_INFO\"\n"
            "\t//----- nvinfo : EIATTR_MAXREG_COUNT\n        /*001c*/ \t.byte\t0x03, 0x1b\n"
            "        /*001e*/ \t.short\t0x0080\n"
            "\t//----- nvinfo : EIATTR_MAX_THREADS\n\t.align\t\t4\n.L_23:\n        /*002c*/ \t.byte\t0x04, 0x05\n"
            "        /*002e*/ \t.short\t(.L_25 - .L_24)\n.L_24:\n        /*0030*/ \t.word\t0x00000100\n"
            "        /*0034*/ \t.word\t0x00000001\n        /*0038*/ \t.word\t0x00000001\n"
            "\t.section\t.nv.info._Z3barv,\"\",@\"SHT_CUDA_INFO\"\n"
            "\t//----- nvinfo : EIATTR_CBANK_PARAM_SIZE\n        /*003e*/ \t.short\t0x0008\n")
    threads = sass_report.parse_max_threads(info)
    check(threads == {"_Z3fooIfEvv": 256}, f"launch bounds from .nv.info (none for a kernel without): {threads}")
    # 128 registers × 32 lanes = 4096 a warp: 16 warps an SM, 2 CTAs of 8; 167 registers (→ 168 a lane):
    # 12 warps, 3 CTAs of 128 threads (slot_kernel); static shared memory and the CTA limit also bound it.
    for args, want in (((128, 256, 1024), 2), ((167, 128, 0), 3), ((32, 64, 0), 32), ((32, 128, 48 * 1024), 4)):
        got = sass_report.ctas_per_sm("sm_90", *args)
        check(got == want, f"CTAs per SM on sm_90 for (registers, threads, smem) {args}: {got}, expected {want}")
    check(sass_report.ctas_per_sm("sm_86", 32, 64, 0) == 16, "sm_86's limit of 16 CTAs per SM")
    check(sass_report.ctas_per_sm("sm_90", 128, None, 0) is None, "no launch bounds: no CTA count")
    table = sass_report.report(res, ops, r"^foo", threads, "sm_90") or ""
    row = next((line for line in table.splitlines() if line.startswith("foo<float>")), "")
    cols = row.split()
    # kernel, regs, spill, CTA threads, CTAs/SM (warps), instrs, HMMA, FFMA, LDG.128, LDG, STG.128, LDS,
    # LDGSTS, LDL+STL, BAR
    check(cols[1:] == ["128", "4/12", "256", "2", "(16w)", "7", "1", "1", "1", "1", "1", "0", "0", "1", "1"],
          f"table row for foo<float> (demangled, short name): {row!r}")
    check("bar" not in table, "--filter leaves the other kernel out")
    check(sass_report.short_name("void grun::cuda::fused::detail::k<grun::bfloat16, 4>(grun::x<int>, long)")
          == "k<bfloat16, 4>", "short names drop namespaces and the parameter list")
    script = os.path.join(ROOT, "benchmarks", "cuda", "sass_report.py")
    p = run([sys.executable, script, "--arch", "90"])
    check(p.returncode != 0 and "--arch expects sm_<number>" in p.stderr, f"a bad --arch is refused: {p.stderr.strip()!r}")
    p = run([sys.executable, script, "--cubin", "x.cubin"])
    check(p.returncode != 0 and "--cubin and --ptxas-log go together" in p.stderr,
          f"--cubin without --ptxas-log is refused: {p.stderr.strip()!r}")


{"no_gpu": test_no_gpu, "keys": test_keys, "table": test_table, "prebuilt": test_prebuilt, "slot": test_slot,
 "kernels": test_kernels, "sass": test_sass}[MODE]()
print(f"\n{len(failures)} failure(s)" if failures else "\nall checks hold")
sys.exit(1 if failures else 0)
