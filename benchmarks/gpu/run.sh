#!/usr/bin/env bash
# One-call GPU benchmark of OmniKV (see docs/performance.md, "GPU"; the stages and their time
# estimates are in benchmarks/gpu/gpu_bench.py's docstring).
#
#   benchmarks/gpu/run.sh                      # CUDA: the default run, planned to end within 4 minutes
#   benchmarks/gpu/run.sh --stage correctness  # one stage (repeatable): bandwidths correctness timing
#                                              #   trace throughput prefill limits
#   benchmarks/gpu/run.sh --tiny               # tiny shapes (a smoke test)
#
# Results go to $OUT (default ./gpu-out) as each stage ends: summary.json, table.txt, log.txt,
# trace_omnikv_offload.json.gz, bench.png (where matplotlib is installed).
# Python: $PYTHON, else python3.
# transformers: the machine's own when it is inside the range pyproject.toml declares (the GPU image's 5.17 is); otherwise a
# wheel carried in .whl/ (benchmarks/gpu/fetch_wheels.sh, here, before the call; name .whl in the
# call's `carry`) is installed into a private folder. Neither: the run stops here, loudly.
# The benchmark is killed after OMNIKV_GPU_TIMEOUT seconds (default 270); the summary table is
# printed from what it saved in any case.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${OUT:-$root/gpu-out}"
wheels="${OMNIKV_GPU_WHEELS:-$root/.whl}"
mkdir -p "$out"
py="${PYTHON:-python3}"
log="$out/log.txt"
: > "$log"
say() { echo "[run.sh] $*" | tee -a "$log" >&2; }

# -- transformers inside omnikv's declared range (read from pyproject.toml), or fail here ------------
range_check() { "$py" "$here/transformers_range.py" "$root/pyproject.toml"; }
check="$(range_check)"; rc=$?
say "$check"
if [ "$rc" -eq 1 ]; then
  if ! compgen -G "$wheels/*.whl" >/dev/null; then
    say "error: the machine's transformers is outside omnikv's range and no wheel was carried in $wheels;"
    say "       run benchmarks/gpu/fetch_wheels.sh before the call and name .whl in its carry"
    exit 3
  fi
  site="${TMPDIR:-/tmp}/omnikv-gpu-site"
  rm -rf "$site"
  if ! "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl 2>&1 | tee -a "$log"; then
    say "error: installing the carried wheels ($(ls "$wheels")) failed; not falling back to the machine's transformers"
    exit 3
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  check="$(OMNIKV_GPU_TRANSFORMERS_VERSION= range_check)"; rc=$?  # what is installed now, nothing pretended
  say "after installing the carried wheels: $check"
  if [ "$rc" -ne 0 ]; then
    say "error: the carried wheels did not bring a transformers inside omnikv's range"
    exit 3
  fi
elif [ "$rc" -ne 0 ]; then
  say "error: could not check the transformers version (exit $rc)"
  exit 3
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -n "${site:-}" ] && ! err="$("$py" -c 'import transformers, omnikv' 2>&1)"; then  # a dependency too old for the wheel
  say "error: with the carried wheels, importing transformers / omnikv fails: $(echo "$err" | tail -1)"
  exit 3
fi

rm -f "$out/table.txt"
timeout -k 10 "${OMNIKV_GPU_TIMEOUT:-270}" "$py" "$here/gpu_bench.py" --out "$out" "$@" 2>&1 | tee -a "$log"
status="${PIPESTATUS[0]}"
if [ ! -s "$out/table.txt" ]; then  # killed or crashed before its table: print it from what was saved
  say "gpu_bench.py ended with status $status before printing its table; the table from $out/summary.json:"
  if [ -s "$out/summary.json" ]; then
    "$py" "$here/table.py" "$out/summary.json" 2>&1 | tee "$out/table.txt" | tee -a "$log"
  else
    say "no summary.json was written"
  fi
fi
exit "$status"
