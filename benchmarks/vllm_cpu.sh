#!/usr/bin/env bash
# vLLM decode tokens/s on CPU: stock attention vs the OmniKV backend, interleaved in one engine
# (integrations/vllm/bench_decode.py; docs/vllm.md), SmolLM2 fp32, 8K/16K/32K x 1/4 requests and
# 8K x 16 (16K x 16 and 32K x 16 need 12 / 24 GiB of KV: more than this machine can spare).
# Needs integrations/vllm/setup.sh first. The load average is recorded per cell and in load.txt.
#   benchmarks/vllm_cpu.sh [OUTPUT_DIR]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/benchmarks/results/vllm-cpu}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"  # absolute: the run happens in integrations/vllm
cd "$root/integrations/vllm"
cells="${CELLS:-8192x1,32768x1,16384x1,8192x4,16384x4,32768x4,8192x16}"
# One OpenMP thread by default: on a shared, overloaded machine every parallel region of a 2-thread
# engine waits for its second thread to be scheduled (a profile at load ~13 showed ~6 ms per call
# even for one token's rotary embedding), which hides the work each kernel does. BIND=0,1 for two.
# OMP_NUM_THREADS too: vLLM does not lower torch's own thread count after binding, and two torch
# threads pinned to one core ping-pong on every op (~5 ms per op under this load).
export VLLM_CPU_OMP_THREADS_BIND="${BIND:-0}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cmd=(nice -n "${NICE:-5}" .venv/bin/python bench_decode.py --cells "$cells" --new-tokens "${NEW_TOKENS:-16}"
     --repeats "${REPEATS:-2}" --output "$out/bench.json")
{ date -u; echo "before: $(cat /proc/loadavg)"; echo "command: VLLM_CPU_OMP_THREADS_BIND=$VLLM_CPU_OMP_THREADS_BIND OMP_NUM_THREADS=$OMP_NUM_THREADS ${cmd[*]}"; } > "$out/load.txt"
"${cmd[@]}" 2> "$out/bench.log"
echo "after: $(cat /proc/loadavg)" >> "$out/load.txt"
