"""Everything that depends on the transformers version lives here.

The cache and attention seams of transformers change often (5.24 renamed the `past_key_values`
argument to `cache`; between 5.2 and 5.20 the cache layers' `get_max_cache_shape` became
`get_max_length`, `get_mask_sizes` went from a `cache_position` tensor to a query length, and
`Cache.get_query_offset` appeared). Code elsewhere imports these names from this module only; the
contract test (`tests/test_contract.py`) fails with the version in its message when a seam moves.
Where a seam differs inside the tested range, this module asks transformers what it has (a
`hasattr`), not its version number: one rule for every release in between, tested at both ends
(the main venv and the floor venv, scripts/setup_floor.sh).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from packaging.version import Version

TRANSFORMERS_VERSION = Version(transformers.__version__)
# [low, high): keep in step with pyproject.toml (tests/test_contract.py checks). The floor, 5.2, is the
# newest 5.x that kvpress 0.5.5 (transformers < 5.3) accepts, so both install in one venv.
TESTED_RANGE = (Version("5.2.0"), Version("5.25.0"))

from transformers import AttentionInterface, Cache, DynamicCache  # noqa: E402
from transformers.cache_utils import (  # noqa: E402
    CacheLayerMixin,
    DynamicLayer,
    DynamicSlidingWindowLayer,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

# Name of the keyword through which generate() / forward() take the cache.
CACHE_KWARG = "cache" if TRANSFORMERS_VERSION >= Version("5.24.0") else "past_key_values"

# Releases before ~5.20 ask a cache layer for `get_max_cache_shape`, later ones `get_max_length`.
LAYER_MAX_LENGTH = "get_max_length" if hasattr(CacheLayerMixin, "get_max_length") else "get_max_cache_shape"
# Whether the model asks the cache where the query starts (`Cache.get_query_offset`); older releases
# take it from a `cache_position` tensor they build from `get_seq_length()`.
HAS_QUERY_OFFSET = hasattr(Cache, "get_query_offset")


def query_position_kwargs(pos: torch.Tensor | None) -> dict:
    """Extra forward arguments of a static decode step at device position `pos` (0-d), or None.

    Releases with `Cache.get_query_offset` ask the cache (our static cache answers `pos`): nothing
    to add. Older ones take the mask's query offset from `cache_position`, which they would compute
    from `get_seq_length()`, a Python int that changes every step (under torch.compile: a new graph
    per step): pass the device position instead."""
    if HAS_QUERY_OFFSET or pos is None:
        return {}
    return {"cache_position": pos.view(1)}


class CacheLayerBase(CacheLayerMixin):
    """transformers' cache-layer base under the newest names: a subclass implements
    `get_max_length`; older releases reach it through `get_max_cache_shape`."""

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return self.get_max_length()


def mask_query_length(query: int | torch.Tensor) -> int:
    """The number of query tokens of a `get_mask_sizes` call: newer releases pass it as an int,
    older ones pass the forward's `cache_position`, a (q,) tensor."""
    return int(query.shape[0]) if isinstance(query, torch.Tensor) else int(query)


def update_positions(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """(B, q) positions of the tokens a `Cache.update(k, v, layer_idx, *args, **kwargs)` call
    writes, or None when the model did not pass them: 5.24 passes `position_ids` (possibly nested
    in `kwargs`); older releases pass none (5.17) or only a `cache_position` that the forward derived
    from the cache's own length (5.2), which cannot tell whether the input continues the cache.
    Where this is None, the caches check the `position_ids` of the attention call instead."""
    inner = kwargs.get("kwargs") if isinstance(kwargs.get("kwargs"), dict) else kwargs
    pos = inner.get("position_ids")
    return pos if isinstance(pos, torch.Tensor) else None


def cache_kwargs(cache: Cache | None) -> dict:
    """`{CACHE_KWARG: cache}` for model(...) and model.generate(...): the keyword of the installed
    transformers (`cache` from 5.24, `past_key_values` before). Public as `omnikv.cache_kwargs`."""
    return {CACHE_KWARG: cache}


def text_config(model_or_config: Any) -> Any:
    """The text decoder's config of a model or of its config (a multimodal config nests it): the
    one call to transformers' `get_text_config(decoder=True)`."""
    config = model_or_config.config if isinstance(model_or_config, torch.nn.Module) else model_or_config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


@dataclass(frozen=True)
class TextShape:
    """The sizes of a text decoder that KV sizes and checks depend on."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int


def text_shape(model_or_config: Any) -> TextShape:
    """`TextShape` of a model or config: KV heads default to the query heads, the head dim to
    hidden / heads, as transformers' own attention modules do."""
    cfg = text_config(model_or_config)
    heads = cfg.num_attention_heads
    return TextShape(
        layers=cfg.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        hidden=cfg.hidden_size,
        intermediate=getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size,
        vocab=cfg.vocab_size,
    )


def layer_types(config) -> list[str]:
    """Per-layer attention type ("full_attention", "sliding_attention", ...) of a text config."""
    cfg = text_config(config)
    types = getattr(cfg, "layer_types", None)
    if types is None:
        window = getattr(cfg, "sliding_window", None)
        use_sw = getattr(cfg, "use_sliding_window", True)
        kind = "sliding_attention" if (window is not None and use_sw) else "full_attention"
        types = [kind] * cfg.num_hidden_layers
    return list(types)


def sliding_window(config) -> int | None:
    return getattr(text_config(config), "sliding_window", None)


def check_seams() -> list[str]:
    """Return a list of problems with the transformers seams we rely on (empty = fine)."""
    problems = []
    params = inspect.signature(CacheLayerMixin.update).parameters
    if "key_states" not in params or "value_states" not in params:
        problems.append("CacheLayerMixin.update(key_states, value_states, ...) changed")
    for name in ("get_seq_length", "get_mask_sizes", LAYER_MAX_LENGTH, "lazy_initialization"):
        if not hasattr(CacheLayerMixin, name):
            problems.append(f"CacheLayerMixin.{name} is gone")
    for name in ("update", "get_seq_length", "get_mask_sizes", "is_sliding"):
        if not hasattr(Cache, name):
            problems.append(f"Cache.{name} is gone")
    sdpa_params = inspect.signature(sdpa_attention_forward).parameters
    for name in ("module", "query", "key", "value", "attention_mask"):
        if name not in sdpa_params:
            problems.append(f"sdpa_attention_forward lost its `{name}` argument")
    if not hasattr(AttentionInterface, "register") or not hasattr(AttentionMaskInterface, "register"):
        problems.append("AttentionInterface/AttentionMaskInterface.register is gone")
    return problems


def version_note() -> str:
    lo, hi = TESTED_RANGE
    inside = lo <= TRANSFORMERS_VERSION < hi
    return (
        f"transformers {TRANSFORMERS_VERSION} ({'inside' if inside else 'OUTSIDE'} the tested range "
        f">={lo},<{hi})"
    )


def is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"
