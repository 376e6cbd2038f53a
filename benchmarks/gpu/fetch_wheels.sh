#!/usr/bin/env bash
# Fetch (from PyPI, here - the GPU machine has no network) the transformers wheel (and regex) run.sh installs
# there when the machine's own transformers is outside the range pyproject.toml declares. Then name
# .whl in the device call's `carry`. The GPU image has Python 3.12.
#   benchmarks/gpu/fetch_wheels.sh [VERSION]     # default: this venv's transformers
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
version="${1:-$("$py" -c 'from importlib.metadata import version; print(version("transformers"))')}"
if ! OMNIKV_GPU_TRANSFORMERS_VERSION="$version" "$py" "$root/benchmarks/gpu/transformers_range.py" "$root/pyproject.toml"; then
  echo "error: transformers $version is not inside omnikv's range; pass a version inside it" >&2
  exit 2
fi
exclude="$(git -C "$root" rev-parse --git-path info/exclude)"  # a worktree's .git is a file
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
rm -rf "$root/.whl"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$root/.whl" "transformers==$version"
# transformers checks its dependencies' versions on import; the image's huggingface_hub, tokenizers
# and safetensors are new enough (KINDS.md), its regex's version is not listed: carry one.
regex="$("$py" -c 'from importlib.metadata import version; print(version("regex"))')"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$root/.whl" "regex==$regex"
ls -la "$root/.whl"
# What a device call carries: the tracked and untracked-not-ignored files, plus .whl (limit 64 MiB).
tree=$(cd "$root" && git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | awk 'END {print $1}')
wheels=$(du -cb "$root"/.whl/*.whl | awk 'END {print $1}')
total=$((tree + wheels))
echo "working tree $((tree / 1048576)) MiB + wheels $((wheels / 1048576)) MiB = $((total / 1048576)) MiB (a call carries at most 64 MiB)"
[ "$total" -lt $((64 * 1048576)) ] || { echo "error: over 64 MiB" >&2; exit 2; }
