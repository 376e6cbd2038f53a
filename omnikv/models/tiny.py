"""Tiny random checkpoints for tests: no downloads, built in milliseconds.

`make_tiny_checkpoint(path, family)` writes a Hugging Face directory (config, safetensors weights,
generation config, tokenizer) that `omnikv.models.load_model(path)` and
`transformers.AutoTokenizer.from_pretrained(path)` load like any real checkpoint. The tokenizer is
byte-level with no merges: every UTF-8 byte is one token, so any text encodes and decodes exactly,
and token counts are predictable (`len(text.encode()) == len(ids)` for text without special tokens).

`make_tiny_gguf(path)` writes the tiny llama as an unquantized GGUF file (llama.cpp tensor names,
tokenizer as metadata) to test GGUF loading without the real models.

Families mirror the architectures OmniKV is run on: llama, mistral, qwen2, qwen3 (all full
attention) and gemma3_text (sliding-window layers interleaved with full-attention layers, like
Gemma 3, where only the full-attention layers are OmniKV's filter/sparse layers).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

from omnikv.errors import ConfigError

FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")

# Special tokens follow SmolLM2's ChatML convention so chat paths behave like the real model's.
BOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, IM_START, IM_END)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma-3-like layout on a small scale: full attention on every second layer (1, 3, 5), so a
# filter layer (1) and two sparse layers (3, 5) exist; the 8-token window is tiny so short test
# prompts already exceed it.
_GEMMA_LAYER_TYPES = ["sliding_attention", "full_attention"] * 3
_GEMMA_SLIDING_WINDOW = 8


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges: 256 byte tokens, then the special tokens.

    Ids 0..255 are the 256 byte symbols (GPT-2 byte-to-unicode alphabet); 256, 257, 258 are
    `<|endoftext|>` (bos/pad), `<|im_start|>`, `<|im_end|>` (eos). No BOS is prepended on encode.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: the text is not pre-split into words, which does not matter without merges
    # and keeps encoding independent of the regex engine.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=IM_END,
        pad_token=BOS_TOKEN,
        additional_special_tokens=[IM_START],
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


TOKENIZER_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
_BOS_ID, _IM_START_ID, _EOS_ID = 256, 257, 258


def tiny_config(family: str = "llama", **overrides: Any) -> PretrainedConfig:
    """The transformers config of a tiny model of `family` (see FAMILIES).

    Defaults: 4 layers (6 for gemma3_text), hidden 64, 4 query heads, 2 KV heads (GQA), head_dim 16,
    intermediate 128, max_position_embeddings 4096, vocab = the tiny tokenizer's (259).
    Any config field can be overridden, e.g. `num_hidden_layers=8`.
    """
    from transformers import AutoConfig

    if family not in FAMILIES:
        raise ConfigError(f"unknown tiny model family {family!r}; choose one of {', '.join(FAMILIES)}")
    fields: dict[str, Any] = dict(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        bos_token_id=_BOS_ID,
        eos_token_id=_EOS_ID,
        pad_token_id=_BOS_ID,
        tie_word_embeddings=False,
    )
    if family == "mistral":
        fields["sliding_window"] = None  # plain full attention, like recent Mistral releases
    if family == "gemma3_text":
        n_layers = overrides.get("num_hidden_layers", len(_GEMMA_LAYER_TYPES))
        pattern = ["sliding_attention", "full_attention"]
        fields.update(
            num_hidden_layers=n_layers,
            layer_types=[pattern[i % 2] for i in range(n_layers)],
            sliding_window=_GEMMA_SLIDING_WINDOW,
            # Gemma scales queries by query_pre_attn_scalar**-0.5; match head_dim like the real model.
            query_pre_attn_scalar=overrides.get("head_dim", 16),
        )
    fields.update(overrides)
    if fields["vocab_size"] < TOKENIZER_VOCAB_SIZE:
        raise ConfigError(
            f"vocab_size={fields['vocab_size']} is smaller than the tiny tokenizer's "
            f"{TOKENIZER_VOCAB_SIZE} tokens; leave vocab_size at its default"
        )
    return AutoConfig.for_model(family, **fields)


def tiny_model(family: str = "llama", seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A randomly initialised tiny causal LM in eval mode, float32 on CPU, SDPA attention.

    `seed` fixes the weights without touching the global RNG state.
    """
    config = tiny_config(family, **overrides)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


def make_tiny_checkpoint(
    path: str | os.PathLike[str], family: str = "llama", seed: int = 0, **config_overrides: Any
) -> Path:
    """Save a tiny random model + byte-level tokenizer as an HF directory at `path`; return it.

    The directory holds config.json, generation_config.json, model.safetensors and the tokenizer
    files (with a ChatML chat template). `path` is created if missing; existing files are overwritten.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model = tiny_model(family, seed=seed, **config_overrides)
    from omnikv.models.conversion import quiet_transformers  # no per-save progress bars in test logs

    with quiet_transformers():
        model.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out


# GGUF tensor names (llama.cpp) of the tiny llama's weights, per layer and global.
_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def make_tiny_gguf(path: str | os.PathLike[str], seed: int = 0, **config_overrides: Any) -> Path:
    """Write the tiny llama (`tiny_model("llama", seed, **overrides)`) as an unquantized GGUF file.

    F32 tensors under llama.cpp's names, with the q/k rows permuted as llama.cpp's converter does,
    and the byte-level tokenizer (and ChatML template) as GGUF metadata: loading it through
    transformers' GGUF support gives back the same model, so GGUF paths can be tested in seconds.
    """
    import gguf
    import numpy as np

    model = tiny_model("llama", seed=seed, **config_overrides)
    cfg = model.config
    tok = build_tokenizer()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("omnikv-tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    by_id = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([t for t, _ in by_id])
    writer.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t, _ in by_id])  # 3 = control
    # No merges: an empty merges array reads back as absent, and the reader then derives merges
    # from the scores, which for single-byte tokens are none.
    writer.add_token_scores([0.0] * len(by_id))
    writer.add_bos_token_id(_BOS_ID)
    writer.add_eos_token_id(_EOS_ID)
    writer.add_pad_token_id(_BOS_ID)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)

    def permute(w: np.ndarray, n_head: int) -> np.ndarray:  # llama.cpp's rope row order
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, gg in _GGUF_LAYER_NAMES.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                w = permute(w, cfg.num_attention_heads)
            elif gg == "attn_k":
                w = permute(w, cfg.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
