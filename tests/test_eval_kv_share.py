"""The runner's device KV share: full attention itself must come out at exactly 1.0, also on a
hybrid model whose sliding-window layers keep only their window (Gemma 3)."""

from __future__ import annotations

import pytest
import torch

from omnikv.hf.compat import cache_kwargs

from omnikv.eval.runner import _full_kv_bytes, budget_report
from omnikv.methods import get_method
from omnikv.models.tiny import tiny_model


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_full_attention_share_is_one(family):
    model = tiny_model(family)
    ids = torch.randint(3, model.config.vocab_size, (40,)).tolist()  # longer than the tiny window (8)
    cache = get_method("full").make_cache(model)
    with torch.inference_mode():
        model(torch.tensor([ids]), **cache_kwargs(cache), use_cache=True)
        for tok in (5, 6, 7):  # a few decode steps past the prompt
            model(torch.tensor([[tok]]), **cache_kwargs(cache), use_cache=True)
    rep = budget_report(cache.stats(), model, len(ids) + 3)
    assert rep["device_kv_share"] == pytest.approx(1.0)


def test_sliding_layers_counted_at_their_window():
    model = tiny_model("gemma3_text")  # 6 layers: sliding, full, sliding, full, sliding, full
    cfg = model.config
    row = 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # K+V, fp32
    window = cfg.sliding_window
    assert _full_kv_bytes(model, 100) == row * (3 * 100 + 3 * (window - 1))
    assert _full_kv_bytes(model, 5) == row * 6 * 5  # shorter than the window: every token everywhere
