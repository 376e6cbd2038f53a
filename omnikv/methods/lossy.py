"""Shared machinery of the lossy baselines (StreamingLLM, H2O, SnapKV).

A `LossyLayer` keeps a *subset* of its rows on the device and forgets the rest for good. Rows live
in a `KeptStore`: keys/values (B, Hk, cap, D) plus `pos` (B, G, cap), the logical position of each
slot (G = 1 when every KV head keeps the same rows, G = Hk when each KV head keeps its own).
Attention does not depend on the order of KV rows, so evicting a row only frees its slot; the next
token is written there (no shifting), and the causal/padding mask is gathered at `pos`.

Queries and keys are post-RoPE and rows keep their original positions: nothing is re-rotated
after an eviction (as in H2O and SnapKV; StreamingLLM's paper re-assigns positions inside the cache,
which post-RoPE caches cannot do - documented in docs/methods.md).

Phases, per layer:
* a multi-token forward (prefill, a prefill chunk, a new chat turn): the new rows join the kept
  ones and attention runs over all of them. Nothing is evicted inside a prefill, so a chunked
  prefill equals an unchunked one;
* the first decode step after it: the method's `compact` picks the rows to keep and the store is
  rebuilt at that size (the prefill-sized tensors are released: device memory really shrinks);
* every decode step: the new token takes the slot freed by the last eviction (or is appended);
  after attention the method's `after_decode` may evict (StreamingLLM and H2O keep a fixed size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from omnikv.algorithm.selection import gather_rows
from omnikv.budget import Budget
from omnikv.errors import ConfigError
from omnikv.hf.buffers import grown_capacity, kv_bytes
from omnikv.hf.cache import ManagedCache, check_supported
from omnikv.hf.compat import sdpa_attention_forward, text_config
from omnikv.hf.layers import ManagedLayer, make_sliding_layer
from omnikv.methods.base import DEFAULT_BUDGET, Method
from omnikv.methods.memory import GiB, KVContext, KVPlan
from omnikv.methods.rows import subset_mask

HEADROOM = 64  # spare rows after a compaction or growth (decode appends; buffers.grown_capacity)


class KeptStore:
    """The rows one layer keeps. keys/values: (B, Hk, cap, D); pos: (B, G, cap) int64."""

    def __init__(self, per_head: bool) -> None:
        self.per_head = per_head
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None
        self.n = 0  # slots in use (including a freed one)
        self.free: torch.Tensor | None = None  # (B, G) slot freed by the last eviction

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    @property
    def live(self) -> int:
        """Rows really kept (a freed slot does not count)."""
        return self.n - (1 if self.free is not None else 0)

    def _groups(self, key: torch.Tensor) -> int:
        return key.shape[1] if self.per_head else 1

    def _alloc(self, cap: int, like: torch.Tensor) -> None:
        b, h, _, d = like.shape
        keys, values = like.new_empty((b, h, cap, d)), like.new_empty((b, h, cap, d))
        pos = torch.zeros((b, self._groups(like), cap), dtype=torch.long, device=like.device)
        if self.keys is not None and self.n:
            keys[:, :, : self.n].copy_(self.keys[:, :, : self.n])
            values[:, :, : self.n].copy_(self.values[:, :, : self.n])
            pos[..., : self.n].copy_(self.pos[..., : self.n])
        self.keys, self.values, self.pos = keys, values, pos

    def append(self, key: torch.Tensor, value: torch.Tensor, start: int) -> None:
        """Append (B, Hk, q, D) rows at logical positions start..start+q-1."""
        q = key.shape[-2]
        if self.keys is not None and (key.shape[0] != self.keys.shape[0] or key.shape[1] != self.keys.shape[1]):
            raise ConfigError(
                f"KV of shape {tuple(key.shape)} does not fit a cache holding {tuple(self.keys.shape)}: "
                "a cache serves one model and one batch; build a new one"
            )
        if self.keys is None or self.n + q > self.capacity:
            self._alloc(grown_capacity(self.n + q, self.capacity, HEADROOM), key)
        self.keys[:, :, self.n : self.n + q].copy_(key)
        self.values[:, :, self.n : self.n + q].copy_(value)
        self.pos[..., self.n : self.n + q] = torch.arange(start, start + q, device=key.device)
        self.n += q

    def put(self, key: torch.Tensor, value: torch.Tensor, position: int) -> None:
        """Store one token (B, Hk, 1, D): in the freed slot if there is one, else appended."""
        if self.free is None:
            self.append(key, value, position)
            return
        b, h, _, d = key.shape
        slot = self.free  # (B, G)
        idx = slot.view(b, -1, 1, 1).expand(b, h, 1, d)
        self.keys[:, :, : self.n].scatter_(2, idx, key)
        self.values[:, :, : self.n].scatter_(2, idx, value)
        self.pos[..., : self.n].scatter_(2, slot.unsqueeze(-1), position)
        self.free = None

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """keys, values (B, Hk, n, D) and pos (B, G, n) of the slots in use."""
        return self.keys[:, :, : self.n], self.values[:, :, : self.n], self.pos[..., : self.n]

    def live_slots(self) -> torch.Tensor:
        """(B, G, live) slot indices of the kept rows (without the freed slot)."""
        b, g = self.pos.shape[:2]
        slots = torch.arange(self.n, device=self.pos.device).expand(b, g, self.n)
        if self.free is None:
            return slots
        keep = slots != self.free.unsqueeze(-1)
        return slots[keep].view(b, g, self.n - 1)

    def live_positions(self) -> torch.Tensor:
        """(B, G, live) logical positions of the kept rows, sorted ascending per group."""
        pos = self.pos[..., : self.n].gather(-1, self.live_slots())
        return pos.sort(dim=-1).values

    def rebuild(self, slots: torch.Tensor, headroom: int = HEADROOM) -> None:
        """Keep only `slots` (B, G, k): fresh tensors of k + headroom rows (the old ones are freed).

        G of `slots` may be Hk even if the store had G = 1 (the store becomes per-head).
        """
        k_all, v_all, pos = self.view()
        keys, values = gather_rows(k_all, slots), gather_rows(v_all, slots)
        g = slots.shape[1]
        pos = pos.expand(pos.shape[0], g, pos.shape[-1]) if pos.shape[1] != g else pos
        pos = pos.gather(-1, slots)
        k = slots.shape[-1]
        self.keys, self.values, self.pos, self.n, self.free = None, None, None, 0, None
        b, h, _, d = keys.shape
        self.keys, self.values = keys.new_empty((b, h, k + headroom, d)), values.new_empty((b, h, k + headroom, d))
        self.pos = torch.zeros((b, g, k + headroom), dtype=torch.long, device=keys.device)
        self.keys[:, :, :k].copy_(keys)
        self.values[:, :, :k].copy_(values)
        self.pos[..., :k].copy_(pos)
        self.n = k

    def used_bytes(self) -> int:
        return 0 if self.keys is None else kv_bytes(self.keys, self.live)

    def allocated_bytes(self) -> int:
        """Keys, values and the slots' positions, at capacity."""
        return 0 if self.keys is None else kv_bytes(self.keys) + self.pos.numel() * self.pos.element_size()


class LossyLayer(ManagedLayer):
    """A full-attention layer that keeps `budget` rows; subclasses say which."""

    per_head = False  # one kept set per KV head (True) or per sequence (False)

    def __init__(self, budget: Budget) -> None:
        """budget: the method's checked budget (`Method.budget_rule`)."""
        super().__init__()
        self.budget = budget
        self.store = KeptStore(self.per_head)
        self.prompt_len = 0  # tokens seen before the current decode run
        self.kept_budget = 0  # resolved budget of the current decode run
        self.decoding = False
        self.compact_due = False
        self.evicted = 0  # rows dropped so far (for stats and tests)

    # -- transformers' interface ------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        start = self.seq_length
        self.seq_length += q
        if q > 1 or start == 0:
            self.decoding = False
            if self.store.free is not None:  # close the freed slot before appending after it
                self.rebuild(self.store.live_slots())
            self.store.append(key_states, value_states, start)
            self.prompt_len = self.seq_length
            self.compact_due = True
        else:
            self.decoding = True
            self.store.put(key_states, value_states, start)
        keys, values, _ = self.store.view()
        return keys, values

    def kv_view(self):
        return None if self.store.keys is None else self.store.view()[:2]

    def attend(self, module, query, key, value, attention_mask, **kwargs):
        if not self.decoding:
            q = query.shape[2]
            self.observe_prefill(module, query, attention_mask, **kwargs)
            keys, values, pos = self.store.view()
            if self.store.n != self.seq_length:  # earlier turns were compacted: a subset of rows
                attention_mask = subset_mask(attention_mask, pos, self.seq_length - q, q, query.shape[1])
            self.last_attended = keys.shape[-2]
            return sdpa_attention_forward(module, query, keys, values, attention_mask, **kwargs)
        # The new token's mask row covers every position: (B, N), False = padding. (No `.all()`
        # shortcut: it would synchronise the device at every layer of every step.)
        valid = None if attention_mask is None else attention_mask[:, 0, -1, :]
        if self.compact_due:
            self.compact_due = False
            self.kept_budget = self.budget.tokens(self.prompt_len, clip=False)
            before = self.store.live - 1  # rows before the new token
            self.compact(valid, module, **kwargs)
            self.evicted += before - (self.store.live - 1)
        keys, values, pos = self.store.view()
        positions = None if attention_mask is None else pos
        out = ManagedLayer.attend(self, module, query, keys, values, attention_mask, positions=positions, **kwargs)
        self.after_decode(module, query, valid, **kwargs)
        return out

    # -- policy hooks -----------------------------------------------------------------------
    def observe_prefill(self, module, query: torch.Tensor, attention_mask, **kwargs) -> None:
        """Called with each multi-token forward's queries (B, Hq, q, D) before its attention."""

    def compact(self, valid: torch.Tensor | None, module, **kwargs) -> None:
        """First decode step after a prompt: shrink the store. The new token is its last slot."""

    def after_decode(self, module, query: torch.Tensor, valid: torch.Tensor | None, **kwargs) -> None:
        """After a decode step's attention (evict here)."""

    def rebuild(self, slots: torch.Tensor) -> None:
        """Keep only the rows in `slots` (B, G, k); per-slot state of subclasses follows."""
        self.on_rebuild(slots)
        self.store.rebuild(slots)

    def on_rebuild(self, slots: torch.Tensor) -> None:
        """Subclasses holding per-slot state (H2O's scores) gather it with `slots` here."""

    def keep_with_new_token(self, chosen: torch.Tensor) -> None:
        """Rebuild the store as `chosen` (B, G, k) prompt slots + the new token (last slot)."""
        b, g, _ = chosen.shape
        new = torch.full((b, g, 1), self.store.n - 1, dtype=torch.long, device=chosen.device)
        self.rebuild(torch.cat([chosen, new], dim=-1))

    # -- accounting -------------------------------------------------------------------------
    def device_bytes(self) -> int:
        return self.store.used_bytes()

    def allocated_device_bytes(self) -> int:
        return self.store.allocated_bytes()

    def kept_positions(self) -> torch.Tensor | None:
        """(B, G, kept) logical positions this layer keeps (sorted), or None before any token."""
        return None if self.store.keys is None else self.store.live_positions()


@dataclass(eq=False)
class LossyMethod(Method):
    """A method that keeps `budget` rows per full-attention layer and forgets the rest."""

    lossy = True
    default_budget = DEFAULT_BUDGET

    def kept_tokens(self, ctx: KVContext) -> int:
        """Rows a budgeted layer keeps after the first decode step (StreamingLLM and H2O keep
        `budget` rows of prompt and generated tokens)."""
        return min(self.budget_rule.tokens(ctx.context, clip=False), ctx.context)

    def kv_plan(self, ctx: KVContext) -> KVPlan:
        # Prefill is full attention and these caches evict at the first decode step, so the peak
        # is the whole prompt's KV; afterwards each layer keeps its budget.
        kept = self.kept_tokens(ctx)
        steady = ctx.row_bytes * sum(min(r, kept) for r in ctx.full_rows)
        note = f"lossy: peak = the whole prompt until the first decode step, then {steady / GiB:.3f} GiB"
        return KVPlan(ctx.full_kv_bytes, 0, [note], offload=False)


class LossyCache(ManagedCache):
    """Cache of a lossy method: `layer_factory()` for full-attention layers, stock sliding layers."""

    def __init__(
        self,
        model: torch.nn.Module,
        method_name: str,
        layer_factory: Callable[[], LossyLayer],
        budget: int | float,
    ) -> None:
        types = check_supported(model, method_name)
        cfg = text_config(model)
        layers = [make_sliding_layer(cfg) if t == "sliding_attention" else layer_factory() for t in types]
        self.method_name = method_name
        self.budget = budget
        super().__init__(model, layers)

    def lossy_layers(self) -> list[LossyLayer]:
        return [layer for layer in self.layers if isinstance(layer, LossyLayer)]

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        lossy = self.lossy_layers()
        s["prompt_tokens"] = max((l.prompt_len for l in lossy), default=0)
        s["budget"] = self.budget
        s["budget_tokens"] = max((l.kept_budget for l in lossy), default=0)
        s["kept_rows_per_layer"] = [kept_rows(l) for l in self.layers]
        s["evicted_rows_per_layer"] = [int(getattr(l, "evicted", 0)) for l in self.layers]
        return s


def kept_rows(layer) -> int:
    """KV rows a layer holds on the device (per sequence and KV head)."""
    if isinstance(layer, LossyLayer):
        return int(layer.store.live)
    keys = getattr(layer, "keys", None)
    return 0 if keys is None else int(keys.shape[-2])
