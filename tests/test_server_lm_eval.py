"""lm-evaluation-harness 0.4.x against `omnikv serve` on loopback, with lm-eval's default settings.

lm-eval lives in its own venv (benchmarks/server/.venv, set up by benchmarks/server/lm_eval_setup.sh:
~0.8 GB, ~6 minutes the first time, cached): its dependencies (datasets, evaluate, scikit-learn, ...)
are not omnikv's. When the venv is missing it is set up if running in CI (CI=true) or with
OMNIKV_LMEVAL_SETUP=1; otherwise the test is skipped and says why.

`lm_eval --model local-completions` runs with no model arguments beyond the model name and the
server's URL: its default `tokenizer_backend=auto` finds the server's /tokenizer_info and tokenizes
through /tokenize (no hub), `tokenized_requests` sends token ids, `generate_until` appends the EOS
string to the task's 5 `until` strings. The loglikelihoods it reports are compared with a plain
forward pass of the model here, including a continuation after which the model's next token is EOS
(lm-eval drops the last returned logprob as the generated token's: the server must return that
EOS as the generated token, or a continuation token is dropped instead).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from _side_venv import side_venv_python
import torch

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "benchmarks" / "server" / "lm_eval_setup.sh"
LMEVAL_PY = ROOT / "benchmarks" / "server" / ".venv" / "bin" / "python"
MODEL = "smollm2"
UNTIL = ["\n\n", "Question:", "###", "</s>", "Answer:"]

pytestmark = pytest.mark.slow

# (context, continuation) pairs; the first is a chat turn the model ends right after the continuation.
SCORED = [
    ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
     "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n", "Hello! How can I help you today?"),
    ("Question: What is the capital of France?\nAnswer:", " Paris"),
    ("Question: What is the capital of France?\nAnswer:", " Berlin"),
    ("The sky on a clear day is", " blue"),
]
PROMPTS = ["Question: What is the capital of Italy?\nAnswer:", "List three colours:\n1."]


def _lmeval_python() -> Path:
    """The lm-eval venv's python, setting the venv up when allowed; skip (with the reason) if not."""
    return side_venv_python(SETUP, LMEVAL_PY, "OMNIKV_LMEVAL_SETUP", "lm-eval test")


def _write_tasks(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scored.jsonl").write_text("".join(json.dumps({"context": c, "continuation": t}) + "\n" for c, t in SCORED))
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS))
    (folder / "omnikv_ll.yaml").write_text(
        "task: omnikv_ll\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'scored.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood\n"
        'doc_to_text: "{{context}}"\ndoc_to_target: "{{continuation}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "omnikv_gen.yaml").write_text(
        "task: omnikv_gen\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'prompts.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{text}}"\ndoc_to_target: ""\n'
        f"generation_kwargs:\n  until: {json.dumps(UNTIL)}\n  do_sample: false\n  temperature: 0\n  max_gen_toks: 16\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _samples(out: Path, task: str) -> list[dict]:
    files = sorted(out.rglob(f"samples_{task}_*.jsonl"))
    assert files, f"lm-eval wrote no samples for {task} under {out}"
    rows = [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["doc_id"])


@torch.inference_mode()
def _offline_loglikelihood(lm, context: str, continuation: str) -> tuple[float, int]:
    """(sum of the continuation's token logprobs from one forward pass, the greedy token after it)."""
    tok = lm.tokenizer
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    ids = tok(context + continuation, add_special_tokens=False)["input_ids"]
    assert ids[: len(ctx)] == ctx  # these pairs tokenize at the seam the way lm-eval splits them
    logp = torch.log_softmax(lm.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    return sum(float(logp[j - 1, ids[j]]) for j in range(len(ctx), len(ids))), int(logp[-1].argmax())


def test_lm_eval_default_settings_against_the_server(tmp_path):
    from omnikv.decoding.generation import SamplingParams, generate, eos_ids
    from omnikv.methods import get_method
    from omnikv.models import load_model

    py = _lmeval_python()
    tasks, out = tmp_path / "tasks", tmp_path / "out"
    _write_tasks(tasks)
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    server = subprocess.Popen([sys.executable, "-m", "omnikv", "serve", "--model", MODEL, "--port", str(port), "--log-level", "warning"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.stdout.read().decode()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.5)
        lmeval_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        lmeval_env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run(
            ["nice", "-n", "5", str(py), "-m", "lm_eval", "--model", "local-completions",
             "--model_args", f"model={MODEL},base_url=http://127.0.0.1:{port}/v1/completions",
             "--tasks", "omnikv_ll,omnikv_gen", "--include_path", str(tasks), "--output_path", str(out), "--log_samples"],
            env=lmeval_env, capture_output=True, text=True, timeout=1800)
        log = (proc.stdout + proc.stderr)[-6000:]
        assert proc.returncode == 0, log
        assert "remote tokenizer" in log.lower(), log  # tokenizer_backend=auto found /tokenizer_info
    finally:
        server.terminate()
        server.wait(30)

    lm = load_model(MODEL)
    for row, (context, continuation) in zip(_samples(out, "omnikv_ll"), SCORED):
        got = float(row["resps"][0][0][0])
        want, next_token = _offline_loglikelihood(lm, context, continuation)
        assert got == pytest.approx(want, abs=1e-3), (context, continuation)  # a dropped token: > 1e-2
    assert _offline_loglikelihood(lm, *SCORED[0])[1] in eos_ids(lm.model, lm.tokenizer)  # the EOS case is covered
    stops = tuple(UNTIL) + (lm.tokenizer.eos_token,)
    for row, prompt in zip(_samples(out, "omnikv_gen"), PROMPTS):
        ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        want = generate(lm.model, lm.tokenizer, ids, get_method("omnikv"), SamplingParams(max_new_tokens=16, stop=stops)).text
        assert row["resps"][0][0] == want, prompt
