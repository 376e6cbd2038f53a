"""Parsing the token counts users type: "4096", "8k", "1.5k", "1m" (k = 1024, as RULER's 4K)."""

from __future__ import annotations

import math
import re

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


def parse_budget(text: str) -> int | float:
    """'256' -> 256 prompt tokens; '0.1' -> 10% of the prompt. ConfigError for <= 0, fractions
    above 1 and anything that is not a number."""
    try:
        value: int | float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(
                f"budget must be a number of tokens (e.g. 256) or a fraction of the prompt in (0, 1] "
                f"(e.g. 0.1); got {text!r}") from None
        if not (math.isfinite(value) and 0 < value <= 1):
            raise ConfigError(f"a fractional budget must be in (0, 1] (e.g. 0.1 = 10% of the prompt); got {text!r}")
        return value
    if value < 1:
        raise ConfigError(f"a token budget must be >= 1; got {text!r}")
    return value
