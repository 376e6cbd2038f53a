#!/usr/bin/env bash
# The end-to-end CPU benchmark of docs/performance.md: cpu_smollm2.sh with a real chunked prefill
# (random token ids) at 8K and 16K instead of synthetic KV, and OmniKV also without its partial
# reload. Real keys have structure, so consecutive selections overlap as on real text (~80%; random
# synthetic keys: ~30%), which is what the partial reload depends on.
#   benchmarks/cpu_smollm2_real.sh [OUTPUT_DIR] [extra `omnikv bench` args...]
# ~15 minutes on 2 idle cores (the four 16K prefills dominate).
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FILL=real METHODS="${METHODS:-full,full_prealloc,omnikv,omnikv:partial_reload=false}" CONTEXTS="${CONTEXTS:-8k,16k}" \
  exec "$root/benchmarks/cpu_smollm2.sh" "${1:-$root/benchmarks/results/cpu-smollm2-real}" "${@:2}"
