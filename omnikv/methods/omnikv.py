"""OmniKV as a registry method: a config (preset, file or explicit) -> OmniKVCache per request."""

from __future__ import annotations

import dataclasses
from typing import Any

from omnikv.cache import OmniKVCache
from omnikv.config import OmniKVConfig
from omnikv.errors import ConfigError
from omnikv.methods import register
from omnikv.methods.base import Method

_FIELDS = {f.name for f in dataclasses.fields(OmniKVConfig)}


@register("omnikv")
class OmniKV(Method):
    """Options: `config` (OmniKVConfig), `preset` (path to a preset JSON file), or any
    OmniKVConfig field (filter_layers, num_wait_layers, selector, head_reduce, sink_tokens,
    recent_tokens, offload, refresh_every, window_size ...) overriding the model's preset.
    `telemetry=True` also computes every sparse layer's true attention at each decode step and
    reports how much of it the selection covers (costs full attention; off by default).
    `transfer` picks how the Context Bank moves rows (`OmniKVCache(..., transfer=)`: auto, inline,
    cuda, simulated)."""

    def __init__(
        self,
        budget: int | float | None = None,
        config: OmniKVConfig | None = None,
        preset: str | None = None,
        telemetry: bool = False,
        transfer: str | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__(budget)
        self.telemetry = telemetry
        self.transfer = transfer
        unknown = sorted(set(overrides) - _FIELDS)
        if unknown:
            raise ConfigError(f"unknown omnikv options {unknown}; valid: {sorted(_FIELDS)}")
        if config is not None and preset is not None:
            raise ConfigError("give either config or preset, not both")
        self.base, metadata = OmniKVConfig.from_json_with_metadata(preset) if preset else (config, {})
        # Which model a preset file was made for (checked against the model in config_for).
        self.preset_path = preset
        self.made_for = {k: metadata[k] for k in ("model_type", "num_layers") if k in metadata}
        self.overrides = {k: v for k, v in overrides.items() if v is not None}
        if budget is not None:
            self.overrides["budget"] = budget
        if self.base is not None:  # validate the overrides early
            self.base = self.base.replace(**self.overrides)

    def config_for(self, model) -> OmniKVConfig:
        if self.base is not None:
            if self.made_for:
                from omnikv.presets import check_preset_model

                check_preset_model(self.made_for, model, where=f"preset file {self.preset_path}")
            return self.base
        from omnikv.presets import preset_for_model

        return preset_for_model(model).replace(**self.overrides)

    supports_static = True

    def make_cache(self, model) -> OmniKVCache:
        cache = OmniKVCache(model, self.config_for(model), telemetry=self.telemetry, transfer=self.transfer,
                            static=self.static)
        self.last_config = cache.config
        return cache

    def describe(self) -> dict[str, Any]:
        cfg = getattr(self, "last_config", None) or self.base
        d: dict[str, Any] = {"method": self.name, "lossy": False}
        if cfg is not None:
            d.update(cfg.to_dict())
        else:
            d.update({"preset": "per model", **self.overrides})
        if self.static:
            d.update(static=True, compile=self.compile)
        return d

