#!/usr/bin/env bash
# OmniKV beside kvpress's presses (issue 29): SmolLM2-135M at 1K (where it is competent),
# niah_multikey_1, 20 samples per cell, question after and before the haystack, at 10%, 5% and 25%
# kept. Needs kvpress, so transformers < 5.3: run in .venv-floor (bash scripts/setup_floor.sh).
# One eval process at a time, one torch thread, --resume: re-running finishes what is missing.
# 10% runs every press; 5% and 25% first SnapKV, TOVA and KeyDiff (CPU time; docs/results.md),
# then, as time allowed, OmniKV with 16 recent tokens at 5% (its preset's 4 sink + 64 recent
# exceed 5% of 1K) and ExpectedAttention + AdaKV at 25% (--resume runs only the missing methods).
#   bash benchmarks/eval/run_kvpress_smollm2.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=benchmarks/eval/results/kvpress-smollm2-1k
PY=${PY:-.venv-floor/bin/python}
ALL="full,omnikv,kvpress:SnapKVPress,kvpress:TOVAPress,kvpress:KeyDiffPress,kvpress:ExpectedAttentionPress,kvpress:AdaKVPress(press=SnapKVPress)"
CORE="full,omnikv,kvpress:SnapKVPress,kvpress:TOVAPress,kvpress:KeyDiffPress"
mkdir -p "$OUT"
{ echo "commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- omnikv || echo ' (omnikv/ modified)')"
  echo "start $(date -u +%FT%TZ) $(uptime)"; } >> "$OUT/load.txt"
run() {  # budget position methods
  local cmd=(env OMP_NUM_THREADS=1 PYTHONPATH=. nice -n 5 "$PY" -m omnikv eval --model smollm2 --methods "$3"
             --tasks niah_multikey_1 --lengths 1k --samples 20 --seed 0 --budget "$1" --question-position "$2"
             --max-new-tokens 16 --output "$OUT/$2-b$1" --resume --no-progress)
  echo "$(date -u +%FT%TZ) ${cmd[*]}" >> "$OUT/load.txt"
  "${cmd[@]}" > "$OUT/$2-b$1.log" 2>&1
  echo "$(date -u +%FT%TZ) done $2-b$1 $(uptime)" >> "$OUT/load.txt"
}
for pos in after before; do run 0.1 "$pos" "$ALL"; done
for b in 0.05 0.25; do for pos in after before; do run "$b" "$pos" "$CORE"; done; done
for pos in after before; do run 0.05 "$pos" "$CORE,omnikv:recent_tokens=16"; done
for pos in after before; do run 0.25 "$pos" "$ALL"; done
# Completion (a later session): ExpectedAttention + AdaKV at 5%, OmniKV with 16 recent tokens at
# 10% and 25% (--resume runs only what is missing).
for b in 0.05 0.1 0.25; do for pos in after before; do run "$b" "$pos" "$ALL,omnikv:recent_tokens=16"; done; done
echo "end $(date -u +%FT%TZ) $(uptime)" >> "$OUT/load.txt"
