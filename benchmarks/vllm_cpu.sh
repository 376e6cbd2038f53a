#!/usr/bin/env bash
# vLLM decode tokens/s on CPU, stock attention vs the OmniKV backend (docs/vllm.md), SmolLM2 fp32,
# 4K and 8K contexts, 1 and 4 concurrent requests. Needs integrations/vllm/setup.sh first.
#   benchmarks/vllm_cpu.sh [OUTPUT_DIR]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/benchmarks/results/vllm-cpu}"
mkdir -p "$out"
cd "$root/integrations/vllm"
for method in full omnikv; do
  nice -n "${NICE:-5}" .venv/bin/python bench_decode.py --method "$method" \
    --contexts "${CONTEXTS:-4096,8000}" --concurrency "${CONCURRENCY:-1,4}" --new-tokens "${NEW_TOKENS:-32}" \
    --output "$out/$method.json" 2> "$out/$method.log"
done
