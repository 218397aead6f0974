#!/usr/bin/env python3
"""Every kernel of one bench_cuda call and its time, from ncu's CSV: where a row's milliseconds go.

Usage: kernel_times.py --row KEY [--results RESULTS] NCU_LOG

NCU_LOG is what

    ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \\
        --log-file NCU_LOG bench_cuda --only GROUP --profile KEY

wrote (benchmarks/gpu_slot.sh runs it): bench_cuda runs row KEY's call once more between
cudaProfilerStart and cudaProfilerStop, so the log holds each kernel of that one call — grun's and
cuBLASLt's — with its duration. Printed: the kernels in launch order, their sum beside the row's
median in RESULTS (bench_cuda's RESULT lines, e.g. gpu_check.sh's results.txt: cudaEvent time, host
work included) — what the sum leaves of the median is time between kernels: host work, launch
latency, waits — and the time per kernel name, largest first.

Exit status: 0, also when the log holds no kernel rows (said in the output: ncu may have failed or
been cut short, and the step that ran it goes on); 2 for bad arguments or an unreadable log.
"""
import argparse
import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sass_report  # noqa: E402  (short_name: one way to shorten a kernel's name)

# ncu's time units, to microseconds (long and short spellings, across ncu versions).
UNITS_US = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6, "s": 1e6}
METRIC = "gpu__time_duration.sum"


def parse(lines):
    """[(id, kernel name, µs)] in launch order from ncu's CSV (the details page: one row per kernel and
    metric; the header names the columns). Lines before the header (==PROF== lines) are skipped."""
    rows, header = [], None
    for record in csv.reader(lines):
        if header is None:
            if {"ID", "Kernel Name", "Metric Name", "Metric Unit", "Metric Value"} <= set(record):
                header = {name: i for i, name in enumerate(record)}
            continue
        if len(record) < len(header) or record[header["Metric Name"]] != METRIC:
            continue
        unit = record[header["Metric Unit"]].strip()
        if unit not in UNITS_US:
            raise ValueError(f"kernel {record[header['ID']]}: {METRIC} in unit {unit!r}, expected one of "
                             f"{', '.join(UNITS_US)}")
        value = float(record[header["Metric Value"]].replace(",", ""))
        rows.append((int(record[header["ID"]]), record[header["Kernel Name"]], value * UNITS_US[unit]))
    return sorted(rows)


def short_name(name, width=96):
    """sass_report.py's short name (namespaces and parameter list dropped, template arguments kept: they
    say which schedule and dtype ran), cut at `width` characters."""
    name = sass_report.short_name(name.strip())
    return name if len(name) <= width else name[:width - 1] + "…"


def median_ms(results_lines, key):
    for line in results_lines:
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "RESULT" and parts[1] == key:
            return float(parts[2])
    return None


def render(key, kernels, median):
    out = [f"== kernels of one {key} call (ncu {METRIC}, launch order)"]
    if not kernels:
        out.append("   no kernel rows in ncu's log (see logs.tgz: ncu failed, was cut short, or the row did not run)")
        return "\n".join(out)
    out.append("        µs  kernel")
    for _, name, us in kernels:
        out.append(f"  {us:8.1f}  {short_name(name)}")
    total = sum(us for _, _, us in kernels)
    line = f"  {total:8.1f}  sum of {len(kernels)} kernels"
    if median is not None and median > 0:
        line += (f": {100 * total / (1e3 * median):.0f}% of the row's median, {median:.3f} ms (cudaEvent time; the rest "
                 "is time between kernels: host work, launches, waits)")
    out.append(line)
    by_name = {}
    for _, name, us in kernels:
        n, t = by_name.get(short_name(name), (0, 0.0))
        by_name[short_name(name)] = (n + 1, t + us)
    out.append("  by kernel:")
    for name, (n, t) in sorted(by_name.items(), key=lambda kv: -kv[1][1]):
        out.append(f"  {t:8.1f}  {100 * t / total if total else 0:3.0f}%  {n:2d}×  {name}")
    return "\n".join(out)


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--row", required=True, help="the bench_cuda row profiled (bench_cuda --profile KEY)")
    ap.add_argument("--results", help="bench_cuda's RESULT lines (results.txt), for the row's median")
    ap.add_argument("log", help="ncu's --csv --log-file output")
    args = ap.parse_args(argv[1:])
    try:
        with open(args.log, encoding="utf-8", errors="replace") as f:
            kernels = parse(f.read().splitlines())
    except (OSError, ValueError) as e:
        print(f"kernel_times.py: {e}", file=sys.stderr)
        return 2
    median = None
    try:  # the median is a comparison, not the point: no results file (the check failed early), no median
        with open(args.results or "", encoding="utf-8", errors="replace") as f:
            median = median_ms(f.read().splitlines(), args.row)
    except OSError:
        pass
    print(render(args.row, kernels, median))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
