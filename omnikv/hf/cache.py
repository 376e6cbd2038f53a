"""The managed cache: transformers' `Cache` over layers that store their KV *and* decide how
attention runs (omnikv/hf/layers.py). Every method of this package builds one (full_prealloc, the
baselines, OmniKV); the static-shape decode step (omnikv/hf/static.py) is driven through it.

Also the model checks every method shares: `check_supported`, `text_config`, `model_fingerprint`,
`layer_devices`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from omnikv.errors import ConfigError, InputError, UnsupportedModelError
from omnikv.hf import context
from omnikv.hf.attention import use_omnikv_attention
from omnikv.hf.buffers import KVBuffer
from omnikv.hf.compat import Cache, CacheLayerMixin, layer_types
from omnikv.hf.layers import DenseLayer
from omnikv.hf.static import StaticState, mark_static, zero_tail


class ManagedCache(Cache):
    """Container of managed layers; hands each attention call to its layer."""

    method_name = "managed"
    simulates_accelerator = False  # a simulated transfer: behave as on a GPU (no host reads per step)

    def __init__(self, model: torch.nn.Module, layers: list[CacheLayerMixin], static: bool = False) -> None:
        super().__init__(layers=layers)
        self.model_fingerprint = model_fingerprint(model)
        cfg = text_config(model)
        self._kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        use_omnikv_attention(model)
        # Static-shape decode steps (omnikv/hf/static.py): None = the default, growing slices.
        self.static: StaticState | None = None
        self.step_prepared = False  # a driver ran `prepare_static_step` for the coming forward
        if static:
            if any(not isinstance(layer, DenseLayer) and not hasattr(layer, "segment") for layer in layers):
                raise ConfigError(
                    f"static=True / compile=True supports models whose layers all use full attention; "
                    f"{model.config.model_type} has sliding-window layers (their window cache changes "
                    f"shape); drop static/compile for this model"
                )
            self.static = StaticState()
            for layer in layers:
                layer.static = self.static

    # transformers calls this once per layer per forward, right before attention.
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx == 0:
            self._forward_start(key_states, kwargs)
        return self._update_layer(key_states, value_states, layer_idx, *args, **kwargs)

    def _update_layer(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx >= len(self.layers):
            raise UnsupportedModelError(
                f"this cache has {len(self.layers)} layers but layer {layer_idx} asked for one: it "
                f"was built for another model ({self.model_fingerprint}); build one per model"
            )
        context.put(self, layer_idx)
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def _forward_start(self, key_states: torch.Tensor, kwargs: dict[str, Any]) -> None:
        """Layer 0 of every forward."""
        if self.static is not None:
            self._static_forward_start(key_states.shape[-2])
        if self.static is None or not self.static.active:
            self._check_forward(key_states, kwargs)

    # -- static-shape decode (omnikv/hf/static.py) --------------------------------------------
    def _static_forward_start(self, q: int) -> None:
        """Layer 0 of a forward on a static cache. Under torch.compile the driver has already
        prepared the step (`step_prepared` is True), so nothing here reads per-step state."""
        if q != 1:
            self.static.active = False  # a prompt forward: the eager, growing path
        elif self.step_prepared:
            self.step_prepared = False
        elif self.layers[0].get_seq_length() > 0:
            # The step must be prepared before the forward: the model builds its mask (from
            # `get_query_offset`) and positions before the first layer's update.
            raise ConfigError(
                "a static cache's decode steps are driven by omnikv.static.StaticDecoder (or "
                "Session / generate with the method's static/compile option); model.generate and "
                "plain forwards cannot drive it: build the cache without static=True for those"
            )

    def prepare_static_step(self) -> bool:
        """Advance every Python-side counter by the coming single-token forward and put its
        position in `static.pos`; called outside compiled code. Returns False when that forward
        is not a static decode step (nothing cached yet: it is a prompt)."""
        st = self.static
        if st is None:
            raise ConfigError("prepare_static_step needs a cache built with static=True")
        seen = self.layers[0].get_seq_length()
        if seen == 0:
            st.active = False
            return False
        if seen + 1 > st.capacity:
            raise InputError(
                f"static decoding: this step writes position {seen} but the cache reserved "
                f"{st.capacity} positions; call cache.reserve(extra_tokens, decode_tokens=...) with "
                "the prompt and every token to generate before the prompt forward"
            )
        if not st.active:
            self._begin_static_run()
        self._advance_static()
        st.pos.fill_(seen)
        return True

    def _begin_static_run(self) -> None:
        """The first static step after a prompt: buffers at full capacity, unwritten rows zeroed."""
        st = self.static
        for layer in self.layers:
            buf = getattr(layer, "buffer", None)
            if isinstance(buf, KVBuffer) and buf.keys is not None:
                buf.reserve(st.capacity, buf.keys)
                zero_tail(buf.keys, buf.length)
                zero_tail(buf.values, buf.length)
                mark_static(buf.keys.device, buf.keys, buf.values)
                if st.pos is None:
                    st.pos = torch.zeros((), dtype=torch.long, device=buf.keys.device)
                    mark_static(st.pos.device, st.pos)
        if st.pos is None:
            raise ConfigError("static decoding needs at least one dense or filter layer")
        st.active = True

    def _advance_static(self) -> None:
        for layer in self.layers:
            layer.seq_length += 1
            buf = getattr(layer, "buffer", None)
            if isinstance(buf, KVBuffer):
                buf.length += 1

    def _static_step_coming(self) -> bool:
        """The model is about to run a prepared static step (the mask is built before layer 0;
        a prompt forward after a static run must get the ordinary mask)."""
        return self.static is not None and self.static.active and self.step_prepared

    @property
    def is_compileable(self) -> bool:
        # transformers skips building the decode mask for non-compileable caches (sdpa's
        # is_causal); a static step needs it over the whole capacity.
        return self._static_step_coming()

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        if query_length == 1 and self._static_step_coming():
            return self.static.capacity, 0
        return super().get_mask_sizes(query_length, layer_idx)

    def get_query_offset(self, layer_idx: int = 0):
        if self._static_step_coming():
            return self.static.pos  # a device tensor: the mask does not depend on a Python int
        return super().get_query_offset(layer_idx)

    def _check_forward(self, key_states: torch.Tensor, kwargs: dict[str, Any]) -> None:
        """Once per forward (layer 0): refuse another model's KV, and input that does not continue
        the cached sequence (e.g. `model.generate` called twice with the same prompt on one cache),
        which would otherwise silently decode garbage. key_states (B, Hk, q, D)."""
        if key_states.shape[1] != self._kv_heads:
            raise UnsupportedModelError(
                f"this cache was built for {self.model_fingerprint} but gets KV with "
                f"{key_states.shape[1]} heads: a cache serves the model it was built for; build one per model"
            )
        inner = kwargs.get("kwargs") if isinstance(kwargs.get("kwargs"), dict) else kwargs
        pos = inner.get("position_ids")
        q = key_states.shape[-2]
        # Decode steps on an accelerator skip the check: reading the positions would sync every step.
        on_accelerator = pos.device.type != "cpu" if isinstance(pos, torch.Tensor) else False
        on_accelerator = on_accelerator or self.simulates_accelerator
        if not isinstance(pos, torch.Tensor) or pos.dim() != 2 or pos.shape[-1] != q or (q == 1 and on_accelerator):
            return
        seen = self.layers[0].get_seq_length()
        last = int(pos[:, -1].max())  # the unpadded row of a left-padded batch
        if last != seen + q - 1:
            raise InputError(
                f"this cache already holds {seen} tokens but the new input continues at position "
                f"{last - q + 1}: a cache continues one sequence. Pass the whole sequence so far "
                f"(the previous output plus new tokens) to continue it, or build a new cache for a new prompt"
            )

    def attend(self, layer_idx: int, module, query, key, value, attention_mask, **kwargs):
        return self.layers[layer_idx].attend(module, query, key, value, attention_mask, **kwargs)

    # -- accounting ------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        device = sum(layer.device_bytes() for layer in self.layers)
        host = sum(layer.host_bytes() for layer in self.layers)
        return {
            "method": self.method_name,
            "seq_length": self.get_seq_length(),
            "device_kv_bytes": int(device),
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
            self.static.capacity = max(self.static.capacity, total)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise UnsupportedModelError(
            "beam search / num_return_sequences > 1 is not supported with this cache; "
            "use greedy or sampling with one sequence per prompt"
        )

    def reorder_cache(self, beam_idx) -> None:
        self.batch_repeat_interleave(0)


def model_fingerprint(model: torch.nn.Module) -> str:
    cfg = model.config.get_text_config(decoder=True)
    return (
        f"{cfg.model_type}/{cfg.num_hidden_layers}L/{cfg.num_key_value_heads}kv/"
        f"{getattr(cfg, 'head_dim', None) or cfg.hidden_size // cfg.num_attention_heads}d"
    )


def text_config(model: torch.nn.Module):
    return model.config.get_text_config(decoder=True)


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
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
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
