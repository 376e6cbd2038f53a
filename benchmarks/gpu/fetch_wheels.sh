#!/usr/bin/env bash
# Fetch (from PyPI, here - the GPU machine has no network) the wheels run.sh installs there when
# the machine's own transformers is outside omnikv's tested range (see omnikv/hf/compat.py).
# Then name .whl in the device call's `carry`. The GPU image has Python 3.12.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
version="${1:-$("$root/.venv/bin/python" -c 'import transformers; print(transformers.__version__)')}"
grep -qx '/.whl/' "$root/.git/info/exclude" 2>/dev/null || echo '/.whl/' >> "$root/.git/info/exclude"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$root/.whl" "transformers==$version"
ls -la "$root/.whl"
