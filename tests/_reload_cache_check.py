"""Run by tests/test_reload.py in a child process with TRITON_INTERPRET=1 and Triton on the path:
the partial-reload kernel as the decode step's gather of a real OmniKV cache over a simulated
host<->device link (CUDA's ordering rules on CPU, anything read before its copy landed is NaN).

For the eager step (`DeviceGather`) and the static step, eager and compiled with fullgraph=True
(`StaticGather`, the kernel as the custom op `omnikv::reload_rows`): greedy tokens equal the cache
without offload, logits agree to rounding, the kernel really ran (the bytes are on the device
counter), no host sync in a step, and every step's h2d bytes are exactly the rows whose position
entered the selection since the last step, as counted here from the selections themselves.
Exits non-zero on failure."""

from __future__ import annotations

import os
import sys

import torch

from omnikv import OmniKVCache, OmniKVConfig
from omnikv.hf.compat import cache_kwargs
from omnikv.hf.static import StaticDecoder
from omnikv.models.tiny import tiny_model
from omnikv.offload.reload import triton_usable

ATOL = 1e-4  # slots hold the rows in another order than a full gather: rounding-level differences


def config(**kw) -> OmniKVConfig:
    base = dict(filter_layers=(1, 3), num_wait_layers=0, budget=0.5, sink_tokens=2, recent_tokens=4)
    base.update(kw)
    return OmniKVConfig(**base)


def changed_row_bytes(cache: OmniKVCache, before: dict[int, torch.Tensor], after: dict[int, torch.Tensor]) -> int:
    """Bytes of the rows whose position is in `after`'s selection and not in `before`'s, over every
    segment, counted one (sequence, group) at a time: what a partial reload must move."""
    total = 0
    for seg in cache.all_segments():
        old, new = before[seg.filter_layer], after[seg.filter_layer]  # (B, G, k)
        b, g, _ = new.shape
        _, _, lsz, _, h, d = seg.bank.data.shape
        row = lsz * 2 * (h if g == 1 else 1) * d * seg.bank.data.element_size()
        for bi in range(b):
            for gi in range(g):
                total += len(set(new[bi, gi].tolist()) - set(old[bi, gi].tolist())) * row
    return total


def greedy(model, cache, ids: torch.Tensor, steps: int, decoder=None):
    """Tokens (B, steps), logits (steps, B, V), and per step (h2d bytes counted, bytes expected,
    host syncs)."""
    cache.reserve(ids.shape[1] + steps, decode_tokens=steps)
    logits = model(input_ids=ids, use_cache=True, **cache_kwargs(cache)).logits[:, -1]
    toks, rows, figures, before = [], [], [], None
    for _ in range(steps):
        tok = logits.argmax(-1, keepdim=True)
        toks.append(tok)
        if decoder is not None:
            logits = decoder(tok)[:, -1]
        else:
            logits = model(input_ids=tok, use_cache=True, **cache_kwargs(cache)).logits[:, -1]
        rows.append(logits)
        after = {f: idx.clone() for f, idx in cache.selected_indices().items()} if cache.offload else None
        if before is not None:
            stats = cache.stats()
            figures.append((stats["h2d_bytes_per_step"], changed_row_bytes(cache, before, after),
                            stats["host_syncs_per_step"]))
        before = after
    return torch.cat(toks, dim=1), torch.stack(rows), figures


def check(name: str, model, ids: torch.Tensor, steps: int, make_decoder=None, **cfg) -> None:
    with torch.inference_mode():
        ref_toks, ref_logits, _ = greedy(model, OmniKVCache(model, config(offload=False, **cfg)), ids, steps)
        cache = OmniKVCache(model, config(**cfg), transfer="simulated", static=make_decoder is not None)
        decoder = make_decoder(model, cache) if make_decoder else None
        toks, logits, figures = greedy(model, cache, ids, steps, decoder)
    assert torch.equal(toks, ref_toks), (name, toks, ref_toks)
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)
    moved = sum(int(c) for c in cache.transfer.counters.device_h2d)
    assert moved > 0, f"{name}: the reload kernel never ran (nothing on the device counter)"
    full = sum(seg.k * seg.bank.token_bytes() * ids.shape[0] for seg in cache.all_segments())
    for step, (counted, expected, syncs) in enumerate(figures, start=2):
        assert counted == expected, f"{name} step {step}: counted {counted} B, changed rows are {expected} B"
        assert syncs == 0, f"{name} step {step}: {syncs} host syncs"
    assert any(0 < c < full for c, _, _ in figures), f"{name}: no step moved fewer bytes than a full gather ({full})"
    print(f"{name}: ok; bytes per step {[c for c, _, _ in figures]} (a full gather: {full})")


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET") == "1" and triton_usable(torch.device("cpu"))
    model = tiny_model("llama", num_hidden_layers=6)
    ids = torch.randint(0, 256, (1, 150), generator=torch.Generator().manual_seed(11))
    check("eager", model, ids, 6)
    check("eager per_kv_head", model, ids, 6, head_reduce="per_kv_head")
    batch = torch.randint(0, 256, (2, 120), generator=torch.Generator().manual_seed(12))
    check("eager batch 2", model, batch, 5)
    check("static eager", model, ids, 6, make_decoder=lambda m, c: StaticDecoder(m, c))
    torch._dynamo.reset()
    compiled = []

    def make_compiled(m, c):
        compiled.append(StaticDecoder(m, c, compile=True, backend="aot_eager"))
        return compiled[-1]

    check("static compiled fullgraph", model, ids, 6, make_decoder=make_compiled)
    assert compiled[0].compiles == 1, compiled[0].compiles
    print("reload in the decode step: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
