"""`omnikv demo` end to end on the embedded models, at small sizes: the same answer from full
attention and OmniKV, the Context Bank holding the sparse layers' KV on the host side, and the
interleaved decode timing of both."""

from __future__ import annotations

import json

import pytest

from omnikv.cli import main


@pytest.mark.slow
def test_demo_reports_answer_memory_split_and_speed(capsys):
    assert main(["demo", "--tokens", "700", "--speed-context", "2k", "--speed-steps", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    a = out["answer_and_memory"]
    assert a["model"] == "gemma3" and a["prompt_tokens"] == 700
    # The preset's 1024-token budget covers a 700-token prompt: OmniKV is exact here.
    assert a["answers"]["full"] == a["answers"]["omnikv"] and a["finds_key"]["full"]
    assert a["host_kv_bytes"]["full"] == 0 < a["host_kv_bytes"]["omnikv"]  # the Context Bank
    assert a["sparse_layers"] == [11, 17] and a["full_attention_layers"] == 3 and a["layers"] == 18
    s = out["speed"]
    assert s["model"] == "smollm2" and s["context"] == 2048 and s["steps"] == 3
    assert s["ms_per_token"]["full"] > 0 and s["ms_per_token"]["omnikv"] > 0 and s["speedup"] > 0
    text_args = ["demo", "--tokens", "700", "--no-speed"]
    assert main(text_args) == 0
    text = capsys.readouterr().out
    for label in ("1. The same answer.", "2. Where the KV lives (Context Bank on).", "On a GPU:", "(Context Bank)"):
        assert label in text
