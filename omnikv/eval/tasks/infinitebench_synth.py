"""InfiniteBench's synthetic tasks generated locally: passkey, number_string, kv_retrieval, math_find.

Prompts follow InfiniteBench's base-model templates, ending with an answer prefix; the noise
haystack is the same repeated five sentences InfiniteBench uses (`haystack="narrative"` works far
better for small models, see docs/evaluation.md). Scoring follows InfiniteBench: first integer of
the output (passkey, number_string), key's value among the output's words (kv_retrieval), first
number (math_find).
"""

from __future__ import annotations

import json
import random
import statistics
from typing import Any, Callable

from omnikv.errors import ConfigError
from omnikv.eval.tasks.base import (Sample, check_common, check_question_position, fit_length, insert_at_depths,
                                    sample_id, spread_depths)
from omnikv.eval.tasks.ruler import make_uuid
from omnikv.eval.tasks.text import UnitPool, unit_source

_RETRIEVE_TEMPLATE = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n{context}\n\n{question} {prefix}"
)
# Question before the haystack; after it only the answer prefix.
_RETRIEVE_BEFORE_TEMPLATE = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "{question}\n\n{context}\n\n{prefix}"
)


def _needle_retrieval(
    tokenizer: Any, length_tokens: int, n_samples: int, seed: int, *, task: str, haystack: str,
    digits: int, noun: str, question: str, max_new_tokens: int, question_position: str = "after",
) -> list[Sample]:
    check_common(length_tokens, n_samples)
    check_question_position(question_position, task)
    template = _RETRIEVE_TEMPLATE if question_position == "after" else _RETRIEVE_BEFORE_TEMPLATE
    samples = []
    for i, depth in enumerate(spread_depths(n_samples)):
        rng = random.Random(f"{task}:{seed}:{i}")
        value = str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))
        needle = f"The {noun} is {value}. Remember it. {value} is the {noun}."
        pool = UnitPool(unit_source(haystack, seed * 1_000_003 + i))
        prefix = f"The {noun} is"

        def render(n: int, pad: str, _pool: UnitPool = pool, _needle: str = needle, _d: float = depth) -> str:
            context = " ".join(insert_at_depths(_pool.take(n), [(_d, _needle)])) + pad
            return template.format(context=context, question=question, prefix=prefix)

        prompt, n_units, n_tok = fit_length(tokenizer, render, length_tokens, tail=pool.tail(" "), what=f"{task} prompt")
        samples.append(Sample(
            id=sample_id(task, length_tokens, seed, i, question_position), task=task, prompt=prompt,
            answers=[value], metric="first_int_match", max_new_tokens=max_new_tokens,
            metadata=dict(depth=depth, needles=[needle], haystack=haystack, haystack_units=n_units,
                          target_length=length_tokens, length=n_tok, seed=seed, question=question,
                          question_position=question_position),
        ))
    return samples


def passkey(tokenizer: Any, length_tokens: int, n_samples: int, seed: int = 0, *,
            haystack: str = "noise", question_position: str = "after") -> list[Sample]:
    """InfiniteBench passkey: a 5-digit key in a haystack; answer prefix "The pass key is"."""
    return _needle_retrieval(tokenizer, length_tokens, n_samples, seed, task="passkey", haystack=haystack,
                             digits=5, noun="pass key", question="What is the pass key?", max_new_tokens=6,
                             question_position=question_position)


def number_string(tokenizer: Any, length_tokens: int, n_samples: int, seed: int = 0, *,
                  haystack: str = "noise", question_position: str = "after") -> list[Sample]:
    """InfiniteBench number_string: a 10-digit sequence in a haystack."""
    return _needle_retrieval(tokenizer, length_tokens, n_samples, seed, task="number_string",
                             haystack=haystack, digits=10, noun="sequence of digits",
                             question="What is the sequence of digits?", max_new_tokens=12,
                             question_position=question_position)


_KV_TEMPLATE = (
    "Extract the value corresponding to the specified key in the JSON object below.\n\n"
    "JSON data:\n{context}\n\nKey: \"{key}\"\nThe value associated with the specified key is: "
)
_KV_BEFORE_TEMPLATE = (
    "Extract the value corresponding to the specified key in the JSON object below.\n\n"
    "Key: \"{key}\"\n\nJSON data:\n{context}\n\nThe value associated with the key given above is: "
)


def kv_retrieval(tokenizer: Any, length_tokens: int, n_samples: int, seed: int = 0, *,
                 question_position: str = "after") -> list[Sample]:
    """InfiniteBench kv_retrieval: a JSON object of UUID -> UUID; the asked pair sits at the
    sample's depth (evenly spread); the number of pairs fits the length. `question_position="before"`
    names the key ahead of the JSON object."""
    check_common(length_tokens, n_samples)
    task = "kv_retrieval"
    check_question_position(question_position, task)
    template = _KV_TEMPLATE if question_position == "after" else _KV_BEFORE_TEMPLATE
    samples = []
    for i, depth in enumerate(spread_depths(n_samples)):
        rng = random.Random(f"{task}:{seed}:{i}")
        key, value = make_uuid(rng), make_uuid(rng)
        pool = UnitPool(lambda j, _i=i: (lambda r: (make_uuid(r), make_uuid(r)))(random.Random(f"{task}:{seed}:{_i}:{j}")))

        def render(n: int, pad: str, _pool: UnitPool = pool, _k: str = key, _v: str = value, _d: float = depth) -> str:
            pairs = [(_k, _v) if isinstance(p, str) else p
                     for p in insert_at_depths(_pool.take(n), [(_d, "needle")])]  # type: ignore[arg-type]
            context = json.dumps(dict(pairs)) + pad
            return template.format(context=context, key=_k)

        prompt, n_units, n_tok = fit_length(tokenizer, render, length_tokens, min_units=1, what="kv_retrieval prompt")
        samples.append(Sample(
            id=sample_id(task, length_tokens, seed, i, question_position), task=task, prompt=prompt,
            answers=[value], metric="kv_retrieval", max_new_tokens=50,
            metadata=dict(depth=depth, key=key, n_pairs=n_units + 1, target_length=length_tokens, length=n_tok,
                          seed=seed, question_position=question_position),
        ))
    return samples


_MATH_FIND_TEMPLATE = (
    "Find the {what} number from the list below:\n\n{context}\n\n"
    "You should answer with only one number, no other words. The {what} number of the list is: "
)
MATH_FIND_KINDS = ("largest", "smallest", "median")


def math_find(tokenizer: Any, length_tokens: int, n_samples: int, seed: int = 0, *,
              kind: str | None = None) -> list[Sample]:
    """InfiniteBench math_find: the largest / smallest / median of a long list of integers.

    `kind=None` cycles through the three over samples. max_new_tokens is 8 (InfiniteBench: 3,
    enough only for tokenizers that merge digits). List values lie in [0, 10000); for largest /
    smallest the answer is an out-of-range value planted at the sample's depth (so depth matters and
    the answer cannot be guessed from the range). Median is the lower median of the fitted list."""
    check_common(length_tokens, n_samples)
    if kind is not None and kind not in MATH_FIND_KINDS:
        raise ConfigError(f"math_find kind must be one of {', '.join(MATH_FIND_KINDS)}, got {kind!r}")
    task = "math_find"
    samples = []
    for i, depth in enumerate(spread_depths(n_samples)):
        k = kind or MATH_FIND_KINDS[i % len(MATH_FIND_KINDS)]
        rng = random.Random(f"{task}:{seed}:{i}")
        planted = {"largest": 10_000 + rng.randrange(90_000), "smallest": -1 - rng.randrange(9_999)}.get(k)
        pool = UnitPool(lambda j, _i=i: str(random.Random(f"{task}:{seed}:{_i}:{j}").randrange(10_000)))

        def values(n: int, _pool: UnitPool = pool, _p: int | None = planted, _d: float = depth) -> list[str]:
            units = _pool.take(n)
            return units if _p is None else insert_at_depths(units, [(_d, str(_p))])

        def render(n: int, pad: str, _k: str = k, _values: Callable = values) -> str:
            return _MATH_FIND_TEMPLATE.format(what=_k, context=", ".join(_values(n)) + pad)

        prompt, n_units, n_tok = fit_length(tokenizer, render, length_tokens, min_units=1, what="math_find prompt")
        nums = [int(v) for v in values(n_units)]
        answer = {"largest": max, "smallest": min, "median": statistics.median_low}[k](nums)
        samples.append(Sample(
            id=f"{task}-{length_tokens}-{seed}-{i}", task=task, prompt=prompt, answers=[str(answer)],
            metric="first_number_match", max_new_tokens=8,
            metadata=dict(kind=k, depth=depth if planted is not None else None, n_values=len(nums),
                          target_length=length_tokens, length=n_tok, seed=seed),
        ))
    return samples


INFINITEBENCH_SYNTH_TASKS: dict[str, Callable[..., list[Sample]]] = {
    "passkey": passkey, "number_string": number_string, "kv_retrieval": kv_retrieval, "math_find": math_find,
}
