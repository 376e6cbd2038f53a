"""The managed cache: transformers' `Cache` over layers that store their KV *and* decide how
attention runs (omnikv/hf/layers.py). Every method of this package builds one (full_prealloc, the
baselines, OmniKV); the static-shape decode step (omnikv/hf/static.py) is driven through it.

Also the model checks every method shares: `check_supported`, `model_fingerprint`, `layer_devices`
(`text_config`, re-exported here, lives in omnikv/hf/compat.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch

from omnikv.errors import ConfigError, InputError, UnsupportedModelError
from omnikv.hf import attention
from omnikv.hf.attention import use_omnikv_attention
from omnikv.hf.buffers import KVBuffer
from omnikv.hf.compat import Cache, CacheLayerMixin, layer_types, mask_query_length, text_config, text_shape, update_positions
from omnikv.hf.meter import DeviceMeter
from omnikv.hf.static import StaticState


class ManagedCache(Cache):
    """Container of managed layers; hands each attention call to its layer."""

    method_name = "managed"
    simulates_accelerator = False  # a simulated transfer: behave as on a GPU (no host reads per step)

    def __init__(self, model: torch.nn.Module, layers: list[CacheLayerMixin], static: bool = False,
                 meter: DeviceMeter | None = None) -> None:
        super().__init__(layers=layers)
        # Every device KV buffer is counted here, live and at its peak (omnikv/hf/meter.py).
        self.meter = meter or DeviceMeter()
        for layer in layers:
            if hasattr(layer, "use_meter"):
                layer.use_meter(self.meter)
        self.model_fingerprint = model_fingerprint(model)
        # The continuity check of a forward whose positions `update` did not get: (seen, q) until
        # layer 0's attention call checks them; and why the cache refuses all further input, if
        # an input that failed that check was already written.
        self._unchecked: tuple[int, int] | None = None
        self._broken: str | None = None
        self._kv_heads = text_shape(model).kv_heads
        use_omnikv_attention(model)
        # Static-shape decode steps (omnikv/hf/static.py): None = the default, growing slices.
        self.static: StaticState | None = StaticState(layers, model.config.model_type) if static else None

    # transformers calls this once per layer per forward, right before attention.
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx == 0:
            self._forward_start(key_states, update_positions(args, kwargs))
        return self._update_layer(key_states, value_states, layer_idx, *args, **kwargs)

    def _update_layer(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx >= len(self.layers):
            raise UnsupportedModelError(
                f"this cache has {len(self.layers)} layers but layer {layer_idx} asked for one: it "
                f"was built for another model ({self.model_fingerprint}); build one per model"
            )
        attention.put(self, layer_idx)
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def _forward_start(self, key_states: torch.Tensor, pos: torch.Tensor | None) -> None:
        """Layer 0 of every forward; `pos` (B, q) the positions it writes, None if not known."""
        if self.static is not None:
            self.static.forward_start(key_states.shape[-2], self.layers[0].get_seq_length)
        if self.static is None or not self.static.active:
            self._check_forward(key_states, pos)

    # -- static-shape decode: the run is `StaticState`'s (omnikv/hf/static.py) -----------------
    def prepare_static_step(self) -> bool:
        """Advance every layer by the coming single-token forward and put its position in
        `static.pos`; called outside compiled code. Returns False when that forward is not a
        static decode step (nothing cached yet: it is a prompt)."""
        if self.static is None:
            raise ConfigError("prepare_static_step needs a cache built with static=True")
        return self.static.prepare(self.layers, self.layers[0].get_seq_length(), self._on_static_step)

    def _on_static_step(self) -> None:
        """A static step is prepared, before the layers advance: a subclass's own bookkeeping."""

    def _static_step_coming(self) -> bool:
        return self.static is not None and self.static.step_coming()

    @property
    def is_compileable(self) -> bool:
        # transformers skips building the decode mask for non-compileable caches (sdpa's
        # is_causal); a static step needs it over the whole capacity.
        return self._static_step_coming()

    def get_mask_sizes(self, query_length: int | torch.Tensor, layer_idx: int = 0) -> tuple[int, int]:
        if mask_query_length(query_length) == 1 and self._static_step_coming():
            return self.static.capacity, 0
        return super().get_mask_sizes(query_length, layer_idx)

    def get_query_offset(self, layer_idx: int = 0):
        if self._static_step_coming():
            return self.static.pos  # a device tensor: the mask does not depend on a Python int
        return super().get_query_offset(layer_idx)

    def _check_forward(self, key_states: torch.Tensor, pos: torch.Tensor | None) -> None:
        """Once per forward (layer 0): refuse another model's KV, and input that does not continue
        the cached sequence (e.g. `model.generate` called twice with the same prompt on one cache),
        which would otherwise silently decode garbage. key_states (B, Hk, q, D)."""
        if key_states.shape[1] != self._kv_heads:
            raise UnsupportedModelError(
                f"this cache was built for {self.model_fingerprint} but gets KV with "
                f"{key_states.shape[1]} heads: a cache serves the model it was built for; build one per model"
            )
        if self._broken:
            raise InputError(self._broken)
        q, seen = key_states.shape[-2], self.layers[0].get_seq_length()
        if pos is None:
            # Releases before 5.24 pass no positions to `update`; the attention call gets them
            # (`position_ids`), after layer 0 has written: the check happens there (`attend`).
            self._unchecked = (seen, q)
            return
        self._check_positions(pos, seen, q, written=False)

    def _check_positions(self, pos: Any, seen: int, q: int, written: bool) -> None:
        """Refuse input whose positions `pos` (B, q) do not continue the `seen` cached tokens.
        `written`: layer 0 has already taken it, so the cache is left unusable, and says so."""
        # Decode steps on an accelerator skip the check: reading the positions would sync every step.
        on_accelerator = pos.device.type != "cpu" if isinstance(pos, torch.Tensor) else False
        on_accelerator = on_accelerator or self.simulates_accelerator
        if not isinstance(pos, torch.Tensor) or pos.dim() != 2 or pos.shape[-1] != q or (q == 1 and on_accelerator):
            return
        last = int(pos[:, -1].max())  # the unpadded row of a left-padded batch
        if last != seen + q - 1:
            message = (
                f"this cache already holds {seen} tokens but the new input continues at position "
                f"{last - q + 1}: a cache continues one sequence. Pass the whole sequence so far "
                f"(the previous output plus new tokens) to continue it, or build a new cache for a new prompt"
            )
            if written:
                self._broken = message + " (this cache took part of that input before the check: build a new one)"
            raise InputError(message)

    def attend(self, layer_idx: int, module, query, key, value, attention_mask, **kwargs):
        if layer_idx == 0 and self._unchecked is not None:
            (seen, q), self._unchecked = self._unchecked, None
            self._check_positions(kwargs.get("position_ids"), seen, q, written=True)
        return self.layers[layer_idx].attend(module, query, key, value, attention_mask, **kwargs)

    # -- forks of a shared prefill (omnikv/decoding/fork.py) ---------------------------------
    def fork_needs(self) -> tuple[int, bool]:
        """(prompt tokens this cache must prefill itself, whether it needs the prefix's queries)
        to equal its own prefill when seeded with a prefix prefilled elsewhere."""
        tail = max([1] + [getattr(layer, "prefill_window", lambda: 0)() for layer in self.layers])
        return tail, any(getattr(layer, "needs_prefix_queries", False) for layer in self.layers)

    def seed_prefix(self, kv: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    queries: dict[int, tuple[torch.nn.Module, torch.Tensor, dict[str, Any]]] | None) -> None:
        """Hold a prefix prefilled elsewhere, as this cache's own prefill of it would have left it:
        kv[i] = layer i's (B, Hk, n, D) keys and values; queries[i] = (module, (B, Hq, n, D)
        queries, attention kwargs) for the layers that score the prompt with every prompt query."""
        for i, (k, v) in enumerate(kv):
            self.update(k, v, i)
            attention.take(i)  # no attention call follows this update: clear the hand-off slot
        for i, layer in enumerate(self.layers):
            if not getattr(layer, "needs_prefix_queries", False):
                continue
            if queries is None or i not in queries:
                raise InputError(f"{self.method_name} scores the prompt with every prompt query; run the shared "
                                 "prefill with record_queries=True")
            module, query, kwargs = queries[i]
            layer.observe_prefill(module, query, None, **kwargs)

    # -- accounting ------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        device = sum(layer.device_bytes() for layer in self.layers)
        host = sum(layer.host_bytes() for layer in self.layers)
        return {
            "method": self.method_name,
            "seq_length": self.get_seq_length(),
            "device_kv_bytes": int(device),
            "device_kv_allocated_bytes": int(sum(layer.allocated_device_bytes() for layer in self.layers)),
            # the highest device KV + working buffers since the cache was built (omnikv/hf/meter.py)
            "device_kv_peak_bytes": int(self.meter.peak),
            "host_kv_bytes": int(host),
            "h2d_bytes_per_step": int(self.h2d_bytes_last_step()),
            "attended_tokens_per_layer": [int(getattr(l, "last_attended", 0)) for l in self.layers],
        }

    def h2d_bytes_last_step(self) -> int:
        return 0

    def reserve(self, extra_tokens: int, decode_tokens: int | None = None) -> None:
        """Hint: about `extra_tokens` more tokens will come, `decode_tokens` of them one at a time
        (sizes the buffers once instead of growing them)."""
        total = self.get_seq_length() + extra_tokens
        for layer in self.layers:
            buf = getattr(layer, "buffer", None)
            if isinstance(buf, KVBuffer):
                buf.target = max(buf.target, total)
        if self.static is not None:
            self.static.reserve(total)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise UnsupportedModelError(
            "beam search / num_return_sequences > 1 is not supported with this cache; "
            "use greedy or sampling with one sequence per prompt"
        )

    def reorder_cache(self, beam_idx) -> None:
        self.batch_repeat_interleave(0)


def model_fingerprint(model: torch.nn.Module) -> str:
    shape = text_shape(model)
    return f"{text_config(model).model_type}/{shape.layers}L/{shape.kv_heads}kv/{shape.head_dim}d"


# Model types the managed caches are tested on (tiny random checkpoints of each family in tests/,
# plus the embedded SmolLM2 (llama) and Gemma 3).
TESTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")

SUPPORTED_MODELS = (
    "decoder-only causal LMs in the Llama style: rotary positions, grouped-query heads declared by "
    "num_key_value_heads, full or sliding-window attention layers, attention through transformers' "
    f"attention interface (tested: {', '.join(TESTED_MODEL_TYPES)})"
)
_untested_warned: set[str] = set()


def check_supported(model: torch.nn.Module, method: str) -> list[str]:
    """Layer types of `model` (a model or its config), or one clear UnsupportedModelError saying
    what is supported and why, before anything else touches the model.

    The managed caches (OmniKV and every baseline but `full` / `full_offload`) replace each
    attention layer's KV cache and attention function, and size their buffers from the config's
    KV heads and head size; they are written for Llama-style decoders. A model type outside
    TESTED_MODEL_TYPES that has that structure runs, with one warning."""
    config = getattr(model, "config", model)
    cfg = text_config(config)
    kind = getattr(cfg, "model_type", None) or type(cfg).__name__

    def refuse(why: str) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"{method} does not support {kind} models: {why}. It supports {SUPPORTED_MODELS}, because its "
            "caches replace each attention layer's KV cache and attention function and size them from "
            "those fields. Use --method full (transformers' own cache) for this model")

    if getattr(config, "is_encoder_decoder", False):
        raise refuse("it is an encoder-decoder model")
    missing = [f for f in ("num_key_value_heads", "rope_parameters") if getattr(cfg, f, None) is None]
    if missing:
        raise refuse(f"its config has no {' and no '.join(missing)} (no grouped-query KV heads / rotary "
                     "positions to build the cache for)")
    if isinstance(model, torch.nn.Module) and not getattr(model, "_supports_attention_backend", False):
        raise refuse("its attention does not call transformers' attention interface")
    types = layer_types(config)
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise refuse(f"it has layer types {unknown} (linear/chunked attention or KV sharing)")
    if getattr(cfg, "kv_sharing_modes", None):
        raise refuse("it shares KV between layers")
    if kind not in TESTED_MODEL_TYPES and kind not in _untested_warned:
        _untested_warned.add(kind)
        warnings.warn(f"{method} has not been tested on {kind} models (tested: {', '.join(TESTED_MODEL_TYPES)}); "
                      "it has the supported structure, so it runs: compare with --method full before trusting it",
                      stacklevel=2)
    return types


def layer_devices(model: torch.nn.Module, num_layers: int) -> list[torch.device]:
    """The device of each decoder layer's attention (they differ under an accelerate device_map)."""
    fallback = next(model.parameters()).device
    found: list[torch.device | None] = [None] * num_layers
    for module in model.modules():
        i = getattr(module, "layer_idx", None)
        if isinstance(i, int) and 0 <= i < num_layers and found[i] is None:
            p = next(module.parameters(), None)
            if p is not None and p.device.type != "meta":
                found[i] = p.device
    return [d or fallback for d in found]
