#!/usr/bin/env python3
"""bench_cuda on the CPU emulation, before a GPU slot has to find out (ctest emulated_bench_cuda_smoke).

Usage: bench_smoke.py EMULATED_BENCH_CUDA GPU_TABLE_PY

Runs `bench_cuda --smoke` (every benchmark and schedule at the GPU run's d and V, a few rows, timed
once) and checks that it exits 0 and prints a RESULT for every row of gpu_table.py's table that the
smoke sizes cover (all but the T-scaling rows, which --smoke skips, as --quick does; of the forward
schedules, all but the run's default), each a finite, non-negative time with its bytes; then renders
the table from that output, as gpu_check.sh would. Also: every schedule row has an OPTIONS line,
--schedule changes the default (its row goes, the others come), --coef-schedule / --slot-schedule /
--slots / --saved change the backward's (named on the SCHEDULES line; given as a schedule row's
OPTIONS line says), --only limits the run to the names given, --profile brackets one more call of
each row named with cudaProfilerStart / cudaProfilerStop, a bad --schedule or argument is refused with
exit 2 and a message, and an opt-in row made to fail (--fail-row) is reported as FAILED while the rows
after it still run. The timings are host time under the emulation and are not looked at.
"""
import importlib.util
import math
import re
import subprocess
import sys

SCALING = ("_T4096", "_T65536")  # the scaling rows: full sizes only


def run(bench, *args):
    p = subprocess.run([bench, *args], capture_output=True, text=True, timeout=1500)
    return p.returncode, p.stdout, p.stderr


def main(argv):
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    bench, table_py = argv[1], argv[2]
    spec = importlib.util.spec_from_file_location("gpu_table", table_py)
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    problems = []

    rc, out, err = run(bench, "--smoke")
    if rc != 0:
        print(out, err, sep="\n")
        print(f"FAIL: bench_cuda --smoke exited {rc}, expected 0", file=sys.stderr)
        return 1
    r = table.parse(out.splitlines())
    if not r["device"]:
        problems.append("no DEVICE line")
    # Every row of the table but the T-scaling rows and, of the forward schedules, the run's default
    # (timed as _fwd; the SCHEDULES line names it), so that a flipped default needs no edit here.
    if not r["schedules"]:
        problems.append("no SCHEDULES line")
    default_row = "_fwd_" + (r["schedules"] or ({}, {}))[0].get("forward", "?")
    expected = ["copy_d2d"] + [key for key, _, _ in table.ROWS
                               if not any(s in key for s in SCALING) and not key.endswith(default_row)]
    for key in expected:
        if key not in r["ms"]:
            problems.append(f"no RESULT for {key}")
        elif not (math.isfinite(r["ms"][key]) and r["ms"][key] >= 0) or key not in r["bytes"]:
            problems.append(f"RESULT {key}: time {r['ms'][key]} or its bytes unusable")
    # Every schedule row of a target row says which options make it the default (--fastest-flags reads them).
    for key, _, kind in table.ROWS:
        for row in table.schedule_rows(r["ms"], key) if kind in ("fwd", "fwdbwd") else []:
            if not r["options"].get(row, [])[:1] == ["--schedule"]:
                problems.append(f"{row}: no OPTIONS line naming its schedules (got {r['options'].get(row)})")
    unexpected = [k for k in r["ms"] if k not in expected]
    if unexpected:
        problems.append(f"RESULTs without a smoke row: {', '.join(unexpected)}")
    print("bench_cuda --smoke on the CPU emulation: the sizes are not the labels', the times are host time,")
    print("the verdicts below mean nothing; what is checked is that every row is there.")
    print(table.render(r))

    rc, out, err = run(bench, "--smoke", "--schedule", "staged", "--only",
                       "intervention_linear_direft4,intervention_schedules")
    keys = set(table.parse(out.splitlines())["ms"])
    name = "intervention_linear_direft4"
    if rc != 0 or name + "_fwd_staged" in keys or not {name + "_fwd_stream", name + "_fwd_resident",
                                                         name + "_fwd_tensor"} <= keys:
        problems.append(f"--schedule staged: exit {rc}, RESULTs {sorted(keys)} (expected the stream, resident and "
                        "tensor rows, not the staged one)")
    # The backward's schedules and the backward from kept values as the run's defaults, through the
    # options the first run printed for its row that has them all (as gpu_slot.sh's second pass gives
    # them): the SCHEDULES line names them beside the library's, and _fwdbwd is then the kept path (no
    # _fwdbwd_saved twice).
    options = r["options"].get(name + "_fwdbwd_pipelined_tensor_saved", [])
    rc, out, err = run(bench, "--smoke", "--only", name, *options)
    parsed = table.parse(out.splitlines())
    ran, lib = parsed["schedules"] or ({}, {})
    if rc != 0 or ran.get("forward") != "tensor_pipelined" or ran.get("coef") != "tensor" or ran.get("slot") != "tensor" \
            or ran.get("fwdbwd") != "saved" or lib.get("coef") == "tensor" or name + "_fwdbwd" not in parsed["ms"] \
            or name + "_fwdbwd_saved" in parsed["ms"]:
        problems.append(f"{' '.join(options)}: exit {rc}, SCHEDULES {parsed['schedules']}, RESULTs {sorted(parsed['ms'])}; "
                        "expected the pipelined forward, both backward kernels on tensor cores, from kept values")
    # The slot count likewise: a row's --slots N makes N the run's slot_limit (SCHEDULES slots=N).
    slot_row = "intervention_linear_loreft4_fwdbwd_slots128"
    options = r["options"].get(slot_row, [])
    rc, out, err = run(bench, "--smoke", "--only", "intervention_linear_loreft4", *options)
    ran, lib = table.parse(out.splitlines())["schedules"] or ({}, {})
    if "--slots" not in options or options[options.index("--slots") + 1:][:1] != ["128"] or rc != 0 \
            or ran.get("slots") != "128" or lib.get("slots") != "512":
        problems.append(f"{slot_row}: OPTIONS {options}, then exit {rc} and SCHEDULES {ran} defaults {lib}; "
                        "expected --slots 128 and a run with slots=128 (the library's 512)")
    # An opt-in row that throws: reported as FAILED in its place, the rows after it still run, exit 1.
    failing = "intervention_linear_loreft4_fwd_tensor_pipelined"
    rc, out, err = run(bench, "--smoke", "--only", "intervention_schedules", "--fail-row", failing)
    parsed = table.parse(out.splitlines())
    after = "intervention_linear_direft4_fwdbwd_pipelined_tensor_saved"
    if rc != 1 or failing not in parsed["failed"] or failing in parsed["ms"] or after not in parsed["ms"] \
            or "FAILED" not in err:
        problems.append(f"--fail-row {failing}: exit {rc}, FAILED {sorted(parsed['failed'])}, stderr {err.strip()!r}; "
                        f"expected exit 1, that row FAILED and the rows after it ({after}) timed")
    # --profile: each row named runs its call once more between cudaProfilerStart and cudaProfilerStop
    # (the emulated runtime says how many grids ran in between: the call's, not none), and says so; a
    # name no row of the run has is refused.
    profiled = ["intervention_mlp_loreft4_fwdbwd", "intervention_linear_loreft4_fwdbwd_saved"]
    rc, out, err = run(bench, "--smoke", "--only", "intervention_linear_loreft4,intervention_mlp_loreft4",
                       "--profile", ",".join(profiled))
    said = [line.split()[1] for line in out.splitlines() if line.startswith("PROFILED ")]
    grids = [int(n) for n in re.findall(r"cudaProfilerStop: (\d+) grids ran since cudaProfilerStart", err)]
    if rc != 0 or sorted(said) != sorted(profiled) or len(grids) != 2 or min(grids) < 4:
        problems.append(f"--profile {','.join(profiled)}: exit {rc}, PROFILED {said}, grids between start and stop "
                        f"{grids}; expected exit 0, both rows profiled, each call's grids (≥ 4) between")
    rc, out, err = run(bench, "--smoke", "--only", "nll", "--profile", "nll_fwd,intervention_mlp_loreft4_fwdbwd")
    if rc != 2 or "--profile: no row named 'intervention_mlp_loreft4_fwdbwd' ran" not in err:
        problems.append(f"--profile of a row the run does not have: exit {rc}, {err.strip()!r}; expected exit 2 naming it")
    rc, out, err = run(bench, "--smoke", "--only", "nll,adamw")
    keys = sorted(table.parse(out.splitlines())["ms"])
    if rc != 0 or keys != ["adamw_mlp_loreft4", "copy_d2d", "nll_fwd", "nll_fwdbwd"]:
        problems.append(f"--only nll,adamw: exit {rc}, RESULTs {keys} (expected copy_d2d, nll_*, adamw_*)")
    for bad, says in ((["--schedule", "sideways"], "--schedule expects"), (["--fast"], "unknown argument '--fast'"),
                      (["--slot-schedule", "tensr"], "--slot-schedule expects one of cuda_cores, tensor, got 'tensr'"),
                      (["--slots", "0"], "--slots expects a whole number of slots from 1 to 1048576, got '0'"),
                      (["--slots", "12x"], "got '12x'"),
                      (["--quick", "--smoke"], "give one"), (["--only", "nll,kll"], "no benchmark named 'kll'")):
        rc, out, err = run(bench, *bad)
        if rc != 2 or says not in err:
            problems.append(f"{' '.join(bad)}: exit {rc} and {err.strip()!r}; expected exit 2 saying {says!r}")

    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    if not problems:
        print(f"\nbench_cuda --smoke on the emulation: {len(expected)} RESULTs, options checked")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
