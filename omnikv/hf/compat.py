"""Everything that depends on the transformers version lives here.

The cache and attention seams of transformers change often (5.24 renamed the `past_key_values`
argument to `cache`). Code elsewhere imports these names from this module only; the contract test
(`tests/test_contract.py`) fails with the version in its message when a seam moves.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from packaging.version import Version

TRANSFORMERS_VERSION = Version(transformers.__version__)
TESTED_RANGE = (Version("5.20.0"), Version("5.25.0"))  # [low, high)

from transformers import AttentionInterface, Cache  # noqa: E402
from transformers.cache_utils import (  # noqa: E402
    CacheLayerMixin,
    DynamicLayer,
    DynamicSlidingWindowLayer,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

# Name of the keyword through which generate() / forward() take the cache.
CACHE_KWARG = "cache" if TRANSFORMERS_VERSION >= Version("5.24.0") else "past_key_values"


def cache_kwargs(cache: Cache | None) -> dict:
    """`{CACHE_KWARG: cache}` for model(...) and model.generate(...)."""
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
    for name in ("get_seq_length", "get_mask_sizes", "get_max_length", "lazy_initialization"):
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
