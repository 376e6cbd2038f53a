#!/usr/bin/env bash
# Calibration (full attention only): which generated tasks each embedded model solves, so the
# suite measures the KV method and not the model. Outputs go to runs/calib/<model>-<len>/.
# Usage: benchmarks/eval/calibrate.sh [gemma3|gemma3-rest|smollm2|all]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/calib}
which=${1:-all}
common=(--methods full --samples 3 --haystack narrative --max-new-tokens 24 --prefill-chunk-size 1024 --resume --no-progress)
# The tasks the first calibration did not reach (second pass, 32-token cap so that multi-value
# answers fit: Gemma 3 tokenizes digits one by one).
rest=vt,two_stage_retrieval,niah_multivalue,niah_multiquery,kv_retrieval,number_string,math_find,cwe,fwe
if [[ $which == gemma3-rest || $which == all ]]; then
  for len in 2k 4k; do
    $PY -m omnikv eval --model gemma3 --lengths $len --output "$OUT/gemma3-rest-$len" \
      "${common[@]}" --max-new-tokens 32 --tasks "$rest"
  done
fi
if [[ $which == gemma3 || $which == all ]]; then
  $PY -m omnikv eval --model gemma3 --lengths 4k --output "$OUT/gemma3-4k" "${common[@]}" \
    --tasks niah_single_2,niah_multikey_1,2stage,vt,niah_multivalue,niah_multiquery,niah_single_1
fi
if [[ $which == smollm2 || $which == all ]]; then
  $PY -m omnikv eval --model smollm2 --lengths 1k,2k --output "$OUT/smollm2" "${common[@]}" \
    --tasks passkey,niah_single_2,niah_multikey_1,2stage,vt
fi
