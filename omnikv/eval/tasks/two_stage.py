"""OmniKV's multi-step "2StageRetr" task (paper, section 5), generated locally.

A Python dict maps N distinct integer keys to colours; the question gives "a + b = ?" where a + b is
one of the keys. The model must first write the sum, then the colour stored at that key. Scored by
case-insensitive substring match of both the sum and the colour (`string_match_all`), so a model
that gets the sum but the wrong colour scores 0.5. The paper uses N in 40..200; here N is fitted to
the target length (use a length of about 1K-2K tokens for the paper's range) or fixed with
`n_keys=` (the prompt is then as long as it is, and `length_tokens` is ignored).
"""

from __future__ import annotations

import random
from typing import Any

from omnikv.errors import ConfigError
from omnikv.eval.tasks.base import Sample, check_common, count_tokens, fit_length, insert_at_depths, spread_depths
from omnikv.eval.tasks.text import UnitPool

COLOURS: tuple[str, ...] = (
    "red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white", "grey",
    "cyan", "magenta", "teal", "violet", "indigo", "maroon", "olive", "navy", "crimson", "amber",
    "turquoise", "lavender", "beige", "coral", "gold", "silver", "scarlet", "ivory", "mint",
)

_TEMPLATE = (
    "Here is a Python dictionary that maps integer keys to colours:\n\n"
    "colours = {{\n{context}}}\n\n"
    "Question: let a = {a} and b = {b}. First compute a + b, then tell me the colour that the "
    "dictionary stores at the key a + b.\n"
    "Answer: a + b = {a} + {b} ="
)


def two_stage_retrieval(
    tokenizer: Any, length_tokens: int, n_samples: int, seed: int = 0, *, n_keys: int | None = None,
) -> list[Sample]:
    """2StageRetr samples; the asked key's entry sits at the sample's depth (evenly spread)."""
    check_common(length_tokens, n_samples)
    if n_keys is not None and n_keys < 1:
        raise ConfigError(f"n_keys must be at least 1, got {n_keys}")
    task = "two_stage_retrieval"
    samples = []
    for i, depth in enumerate(spread_depths(n_samples)):
        rng = random.Random(f"{task}:{seed}:{i}")
        target = rng.randint(1000, 9999)
        colour = rng.choice(COLOURS)
        a = rng.randint(1, target - 1)
        b = target - a
        used = {target}
        entry_rng = random.Random(f"{task}:{seed}:{i}:entries")

        def entry(_j: int, _used: set = used, _r: random.Random = entry_rng) -> str:
            # Keys widen past 4 digits only when the dict is huge, so they stay distinct.
            hi = 9999 if len(_used) < 4000 else 10 * len(_used)
            k = _r.randint(1000, hi)
            while k in _used:
                k = _r.randint(1000, hi)
            _used.add(k)
            return f"    {k}: '{_r.choice(COLOURS)}',\n"

        pool = UnitPool(entry)
        needle = f"    {target}: '{colour}',\n"

        def render(n: int, pad: str, _pool: UnitPool = pool, _needle: str = needle, _d: float = depth,
                   _a: int = a, _b: int = b) -> str:
            context = "".join(insert_at_depths(_pool.take(n), [(_d, _needle)])) + pad
            return _TEMPLATE.format(context=context, a=_a, b=_b)

        if n_keys is None:
            prompt, n_units, n_tok = fit_length(tokenizer, render, length_tokens, what=f"{task} prompt")
        else:
            n_units = n_keys - 1
            prompt = render(n_units, "")
            n_tok = count_tokens(tokenizer, prompt)
        samples.append(Sample(
            id=f"{task}-{length_tokens}-{seed}-{i}", task=task, prompt=prompt, answers=[str(target), colour],
            metric="string_match_all", max_new_tokens=32,
            metadata=dict(depth=depth, key=target, a=a, b=b, n_keys=n_units + 1, target_length=length_tokens,
                          length=n_tok, seed=seed),
        ))
    return samples
