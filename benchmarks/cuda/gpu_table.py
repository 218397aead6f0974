#!/usr/bin/env python3
"""The one table benchmarks/gpu_check.sh prints: grun's CUDA timings beside PyTorch's, against issue 4's targets.

Usage: gpu_table.py RESULTS_FILE        (gpu_check.sh --table-only RESULTS_FILE does the same)
       gpu_table.py --fastest-flags RESULTS_FILE
                                        bench_cuda's options that make the fastest measured schedules
                                        of the loreft4 forward and fwd+bwd the run's defaults (nothing
                                        when the defaults are the fastest): gpu_slot.sh times the
                                        target rows again with them, in the same call

RESULTS_FILE is what gpu_check.sh collects from bench_cuda and torch_reference.py, one item a line:
  RESULT <key> <ms> [<bytes>]   a timing; bytes = the minimal traffic (read + write) of grun's computation.
                                torch_reference.py's keys are grun's plus _eager / _compile / _liger.
  FAILED <key> <what>           a row bench_cuda could not time (an opt-in schedule that threw): shown
                                in its place, with what it said.
  DEVICE <name>                 the GPU bench_cuda ran on           SMI <name, memory, driver> (nvidia-smi)
  SCHEDULES forward=… coef=… slot=… fwdbwd=… defaults forward=… …
                                the schedules bench_cuda's default rows ran, and the library's defaults
  OPTIONS <key> <options…>      the bench_cuda options that make schedule row <key>'s configuration the
                                run's default (--fastest-flags reads them)
  TORCH <version on gpu>        LIGER <version>                     NOTE <text>   (printed as given)
  PHASE <name> <seconds>        gpu_check.sh's phases               MODE quick    (--quick sizes)
Unknown lines are ignored, so a log can be fed as it is.

The copy bandwidth is bench_cuda's cudaMemcpy device to device of the same run (copy_d2d: one read + one
write counted), so "% copy" compares like with like on whatever GPU ran it. Issue 4's targets (H100):
  fwd     the fused forward moves its minimal bytes at >= 70% of copy bandwidth;
  fwdbwd  the fused forward + backward is >= 5x faster than PyTorch eager of the same math;
  rw      NLL (and KL) forward + backward take <= 2x the time of one read + one write of their bytes
          at copy bandwidth.
"""
import math
import sys

# (key, label, target kind). The labels carry the full-size runs' sizes (MODE quick says when they don't apply).
ROWS = [
    ("intervention_linear_loreft4_fwd", "fused fwd linear+loreft4 d=4096 T=16384 bf16", "fwd"),
    ("intervention_linear_loreft4_fwd_inplace", "  same, in place (out = h)", "fwd"),
    ("intervention_linear_loreft4_fwd_stream", "  same, stream schedule (not the default)", ""),
    ("intervention_linear_loreft4_fwd_resident", "  same, resident schedule (rows in registers)", ""),
    ("intervention_linear_loreft4_fwd_staged", "  same, staged schedule (cp.async tile)", ""),
    ("intervention_linear_loreft4_fwd_tensor", "  same, tensor schedule (not the default)", ""),
    ("intervention_linear_loreft4_fwd_tensor_apply", "  same, tensor, h' written on tensor cores", ""),
    ("intervention_linear_loreft4_fwd_tensor_pipelined", "  same, tensor, tiles double-buffered (cp.async)", ""),
    ("intervention_linear_loreft4_fwdbwd", "fused fwd+bwd linear+loreft4 (same sizes)", "fwdbwd"),
    ("intervention_linear_loreft4_fwdbwd_resident", "  same, forward and coef kernel resident", ""),
    ("intervention_linear_loreft4_fwdbwd_slots128", "  same, slot kernel with at most 128 slots", ""),
    ("intervention_linear_loreft4_fwdbwd_slots256", "  same, slot kernel with at most 256 slots", ""),
    ("intervention_linear_loreft4_fwdbwd_slot_tensor", "  same, slot kernel on tensor cores", ""),
    ("intervention_linear_loreft4_fwdbwd_coef_tensor", "  same, coefficient kernel on tensor cores", ""),
    ("intervention_linear_loreft4_fwdbwd_tensor", "  same, both backward kernels on tensor cores", ""),
    ("intervention_linear_loreft4_fwdbwd_saved", "  same, backward from the forward's saved e, z", ""),
    ("intervention_linear_loreft4_fwdbwd_coef_tensor_saved", "  same, saved + coef kernel on tensor cores", ""),
    ("intervention_linear_loreft4_fwdbwd_tensor_saved", "  same, saved + both bwd kernels on tensor cores", ""),
    ("intervention_linear_loreft4_fwdbwd_pipelined_tensor_saved", "  same, saved + tensor bwd + pipelined fwd", ""),
    ("intervention_linear_direft4_fwd", "fused fwd linear+direft4 d=4096 T=16384 bf16", "fwd"),
    ("intervention_linear_direft4_fwd_inplace", "  same, in place (out = h)", "fwd"),
    ("intervention_linear_direft4_fwd_stream", "  same, stream schedule (not the default)", ""),
    ("intervention_linear_direft4_fwd_resident", "  same, resident schedule (rows in registers)", ""),
    ("intervention_linear_direft4_fwd_staged", "  same, staged schedule (cp.async tile)", ""),
    ("intervention_linear_direft4_fwd_tensor", "  same, tensor schedule (not the default)", ""),
    ("intervention_linear_direft4_fwd_tensor_apply", "  same, tensor, h' written on tensor cores", ""),
    ("intervention_linear_direft4_fwd_tensor_pipelined", "  same, tensor, tiles double-buffered (cp.async)", ""),
    ("intervention_linear_direft4_fwdbwd", "fused fwd+bwd linear+direft4 (same sizes)", "fwdbwd"),
    ("intervention_linear_direft4_fwdbwd_resident", "  same, forward and coef kernel resident", ""),
    ("intervention_linear_direft4_fwdbwd_slots128", "  same, slot kernel with at most 128 slots", ""),
    ("intervention_linear_direft4_fwdbwd_slots256", "  same, slot kernel with at most 256 slots", ""),
    ("intervention_linear_direft4_fwdbwd_slot_tensor", "  same, slot kernel on tensor cores", ""),
    ("intervention_linear_direft4_fwdbwd_coef_tensor", "  same, coefficient kernel on tensor cores", ""),
    ("intervention_linear_direft4_fwdbwd_tensor", "  same, both backward kernels on tensor cores", ""),
    ("intervention_linear_direft4_fwdbwd_saved", "  same, backward from the forward's saved e, z", ""),
    ("intervention_linear_direft4_fwdbwd_coef_tensor_saved", "  same, saved + coef kernel on tensor cores", ""),
    ("intervention_linear_direft4_fwdbwd_tensor_saved", "  same, saved + both bwd kernels on tensor cores", ""),
    ("intervention_linear_direft4_fwdbwd_pipelined_tensor_saved", "  same, saved + tensor bwd + pipelined fwd", ""),
    ("intervention_linear_loreft4_generic_fwd", "generic fwd linear+loreft4 T=1024 (fallback)", ""),
    ("intervention_linear_loreft4_generic_fwdbwd", "generic fwd+bwd linear+loreft4 T=1024", ""),
    ("intervention_linear_loreft4_T4096_fwd", "  fused fwd linear+loreft4 at T=4096 (scaling)", ""),
    ("intervention_linear_loreft4_T4096_fwd_inplace", "  same, in place", ""),
    ("intervention_linear_loreft4_T4096_fwdbwd", "  fused fwd+bwd at T=4096", ""),
    ("intervention_linear_loreft4_T65536_fwd", "  fused fwd linear+loreft4 at T=65536 (scaling)", ""),
    ("intervention_linear_loreft4_T65536_fwd_inplace", "  same, in place", ""),
    ("intervention_linear_loreft4_T65536_fwdbwd", "  fused fwd+bwd at T=65536", ""),
    ("intervention_mlp_loreft4_fwd", "mlp<256,64>+loreft4 fwd (cuBLASLt) T=16384", ""),
    ("intervention_mlp_loreft4_fwd_inplace", "  same, in place (out = h)", ""),
    ("intervention_mlp_loreft4_fwdbwd", "mlp<256,64>+loreft4 fwd+bwd (cuBLASLt) T=16384", "fwdbwd"),
    ("intervention_mlp_loreft4_fwdbwd_saved", "  same, backward from saved activations", ""),
    ("intervention_linear_loreft4_householder_fwd", "householder R: fused fwd linear+loreft4 T=16384", ""),
    ("intervention_linear_loreft4_householder_fwd_inplace", "  same, in place (out = h)", ""),
    ("intervention_linear_loreft4_householder_fwdbwd", "  same, fwd+bwd (R's pullback included)", ""),
    ("intervention_user_gate_loreft4_fwd", "user's gate (row math)+fused loreft4 fwd T=16384", ""),
    ("intervention_user_gate_loreft4_fwd_inplace", "  same, in place (out = h)", ""),
    ("intervention_user_gate_loreft4_fwdbwd", "  same, fwd+bwd", ""),
    ("nll_fwd", "NLL fwd T=8192 V=131072 bf16", ""),
    ("nll_fwdbwd", "NLL fwd+bwd T=8192 V=131072 bf16", "rw"),
    ("kl_fwd", "KL fwd T=8192 V=131072 bf16", ""),
    ("kl_fwdbwd", "KL fwd+bwd T=8192 V=131072 bf16", "rw"),
    ("rmu_retain_fwdbwd", "RMU retain MSE fwd+bwd P=16384 d=4096 bf16", ""),
    ("npo_b64", "NPO B=64 (1 block, value back to host)", ""),
    ("gate_bce_g16384", "gate BCE G=16384 (1 block, value back)", ""),
    ("adamw_mlp_loreft4", "AdamW mlp+loreft4 d=4096 (1 launch)", ""),
]
TARGETS = {"fwd": "≥70% copy BW", "fwdbwd": "≥5× eager", "rw": "≤2× read+write"}
# Keys that are not rows of the main table: the yardstick and the cross-entropy comparison.
OTHER_KEYS = ["copy_d2d", "copy_d2d_torch", "nll_fwd_liger", "nll_fwdbwd_liger"]

NAN = float("nan")


def parse(lines):
    r = {"ms": {}, "bytes": {}, "failed": {}, "options": {}, "schedules": None, "device": None, "smi": None, "torch": None, "liger": None, "notes": [],
         "phases": [], "quick": False}
    for line in lines:
        p = line.split()
        if not p:
            continue
        rest = line.strip()[len(p[0]):].strip()
        if p[0] == "RESULT" and len(p) >= 3:
            try:
                r["ms"][p[1]] = float(p[2])
                if len(p) > 3:
                    r["bytes"][p[1]] = float(p[3])
            except ValueError:
                r["notes"].append(f"unreadable line: {line.strip()}")
        elif p[0] == "FAILED" and len(p) >= 2:
            r["failed"][p[1]] = line.strip().split(None, 2)[2] if len(p) > 2 else "(no message)"
        elif p[0] == "OPTIONS" and len(p) >= 2:
            r["options"][p[1]] = p[2:]
        elif p[0] == "SCHEDULES" and "defaults" in p:
            cut = p.index("defaults")
            ran = dict(kv.split("=", 1) for kv in p[1:cut] if "=" in kv)
            lib = dict(kv.split("=", 1) for kv in p[cut + 1:] if "=" in kv)
            r["schedules"] = (ran, lib)
        elif p[0] == "DEVICE":
            r["device"] = rest
        elif p[0] == "SMI":
            r["smi"] = rest
        elif p[0] == "TORCH":
            r["torch"] = rest
        elif p[0] == "LIGER":
            r["liger"] = rest
        elif p[0] == "NOTE":
            r["notes"].append(rest)
        elif p[0] == "PHASE" and len(p) == 3:
            r["phases"].append((p[1], float(p[2])))
        elif p[0] == "MODE" and "quick" in p[1:]:
            r["quick"] = True
    return r


def copy_bandwidth_gbs(r):
    """GB/s of bench_cuda's device-to-device copy (read + write bytes over time); nan when absent."""
    t, b = r["ms"].get("copy_d2d"), r["bytes"].get("copy_d2d")
    return b / t / 1e6 if t and b else NAN


def verdict(kind, pct_copy, rw_ratio, eager_speedup):
    """(status, text) of one row against issue 4's target: status MET, MISSED or NOT MEASURED; None without a target."""
    if not kind:
        return None, ""
    value = {"fwd": pct_copy, "fwdbwd": eager_speedup, "rw": rw_ratio}[kind]
    if value is None or math.isnan(value):
        return "NOT MEASURED", f"{TARGETS[kind]}: not measured"
    met = value >= 70 if kind == "fwd" else value >= 5 if kind == "fwdbwd" else value <= 2
    return ("MET" if met else "MISSED"), f"{TARGETS[kind]}: {'MET' if met else 'MISSED'}"


def shorten(text, width=70):
    """text on one line, cut to width characters (the whole of it goes in the notes)."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def fmt(v, width, digits=3, suffix=""):
    return f"{'-':>{width}}" if v is None or math.isnan(v) else f"{v:{width - len(suffix)}.{digits}f}{suffix}"


def schedule_rows(ms, key):
    """The measured schedule rows of target row `key`: <key>_<schedule>, its in-place row aside."""
    return [k for k, _, _ in ROWS if k.startswith(key + "_") and k != key + "_inplace" and k in ms]


def fastest_schedule(ms, key):
    """The fastest of schedule_rows(ms, key) where it beats the default row `key`; else None."""
    best = min(schedule_rows(ms, key), key=lambda k: ms[k], default=None)
    return best if best is not None and ms[best] and ms[best] < ms[key] else None


def fastest_schedules(r, copy):
    """Lines naming, for each forward / fwd+bwd target row, its fastest other schedule (the rows keyed
    <target key>_<schedule>, in place aside) when that beats the default, with where the target would
    stand if it were the default: what to make the default next. The verdicts above count defaults only."""
    ms, nbytes = r["ms"], r["bytes"]
    lines = []
    for key, label, kind in ROWS:
        if kind not in ("fwd", "fwdbwd") or key not in ms:
            continue
        if not schedule_rows(ms, key):
            continue
        best = fastest_schedule(ms, key)
        if best is None:
            lines.append(f"  {label:48} the default is the fastest measured schedule")
            continue
        t = ms[best]
        if kind == "fwd":
            b = nbytes.get(key, 0.0)
            value = 100 * b / t / 1e6 / copy if b else NAN
            detail = f"{fmt(value, 5, 1).strip()}% of copy BW"
        else:
            eager = ms.get(key + "_eager")
            value = eager / t if eager else NAN
            detail = f"{fmt(value, 5, 2).strip()}× faster than eager" if eager else "no eager timing"
        status, _ = verdict(kind, value, NAN, value)
        lines.append(f"  {label:48} {best[len(key) + 1:]}: {t:.3f} ms, {ms[key] / t:.2f}× the default's speed, "
                     f"{detail} ({status} if it were the default)")
    if lines:
        lines = ["", "Fastest other schedule per target row (opt-in; the targets above count the defaults):"] + lines
    return lines


FASTEST_OF = "intervention_linear_loreft4"  # the target rows decide (one set of options per run)


def fastest_flags(r):
    """bench_cuda options that make the fastest measured configuration of FASTEST_OF's forward and of its
    fwd+bwd the run's defaults: the fastest forward's --schedule (none: the default's), and the fastest
    fwd+bwd row's backward options (--coef-schedule, --slot-schedule, --slots, --saved; its forward schedule
    gives way to the fastest forward's, which its forward also runs). Each row's options are its
    OPTIONS line's, as bench_cuda printed them; a row without one cannot be made the default and is
    passed over (said on stderr). Empty when the defaults are the fastest."""
    ms, options = r["ms"], r["options"]

    def fastest(kind):
        key = f"{FASTEST_OF}_{kind}"
        if key not in ms:
            return []
        unset = [k for k in schedule_rows(ms, key) if k not in options]
        if unset:
            print(f"gpu_table.py: no OPTIONS line for {', '.join(unset)}: passed over", file=sys.stderr)
        best = fastest_schedule({k: v for k, v in ms.items() if k not in unset}, key)
        return list(options[best]) if best else []

    fwd, flags = fastest("fwd"), fastest("fwdbwd")
    if "--schedule" in flags:
        i = flags.index("--schedule")
        del flags[i:i + 2]
    return fwd + flags


def render(r):
    out = []
    ms, nbytes = r["ms"], r["bytes"]
    copy = copy_bandwidth_gbs(r)
    gpu = r["device"] or (r["smi"].split(",")[0] if r["smi"] else "? (no DEVICE line: bench_cuda did not run)")
    out.append("")
    out.append(f"GPU: {gpu}" + (f"   [nvidia-smi: {r['smi']}]" if r["smi"] else ""))
    torch_copy = ms.get("copy_d2d_torch")
    out.append(f"copy bandwidth (bench_cuda cudaMemcpy D2D, read+write): {fmt(copy, 6, 0).strip()} GB/s"
               + (f"   (torch copy_ of the same size: {fmt(nbytes['copy_d2d'] / torch_copy / 1e6, 6, 0).strip()} GB/s)"
                  if torch_copy and "copy_d2d" in nbytes else ""))
    out.append(f"PyTorch: {r['torch'] or 'not run'}" + (f"   Liger: {r['liger']}" if r["liger"] else ""))
    if r["schedules"]:
        ran, lib = r["schedules"]
        spell = lambda d: ", ".join(f"{k} {v}" for k, v in d.items())
        out.append(f"schedules of the default rows: {spell(ran)}"
                   + ("  (the library's defaults)" if ran == lib else f"  (bench_cuda options; the library's defaults: {spell(lib)})"))
    if r["quick"]:
        out.append("MODE quick: smaller sizes than the labels say; the targets are for the full sizes")
    out.append("")

    hdr = (f"{'computation':48} {'grun ms':>9} {'GB/s':>7} {'% copy':>7} {'×(r+w)':>7} {'eager ms':>9} "
           f"{'eager/grun':>10} {'compile ms':>10} {'comp/grun':>9}  target")
    out.append(hdr)
    out.append("-" * len(hdr))
    verdicts = []  # (status, row name, detail)
    parent = ""
    for key, label, kind in ROWS:
        name = f"{parent}, in place" if label.startswith(" ") else label
        parent = parent if label.startswith(" ") else label
        if key not in ms:
            failed = r["failed"].get(key)
            if failed is not None:
                out.append(f"{label:48} FAILED: {shorten(failed)}")
            if kind:
                verdicts.append(("NOT MEASURED", name, f"FAILED: {shorten(failed)}" if failed else "no grun result"))
            continue
        t, b = ms[key], nbytes.get(key, 0.0)
        gbs = b / t / 1e6 if t and b else NAN
        pct = 100 * gbs / copy
        rw = t / (b / copy / 1e6) if kind == "rw" and b and not math.isnan(copy) else NAN
        eager, comp = ms.get(key + "_eager"), ms.get(key + "_compile")
        speedup = eager / t if eager is not None and t else None
        status, text = verdict(kind, pct, rw, speedup)
        ratio = lambda v: fmt(None if v is None else v / t, 10, 2, "×")
        out.append(f"{label:48} {fmt(t, 9)} {fmt(gbs, 7, 0)} {fmt(pct, 7, 1, '%')} {fmt(rw, 7, 2)} {fmt(eager, 9)} "
                   f"{ratio(eager)} {fmt(comp, 10)} {ratio(comp):>9}  {text}".rstrip())
        if status:
            detail = {"fwd": f"{fmt(pct, 5, 1).strip()}% of copy BW",
                      "fwdbwd": f"{fmt(speedup, 5, 2).strip()}× faster than eager",
                      "rw": f"{fmt(rw, 5, 2).strip()}× the read+write time"}[kind]
            verdicts.append((status, name, detail))

    # Cross entropy: grun beside every reference of the same computation, each ratio = reference / grun.
    ce = [("grun token_nll (exec::cuda, bf16 logits)", "nll_fwd", "nll_fwdbwd"),
          ("PyTorch F.cross_entropy eager (logits.float())", "nll_fwd_eager", "nll_fwdbwd_eager"),
          ("PyTorch torch.compile of the same", "nll_fwd_compile", "nll_fwdbwd_compile"),
          ("Liger LigerCrossEntropyLoss (bf16 logits)", "nll_fwd_liger", "nll_fwdbwd_liger")]
    if any(k in ms for _, f, fb in ce for k in (f, fb)):
        out.append("")
        h2 = f"{'cross entropy, NLL size (sum over tokens)':48} {'fwd ms':>9} {'×grun':>8} {'fwd+bwd ms':>11} {'×grun':>8}"
        out.append(h2)
        out.append("-" * len(h2))
        g_f, g_fb = ms.get("nll_fwd"), ms.get("nll_fwdbwd")
        for label, kf, kfb in ce:
            f, fb = ms.get(kf), ms.get(kfb)
            rel = lambda v, g: fmt(None if v is None or not g else v / g, 8, 2, "×")
            if f is None and fb is None:
                why = "not installed / not importable" if kf.endswith("liger") else "not run"
                out.append(f"{label:48} {why}")
                continue
            out.append(f"{label:48} {fmt(f, 9)} {rel(f, g_f)} {fmt(fb, 11)} {rel(fb, g_fb)}")

    # Keys without a row (a benchmark added without one here): shown, not lost. tests/gpu_check flags them.
    row_keys = {k for k, _, _ in ROWS}
    known = row_keys | {k + v for k in row_keys for v in ("_eager", "_compile")} | set(OTHER_KEYS)
    extra = [k for k in ms if k not in known]
    failed_extra = [k for k in r["failed"] if k not in row_keys]
    if extra or failed_extra:
        out.append("")
        out.append("other results (no row in gpu_table.py yet):")
        for k in extra:
            b = nbytes.get(k, 0.0)
            out.append(f"  {k:46} {fmt(ms[k], 9)} ms" + (f" {fmt(b / ms[k] / 1e6, 7, 0)} GB/s" if b and ms[k] else ""))
        for k in failed_extra:
            out.append(f"  {k:46} FAILED: {shorten(r['failed'][k])}")

    out.append("")
    counts = {s: sum(1 for v in verdicts if v[0] == s) for s in ("MET", "MISSED", "NOT MEASURED")}
    out.append(f"Issue 4 targets: {counts['MET']} MET, {counts['MISSED']} MISSED, {counts['NOT MEASURED']} not measured")
    for status, label, detail in verdicts:
        out.append(f"  {status:12} {label:56} {detail}")
    out.extend(fastest_schedules(r, copy))
    notes = list(r["notes"])
    if r["failed"]:
        notes.append(f"{len(r['failed'])} row(s) FAILED; what each said, whole:")
        notes.extend(f"  {k}: {v}" for k, v in r["failed"].items())
    if notes:
        out.append("")
        out.append("Notes:")
        out.extend(f"  {n}" for n in notes)
    if r["phases"]:
        out.append("")
        out.append("Phases: " + ", ".join(f"{name} {sec:.0f} s" for name, sec in r["phases"])
                   + f"  (total {sum(s for _, s in r['phases']):.0f} s)")
    return "\n".join(out)


def main(argv):
    flags = len(argv) == 3 and argv[1] == "--fastest-flags"
    if len(argv) != 2 and not flags:
        print("\n".join(__doc__.strip().splitlines()[2:4]), file=sys.stderr)
        return 2
    with open(argv[-1], encoding="utf-8", errors="replace") as f:
        r = parse(f)
    print(" ".join(fastest_flags(r)) if flags else render(r))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
