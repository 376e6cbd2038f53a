"""The OmniKV attention backend for vLLM's CPU platform (a subclass of vLLM's CPU_ATTN).

Per layer, with the library's roles (`omnikv.algorithm.roles.plan_layers`):

* dense (and sliding-window) layers: the stock kernel, unchanged;
* filter layers: the stock kernel for every row; then each decode row's prompt is scored with its
  query and whole blocks are selected (`omnikv_vllm.select`, the library's block rules with
  `selection_block` = the cache's block size), the same on every TP worker; the selection becomes a
  sparse block table + lengths (`omnikv_vllm.sparse_table`) and the stock kernel's metadata for them;
* sparse layers: prefill rows go through the stock kernel; decode rows go through the *same stock
  kernel* over the sparse block table: no gather, no attention in Python.

Token-granular selection (`OMNIKV_VLLM_CONFIG='{"selection_block": 1}'`) keeps the earlier path:
the library's `filter_scores` + `select_topk` over the gathered prompt keys, and SDPA over the
selected + generated rows gathered from the paged cache (`omnikv_vllm.paged`); it is slower.

vLLM calls attention layer by layer, eagerly (`enforce_eager`), so a filter layer's selection is
ready when the later layers of the same forward run; it lives on the step's metadata object, which
every layer of the step shares. Per-request prompt lengths come from `omnikv_vllm.tracker`.
"""

from __future__ import annotations


from dataclasses import dataclass, field

import sys

import torch
import torch.nn.functional as F

from omnikv.config import OmniKVConfig
from omnikv.algorithm.roles import LayerPlan, Role
from omnikv.algorithm.selection import filter_scores, select_topk
from omnikv_vllm import profile, settings
from omnikv_vllm.paged import TileLayout
from omnikv_vllm.profile import timed
from omnikv_vllm.select import pad_rows, reduce_across_workers, row_token_scores, select_row_blocks, tp_gather
from omnikv_vllm.sparse_table import sparse_block_table
from omnikv_vllm.tracker import PromptTracker
from vllm import _custom_ops as ops
from vllm import envs
from vllm.config import get_current_vllm_config
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)


_active = True  # see set_active


def set_active(on: bool) -> None:
    """Turn OmniKV's step state on or off for the steps built from now on, in this process.

    Off, every layer of every step runs vLLM's CPU_ATTN code unchanged (the metadata builder still
    tracks prompt lengths, so requests started while on decode correctly when on again). For the
    benchmark (bench_decode.py), which runs the engine in its own process to time stock attention
    and OmniKV side by side on one engine: the same weights, KV blocks and cached prompts."""
    global _active
    _active = on


@dataclass
class DecodeRow:
    """A batch row that decodes one token this step."""

    row: int  # index in the batch
    token: int  # index of its query token in the step's flattened tokens
    prompt_len: int  # P: positions [0, P) are the prompt
    seq_len: int  # s: positions [P, s) are generated (the last one is this step's token)
    block_row: torch.Tensor  # (max_blocks,) its block table row


@dataclass
class StepState:
    """What the layers of one forward share (hung on the step's metadata object)."""

    decode: list[DecodeRow]
    # Stock-kernel metadata and token indices of the other rows (None when every row decodes).
    rest: CPUAttentionMetadata | None
    rest_tokens: torch.Tensor | None
    tokens: torch.Tensor  # (R,) int64 the decode rows' query tokens, in row order
    block_table: torch.Tensor  # (R, NB) their block table rows
    seq_lens: torch.Tensor  # (R,) int32
    # token mode: filter layer -> row -> (G, k) selected prompt positions, ascending.
    selected: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)
    # block mode: filter layer -> the stock kernel's metadata of the decode rows' sparse tables.
    sparse: dict[int, CPUAttentionMetadata] = field(default_factory=dict)

    @property
    def contiguous(self) -> slice | None:
        """The decode rows' tokens as a slice when they are consecutive (views, no copies)."""
        first, n = int(self.tokens[0]), len(self.tokens)
        return slice(first, first + n) if int(self.tokens[-1]) == first + n - 1 else None


class _Model:
    """The run's OmniKV config and layer plan, built once per process from vLLM's model config."""

    _instance: _Model | None = None

    def __init__(self) -> None:
        vllm_config = get_current_vllm_config()
        hf_config = vllm_config.model_config.hf_config
        self.block_size: int = vllm_config.cache_config.block_size
        self.config: OmniKVConfig = settings.resolve_config(hf_config, block_size=self.block_size)
        self.plan: LayerPlan = settings.layer_plan(self.config, hf_config)
        # One line per process on stderr, where vLLM's own logs go: says the backend is on, and how.
        print(f"OmniKV vLLM backend: {self.config}; layers {self.plan.summary()}", file=sys.stderr, flush=True)

    @classmethod
    def get(cls) -> _Model:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance


class OmniKVMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.tracker = PromptTracker(self.block_size)
        self._warned_unknown = False

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> CPUAttentionMetadata:
        meta = super().build(common_prefix_len, common_attn_metadata, fast_build)
        meta.omnikv = self._step_state(common_prefix_len, common_attn_metadata)  # type: ignore[attr-defined]
        return meta

    def _step_state(self, common_prefix_len: int, cm: CommonAttentionMetadata) -> StepState | None:
        if self.is_cross_attention or self.is_encoder_only_attention or cm.causal is not True:
            return None
        num_reqs = cm.num_reqs
        qsl = cm.query_start_loc_cpu[: num_reqs + 1].tolist()
        query_lens = [qsl[i + 1] - qsl[i] for i in range(num_reqs)]
        seq_lens = cm.seq_lens[:num_reqs].cpu().tolist()
        prefilling = None if cm.is_prefilling is None else cm.is_prefilling[:num_reqs].cpu().tolist()
        block_table = cm.block_table_tensor[:num_reqs].cpu()
        rows = self.tracker.step(query_lens, seq_lens, prefilling, block_table.tolist())
        decode, rest = [], []
        for r, state in enumerate(rows):
            if state is None:
                continue
            if state.decode and state.prompt_len is not None:
                decode.append(DecodeRow(r, qsl[r], state.prompt_len, seq_lens[r], block_table[r]))
            else:
                if state.decode and not self._warned_unknown:
                    print("OmniKV vLLM backend: warning: a decode row of a request this process has not "
                          "seen runs dense attention", file=sys.stderr, flush=True)
                    self._warned_unknown = True
                rest.append(r)
        if not decode or not _active:
            return None  # every layer runs the stock kernel on this step
        rest_meta = rest_tokens = None
        if rest:
            rest_meta, rest_tokens = self._subset(common_prefix_len, cm, rest, qsl)
        tokens = torch.tensor([d.token for d in decode], dtype=torch.int64)
        rows = torch.tensor([d.row for d in decode], dtype=torch.int64)
        seq = torch.tensor([d.seq_len for d in decode], dtype=torch.int32)
        return StepState(decode, rest_meta, rest_tokens, tokens, block_table[rows], seq)

    def _subset(self, common_prefix_len, cm, rows: list[int], qsl: list[int]):
        """Stock metadata for a subset of the rows, with their tokens packed in row order."""
        idx = torch.tensor(rows, dtype=torch.int64)
        lens = torch.tensor([qsl[r + 1] - qsl[r] for r in rows], dtype=torch.int64)
        tokens = torch.cat([torch.arange(qsl[r], qsl[r + 1]) for r in rows])
        starts = torch.zeros(len(rows) + 1, dtype=cm.query_start_loc_cpu.dtype)
        starts[1:] = torch.cumsum(lens, 0)
        seq_lens = cm.seq_lens[idx]
        sub = cm.replace(
            query_start_loc=starts.to(cm.query_start_loc.device),
            query_start_loc_cpu=starts,
            seq_lens=seq_lens,
            num_reqs=len(rows),
            num_actual_tokens=int(starts[-1]),
            max_query_len=int(lens.max()),
            max_seq_len=int(seq_lens.max()),
            block_table_tensor=cm.block_table_tensor[idx],
            slot_mapping=cm.slot_mapping[tokens],
            is_prefilling=None if cm.is_prefilling is None else cm.is_prefilling[idx],
            positions=None if cm.positions is None else cm.positions[tokens],
            _num_computed_tokens_cache=None,
            _token_to_req_indices_cache=None,
        )
        return CPUAttentionMetadataBuilder.build(self, 0, sub), tokens


class OmniKVAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._layer_idx: int | None = None
        self._layout: TileLayout | None = None
        _Model.get()  # built here, while vLLM's current config is the model's (it is not during forward)
        if self.attn_type == AttentionType.DECODER and self.logits_soft_cap:
            raise NotImplementedError("the OmniKV vLLM backend does not support logit soft-capping yet")

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None) -> torch.Tensor:
        state: StepState | None = getattr(attn_metadata, "omnikv", None)
        if state is None or self.attn_type != AttentionType.DECODER:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        model = _Model.get()
        if self._layer_idx is None:
            self._layer_idx = extract_layer_index(layer.layer_name)
        i = self._layer_idx
        role = model.plan.roles[i]
        blocks = model.config.selection_block > 1
        if role is Role.FILTER:
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output)
            with timed("selection"):
                if blocks:
                    state.sparse[i] = self._select_blocks(model, query, kv_cache, state, layer)
                else:
                    state.selected[i] = {
                        d.row: self._select(model.config, query[d.token], kv_cache, d, layer) for d in state.decode}
            return output
        if role is not Role.SPARSE:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        if state.rest is not None:  # prefill rows (and unknown ones): the stock kernel
            tok = state.rest_tokens
            out = torch.empty_like(output[tok])
            super().forward(layer, query[tok], key[tok], value[tok], kv_cache, state.rest, out)
            output[tok] = out
        with timed("sparse attention", layer=i):
            if blocks:
                self._sparse_blocks(layer, query, key, value, kv_cache, state.sparse[model.plan.source_filter[i]],
                                    state, output)
            else:
                selected = state.selected[model.plan.source_filter[i]]
                for d in state.decode:
                    res = self._sparse(query[d.token], kv_cache, d, selected[d.row], layer)
                    output[d.token] = res.reshape(output[d.token].shape)
        return output

    # -- block mode: selection into a sparse block table, the stock kernel over it ----------------
    def _select_blocks(self, model: _Model, query, kv_cache, state: StepState, layer) -> CPUAttentionMetadata:
        """Each decode row's selected blocks (the same on every TP worker) -> the stock kernel's
        metadata of the rows' sparse block tables."""
        bs, layout = model.block_size, self.layout(kv_cache, layer)
        hk = self.num_kv_heads
        scores = []
        for d in state.decode:
            nb = -(-d.prompt_len // bs)
            q = query[d.token].view(hk, -1, self.head_size)  # (Hk, g, D)
            logits = layout.block_logits(kv_cache, d.block_row[:nb], q)  # (Hk, g, nb * bs)
            scores.append(row_token_scores(logits, self.scale, d.prompt_len, model.config))
        scores = reduce_across_workers(scores, model.config.head_reduce, tp_gather())
        if profile.on():  # NaN scores (a NaN query or keys): the selection ranks them last
            profile.count("rows with NaN scores", sum(int(bool(s.isnan().any())) for s in scores))
        selected = pad_rows([select_row_blocks(s, d.prompt_len, bs, model.config) for s, d in zip(scores, state.decode)])
        table, lens = sparse_block_table(state.block_table, selected, state.seq_lens, bs)
        return self._decode_metadata(table, lens, query.dtype, layer)

    def _decode_metadata(self, table: torch.Tensor, lens: torch.Tensor, dtype, layer) -> CPUAttentionMetadata:
        """The stock kernel's metadata for R one-token rows over `table` (R, m) and `lens` (R,)."""
        r = len(lens)
        starts = torch.arange(r + 1, dtype=torch.int32)
        scheduler = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=r, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_size,
            seq_lens=lens, dtype=dtype, query_start_loc=starts, causal=True, sliding_window_size=-1,
            isa=layer.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, kv_cache_dtype=self.kv_cache_dtype)
        return CPUAttentionMetadata(
            num_actual_tokens=r, max_query_len=1, query_start_loc=starts, max_seq_len=int(lens.max()),
            seq_lens=lens, block_table=table, slot_mapping=torch.empty(0, dtype=torch.int64),
            scheduler_metadata=scheduler, causal=True)

    def _sparse_blocks(self, layer, query, key, value, kv_cache, meta: CPUAttentionMetadata, state: StepState,
                       output) -> None:
        """The decode rows through the stock kernel over their sparse block tables (the cache
        already holds this step's keys: vLLM writes them before attention)."""
        rows = state.contiguous
        if rows is not None:  # the usual case: decode rows side by side, attended in place
            super().forward(layer, query[rows], key[rows], value[rows], kv_cache, meta, output[rows])
            return
        tok = state.tokens
        out = torch.empty_like(output[tok])
        super().forward(layer, query[tok], key[tok], value[tok], kv_cache, meta, out)
        output[tok] = out

    # -- token mode: the two OmniKV steps over gathered rows ----------------------------------------------------------------------
    def layout(self, kv_cache: torch.Tensor, layer) -> TileLayout:
        if self._layout is None:
            _, _, bs, two_d = kv_cache.shape
            self._layout = TileLayout.probe(bs, two_d // 2, kv_cache.dtype, layer.isa)
        return self._layout

    def _select(self, config: OmniKVConfig, q: torch.Tensor, kv_cache, d: DecodeRow, layer) -> torch.Tensor:
        """q (Hq, D) -> (G, k) prompt positions, ascending: the library's selector on this row."""
        keys, _ = self.layout(kv_cache, layer).gather(kv_cache, d.block_row, torch.arange(d.prompt_len))
        scores = filter_scores(q[None, :, None, :], keys[None], self.scale, config.selector, config.head_reduce)
        k = config.resolve_budget(d.prompt_len)
        return select_topk(scores, k, sink=config.sink_tokens, recent=config.recent_tokens)[0]

    def _sparse(self, q: torch.Tensor, kv_cache, d: DecodeRow, selected: torch.Tensor, layer) -> torch.Tensor:
        """Attention of q (Hq, D) over the selected prompt rows + generated rows -> (Hq, D)."""
        positions = torch.cat([selected[0], torch.arange(d.prompt_len, d.seq_len)])
        keys, values = self.layout(kv_cache, layer).gather(kv_cache, d.block_row, positions)
        out = F.scaled_dot_product_attention(
            q[None, :, None, :], keys[None], values[None], scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads)
        return out[0, :, 0, :]


class OmniKVCPUBackend(CPUAttentionBackend):
    """Registered in place of CPU_ATTN (the only backend the CPU platform honours)."""

    @staticmethod
    def get_impl_cls() -> type[OmniKVAttentionImpl]:
        return OmniKVAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[OmniKVMetadataBuilder]:
        return OmniKVMetadataBuilder
