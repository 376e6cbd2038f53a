#!/usr/bin/env bash
# Idempotent setup of .venv-gpu-image: the Python stack of the lent GPU machines (issue #24), on
# this CPU machine, so that the GPU run's rehearsal and the code it runs are tested on the versions
# the GPU will have before a GPU session spends its minutes: Python 3.12, torch 2.11.0 (PyPI's
# build, +cu130, as on the image; here it runs on the CPU), transformers 5.17.0, triton 3.6.0,
# tokenizers 0.23, accelerate, safetensors, numpy; and, as on the image, no matplotlib, gguf or
# fastapi. omnikv is not installed: as benchmarks/gpu/run.sh does on the GPU, the tests put the
# working tree on PYTHONPATH. tests/test_gpu_rehearsal.py runs a subset there when CI=true or
# OMNIKV_GPU_IMAGE=1.
#
# The wheels (~4 GB: torch's CUDA libraries) are kept in $OMNIKV_GPU_IMAGE_PIP_CACHE (default
# ~/.cache/omnikv-gpu-image-pip), so a rebuild on the same machine downloads nothing; a second run
# with unchanged inputs installs nothing.
#
#   bash scripts/setup_gpu_image.sh            # verbose
#   bash scripts/setup_gpu_image.sh --quiet    # pip output goes to .venv-gpu-image/setup.log, shown on failure
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=lib/setup_steps.sh
source scripts/lib/setup_steps.sh
begin_setup gpu-image .venv-gpu-image "${OMNIKV_GPU_IMAGE_PIP_CACHE:-$HOME/.cache/omnikv-gpu-image-pip}" "$@"

# What the GPU image has (the versions issue #24 lists); one place.
image=("torch==2.11.0" "transformers==5.17.0" "triton==3.6.0" "tokenizers==0.23.*" accelerate safetensors numpy tqdm)
tools=(pytest hypothesis)

# The image's Python is 3.12: take a 3.12 where this machine has one (on PATH, or pyenv's), else
# the default python3, and say so.
if [[ -z "${PYTHON:-}" ]]; then
    for candidate in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
        if "$candidate" -V >/dev/null 2>&1; then PYTHON="$candidate"; break; fi
    done
    if [[ -z "${PYTHON:-}" ]]; then
        PYTHON=python3
        echo "$tag: no Python 3.12 here (the GPU image's); using $("$PYTHON" -V 2>&1)" >&2
    fi
fi
export PYTHON

key=$( (cat scripts/setup_gpu_image.sh scripts/lib/setup_steps.sh; "$PYTHON" -V) | sha256sum | cut -d' ' -f1)
has_core='import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ("torch", "transformers", "triton", "pytest")))'

exit_if_current
make_venv
pip=("$py" -m pip install --disable-pip-version-check)

fill_wheelhouse "${image[@]}" "${tools[@]}"
run "${pip[@]}" --no-index --find-links "$wheels" "${image[@]}" "${tools[@]}"
"$py" - <<'EOF' || { echo "$tag: the venv does not match the GPU image (above)" >&2; exit 1; }
import importlib.util, sys
import torch, transformers, triton, tokenizers
missing = [m for m in ("matplotlib", "gguf", "fastapi") if importlib.util.find_spec(m) is not None]
assert not missing, f"not on the GPU image, but installed here: {missing}"
print(f"gpu-image venv: Python {sys.version.split()[0]}, torch {torch.__version__}, transformers "
      f"{transformers.__version__}, triton {triton.__version__}, tokenizers {tokenizers.__version__}")
EOF

finish_setup
