"""OmniKV's two layer roles over the managed layers of omnikv/hf/layers.py: `FilterLayer` (full
attention + the Context Selector of one segment) and `SparseLayer` (attends to the selected prompt
rows + every generated token, held by its segment, omnikv/offload/segment.py). `SharedState` is what
every layer of one OmniKV cache agrees on. omnikv/algorithm/cache.py puts them together.
"""

from __future__ import annotations

import torch

from omnikv.algorithm.selection import (
    filter_scores,
    scores_from_logits,
    select_topk,
    select_topk_blocks,
    select_topk_rows,
)
from omnikv.config import OmniKVConfig
from omnikv.errors import ConfigError
from omnikv.hf.attention import grouped_logits, masked_softmax, scaling_of
from omnikv.hf.layers import DenseLayer, ManagedLayer
from omnikv.offload.segment import Segment


class SharedState:
    """What all layers of one cache agree on."""

    def __init__(self, config: OmniKVConfig) -> None:
        self.config = config
        self.prompt_len = 0  # tokens scored by the selector (everything before the decode run)
        self.k = 0  # prompt rows a sparse layer attends for this prompt: config.resolve_budget(prompt_len)
        self.valid: torch.Tensor | None = None  # (B, N) bool, False = padding; None = no padding
        self.decode_steps = 0  # steps since the last prompt extension
        self.telemetry: list[dict[str, float]] | None = None  # per (step, sparse layer) records

    def begin_prompt(self, prompt_len: int) -> None:
        """A prompt forward makes the prompt `prompt_len` tokens long (a new one, or a new turn)."""
        self.prompt_len = prompt_len
        self.k = self.config.resolve_budget(prompt_len)
        self.decode_steps = 0


class FilterLayer(DenseLayer):
    """Full attention + the Context Selector for one segment."""

    def __init__(self, state: SharedState, segments: list[Segment], headroom: int = 256) -> None:
        super().__init__(headroom)
        self.state = state
        self.segments = segments  # one per device its sparse layers live on (accelerate device_map)
        self.segment = segments[0]
        self.query_window: torch.Tensor | None = None  # (B, Hq, <=W, D) newest last
        self.selected: torch.Tensor | None = None  # (B, G, k) last selection
        self.windowed = state.config.uses_query_window  # the selector keeps a window of queries
        self._row_budget: tuple[torch.Tensor, torch.Tensor] | None = None  # (valid, (B,) k per row)

    def update(self, key_states, value_states, *args, **kwargs):
        start, n = self.seq_length, key_states.shape[-2]
        if not self.static_step and start < self.state.prompt_len:
            # A prompt forward (the cache set prompt_len at its first full layer): with offload,
            # the segments start reading their first sparse layer's prefix back now, under this
            # layer's compute (omnikv/offload/stream.py).
            for seg in self.segments:
                seg.prefetch_prompt(start, n)
        return super().update(key_states, value_states, *args, **kwargs)

    def attend(self, module, query, key, value, attention_mask, **kwargs):
        cfg = self.state.config
        if self.windowed:
            window = query if self.query_window is None else torch.cat([self.query_window, query], dim=2)
            self.query_window = window[:, :, -cfg.window_size :].detach()
        if self.static_step:
            if not self.segment.layers:
                return super().attend(module, query, key, value, attention_mask, **kwargs)
            # Static step: select every step from the attention logits (selector `last` /
            # `softmax_last`; the cache refuses the others in static mode).
            return self._attend_and_select(query, key, value, attention_mask, scaling_of(module, query, kwargs))
        decoding = query.shape[2] == 1 and self.state.prompt_len > 0 and self.seq_length > self.state.prompt_len
        if not (decoding and self.segment.layers and self._due()):
            return super().attend(module, query, key, value, attention_mask, **kwargs)
        scaling = scaling_of(module, query, kwargs)
        if self.windowed or getattr(module, "attn_logit_softcapping", None):
            self.select(self.query_window, scaling)
            return super().attend(module, query, key, value, attention_mask, **kwargs)
        return self._attend_and_select(query, key, value, attention_mask, scaling)

    def _attend_and_select(self, query, key, value, attention_mask, scaling):
        """One decode query: the attention logits are also the selector's scores, so compute
        them once. query (B, Hq, 1, D), key/value (B, Hk, N, D) -> (B, 1, Hq, D)."""
        b, hq, _, d = query.shape
        hk, n = key.shape[1], key.shape[2]
        g = hq // hk
        logits = grouped_logits(query.view(b, hk, g, d), key) * scaling  # (B, Hk, g, N)
        self.select_from_logits(logits[..., : self.state.prompt_len])
        mask = None if attention_mask is None else attention_mask[:, :, 0, :].view(b, 1, 1, n)
        probs = masked_softmax(logits, mask).to(value.dtype)
        out = torch.matmul(probs, value)  # (B, Hk, g, D)
        self.last_attended = n
        return out.view(b, hq, 1, d).transpose(1, 2), None

    def prefill_window(self) -> int:
        return self.state.config.window_size if self.windowed else 0

    def _due(self) -> bool:
        every = self.state.config.refresh_every
        return self.selected is None or self.segment.loaded_step is None or (
            self.state.decode_steps - self.segment.loaded_step >= every
        )

    def select(self, queries: torch.Tensor, scaling: float) -> torch.Tensor:
        """Score the prompt keys with `queries` (B, Hq, W, D), pick top-k, load the segment."""
        st, cfg = self.state, self.state.config
        n = st.prompt_len
        valid = None if st.valid is None else st.valid[:, :n]
        scores = filter_scores(queries, self.buffer.keys[:, :, :n], scaling, cfg.selector, cfg.head_reduce, valid)
        return self._pick(scores, valid)

    def select_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Same as `select` for `last` / `softmax_last` from precomputed (B, Hk, g, T) logits."""
        st, cfg = self.state, self.state.config
        valid = None if st.valid is None else st.valid[:, : st.prompt_len]
        scores = scores_from_logits(logits.unsqueeze(3), cfg.selector, cfg.head_reduce, valid)
        return self._pick(scores, valid)

    def _pick(self, scores: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        st, cfg = self.state, self.state.config
        if cfg.selection_block > 1:
            if valid is not None:
                raise ConfigError(
                    f"selection_block={cfg.selection_block} does not support left-padded batches yet (block "
                    "boundaries would differ per row); run the prompts one at a time or use selection_block=1")
            idx = select_topk_blocks(scores, st.k, cfg.selection_block, sink=cfg.sink_tokens, recent=cfg.recent_tokens)
        elif valid is not None and isinstance(cfg.budget, float):
            # A fraction of each row's own prompt, not of the padded width (see select_topk_rows);
            # computed once per prompt (reading the lengths syncs the device).
            if self._row_budget is None or self._row_budget[0] is not st.valid:
                ks = [cfg.resolve_budget(n) for n in valid.sum(dim=-1).tolist()]
                self._row_budget = (st.valid, torch.tensor(ks, device=scores.device))
            idx = select_topk_rows(scores, self._row_budget[1], valid, sink=cfg.sink_tokens, recent=cfg.recent_tokens)
        else:
            idx = select_topk(scores, st.k, valid=valid, sink=cfg.sink_tokens, recent=cfg.recent_tokens)
        self.selected = idx
        for seg in self.segments:
            seg.load(idx, st.decode_steps)
        return idx

    # -- static-shape decode (omnikv/hf/static.py): the segments follow the filter layer ----------
    def begin_static(self, state) -> None:
        super().begin_static(state)
        for seg in self.segments:
            if seg.layers:
                groups = seg.bank.data.shape[4] if self.state.config.head_reduce == "per_kv_head" else 1
                seg.begin_static(self.state.k, state.capacity - self.state.prompt_len, groups)

    def advance_static(self) -> None:
        super().advance_static()
        for seg in self.segments:
            if seg.layers:
                seg.advance_static(self.state.decode_steps)


class SparseLayer(ManagedLayer):
    """Attends to the selected prompt rows + every generated token (rows live in its segment)."""

    supports_static = True

    def __init__(self, layer_idx: int, state: SharedState, segment: Segment) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.state = state
        self.segment = segment
        self.slot = segment.slot[layer_idx]

    def update(self, key_states, value_states, *args, **kwargs):
        seg = self.segment
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            seg.attach(key_states)
        if self.static_step:
            # Static step: the new row goes to slot k + (pos - prompt_len) of the working buffer;
            # all k + decode-capacity rows come back (the cache advanced `seq_length` already).
            return seg.append_static(self.slot, key_states, value_states, self.static.pos)
        q = key_states.shape[-2]
        start = self.seq_length
        self.seq_length += q
        if not (q == 1 and seg.indices is not None and start >= self.state.prompt_len > 0):
            # Prefill / prompt extension: full attention over everything seen so far.
            return seg.write_prompt(self.slot, key_states, value_states, start)
        # Decode: the new token joins the generated rows on the device (drop-free: they reach the
        # bank when a later prompt forward makes them part of the prompt).
        return seg.append_generated(self.slot, key_states, value_states)

    def positions(self) -> torch.Tensor:
        """(B, G, k + generated) logical positions of the rows `update` returned."""
        sel = self.segment.indices.to(self.device)
        gen = torch.arange(self.state.prompt_len, self.seq_length, device=self.device)
        b, g, _ = sel.shape
        return torch.cat([sel, gen.view(1, 1, -1).expand(b, g, -1)], dim=-1)

    def attend(self, module, query, key, value, attention_mask, **kwargs):
        seg = self.segment
        if self.static_step:
            # Rows not generated yet sit at positions >= the current one: the causal mask,
            # gathered at the rows' positions, hides them (and the padding of the selection).
            return super().attend(module, query, key, value, attention_mask, positions=seg.static_positions(), **kwargs)
        decoding = query.shape[2] == 1 and seg.generated > 0 and key.shape[-2] == seg.k + seg.generated
        if decoding and self.state.telemetry is not None:
            self._record_telemetry(query, attention_mask, scaling_of(module, query, kwargs))
        if not decoding or attention_mask is None:  # no padding: every returned row is attended
            return super().attend(module, query, key, value, attention_mask, **kwargs)
        return super().attend(module, query, key, value, attention_mask, positions=self.positions(), **kwargs)

    @torch.no_grad()
    def _record_telemetry(self, query, attention_mask, scaling: float) -> None:
        """Compute this layer's true attention over all its rows (costs full attention) and record
        the share of its mass on the attended set, and the recall of its own top-k."""
        k_all, _ = self.full_kv()
        k_all = k_all.to(query.device)
        b, hq, _, d = query.shape
        hk, n = k_all.shape[1], k_all.shape[2]
        g = hq // hk
        logits = torch.matmul(query.view(b, hk, g, d).float(), k_all.float().transpose(-1, -2)) * scaling
        mask = None if attention_mask is None else attention_mask[:, :, 0, :n].view(b, 1, 1, n)
        probs = masked_softmax(logits, mask)  # (B, Hk, g, N)
        attended = torch.zeros(b, hk, n, dtype=torch.bool, device=query.device)
        pos = self.positions().to(query.device).expand(b, hk, -1)
        attended.scatter_(-1, pos, True)
        coverage = (probs * attended[:, :, None, :]).sum(-1).mean().item()
        cfg, p = self.state.config, self.state.prompt_len
        sel = self.segment.indices.to(query.device)
        kk = sel.shape[-1]
        own_scores = scores_from_logits(logits[..., :p].unsqueeze(3), "last", cfg.head_reduce)
        own = torch.topk(own_scores, kk, dim=-1).indices  # (B, G, k)
        hit = torch.zeros(b, own.shape[1], p, dtype=torch.bool, device=query.device)
        hit.scatter_(-1, sel.expand(b, own.shape[1], kk), True)
        recall = hit.gather(-1, own).float().mean().item()
        self.state.telemetry.append(
            {"step": self.state.decode_steps, "layer": self.layer_idx, "coverage": coverage, "recall": recall}
        )

    def full_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row this layer holds, (B, H, seq_length, D): the drop-free view."""
        return self.segment.rows(self.slot, self.seq_length)
