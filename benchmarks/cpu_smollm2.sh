#!/usr/bin/env bash
# The CPU benchmark of docs/performance.md: SmolLM2-135M, fp32, batch 1, synthetic KV, 4K-32K,
# full (stock transformers cache) vs full_prealloc vs OmniKV (SmolLM2 preset: 1024 tokens),
# methods interleaved step by step.
#   benchmarks/cpu_smollm2.sh [OUTPUT_DIR] [extra `omnikv bench` args...]
#   FILL=real: a real chunked prefill instead of synthetic KV (see cpu_smollm2_real.sh).
#   THREADS=2 (default) sets torch's CPU threads. On a shared, oversubscribed machine use THREADS=1:
#   two spinning threads that keep getting descheduled are ~2.7x slower than one (measured).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/benchmarks/results/cpu-smollm2}"
shift || true
# Do not set MALLOC_MMAP_THRESHOLD_ here: it makes RSS peaks exact but charges the stock cache a fresh
# mmap + page faults for every per-step torch.cat (its KV update went from 154 to 646 ms at 16K).
"$root/.venv/bin/python" -m omnikv bench --model smollm2 \
  --methods "${METHODS:-full,full_prealloc,omnikv}" \
  --contexts "${CONTEXTS:-4k,8k,16k,32k}" $([[ ${FILL:-synthetic} == real ]] || echo --synthetic-kv) \
  --threads "${THREADS:-2}" \
  --steps 64 --warmup 8 --breakdown-steps 16 --output-dir "$out" "$@"
