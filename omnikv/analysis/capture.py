"""Record every layer's decode-step attention logits of a real model, without touching model code.

A registered attention function ("omnikv_capture") sees the post-RoPE query and the full cached,
post-RoPE keys of each layer (`module.layer_idx`); it records q.k * scaling for every query head and
then runs transformers' SDPA attention, so the model computes exactly what it would with "sdpa".
The previous attention implementation is restored on exit.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch

from omnikv.config import ANALYSIS_SELECTORS as SELECTORS
from omnikv.errors import InputError, UnsupportedModelError

CAPTURE_NAME = "omnikv_capture"


@dataclass
class AttentionRecord:
    """Decode-step attention of the recorded layers.

    logits: (S, L, H, T) raw scaled logits q.k * scaling; T = P + S key positions (prompt, then
    generated); slots of tokens not generated yet at a step hold -inf (probability 0).
    """

    logits: torch.Tensor
    prompt_len: int
    num_kv_heads: int
    layer_ids: list[int]  # model layer index of each recorded row
    generated_ids: list[int] = field(default_factory=list)

    def scores(self, selector: str = "last") -> torch.Tensor:
        """Selection scores over prompt keys (S, L, H, P): "last" = raw logits (the library default),
        "softmax_last" = per-head softmax over the prompt keys first."""
        prompt = self.logits[..., : self.prompt_len]
        if selector == "last":
            return prompt
        if selector == "softmax_last":
            return torch.softmax(prompt, dim=-1)
        raise InputError(f"selector must be one of {SELECTORS} for analysis, got {selector!r}")

    def probs(self) -> torch.Tensor:
        """Softmax attention probabilities over all keys (S, L, H, T)."""
        return torch.softmax(self.logits, dim=-1)


class _Recorder:
    def __init__(self, layers: set[int]):
        self.layers = layers
        self.active = False
        self.step_logits: dict[int, torch.Tensor] = {}


_RECORDER: _Recorder | None = None  # set only inside `capturing()`; the attention fn reads it


def _capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from omnikv.hf.attention import scaling_of
    from omnikv.hf.compat import sdpa_attention_forward

    rec = _RECORDER
    if rec is not None and rec.active and query.shape[2] == 1 and module.layer_idx in rec.layers:
        if kwargs.get("softcap") is not None:
            raise UnsupportedModelError("attention logit soft-capping is not supported by the analysis")
        # query (B, H, 1, D), key (B, H_kv, T, D): expand KV heads to their query heads
        group = query.shape[1] // key.shape[1]
        k = key[0].float().repeat_interleave(group, dim=0)  # (H, T, D)
        scale = scaling_of(module, query, {"scaling": scaling})
        logits = (query[0, :, 0, :].float().unsqueeze(1) @ k.transpose(1, 2)).squeeze(1) * scale  # (H, T)
        if attention_mask is not None:  # sliding-window layers mask old keys even at decode
            m = attention_mask[0, 0, -1, -logits.shape[-1] :]
            logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m.float()
        rec.step_logits[module.layer_idx] = logits
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


@contextlib.contextmanager
def capturing(model, layers: list[int]) -> Iterator[_Recorder]:
    """Switch `model` to the capture attention function for `layers`; restore the old one after."""
    global _RECORDER
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_NAME, _capture_attention)
    AttentionMaskInterface.register(CAPTURE_NAME, sdpa_mask)  # else the causal mask can be None
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE_NAME)
    _RECORDER = _Recorder(set(layers))
    try:
        yield _RECORDER
    finally:
        _RECORDER = None
        model.set_attn_implementation(previous)


def full_attention_layers(config) -> list[int]:
    """Layers OmniKV can make sparse: all, except sliding-window layers (e.g. Gemma 3)."""
    from omnikv.hf.compat import layer_types

    return [i for i, t in enumerate(layer_types(config)) if t == "full_attention"]


@torch.no_grad()
def record_decode_attention(model, input_ids: torch.Tensor | list[int], steps: int = 16) -> AttentionRecord:
    """Prefill the prompt with full attention, then decode `steps` greedy tokens one at a time,
    recording every full-attention layer's logits at each decode step.

    input_ids: (1, P) or a list of P token ids (batch 1 only).
    """
    from transformers import DynamicCache

    from omnikv.hf.compat import cache_kwargs, text_shape

    ids = torch.as_tensor(input_ids, dtype=torch.long)
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 2:
        raise InputError("analysis needs one prompt of at least 2 tokens (batch 1)")
    if steps < 1:
        raise InputError(f"decode steps must be >= 1, got {steps}")
    layers = full_attention_layers(model.config)
    shape = text_shape(model)
    heads, kv_heads = shape.heads, shape.kv_heads
    prompt_len = ids.shape[1]
    total = prompt_len + steps
    logits = torch.full((steps, len(layers), heads, total), float("-inf"))
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    generated: list[int] = []
    with capturing(model, layers) as rec:
        out = model(input_ids=ids.to(device), use_cache=True, **cache_kwargs(cache))
        token = int(out.logits[0, -1].argmax())
        rec.active = True
        for s in range(steps):
            generated.append(token)
            rec.step_logits.clear()
            out = model(input_ids=torch.tensor([[token]], device=device), use_cache=True, **cache_kwargs(cache))
            for row, layer in enumerate(layers):
                step = rec.step_logits.get(layer)
                if step is None:
                    raise UnsupportedModelError(
                        f"layer {layer} did not call the registered attention function; this architecture "
                        "cannot be analysed"
                    )
                logits[s, row, :, : step.shape[-1]] = step.cpu()
            token = int(out.logits[0, -1].argmax())
    return AttentionRecord(logits, prompt_len, kv_heads, layers, generated)
