"""Dataset loaders on small fixture files written in the official formats."""

from __future__ import annotations

import json

import pytest

from _eval_helpers import byte_tokenizer
from omnikv.errors import ConfigError, InputError
from omnikv.eval.loaders import is_dataset_task, load_dataset_task
from omnikv.eval.loaders.common import truncate_middle
from omnikv.eval.metrics import score_sample


def _jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def test_truncate_middle_keeps_both_ends():
    tok = byte_tokenizer()
    text = "HEAD" + "x" * 100 + "TAIL"
    out, cut = truncate_middle(tok, text, 20)
    assert cut and out == "HEAD" + "x" * 6 + "x" * 6 + "TAIL"
    assert truncate_middle(tok, "short", 20) == ("short", False)


def test_longbench_hotpotqa(tmp_path):
    _jsonl(tmp_path / "data" / "hotpotqa.jsonl", [
        {"input": "Who wrote it?", "context": "Passage 1: Ann wrote it.", "answers": ["Ann"], "length": 5,
         "dataset": "hotpotqa", "language": "en", "all_classes": None, "_id": "h1"},
        {"input": "Where?", "context": "Passage 1: in Rome.", "answers": ["Rome"], "length": 4,
         "dataset": "hotpotqa", "language": "en", "all_classes": None, "_id": "h2"},
    ])
    samples = load_dataset_task("longbench:hotpotqa", tmp_path, byte_tokenizer(), 4000)
    assert [s.id for s in samples] == ["h1", "h2"]
    s = samples[0]
    assert s.prompt.startswith("Answer the question based on the given passages.")
    assert "Passage 1: Ann wrote it." in s.prompt and s.prompt.endswith("Question: Who wrote it?\nAnswer:")
    assert (s.metric, s.max_new_tokens, s.answers) == ("qa_f1", 32, ["Ann"])
    assert score_sample(s.metric, " Ann.", s.answers, s.metadata) == 1.0
    assert len(load_dataset_task("longbench:hotpotqa", tmp_path, byte_tokenizer(), 4000, n_samples=1)) == 1


def test_longbench_truncation_and_few_shot(tmp_path):
    _jsonl(tmp_path / "trec.jsonl", [
        {"input": "What is X?", "context": "Question: a?\nType: Entity\n" * 50, "answers": ["Location"],
         "length": 300, "dataset": "trec", "language": "en", "all_classes": ["Entity", "Location"], "_id": "t"},
    ])
    s = load_dataset_task("longbench:trec", tmp_path, byte_tokenizer(), 200)[0]
    assert s.metadata["truncated"] and len(s.prompt.encode()) == 200
    assert s.prompt.startswith("Please determine the type") and s.prompt.endswith("What is X?")
    # Only the first line counts for few-shot tasks.
    assert score_sample(s.metric, "Location\nEntity", s.answers, s.metadata) == 1.0
    assert score_sample(s.metric, "Entity\nLocation", s.answers, s.metadata) == 0.0


def test_longbench_e_bucket_and_chinese(tmp_path):
    _jsonl(tmp_path / "data" / "passage_count_e.jsonl", [
        {"input": "", "context": "Paragraph 1: a", "answers": [3], "length": 5000, "dataset": "passage_count",
         "language": "en", "all_classes": None, "_id": "c"},
    ])
    s = load_dataset_task("longbench-e:passage_count", tmp_path, byte_tokenizer(), 1000)[0]
    assert s.metadata["length_bucket"] == "4-8k" and s.answers == ["3"] and s.metric == "count"
    _jsonl(tmp_path / "data" / "multifieldqa_zh.jsonl", [
        {"input": "首都？", "context": "北京是首都。", "answers": ["北京"], "length": 6, "dataset": "multifieldqa_zh",
         "language": "zh", "all_classes": None, "_id": "z"},
    ])
    s = load_dataset_task("longbench:multifieldqa_zh", tmp_path, byte_tokenizer(), 1000)[0]
    assert s.prompt.endswith("问题：首都？\n回答：") and s.metric == "qa_f1_zh"
    with pytest.raises(ConfigError, match="not in LongBench-E"):
        load_dataset_task("longbench-e:narrativeqa", tmp_path, byte_tokenizer(), 1000)


def test_longbench_v2(tmp_path):
    recs = [dict(_id=f"v{i}", domain="Single-Document QA", sub_domain="x", difficulty=d, length=l,
                 question="Which?", choice_A="a", choice_B="b", choice_C="c", choice_D="d", answer="C",
                 context="Some long text.") for i, (d, l) in enumerate([("easy", "short"), ("hard", "long")])]
    (tmp_path / "data.json").write_text(json.dumps(recs))
    samples = load_dataset_task("longbench-v2", tmp_path, byte_tokenizer(), 4000)
    assert len(samples) == 2 and samples[0].metric == "multiple_choice" and samples[0].max_new_tokens == 128
    assert "<text>\nSome long text.\n</text>" in samples[0].prompt and "(C) c" in samples[0].prompt
    assert score_sample("multiple_choice", "The correct answer is (C)", samples[0].answers) == 1.0
    hard = load_dataset_task("longbench-v2:hard", tmp_path, byte_tokenizer(), 4000)
    assert [s.id for s in hard] == ["v1"]


def test_infinitebench(tmp_path):
    _jsonl(tmp_path / "passkey.jsonl", [{"id": 0, "context": "noise " * 10 + "The pass key is 123. ",
                                         "input": "What is the pass key?", "answer": "123", "options": []}])
    _jsonl(tmp_path / "longbook_choice_eng.jsonl", [{"id": 1, "context": "A book.", "input": "Colour?",
                                                     "answer": ["blue"], "options": ["red", "green", "blue", "pink"]}])
    _jsonl(tmp_path / "math_find.jsonl", [{"id": 2, "context": "[1, 5, 3]",
                                           "input": "What is the largest number in the list?", "answer": 5}])
    _jsonl(tmp_path / "code_run.jsonl", [{"id": 3, "context": "def func_1(x): return x", "answer": 4,
                                          "input": "Please give me the exact number of the return value of func_1(4)."}])
    tok = byte_tokenizer()
    s = load_dataset_task("infinitebench:passkey", tmp_path, tok, 1000)[0]
    assert s.prompt.endswith("What is the pass key? The pass key is") and s.max_new_tokens == 6
    assert score_sample(s.metric, " 123.", s.answers) == 1.0
    s = load_dataset_task("infinitebench:longbook_choice_eng", tmp_path, tok, 1000)[0]
    assert "C. blue" in s.prompt
    assert score_sample(s.metric, " C", s.answers, s.metadata) == 1.0
    assert score_sample(s.metric, " A", s.answers, s.metadata) == 0.0
    s = load_dataset_task("infinitebench:math_find", tmp_path, tok, 1000)[0]
    assert s.prompt.startswith("Find the largest number") and s.answers == ["5"]
    s = load_dataset_task("infinitebench:code_run", tmp_path, tok, 1000)[0]
    assert s.prompt.endswith("The value of func_1(4) is") and "called func_1 " in s.prompt


def test_loader_errors(tmp_path):
    tok = byte_tokenizer()
    assert is_dataset_task("longbench:qasper") and not is_dataset_task("passkey")
    with pytest.raises(ConfigError, match="--data-dir"):
        load_dataset_task("longbench:qasper", None, tok, 100)
    with pytest.raises(InputError, match="no LongBench file"):
        load_dataset_task("longbench:qasper", tmp_path, tok, 100)
    with pytest.raises(ConfigError, match="unknown LongBench dataset"):
        load_dataset_task("longbench:nope", tmp_path, tok, 100)
    (tmp_path / "qasper.jsonl").write_text('{"input": "q"}\n')
    with pytest.raises(InputError, match="lacks field"):
        load_dataset_task("longbench:qasper", tmp_path, tok, 100)
    (tmp_path / "qasper.jsonl").write_text('{"input": \n')
    with pytest.raises(InputError, match="not valid JSON"):
        load_dataset_task("longbench:qasper", tmp_path, tok, 100)
