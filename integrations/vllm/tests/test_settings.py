"""OMNIKV_VLLM / OMNIKV_VLLM_CONFIG -> the library's OmniKVConfig and layer plan (no engine)."""

import pytest
from transformers import LlamaConfig

from omnikv.errors import ConfigError
from omnikv_vllm import settings

# SmolLM2-135M's shape: the library's preset `smollm2-135m` matches it.
SMOLLM2 = LlamaConfig(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3)


def test_enabled_only_when_asked():
    assert not settings.enabled({})
    assert not settings.enabled({"OMNIKV_VLLM": "0"})
    assert settings.enabled({"OMNIKV_VLLM": "1"})


def test_preset_with_json_overrides_and_plan():
    cfg = settings.resolve_config(SMOLLM2, {"OMNIKV_VLLM_CONFIG": '{"budget": 96}'})
    assert cfg.budget == 96 and cfg.filter_layers == (3, 14, 21) and cfg.source == "preset:smollm2-135m"
    plan = settings.layer_plan(cfg, SMOLLM2)
    assert plan.summary().startswith("dense=[0,1,2] filter=[3,14,21] sparse=[4,")


def test_a_named_preset_and_a_preset_file(tmp_path):
    cfg = settings.resolve_config(SMOLLM2, {"OMNIKV_VLLM_CONFIG": "llama-3-8b-paper"})
    assert cfg.filter_layers == (2, 8, 18) and cfg.budget == 0.067
    other = tmp_path / "gemma.json"
    other.write_text('{"model_type": "gemma3_text", "num_layers": 18, "filter_layers": [5]}')
    with pytest.raises(ConfigError, match="gemma3_text"):  # made for another model: refused
        settings.resolve_config(SMOLLM2, {"OMNIKV_VLLM_CONFIG": str(other)})


@pytest.mark.parametrize("raw,match", [
    ('{"budget": 96', "not valid JSON"),
    ('{"selector": "exp"}', "supports selector"),
    ('{"head_reduce": "per_kv_head"}', "per_kv_head"),
    ('{"no_such_field": 1}', "no_such_field"),
    ('{"selection_block": 16}', "selection_block must be 1 .* block size 128 .* --block-size 16"),
])
def test_bad_settings_fail_with_the_setting_named(raw, match):
    with pytest.raises((ConfigError, TypeError), match=match):
        settings.resolve_config(SMOLLM2, {"OMNIKV_VLLM_CONFIG": raw})


def test_selection_is_by_the_caches_blocks_unless_tokens_are_asked_for():
    cfg = settings.resolve_config(SMOLLM2, {"OMNIKV_VLLM_CONFIG": '{"budget": 1024}'}, block_size=128)
    assert cfg.selection_block == 128 and cfg.budget == 1024
    assert settings.resolve_config(SMOLLM2, {}, block_size=32).selection_block == 32
    tokens = settings.resolve_config(SMOLLM2, {"OMNIKV_VLLM_CONFIG": '{"selection_block": 1}'}, block_size=128)
    assert tokens.selection_block == 1


def test_cli_reports_a_user_error_in_one_line(capsys):
    """The plugin's CLI shares omnikv's runner (omnikv.cli.run_command): one line, exit 2."""
    from omnikv_vllm import cli

    rc = cli.main(["generate", "--model", "smollm2", "--prompt-file", "/nonexistent/prompt.txt"])
    assert rc == 2
    assert capsys.readouterr().err.strip() == "omnikv_vllm generate: error: --prompt-file /nonexistent/prompt.txt does not exist"
