#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv (once), convert the embedded models (once, into
# ~/.cache/omnikv), then `omnikv demo`: the same answer with full attention and OmniKV (Gemma 3 270M,
# a ~4K-token story with a hidden pass key), where each keeps its KV with the Context Bank on, and
# the decode speed-up at 16K tokens (SmolLM2-135M), each labelled with what it means on a GPU.
# Extra arguments go to `omnikv demo`, e.g. `bash scripts/demo.sh --speed-context 32k`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --quiet
exec .venv/bin/omnikv demo "$@"
