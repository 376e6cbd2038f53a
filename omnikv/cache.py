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
from omnikv.selection import filter_scores, select_topk
from omnikv.storage import GROWTH, PackedBank


class SharedState:
    """What all layers of one cache agree on."""

    def __init__(self, config: OmniKVConfig) -> None:
        self.config = config
        self.prompt_len = 0  # tokens scored by the selector (everything before the decode run)
        self.valid: torch.Tensor | None = None  # (B, N) bool, False = padding; None = no padding
        self.decode_steps = 0  # steps since the last prompt extension
        self.timings: dict[str, float] | None = None  # filled when profiling is on


class FilterLayer(DenseLayer):
    """Full attention + the Context Selector for one segment."""

    def __init__(self, state: SharedState, segment: Segment, headroom: int = 256) -> None:
        super().__init__(headroom)
        self.state = state
        self.segment = segment
        self.query_window: torch.Tensor | None = None  # (B, Hq, <=W, D) newest last
        self.selected: torch.Tensor | None = None  # (B, G, k) last selection

    def attend(self, module, query, key, value, attention_mask, **kwargs):
        cfg = self.state.config
        if cfg.selector in ("uniform", "exp"):
            window = query if self.query_window is None else torch.cat([self.query_window, query], dim=2)
            self.query_window = window[:, :, -cfg.window_size :].detach()
        decoding = query.shape[2] == 1 and self.state.prompt_len > 0 and self.seq_length > self.state.prompt_len
        if decoding and self.segment.layers and self._due():
            queries = self.query_window if cfg.selector in ("uniform", "exp") else query
            scaling = kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)
            self.select(queries, scaling)
        return super().attend(module, query, key, value, attention_mask, **kwargs)

    def _due(self) -> bool:
        every = self.state.config.refresh_every
        return self.selected is None or self.segment.loaded_step is None or (
            self.state.decode_steps - self.segment.loaded_step >= every
        )

    def select(self, queries: torch.Tensor, scaling: float) -> torch.Tensor:
        """Score the prompt keys with `queries` (B, Hq, W, D), pick top-k, load the segment."""
        st, cfg = self.state, self.state.config
        n = st.prompt_len
        keys = self.buffer.keys[:, :, :n]
        valid = None if st.valid is None else st.valid[:, :n]
        scores = filter_scores(queries, keys, scaling, cfg.selector, cfg.head_reduce, valid)
        k = cfg.resolve_budget(n)
        idx = select_topk(scores, k, valid=valid, sink=cfg.sink_tokens, recent=cfg.recent_tokens)
        self.selected = idx
        self.segment.load(idx, st.decode_steps)
        return idx


class Segment:
    """The sparse layers that follow one filter layer, with their packed Context Bank."""

    def __init__(self, filter_layer: int, layers: list[int], offload: bool) -> None:
        self.filter_layer = filter_layer
        self.layers = layers
        self.slot = {layer: i for i, layer in enumerate(layers)}
        self.offload = offload
        self.bank: PackedBank | None = None
        self.indices: torch.Tensor | None = None  # (B, G, k) current selection
        self.loaded_step: int | None = None
        self.h2d_bytes = 0
        self.sparse: dict[int, SparseLayer] = {}
        self.copy_stream = None

    def make_bank(self, like: torch.Tensor) -> PackedBank:
        if self.bank is None:
            host = self.offload and is_cuda(like.device)
            device = torch.device("cpu") if self.offload else like.device
            self.bank = PackedBank(len(self.layers), device, pin=host)
        return self.bank

    def load(self, idx: torch.Tensor, step: int) -> None:
        """Gather rows `idx` (B, G, k) of every sparse layer of the segment, in one packed op,
        and place them in each layer's working buffer (asynchronously on CUDA)."""
        self.indices = idx
        self.loaded_step = step
        rows = self.bank.gather(idx)  # (L, 2, B, H, k, D) on the bank's device
        self.h2d_bytes = 0
        for layer_idx in self.layers:
            layer = self.sparse[layer_idx]
            src = rows[self.slot[layer_idx]]
            if src.device != layer.device:
                self.h2d_bytes += src.numel() * src.element_size()
            layer.place_selection(src, idx, self.copy_stream)

    def host_bytes(self) -> int:
        if self.bank is None or not self.offload:
            return 0
        return self.bank.used_bytes()

    def bank_device_bytes(self) -> int:
        if self.bank is None or self.offload:
            return 0
        return self.bank.used_bytes()


class SparseLayer(ManagedLayer):
    """Attends to the selected prompt rows + every generated token.

    Working buffer (2, B, H, k + capacity, D) on the compute device: the first k rows hold the
    current selection (overwritten by each load), the rest the generated tokens of this decode run.
    The bank keeps every row too, so nothing is ever dropped.
    """

    def __init__(self, layer_idx: int, state: SharedState, segment: Segment) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.state = state
        self.segment = segment
        self.work: torch.Tensor | None = None
        self.k = 0  # selected rows currently in `work`
        self.generated = 0  # generated rows in `work`
        self.ready: Any = None  # CUDA event of the pending copy
        self._positions: torch.Tensor | None = None

    # -- storage -------------------------------------------------------------------------------
    def _ensure_work(self, like: torch.Tensor, k: int, generated: int) -> None:
        b, h, _, d = like.shape[-4:]
        need = k + generated
        if self.work is not None and self.work.shape[-2] >= need and self.k == k:
            return
        cap = max(need + 64, int(need * GROWTH)) if self.work is not None else need + 64
        work = like.new_empty((2, b, h, cap, d), device=self.device)
        if self.work is not None and self.generated:
            work[..., k : k + self.generated, :].copy_(self.work[..., self.k : self.k + self.generated, :])
        self.work = work

    def place_selection(self, rows: torch.Tensor, idx: torch.Tensor, stream) -> None:
        """rows: (2, B, H, k, D) gathered from the bank; idx: (B, G, k) their positions."""
        k = rows.shape[-2]
        self._ensure_work(rows, k, self.generated)
        self.k = k
        dst = self.work[..., :k, :]
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                dst.copy_(rows, non_blocking=True)
                self.ready = torch.cuda.Event()
                self.ready.record(stream)
        else:
            dst.copy_(rows)
        self._positions = None
        self.selected = idx.to(self.device)

    # -- transformers' interface -------------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.segment.sparse[self.layer_idx] = self
        st = self.state
        q = key_states.shape[-2]
        bank = self.segment.make_bank(key_states)
        slot = self.segment.slot[self.layer_idx]
        decoding = q == 1 and st.prompt_len > 0 and self.seq_length >= st.prompt_len and self.segment.indices is not None
        if not decoding:
            # Prefill / prompt extension: full attention over everything seen so far.
            prefix = self.seq_length
            bank.write(slot, key_states, value_states)
            self.seq_length += q
            self.generated = 0
            if prefix == 0:
                return key_states, value_states
            k_all, v_all = bank.read(slot, self.seq_length)
            return k_all.to(key_states.device), v_all.to(key_states.device)
        # Decode: the new token joins the generated rows (device) and the bank (drop-free).
        bank.write(slot, key_states, value_states)
        self.seq_length += 1
        self._ensure_work(key_states, self.k, self.generated + 1)
        pos = self.k + self.generated
        self.work[0, :, :, pos : pos + 1].copy_(key_states)
        self.work[1, :, :, pos : pos + 1].copy_(value_states)
        self.generated += 1
        if self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)
            self.ready = None
        n = self.k + self.generated
        return self.work[0, :, :, :n], self.work[1, :, :, :n]

    def positions(self) -> torch.Tensor:
        """(B, G, k + generated) logical positions of the rows `update` returned."""
        gen = torch.arange(self.state.prompt_len, self.seq_length, device=self.selected.device)
        b, g, _ = self.selected.shape
        return torch.cat([self.selected, gen.view(1, 1, -1).expand(b, g, -1)], dim=-1)

    def attend(self, module, query, key, value, attention_mask, **kwargs):
        decoding = key.shape[-2] == self.k + self.generated and self.generated > 0 and query.shape[2] == 1
        if not decoding:
            return super().attend(module, query, key, value, attention_mask, **kwargs)
        if attention_mask is None:  # no padding: every returned row is attended
            return super().attend(module, query, key, value, None, **kwargs)
        return super().attend(module, query, key, value, attention_mask, positions=self.positions(), **kwargs)

    # -- accounting -----------------------------------------------------------------------------
    def device_bytes(self) -> int:
        if self.work is None:
            return 0
        row = self.work[0, :, :, :1].numel() * self.work.element_size()
        return 2 * row * (self.k + self.generated)

    def full_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row this layer holds, (B, H, seq_length, D): the drop-free view."""
        slot = self.segment.slot[self.layer_idx]
        return self.segment.bank.read(slot, self.seq_length)


class OmniKVCache(ManagedCache):
    """Drop-in `transformers.Cache` for OmniKV decoding.

    Example:
        cache = OmniKVCache(model, OmniKVConfig(filter_layers=(2, 8, 18), budget=0.067))
        out = model.generate(input_ids, cache=cache, max_new_tokens=64)
    """

    method_name = "omnikv"

    def __init__(self, model: torch.nn.Module, config: OmniKVConfig | None = None, **overrides: Any) -> None:
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
        self.segments: dict[int, Segment] = {}
        for f in self.plan.layers_with(Role.FILTER):
            self.segments[f] = Segment(f, self.plan.segment(f), offload)
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
        if offload and torch.cuda.is_available():
            for seg in self.segments.values():
                seg.copy_stream = torch.cuda.Stream()
        self._first_full = self.plan.layers_with(Role.DENSE) + self.plan.layers_with(Role.FILTER)
        self._first_full = min(self._first_full) if self._first_full else None
        self._last_layer = len(self.layers) - 1

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
                seg.indices = None
                seg.loaded_step = None
            for layer in self.layers:
                if isinstance(layer, SparseLayer):
                    layer.k, layer.generated, layer.work = 0, 0, None
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
        bank_dev = sum(seg.bank_device_bytes() for seg in self.segments.values())
        s["device_kv_bytes"] += int(bank_dev)
        s["host_kv_bytes"] = int(sum(seg.host_bytes() for seg in self.segments.values()))
        s["prompt_tokens"] = self.state.prompt_len
        s["selected_tokens"] = self.config.resolve_budget(self.state.prompt_len)
        s["layer_roles"] = [r.value for r in self.plan.roles]
        s["offload"] = self.offload
        return s

    def h2d_bytes_last_step(self) -> int:
        return sum(seg.h2d_bytes for seg in self.segments.values() if seg.loaded_step == self.state.decode_steps)

    def selected_indices(self) -> dict[int, torch.Tensor]:
        """Current selection per filter layer: (B, G, k) positions."""
        return {f: seg.indices for f, seg in self.segments.items() if seg.indices is not None}
