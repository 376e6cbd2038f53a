"""Token counts and budgets as users type them, and the one rule that turns a budget into rows.

`parse_token_count("8k") -> 8192` (k = 1024, as RULER's 4K). A *budget* is the number of prompt
tokens a budgeted layer attends to: an int is a token count, a float in (0, 1] a fraction of the
prompt (rounded up). `Budget` validates, parses and resolves it; every method, the OmniKV config,
the analysis and every command go through it, so `1.0` means "the whole prompt" everywhere and `1`
means one token everywhere.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from omnikv.errors import ConfigError

_COUNT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*")


def parse_token_count(text: str, what: str = "length") -> int:
    """'4k' -> 4096, '1.5k' -> 1536, '2000' -> 2000, '1m' -> 1048576. ConfigError otherwise
    (names `what`, e.g. "context length")."""
    m = _COUNT.fullmatch(text)
    if not m:
        raise ConfigError(f"bad {what} {text!r}: not a token count; use e.g. 4096, 8k, 1.5k or 1m")
    value = float(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
    if value != int(value) or value <= 0:
        raise ConfigError(f"{what} {text!r} must be a whole number of tokens > 0")
    return int(value)


@dataclass(frozen=True)
class Budget:
    """A validated budget: `value` is an int >= 1 (tokens) or a float in (0, 1] (prompt share)."""

    value: int | float

    def __post_init__(self) -> None:
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(
                f"budget must be an int (tokens) or a float in (0, 1] (fraction of the prompt); got {v!r}"
            )
        if isinstance(v, float):
            if math.isnan(v) or not 0.0 < v <= 1.0:
                raise ConfigError(f"budget={v} as a fraction must be in (0, 1]; for a token count pass an int")
        elif v <= 0:
            raise ConfigError(f"budget={v} must be > 0 tokens")

    @classmethod
    def parse(cls, text: str) -> Budget:
        """'256' -> 256 prompt tokens; '0.1' -> 10% of the prompt; '1.0' -> the whole prompt.
        ConfigError for <= 0, fractions above 1 and anything that is not a number."""
        try:
            return cls(int(text))
        except ValueError:
            pass
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(
                f"budget must be a number of tokens (e.g. 256) or a fraction of the prompt in (0, 1] "
                f"(e.g. 0.1); got {text!r}"
            ) from None
        if not (math.isfinite(value) and 0 < value <= 1):
            raise ConfigError(
                f"a fractional budget must be in (0, 1] (e.g. 0.1 = 10% of the prompt); got {text!r}"
            )
        return cls(value)

    def tokens(self, prompt_len: int, *, floor: int = 1, clip: bool = True) -> int:
        """Rows kept for a prompt of `prompt_len` tokens: an int as is, a fraction of the prompt
        rounded up; never below `floor` (always-kept tokens counted inside the budget) and, when
        `clip`, never above the prompt. (StreamingLLM and H2O do not clip: they keep `budget` rows
        of prompt *and* generated tokens, so a budget above the prompt leaves room for the answer.)
        An empty prompt keeps nothing."""
        if prompt_len <= 0:
            return 0
        k = math.ceil(self.value * prompt_len) if isinstance(self.value, float) else int(self.value)
        k = max(k, floor, 1)
        return min(k, prompt_len) if clip else k

    def selected(self, prompt_len: int, *, sink: int = 0, recent: int = 0) -> int:
        """Prompt rows a selecting layer attends (OmniKV's sparse layers, the analysis of their
        selection): the sink and recent tokens are always kept and count inside the budget, so it
        never goes below sink + recent, nor above the prompt."""
        return self.tokens(prompt_len, floor=sink + recent)

    def __str__(self) -> str:
        return str(self.value)


def forced_blocks(prompt_len: int, block: int, sink: int, recent: int) -> list[int]:
    """Blocks of `block` tokens (block b = positions [b*block, (b+1)*block)) always selected: those
    holding the first `sink` and the last `recent` prompt tokens, and always the last block, which
    may be partial (under vLLM the first generated tokens share it). Ascending."""
    if prompt_len <= 0:
        return []
    last = (prompt_len - 1) // block
    sinks = range(min(math.ceil(sink / block), last + 1))
    first_recent = max(prompt_len - recent, 0) // block if recent else last
    return sorted(set(sinks) | set(range(first_recent, last + 1)))


def block_selection(prompt_len: int, tokens: int, block: int, sink: int, recent: int) -> tuple[int, int]:
    """(blocks, prompt rows) of a block-granular selection whose budget is `tokens` rows.

    The budget rounds up to whole blocks (ceil(tokens / block)), never below the forced blocks
    (`forced_blocks`) nor above the prompt's blocks; the rows are those blocks' prompt tokens (the
    last block is always in, and it alone may be partial)."""
    if prompt_len <= 0:
        return 0, 0
    total = math.ceil(prompt_len / block)
    n = min(total, max(math.ceil(tokens / block), len(forced_blocks(prompt_len, block, sink, recent))))
    return n, prompt_len - (total - n) * block


def parse_budget(text: str) -> int | float:
    """The plain value of `Budget.parse(text)` (what configs and method options store)."""
    return Budget.parse(text).value
