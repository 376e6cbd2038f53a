"""The `Sample` record, prompt encoding and exact length fitting shared by every task generator."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from omnikv.errors import ConfigError, InputError


@dataclasses.dataclass
class Sample:
    """One evaluation item.

    `prompt` is the raw text fed to the model, ending with an answer prefix (e.g. "... The pass key
    is") so that the greedy continuation starts with the answer. `answers` are the reference strings;
    `metric` names a scorer in `omnikv.eval.metrics.METRICS`. `metadata` holds generator details:
    needle depth (fraction of the haystack, 0 = start), target/actual token length, seed, ...
    """

    id: str
    task: str
    prompt: str
    answers: list[str]
    metric: str
    max_new_tokens: int
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` exactly as the runner feeds them to the model.

    Special tokens are added (a BOS for tokenizers that use one) because a base model expects them,
    and the target length of a generated sample counts them.
    """
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(encode_prompt(tokenizer, text))


# Appended after the haystack when whole units cannot hit the target exactly. Tried in order; the
# first that lands exactly on the target wins. Several are needed because tokenizers merge
# differently (e.g. "\n\n" is one token in GPT-2-like vocabularies, " ." rarely merges with itself).
_PAD_PIECES: tuple[str, ...] = (" .", "\n", " -", ".", " ", "-", " a", "*")

# How far below the target a fitted prompt may land when no pad reaches it exactly. Documented in
# docs/evaluation.md; with every tokenizer we tried the fit is exact.
LENGTH_TOLERANCE = 8


def fit_length(
    tokenizer: Any,
    render: Callable[[int, str], str],
    target: int,
    *,
    min_units: int = 0,
    tail: Callable[[int], str] | None = None,
    what: str = "prompt",
) -> tuple[str, int, int]:
    """Find the prompt closest to `target` tokens, never longer; return (prompt, n_units, n_tokens).

    `render(n_units, pad)` builds the prompt from `n_units` haystack units (sentences, list items,
    dictionary entries ...) plus a `pad` string appended after them. The token count grows with
    `n_units` (almost monotonically), so a doubling + binary search finds the largest `n_units` that
    fits; then the gap is closed with the first words of `tail(n_units)` (the text that would
    follow, e.g. the next sentence; a truncated sentence, as RULER's token-level truncation gives)
    and finally with pad pieces, token by token. Raises `ConfigError` if even
    `min_units` units do not fit, and `InputError` if the result is more than LENGTH_TOLERANCE tokens
    short (a pathological tokenizer).
    """
    if target <= 0:
        raise ConfigError(f"target length must be a positive number of tokens, got {target}")
    base = count_tokens(tokenizer, render(min_units, ""))
    if base > target:
        raise ConfigError(
            f"{what} needs at least {base} tokens with this tokenizer but the target length is "
            f"{target}; choose a larger length"
        )
    # Doubling to bracket the answer, then binary search for the largest fitting unit count.
    lo, hi = min_units, max(min_units + 1, 8)
    while count_tokens(tokenizer, render(hi, "")) <= target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count_tokens(tokenizer, render(mid, "")) <= target:
            lo = mid
        else:
            hi = mid
    n_units = lo
    prompt = render(n_units, "")
    n = count_tokens(tokenizer, prompt)
    if n == target:
        return prompt, n_units, n
    best = (prompt, n)
    head = ""
    if tail is not None:
        # Longest word prefix of the following text that still fits.
        words = tail(n_units).split(" ")
        for k in range(1, len(words) + 1):
            piece = " ".join(words[:k])
            m = count_tokens(tokenizer, render(n_units, piece))
            if m > target:
                break
            head, best = piece, (render(n_units, piece), m)
            if m == target:
                return best[0], n_units, m
    gap = target - best[1]
    for piece in _PAD_PIECES:
        for reps in range(1, 2 * gap + 2):
            candidate = render(n_units, head + piece * reps)
            m = count_tokens(tokenizer, candidate)
            if m == target:
                return candidate, n_units, m
            if m > target:
                break
            if m > best[1]:
                best = (candidate, m)
    if target - best[1] > LENGTH_TOLERANCE:
        raise InputError(
            f"could not fit the {what} to {target} tokens (closest: {best[1]}); this tokenizer merges "
            f"the pad pieces unusually - please report it"
        )
    return best[0], n_units, best[1]


def spread_depths(n_samples: int) -> list[float]:
    """Needle depths (fraction of the haystack) spread evenly over samples: 0, ..., 1 inclusive.

    One sample gets depth 0.5. RULER and the NIAH harness sweep depth the same way.
    """
    if n_samples <= 0:
        raise ConfigError(f"number of samples must be positive, got {n_samples}")
    if n_samples == 1:
        return [0.5]
    return [i / (n_samples - 1) for i in range(n_samples)]


def insert_at_depths(units: list[str], needles: list[tuple[float, str]]) -> list[str]:
    """Insert needle strings between haystack units at the given depths (fractions in [0, 1]).

    A needle at depth d goes before unit round(d * len(units)); needles at the same slot keep their
    order. Returns a new list.
    """
    slots: dict[int, list[str]] = {}
    for depth, needle in needles:
        if not 0.0 <= depth <= 1.0:
            raise ConfigError(f"needle depth must be within [0, 1], got {depth}")
        slots.setdefault(round(depth * len(units)), []).append(needle)
    out: list[str] = []
    for i in range(len(units) + 1):
        out.extend(slots.get(i, []))
        if i < len(units):
            out.append(units[i])
    return out


# Where a generated needle task states its question: "after" the haystack (RULER's and
# InfiniteBench's layout, the default) or "before" it (the query is known while the haystack is
# read; the text after the haystack is then only a neutral answer prefix that does not restate the
# query key). docs/evaluation.md, "Question before the context".
QUESTION_POSITIONS: tuple[str, ...] = ("after", "before")


def check_question_position(value: str, task: str) -> str:
    """`value` if it is one of QUESTION_POSITIONS; ConfigError naming the choices otherwise."""
    if value not in QUESTION_POSITIONS:
        raise ConfigError(f"{task}: question_position must be one of {', '.join(QUESTION_POSITIONS)}, got {value!r}")
    return value


def sample_id(task: str, length_tokens: int, seed: int, i: int, question_position: str = "after") -> str:
    """The id of sample `i`: "<task>-<length>-<seed>-<i>", with "-qbefore" when the question
    precedes the haystack, so runs of both positions never share a record key (--resume, merge)."""
    base = f"{task}-{length_tokens}-{seed}-{i}"
    return base if question_position == "after" else f"{base}-q{question_position}"


def check_common(length_tokens: int, n_samples: int) -> None:
    if not isinstance(length_tokens, int) or length_tokens <= 0:
        raise ConfigError(f"length_tokens must be a positive integer, got {length_tokens!r}")
    if not isinstance(n_samples, int) or n_samples <= 0:
        raise ConfigError(f"n_samples must be a positive integer, got {n_samples!r}")
