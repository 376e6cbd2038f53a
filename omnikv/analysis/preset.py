"""Preset files written by `omnikv calibrate`: an OmniKVConfig subset plus the model it fits.

Exactly these keys, no others (readers treat unknown keys as errors):
filter_layers, num_wait_layers, budget, sink_tokens, recent_tokens, selector, head_reduce,
model_type, num_layers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omnikv.config import OmniKVConfig
from omnikv.errors import ConfigError

PRESET_KEYS = (
    "filter_layers",
    "num_wait_layers",
    "budget",
    "sink_tokens",
    "recent_tokens",
    "selector",
    "head_reduce",
    "model_type",
    "num_layers",
)


def make_preset(
    filter_layers: list[int],
    num_wait_layers: int,
    budget: int | float,
    sink_tokens: int,
    recent_tokens: int,
    selector: str,
    head_reduce: str,
    model_type: str,
    num_layers: int,
) -> dict[str, Any]:
    """The preset as a dict with exactly PRESET_KEYS, validated by OmniKVConfig (an int budget
    below sink + recent holds the sink/recent the config fits inside it)."""
    preset = {
        "filter_layers": [int(x) for x in filter_layers],
        "num_wait_layers": int(num_wait_layers),
        "budget": budget,
        "sink_tokens": int(sink_tokens),
        "recent_tokens": int(recent_tokens),
        "selector": selector,
        "head_reduce": head_reduce,
        "model_type": str(model_type),
        "num_layers": int(num_layers),
    }
    config_keys = {k: v for k, v in preset.items() if k not in ("model_type", "num_layers")}
    config_keys["filter_layers"] = tuple(config_keys["filter_layers"])
    cfg = OmniKVConfig(**config_keys)  # raises ConfigError naming the bad field
    preset["sink_tokens"], preset["recent_tokens"] = cfg.sink_tokens, cfg.recent_tokens
    return preset


def write_preset(path: str | Path, preset: dict[str, Any]) -> Path:
    if set(preset) != set(PRESET_KEYS):
        raise ConfigError(f"a preset must have exactly the keys {PRESET_KEYS}, got {sorted(preset)}")
    out = Path(path)
    if out.parent and not out.parent.exists():
        raise ConfigError(f"cannot write {out}: directory {out.parent} does not exist")
    out.write_text(json.dumps(preset, indent=2) + "\n", encoding="utf-8")
    return out
