"""OmniKV as a registry method: a config (preset, file or explicit) -> OmniKVCache per request."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from omnikv.algorithm.cache import OmniKVCache
from omnikv.config import OmniKVConfig
from omnikv.errors import ConfigError
from omnikv.methods import register
from omnikv.methods.base import Method
from omnikv.methods.memory import KVContext, KVPlan

_FIELDS = frozenset(f.name for f in dataclasses.fields(OmniKVConfig))


@register("omnikv")
@dataclass(eq=False)
class OmniKV(Method):
    """Options: `config` (OmniKVConfig), `preset` (a built-in preset name such as `smollm2-135m`,
    or a preset JSON file from `omnikv calibrate`), or any OmniKVConfig field (filter_layers,
    num_wait_layers, selector, head_reduce, sink_tokens, recent_tokens, offload, refresh_every,
    window_size ...) overriding the model's preset (`overrides`).
    `telemetry=True` also computes every sparse layer's true attention at each decode step and
    reports how much of it the selection covers (costs full attention; off by default).
    `transfer` picks how the Context Bank moves rows (`OmniKVCache(..., transfer=)`: auto, inline,
    cuda, simulated)."""

    config: OmniKVConfig | None = None
    preset: str | None = None
    telemetry: bool = False
    transfer: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def option_names(cls) -> frozenset[str]:
        return (super().option_names() - {"overrides"}) | _FIELDS

    @classmethod
    def from_options(cls, **options: Any) -> OmniKV:
        """OmniKVConfig fields go to `overrides`; the rest are the method's own options."""
        unknown = sorted(set(options) - cls.option_names())
        if unknown:
            raise ConfigError(f"unknown omnikv options {unknown}; valid: {sorted(_FIELDS)}")
        own_names = super().option_names()
        own = {k: v for k, v in options.items() if k in own_names}
        return cls(**own, overrides={k: v for k, v in options.items() if k in _FIELDS and k not in own})

    def validate(self) -> None:
        from omnikv.algorithm.presets import resolve_preset

        unknown = sorted(set(self.overrides) - _FIELDS)
        if unknown:
            raise ConfigError(f"unknown omnikv options {unknown}; valid: {sorted(_FIELDS)}")
        if self.config is not None and self.preset is not None:
            raise ConfigError("give either config or preset, not both")
        # Which model a preset file was made for (checked against the model in config_for).
        self.made_for: dict[str, Any] = {}
        self.base = self.config
        if self.preset is not None:
            self.base, self.made_for = resolve_preset(self.preset)
        self.overrides = {k: v for k, v in self.overrides.items() if v is not None}
        if self.base is not None:  # validate the overrides early
            self.base = self._configured(self.base)

    def _configured(self, config: OmniKVConfig) -> OmniKVConfig:
        """`config` with the user's overrides and budget (the budget as the checked `Budget`)."""
        if self.budget_rule is not None:
            return config.replace(budget=self.budget_rule, **self.overrides)
        return config.replace(**self.overrides)

    def config_for(self, model, *, warn: bool = True) -> OmniKVConfig:
        """The config this method runs on `model` (a model or its config); an unsupported
        architecture is refused first (omnikv.hf.cache.check_supported), before any preset lookup."""
        from omnikv.hf.cache import check_supported

        check_supported(model, self.name)
        if self.base is not None:
            if self.made_for:
                from omnikv.algorithm.presets import check_preset_model

                check_preset_model(self.made_for, model, where=f"preset file {self.preset}")
            return self.base
        from omnikv.algorithm.presets import preset_for_model

        return self._configured(preset_for_model(model, warn=warn))

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
            budget = {} if self.budget is None else {"budget": self.budget}
            d.update({"preset": "per model", **self.overrides, **budget})
        if self.static:
            d.update(static=True, compile=self.compile)
        return d

    def kv_plan(self, ctx: KVContext) -> KVPlan:
        """Dense and filter layers keep every row on the device; a sparse layer keeps its k
        selected rows + the generated ones there, and its full KV in the host bank (offload) or
        on the device. With offload on an accelerator the prefill's peak is the dense layers'
        KV plus what the streamed prefill holds (`prefill_stream_bytes`)."""
        from omnikv.algorithm.roles import Role, plan_layers

        cfg = self.config_for(ctx.config, warn=False)
        plan = plan_layers(cfg, list(ctx.layer_types))
        offload = cfg.offload if cfg.offload is not None else ctx.on_accelerator
        k = cfg.resolve_budget(ctx.context)
        row, full_rows = ctx.row_bytes, ctx.full_rows
        dev_kv = host_kv = full_part = 0
        for i, role in enumerate(plan.roles):
            if role is Role.SPARSE:
                dev_kv += row * (k + ctx.max_new_tokens)
                if offload:
                    # The bank is allocated once for prompt + new tokens (page-locked, exact).
                    host_kv += row * ctx.total_tokens
                else:
                    dev_kv += row * ctx.total_tokens
            else:
                dev_kv += row * full_rows[i]
                full_part += row * full_rows[i]
        note = f"{plan.summary()}; {k} selected tokens per sparse layer; offload={'on' if offload else 'off'}"
        notes = [note]
        peak = None
        if offload and ctx.on_accelerator:
            segments = [len(plan.segment(f)) for f in plan.layers_with(Role.FILTER)]
            peak = full_part + prefill_stream_bytes(segments, ctx.context, ctx.chunk, row)
            notes.append(f"prefill peak: dense layers + streamed prefixes and one chunk's pack ({ctx.chunk}-token chunks)")
        return KVPlan(dev_kv, host_kv, notes, device_peak_kv_bytes=peak, offload=bool(offload))

    def summarize(self, stats: dict[str, Any], config: dict[str, Any]) -> str:
        parts = [f"filter layers {config.get('filter_layers')}", f"budget {config.get('budget')}"]
        roles = stats.get("layer_roles") or []
        sparse = [i for i, r in enumerate(roles) if r == "sparse"]
        selected = stats.get("selected_tokens")
        if sparse and selected is not None:
            parts.append(f"sparse layers {sparse} attend {selected} of {stats.get('prompt_tokens')} prompt tokens")
        return ", ".join(parts)


def prefill_stream_bytes(segments: list[int], context: int, chunk: int, row: int) -> int:
    """Device bytes the streamed offload prefill (omnikv/offload/stream.py) holds at its peak
    besides the dense layers' KV, for segments of `segments[i]` sparse layers. The larger of:

    * the first chunk: it reads nothing back, so nothing waits on the side stream, and every
      segment's pack of its rows may still be on its way to the bank when the next chunk's first
      prefix read starts (the simulated transfer runs side work only when waited on, so it holds
      them all; a GPU's copies usually end sooner: an upper bound);
    * the last two chunks, per segment: one pack of the chunk's rows of every layer plus the
      prefixes (rows 0..start + n) of the layer attending and of the next one, read ahead (one
      when the segment has one layer)."""
    if context <= 0 or not segments:
        return 0
    first = min(chunk, context)
    best = first * sum(segments) + (min(context, 2 * first) if context > first else 0)
    last = (context - 1) % chunk + 1  # the last chunk's length
    for layers in segments:
        for start, n in ((context - last, last), (context - last - chunk, chunk)):
            if start > 0 and layers:
                best = max(best, min(layers, 2) * (start + n) + n * layers)
    return row * best
