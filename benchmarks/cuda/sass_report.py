#!/usr/bin/env python3
"""What the fused kernels compile to, without a GPU: per kernel, ptxas's registers and spills and the
SASS instruction mix (nvdisasm) of bench_cuda's instantiations.

A static proxy, not a time: it says how many instructions a kernel's code holds, which of them are
tensor-core (HMMA), FMA, 16-byte global / shared / async-copy memory operations, and whether anything
went to local memory — what a change to a kernel did to its code, checked on a machine with nvcc and no
GPU. Counts are of the code, not of what runs (a loop's body counts once). Beside them: the CTA size
its __launch_bounds__ declare and how many such CTAs (and warps) one SM holds by registers, threads and
static shared memory — a kernel that also takes dynamic shared memory at launch (the staged and
pipelined ones) may fit fewer.

Usage:
  benchmarks/cuda/sass_report.py [--arch sm_90] [--filter REGEX] [--cubin FILE --ptxas-log FILE]
                                 [--nvdisasm PATH]

It compiles benchmarks/cuda/bench_cuda.cu to a cubin for --arch (about a minute, nvcc from $NVCC,
PATH or /usr/local/cuda/bin) unless --cubin and --ptxas-log (ptxas -v's output) are given. nvdisasm
comes from --nvdisasm, $NVDISASM, PATH or nvcc's folder; failing those, from PyPI's
nvidia-cuda-nvdisasm wheel, downloaded once into ~/.cache/grun/nvdisasm. --filter selects kernels by
their names as the table prints them (default: the fused intervention kernels' bf16
instantiations).
"""
import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DEFAULT_FILTER = r"^(forward|forward_tensor|coef|coef_tensor|slot|sum_slots)_kernel<bfloat16|^slot_tensor_kernel<"
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "grun", "nvdisasm")

# Columns: (heading, what counts). An opcode matches on its base name; widths are its suffixes.
COLUMNS = [
    ("HMMA", lambda op, sfx: op == "HMMA"),
    ("FFMA", lambda op, sfx: op == "FFMA"),
    ("LDG.128", lambda op, sfx: op == "LDG" and ".128" in sfx),
    ("LDG", lambda op, sfx: op == "LDG" and ".128" not in sfx),
    ("STG.128", lambda op, sfx: op == "STG" and ".128" in sfx),
    ("LDS", lambda op, sfx: op == "LDS"),
    ("LDGSTS", lambda op, sfx: op == "LDGSTS"),
    ("LDL+STL", lambda op, sfx: op in ("LDL", "STL")),
    ("BAR", lambda op, sfx: op == "BAR"),
]


def fail(message):
    sys.exit(f"sass_report.py: {message}")


def find_tool(name, explicit, env_var, near=None):
    for candidate in (explicit, os.environ.get(env_var), shutil.which(name),
                      os.path.join(near, name) if near else None, f"/usr/local/cuda/bin/{name}"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def nvdisasm_from_pypi():
    """nvdisasm from PyPI's nvidia-cuda-nvdisasm wheel, downloaded and unpacked once into CACHE."""
    for dirpath, _, files in os.walk(CACHE):
        if "nvdisasm" in files:
            return os.path.join(dirpath, "nvdisasm")
    os.makedirs(CACHE, exist_ok=True)
    print("sass_report.py: fetching nvdisasm (PyPI: nvidia-cuda-nvdisasm) into " + CACHE, file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        p = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            "nvidia-cuda-nvdisasm", "-d", tmp], capture_output=True, text=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if p.returncode != 0 or not wheels:
            fail("no nvdisasm on PATH or next to nvcc, and PyPI's nvidia-cuda-nvdisasm could not be fetched "
                 f"(pip: {p.stderr.strip()[-300:]!r}); pass --nvdisasm PATH")
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as z:
            members = [m for m in z.namelist() if m.endswith("/bin/nvdisasm")]
            if not members:
                fail(f"{wheels[0]} holds no bin/nvdisasm; pass --nvdisasm PATH")
            staging = CACHE + ".partial"
            shutil.rmtree(staging, ignore_errors=True)
            z.extract(members[0], staging)
            path = os.path.join(staging, members[0])
            os.chmod(path, 0o755)
            os.replace(path, os.path.join(CACHE, "nvdisasm"))  # appears whole or not at all
            shutil.rmtree(staging, ignore_errors=True)
    return os.path.join(CACHE, "nvdisasm")


def demangle(names):
    if not names:
        return []
    p = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    out = p.stdout.split("\n")
    return out[:len(names)] if p.returncode == 0 and len(out) >= len(names) else list(names)


def parse_ptxas(text):
    """ptxas -v's output → {mangled name: (registers, stack, spill stores, spill loads, static smem bytes)}."""
    resources = {}
    pattern = re.compile(r"Compiling entry function '(\w+)' for '\w+'\s*\n"
                         r"ptxas info\s*: Function properties for \w+\s*\n"
                         r"\s*(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\s*\n"
                         r"ptxas info\s*: Used (\d+) registers([^\n]*)")
    for m in pattern.finditer(text):
        smem = re.search(r"(\d+) bytes smem", m.group(6))
        resources[m.group(1)] = (int(m.group(5)), int(m.group(2)), int(m.group(3)), int(m.group(4)),
                                 int(smem.group(1)) if smem else 0)
    return resources


def parse_max_threads(text):
    """nvdisasm's full listing → {mangled name: threads per CTA its __launch_bounds__ declare}: the first
    word after EIATTR_MAX_THREADS in the kernel's .nv.info.<name> section (x; y and z follow)."""
    threads = {}
    parts = re.split(r"^\s*\.section\s+\.nv\.info\.(\w+),", text, flags=re.M)
    for name, body in zip(parts[1::2], parts[2::2]):
        m = re.search(r"EIATTR_MAX_THREADS\b.*?\.word\s+0x([0-9a-fA-F]+)", body, flags=re.S)
        if m:
            threads[name] = int(m.group(1), 16)
    return threads


# Per SM, by compute capability: registers, warps, CTAs, shared memory (bytes; each CTA also takes 1 KiB).
SM_LIMITS = {80: (65536, 64, 32, 167936), 86: (65536, 48, 16, 102400), 89: (65536, 48, 24, 102400),
             90: (65536, 64, 32, 233472)}


def ctas_per_sm(arch, regs, threads, smem):
    """CTAs of `threads` threads one SM of `arch` holds, by registers (allocated per warp in units of
    256), warps, its CTA limit and static shared memory (+1 KiB reserved per CTA); None if unknown."""
    if regs is None or not threads:
        return None
    major = int(re.sub(r"\D", "", arch))
    per_sm_regs, max_warps, max_ctas, max_smem = SM_LIMITS.get(major, SM_LIMITS[90])
    warps = -(-threads // 32)
    warp_regs = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (per_sm_regs // warp_regs) // warps
    by_smem = max_smem // (smem + 1024) if smem else max_ctas
    return min(by_regs, max_warps // warps, max_ctas, by_smem)


def parse_sass(text):
    """nvdisasm -c's output → {mangled name: Counter of (opcode, suffixes)} per kernel's .text section."""
    kernels = {}
    parts = re.split(r"^\s*\.text\.(\w+):\s*$", text, flags=re.M)
    instruction = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)")
    for name, body in zip(parts[1::2], parts[2::2]):
        kernels[name] = collections.Counter(instruction.findall(body))
    return kernels


def short_name(demangled):
    """The kernel's name and template arguments, namespaces and the parameter list dropped."""
    s = re.sub(r"\b(grun|cuda|fused|detail|mlp_gate)::", "", demangled)
    s = re.sub(r"^void ", "", s)
    depth = 0
    for i, ch in enumerate(s):  # cut at the parameter list's '(' (outside template brackets)
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            return s[:i]
    return s


def report(resources, kernels, pattern, threads=None, arch="sm_90"):
    names = sorted(set(resources) | set(kernels))
    threads = threads or {}
    rows = []
    for mangled, demangled in zip(names, demangle(names)):
        if not re.search(pattern, short_name(demangled)):
            continue
        ops = kernels.get(mangled, collections.Counter())
        counts = [sum(n for (op, sfx), n in ops.items() if test(op, sfx)) for _, test in COLUMNS]
        regs, stack, spill_st, spill_ld, smem = resources.get(mangled, (None, None, None, None, 0))
        t = threads.get(mangled)
        ctas = ctas_per_sm(arch, regs, t, smem)
        fit = "-" if ctas is None else f"{ctas} ({ctas * -(-t // 32)}w)"
        rows.append((short_name(demangled), regs, spill_st, spill_ld, t, fit, sum(ops.values()), counts))
    if not rows:
        return None
    width = max(len(r[0]) for r in rows)
    head = (f"{'kernel':<{width}}  regs  spill st/ld  CTA thr   CTAs/SM  instrs "
            + " ".join(f"{c:>7}" for c, _ in COLUMNS))
    lines = [head, "-" * len(head)]
    for name, regs, st, ld, t, fit, total, counts in rows:
        spill = "-" if st is None else f"{st}/{ld}"
        lines.append(f"{name:<{width}}  {'-' if regs is None else regs:>4}  {spill:>11}  {'-' if not t else t:>7}  "
                     f"{fit:>8}  {total:>6} " + " ".join(f"{c:>7}" for c in counts))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="sm_90", help="the SASS architecture (default sm_90)")
    ap.add_argument("--filter", default=DEFAULT_FILTER, help="regex over the kernel names the table prints")
    ap.add_argument("--cubin", help="a cubin already compiled (with --ptxas-log)")
    ap.add_argument("--ptxas-log", help="ptxas -v's output for --cubin")
    ap.add_argument("--nvdisasm", help="the nvdisasm to use")
    args = ap.parse_args()
    if not re.fullmatch(r"sm_\d+a?", args.arch):
        fail(f"--arch expects sm_<number> (e.g. sm_90), got {args.arch!r}")
    if bool(args.cubin) != bool(args.ptxas_log):
        fail("--cubin and --ptxas-log go together (the registers come from ptxas -v's log)")
    for what, path in (("--cubin", args.cubin), ("--ptxas-log", args.ptxas_log)):
        if path and not os.path.isfile(path):
            fail(f"{what} expects an existing file, got {path!r}")

    nvcc = find_tool("nvcc", None, "NVCC")
    with tempfile.TemporaryDirectory() as tmp:
        if args.cubin:
            cubin = args.cubin
            with open(args.ptxas_log, encoding="utf-8") as f:
                log = f.read()
        else:
            if nvcc is None:
                fail("nvcc not found ($NVCC, PATH, /usr/local/cuda/bin); or pass --cubin and --ptxas-log")
            cubin = os.path.join(tmp, "bench_cuda.cubin")
            cmd = [nvcc, "-I" + os.path.join(ROOT, "include"), "-I" + os.path.join(ROOT, "kernels"), "-O3", "-DNDEBUG",
                   f"-arch={args.arch}", "-std=c++20", "--expt-relaxed-constexpr", "-cubin", "-Xptxas", "-v",
                   os.path.join(HERE, "bench_cuda.cu"), "-o", cubin]
            print(f"sass_report.py: compiling bench_cuda.cu for {args.arch} (about a minute)", file=sys.stderr)
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                fail(f"nvcc failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
            log = p.stderr
        near = os.path.dirname(nvcc) if nvcc else None  # a toolkit's nvdisasm sits beside its nvcc
        nvdisasm = find_tool("nvdisasm", args.nvdisasm, "NVDISASM", near) or nvdisasm_from_pypi()
        listings = []
        for flags in (["-c"], []):  # the code; then everything, for the launch bounds in .nv.info
            p = subprocess.run([nvdisasm, *flags, cubin], capture_output=True, text=True)
            if p.returncode != 0:
                fail(f"{nvdisasm} {' '.join(flags)} {cubin} failed (exit {p.returncode}): {p.stderr.strip()[-500:]}")
            listings.append(p.stdout)
        table = report(parse_ptxas(log), parse_sass(listings[0]), args.filter, parse_max_threads(listings[1]), args.arch)
    if table is None:
        fail(f"no kernel matches --filter {args.filter!r}")
    print(f"# {args.arch}, bench_cuda.cu's instantiations; counts are of the code (a loop body once), not of what runs;")
    print("# CTAs/SM: by registers, threads and static shared memory (w: warps), before any dynamic shared memory")
    print(table)


if __name__ == "__main__":
    main()
