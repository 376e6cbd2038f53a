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

from omnikv.algorithm.layers import FilterLayer, SharedState, SparseLayer
from omnikv.algorithm.roles import LayerPlan, Role, plan_layers
from omnikv.config import QUERY_SELECTORS, OmniKVConfig
from omnikv.errors import ConfigError
from omnikv.hf.cache import ManagedCache, check_supported, layer_devices
from omnikv.hf.compat import is_cuda, text_config, update_positions
from omnikv.hf.layers import DenseLayer, make_sliding_layer
from omnikv.offload.gathers import STATIC_NEEDS_DEVICE_GATHER
from omnikv.offload.segment import Segment
from omnikv.offload.transfer import Transfer, make_transfer, settle


class OmniKVCache(ManagedCache):
    """Drop-in `transformers.Cache` for OmniKV decoding.

    Example:
        cache = OmniKVCache(model, OmniKVConfig(filter_layers=(2, 8, 18), budget=0.067))
        out = model.generate(input_ids, cache=cache, max_new_tokens=64)
    """

    method_name = "omnikv"

    def __init__(
        self,
        model: torch.nn.Module,
        config: OmniKVConfig | None = None,
        *,
        telemetry: bool = False,
        transfer: str | Transfer | None = None,
        static: bool = False,
        **overrides: Any,
    ) -> None:
        """Args:
            static: static-shape decode steps (omnikv/hf/static.py), for torch.compile / CUDA graphs:
                needs `reserve` before the prompt, selector last/softmax_last, refresh_every=1,
                no telemetry, no sliding-window layers.
            transfer: how the Context Bank moves rows: "auto" (CUDA streams when offloading on a
                GPU, else inline), "simulated" (the offload path on a CPU under CUDA's ordering
                rules, see omnikv/offload/transfer.py), "inline", "cuda", or a `Transfer` instance.
                "simulated" turns offload on.
        """
        types = check_supported(model, "omnikv")
        if config is None:
            from omnikv.algorithm.presets import preset_for_model

            config = preset_for_model(model)
        if overrides:
            config = config.replace(**overrides)
        device = next(model.parameters()).device
        auto_offload = config.offload if config.offload is not None else is_cuda(device)
        self.transfer = make_transfer(transfer, auto_offload, device)
        if self.transfer.kind == "simulated" and config.offload is False:
            raise ConfigError("transfer='simulated' simulates the offload path; drop offload=False")
        offload = auto_offload or self.transfer.kind == "simulated"
        self.config = config
        self.offload = offload
        self.simulates_accelerator = self.transfer.kind == "simulated"
        self.plan: LayerPlan = plan_layers(config, types)
        self.state = SharedState(config)
        self.state.telemetry = [] if telemetry else None
        layers = self._build_layers(model, layer_devices(model, len(types)))
        if static:
            _check_static(config, telemetry, self.transfer, model)
        super().__init__(model, layers, static=static, meter=self.transfer.meter)
        self._first_full = self.plan.layers_with(Role.DENSE) + self.plan.layers_with(Role.FILTER)
        self._first_full = min(self._first_full) if self._first_full else None
        self._step_mark = self.transfer.counters.snapshot()
        self._step_figures = {"host_syncs": 0, "h2d_bytes": 0, "d2h_bytes": 0}
        self._prefill_mark = self._step_mark
        self._prefill_figures = dict(self._step_figures)
        self._in_prompt = False

    def _build_layers(self, model: torch.nn.Module, devices: list[torch.device]) -> list:
        """One layer per role of `self.plan`; the segments of each filter layer, one per device
        its sparse layers live on (one without a device_map): `segment_groups` (filter layer ->
        its segments), `segments` names the first of each, `all_segments()` lists every one."""
        config = self.config
        self.segment_groups: dict[int, list[Segment]] = {}
        sparse_segment: dict[int, Segment] = {}
        for f in self.plan.layers_with(Role.FILTER):
            groups: dict[torch.device, list[int]] = {}
            for layer in self.plan.segment(f):  # a segment spanning devices splits, one per device
                groups.setdefault(devices[layer], []).append(layer)
            segs = [Segment(f, layers, self.offload, config.partial_reload, self.transfer) for layers in groups.values()]
            self.segment_groups[f] = segs or [Segment(f, [], self.offload, config.partial_reload, self.transfer)]
            for seg in segs:
                for layer in seg.layers:
                    sparse_segment[layer] = seg
        layers = []
        for i, role in enumerate(self.plan.roles):
            if role is Role.SLIDING:
                layers.append(make_sliding_layer(text_config(model)))
            elif role is Role.FILTER:
                layers.append(FilterLayer(self.state, self.segment_groups[i]))
            elif role is Role.SPARSE:
                layers.append(SparseLayer(i, self.state, sparse_segment[i]))
            else:
                layers.append(DenseLayer())
        return layers

    def _on_static_step(self) -> None:
        self._begin_forward(1)  # phase bookkeeping and transfer figures, as an eager step

    @property
    def segments(self) -> dict[int, Segment]:
        return {f: segs[0] for f, segs in self.segment_groups.items()}

    def all_segments(self) -> list[Segment]:
        return [seg for segs in self.segment_groups.values() for seg in segs]

    def reserve(self, extra_tokens: int, decode_tokens: int | None = None) -> None:
        super().reserve(extra_tokens, decode_tokens)
        total = self.get_seq_length() + extra_tokens
        for seg in self.all_segments():
            seg.reserve(total, extra_tokens if decode_tokens is None else decode_tokens)

    # Bookkeeping of prompt / decode phases happens at the first full-attention layer, the first
    # place that sees both the new tokens and the mask of this forward.
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx == 0:
            self._forward_start(key_states, update_positions(args, kwargs))  # first: a static step advances the counters
        if layer_idx == self._first_full and (self.static is None or not self.static.active):
            self._begin_forward(key_states.shape[-2])
        return self._update_layer(key_states, value_states, layer_idx, *args, **kwargs)

    def _begin_forward(self, q: int) -> None:
        st = self.state
        seen = self.layers[self._first_full].get_seq_length()
        counters = self.transfer.counters
        if q > 1 or seen == 0:
            if not self._in_prompt:  # a new prompt (or turn) starts: count its transfers
                self._prefill_mark = counters.snapshot()
                self._in_prompt = True
            else:
                self._prefill_figures = counters.since(self._prefill_mark)
            st.begin_prompt(seen + q)
            self._extending = True
            for seg in self.all_segments():
                seg.begin_prompt()
        else:
            if self._in_prompt:
                self._prefill_figures = counters.since(self._prefill_mark)
                self._in_prompt = False
            else:
                self._step_figures = counters.since(self._step_mark)
            self._step_mark = counters.snapshot()
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
        s["device_kv_bytes"] += int(sum(seg.device_bytes() for seg in self.all_segments()))
        s["device_kv_allocated_bytes"] += int(sum(seg.allocated_device_bytes() for seg in self.all_segments()))
        s["host_kv_bytes"] = int(sum(seg.host_bytes() for seg in self.all_segments()))
        figures = self.transfer_figures()
        s["host_syncs_per_step"] = figures["step"]["host_syncs"]
        s["h2d_bytes_per_step"] = figures["step"]["h2d_bytes"]
        s["d2h_bytes_per_step"] = figures["step"]["d2h_bytes"]
        s["h2d_bytes_prefill"] = figures["prefill"]["h2d_bytes"]
        s["d2h_bytes_prefill"] = figures["prefill"]["d2h_bytes"]
        s["pinned_host_bytes"] = self.transfer.counters.pinned_bytes
        s["transfer"] = f"{self.transfer.kind}/{self.transfer.gather}"
        segments = [seg for seg in self.all_segments() if seg.device is not None] or self.all_segments()
        s["reload"] = segments[0].reload_path() if segments else "off"
        s["prompt_tokens"] = self.state.prompt_len
        s["selected_tokens"] = self.state.k
        s["layer_roles"] = [r.value for r in self.plan.roles]
        s["offload"] = self.offload
        if self.state.telemetry is not None:
            s["telemetry"] = self.telemetry_summary()
        return s

    def telemetry_summary(self) -> dict[str, Any]:
        """Per sparse layer: mean share of its true attention mass on the attended set
        (`coverage`) and mean recall of its own top-k by the filter's selection (`recall`), as
        {"layers": {"<layer>": {"coverage", "recall", "steps"}}, "mean_coverage", "mean_recall"}
        (the means over all records; `omnikv.algorithm.telemetry.summarize_telemetry` does the counting)."""
        from omnikv.algorithm.telemetry import summarize_telemetry

        summary = summarize_telemetry(self.state.telemetry or [])
        layers = {
            str(row["layer"]): {"coverage": row["mean_coverage"], "recall": row["mean_recall"], "steps": row["steps"]}
            for row in summary["per_layer"]
        }
        return {"layers": layers, "mean_coverage": summary["mean_coverage"], "mean_recall": summary["mean_recall"]}

    def transfer_figures(self) -> dict[str, dict[str, int]]:
        """What the transfer interface counted: for the last complete decode step (`step`: from
        one decode step's start to the next's, so it includes the step's own loads) and for the
        last prompt forward(s) (`prefill`: every chunk of it). Keys host_syncs, h2d_bytes,
        d2h_bytes. The step in progress is counted up to now."""
        counters = self.transfer.counters
        step = self._step_figures
        if not self._in_prompt and self.state.decode_steps:
            step = counters.since(self._step_mark)
        prefill = counters.since(self._prefill_mark) if self._in_prompt else self._prefill_figures
        return {"step": settle(step), "prefill": settle(prefill)}

    def h2d_bytes_last_step(self) -> int:
        return self.transfer_figures()["step"]["h2d_bytes"]

    def selected_indices(self) -> dict[int, torch.Tensor]:
        """Current selection per filter layer: (B, G, k) positions, ascending."""
        return {
            f: seg.indices.sort(dim=-1).values for f, seg in self.segments.items() if seg.indices is not None
        }


def _check_static(config: OmniKVConfig, telemetry: bool, transfer: Transfer, model) -> None:
    """What a static-shape OmniKV step cannot do, as errors that say what to change."""
    if telemetry:
        raise ConfigError("telemetry reads values on the host every step; it cannot run with static=True / compile=True")
    if config.uses_query_window:
        raise ConfigError(
            f"static=True / compile=True selects from the decode query's logits; selector "
            f"{config.selector!r} keeps a growing query window. Use selector={' or '.join(QUERY_SELECTORS)}"
        )
    if config.refresh_every != 1:
        raise ConfigError("static=True / compile=True re-selects every step; set refresh_every=1")
    if getattr(text_config(model), "attn_logit_softcapping", None):
        raise ConfigError("static=True / compile=True does not support attention logit soft-capping models")
    if transfer.gather == "host_gather":
        raise ConfigError(STATIC_NEEDS_DEVICE_GATHER)
