#!/usr/bin/env bash
# Issue 7 acceptance: the calibrated preset vs the paper-style filter layers at the same budget and
# the same number of dense layers, on the tasks where SmolLM2 is competent with full attention (~1K).
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=benchmarks/analysis/smollm2/eval
common=(--model smollm2 --tasks passkey,niah_single_1,niah_multikey_1 --lengths 1k --samples 6 --budget 256 --no-progress --resume)
.venv/bin/omnikv eval "${common[@]}" --methods full,omnikv --preset benchmarks/analysis/smollm2/calibrated_k256_w1.json --output "$out/calibrated"
.venv/bin/omnikv eval "${common[@]}" --methods omnikv --preset benchmarks/analysis/smollm2/paper_style_k256_w1.json --output "$out/paper_style"
