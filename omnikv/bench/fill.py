"""Filling a cache to a given context length for timing, and one timed-able decode step.

Two ways to fill:

* `synthetic_fill`: random keys/values of the model's shapes pushed through `cache.update(k, v,
  layer)` for every layer in order - exactly the calls a prefill makes, minus the model. Decode
  timings barely depend on the values, so 32K-1M contexts can be timed in seconds. One exception:
  random keys have no structure, so OmniKV's selection changes ~70% of its rows from one step to
  the next (~15-25% on real or random-token prefills), and its partial reload
  (`OmniKVConfig.partial_reload`) saves little here: synthetic KV is its pessimistic case. OmniKV's cache
  sets its prompt bookkeeping from these calls; sliding-window layers keep their last window.
  Methods that must *see* prefill attention to decide what to keep (H2O, SnapKV) cannot be filled
  this way: their `Method.needs_real_prefill` says so.
* `prefill_fill`: a real (chunked) prefill of random token ids through the model, timed.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

from omnikv.hf.compat import cache_kwargs, text_shape
from omnikv.errors import ConfigError

def needs_real_prefill(method) -> bool:
    """True when `method` cannot be timed from a synthetic fill (the method says so)."""
    return bool(method.needs_real_prefill)


def kv_shapes(model: torch.nn.Module) -> tuple[int, int, int]:
    """(num_layers, num_key_value_heads, head_dim) of the model's text decoder."""
    shape = text_shape(model)
    return shape.layers, shape.kv_heads, shape.head_dim


def model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


@torch.inference_mode()
def synthetic_fill(model: torch.nn.Module, cache, context: int, batch: int = 1, seed: int = 0) -> float:
    """Push random (B, H_kv, context, D) KV through `cache.update` for every layer; seconds taken."""
    if context < 1:
        raise ConfigError(f"context must be >= 1 token; got {context}")
    layers, kv_heads, head_dim = kv_shapes(model)
    device, dtype = model_device_dtype(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, kv_heads, context, head_dim)
    t0 = time.perf_counter()
    for layer in range(layers):
        # Fresh tensors per layer: a cache may keep a reference to what it was given.
        k = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        v = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        cache.update(k, v, layer)
        del k, v
    _sync(device)
    return time.perf_counter() - t0


@torch.inference_mode()
def prefill_fill(
    model: torch.nn.Module, cache, context: int, batch: int = 1, chunk: int | None = 2048, seed: int = 0,
    method: Any = None,
) -> tuple[float, torch.Tensor]:
    """Real prefill of `context` random token ids (in chunks; in one forward for a `method` that
    compresses at the end of it, kvpress's presses); (seconds, next token (B, 1))."""
    if context < 1:
        raise ConfigError(f"context must be >= 1 token; got {context}")
    device, _ = model_device_dtype(model)
    vocab = text_shape(model).vocab
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, context), generator=gen).to(device)
    step = context if method is not None and method.prefill_in_one_forward else (chunk or context)
    _sync(device)
    t0 = time.perf_counter()
    logits = None
    for s in range(0, context, step):
        x = ids[:, s : s + step]
        with _around(method, model, cache, x.shape[-1]) as extra:
            out = model(input_ids=x, use_cache=True, logits_to_keep=1, **cache_kwargs(cache), **extra)
        logits = out.logits[:, -1]
    tok = logits.argmax(-1, keepdim=True)
    _sync(device)
    return time.perf_counter() - t0, tok


def first_token(model: torch.nn.Module, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """(B, 1) a fixed token id to start decoding from after a synthetic fill."""
    device, _ = model_device_dtype(model)
    vocab = text_shape(model).vocab
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    return torch.randint(0, vocab, (batch, 1), generator=gen).to(device)


@torch.inference_mode()
def decode_step(model: torch.nn.Module, cache, tok: torch.Tensor, method: Any = None) -> torch.Tensor:
    """One real decode step of (B, 1) tokens; returns the greedy next tokens (B, 1).

    EOS is never checked: the bench decodes exactly as many steps as asked.
    """
    with _around(method, model, cache, 1) as extra:
        out = model(input_ids=tok, use_cache=True, logits_to_keep=1, **cache_kwargs(cache), **extra)
    return out.logits[:, -1].argmax(-1, keepdim=True)


def _around(method: Any, model: torch.nn.Module, cache, n_tokens: int):
    """The method's context around a forward (omnikv.methods.base.Method.forward_context)."""
    return contextlib.nullcontext({}) if method is None else method.forward_context(model, cache, n_tokens)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
