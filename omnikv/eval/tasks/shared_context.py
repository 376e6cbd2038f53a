"""Shared-context multi-question task (the SCBench setting), generated without downloads.

One long document is prefilled once; then several questions are asked in turn, each about a
different part of it, each after the previous answer (a chat about a document, or a prefix cache
reused by later requests). A method that decides what to keep at the end of prefill (SnapKV, H2O,
StreamingLLM) must decide before any question is known; a drop-free one (OmniKV, Quest) can still
find every part. How the runner asks the questions: `omnikv.eval.multiturn`.

Document: a prose haystack with `n_questions` needles "The special magic number for <key> is:
<7 digits>." at depths spread over the document (one per equal slice of it, seeded jitter, so
every question needs a different part); the questions come in a seeded random order, so that the
question index (asked first, second, ...) is not confounded with the depth. The `Sample.prompt` is
the document (fitted to exactly `length_tokens` tokens); `metadata["questions"]` holds per question
its text, answer and needle depth. Scored per question (string match of the number).
"""

from __future__ import annotations

import random
from typing import Any

from omnikv.errors import ConfigError
from omnikv.eval.tasks.base import Sample, check_common, fit_length, insert_at_depths
from omnikv.eval.tasks.text import ADJECTIVES, HAYSTACKS, NOUNS, UnitPool, unit_source

TASK = "shared_context"
_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
          "I will quiz you about the numbers afterwards, one at a time.\n")
_NEEDLE = "The special magic number for {key} is: {value}."
_QUESTION = ("\nWhat is the special magic number for {key} mentioned in the provided text?"
             " The special magic number for {key} mentioned in the provided text is")
ANSWER_TOKENS = 16  # a 7-digit number is <= 10 tokens with every tokenizer we use


def shared_context(
    tokenizer: Any,
    length_tokens: int,
    n_samples: int,
    seed: int = 0,
    *,
    n_questions: int = 4,
    haystack: str = "narrative",
    documents: str | None = None,
) -> list[Sample]:
    """`n_samples` documents of exactly `length_tokens` tokens, `n_questions` (3-5) questions each;
    or, with `documents` (a JSONL file, see omnikv.eval.tasks.user_documents), the user's own
    documents (at most `length_tokens` tokens each) and questions."""
    check_common(length_tokens, n_samples)
    if documents is not None:
        from omnikv.eval.tasks.user_documents import user_documents

        return user_documents(tokenizer, length_tokens, n_samples, documents)
    if not isinstance(n_questions, int) or not 3 <= n_questions <= 5:
        raise ConfigError(f"shared_context n_questions must be 3, 4 or 5; got {n_questions!r}")
    if haystack not in HAYSTACKS:
        raise ConfigError(f"unknown haystack {haystack!r}; choose one of {', '.join(HAYSTACKS)}")
    samples = []
    for i in range(n_samples):
        rng = random.Random(f"{TASK}:{seed}:{i}")
        keys: list[str] = []
        while len(keys) < n_questions:
            key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
            if key not in keys:
                keys.append(key)
        values = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
        # One needle per equal slice of the document: every question needs another part of it.
        depths = [(j + 0.1 + 0.8 * rng.random()) / n_questions for j in range(n_questions)]
        needles = [(d, _NEEDLE.format(key=k, value=v)) for d, k, v in zip(depths, keys, values)]
        order = list(range(n_questions))
        rng.shuffle(order)
        pool = UnitPool(unit_source(haystack, seed * 1_000_003 + i))

        def render(n: int, pad: str, _pool: UnitPool = pool, _needles: list = needles) -> str:
            return _INTRO + " ".join(insert_at_depths(_pool.take(n), _needles)) + pad

        prompt, n_units, n_tok = fit_length(tokenizer, render, length_tokens, tail=pool.tail(" "),
                                            what=f"{TASK} document")
        questions = [{"text": _QUESTION.format(key=keys[j]), "answers": [values[j]], "depth": depths[j],
                      "needle": j} for j in order]
        samples.append(Sample(
            id=f"{TASK}-{length_tokens}-{seed}-{i}", task=TASK, prompt=prompt, answers=values,
            metric="string_match_all", max_new_tokens=ANSWER_TOKENS,
            metadata=dict(questions=questions, haystack=haystack, haystack_units=n_units,
                          target_length=length_tokens, length=n_tok, seed=seed),
        ))
    return samples
