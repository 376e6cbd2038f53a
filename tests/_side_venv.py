"""Venvs the suite sets up beside the main one (vLLM, lm-eval): their tools pin versions the main venv
cannot take. Set up when running in CI (CI=true) or when opted in; otherwise the test is skipped and
says why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Triton (the GPU machines' 3.6) in its own directory (scripts/setup_triton.sh), or the directory
# OMNIKV_TRITON_SITE names (the GPU-image venv's own site-packages)
TRITON_SITE = Path(os.environ.get("OMNIKV_TRITON_SITE", Path.home() / ".cache/omnikv-triton/site"))


def side_venv_python(setup: Path, python: Path, opt_in: str, what: str) -> Path:
    """`python` of the venv that `setup` (an idempotent script taking --quiet) makes, setting it up
    when CI=true or `opt_in`=1; skip with the reason when the venv is missing and neither is set."""
    allowed = os.environ.get("CI", "").lower() == "true" or os.environ.get(opt_in) == "1"
    if not python.exists() and not allowed:
        msg = (f"{what} SKIPPED: {python} does not exist. Run `bash {setup.relative_to(ROOT)}` "
               f"(or set {opt_in}=1) to set it up and run them")
        print(msg, file=sys.stderr)
        pytest.skip(msg)
    # Idempotent: a no-op (seconds) when the venv is up to date.
    proc = subprocess.run(["nice", "-n", "5", "bash", str(setup), "--quiet"], capture_output=True, text=True, timeout=3000)
    if proc.returncode != 0:
        pytest.fail(f"{setup.relative_to(ROOT)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return python
