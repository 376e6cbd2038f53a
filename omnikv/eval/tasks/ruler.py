"""RULER-style synthetic tasks, generated for any target length with the model's own tokenizer.

Task names, needle formats, templates and answer prefixes follow RULER's standard configuration
(NIAH x 8, variable tracking, common-words and frequent-words extraction); QA tasks need SQuAD /
HotpotQA downloads and are not provided. Differences from RULER, all documented in
docs/evaluation.md: keys come from this project's word lists instead of `wonderwords`; the essay
haystack is replaced by a seeded narrative (or stdlib docstrings, `haystack="pydoc"`); the prompt
(including the answer prefix) is fitted to exactly `length_tokens` instead of "length minus the
answer budget".
"""

from __future__ import annotations

import random
import uuid
from collections import Counter
from typing import Any, Callable

from omnikv.errors import ConfigError
from omnikv.eval.tasks.base import (Sample, check_common, check_question_position, fit_length, insert_at_depths,
                                    sample_id, spread_depths)
from omnikv.eval.tasks.text import ADJECTIVES, COMMON_WORDS, NOUNS, HAYSTACKS, UnitPool, unit_source

_NIAH_TEMPLATE = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards.\n{context}\n"
    "What are all the special magic {kind} for {query} mentioned in the provided text?"
    " The special magic {kind} for {query} mentioned in the provided text are"
)
# Question before the haystack: the same question, stated ahead of the context; after it only an
# answer prefix that refers back to the question instead of naming the key again.
_NIAH_BEFORE_TEMPLATE = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize the ones "
    "this question asks for. What are all the special magic {kind} for {query} mentioned in the provided text?"
    "\n{context}\n"
    "Answer: The special magic {kind} for the {keys} asked above mentioned in the provided text are"
)
_NEEDLE = "One of the special magic {kind} for {key} is: {value}."


def make_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _make_key(rng: random.Random, kind: str) -> str:
    if kind == "words":
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    if kind == "uuids":
        return make_uuid(rng)
    raise ConfigError(f"unknown key kind {kind!r}")


def _make_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "uuids":
        return make_uuid(rng)
    raise ConfigError(f"unknown value kind {kind!r}")


def _join_query(keys: list[str]) -> str:
    if len(keys) == 1:
        return keys[0]
    return ", ".join(keys[:-1]) + ", and " + keys[-1]


def niah(
    tokenizer: Any,
    length_tokens: int,
    n_samples: int,
    seed: int = 0,
    *,
    task: str = "niah",
    haystack: str = "narrative",
    key_kind: str = "words",
    value_kind: str = "numbers",
    n_keys: int = 1,
    n_values: int = 1,
    n_queries: int = 1,
    question_position: str = "after",
) -> list[Sample]:
    """Needle-in-a-haystack in RULER's general form.

    `n_keys` needles with distinct keys are inserted (`n_values` needles per key for the first
    `n_queries` keys, one for the rest); the question asks for all values of the first `n_queries`
    keys. The first needle of sample i sits at depth i/(n-1) (evenly spread); the other needles at
    seeded random depths. `haystack` is one of noise / narrative / pydoc / needles (a haystack made
    only of other needles, RULER's multikey_2/3). `question_position="before"` states the question
    ahead of the haystack and ends with an answer prefix that does not name the key(s).
    """
    check_common(length_tokens, n_samples)
    check_question_position(question_position, task)
    template = _NIAH_TEMPLATE if question_position == "after" else _NIAH_BEFORE_TEMPLATE
    keys_word = "key" if n_queries == 1 else "keys"
    if haystack not in HAYSTACKS + ("needles",):
        raise ConfigError(f"unknown haystack {haystack!r}; choose one of {', '.join(HAYSTACKS + ('needles',))}")
    if not 1 <= n_queries <= n_keys:
        raise ConfigError(f"n_queries must be within 1..n_keys={n_keys}, got {n_queries}")
    kind = "numbers" if value_kind == "numbers" else "uuids"
    joiner = "\n" if haystack == "needles" else " "
    samples = []
    for i, depth in enumerate(spread_depths(n_samples)):
        rng = random.Random(f"{task}:{seed}:{i}")
        keys: list[str] = []
        while len(keys) < n_keys:
            key = _make_key(rng, key_kind)
            if key not in keys:
                keys.append(key)
        needles: list[tuple[float, str]] = []
        answers: list[str] = []
        for k, key in enumerate(keys):
            for v in range(n_values if k < n_queries else 1):
                value = _make_value(rng, value_kind)
                d = depth if (k == 0 and v == 0) else rng.random()
                needles.append((d, _NEEDLE.format(kind=kind, key=key, value=value)))
                if k < n_queries:
                    answers.append(value)
        if haystack == "needles":
            def distractor(j: int, _i: int = i, _keys: tuple = tuple(keys)) -> str:
                r = random.Random(f"{task}:{seed}:{_i}:hay:{j}")
                key = _make_key(r, key_kind)
                while key in _keys:
                    key = _make_key(r, key_kind)
                return _NEEDLE.format(kind=kind, key=key, value=_make_value(r, value_kind))
            pool = UnitPool(distractor)
        else:
            pool = UnitPool(unit_source(haystack, seed * 1_000_003 + i))
        query = _join_query(keys[:n_queries])

        def render(n: int, pad: str, _pool: UnitPool = pool, _needles: list = needles, _q: str = query) -> str:
            context = joiner.join(insert_at_depths(_pool.take(n), _needles)) + pad
            return template.format(kind=kind, context=context, query=_q, keys=keys_word)

        prompt, n_units, n_tok = fit_length(tokenizer, render, length_tokens, tail=None if haystack == "needles" else pool.tail(joiner), what=f"{task} prompt")
        samples.append(Sample(
            id=sample_id(task, length_tokens, seed, i, question_position), task=task, prompt=prompt,
            answers=answers, metric="string_match_all", max_new_tokens=128 if value_kind == "uuids" else 64,
            metadata=dict(depth=depth, needle_depths=[d for d, _ in needles], needles=[t for _, t in needles],
                          haystack=haystack, haystack_units=n_units, target_length=length_tokens,
                          length=n_tok, seed=seed, query_keys=keys[:n_queries],
                          question_position=question_position),
        ))
    return samples


# RULER's standard NIAH variants. Essay haystacks become the local narrative by default.
NIAH_VARIANTS: dict[str, dict[str, Any]] = {
    "niah_single_1": dict(haystack="noise"),
    "niah_single_2": dict(haystack="narrative"),
    "niah_single_3": dict(haystack="narrative", value_kind="uuids"),
    "niah_multikey_1": dict(haystack="narrative", n_keys=4),
    "niah_multikey_2": dict(haystack="needles"),
    "niah_multikey_3": dict(haystack="needles", key_kind="uuids", value_kind="uuids"),
    "niah_multivalue": dict(haystack="narrative", n_values=4),
    "niah_multiquery": dict(haystack="narrative", n_keys=4, n_queries=4),
}


def _niah_variant(name: str) -> Callable[..., list[Sample]]:
    defaults = NIAH_VARIANTS[name]

    def gen(tokenizer: Any, length_tokens: int, n_samples: int, seed: int = 0, **opts: Any) -> list[Sample]:
        return niah(tokenizer, length_tokens, n_samples, seed, task=name, **{**defaults, **opts})

    gen.__doc__ = f"RULER {name}: {defaults}"
    return gen


_VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    "{context}\nQuestion: Find all variables that are assigned the value {value} in the text above."
    " Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
    "assigned the value {value}, they are: "
)
_VT_BEFORE_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
    "Question: Find all variables that are assigned the value {value} in the text below.\n\n"
    "{context}\nAnswer: According to the chain(s) of variable assignment in the text above, {n} variables are "
    "assigned the value asked above, they are: "
)


def variable_tracking(
    tokenizer: Any, length_tokens: int, n_samples: int, seed: int = 0, *,
    haystack: str = "noise", n_hops: int = 4, n_chains: int = 1, question_position: str = "after",
) -> list[Sample]:
    """RULER vt: chains `VAR A = 12345.`, `VAR B = VAR A.`, ...; list every variable of the first
    chain. Statements of a chain appear in order; the first one sits at the sample's depth (evenly
    spread, scaled so the chain fits after it) and the rest at seeded later depths.
    `question_position="before"` asks ahead of the text; the answer prefix then omits the value."""
    check_common(length_tokens, n_samples)
    task = "vt"
    check_question_position(question_position, task)
    template = _VT_TEMPLATE if question_position == "after" else _VT_BEFORE_TEMPLATE
    samples = []
    for i, depth in enumerate(spread_depths(n_samples)):
        rng = random.Random(f"{task}:{seed}:{i}")
        names: list[str] = []
        while len(names) < n_chains * (n_hops + 1):
            name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
            if name not in names:
                names.append(name)
        needles: list[tuple[float, str]] = []
        values = []
        for c in range(n_chains):
            chain = names[c * (n_hops + 1):(c + 1) * (n_hops + 1)]
            value = str(rng.randint(10_000, 99_999))
            values.append(value)
            start = depth * 0.8 if c == 0 else rng.random() * 0.8
            offsets = sorted(rng.random() * (1 - start) for _ in range(n_hops))
            stmts = [f"VAR {chain[0]} = {value}."] + [f"VAR {chain[h + 1]} = VAR {chain[h]}." for h in range(n_hops)]
            needles += list(zip([start] + [start + o for o in offsets], stmts))
        answers = names[: n_hops + 1]
        pool = UnitPool(unit_source(haystack, seed * 1_000_003 + i))

        def render(n: int, pad: str, _pool: UnitPool = pool, _needles: list = needles, _v: str = values[0]) -> str:
            context = " ".join(insert_at_depths(_pool.take(n), _needles)) + pad
            return template.format(context=context, value=_v, n=n_hops + 1)

        prompt, n_units, n_tok = fit_length(tokenizer, render, length_tokens, tail=pool.tail(" "), what="vt prompt")
        samples.append(Sample(
            id=sample_id(task, length_tokens, seed, i, question_position), task=task, prompt=prompt,
            answers=answers, metric="string_match_all", max_new_tokens=30,
            metadata=dict(depth=needles[0][0], needle_depths=[d for d, _ in needles], needles=[t for _, t in needles],
                          haystack=haystack, haystack_units=n_units, target_length=length_tokens, length=n_tok,
                          seed=seed, query_keys=[values[0]], question_position=question_position),
        ))
    return samples


_CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the 10 most common words in the above list?"
    " Answer: The top 10 words that appear most often in the list are:"
)


def _pseudo_word(rng: random.Random) -> str:
    """A pronounceable made-up word (consonant-vowel syllables), for an unbounded rare-word supply."""
    return "".join(rng.choice("bcdfghklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 4)))


def common_words(
    tokenizer: Any, length_tokens: int, n_samples: int, seed: int = 0, *,
    n_common: int = 10, freq_common: int = 30, freq_rare: int = 3,
) -> list[Sample]:
    """RULER cwe: a numbered word list where `n_common` words appear `freq_common` times and rare
    words `freq_rare` times; answer the common words. The number of rare words fits the length.
    When the common words alone do not fit, lower frequencies are used (as RULER does for short
    contexts): (30, 3) -> (10, 2) -> (4, 1) -> (2, 1); the chosen ones are in the metadata."""
    check_common(length_tokens, n_samples)
    task = "cwe"
    samples = []
    for i in range(n_samples):
        rng = random.Random(f"{task}:{seed}:{i}")
        common = rng.sample(COMMON_WORDS, n_common)
        rare_rng = random.Random(f"{task}:{seed}:{i}:rare")
        rare: list[str] = []
        seen = set(COMMON_WORDS)

        def rare_words(n: int) -> list[str]:
            while len(rare) < n:
                w = _pseudo_word(rare_rng)
                if w not in seen:
                    seen.add(w)
                    rare.append(w)
            return rare[:n]

        result = None
        for fc, fr in [(freq_common, freq_rare), (10, 2), (4, 1), (2, 1)]:
            if fc <= fr:
                continue

            def render(n: int, pad: str, _fc: int = fc, _fr: int = fr, _i: int = i) -> str:
                items = common * _fc + rare_words(n) * _fr
                random.Random(f"{task}:{seed}:{_i}:shuffle:{n}").shuffle(items)
                context = "\n".join(f"{k + 1}. {w}" for k, w in enumerate(items)) + pad
                return _CWE_TEMPLATE.format(context=context)

            try:
                result = (fit_length(tokenizer, render, length_tokens, what="cwe prompt"), fc, fr)
                break
            except ConfigError:
                continue
        if result is None:
            raise ConfigError(f"cwe needs more than {length_tokens} tokens even with the lowest word frequencies")
        (prompt, n_units, n_tok), fc, fr = result
        samples.append(Sample(
            id=f"{task}-{length_tokens}-{seed}-{i}", task=task, prompt=prompt, answers=list(common),
            metric="string_match_all", max_new_tokens=120,
            metadata=dict(freq_common=fc, freq_rare=fr, n_rare=n_units, target_length=length_tokens,
                          length=n_tok, seed=seed),
        ))
    return samples


_FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most "
    "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please "
    "ignore the dots '....'. What are the three most frequently appeared words in the above coded text?"
    " Answer: According to the coded text above, the three most frequently appeared words are:"
)


def frequent_words(
    tokenizer: Any, length_tokens: int, n_samples: int, seed: int = 0, *,
    alpha: float = 2.0, vocab_size: int = 500,
) -> list[Sample]:
    """RULER fwe: coded words drawn with Zipf(alpha) frequencies; answer the three most frequent.

    Counts are allocated exactly proportional to rank**-alpha (largest remainder) rather than
    sampled, so the top three are well separated at every length; the answers are recomputed from
    the fitted text."""
    check_common(length_tokens, n_samples)
    task = "fwe"
    weights = [r ** -alpha for r in range(1, vocab_size + 1)]
    total_w = sum(weights)
    samples = []
    for i in range(n_samples):
        rng = random.Random(f"{task}:{seed}:{i}")
        vocab: list[str] = []
        while len(vocab) < vocab_size:
            w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
            if w not in vocab:
                vocab.append(w)

        def words_for(n: int, _i: int = i, _vocab: list = vocab) -> list[str]:
            exact = [n * w / total_w for w in weights]
            counts = [int(x) for x in exact]
            for r in sorted(range(vocab_size), key=lambda r: counts[r] - exact[r])[: n - sum(counts)]:
                counts[r] += 1
            words = [w for w, c in zip(_vocab, counts) for _ in range(c)]
            random.Random(f"{task}:{seed}:{_i}:shuffle:{n}").shuffle(words)
            return words

        def render(n: int, pad: str) -> str:
            return _FWE_TEMPLATE.format(context=" ".join(words_for(n)) + pad)

        prompt, n_units, n_tok = fit_length(tokenizer, render, length_tokens, min_units=40, what="fwe prompt")
        counts = Counter(words_for(n_units))
        top = [w for w, _ in counts.most_common(3)]
        samples.append(Sample(
            id=f"{task}-{length_tokens}-{seed}-{i}", task=task, prompt=prompt, answers=top,
            metric="string_match_all", max_new_tokens=50,
            metadata=dict(n_words=n_units, top_counts=[counts[w] for w in top], target_length=length_tokens,
                          length=n_tok, seed=seed),
        ))
    return samples


RULER_TASKS: dict[str, Callable[..., list[Sample]]] = {name: _niah_variant(name) for name in NIAH_VARIANTS}
RULER_TASKS.update(vt=variable_tracking, cwe=common_words, fwe=frequent_words)
