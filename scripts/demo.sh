#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv (once), convert the embedded Gemma 3 270M model
# (once, into ~/.cache/omnikv), then answer a question about a ~4K-token story with a pass key
# hidden in it, with full attention and with OmniKV side by side.
# Extra arguments go to `omnikv compare`, e.g. `bash scripts/demo.sh --demo-tokens 8000`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --quiet
exec .venv/bin/omnikv compare --model gemma3 "$@"
