"""OmniKVCache: dense / filter / sparse layers over a drop-free Context Bank.

Prefill (any forward with more than one new token, or the first one) is full attention at every
layer. At a decode step:

* dense and wait layers attend to everything, as usual;
* a filter layer attends to everything too, and from its current query scores the prompt tokens,
  picks the top-k (+ sink + recent), and asks its segment to load those rows of every sparse layer
  in one packed gather (on CUDA: an asynchronous host->device copy on a side stream);
* a sparse layer attends to exactly the loaded prompt rows plus every generated token.

Every token's KV is kept for every layer (sparse layers' in the bank), so a token skipped at one
step can be selected at the next. Prompt = every token seen before the current run of single-token
decode steps; a later multi-token forward (a new chat turn) extends the prompt.
"""

from __future__ import annotations

from typing import Any

import torch

from omnikv._compat import is_cuda
from omnikv.config import OmniKVConfig
from omnikv.errors import ConfigError
from omnikv.managed import DenseLayer, ManagedCache, ManagedLayer, check_supported, make_sliding_layer, text_config
from omnikv.roles import LayerPlan, Role, plan_layers
from omnikv.bank import Segment
from omnikv.selection import WINDOW_SELECTORS, filter_scores, scores_from_logits, select_topk, select_topk_rows


class SharedState:
    """What all layers of one cache agree on."""

    def __init__(self, config: OmniKVConfig) -> None:
        self.config = config
        self.prompt_len = 0  # tokens scored by the selector (everything before the decode run)
        self.valid: torch.Tensor | None = None  # (B, N) bool, False = padding; None = no padding
        self.decode_steps = 0  # steps since the last prompt extension
        self.telemetry: list[dict[str, float]] | None = None  # per (step, sparse layer) records


class FilterLayer(DenseLayer):
    """Full attention + the Context Selector for one segment."""

    def __init__(self, state: SharedState, segment: Segment, headroom: int = 256) -> None:
        super().__init__(headroom)
        self.state = state
        self.segment = segment
        self.query_window: torch.Tensor | None = None  # (B, Hq, <=W, D) newest last
        self.selected: torch.Tensor | None = None  # (B, G, k) last selection
        self._row_budget: tuple[torch.Tensor, torch.Tensor] | None = None  # (valid, (B,) k per row)

    def attend(self, module, query, key, value, attention_mask, **kwargs):
        cfg = self.state.config
        if cfg.selector in WINDOW_SELECTORS:
            window = query if self.query_window is None else torch.cat([self.query_window, query], dim=2)
            self.query_window = window[:, :, -cfg.window_size :].detach()
        decoding = query.shape[2] == 1 and self.state.prompt_len > 0 and self.seq_length > self.state.prompt_len
        if not (decoding and self.segment.layers and self._due()):
            return super().attend(module, query, key, value, attention_mask, **kwargs)
        scaling = kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)
        if cfg.selector in WINDOW_SELECTORS or getattr(module, "attn_logit_softcapping", None):
            self.select(self.query_window, scaling)
            return super().attend(module, query, key, value, attention_mask, **kwargs)
        return self._attend_and_select(query, key, value, attention_mask, scaling)

    def _attend_and_select(self, query, key, value, attention_mask, scaling):
        """One decode query: the attention logits are also the selector's scores, so compute
        them once. query (B, Hq, 1, D), key/value (B, Hk, N, D) -> (B, 1, Hq, D)."""
        b, hq, _, d = query.shape
        hk, n = key.shape[1], key.shape[2]
        g = hq // hk
        logits = torch.matmul(query.view(b, hk, g, d), key.transpose(-1, -2)) * scaling  # (B,Hk,g,N)
        self.select_from_logits(logits[..., : self.state.prompt_len])
        if attention_mask is not None:
            logits = logits.masked_fill(~attention_mask[:, :, 0, :].view(b, 1, 1, n), float("-inf"))
        probs = torch.softmax(logits.float(), dim=-1).to(value.dtype)
        out = torch.matmul(probs, value)  # (B, Hk, g, D)
        self.last_attended = n
        return out.view(b, hq, 1, d).transpose(1, 2), None

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
        if valid is not None and isinstance(cfg.budget, float):
            # A fraction of each row's own prompt, not of the padded width (see select_topk_rows);
            # computed once per prompt (reading the lengths syncs the device).
            if self._row_budget is None or self._row_budget[0] is not valid:
                ks = [cfg.resolve_budget(n) for n in valid.sum(dim=-1).tolist()]
                self._row_budget = (valid, torch.tensor(ks, device=scores.device))
            idx = select_topk_rows(scores, self._row_budget[1], valid, sink=cfg.sink_tokens, recent=cfg.recent_tokens)
        else:
            k = cfg.resolve_budget(st.prompt_len)
            idx = select_topk(scores, k, valid=valid, sink=cfg.sink_tokens, recent=cfg.recent_tokens)
        self.selected = idx
        self.segment.load(idx, st.decode_steps)
        return idx


class SparseLayer(ManagedLayer):
    """Attends to the selected prompt rows + every generated token (rows live in its segment)."""

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
        q = key_states.shape[-2]
        if not (q == 1 and seg.indices is not None and self.seq_length >= self.state.prompt_len > 0):
            # Prefill / prompt extension: full attention over everything seen so far.
            prefix = self.seq_length
            seg.bank.write(self.slot, key_states, value_states)
            self.seq_length += q
            if prefix == 0:
                return key_states, value_states
            k_all, v_all = seg.bank.read(self.slot, self.seq_length)
            return k_all.to(key_states.device), v_all.to(key_states.device)
        # Decode: the new token joins the generated rows (device) and the bank (drop-free).
        seg.bank.write(self.slot, key_states, value_states)
        self.seq_length += 1
        if self.slot == 0:
            seg._ensure_work(seg.k, seg.generated + 1)
            seg.generated += 1
        pos = seg.k + seg.generated - 1
        seg.work[self.slot, 0, :, :, pos : pos + 1].copy_(key_states)
        seg.work[self.slot, 1, :, :, pos : pos + 1].copy_(value_states)
        seg.wait_ready()
        n = seg.k + seg.generated
        k_rows, v_rows = seg.work[self.slot, 0, :, :, :n], seg.work[self.slot, 1, :, :, :n]
        if k_rows.device != key_states.device:
            return k_rows.to(key_states.device), v_rows.to(key_states.device)
        return k_rows, v_rows

    def positions(self) -> torch.Tensor:
        """(B, G, k + generated) logical positions of the rows `update` returned."""
        sel = self.segment.indices.to(self.device)
        gen = torch.arange(self.state.prompt_len, self.seq_length, device=self.device)
        b, g, _ = sel.shape
        return torch.cat([sel, gen.view(1, 1, -1).expand(b, g, -1)], dim=-1)

    def attend(self, module, query, key, value, attention_mask, **kwargs):
        seg = self.segment
        decoding = query.shape[2] == 1 and seg.generated > 0 and key.shape[-2] == seg.k + seg.generated
        if decoding and self.state.telemetry is not None:
            self._record_telemetry(query, attention_mask, kwargs.get("scaling") or module.scaling)
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
        if attention_mask is not None:
            logits = logits.masked_fill(~attention_mask[:, :, 0, :n].view(b, 1, 1, n), float("-inf"))
        probs = torch.softmax(logits, dim=-1)  # (B, Hk, g, N)
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
        return self.segment.bank.read(self.slot, self.seq_length)


class OmniKVCache(ManagedCache):
    """Drop-in `transformers.Cache` for OmniKV decoding.

    Example:
        cache = OmniKVCache(model, OmniKVConfig(filter_layers=(2, 8, 18), budget=0.067))
        out = model.generate(input_ids, cache=cache, max_new_tokens=64)
    """

    method_name = "omnikv"

    def __init__(
        self, model: torch.nn.Module, config: OmniKVConfig | None = None, *, telemetry: bool = False, **overrides: Any
    ) -> None:
        types = check_supported(model, "omnikv")
        if config is None:
            from omnikv.presets import preset_for_model

            config = preset_for_model(model)
        if overrides:
            config = config.replace(**overrides)
        device = next(model.parameters()).device
        offload = config.offload if config.offload is not None else is_cuda(device)
        self.config = config
        self.offload = offload
        self.plan: LayerPlan = plan_layers(config, types)
        self.state = SharedState(config)
        self.state.telemetry = [] if telemetry else None
        self.segments: dict[int, Segment] = {}
        for f in self.plan.layers_with(Role.FILTER):
            self.segments[f] = Segment(f, self.plan.segment(f), offload, config.partial_reload)
        layers = []
        for i, role in enumerate(self.plan.roles):
            if role is Role.SLIDING:
                layers.append(make_sliding_layer(text_config(model)))
            elif role is Role.FILTER:
                layers.append(FilterLayer(self.state, self.segments[i]))
            elif role is Role.SPARSE:
                layers.append(SparseLayer(i, self.state, self.segments[self.plan.source_filter[i]]))
            else:
                layers.append(DenseLayer())
        super().__init__(model, layers)
        self._first_full = self.plan.layers_with(Role.DENSE) + self.plan.layers_with(Role.FILTER)
        self._first_full = min(self._first_full) if self._first_full else None

    # Bookkeeping of prompt / decode phases happens at the first full-attention layer, the first
    # place that sees both the new tokens and the mask of this forward.
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx == self._first_full:
            self._begin_forward(key_states.shape[-2])
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _begin_forward(self, q: int) -> None:
        st = self.state
        seen = self.layers[self._first_full].get_seq_length()
        if q > 1 or seen == 0:
            st.prompt_len = seen + q
            st.decode_steps = 0
            self._extending = True
            for seg in self.segments.values():
                seg.reset_decode()
        else:
            st.decode_steps += 1
            self._extending = False

    def attend(self, layer_idx, module, query, key, value, attention_mask, **kwargs):
        if layer_idx == self._first_full and self._extending:
            self._record_padding(attention_mask, key.shape[-2])
        return super().attend(layer_idx, module, query, key, value, attention_mask, **kwargs)

    def _record_padding(self, attention_mask: torch.Tensor | None, kv_len: int) -> None:
        """Which prompt positions are padding: the last query row of the mask sees every real
        token (left padding), so its columns are the validity of the whole prompt."""
        if attention_mask is None:
            self.state.valid = None
            return
        if attention_mask.dtype != torch.bool:
            raise ConfigError("OmniKV needs boolean attention masks (sdpa-style)")
        valid = attention_mask[:, 0, -1, :kv_len]
        self.state.valid = None if bool(valid.all()) else valid.clone()

    # -- accounting -----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        s = super().stats()
        s["device_kv_bytes"] += int(sum(seg.device_bytes() for seg in self.segments.values()))
        s["host_kv_bytes"] = int(sum(seg.host_bytes() for seg in self.segments.values()))
        s["prompt_tokens"] = self.state.prompt_len
        s["selected_tokens"] = self.config.resolve_budget(self.state.prompt_len)
        s["layer_roles"] = [r.value for r in self.plan.roles]
        s["offload"] = self.offload
        if self.state.telemetry is not None:
            s["telemetry"] = self.telemetry_summary()
        return s

    def telemetry_summary(self) -> dict[str, Any]:
        """Per sparse layer: mean share of its true attention mass on the attended set
        (`coverage`) and mean recall of its own top-k by the filter's selection (`recall`), as
        {"layers": {"<layer>": {"coverage", "recall", "steps"}}, "mean_coverage", "mean_recall"}
        (the means over all records; `omnikv.analysis.summarize_telemetry` does the counting)."""
        from omnikv.analysis.telemetry import summarize_telemetry

        summary = summarize_telemetry(self.state.telemetry or [])
        layers = {
            str(row["layer"]): {"coverage": row["mean_coverage"], "recall": row["mean_recall"], "steps": row["steps"]}
            for row in summary["per_layer"]
        }
        return {"layers": layers, "mean_coverage": summary["mean_coverage"], "mean_recall": summary["mean_recall"]}

    def h2d_bytes_last_step(self) -> int:
        return sum(seg.h2d_bytes for seg in self.segments.values() if seg.loaded_step == self.state.decode_steps)

    def selected_indices(self) -> dict[int, torch.Tensor]:
        """Current selection per filter layer: (B, G, k) positions, ascending."""
        return {f: seg.indices.sort(dim=-1).values for f, seg in self.segments.items() if seg.indices is not None}
