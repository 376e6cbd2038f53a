#!/usr/bin/env bash
# OmniKV beside kvpress's presses (issue 29): one model, one length, the tasks given, 20 samples per
# cell, question after and before the haystack, at 10%, 5% and 25% kept. Needs kvpress, so
# transformers < 5.3: run in .venv-floor (bash scripts/setup_floor.sh). One eval process at a time,
# one torch thread, --resume: re-running finishes what is missing. Stages, most informative first
# (each press prefills on its own, so a cell costs a prefill per press and budget):
#   1. 10%: every press, both positions;
#   2. 5% and 25%: SnapKV, TOVA and KeyDiff (plus, at 5%, OmniKV with 16 recent tokens: its
#      preset's 4 sink + 64 recent tokens can exceed 5% of a short prompt);
#   3. every press and OmniKV with 16 recent tokens at every budget (--resume: what is missing).
# Settings (environment): MODEL (smollm2), LENGTHS (1k), TASKS (niah_multikey_1), SAMPLES (20),
# OUT (benchmarks/eval/results/kvpress-$MODEL-$LENGTHS), PY (.venv-floor/bin/python), STAGES (1 2 3).
#   bash benchmarks/eval/run_kvpress.sh                                          # SmolLM2 1K
#   MODEL=gemma3 LENGTHS=2k TASKS=niah_multikey_1 bash benchmarks/eval/run_kvpress.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-smollm2}
LENGTHS=${LENGTHS:-1k}
TASKS=${TASKS:-niah_multikey_1}
SAMPLES=${SAMPLES:-20}
OUT=${OUT:-benchmarks/eval/results/kvpress-$MODEL-$LENGTHS}
PY=${PY:-.venv-floor/bin/python}
STAGES=${STAGES:-1 2 3}
ALL="full,omnikv,kvpress:SnapKVPress,kvpress:TOVAPress,kvpress:KeyDiffPress,kvpress:ExpectedAttentionPress,kvpress:AdaKVPress(press=SnapKVPress)"
CORE="full,omnikv,kvpress:SnapKVPress,kvpress:TOVAPress,kvpress:KeyDiffPress"
mkdir -p "$OUT"
{ echo "commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- omnikv || echo ' (omnikv/ modified)')"
  echo "start $(date -u +%FT%TZ) $(uptime)"; } >> "$OUT/load.txt"
run() {  # budget position methods
  local cmd=(env OMP_NUM_THREADS=1 PYTHONPATH=. nice -n 5 "$PY" -m omnikv eval --model "$MODEL" --methods "$3"
             --tasks "$TASKS" --lengths "$LENGTHS" --samples "$SAMPLES" --seed 0 --budget "$1" --question-position "$2"
             --max-new-tokens 16 --output "$OUT/$2-b$1" --resume --no-progress)
  echo "$(date -u +%FT%TZ) ${cmd[*]}" >> "$OUT/load.txt"
  # Exit status 1: a method failed (named in the log and the cell's run.json); the others finished.
  local rc=0
  "${cmd[@]}" > "$OUT/$2-b$1.log" 2>&1 || rc=$?
  echo "$(date -u +%FT%TZ) done $2-b$1 rc=$rc $(uptime)" >> "$OUT/load.txt"
  (( rc <= 1 )) || { echo "run_kvpress.sh: $2-b$1 failed (rc $rc), see $OUT/$2-b$1.log" >&2; exit "$rc"; }
}
for stage in $STAGES; do
  case $stage in
    1) for pos in after before; do run 0.1 "$pos" "$ALL"; done ;;
    2) for b in 0.05 0.25; do for pos in after before; do
         run "$b" "$pos" "$CORE$([[ $b == 0.05 ]] && echo ,omnikv:recent_tokens=16)"; done; done ;;
    3) for b in 0.05 0.1 0.25; do for pos in after before; do run "$b" "$pos" "$ALL,omnikv:recent_tokens=16"; done; done ;;
    *) echo "run_kvpress.sh: unknown stage '$stage' (STAGES takes 1, 2 and 3)" >&2; exit 2 ;;
  esac
done
echo "end $(date -u +%FT%TZ) $(uptime)" >> "$OUT/load.txt"
