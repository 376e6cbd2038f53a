"""The tiny test checkpoints: every family saves, reloads and tokenizes like a real checkpoint."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from omnikv.errors import ConfigError
from omnikv.models.tiny import FAMILIES, build_tokenizer, make_tiny_checkpoint, tiny_config, tiny_model

TEXTS = [
    "Hello, world!",
    "  two leading spaces,\ttab,\nnew line\r\nCRLF  ",
    "Grüße aus Köln, 東京タワー, Ελληνικά, emoji 🙂👍🏽",
    "",
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("tiny")
    return {fam: make_tiny_checkpoint(root / fam, family=fam) for fam in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_round_trips_any_utf8_and_matches_model_vocab(checkpoints, family):
    tok = AutoTokenizer.from_pretrained(checkpoints[family])
    model = AutoModelForCausalLM.from_pretrained(checkpoints[family])
    assert len(tok) == model.config.vocab_size == model.get_input_embeddings().weight.shape[0]
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        # Byte-level, no merges, no BOS: one token per UTF-8 byte, and decoding is exact.
        assert len(ids) == len(text.encode("utf-8"))
        assert max(ids, default=0) < 256
        assert tok.decode(ids) == text


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_is_chatml_with_single_token_markers(checkpoints, family):
    tok = AutoTokenizer.from_pretrained(checkpoints[family])
    msgs = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text)["input_ids"]
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids.count(start) == 2 and ids.count(end) == 1
    assert tok.eos_token_id == end
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi\nassistant\n"


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_checkpoint_equals_in_memory_model(checkpoints, family):
    loaded = AutoModelForCausalLM.from_pretrained(checkpoints[family], dtype=torch.float32).eval()
    direct = tiny_model(family)
    assert loaded.config.model_type == family
    ids = torch.tensor([list(range(40))])
    with torch.no_grad():
        a, b = loaded(ids).logits, direct(ids).logits
    assert a.shape == (1, 40, len(build_tokenizer()))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_seed_controls_weights_without_touching_global_rng():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = tiny_model("llama", seed=1)
    assert torch.equal(torch.rand(3), expected_next)  # global RNG stream untouched
    b, c = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_default_shapes_and_overrides():
    cfg = tiny_config("qwen3")
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.max_position_embeddings) == (4, 64, 4, 2, 16, 4096)
    cfg = tiny_config("llama", num_hidden_layers=7, max_position_embeddings=512)
    assert cfg.num_hidden_layers == 7 and cfg.max_position_embeddings == 512
    model = tiny_model("mistral", num_hidden_layers=2)
    assert len(model.model.layers) == 2 and not model.training
    assert model.config._attn_implementation == "sdpa"


def test_gemma_mixes_sliding_and_full_layers():
    cfg = tiny_config("gemma3_text")
    assert cfg.layer_types == ["sliding_attention", "full_attention"] * 3
    assert cfg.sliding_window < 32 < cfg.max_position_embeddings
    cfg = tiny_config("gemma3_text", num_hidden_layers=4)
    assert cfg.layer_types == ["sliding_attention", "full_attention"] * 2


def test_gemma_sliding_window_is_actually_applied():
    # Compare with a twin that has the same weights and layer types (hence the same local/global
    # rope) but a window wider than the prompt: within 8 tokens both must agree, beyond they differ.
    sliding = tiny_model("gemma3_text")
    full = tiny_model("gemma3_text", sliding_window=4096)
    full.load_state_dict(sliding.state_dict())
    ids = torch.arange(30).unsqueeze(0)
    with torch.no_grad():
        a, b = sliding(ids).logits[0, -1], full(ids).logits[0, -1]
        a7, b7 = sliding(ids[:, :7]).logits[0, -1], full(ids[:, :7]).logits[0, -1]
    assert not torch.allclose(a, b, atol=1e-5)  # long prompt: windows differ
    torch.testing.assert_close(a7, b7)  # shorter than the window: identical


def test_unknown_family_and_too_small_vocab_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown tiny model family 'gpt9'.*llama"):
        tiny_config("gpt9")
    with pytest.raises(ConfigError, match="vocab_size=100"):
        make_tiny_checkpoint(tmp_path / "x", vocab_size=100)
