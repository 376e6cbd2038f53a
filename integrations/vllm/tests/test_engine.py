"""vLLM with the OmniKV backend decodes the same greedy tokens as the library's HF path.

The reference tokens come from `omnikv generate --method omnikv` in the library's own venv (the HF
path on its transformers, 5.24; this venv has vLLM's 5.19): tests/test_vllm_integration.py writes
them to the file named by OMNIKV_VLLM_REFERENCE and runs this module. Two engines: the offline CLI (`vllm.LLM`), then one
OpenAI server on 127.0.0.1 shared by the server tests, with small prefill chunks so that prefill and
decode rows of different requests share steps.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from omnikv_vllm.cli import without_stop

REF = os.environ.get("OMNIKV_VLLM_REFERENCE")
pytestmark = pytest.mark.skipif(
    not REF, reason="OMNIKV_VLLM_REFERENCE is not set: run through tests/test_vllm_integration.py (main venv)")

ENGINE_START_S = 900  # a cold start on 2 busy cores can take minutes


def _reference() -> dict:
    return json.loads(Path(REF).read_text())


def _offline(tmp_path, case: dict, model: str, *flags: str) -> subprocess.CompletedProcess:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(case["text"], encoding="utf-8")
    cmd = [sys.executable, "-m", "omnikv_vllm", "generate", "--model", model, "--prompt-file", str(prompt),
           "--max-new-tokens", str(case["max_new_tokens"]), "--budget", str(case["budget"]),
           "--method", "omnikv", "--json", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=ENGINE_START_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "OmniKV vLLM backend" in proc.stderr  # the plugin, not stock attention, decoded
    return proc


def test_offline_cli_matches_the_library(tmp_path):
    ref = _reference()
    case = ref["cli"]
    proc = _offline(tmp_path, case, ref["model"])
    # stdout carries the JSON object alone (`... --json | jq` works); vLLM's logs went to stderr.
    out = json.loads(proc.stdout)
    assert "INFO" in proc.stderr
    assert out["prompt_tokens"] == len(case["prompt_ids"])
    assert out["token_ids"] == case["token_ids"]
    assert case["token_ids"] != case["full_token_ids"]  # the budget changes the tokens: not vacuous


def test_tensor_parallel_workers_match_the_library(tmp_path):
    """SmolLM2 split over 3 vLLM workers (9 query heads, 3 KV heads: one KV head each; 2 does not
    divide 9), on the CPU platform: each worker scores with its own heads, the scores are reduced
    across the group before top-k, and the tokens equal the library's single-process ones."""
    ref = _reference()
    case = ref["cli"]
    proc = _offline(tmp_path, case, ref["model"], "--tensor-parallel-size", "3", "--max-model-len", "2048")
    assert proc.stderr.count("OmniKV vLLM backend:") >= 3  # one line per worker process
    assert json.loads(proc.stdout)["token_ids"] == case["token_ids"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ref = _reference()
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [sys.executable, "-m", "omnikv_vllm", "serve", "--model", ref["model"], "--budget",
           str(ref["server_budget"]), "--port", str(port), "--",
           "--max-num-batched-tokens", "256", "--max-num-seqs", "4"]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ENGINE_START_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not start in {ENGINE_START_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield base, ref, log
    finally:
        # The server runs in its own session: signal the whole group, so that vLLM's engine and
        # worker processes go too, even if the server dies before reaping them.
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        time.sleep(2)
        _signal_group(proc.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _complete(base: str, model: str, prompt_ids: list[int], max_tokens: int, stop_ids: list[int]) -> list[int]:
    body = json.dumps({"model": model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0,
                       "stop_token_ids": stop_ids, "return_token_ids": True}).encode()
    req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        choice = json.loads(r.read())["choices"][0]
    return without_stop(choice["token_ids"], stop_ids)


def test_server_requests_one_at_a_time_match_the_library(server):
    base, ref, log = server
    for case in ref["server"]:
        assert _complete(base, ref["model"], case["prompt_ids"], case["max_new_tokens"], ref["eos_ids"]) == case["token_ids"], case["name"]
    assert "OmniKV vLLM backend" in log.read_text()


def test_concurrent_requests_of_different_lengths_match_the_library(server):
    base, ref, _ = server
    cases = ref["server"]
    assert len({len(c["prompt_ids"]) for c in cases}) == len(cases) >= 4
    with ThreadPoolExecutor(len(cases)) as pool:
        got = list(pool.map(
            lambda c: _complete(base, ref["model"], c["prompt_ids"], c["max_new_tokens"], ref["eos_ids"]), cases))
    for case, tokens in zip(cases, got):
        assert tokens == case["token_ids"], case["name"]
