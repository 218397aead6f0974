# Sourced by the cmake/fetch_*.sh scripts after they set `fetch_name`: their shared pieces.
#   say / die                messages prefixed "grun <fetch_name>:" (die exits 1)
#   cache_dir                ${GRUN_CACHE_DIR:-$HOME/.cache/grun}, where fetched things are kept
#   pip_download_pinned SPEC FILE SHA256 DIR [PIP ARGS...]
#                            downloads SPEC from PyPI into DIR with pip (no dependencies), then
#                            requires DIR/FILE with that sha256; dies with a message otherwise.
#                            Leaves `python` set to the pip-capable python3 it used.
say() { echo "grun $fetch_name: $*"; }
die() { echo "grun $fetch_name: error: $*" >&2; exit 1; }

cache_dir="${GRUN_CACHE_DIR:-${HOME:-/tmp}/.cache/grun}"

pip_download_pinned() {
  local spec="$1" file="$2" sha="$3" dir="$4" sum
  shift 4
  # A python3 that has pip (pyenv's, the system's, ...).
  source "$(dirname "${BASH_SOURCE[0]}")/pip_python.sh"
  [ -n "$python" ] || die "no python3 with pip found (install python3-pip, or set GRUN_PYTHON); needed to download $spec"
  "$python" -m pip download --no-deps --disable-pip-version-check -q "$@" -d "$dir" "$spec" 2>"$dir/pip.log" ||
    { tail -5 "$dir/pip.log" >&2; die "pip download of $spec failed (no network or no PyPI access?)"; }
  [ -f "$dir/$file" ] || die "pip reported success but $file is not in $dir"
  sum="$(sha256sum "$dir/$file" | cut -d' ' -f1)"
  [ "$sum" = "$sha" ] || die "$file: expected sha256 $sha, found $sum; refusing to use it"
}
