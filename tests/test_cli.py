"""The user-facing commands: generate, chat, compare, models (omnikv/cli/cmd_*.py, omnikv/cli/demo.py).

Most tests run the real command as a subprocess on a tiny random checkpoint (byte-level tokenizer:
one token per UTF-8 byte, ChatML template) and check its output against the library run in-process.
Flag-validation errors and `models` run through `omnikv.cli.main` in-process (same code path, no
interpreter start-up); two error cases run as subprocesses to check that no traceback escapes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from omnikv.cli import main
from omnikv.models.tiny import make_tiny_checkpoint

PROMPT = "Tell me about the old lighthouse by the sea."


def run_cli(*args: str, stdin: str | bytes | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    data = stdin.encode() if isinstance(stdin, str) else stdin
    return subprocess.run([sys.executable, "-m", "omnikv", *args], input=data, capture_output=True,
                          env=env, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    err = proc.stderr.decode()
    assert proc.returncode != 0, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", "llama"))


@pytest.fixture(scope="module")
def lm(ckpt):
    from omnikv.models import load_model

    return load_model(ckpt, device="cpu")


def reference(lm, ids, method="full", max_new_tokens=8, **opts):
    from omnikv.decoding.generation import SamplingParams, generate
    from omnikv.methods import get_method

    return generate(lm.model, lm.tokenizer, ids, get_method(method, **opts), SamplingParams(max_new_tokens=max_new_tokens))


def chatml(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


# ------------------------------------------------------------------------------------------ generate


def test_generate_json_full_matches_library(ckpt, lm):
    proc = run_cli("generate", "--model", ckpt, "--method", "full", "--max-new-tokens", "8", "--json", PROMPT)
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(proc.stdout)
    for key in ("text", "prompt_tokens", "generated_tokens", "prefill_seconds", "decode_tokens_per_second",
                "device_kv_bytes", "host_kv_bytes", "method", "config"):
        assert key in out
    # The tokenizer has a chat template, so the prompt went through it (one token per byte + 3 specials).
    ids = lm.tokenizer(chatml(PROMPT), add_special_tokens=False)["input_ids"]
    n_bytes = len(chatml(PROMPT).encode())
    assert out["prompt_tokens"] == len(ids) == n_bytes - 2 * len("<|im_start|>") - len("<|im_end|>") + 3
    ref = reference(lm, ids)
    assert out["text"] == ref.text and out["token_ids"] == ref.token_ids
    assert out["generated_tokens"] == ref.generated_tokens
    assert out["method"] == "full" and out["chat"] is True
    assert out["device_kv_bytes"] > 0 and out["host_kv_bytes"] == 0


def test_generate_omnikv_full_budget_equals_full_attention_from_prompt_file(ckpt, lm, tmp_path):
    # At budget 1.0 the sparse layers attend to every prompt token: OmniKV is exact.
    f = tmp_path / "prompt.txt"
    f.write_text(PROMPT, encoding="utf-8")
    proc = run_cli("generate", "--model", ckpt, "--prompt-file", str(f), "--budget", "1.0", "--filter-layers", "1",
                   "--max-new-tokens", "8", "--prefill-chunk-size", "16", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(proc.stdout)
    ids = lm.tokenizer(chatml(PROMPT), add_special_tokens=False)["input_ids"]
    assert out["text"] == reference(lm, ids).text
    assert out["method"] == "omnikv"
    assert out["config"]["filter_layers"] == [1] and out["config"]["budget"] == 1.0


def test_generate_stdin_raw_prompt_with_baseline(ckpt, lm):
    text = "Once upon a time, in a quiet valley"
    proc = run_cli("generate", "--model", ckpt, "--no-chat", "--method", "h2o", "--budget", "16",
                   "--max-new-tokens", "6", "--json", stdin=text)
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(proc.stdout)
    # Byte-level tokenizer, no BOS: one token per byte.
    assert out["prompt_tokens"] == len(text.encode())
    assert out["method"] == "h2o" and out["config"]["budget"] == 16 and out["chat"] is False
    ids = list(lm.tokenizer(text, add_special_tokens=True)["input_ids"])
    assert out["text"] == reference(lm, ids, "h2o", max_new_tokens=6, budget=16).text


def test_generate_streams_text_and_prints_stats_line(ckpt, lm):
    proc = run_cli("generate", "--model", ckpt, "--method", "full", "--max-new-tokens", "8", PROMPT)
    assert proc.returncode == 0, proc.stderr.decode()
    ids = lm.tokenizer(chatml(PROMPT), add_special_tokens=False)["input_ids"]
    assert proc.stdout.decode() == reference(lm, ids).text + "\n"
    stats = proc.stderr.decode().strip().splitlines()[-1]
    assert f"prompt {len(ids)} tokens" in stats and "prefill" in stats and "tok/s" in stats and "on host" in stats


# ------------------------------------------------------------------------------------------ chat


def test_chat_reads_the_document_once(ckpt, lm, tmp_path):
    doc = tmp_path / "doc.txt"
    document = "The lighthouse keeper painted the door blue. " * 12
    doc.write_text(document, encoding="utf-8")
    turns = "What colour is the door?\n\nWho painted it?\n/exit\nnever asked\n"
    proc = run_cli("chat", "--model", ckpt, "--context-file", str(doc), "--method", "full", "--max-new-tokens", "4",
                   "--prefill-chunk-size", "64", "--json", stdin=turns)
    assert proc.returncode == 0, proc.stderr.decode()
    rows = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [r["question"] for r in rows] == ["What colour is the door?", "Who painted it?"]
    first, second = rows
    tok = lm.tokenizer
    first_ids = tok(chatml(f"Document:\n{document}\n\nQuestion: What colour is the door?"),
                    add_special_tokens=False)["input_ids"]
    # The document (up to "Question:") was prefilled before the question was read.
    doc_ids = tok(chatml(f"Document:\n{document}\n\n").split("<|im_end|>")[0], add_special_tokens=False)["input_ids"]
    assert first["document_tokens"] == len(doc_ids) and first_ids[: len(doc_ids)] == doc_ids
    assert first["prefill_tokens"] == len(first_ids) - len(doc_ids) and first["prompt_tokens"] == len(first_ids)
    # Turn 2 reads only the end of turn 1 and the new question, not the document again. A turn cut by
    # max_new_tokens leaves its last sampled token to be fed with the next turn.
    new_ids = tok("<|im_end|>\n" + chatml("Who painted it?"), add_special_tokens=False)["input_ids"]
    carried = 1 if first["finish_reason"] == "length" else 0
    assert second["prefill_tokens"] == len(new_ids) + carried
    assert second["prompt_tokens"] == len(first_ids) + first["generated_tokens"] + len(new_ids)
    assert second["prefill_tokens"] < len(document.encode()) // 4
    # The session's answer equals full attention over the whole conversation read at once.
    convo = first_ids + first["token_ids"] + new_ids
    assert len(convo) == second["prompt_tokens"]
    assert second["token_ids"] == reference(lm, convo, max_new_tokens=4).token_ids


def test_chat_base_model_format_and_stats(ckpt, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("A short note about apples. " * 8, encoding="utf-8")
    proc = run_cli("chat", "--model", ckpt, "--context-file", str(doc), "--no-chat", "--max-new-tokens", "3",
                   stdin="First?\nSecond?\n")
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stderr.decode().splitlines()
    stats = [ln for ln in lines if ln.startswith("[turn")]
    assert len(stats) == 2
    n_doc = len(f"Document:\n{'A short note about apples. ' * 8}\n\n".encode())
    assert any(ln.startswith(f"[document] read {n_doc} tokens") for ln in lines)  # before any question
    assert f"read {len('Question: First?' + chr(10) + 'Answer:')} new tokens" in stats[0]
    m = re.search(r"read (\d+) new tokens \(document not re-read", stats[1])
    assert m, stats[1]
    # "\n\nQuestion: Second?\nAnswer:" (27 bytes; fewer newlines when the answer already ended in
    # some) plus at most the carried last token.
    assert 25 <= int(m.group(1)) <= 28


# ------------------------------------------------------------------------------------------ compare


def test_compare_demo_json(ckpt, lm):
    # Budget 1.0: OmniKV is exact, so both answers must be identical.
    proc = run_cli("compare", "--model", ckpt, "--demo-tokens", "300", "--budget", "1.0", "--max-new-tokens", "6",
                   "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(proc.stdout)
    assert out["prompt_tokens"] == 300 and out["demo"]["tokens"] == 300
    full, omni = out["results"]["full"], out["results"]["omnikv"]
    assert full["text"] == omni["text"]
    assert out["identical"] is True and out["agree"] is True
    assert out["common_prefix_tokens"] == full["generated_tokens"]
    from omnikv.cli.demo import demo_prompt, first_number

    demo = demo_prompt(lm.tokenizer, 300)
    assert out["demo"]["key"] == demo.key
    assert out["found_key"] == {"full": first_number(full["text"]) == demo.key,
                                "omnikv": first_number(omni["text"]) == demo.key}
    assert full["text"] == reference(lm, lm.tokenizer(demo.prompt)["input_ids"], max_new_tokens=6).text


def test_compare_prompt_text_report(ckpt):
    proc = run_cli("compare", "--model", ckpt, "--method", "streaming_llm", "--budget", "8", "--max-new-tokens",
                   "4", "--quiet", PROMPT)
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    header = next(ln for ln in out.splitlines() if "full" in ln and "streaming_llm" in ln)
    assert header.split() == ["full", "streaming_llm"]
    for label in ("prefill", "decode", "device KV", "host KV", "answers agree:"):
        assert label in out


# ------------------------------------------------------------------------------------------ models


def test_models_lists_presets_and_embedded(capsys):
    from omnikv.methods import available_methods
    from omnikv.models import EMBEDDED_MODELS
    from omnikv.algorithm.presets import PRESETS

    assert main(["models", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in out["presets"]] == [p.name for p in PRESETS]
    assert [p["filter_layers"] for p in out["presets"]] == [list(p.config.filter_layers) for p in PRESETS]
    assert [e["name"] for e in out["embedded_models"]] == list(EMBEDDED_MODELS)
    assert out["methods"] == available_methods()
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    for p in PRESETS:
        assert p.name in text
    for name in EMBEDDED_MODELS:
        assert re.search(rf"^{name}\s+(yes|no)", text, re.M)


# ------------------------------------------------------------------------------------------ errors


def test_eval_lists_every_method_with_its_kind_and_options(capsys):
    from omnikv.methods import available_methods

    assert main(["eval", "--list-methods"]) == 0
    lines = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()}
    assert sorted(lines) == available_methods()
    assert lines["infllm"][0] == lines["tidaldecode"][0] == lines["quest"][0] == "drop-free"
    assert lines["h2o"][0] == "lossy" and lines["full"][0] == "exact"
    assert "selection_layers" in lines["tidaldecode"][-1] and "block_size," in lines["infllm"]


def test_non_utf8_prompt_file_is_one_line(ckpt, tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9 au lait".encode("latin-1"))
    proc = run_cli("generate", "--model", ckpt, "--prompt-file", str(f))
    assert_one_line_error(proc, "not UTF-8", "offset 3")


def test_prompt_longer_than_context_is_one_line(tmp_path):
    small = make_tiny_checkpoint(tmp_path / "small", "llama", max_position_embeddings=64)
    proc = run_cli("generate", "--model", str(small), "--no-chat", "x" * 100)
    assert_one_line_error(proc, "100 tokens", "context is 64")


def _in_process(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["generate", "--budget", "-1", "hi"], "--budget"),
        (["generate", "--budget", "1.5", "hi"], "(0, 1]"),
        (["generate", "--budget", "lots", "hi"], "--budget"),
        (["generate", "--filter-layers", "x,y", "hi"], "--filter-layers"),
        (["generate", "--filter-layers", "3,3", "hi"], "repeat"),
        (["generate", "--temperature", "-1", "hi"], "temperature"),
        (["generate", "--max-new-tokens", "0", "hi"], "--max-new-tokens"),
        (["generate", "--method", "nosuch", "hi"], "unknown method 'nosuch'"),
        (["generate", "--method", "full", "--filter-layers", "2", "hi"], "omnikv method only"),
        (["generate", "--preset", "nosuch-preset", "hi"], "preset"),
        (["generate", "   "], "empty"),
        (["compare", "--method", "full"], "reference"),
        (["compare", "--demo-depth", "2"], "--demo-depth"),
        (["generate", "--prompt-file", "/nonexistent/nope.txt"], "nope.txt does not exist"),
        (["chat", "--context-file", "/nonexistent/doc.txt"], "does not exist"),
    ],
)
def test_bad_flags_are_one_line_errors(argv, needle, ckpt, capsys):
    if argv[0] != "compare":
        argv = [argv[0], "--model", ckpt, *argv[1:]]
    code, err = _in_process(argv, capsys)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], err
    assert lines[0].startswith(f"omnikv {argv[0]}: error:")


def test_missing_model_is_one_line(capsys, tmp_path):
    code, err = _in_process(["generate", "--model", str(tmp_path / "no-model"), "hi"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no such file or directory" in err


# ------------------------------------------------------------------------------------------ demo


def test_demo_prompt_length_key_and_depth(lm):
    from omnikv.cli.demo import ANSWER_PREFIX, INTRO, QUESTION, demo_prompt

    for depth in (0.0, 0.5, 1.0):
        d = demo_prompt(lm.tokenizer, 2000, depth=depth, seed=3)
        assert d.tokens == 2000 == len(d.prompt.encode())  # byte-level: tokens == bytes
        assert d.prompt.endswith(ANSWER_PREFIX)
        assert re.fullmatch(r"\d{5}", d.key)
        # The key is the only number in the story, and sits at the asked depth.
        assert set(re.findall(r"\d+", d.prompt)) == {d.key}
        story = d.prompt[len(INTRO):d.prompt.rindex(QUESTION)]
        at = story.index(f"The pass key is {d.key}.") / len(story)
        assert abs(at - depth) < 0.1
    assert demo_prompt(lm.tokenizer, 500, seed=3) == demo_prompt(lm.tokenizer, 500, seed=3)
    assert demo_prompt(lm.tokenizer, 500, seed=4).key != demo_prompt(lm.tokenizer, 500, seed=3).key
    assert d.found(" 12 then " + d.key) is False and d.found(f" {d.key}. Remember it.") is True


# ------------------------------------------------------------------------------------------ real model


@pytest.mark.slow
def test_compare_gemma3_finds_the_key():
    proc = run_cli("compare", "--model", "gemma3", "--demo-tokens", "2000", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(proc.stdout)
    assert out["prompt_tokens"] == 2000
    assert out["found_key"] == {"full": True, "omnikv": True}, out
    assert out["agree"] is True


def test_generate_telemetry_reports_coverage():
    """--telemetry adds the per-layer coverage of the selection to the JSON result."""
    import json as _json
    import subprocess as _sp
    import sys as _sys
    import tempfile

    from omnikv.models.tiny import make_tiny_checkpoint

    with tempfile.TemporaryDirectory() as d:
        ckpt = make_tiny_checkpoint(d + "/m", family="llama")
        r = _sp.run([_sys.executable, "-m", "omnikv", "generate", "--model", str(ckpt), "--no-chat",
                     "--filter-layers", "1", "--num-wait-layers", "0", "--budget", "16", "--sink-tokens", "2", "--recent-tokens", "4", "--max-new-tokens", "4",
                     "--telemetry", "--json", "x" * 120], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        tel = _json.loads(r.stdout)["telemetry"]
        assert set(tel["layers"]) == {"2", "3"}
        assert 0 < tel["mean_coverage"] <= 1 and 0 <= tel["mean_recall"] <= 1
        r = _sp.run([_sys.executable, "-m", "omnikv", "generate", "--model", str(ckpt), "--method", "full",
                     "--telemetry", "hi"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "omnikv method only" in r.stderr
