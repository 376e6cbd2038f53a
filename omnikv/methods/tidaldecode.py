"""TidalDecode (Yang et al., ICLR 2025): position persistent sparse attention, drop-free, no offload.

At a decode step the first layers attend densely; a few *token selection layers* attend densely
too and, from the current query's logits q.K over the prompt, pick the top `budget` prompt
positions; every other full-attention layer attends only to the positions the nearest preceding
selection layer picked, plus every generated token. The paper's setting: layers 0 and 1 dense,
selection at layer 2 and one re-selection layer in the middle of the model (layer 13 of
Llama-3-8B's 32). Nothing is evicted and nothing leaves the device.

This is OmniKV's layer split without the Context Bank and without forced sink / recent tokens, so
the cache is an `OmniKVCache` with that configuration (`selection_config`): filter layers = the
selection layers, no wait layers, selector `last` (raw logits of the current query),
`per_kv_head` (with GQA a KV head takes the max of its query heads' logits; the paper's models
are MHA), `offload=False`. tests/test_tidaldecode.py holds it to the slow reference
(tests/reference.py) and to full attention at a covering budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omnikv.algorithm.cache import OmniKVCache
from omnikv.config import OmniKVConfig
from omnikv.errors import ConfigError
from omnikv.hf.cache import check_supported
from omnikv.hf.compat import layer_types
from omnikv.methods import register
from omnikv.methods.base import DEFAULT_BUDGET, Method, check_int
from omnikv.methods.memory import KVContext, KVPlan

FIRST_SELECTION = 2  # the paper: layers 0 and 1 dense, selection at layer 2
RESELECTION_DEPTH = 13 / 32  # the paper's re-selection layer 13 of Llama-3-8B's 32 layers


def default_selection_layers(types: list[str]) -> tuple[int, ...]:
    """The paper's rule on a model with these layer types: the first full-attention layer at index
    >= 2, and the full-attention layer nearest 13/32 of the depth after it (none if there is no
    full-attention layer left between them and a sparse layer after the re-selection)."""
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    first = next((i for i in full if i >= FIRST_SELECTION), None)
    if first is None:
        raise ConfigError(
            f"tidaldecode needs a full-attention layer at index >= {FIRST_SELECTION} to select tokens; "
            f"this model's full-attention layers are {full}"
        )
    later = [i for i in full if i > first + 1 and i < full[-1]]  # sparse layers on both sides of it
    if not later:
        return (first,)
    target = RESELECTION_DEPTH * len(types)
    return (first, min(later, key=lambda i: (abs(i - target), i)))


@register("tidaldecode")
@dataclass(eq=False)
class TidalDecode(Method):
    """Options: `selection_layers` (None: the paper's rule, `default_selection_layers`; else the
    layer indices, sorted, each a full-attention layer, e.g. (2, 13))."""

    selection_layers: tuple[int, ...] | None = None
    default_budget = DEFAULT_BUDGET

    def validate(self) -> None:
        layers = self.selection_layers
        if layers is None:
            return
        if isinstance(layers, int) or not isinstance(layers, (tuple, list)) or not layers:
            raise ConfigError(
                f"tidaldecode selection_layers must be a non-empty list of layer indices, e.g. (2, 13); got {layers!r}"
            )
        for i in layers:
            check_int("selection_layers entries", i, 0)
        if list(layers) != sorted(set(layers)):
            raise ConfigError(f"tidaldecode selection_layers must be sorted and distinct; got {tuple(layers)}, "
                              f"use {tuple(sorted(set(layers)))}")
        self.selection_layers = tuple(layers)

    def selection_config(self, model_or_config) -> OmniKVConfig:
        """The OmniKV configuration that is TidalDecode on this model (see the module docstring)."""
        types = layer_types(model_or_config)
        layers = self.selection_layers or default_selection_layers(types)
        full = [i for i, t in enumerate(types) if t == "full_attention"]
        bad = [i for i in layers if i not in full]
        if bad:
            raise ConfigError(
                f"tidaldecode selection_layers {bad} are not full-attention layers of this model "
                f"(it has {len(types)} layers; full-attention ones: {full})"
            )
        return OmniKVConfig(
            filter_layers=layers, num_wait_layers=0, budget=self.budget_rule, selector="last",
            head_reduce="per_kv_head", sink_tokens=0, recent_tokens=0, offload=False, partial_reload=False,
            source="tidaldecode",
        )

    def make_cache(self, model) -> OmniKVCache:
        check_supported(model, self.name)
        cache = OmniKVCache(model, self.selection_config(model))
        cache.method_name = self.name
        self.last_layers = cache.config.filter_layers
        return cache

    def kv_plan(self, ctx: KVContext) -> KVPlan:
        """OmniKV's plan of the same configuration: every row on the device, plus each sparse
        layer's working buffer of the selected rows + the generated ones."""
        from omnikv.methods.omnikv import OmniKV

        return OmniKV(config=self.selection_config(ctx.config)).kv_plan(ctx)

    def describe(self) -> dict[str, Any]:
        layers = self.selection_layers or getattr(self, "last_layers", None)
        return {
            "method": self.name,
            "budget": self.budget,
            "lossy": False,
            "selection_layers": list(layers) if layers else "first full-attention layer >= 2 + one near 13/32 depth",
            "budgeted_layers": "full-attention layers after the first selection layer, except the selection layers",
            "attended": "budget prompt tokens per KV head (top q.K at the selection layer) + every generated token",
            "device_kv": "every row (drop-free, no offload) + each sparse layer's buffer of its selected rows",
        }

    def summarize(self, stats: dict[str, Any], config: dict[str, Any]) -> str:
        return f"selection layers {config.get('selection_layers')}, budget {config.get('budget')}"
