"""Parsing the token counts users type: "4096", "8k", "1.5k", "1m" (k = 1024, as RULER's 4K)."""

from __future__ import annotations

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
