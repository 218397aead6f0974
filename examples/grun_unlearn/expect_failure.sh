#!/usr/bin/env bash
# expect_failure.sh [--no-model] OUTDIR REGEX CMD...: CMD must exit non-zero, print REGEX (extended) on
# stderr, and leave no file in OUTDIR. Exits 77 (ctest: skipped) when the example model is not
# installed, unless --no-model says CMD must fail before it reads the model.
set -u
needs_model=1
if [ "${1:-}" = --no-model ]; then needs_model=0; shift; fi
outdir=$1; regex=$2; shift 2
model=${GRUN_MODEL:-${GRUN_CACHE_DIR:-${HOME:-/tmp}/.cache/grun}/models/SmolLM2-135M-Instruct.Q4_1.gguf}
if [ $needs_model = 1 ] && [ ! -f "$model" ]; then echo "SKIPPED: example model not found at $model"; exit 77; fi
rm -rf "$outdir"; mkdir -p "$outdir"
err=$("$@" 2>&1 >/dev/null); rc=$?
echo "$err" | tail -5
if [ $rc -eq 0 ]; then echo "FAIL: expected a non-zero exit"; exit 1; fi
if ! echo "$err" | grep -Eq -e "$regex"; then echo "FAIL: expected the message to match /$regex/"; exit 1; fi
left=$(find "$outdir" -type f | head -5)
if [ -n "$left" ]; then echo "FAIL: files left behind: $left"; exit 1; fi
echo "ok: exit $rc, message matches, nothing left behind"
