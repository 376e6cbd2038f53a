"""The offload prefill (omnikv/offload/stream.py): outputs equal to offload off, bit for bit, and a
device peak of the dense layers' KV plus a bounded working set, counted by the device meter
(omnikv/hf/meter.py) through the transfer interface."""

from __future__ import annotations

import gc

import pytest
import torch

from omnikv import OmniKVCache, OmniKVConfig
from omnikv.hf.compat import cache_kwargs
from omnikv.hf.meter import DeviceMeter
from test_transfer import decode, ids


def config(filters=(1, 3), **kw) -> OmniKVConfig:
    base = dict(filter_layers=filters, num_wait_layers=0, budget=0.4, sink_tokens=2, recent_tokens=4)
    base.update(kw)
    return OmniKVConfig(**base)


@torch.no_grad()
def prefill_logits(model, cache, prompt: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    return [model(input_ids=prompt[:, s : s + chunk], use_cache=True, **cache_kwargs(cache)).logits
            for s in range(0, prompt.shape[1], chunk)]


@pytest.mark.parametrize("family, filters", [("llama", (1, 3)), ("gemma3_text", (1,))])
def test_chunked_offload_prefill_equals_offload_off_bit_for_bit(models, family, filters):
    """Every chunk's logits are equal bit for bit (the same rows, the same kernels); the decode
    steps after it agree to float rounding (the two gathers differ, as before this change)."""
    model = models(family) if family != "llama" else models("llama", num_hidden_layers=6)
    prompt = ids(130, seed=21)
    cfg = config(filters)
    caches = OmniKVCache(model, cfg.replace(offload=False)), OmniKVCache(model, cfg, transfer="simulated")
    for cache in caches:
        cache.reserve(136, decode_tokens=6)
    off, on = (prefill_logits(model, cache, prompt, 32) for cache in caches)
    assert len(on) == 5 and all(torch.equal(a, b) for a, b in zip(on, off))
    s = caches[1].stats()
    assert s["h2d_bytes_prefill"] > 0  # the prefixes came back from the bank
    ref, sim = (decode(model, cache, prompt[:, -1:], 5) for cache in caches)
    assert torch.isfinite(sim).all()  # a read before its copy landed would be NaN
    torch.testing.assert_close(sim, ref, atol=1e-5, rtol=0)


def test_128k_prefill_peaks_at_the_dense_layers_plus_two_streamed_layers():
    """A 131072-token prompt in 4K chunks (synthetic KV, small dimensions), 8 layers: 2 kept whole
    on the device (dense + filter), 6 sparse. The device peak is the full layers' KV, two sparse
    layers' prefixes and one chunk of the sparse layers' rows; without streaming it was every sparse
    layer's whole prompt. Everything the prefill held is freed once its copies are done."""
    from omnikv.models.tiny import tiny_model

    model = tiny_model("llama", num_hidden_layers=8, hidden_size=8, num_attention_heads=2, num_key_value_heads=1,
                       intermediate_size=8)
    cache = OmniKVCache(model, config((1,), budget=256), transfer="simulated")
    total, chunk, layers, sparse = 131072, 4096, 8, 6
    cache.reserve(total + 4, decode_tokens=4)
    gen = torch.Generator().manual_seed(0)
    row = 2 * 1 * 4 * 4  # K + V of one token in one layer: 1 KV head, head dim 4, fp32
    with torch.no_grad():
        for s in range(0, total, chunk):
            for layer in range(layers):
                k = torch.randn(1, 1, chunk, 4, generator=gen)
                cache.update(k, torch.randn_like(k), layer)
    stats = cache.stats()
    dense = 2 * (total + 4) * row  # the dense and filter layers' buffers, reserved exactly
    bound = dense + 2 * total * row + chunk * sparse * row
    assert stats["device_kv_peak_bytes"] == bound  # reached in the last chunk
    assert stats["device_kv_peak_bytes"] >= dense + total * row  # the last chunk's prefix was there
    assert stats["device_kv_peak_bytes"] < dense + sparse * total * row / 2  # the old way: all of it
    # the prefixes came back once per chunk (prompt^2 / (2 chunk) rows per layer); each row went once
    assert stats["h2d_bytes_prefill"] == sum(range(0, total, chunk)) * sparse * row
    assert stats["d2h_bytes_prefill"] == total * sparse * row
    assert stats["host_kv_bytes"] == total * sparse * row
    seg = cache.all_segments()[0]
    cache.transfer.host_wait(seg.bank.written, "test: the last chunk has landed")
    gc.collect()
    assert cache.meter.live == dense  # the streamed prefixes and the pack buffers are gone
    assert seg.device_bytes() == 0


def test_after_a_decode_step_only_the_working_buffers_stay(models):
    model = models("llama", num_hidden_layers=6)
    cache = OmniKVCache(model, config(), transfer="simulated")
    cache.reserve(204, decode_tokens=4)
    decode(model, cache, ids(200, seed=4), 2, chunk=64)
    gc.collect()
    full = sum(layer.buffer.allocated_bytes() for layer in cache.layers if hasattr(layer, "buffer"))
    work = sum(seg.work.allocated_bytes() for seg in cache.all_segments())
    assert cache.meter.live == full + work
    assert cache.stats()["device_kv_allocated_bytes"] == full + work
    assert cache.stats()["device_kv_peak_bytes"] > full + work  # the prefill held more, for a while


def test_device_meter_counts_until_the_last_view_dies():
    meter = DeviceMeter()
    t = meter.empty((4, 8), torch.float32, "cpu")
    view = t[1:3]
    del t
    gc.collect()
    assert meter.live == 128
    del view
    gc.collect()
    assert meter.live == 0 and meter.peak == 128
    meter.reset_peak()
    assert meter.peak == 0


@pytest.mark.parametrize("prompt, chunk", [(2000, 256), (512, 256)])
def test_memory_plan_matches_a_run_at_the_prefill_peak_and_when_decoding(prompt, chunk):
    """`omnikv plan`'s figures (methods/memory.py) against what a run through the transfer
    interface allocates, counted by the device meter: a 32-layer model (Llama-3-8B's layer count,
    small dimensions) with the default filter layers, a chunked prefill, then decode steps. At 2000
    tokens the peak is in the last chunk (two long prefixes); at 512 it is the first chunk's packs
    of every segment, still in flight when the second chunk starts."""
    from omnikv.methods.memory import KVContext
    from omnikv.methods import get_method
    from omnikv.methods.memory import plan_memory
    from omnikv.models.tiny import tiny_model

    model = tiny_model("llama", num_hidden_layers=32, hidden_size=8, num_attention_heads=2, num_key_value_heads=1,
                       intermediate_size=8)
    method = get_method("omnikv", budget=0.1, offload=True)
    new = 8
    cache = OmniKVCache(model, method.config_for(model, warn=False), transfer="simulated")
    cache.reserve(prompt + new, decode_tokens=new)
    decode(model, cache, ids(prompt, seed=6), 3, chunk=chunk)
    gc.collect()
    stats = cache.stats()
    plan = plan_memory(model.config, prompt, method, device="cuda", dtype_bytes=4, max_new_tokens=new,
                       prefill_chunk_size=chunk, weights_bytes=0)
    peak, steady = stats["device_kv_peak_bytes"], stats["device_kv_allocated_bytes"]
    prefill = method.kv_plan(KVContext.of(model.config, prompt, new, 4, True, chunk)).device_peak_kv_bytes
    assert prefill == peak  # the prefill's own figure, to the byte (the peak is in the prefill here)
    assert abs(plan.device_peak_kv_bytes - peak) <= 0.05 * peak, (plan.device_peak_kv_bytes, peak)
    assert abs(plan.device_kv_bytes - steady) <= 0.05 * steady, (plan.device_kv_bytes, steady)
    assert cache.meter.live == steady  # after prefill only the dense layers and working buffers stay
    assert abs(plan.host_kv_bytes - stats["pinned_host_bytes"]) <= 0.05 * stats["pinned_host_bytes"]
    if prompt > 4 * chunk:  # a long prompt: the peak is a fraction of full attention's KV
        assert peak < plan.full_device_kv_bytes / 2


def test_hybrid_sliding_layers_are_in_the_device_peak(models):
    """Gemma 3's sliding-window layers (transformers' own window cache) are counted by the meter:
    the peak is never below the rows in use, and while a chunk runs it holds each sliding layer's
    window + chunk, which the peak must include."""
    model = models("gemma3_text")
    window = model.config.sliding_window
    chunk = 32
    prompt = ids(3 * window, seed=5)
    cache = OmniKVCache(model, config((1,)), transfer="simulated")
    cache.reserve(prompt.shape[1] + 4, decode_tokens=4)
    prefill_logits(model, cache, prompt, chunk)
    s = cache.stats()
    sliding = [layer for layer in cache.layers if type(layer).__name__ == "SlidingLayer"]
    assert sliding, "the tiny Gemma 3 has sliding layers"
    cfg = model.config
    row = 2 * cfg.num_key_value_heads * cfg.head_dim * next(model.parameters()).element_size()
    windows = len(sliding) * (window - 1 + chunk) * row  # one chunk's window + chunk per sliding layer
    assert s["device_kv_peak_bytes"] >= s["device_kv_bytes"]
    assert s["device_kv_peak_bytes"] >= windows + sum(layer.device_bytes() for layer in cache.layers if layer not in sliding)
    from omnikv.methods import get_method
    from omnikv.methods.memory import plan_memory

    method = get_method("omnikv", config=config((1,)))
    plan = plan_memory(model.config, prompt.shape[1], method, device="cuda", dtype_bytes=4, max_new_tokens=4,
                       prefill_chunk_size=chunk, weights_bytes=0)
    peak = s["device_kv_peak_bytes"]
    assert abs(plan.device_peak_kv_bytes - peak) <= 0.05 * peak, (plan.device_peak_kv_bytes, peak)
