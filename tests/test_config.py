"""OmniKVConfig validation, layer-role plans and presets."""

import json
import warnings

import pytest

from omnikv import ConfigError, OmniKVCache, OmniKVConfig, UnsupportedModelError
from omnikv.algorithm.presets import PRESETS, fallback_config, find_preset, preset_for_model
from omnikv.algorithm.roles import Role, plan_layers
from omnikv.models.tiny import tiny_config


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(filter_layers=()), "filter_layers"),
        (dict(filter_layers=(8, 2)), "sorted"),
        (dict(filter_layers=(2, 2)), "distinct"),
        (dict(filter_layers=(-1,)), "filter_layers"),
        (dict(filter_layers=3), "filter_layers"),
        (dict(budget=0), "budget"),
        (dict(budget=-5), "budget"),
        (dict(budget=0.0), "budget"),
        (dict(budget=1.5), "budget"),
        (dict(budget="10"), "budget"),
        (dict(budget=True), "budget"),
        (dict(selector="topk"), "selector"),
        (dict(head_reduce="mean"), "head_reduce"),
        (dict(num_wait_layers=-1), "num_wait_layers"),
        (dict(refresh_every=0), "refresh_every"),
        (dict(partial_reload="yes"), "partial_reload"),
        (dict(window_size=0), "window_size"),
        (dict(offload="yes"), "offload"),
        (dict(selection_block=0), "selection_block"),
        (dict(selection_block=16.0), "selection_block"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        OmniKVConfig(**kwargs)


def test_out_of_range_and_sliding_filter_layers(models):
    with pytest.raises(ConfigError, match="has 4 layers"):
        OmniKVCache(models("llama"), OmniKVConfig(filter_layers=(1, 9)))
    gemma = models("gemma3_text", num_hidden_layers=6)  # full layers 1, 3, 5
    with pytest.raises(ConfigError, match="sliding-window layer"):
        OmniKVCache(gemma, OmniKVConfig(filter_layers=(2,)))


def test_unsupported_layer_types_are_refused(models):
    model = models("llama")
    model.config.layer_types = ["linear_attention"] * 4
    try:
        with pytest.raises(UnsupportedModelError, match="--method full"):
            OmniKVCache(model, OmniKVConfig(filter_layers=(1,)))
    finally:
        del model.config.layer_types


def test_int_budget_below_sink_plus_recent_shrinks_them_to_fit():
    import omnikv.config as config_mod

    config_mod._FITTED.clear()
    with pytest.warns(UserWarning, match=r"budget=64 .* sink_tokens \+ recent_tokens = 68; using sink_tokens=4 and recent_tokens=60"):
        cfg = OmniKVConfig(budget=64, sink_tokens=4, recent_tokens=64)
    assert (cfg.sink_tokens, cfg.recent_tokens) == (4, 60)
    assert cfg.resolve_budget(1000) == 64  # the user's number, not sink + recent
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not at every replace()
        assert OmniKVConfig(budget=64, sink_tokens=4, recent_tokens=64).recent_tokens == 60
    for budget in (1, 2, 10, 67):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            c = OmniKVConfig(budget=budget, sink_tokens=4, recent_tokens=64)
        assert c.sink_tokens + c.recent_tokens == budget and 1 <= c.sink_tokens <= 4 and c.recent_tokens <= 64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert OmniKVConfig(budget=3, sink_tokens=8, recent_tokens=0).sink_tokens == 3


def test_paper_preset_has_no_sink_or_recent_to_fit():
    from omnikv.algorithm.presets import PRESETS

    paper = next(p for p in PRESETS if p.name == "llama-3-8b-paper").config
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = paper.replace(budget=64)
    assert (cfg.sink_tokens, cfg.recent_tokens, cfg.budget) == (0, 0, 64)


def test_generate_with_a_small_int_budget_is_accepted(models):
    """`--method omnikv --budget 64` on a preset with 4 sink + 64 recent tokens runs (it was refused)."""
    from omnikv.decoding.generation import Session
    from omnikv.methods import get_method

    model = models("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method = get_method("omnikv", budget=64, filter_layers=(1,), num_wait_layers=0, sink_tokens=4, recent_tokens=64)
        session = Session(model, None, method)
    session.append(list(range(3, 203)))
    session.feed()
    session._forward([5])  # one decode step: the sparse layers attend the budget
    stats = session.cache.stats()
    assert stats["selected_tokens"] == 64
    assert (session.cache.config.sink_tokens, session.cache.config.recent_tokens) == (4, 60)


def test_budget_resolution():
    cfg = OmniKVConfig(budget=0.1, sink_tokens=4, recent_tokens=16)
    assert cfg.resolve_budget(1000) == 100
    assert cfg.resolve_budget(100) == 20  # never below sink + recent
    assert cfg.resolve_budget(10) == 10  # never above the prompt
    assert OmniKVConfig(budget=300, sink_tokens=0, recent_tokens=0).resolve_budget(200) == 200


def test_paper_plan_for_llama3_8b():
    """The paper's Llama-3-8B split: L={2,8,18}, w=1 on 32 layers -> dense 0,1,2,3,8,9,18,19; 24 sparse."""
    plan = plan_layers(OmniKVConfig(filter_layers=(2, 8, 18), num_wait_layers=1), ["full_attention"] * 32)
    dense = sorted(plan.layers_with(Role.DENSE) + plan.layers_with(Role.FILTER))
    assert dense == [0, 1, 2, 3, 8, 9, 18, 19]
    assert len(plan.layers_with(Role.SPARSE)) == 24
    assert plan.segment(2) == [4, 5, 6, 7]
    assert plan.segment(18) == list(range(20, 32))


def test_hybrid_plan_uses_full_attention_layers_only():
    types = (["sliding_attention"] * 5 + ["full_attention"]) * 3  # Gemma 3 270M
    plan = plan_layers(OmniKVConfig(filter_layers=(5,), num_wait_layers=0), types)
    assert plan.layers_with(Role.FILTER) == [5]
    assert plan.layers_with(Role.SPARSE) == [11, 17]
    assert len(plan.layers_with(Role.SLIDING)) == 15


def test_presets_match_their_models():
    smol = tiny_config("llama", num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64)
    assert find_preset(smol).name == "smollm2-135m"
    for p in PRESETS:
        types = ["full_attention"] * p.num_layers
        if p.model_type == "gemma3_text":
            types = (["sliding_attention"] * 5 + ["full_attention"]) * 3
        plan_layers(p.config, types)  # every preset is valid for its model


def test_fallback_for_unknown_models_warns_and_is_valid():
    cfg = tiny_config("llama", num_hidden_layers=20)
    with pytest.warns(UserWarning, match="omnikv calibrate"):
        c = preset_for_model(cfg)
    assert c == fallback_config(cfg)
    plan_layers(c, ["full_attention"] * 20)


def test_preset_file_roundtrip_and_unknown_keys(tmp_path):
    cfg = OmniKVConfig(filter_layers=(3, 14, 21), num_wait_layers=0, budget=0.1)
    path = tmp_path / "p.json"
    path.write_text(json.dumps({**cfg.to_dict(), "model_type": "llama", "num_layers": 30}))
    assert OmniKVConfig.from_json(path) == cfg
    path.write_text(json.dumps({**cfg.to_dict(), "filter_layer": [1]}))
    with pytest.raises(ConfigError, match="unknown OmniKV config keys"):
        OmniKVConfig.from_json(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        OmniKVConfig.from_json(path)
    with pytest.raises(ConfigError, match="does not exist"):
        OmniKVConfig.from_json(tmp_path / "missing.json")


def test_a_plan_without_sparse_layers_is_refused():
    with pytest.raises(ConfigError, match="leave no sparse layer"):
        plan_layers(OmniKVConfig(filter_layers=(1,), num_wait_layers=100), ["full_attention"] * 6)
    with pytest.raises(ConfigError, match="leave no sparse layer"):
        plan_layers(OmniKVConfig(filter_layers=(5,), num_wait_layers=0), ["full_attention"] * 6)


def test_block_selection_rounds_the_budget_up_to_whole_blocks_and_says_so():
    with pytest.warns(UserWarning, match=r"budget=200 tokens is not a multiple of selection_block=32; .* 7 blocks = 224"):
        cfg = OmniKVConfig(budget=200, sink_tokens=4, recent_tokens=16, selection_block=32)
    # 1000 tokens = 31 full blocks + 8 tokens; 7 blocks, the last (partial, always kept) included.
    assert cfg.resolve_budget(1000) == 6 * 32 + 8
    assert cfg.resolve_budget(50) == 50  # every block of a short prompt
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a multiple of the block: nothing to say; said once above
        assert OmniKVConfig(budget=128, recent_tokens=16, selection_block=32).resolve_budget(1000) == 3 * 32 + 8
        OmniKVConfig(budget=200, sink_tokens=4, recent_tokens=16, selection_block=32)
    assert OmniKVConfig(budget=96).resolve_budget(1000) == 96  # tokens: unchanged


def test_block_selection_warns_when_the_budget_holds_only_the_forced_blocks():
    """Gemma 3 at 2K with blocks of 128 and 0.1 kept: 205 tokens = 2 blocks, both forced (sink and
    last block), no context block selected (docs/results.md measured what that costs)."""
    cfg = OmniKVConfig(budget=0.1, sink_tokens=4, recent_tokens=64, selection_block=128)
    with pytest.warns(UserWarning, match=r"selection_block=128: a budget of 205 tokens on a 2048-token prompt is 2 "
                                         r"blocks, all of them forced .* at least 384 tokens"):
        assert cfg.resolve_budget(2048) == 256
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 410 tokens at 4K: 4 blocks, 2 of them free to select
        assert cfg.resolve_budget(4096) == 512
        assert cfg.resolve_budget(100) == 100  # a prompt of one block: nothing to select anyway
