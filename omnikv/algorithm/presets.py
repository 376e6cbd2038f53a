"""Recommended OmniKV settings per model, and the fallback for models we have not measured.

Matched by (model_type, number of layers, hidden size). Every preset says where it comes from.
`omnikv calibrate` writes a preset file for any other model; pass it with `--preset FILE`.
`resolve_preset(name_or_path)` is the one place a `--preset` / `preset=` value becomes a config:
every command and `get_method("omnikv", preset=...)` go through it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omnikv.hf.compat import layer_types, text_config
from omnikv.config import OmniKVConfig
from omnikv.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    name: str
    model_type: str
    num_layers: int
    hidden_size: int | None  # None = any
    config: OmniKVConfig
    notes: str


PRESETS: tuple[Preset, ...] = (
    Preset(
        "llama-3-8b-paper",
        "llama",
        32,
        4096,
        OmniKVConfig(
            filter_layers=(2, 8, 18), num_wait_layers=1, budget=0.067, sink_tokens=0,
            recent_tokens=0, selector="last", head_reduce="max", source="preset:llama-3-8b-paper",
        ),
        "The paper's Llama-3-8B setting (README: filter 2,8,18; 6.7% of the prompt; no sink/recent). "
        "Dense layers 0-3, 8-9, 18-19: device KV 25% of full with offload.",
    ),
    Preset(
        "smollm2-135m",
        "llama",
        30,
        576,
        OmniKVConfig(
            filter_layers=(3, 14, 21), num_wait_layers=0, budget=1024, sink_tokens=4,
            recent_tokens=64, selector="last", head_reduce="max", source="preset:smollm2-135m",
        ),
        "Measured on SmolLM2-135M (attention coverage from `omnikv analyze`): layers 0-2 are poorly covered by any "
        "other layer (dense), {3,14,21} is the best 3-filter set (coverage 0.923 with 4 sink + 64 "
        "recent tokens; the paper's {2,8,18} gives 0.905). No wait layers: on CPU nothing is copied. "
        "1024 selected tokens per sparse layer (a fixed count, like the paper's latency setting: the "
        "share shrinks as the context grows; pass --budget 0.1 for a fixed fraction).",
    ),
    Preset(
        "gemma3-270m",
        "gemma3_text",
        18,
        640,
        OmniKVConfig(
            filter_layers=(5,), num_wait_layers=0, budget=1024, sink_tokens=4, recent_tokens=64,
            selector="union", head_reduce="max", source="preset:gemma3-270m",
        ),
        "Gemma 3 270M has 3 full-attention layers (5, 11, 17) among 15 sliding-window ones: layer 5 "
        "filters, 11 and 17 are sparse; sliding layers keep their exact 512-token window. 1024 selected "
        "tokens per sparse layer. Selector `union` (last's and a 16-query window's best in turn): at "
        "least as good as the paper's `last` and as `uniform` on held-out samples (docs/results.md, "
        "third pass); selector=last gives the paper's.",
    ),
)


def resolve_preset(name_or_path: str | os.PathLike) -> tuple[OmniKVConfig, dict[str, Any]]:
    """A built-in preset by name, or a preset JSON file by path -> (config, made_for).

    `made_for` holds the `model_type` / `num_layers` a file says it was made for (checked against
    the model by `check_preset_model`); a built-in preset is matched to models by `find_preset`
    and carries none. ConfigError, naming the built-in presets, when it is neither."""
    text = os.fspath(name_or_path)
    named = {p.name: p for p in PRESETS}
    if text in named:
        return named[text].config, {}
    path = Path(text).expanduser()
    looks_like_a_file = path.suffix == ".json" or os.sep in text or path.exists()
    if not looks_like_a_file:
        raise ConfigError(
            f"preset {text!r} is neither a built-in preset ({', '.join(named)}) nor a preset file; "
            "give one of those names or the path of a file from `omnikv calibrate --output`"
        )
    return OmniKVConfig.from_json_with_metadata(path)


def find_preset(model_or_config) -> Preset | None:
    cfg = text_config(model_or_config)
    for p in PRESETS:
        if (
            cfg.model_type == p.model_type
            and cfg.num_hidden_layers == p.num_layers
            and (p.hidden_size is None or cfg.hidden_size == p.hidden_size)
        ):
            return p
    return None


def fallback_config(model_or_config) -> OmniKVConfig:
    """Filter layers spread over the full-attention layers (about 10%, 35% and 60% deep)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    full = [i for i, t in enumerate(layer_types(cfg)) if t == "full_attention"]
    if not full:
        raise ValueError("model has no full-attention layer")
    n = len(full)
    picks = sorted({full[min(n - 1, max(1 if n > 2 else 0, round(f * n)))] for f in (0.1, 0.35, 0.6)})
    wait = 1 if n >= 12 else 0
    return OmniKVConfig(
        filter_layers=tuple(picks), num_wait_layers=wait, budget=0.1, sink_tokens=4,
        recent_tokens=64, source="fallback",
    )


def preset_for_model(model_or_config, *, warn: bool = True) -> OmniKVConfig:
    """The preset for this model, or the documented fallback (with a hint to calibrate)."""
    preset = find_preset(model_or_config)
    if preset is not None:
        return preset.config
    if warn:
        warnings.warn(
            "no OmniKV preset for this model; using filter layers spread at ~10/35/60% depth. "
            "Run `omnikv calibrate --model ... --output preset.json` and pass --preset for better "
            "settings.",
            stacklevel=2,
        )
    return fallback_config(model_or_config)


def check_preset_model(made_for: dict, model_or_config, where: str = "preset") -> None:
    """Refuse a preset file made for another model (its `model_type` / `num_layers` keys, as
    `omnikv calibrate` writes them): its filter layers would be wrong, or out of range, for this one.
    Keys the file does not have are not checked."""
    cfg = getattr(model_or_config, "config", model_or_config)
    text = text_config(cfg)
    types = {cfg.model_type, text.model_type}
    want_type, want_layers = made_for.get("model_type"), made_for.get("num_layers")
    if want_type is not None and want_type not in types:
        raise ConfigError(
            f"{where} was made for a {want_type} model but this model is {text.model_type}; run "
            f"`omnikv calibrate` for this model, or omit --preset to use its built-in preset"
        )
    if want_layers is not None and want_layers != text.num_hidden_layers:
        raise ConfigError(
            f"{where} was made for a model with {want_layers} layers but this one has "
            f"{text.num_hidden_layers}; run `omnikv calibrate` for this model, or omit --preset"
        )
