#!/usr/bin/env bash
# Triton (the wheel GPU machines have: 3.6) in its own directory, for tests/test_reload.py, which runs the
# partial-reload kernel on CPU under Triton's interpreter (TRITON_INTERPRET=1) with this directory on
# PYTHONPATH. Idempotent: a no-op when it is there. Not in the main venv: torch's CPU build does not need it.
set -euo pipefail
SITE="${OMNIKV_TRITON_SITE:-$HOME/.cache/omnikv-triton/site}"
QUIET=""
[[ "${1:-}" == "--quiet" ]] && QUIET="--quiet"
if [[ -f "$SITE/triton/__init__.py" ]]; then
    exit 0
fi
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
[[ -x "$PY" ]] || PY=python3
mkdir -p "$SITE"
"$PY" -m pip install $QUIET --no-deps --target "$SITE" "triton==3.6.0"
