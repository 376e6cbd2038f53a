"""The floor of the tested transformers range: a subset of the suite in a second venv.

scripts/setup_floor.sh makes .venv-floor with the lowest transformers pyproject.toml allows (5.2.0)
and kvpress 0.5.5 (cached wheels, idempotent: seconds when up to date, ~3 minutes from the cached
wheels, longer the first time on a machine). This test runs the subset below with that venv's
pytest: the contract, equivalence to the reference, generation, the embedded models, GGUF conversion,
cache bookkeeping properties, an eval smoke and kvpress's presses held to our baselines. It sets
the venv up when CI=true or OMNIKV_FLOOR=1; otherwise it is skipped and says why (the normal
`bash scripts/test.sh` stays fast).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _side_venv import side_venv_python

ROOT = Path(__file__).resolve().parents[1]
FLOOR_PY = ROOT / ".venv-floor" / "bin" / "python"
SUBSET = [
    "tests/test_contract.py",  # the seams, on the floor's names
    "tests/test_omnikv_equivalence.py",  # OmniKV against the slow reference
    "tests/test_omnikv_invariants.py",
    "tests/test_baselines.py",  # the baselines against their references
    "tests/test_fork.py",  # generate from a shared prefill
    "tests/test_kvpress.py",  # kvpress's presses (installed only here) and our snapkv / streaming_llm held to them
    "tests/test_supported_models.py",  # the model families
    "tests/test_eval_runner.py",  # the eval smoke
    "tests/test_models.py",  # GGUF conversion: this release reads a GGUF tokenizer's BOS / eos its own way
    "tests/test_reliability_properties.py",  # cache bookkeeping under generate, positions checked at attention
]

pytestmark = pytest.mark.slow


def test_floor_subset_passes_on_the_lowest_transformers():
    python = side_venv_python(ROOT / "scripts" / "setup_floor.sh", FLOOR_PY, "OMNIKV_FLOOR", "floor-version tests")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PYTEST_XDIST_WORKER", None)
    start = time.monotonic()
    proc = subprocess.run([str(python), "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider", "-rs", *SUBSET],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    took = time.monotonic() - start
    version = subprocess.run([str(python), "-c", "import transformers; print(transformers.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    print(f"floor subset on transformers {version}: {took:.0f} s", file=sys.stderr)
    assert proc.returncode == 0, f"floor subset failed on transformers {version}:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert " passed" in proc.stdout and "kvpress is not installed" not in proc.stdout, proc.stdout[-3000:]
