"""The Context Bank's transfer path on CPU: the offload code under CUDA's ordering rules
(`transfer="simulated"`), its sync and byte counts, and the memory it allocates."""

from __future__ import annotations

import pytest
import torch

from omnikv import OmniKVCache, OmniKVConfig
from omnikv.hf.compat import cache_kwargs
from omnikv.offload.layouts import gather_into, gather_packed, to_work_layout
from omnikv.offload.segment import Segment
from omnikv.errors import ConfigError
from omnikv.decoding.generation import teacher_forced_logits
from omnikv.methods import get_method
from omnikv.algorithm.selection import gather_rows
from omnikv.offload.transfer import SimulatedTransfer, Transfer


def cfg(**kw) -> OmniKVConfig:
    base = dict(filter_layers=(1, 3), num_wait_layers=0, budget=0.4, sink_tokens=2, recent_tokens=4)
    base.update(kw)
    return OmniKVConfig(**base)


def ids(n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def decode(model, cache, prompt: torch.Tensor, steps: int, chunk: int | None = None, mask=None):
    """Greedy: prefill (optionally chunked), then `steps` decode steps. (steps, B, V) logits."""
    chunk = chunk or prompt.shape[1]
    for s in range(0, prompt.shape[1], chunk):
        kw = {} if mask is None else {"attention_mask": mask[:, : s + chunk]}
        out = model(input_ids=prompt[:, s : s + chunk], use_cache=True, **kw, **cache_kwargs(cache))
    logits, tok = [], out.logits[:, -1:].argmax(-1)
    am = mask
    for _ in range(steps):
        kw = {}
        if am is not None:
            am = torch.cat([am, am.new_ones(am.shape[0], 1)], dim=1)
            kw = {"attention_mask": am}
        out = model(input_ids=tok, use_cache=True, **kw, **cache_kwargs(cache))
        logits.append(out.logits[:, -1].float())
        tok = out.logits[:, -1:].argmax(-1)
    return torch.stack(logits)


def run_pair(model, config, prompt, steps=6, chunk=None, mask=None, transfer=None, reserve=True):
    inline = OmniKVCache(model, config.replace(offload=False))
    sim = OmniKVCache(model, config, transfer=transfer or "simulated")
    if reserve:
        for c in (inline, sim):
            c.reserve(prompt.shape[1] + steps, decode_tokens=steps)
    return decode(model, inline, prompt, steps, chunk, mask), decode(model, sim, prompt, steps, chunk, mask), sim


@pytest.mark.parametrize("gather", ["device_gather", "host_gather"])
@pytest.mark.parametrize("head_reduce", ["max", "per_kv_head"])
def test_simulated_offload_equals_inline(models, gather, head_reduce):
    model = models("llama", num_hidden_layers=6)
    a, b, sim = run_pair(model, cfg(head_reduce=head_reduce), ids(150), transfer=SimulatedTransfer(gather))
    assert torch.isfinite(b).all()
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    assert sim.stats()["transfer"] == f"simulated/{gather}"


def test_simulated_chunked_prefill_and_left_padding(models):
    model = models("llama", num_hidden_layers=6)
    prompt = ids(120, seed=3, batch=2)
    mask = torch.ones_like(prompt)
    mask[1, :17] = 0  # a left-padded second row
    a, b, _ = run_pair(model, cfg(), prompt, chunk=32, mask=mask)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_simulated_without_reserve_grows_and_stays_exact(models):
    model = models("llama", num_hidden_layers=6)
    a, b, _ = run_pair(model, cfg(), ids(100, seed=5), steps=80, chunk=40, reserve=False)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_simulated_teacher_forcing_equals_inline(models):
    model = models("llama", num_hidden_layers=6)
    prompt, cont = ids(90, seed=7)[0].tolist(), ids(12, seed=8)[0].tolist()
    config = cfg(budget=0.5)
    inline = teacher_forced_logits(model, prompt, cont, get_method("omnikv", config=config.replace(offload=False)))
    sim = teacher_forced_logits(model, prompt, cont, get_method("omnikv", config=config, transfer="simulated"))
    torch.testing.assert_close(sim, inline, atol=1e-5, rtol=0)


@pytest.mark.parametrize("gather", ["device_gather", "host_gather"])
def test_simulated_second_turn_equals_inline(models, gather):
    """Prompt, decode, a second multi-token forward (a new chat turn), decode again: the
    generated rows join the bank and the prefix comes back to the device once (O(prompt) bytes),
    with logits equal to the inline path's."""
    model = models("llama", num_hidden_layers=6)
    config = cfg(budget=0.5)
    first, turn = ids(90, seed=7), ids(14, seed=8)

    @torch.no_grad()
    def two_turns(cache):
        out = []
        logits = model(input_ids=first, use_cache=True, **cache_kwargs(cache)).logits[:, -1:]
        for ids_ in ([None] * 4) + [turn] + [None] * 4:
            x = logits.argmax(-1) if ids_ is None else ids_
            logits = model(input_ids=x, use_cache=True, **cache_kwargs(cache)).logits[:, -1:]
            out.append(logits[:, -1].float())
        return torch.stack(out)

    inline = OmniKVCache(model, config.replace(offload=False))
    sim = OmniKVCache(model, config, transfer=SimulatedTransfer(gather))
    torch.testing.assert_close(two_turns(sim), two_turns(inline), atol=1e-5, rtol=0)
    figures = sim.transfer_figures()["prefill"]
    sparse = sum(len(s.layers) for s in sim.all_segments())
    row = 2 * model.config.num_key_value_heads * (model.config.hidden_size // model.config.num_attention_heads) * 4
    assert figures["h2d_bytes"] == (90 + 4) * sparse * row  # the bank back to the device, once
    assert sim.all_segments()[0].bank.length == 90 + 4 + 14


def test_gemma_hybrid_and_bf16_simulated(models):
    model = models("gemma3_text")
    config = OmniKVConfig(filter_layers=(1,), num_wait_layers=0, budget=0.5, sink_tokens=2, recent_tokens=4)
    a, b, _ = run_pair(model, config, ids(80, seed=9))
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    half = models("llama", num_hidden_layers=6).to(torch.bfloat16)
    try:
        a, b, _ = run_pair(half, cfg(), ids(80, seed=10))
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        torch.testing.assert_close(b, a, atol=0, rtol=0)  # the same kernels on the same rows
    finally:
        half.to(torch.float32)


def test_a_missing_wait_reads_poisoned_rows(models, monkeypatch):
    """The fake stream is strict: skip the wait before the sparse layers read `work` and the
    rows are NaN; skip the wait in the transfer itself and the same happens."""
    model = models("llama", num_hidden_layers=6)
    monkeypatch.setattr(Segment, "wait_ready", lambda self: None)
    _, b, _ = run_pair(model, cfg(), ids(100, seed=11), steps=3)
    assert torch.isnan(b).any()
    monkeypatch.undo()
    monkeypatch.setattr(SimulatedTransfer, "wait", lambda self, event, device: None)
    _, b, _ = run_pair(model, cfg(), ids(100, seed=11), steps=3)
    assert torch.isnan(b).any()


def test_sync_counter_and_no_hidden_host_reads(models, monkeypatch):
    """Device gather: no host sync in a decode step (the sampled token, read by the caller, is the
    one a step needs); and no omnikv code reads a tensor back to the host by other means."""
    import sys

    model = models("llama", num_hidden_layers=6)
    cache = OmniKVCache(model, cfg(), transfer="simulated")
    prompt = ids(120, seed=12)
    cache.reserve(130, decode_tokens=10)
    reads: list[str] = []

    def spy(name):
        original = getattr(torch.Tensor, name)

        def wrapped(self, *a, **kw):
            frame = sys._getframe(1)
            mod = frame.f_globals.get("__name__", "")
            if mod.startswith("omnikv") and mod not in ("omnikv.offload.transfer",):
                reads.append(f"{name} in {mod}:{frame.f_lineno}")
            return original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, wrapped)

    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True, **cache_kwargs(cache))
        tok = out.logits[:, -1:].argmax(-1)
        for name in ("item", "tolist", "cpu", "__bool__", "__int__", "__float__"):
            spy(name)
        for _ in range(4):
            out = model(input_ids=tok, use_cache=True, **cache_kwargs(cache))
            tok = out.logits[:, -1:].argmax(-1)
        monkeypatch.undo()
    stats = cache.stats()
    assert stats["host_syncs_per_step"] == 0
    assert reads == []
    # host gather: one sync per segment and step (the indices), counted as such
    cache = OmniKVCache(model, cfg(), transfer=SimulatedTransfer("host_gather"))
    decode(model, cache, prompt, 4)
    assert cache.stats()["host_syncs_per_step"] == len(cache.all_segments())


def test_bytes_per_step_and_per_prefill(models):
    model = models("llama", num_hidden_layers=6)
    config = cfg(partial_reload=False)
    cache = OmniKVCache(model, config, transfer="simulated")
    prompt = ids(200, seed=13)
    cache.reserve(210, decode_tokens=8)
    decode(model, cache, prompt, 5, chunk=50)
    s = cache.stats()
    k = config.resolve_budget(200)
    sparse_layers = sum(len(seg.layers) for seg in cache.all_segments())
    cfg_m = model.config
    row = 2 * cfg_m.num_key_value_heads * (cfg_m.hidden_size // cfg_m.num_attention_heads) * 4  # K+V, fp32
    assert s["h2d_bytes_per_step"] == k * sparse_layers * row  # every selected row, once
    # each chunk reads every sparse layer's prefix back from the bank (omnikv/offload/stream.py)
    assert s["h2d_bytes_prefill"] == (0 + 50 + 100 + 150) * sparse_layers * row
    assert s["d2h_bytes_prefill"] == 200 * sparse_layers * row  # each prompt row goes to the bank once
    assert s["d2h_bytes_per_step"] == 0  # generated rows stay on the device
    assert s["pinned_host_bytes"] == 210 * sparse_layers * row  # exactly the reserved rows


def test_memory_plan_matches_allocated_bytes(models):
    from omnikv.methods import get_method
    from omnikv.methods.memory import plan_memory

    model = models("llama", num_hidden_layers=6)
    config = cfg(offload=True)
    prompt, new = 300, 20
    cache = OmniKVCache(model, config, transfer="simulated")
    cache.reserve(prompt + new, decode_tokens=new)
    decode(model, cache, ids(prompt, seed=14), 3)
    plan = plan_memory(model.config, prompt, get_method("omnikv", config=config), device="cuda", dtype_bytes=4,
                       max_new_tokens=new, weights_bytes=0)
    pinned = cache.stats()["pinned_host_bytes"]
    assert abs(plan.host_kv_bytes - pinned) <= 0.05 * pinned
    full_layers = sum(layer.buffer.allocated_bytes() for layer in cache.layers if hasattr(layer, "buffer"))
    allocated = cache.stats()["device_kv_allocated_bytes"]  # the full layers' buffers + the working buffers
    assert allocated == full_layers + sum(seg.work.allocated_bytes() for seg in cache.all_segments())
    assert abs(plan.device_kv_bytes - allocated) <= 0.05 * allocated
    # the prefill's peak (streamed prefixes, pack buffers): tests/test_offload_prefill.py


def test_link_copies_must_be_contiguous():
    t = SimulatedTransfer()
    host = t.host_empty((4, 8), torch.float32, torch.device("cpu"))
    dev = torch.zeros(8, 4)
    with pytest.raises(RuntimeError, match="non-contiguous"):
        t.copy("side", host, dev.t())
    t.copy("side", host, dev.t().contiguous())
    assert t.counters.d2h_bytes == 4 * 8 * 4


def test_token_major_gathers_equal_the_layer_major_reference():
    gen = torch.Generator().manual_seed(0)
    for b, g in [(1, 1), (2, 1), (2, 3)]:
        bank = torch.randn(30, b, 2, 2, 3, 4, generator=gen)  # (T, B, L, 2, H, D)
        idx = torch.stack([torch.stack([torch.randperm(30, generator=gen)[:7] for _ in range(g)]) for _ in range(b)])
        layer_major = bank.permute(2, 3, 1, 4, 0, 5)  # (L, 2, B, H, T, D)
        expect = gather_rows(layer_major, idx)
        assert torch.equal(to_work_layout(gather_packed(bank, idx)), expect)
        out = torch.empty(2, 2, b, 3, 10, 4)[..., :7, :]  # a strided slice, like `work[..., :k, :]`
        gather_into(bank, idx, out)
        assert torch.equal(out, expect)


def test_bad_transfer_is_a_clear_error(models):
    model = models("llama", num_hidden_layers=6)
    with pytest.raises(ConfigError, match="transfer"):
        OmniKVCache(model, cfg(), transfer="warp")
    with pytest.raises(ConfigError, match="offload"):
        OmniKVCache(model, cfg(offload=False), transfer="simulated")
    assert isinstance(OmniKVCache(model, cfg()).transfer, Transfer)
    if not torch.cuda.is_available():  # asking for CUDA streams without CUDA says what to use instead
        for kind in ("cuda", "cuda_device_gather", "cuda_host_gather"):
            with pytest.raises(ConfigError, match="simulated"):
                OmniKVCache(model, cfg(), transfer=kind)
