"""The shared-context multi-question task: generator, the ask-in-turn flow, runner and report."""

from __future__ import annotations

import json

import pytest
import torch

from omnikv.cli import main
from omnikv.errors import ConfigError
from omnikv.eval.multiturn import ask_in_turn, encode_question
from omnikv.eval.runner import read_predictions
from omnikv.eval.tasks import count_tokens, generate_samples
from omnikv.decoding.fork import SharedPrefill
from omnikv.decoding.generation import SamplingParams
from omnikv.methods import get_method
from omnikv.models.tiny import build_tokenizer, tiny_model

from _eval_helpers import bpe_tokenizer

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:no OmniKV preset")]


@pytest.mark.parametrize("n_questions", [3, 5])
def test_documents_have_one_needle_per_slice_and_questions_in_seeded_order(n_questions):
    tok = bpe_tokenizer()
    samples = generate_samples("shared_context", tok, 600, 3, seed=2, n_questions=n_questions)
    assert samples == generate_samples("scbench", tok, 600, 3, seed=2, n_questions=n_questions)
    orders = set()
    for s in samples:
        assert count_tokens(tok, s.prompt) == 600
        qs = s.metadata["questions"]
        assert len(qs) == n_questions and sorted(q["needle"] for q in qs) == list(range(n_questions))
        for q in qs:  # needle j sits in slice j of the document, its number is in the document once
            assert q["needle"] / n_questions <= q["depth"] < (q["needle"] + 1) / n_questions
            assert s.prompt.count(q["answers"][0]) == 1 and q["answers"][0] not in q["text"]
        assert len({q["answers"][0] for q in qs}) == n_questions
        orders.add(tuple(q["needle"] for q in qs))
    assert len(orders) > 1  # the asking order is not the document order every time
    with pytest.raises(ConfigError, match="n_questions"):
        generate_samples("shared_context", tok, 600, 1, n_questions=2)


def test_questions_are_decode_steps_after_the_document():
    """Each question goes in token by token after the prefilled document: a lossy method compacts
    on the document alone (before the first question) and full attention's answers are those of
    one long prompt; a fork of a shared prefill gives the same answers."""
    model, tok = tiny_model("llama"), build_tokenizer()
    torch.manual_seed(0)
    doc = torch.randint(0, 256, (90,), generator=torch.Generator().manual_seed(5)).tolist()
    qs = [encode_question(tok, "\nQ one?"), encode_question(tok, "\nQ2?"), [65]]
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    full = ask_in_turn(model, tok, get_method("full"), doc, qs, params)
    # Full attention: answer i = greedy continuation of doc + (q, answer)... + q_i as one prompt.
    history = list(doc)
    from omnikv.decoding.generation import generate
    for q, res in zip(qs, full):
        history += q
        alone = generate(model, tok, history, "full", params)
        assert alone.token_ids == res.token_ids
        history += res.token_ids
    snap = get_method("snapkv", budget=24, window_size=8)
    cache_holder = []
    make = snap.make_cache
    snap.make_cache = lambda m: cache_holder.append(make(m)) or cache_holder[-1]
    ask_in_turn(model, tok, snap, doc, qs[:1], params)
    for layer in cache_holder[0].lossy_layers():
        assert layer.prompt_len == 90  # compacted on the document alone, questions came as steps
    shared = SharedPrefill.run(model, doc, tail=16)
    forked = ask_in_turn(model, tok, get_method("full"), doc, qs, params, shared=shared)
    assert [r.token_ids for r in forked] == [r.token_ids for r in full]


def test_runner_scores_every_question_and_reports_per_index(tmp_path):
    from omnikv.models.tiny import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "run"
    args = ["eval", "--model", str(ckpt), "--output", str(out), "--methods", "full,snapkv",
            "--tasks", "shared_context", "--lengths", "420", "--samples", "2", "--budget", "0.5",
            "--max-new-tokens", "2", "--task-opt", "n_questions=3", "--no-progress"]
    assert main(args) == 0
    recs = read_predictions(out / "predictions.jsonl")
    assert len(recs) == 2 * 2 * 3  # methods x samples x questions
    assert {r["question_index"] for r in recs} == {0, 1, 2}
    assert all(r["sample_id"].endswith(f"/q{r['question_index']}") for r in recs)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {(p["method"], p["question_index"]) for p in metrics["per_question"]} == {
        (m, i) for m in ("full", "snapkv") for i in range(3)}
    assert all(p["n"] == 2 for p in metrics["per_question"])
    assert "per question index" in (out / "summary.md").read_text()
    assert main(args + ["--resume"]) == 0  # nothing left to do
    assert json.loads((out / "run.json").read_text())["new_records"] == 0


def _write_documents(path, lines):
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n", encoding="utf-8")
    return path


def test_user_documents_run_with_their_questions_in_order(tmp_path):
    """--documents: each document is one sample, its questions asked in the file's order after it
    (as ask_in_turn asks them), each scored against its own answers."""
    from omnikv.eval.metrics import score_sample
    from omnikv.eval.tasks import encode_prompt
    from omnikv.eval.tasks.user_documents import QUESTION_TEMPLATE
    from omnikv.models import load_model
    from omnikv.models.tiny import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    (tmp_path / "story.txt").write_text("Ada wrote the manual in 1843 near the river. " * 6, encoding="utf-8")
    docs = _write_documents(tmp_path / "docs.jsonl", [
        "# my documents",
        {"id": "manual", "document_file": "story.txt",
         "questions": [{"question": "Who wrote it?", "answers": ["Ada"]}, {"question": "When?", "answers": ["1843"]}]},
        {"document": "The key is blue. " * 10, "questions": [{"question": "Which colour?", "answers": "blue"}],
         "question_template": " Q: {question} A:"},
    ])
    out = tmp_path / "run"
    assert main(["eval", "--model", str(ckpt), "--output", str(out), "--methods", "full,snapkv",
                 "--documents", str(docs), "--lengths", "400", "--samples", "5", "--max-new-tokens", "3",
                 "--no-progress"]) == 0
    recs = read_predictions(out / "predictions.jsonl")
    assert len(recs) == 2 * 3  # methods x questions of both documents
    full = {r["sample_id"]: r for r in recs if r["method"] == "full"}
    assert set(full) == {"shared_context-file-manual/q0", "shared_context-file-manual/q1", "shared_context-file-line3/q0"}
    assert full["shared_context-file-manual/q1"]["answers"] == ["1843"]
    assert full["shared_context-file-line3/q0"]["answers"] == ["blue"]
    for r in recs:
        assert r["score"] == score_sample(r["metric"], r["prediction"], r["answers"])
    lm = load_model(ckpt)
    doc = (tmp_path / "story.txt").read_text(encoding="utf-8")
    qs = [encode_question(lm.tokenizer, QUESTION_TEMPLATE.format(question=q)) for q in ("Who wrote it?", "When?")]
    ref = ask_in_turn(lm.model, lm.tokenizer, get_method("full"), encode_prompt(lm.tokenizer, doc), qs,
                      SamplingParams(max_new_tokens=3, temperature=0.0, stop=("\n",)))
    assert [full[f"shared_context-file-manual/q{i}"]["prediction"] for i in (0, 1)] == [r.text for r in ref]


@pytest.mark.parametrize("lines, message", [
    (["{not json"], r"docs.jsonl:1: not valid JSON"),
    ([[1, 2]], r"docs.jsonl:1: a line must hold one JSON object"),
    ([{"questions": [{"question": "q", "answers": ["a"]}]}], "exactly one of `document`"),
    ([{"document": "d", "questions": []}], "`questions` must be a non-empty list"),
    ([{"document": "d", "questions": [{"question": "q"}]}], "needs `answers`"),
    ([{"document": "d", "questions": [{"question": "q", "answers": ["a"], "hint": 1}]}], "keys question and answers"),
    ([{"document": "d", "text": "x", "questions": [{"question": "q", "answers": ["a"]}]}], "unknown key"),
    ([{"document_file": "missing.txt", "questions": [{"question": "q", "answers": ["a"]}]}], "missing.txt does not exist"),
    ([{"document": "d", "question_template": "no slot", "questions": [{"question": "q", "answers": ["a"]}]}],
     "must be a string containing"),
    ([{"id": "x", "document": "d", "questions": [{"question": "q", "answers": ["a"]}]},
      {"id": "x", "document": "e", "questions": [{"question": "q", "answers": ["a"]}]}], "docs.jsonl:2: id 'x' is used twice"),
    (["", "# only a comment"], "holds no document"),
])
def test_bad_documents_files_say_what_to_fix(tmp_path, lines, message):
    from omnikv.errors import InputError
    from omnikv.eval.tasks.user_documents import read_documents

    path = _write_documents(tmp_path / "docs.jsonl", lines)
    with pytest.raises(InputError, match=message):
        read_documents(path)


def test_documents_cli_errors(tmp_path, capsys):
    from omnikv.models.tiny import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    docs = _write_documents(tmp_path / "docs.jsonl", [{"document": "word " * 300,
                                                        "questions": [{"question": "q", "answers": ["a"]}]}])
    base = ["eval", "--model", str(ckpt), "--documents", str(docs), "--no-progress"]
    assert main(base + ["--output", str(tmp_path / "a"), "--lengths", "100"]) == 2
    assert "is 1500 tokens, longer than the length 100; pass --lengths 1500 or more" in capsys.readouterr().err  # bytes
    assert main(base + ["--output", str(tmp_path / "b"), "--tasks", "passkey"]) == 2
    assert "add shared_context to --tasks" in capsys.readouterr().err
    assert main(base + ["--output", str(tmp_path / "c"), "--documents", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl does not exist" in capsys.readouterr().err
