#!/usr/bin/env bash
# One-call GPU benchmark of OmniKV (see docs/performance.md, "GPU").
#
#   benchmarks/gpu/run.sh                  # CUDA: correctness, timing 32K+128K, prefill, trace, throughput (~4 min)
#   benchmarks/gpu/run.sh --stage timing   # one stage (repeatable): correctness timing prefill trace throughput
#   benchmarks/gpu/run.sh --stage timing --compiled   # a second call: compiled (CUDA graphs) rows too
#   benchmarks/gpu/run.sh --tiny           # tiny shapes, runs anywhere (CPU: simulated transfer); tests/test_bench.py
#
# Results go to $OUT (default ./gpu-out): summary.json, bench.png, trace_omnikv_offload.json.gz, log.txt.
# Python: $PYTHON, else the repo's .venv when it sees CUDA (or for --tiny), else python3.
# Wheels in .whl/ (e.g. a transformers inside omnikv's tested range, fetched by
# benchmarks/gpu/fetch_wheels.sh) are installed into a private folder first; nothing is downloaded.
# The whole run is capped at OMNIKV_GPU_TIMEOUT seconds (default 300), so a retry fits in 15 minutes.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${OUT:-$root/gpu-out}"
mkdir -p "$out"

py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x "$root/.venv/bin/python" ] && { [[ " $* " == *" --tiny "* ]] || "$root/.venv/bin/python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }; then
    py="$root/.venv/bin/python"
  else
    py=python3
  fi
fi

if compgen -G "$root/.whl/*.whl" >/dev/null; then
  site=/tmp/omnikv-gpu-site
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$root"/.whl/*.whl \
    && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

"$py" - <<'PY' 2>&1 | tee "$out/log.txt"
import sys, torch, transformers
from omnikv.hf.compat import version_note
print(version_note())
print(f"python {sys.version.split()[0]} torch {torch.__version__} transformers {transformers.__version__} "
      f"cuda {torch.cuda.is_available()} {torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''}")
PY
timeout "${OMNIKV_GPU_TIMEOUT:-300}" "$py" "$here/gpu_bench.py" --out "$out" "$@" 2>&1 | tee -a "$out/log.txt"
exit "${PIPESTATUS[0]}"
