"""The demo document: a long seeded story with a pass key hidden in it (used by `omnikv compare`).

The haystack is the evaluation suite's narrative text (`omnikv.eval.tasks.text`: varied,
digit-free sentences) and the prompt is fitted to an exact token length with the same
`fit_length`. The prompt is raw text ending in an answer prefix ("... What is the pass key? The pass
key is"): with that layout Gemma 3 270M (base) finds the key with full attention up to 16K tokens
(docs/evaluation.md, small-model guidance), so any miss is the KV method's doing.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from omnikv.errors import ConfigError
from omnikv.eval.tasks.base import fit_length, insert_at_depths
from omnikv.eval.tasks.text import UnitPool, unit_source

INTRO = ("Below is a long story. Somewhere in it a pass key is hidden. Find it and remember it; "
         "you will be asked for it at the end.")
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is"
MIN_TOKENS = 64


@dataclass(frozen=True)
class DemoPrompt:
    prompt: str  # raw text, ends with ANSWER_PREFIX
    key: str  # the hidden pass key (digits)
    depth: float  # where the key sits: fraction of the story before it (0 = start, 1 = end)
    tokens: int  # prompt length in tokens of the tokenizer it was fitted to (special tokens included)
    seed: int

    def found(self, answer: str) -> bool:
        """True when the answer's first number is the key (InfiniteBench's passkey scoring)."""
        return first_number(answer) == self.key

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "depth": self.depth, "tokens": self.tokens, "seed": self.seed}


def first_number(text: str) -> str | None:
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def make_key(seed: int, digits: int = 5) -> str:
    rng = random.Random(f"omnikv-demo-key:{seed}")
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def demo_prompt(tokenizer, n_tokens: int = 4000, *, depth: float = 0.5, seed: int = 0) -> DemoPrompt:
    """A story of `n_tokens` tokens (as `tokenizer(text)` counts them, BOS included) with a 5-digit
    pass key hidden at `depth`; same arguments, same prompt."""
    if not isinstance(n_tokens, int) or n_tokens < MIN_TOKENS:
        raise ConfigError(f"the demo document needs at least {MIN_TOKENS} tokens; got {n_tokens!r}")
    if not 0.0 <= depth <= 1.0:
        raise ConfigError(f"the key's depth must be a fraction in [0, 1]; got {depth!r}")
    key = make_key(seed)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    pool = UnitPool(unit_source("narrative", seed))

    def render(n: int, pad: str) -> str:
        story = " ".join(insert_at_depths(pool.take(n), [(depth, needle)])) + pad
        return f"{INTRO}\n\n{story}\n\n{QUESTION} {ANSWER_PREFIX}"

    prompt, _units, tokens = fit_length(tokenizer, render, n_tokens, tail=pool.tail(" "), what="demo document")
    return DemoPrompt(prompt=prompt, key=key, depth=depth, tokens=tokens, seed=seed)
