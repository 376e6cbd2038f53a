"""The OmniKV settings of a vLLM run, read from the environment.

vLLM builds the attention backend inside its engine-core (and worker) processes, which it spawns;
environment variables are the one channel that reaches all of them unchanged, for `LLM(...)` and
for the OpenAI server alike.

    OMNIKV_VLLM=1                 turn the OmniKV backend on (anything else, or unset: stock vLLM)
    OMNIKV_VLLM_CONFIG=...        optional: a JSON object of OmniKVConfig fields overriding the
                                  model's preset (e.g. '{"budget": 128}'), a built-in preset name
                                  or a preset file written by `omnikv calibrate --output`

The config is the library's own: `omnikv.config.OmniKVConfig`, `omnikv.algorithm.presets` and
`omnikv.algorithm.roles.plan_layers`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from omnikv.algorithm.presets import check_preset_model, preset_for_model, resolve_preset
from omnikv.algorithm.roles import LayerPlan, plan_layers
from omnikv.config import QUERY_SELECTORS, OmniKVConfig
from omnikv.errors import ConfigError
from omnikv.hf.compat import layer_types

ENABLE_ENV = "OMNIKV_VLLM"
CONFIG_ENV = "OMNIKV_VLLM_CONFIG"

# What this backend implements; the others need per-request state across steps (query windows)
# or per-head index sets the sparse kernel does not take yet. Rejected up front, never ignored.
SUPPORTED_SELECTORS = QUERY_SELECTORS


def enabled(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get(ENABLE_ENV, "").strip() not in ("", "0", "false", "no")


def overrides_from_env(environ: dict[str, str] | None = None) -> tuple[dict[str, Any], str | None]:
    """(field overrides, preset name or file, or None) from OMNIKV_VLLM_CONFIG."""
    env = os.environ if environ is None else environ
    raw = env.get(CONFIG_ENV, "").strip()
    if not raw:
        return {}, None
    if not raw.startswith("{"):
        return {}, raw
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{CONFIG_ENV} is not valid JSON ({exc}); e.g. '{{\"budget\": 128}}'") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{CONFIG_ENV} must be a JSON object of OmniKVConfig fields")
    if isinstance(data.get("filter_layers"), list):
        data["filter_layers"] = tuple(data["filter_layers"])
    return data, None


def resolve_config(hf_config: Any, environ: dict[str, str] | None = None, *, block_size: int = 128) -> OmniKVConfig:
    """The model's preset (or the preset named in OMNIKV_VLLM_CONFIG), with the JSON overrides
    applied, through the library's one preset resolver.

    Selection is block-granular with the cache's `block_size` (what lets sparse layers run the
    stock paged kernel over a sparse block table) unless the JSON overrides say
    `"selection_block": 1` (token selection over gathered rows, slower); any other value is refused."""
    overrides, preset = overrides_from_env(environ)
    if preset is not None:
        config, made_for = resolve_preset(preset)
        check_preset_model(made_for, hf_config, where=f"{CONFIG_ENV}={preset}")
    else:
        config = preset_for_model(hf_config)
    if overrides:
        try:
            config = config.replace(**overrides)
        except TypeError as exc:
            raise ConfigError(f"{CONFIG_ENV}: {exc}") from None
    config = _with_selection_block(config, overrides, block_size)
    if config.selector not in SUPPORTED_SELECTORS:
        raise ConfigError(
            f"the vLLM backend supports selector in {SUPPORTED_SELECTORS}; got {config.selector!r}")
    if config.head_reduce == "per_kv_head":
        raise ConfigError("the vLLM backend does not support head_reduce='per_kv_head' yet; use max or sum")
    if config.refresh_every != 1:
        raise ConfigError("the vLLM backend re-selects at every decode step; refresh_every must be 1")
    return config


def _with_selection_block(config: OmniKVConfig, overrides: dict[str, Any], block_size: int) -> OmniKVConfig:
    asked = overrides.get("selection_block")
    if asked is None:
        return config.replace(selection_block=block_size)
    if asked not in (1, block_size):
        raise ConfigError(
            f"{CONFIG_ENV}: selection_block must be 1 (tokens) or vLLM's block size {block_size} (blocks, the "
            f"default); got {asked!r}. To select blocks of another size, start vLLM with --block-size {asked}")
    return config


def layer_plan(config: OmniKVConfig, hf_config: Any) -> LayerPlan:
    """Roles of every layer, exactly as the library assigns them."""
    return plan_layers(config, layer_types(hf_config))
