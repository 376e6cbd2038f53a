"""Prefix reuse across requests: a byte-bounded, least-recently-used store of prompt prefixes.

Every method in this library prefills with full attention and decides nothing before its first
decode step (omnikv.decoding.fork), so the keys and values of a prompt's prefill are the same for
all of them. The store keeps them per request, as a `SharedPrefill` of the prompt (every prompt
token but the method's tail). A later request whose tokens begin like a stored prompt (the longest
common prefix with any entry, not only whole entries: two conversations about one document share
the document) runs only the rest of its prompt through the model, on top of those keys and values,
and its method's own cache is then built from them, as `SharedPrefill.session` does. So a reused
request is its method's own prefill run in chunks (reused prefix, new part, tail): the same
answer as without reuse, up to float rounding (tests/test_prefix_cache.py), for every method,
lossy ones included: a lossy method compresses its own copy when it starts decoding, never the
stored keys and values.

What is stored is the prompt's prefill, not the decoded answer: with a sparse method the answer's
keys and values come from sparse decoding steps and differ from what a prefill computes, so they
are not reused; a next turn reads the previous answer again as part of its prompt (a few hundred
tokens against a document of thousands).

Entries are kept in host memory and never change (forks copy, nothing writes into a stored tensor), so requests that share a
prefix cannot disturb each other. The store is not thread-safe: one worker uses it (the server's).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from omnikv.decoding.fork import SharedPrefill, prefill_needs
from omnikv.errors import ConfigError
from omnikv.methods import Method, get_method

MIN_TAIL = 2


@dataclass(frozen=True)
class PrefixCacheStats:
    """Counters since the store was made, and what it holds now."""

    hits: int  # requests that reused at least one stored token
    misses: int  # requests that looked and found nothing to reuse
    evictions: int  # entries dropped to stay within max_bytes
    cached_tokens: int  # prompt tokens reused, summed over requests
    entries: int
    bytes: int  # all entries, host + device
    host_bytes: int
    device_bytes: int
    max_bytes: int


@dataclass(eq=False)
class _Entry:
    key: int
    prefill: SharedPrefill
    tokens: torch.Tensor  # (split,) int64: the prompt tokens whose keys and values are held
    salt: str | None
    nbytes: int
    host_bytes: int


class PrefixCache:
    """Reuse the prefill of earlier prompts for later ones that begin the same way.

    >>> store = PrefixCache(model, "omnikv", max_bytes=2**30)      # doctest: +SKIP
    >>> session, reused = store.session(tokenizer, ids)              # doctest: +SKIP
    >>> session.generate(SamplingParams(max_new_tokens=32))          # doctest: +SKIP

    max_bytes bounds the keys and values held (queries too, for a method that needs them, H2O):
    adding an entry evicts the least recently used ones until it fits; an entry larger than the
    whole bound is not stored. 0 turns reuse off (`session` then makes a plain `Session`).
    Entries live in host memory (on a GPU, a reused prefix is copied back to the device: far less
    time than prefilling it, and the device memory stays the method's).
    salt: requests reuse only entries stored with the same salt (vLLM's `cache_salt`: users who
    must not learn each other's prompts through timing get different salts).
    """

    def __init__(self, model: torch.nn.Module, method: Method | str, max_bytes: int, *,
                 prefill_chunk_size: int | None = None) -> None:
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ConfigError(f"max_bytes must be an int >= 0; got {max_bytes!r}")
        self.model = model
        self.method = get_method(method)
        self.max_bytes = max_bytes
        self.prefill_chunk_size = prefill_chunk_size
        needs = prefill_needs(self.method, model)
        # A cache this library cannot seed (another library's) prefills on its own, never reused.
        self.supported = needs is not None
        tail, self.record_queries = needs if needs is not None else (1, False)
        # At least 2: a one-token forward after cached tokens is a decode step for the methods
        # (OmniKV selects, Quest and the lossy caches evict), so the tail must be a prefill.
        self.tail = max(tail, MIN_TAIL)
        self._entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()  # oldest first
        self._bytes_per_token: float | None = None  # learnt from the first entry
        self._counts: collections.Counter[str] = collections.Counter()
        self._next_key = 0
        # The worker changes the store; /metrics reads it from another thread: both under the lock.
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.supported and self.max_bytes > 0

    # -- looking up -------------------------------------------------------------------------------
    def match(self, ids: Sequence[int], salt: str | None = None) -> int:
        """How many leading tokens of `ids` a request would reuse now (0: none). Changes nothing."""
        entry, n = self._best(ids, salt)
        return n if entry is not None else 0

    def _best(self, ids: Sequence[int], salt: str | None) -> tuple[_Entry | None, int]:
        limit = len(ids) - self.tail  # the method prefills its tail itself (observation windows)
        if not self.enabled or limit < 1 or not self._entries:
            return None, 0
        query = torch.tensor(list(ids[:limit]), dtype=torch.long)
        best, best_n = None, 0
        for entry in self._entries.values():
            if entry.salt != salt:
                continue
            n = _common_prefix(entry.tokens, query)
            if n > best_n:
                best, best_n = entry, n
        return best, best_n

    # -- serving a request ------------------------------------------------------------------------
    def session(self, tokenizer: Any, ids: Sequence[int], *, salt: str | None = None,
                on_chunk: Callable[[], None] | None = None, max_new_tokens: int = 0) -> tuple[Any, int]:
        """(a `Session` of the method with `ids` fed up to its tail, reused tokens).

        The prompt's prefix comes from the longest stored match; the rest of it up to the tail is
        prefilled here (calling `on_chunk` before each chunk: an exception it raises aborts, and
        the store is left as it was), then stored for later requests. The session's pending
        tokens are the tail: its `feed` / `generate` finish the method's own prefill.
        max_new_tokens: what the request will generate, for the memory check made first."""
        from omnikv.decoding.generation import Session

        ids = [int(t) for t in ids]
        plain = Session(self.model, tokenizer, self.method, prefill_chunk_size=self.prefill_chunk_size)
        plain.append(ids)
        entry, reused = self._best(ids, salt)
        if not self.enabled or len(ids) - self.tail < 1 or (entry is None and not self._fits(len(ids) - self.tail)):
            return plain, 0
        plain.check_memory(max_new_tokens)  # a prompt that cannot fit is refused before any work
        prefill = SharedPrefill.run(
            self.model, ids, tail=self.tail, record_queries=self.record_queries,
            prefill_chunk_size=self.prefill_chunk_size, start=entry.prefill if entry else None,
            reuse=reused, on_chunk=on_chunk, keep_on="cpu")
        with self._lock:
            self._counts["hits" if reused else "misses"] += 1
            self._counts["cached_tokens"] += reused
        if entry is not None and entry.key in self._entries:
            self._entries.move_to_end(entry.key)
        # The new entry extends the one it reused whole: keeping both would hold that prefix twice.
        self._add(prefill, salt, replaces=entry if entry is not None and reused == entry.tokens.numel() else None)
        session = prefill.session(tokenizer, self.method, prefill_chunk_size=self.prefill_chunk_size)
        return session, reused

    # -- storing ----------------------------------------------------------------------------------
    def _fits(self, tokens: int) -> bool:
        """False when an entry of `tokens` tokens would exceed the whole bound (known after the
        first entry): such a prompt prefills the plain way, without the recording copy."""
        return self._bytes_per_token is None or tokens * self._bytes_per_token <= self.max_bytes

    def _add(self, prefill: SharedPrefill, salt: str | None, replaces: _Entry | None = None) -> None:
        nbytes = prefill.nbytes
        self._bytes_per_token = nbytes / max(prefill.split, 1)
        if nbytes > self.max_bytes:  # larger than the whole store: not kept, the store unchanged
            return
        host = sum(t.numel() * t.element_size() for t in prefill.tensors() if t.device.type == "cpu")
        tokens = torch.tensor(prefill.ids[: prefill.split], dtype=torch.long)
        with self._lock:
            if replaces is not None:
                self._entries.pop(replaces.key, None)
            while self._entries and self._held() + nbytes > self.max_bytes:
                self._entries.popitem(last=False)
                self._counts["evictions"] += 1
            self._entries[self._next_key] = _Entry(self._next_key, prefill, tokens, salt, nbytes, host)
            self._next_key += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    # -- reporting --------------------------------------------------------------------------------
    def _held(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._held()

    def stats(self) -> PrefixCacheStats:
        with self._lock:
            entries = list(self._entries.values())
            c = dict(self._counts)
        total = sum(e.nbytes for e in entries)
        host = sum(e.host_bytes for e in entries)
        return PrefixCacheStats(c.get("hits", 0), c.get("misses", 0), c.get("evictions", 0), c.get("cached_tokens", 0),
                                len(entries), total, host, total - host, self.max_bytes)

    def entries(self) -> list[tuple[list[int], int]]:
        """(stored tokens, bytes) per entry, least recently used first."""
        with self._lock:
            entries = list(self._entries.values())
        return [(e.tokens.tolist(), e.nbytes) for e in entries]


def default_max_bytes() -> int:
    """`omnikv serve`'s default bound: 1/8 of the machine's physical memory (1 GiB if unknown)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 8
    except (AttributeError, OSError, ValueError):  # not a POSIX system
        return 2**30


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the longest common prefix of two 1-D int tensors."""
    n = min(a.numel(), b.numel())
    if n == 0:
        return 0
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0]) if diff.numel() else n
