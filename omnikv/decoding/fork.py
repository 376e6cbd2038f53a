"""Prefill once, decode many: one full-attention prefill of a prompt shared by several methods.

Every method in this library prefills with full attention (OmniKV, Quest and the lossy baselines
decide nothing until the first decode step), so the KV of a prompt is the same for all of them. A
`SharedPrefill` runs the prompt's first `len(prompt) - tail` tokens once, recording each layer's
keys and values (and, when a method needs them, the full-attention layers' queries). `cache_for`
then builds a method's own cache holding that prefix, as if its own prefill had run over it, and a
forked `Session` feeds the remaining `tail` tokens through the method's cache itself.

So a fork equals the method's own prefill run in two chunks (prefix, tail): exact by construction
for methods whose chunked prefill equals one pass (all of ours, tested), and equal to an unchunked
run up to float rounding of the two attention calls (tested per method in tests/test_fork.py).
What methods decide at the end of prefill they decide on their own cache:

* SnapKV's observation window and OmniKV's `uniform` / `exp` / `union` windows are the
  last prompt queries: the tail is at least that long, so they see them themselves;
* H2O scores every prompt row by the attention *all* prompt queries gave it: the shared prefill
  records the queries of full-attention layers and each H2O layer scores the prefix with them
  (`observe_prefill`, as its own first prefill chunk would have), then the tail as usual;
* a cache says what it needs (`fork_needs`: the tail, whether it needs the prefix's queries) and
  takes the prefix itself (`seed_prefix`); a cache without them (another library's) cannot be
  seeded: `prefill_needs` says so and the caller falls back to the method's own full prefill.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from omnikv.hf import attention
from omnikv.hf.compat import cache_kwargs
from omnikv.errors import InputError
from omnikv.methods import Method, get_method

DEFAULT_TAIL = 64  # tokens each method prefills itself (>= every observation window we ship)


def _seedable(cache: Any) -> bool:
    """Whether `cache` can take a prefix prefilled elsewhere (it says what it needs for that)."""
    return callable(getattr(cache, "seed_prefix", None)) and callable(getattr(cache, "fork_needs", None))


def prefill_needs(method: Method, model: torch.nn.Module) -> tuple[int, bool] | None:
    """(tail tokens the method must prefill itself, whether it needs the prefix's queries), or
    None when its cache cannot be forked from a shared prefill. The method's cache answers
    (`fork_needs`: observation windows at the prompt's end; layers that score with every prompt
    query)."""
    cache = method.make_cache(model)
    if not _seedable(cache):
        return None
    return cache.fork_needs()


class _RecordingCache:
    """The shared prefill's cache: full attention over preallocated dense layers (transformers'
    window cache for sliding layers), recording every layer's new keys/values and, optionally,
    the queries of full-attention layers. Built lazily to import the managed cache only here."""

    @staticmethod
    def build(model: torch.nn.Module, record_queries: bool):
        from omnikv.methods.full import PreallocatedCache
        from omnikv.hf.layers import DenseLayer

        class RecordingCache(PreallocatedCache):
            method_name = "shared_prefill"

            def __init__(self) -> None:
                super().__init__(model)
                self.kv: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.layers]
                self.queries: dict[int, list[torch.Tensor]] = {}
                self.modules: dict[int, tuple[torch.nn.Module, dict[str, Any]]] = {}

            def update(self, key_states, value_states, layer_idx, *args, **kwargs):
                self.kv[layer_idx].append((key_states, value_states))
                return super().update(key_states, value_states, layer_idx, *args, **kwargs)

            def attend(self, layer_idx, module, query, key, value, attention_mask, **kwargs):
                if record_queries and isinstance(self.layers[layer_idx], DenseLayer):
                    self.queries.setdefault(layer_idx, []).append(query)
                    self.modules[layer_idx] = (module, {k: v for k, v in kwargs.items() if k == "scaling"})
                return super().attend(layer_idx, module, query, key, value, attention_mask, **kwargs)

        return RecordingCache()


@dataclass
class SharedPrefill:
    """A prompt's prefix, prefilled once with full attention.

    `kv[i]` = (keys, values) of layer i for the prefix, (1, Hk, split, D) each; `queries[i]`
    (1, Hq, split, D) for full-attention layers when recorded; `tail` = ids[split:], which each
    forked method feeds through its own cache."""

    model: torch.nn.Module
    ids: list[int]
    split: int
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    queries: dict[int, tuple[torch.nn.Module, torch.Tensor, dict[str, Any]]] | None
    seconds: float
    forks: int = field(default=0)

    @property
    def tail(self) -> list[int]:
        return self.ids[self.split :]

    @property
    def nbytes(self) -> int:
        """Bytes of the recorded keys, values and queries."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this prefill holds (keys, values, recorded queries)."""
        return [t for kv in self.kv for t in kv] + [q for _, q, _ in (self.queries or {}).values()]

    @classmethod
    @torch.inference_mode()
    def run(
        cls,
        model: torch.nn.Module,
        ids: Sequence[int] | torch.Tensor,
        *,
        tail: int = DEFAULT_TAIL,
        record_queries: bool = False,
        prefill_chunk_size: int | None = None,
        start: "SharedPrefill | None" = None,
        reuse: int = 0,
        on_chunk: Callable[[], None] | None = None,
        keep_on: torch.device | str | None = None,
    ) -> "SharedPrefill":
        """Prefill ids[:-tail] once (at least one token stays in the tail: its logits start decoding).
        `ids`: token ids, or a tensor of one sequence ([T] or [1, T], as a tokenizer returns them).

        start, reuse: take the first `reuse` tokens' keys, values (and queries) from `start`, a
            shared prefill whose ids begin with the same `reuse` tokens, and run only the rest
            through the model (prefix reuse across requests, omnikv.decoding.prefix_cache). The
            result owns its tensors: `start` is read, never written.
        on_chunk: called before each prefill chunk; an exception it raises aborts the prefill.
        keep_on: where the recorded tensors are kept (e.g. "cpu": host memory); default the model's
            device. `cache_for` moves them to the model's device as it seeds a method's cache.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() == 2 and ids.shape[0] != 1:
                raise InputError(f"a shared prefill runs one sequence; got a batch of {ids.shape[0]}")
            ids = ids.reshape(-1).tolist()
        ids = [int(t) for t in ids]
        if len(ids) < 2:
            raise InputError("a shared prefill needs a prompt of at least 2 tokens; use generate() for shorter ones")
        if tail < 1:
            raise InputError(f"tail must be >= 1 (the last prompt token starts decoding); got {tail}")
        split = max(1, len(ids) - tail)
        device = next(model.parameters()).device
        cache = _RecordingCache.build(model, record_queries)
        t0 = time.perf_counter()
        done = 0
        if start is not None:
            done = min(reuse, split)
            _seed(cache, start, ids, done, record_queries)
        chunk = prefill_chunk_size or split
        for s in range(done, split, chunk):
            if on_chunk is not None:
                on_chunk()
            x = torch.tensor([ids[s : min(split, s + chunk)]], dtype=torch.long, device=device)
            model(input_ids=x, use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
        seconds = time.perf_counter() - t0
        # torch.cat copies: the new prefill shares no storage with `start`.
        keep = torch.device(keep_on) if keep_on is not None else device
        kv = [(torch.cat([k for k, _ in parts], dim=-2).to(keep), torch.cat([v for _, v in parts], dim=-2).to(keep))
              for parts in cache.kv]
        queries = None
        if record_queries:
            queries = {i: (cache.modules[i][0], torch.cat(q, dim=2).to(keep), cache.modules[i][1])
                       for i, q in cache.queries.items()}
        return cls(model=model, ids=ids, split=split, kv=kv, queries=queries, seconds=seconds)

    @torch.inference_mode()
    def cache_for(self, method: Method | str) -> Any:
        """`method`'s own cache holding the prefix ids[:split], as its own prefill of those tokens
        would have left it. InputError when the method cannot be forked (see `prefill_needs`)."""
        method = get_method(method)
        cache = method.make_cache(self.model)
        if not _seedable(cache):
            raise InputError(f"{method.name}'s cache ({type(cache).__name__}) cannot be forked from a shared "
                             "prefill; run it with its own prefill (generate())")
        # The recorded tensors may live on the host (a prefix store): each layer's move to the model's
        # device happens as it is seeded, so at most one layer's copy is in flight.
        device = next(self.model.parameters()).device
        kv = ((k.to(device), v.to(device)) for k, v in self.kv)
        queries = None if self.queries is None else {
            i: (module, query.to(device), kwargs) for i, (module, query, kwargs) in self.queries.items()}
        cache.seed_prefix(kv, queries)
        self.forks += 1
        return cache

    def session(self, tokenizer: Any, method: Method | str, *, prefill_chunk_size: int | None = None):
        """A `Session` of `method` whose cache holds the prefix and whose pending tokens are the
        tail: its `generate` / `feed` finish the method's own prefill, then decode."""
        from omnikv.decoding.generation import Session

        method = get_method(method)
        return Session(self.model, tokenizer, method, prefill_chunk_size=prefill_chunk_size,
                       cache=self.cache_for(method), history=self.ids[: self.split], pending=self.tail)


def _seed(cache: Any, start: SharedPrefill, ids: list[int], reuse: int, record_queries: bool) -> None:
    """Put `start`'s first `reuse` tokens into the recording `cache`, as its own prefill of them would."""
    if not 0 < reuse <= start.split or start.ids[:reuse] != ids[:reuse]:
        raise InputError(f"cannot reuse {reuse} tokens of a shared prefill of {start.split} tokens that "
                         "does not begin with them")
    if record_queries and start.queries is None:
        raise InputError("the reused prefill has no recorded queries; run it with record_queries=True")
    device = next(start.model.parameters()).device
    for i, (k, v) in enumerate(start.kv):
        cache.update(k[:, :, :reuse].to(device), v[:, :, :reuse].to(device), i)
        attention.take(i)  # no attention call follows this update: clear the hand-off slot
    for i, (module, query, kwargs) in (start.queries or {}).items():
        if record_queries:
            cache.queries[i] = [query[:, :, :reuse].to(device)]
            cache.modules[i] = (module, kwargs)


def plan_shared_prefill(methods: Iterable[Method], model: torch.nn.Module) -> tuple[int, bool, set[str]]:
    """(tail, record_queries, names of methods that cannot share) for a set of methods."""
    tail, queries, alone = DEFAULT_TAIL, False, set()
    for m in methods:
        need = prefill_needs(m, model)
        if need is None:
            alone.add(m.name)
            continue
        tail, queries = max(tail, need[0]), queries or need[1]
    return tail, queries, alone
