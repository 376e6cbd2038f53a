"""The drop-free peers InfLLM and TidalDecode against slow references (test_baselines.py runs
them through the shared invariants: covering budget = full, padding, chunked prefill, multi-turn).
"""

from __future__ import annotations

import math

import pytest
import torch

from omnikv.config import OmniKVConfig
from omnikv.decoding.generation import teacher_forced_logits
from omnikv.errors import ConfigError
from omnikv.methods import get_method
from omnikv.methods import infllm as infllm_module
from omnikv.methods.infllm import InfLLMLayer, representative_scores, split_budget
from omnikv.methods.tidaldecode import default_selection_layers
from _tiny import cached_tiny_model
from reference import ReferenceOmniKV

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-4  # fp32: the same rows attended in another order differ by rounding only


def model_of(family: str, layers: int | None = None):
    return cached_tiny_model(family) if layers is None else cached_tiny_model(family, num_hidden_layers=layers)


def ids_of(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---------------------------------------------------------------------------------------------
# InfLLM


def ref_repr_scores(query: torch.Tensor, keys: torch.Tensor, q_start: int, window: int) -> torch.Tensor:
    """Loop twin of representative_scores: r_m = sum over later queries p (1 <= p - m <= window)
    and query heads h of q_{p,h} . k_{m, h's KV head}."""
    b, hq, q, _ = query.shape
    hk, n = keys.shape[1], keys.shape[-2]
    out = torch.zeros(b, n, dtype=torch.float64)
    for bi in range(b):
        for i in range(q):
            p = q_start + i
            for m in range(max(0, p - window), p):
                for h in range(hq):
                    out[bi, m] += float(query[bi, h, i].double() @ keys[bi, h // (hq // hk), m].double())
    return out.float()


@pytest.mark.parametrize("chunk", [None, 40])
def test_representative_scores_match_a_loop_reference(monkeypatch, chunk):
    if chunk is not None:  # several query chunks (each chunk's key range overlaps the next one's)
        monkeypatch.setattr(infllm_module, "SCORE_ELEMENTS", chunk * 4 * 7)
    g = torch.Generator().manual_seed(1)
    b, hq, hk, n, d, q_start, window = 2, 4, 2, 30, 8, 12, 6
    keys = torch.randn(b, hk, n, d, generator=g)
    query = torch.randn(b, hq, n - q_start, d, generator=g)
    got = representative_scores(query, keys, q_start, window)
    torch.testing.assert_close(got, ref_repr_scores(query, keys, q_start, window), atol=1e-4, rtol=1e-5)


def test_split_budget_adds_up_to_the_budget():
    for k, sink, local, size in [(100, 4, None, 16), (37, 4, None, 16), (10, 4, None, 16), (64, 0, 8, 8), (3, 4, None, 4)]:
        s, l, n = split_budget(k, sink, local, size)
        assert s + l + n * size == k and s == min(sink, k) and l >= 0
    assert split_budget(100, 4, None, 16) == (4, 64, 2)  # 96 after the sinks: 64 local, 2 blocks of 16
    assert split_budget(37, 4, None, 16) == (4, 33, 0)  # 33 - 22 = 11 < a block: all local


def ref_infllm_rows(keys, scores, query, k, sink_tokens, size, r, start) -> list[int]:
    """One sequence, lists and loops: keys (Hk, t, D), scores [t], query (Hq, D) -> attended prompt positions."""
    hk, t, _ = keys.shape
    g = query.shape[0] // hk
    if k >= t:
        return list(range(t))
    sink, local, blocks = split_budget(k, sink_tokens, None, size)
    end = t - local
    candidates = []
    j = 0
    while end - j * size > start + sink:
        rows = list(range(max(start + sink, end - (j + 1) * size), end - j * size))
        reps = sorted(rows, key=lambda m: -scores[m])[:r]
        rep = [keys[h, reps].double().mean(0) for h in range(hk)]
        score = sum(float(query[h].double() @ rep[h // g]) for h in range(query.shape[0]))
        candidates.append((score, rows))
        j += 1
    best = sorted(candidates, key=lambda c: -c[0])[:blocks]
    chosen = [m for _, rows in best for m in rows]
    sinks = [m for m in range(start, start + sink) if m < end]
    return sorted(set(sinks + chosen + list(range(end, t))))


@pytest.mark.parametrize("budget", [30, 0.5, 200])
def test_infllm_reads_the_reference_rows(budget):
    """Sinks + the blocks whose representative keys best match the query + the local window, per
    sequence of a left-padded batch (row 1: 7 padding positions), against the loop reference."""
    g = torch.Generator().manual_seed(2)
    b, hq, hk, t, d, size, r, pad = 2, 4, 2, 90, 8, 8, 3, 7
    keys, query = torch.randn(b, hk, t, d, generator=g), torch.randn(b, hq, 1, d, generator=g)
    scores = torch.randn(b, t, generator=g)
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, :pad] = False
    method = get_method("infllm", budget=budget, block_size=size, repr_tokens=r)
    layer = InfLLMLayer(method.budget_rule, 4, None, size, r, 16)
    layer.scores, layer.prompt_len, layer.seq_length = scores, t, t + 1
    layer.memory = layer.build_memory(keys, valid)
    positions, keep = layer.rows(query)
    k = method.budget_rule.tokens(t, clip=False)
    for bi, start in [(0, 0), (1, pad)]:
        got = sorted(set(positions[bi, 0][keep[bi]].tolist()) - {t})  # the new token is not a prompt row
        expect = ref_infllm_rows(keys[bi], scores[bi].tolist(), query[bi, :, 0], k, 4, size, r, start)
        assert got == expect
        assert bool((positions[bi, 0][keep[bi]] < t + 1).all())
        if budget != 200 and bi == 0:
            assert len(got) == k  # whole blocks only: exactly the budget


def test_infllm_rows_per_step_change_with_the_query_and_the_fork_gets_the_queries():
    from omnikv.decoding.fork import prefill_needs

    model = model_of("llama")
    assert prefill_needs(get_method("infllm", budget=24), model) == (1, True)
    ids = ids_of(120, 3)
    cont = ids_of(6, 4)
    small = teacher_forced_logits(model, ids, cont, get_method("infllm", budget=24, block_size=8))
    full = teacher_forced_logits(model, ids, cont, "full")
    assert (small - full).abs().max() > 10 * ATOL  # a real budget is not full attention


@pytest.mark.parametrize("options", [
    {"budget": 10, "sink_tokens": 4, "local_tokens": 8}, {"block_size": 0}, {"repr_tokens": 0},
    {"repr_window": -1}, {"local_tokens": 2.5}, {"page_size": 16},
])
def test_infllm_refuses_bad_settings(options):
    with pytest.raises(ConfigError):
        get_method("infllm", **options)


# ---------------------------------------------------------------------------------------------
# TidalDecode


def tidal_reference_config(layers: tuple[int, ...], budget) -> OmniKVConfig:
    """TidalDecode in the reference's terms, written from the paper: the selection layers select
    (no wait layer), top-k of the current query's raw logits per KV head, no forced sink/recent."""
    return OmniKVConfig(filter_layers=layers, num_wait_layers=0, budget=budget, selector="last",
                        head_reduce="per_kv_head", sink_tokens=0, recent_tokens=0, offload=False)


@pytest.mark.parametrize("family, layers, selection, budget", [
    ("llama", 8, None, 0.1), ("qwen2", 8, (2, 5), 24), ("gemma3_text", 6, None, 0.2),
])
def test_tidaldecode_matches_the_reference(family, layers, selection, budget):
    model = model_of(family, layers)
    ids, cont = ids_of(160, 5), ids_of(7, 6)
    method = get_method("tidaldecode", budget=budget, selection_layers=selection)
    chosen = selection or default_selection_layers(["full_attention"] * layers if family != "gemma3_text"
                                                   else [("full_attention" if i % 2 else "sliding_attention")
                                                         for i in range(layers)])
    lib = teacher_forced_logits(model, ids, cont, method)
    ref = ReferenceOmniKV(model, tidal_reference_config(chosen, budget)).logits(ids, cont)
    torch.testing.assert_close(lib, ref, atol=ATOL, rtol=0)
    full = teacher_forced_logits(model, ids, cont, "full")
    assert (lib - full).abs().max() > 10 * ATOL  # the budget really is sparse


def test_tidaldecode_default_layers_follow_the_paper():
    full = lambda n: ["full_attention"] * n  # noqa: E731
    assert default_selection_layers(full(32)) == (2, 13)  # the paper's Llama-3-8B setting
    assert default_selection_layers(full(30)) == (2, 12)  # SmolLM2-135M
    gemma = [("full_attention" if i % 6 == 5 else "sliding_attention") for i in range(26)]  # Gemma 3 1B
    assert default_selection_layers(gemma) == (5, 11)
    assert default_selection_layers(full(4)) == (2,)  # no room for a re-selection layer
    with pytest.raises(ConfigError, match="index >= 2"):
        default_selection_layers(full(2))


@pytest.mark.parametrize("options", [
    {"selection_layers": (5, 2)}, {"selection_layers": ()}, {"selection_layers": 2}, {"selection_layers": (-1,)},
    {"budget": 0}, {"window_size": 8},
])
def test_tidaldecode_refuses_bad_settings(options):
    with pytest.raises(ConfigError):
        get_method("tidaldecode", **options)


def test_tidaldecode_refuses_a_selection_layer_that_is_not_full_attention():
    with pytest.raises(ConfigError, match="not full-attention layers"):
        get_method("tidaldecode", selection_layers=(2,)).make_cache(model_of("gemma3_text"))
    with pytest.raises(ConfigError, match="not full-attention layers"):
        get_method("tidaldecode", selection_layers=(9,)).make_cache(model_of("llama"))
