"""kvpress's presses as baselines (omnikv/methods/presses.py), and our snapkv / streaming_llm held
to kvpress's presses at matched settings.

The spec parsing runs everywhere; the rest needs kvpress, which needs transformers < 5.3: it runs
in the floor venv (scripts/setup_floor.sh; tests/test_floor.py runs this file there in CI) and is
skipped with the reason elsewhere.
"""

from __future__ import annotations

import json

import pytest
import torch

from omnikv.errors import ConfigError
from omnikv.methods import get_method
from omnikv.methods.presses import kvpress_available, parse_press
from omnikv.methods.spec import parse_methods

needs_kvpress = pytest.mark.skipif(
    not kvpress_available(),
    reason="kvpress is not installed here (kvpress 0.5.5 needs transformers < 5.3): run in the floor "
           "venv, `bash scripts/setup_floor.sh`, or CI=true / OMNIKV_FLOOR=1 bash scripts/test.sh",
)
PROMPT = 120


def test_press_specs_parse_with_options_and_nested_presses():
    assert parse_press("SnapKVPress") == ("SnapKVPress", {})
    assert parse_press("SnapKVPress(window_size=16, kernel_size=5)") == (
        "SnapKVPress", {"window_size": 16, "kernel_size": 5})
    assert parse_press("AdaKVPress(press=SnapKVPress(window_size=8), alpha_safeguard=0.1)") == (
        "AdaKVPress", {"press": ("SnapKVPress", {"window_size": 8}), "alpha_safeguard": 0.1})
    specs = parse_methods("full,kvpress:SnapKVPress(window_size=16, kernel_size=5):budget=0.1,kvpress:TOVAPress")
    assert [(s.name, s.options) for s in specs] == [
        ("full", {}),
        ("kvpress", {"press": "SnapKVPress(window_size=16, kernel_size=5)", "budget": 0.1}),
        ("kvpress", {"press": "TOVAPress"}),
    ]
    assert specs[2].label == "kvpress:TOVAPress"


@pytest.mark.parametrize("text, message", [
    ("Snap KV", "bad press"),
    ("SnapKVPress(16)", "key=value"),
    ("SnapKVPress(window_size=open('x'))", "bad press option"),
    ("SnapKVPress(window_size=16 kernel_size=5)", "bad press options"),
    ("SnapKVPress(window_size=", "bad press"),
])
def test_malformed_press_specs_say_how_to_write_one(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_press(text)


def test_kvpress_method_with_an_empty_press_names_some():
    with pytest.raises(ConfigError, match="kvpress:SnapKVPress"):
        get_method("kvpress", press="")
    assert get_method("kvpress").press == "SnapKVPress"


@pytest.mark.skipif(kvpress_available(), reason="kvpress is installed")
def test_without_kvpress_a_press_says_how_to_install_it(models):
    method = get_method("kvpress", press="SnapKVPress")  # the spec is checked; kvpress is not needed yet
    with pytest.raises(ConfigError, match="pip install kvpress"):
        method.make_cache(models("llama"))


@needs_kvpress
@pytest.mark.parametrize("text, message", [
    ("NoSuchPress", "kvpress has no press 'NoSuchPress'; its presses: .*SnapKVPress"),
    ("TOVAPress(window_size=8)", "TOVAPress refused options .*its options: compression_ratio"),
])
def test_unknown_presses_and_options_are_refused_by_name(text, message):
    with pytest.raises(ConfigError, match=message):
        get_method("kvpress", press=text)


def _prompt(seed: int = 0) -> list[int]:
    return torch.randint(5, 200, (PROMPT,), generator=torch.Generator().manual_seed(seed)).tolist()


@needs_kvpress
@pytest.mark.parametrize("budget, kept", [(0.25, 30), (0.1, 12), (17, 17)])
def test_a_press_keeps_the_budgets_rows_of_every_full_attention_layer(models, budget, kept):
    """The one budget rule: k = Budget.tokens(prompt) prompt rows per layer (kvpress's
    compression_ratio = 1 - kept share); a hybrid model's sliding layers keep their window."""
    from omnikv.decoding.generation import Session

    for family in ("llama", "gemma3_text"):
        model = models(family)
        session = Session(model, None, get_method("kvpress", budget=budget, press="KnormPress"))
        session.append(_prompt())
        session.feed()
        session.step([7])
        stats = session.cache.stats()
        stock = _stock_rows(model, _prompt() + [7])  # what transformers' own cache holds
        types = getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers
        expect = [n if t == "sliding_attention" else kept + 1 for t, n in zip(types, stock)]
        assert stats["attended_tokens_per_layer"] == expect, family
        assert stats["kept_target"] == kept and stats["press_took_budget"]


def _stock_rows(model, ids: list[int]) -> list[int]:
    """Rows per layer of transformers' DynamicCache after the prompt ids[:-1] and one step ids[-1]."""
    from omnikv.hf.compat import DynamicCache, cache_kwargs

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([ids[:-1]]), **cache_kwargs(cache))
        model(input_ids=torch.tensor([ids[-1:]]), **cache_kwargs(cache))
    return [int(layer.keys.shape[-2]) for layer in cache.layers]


@needs_kvpress
def test_a_press_at_full_budget_is_full_attention(models):
    from omnikv.decoding.generation import teacher_forced_logits

    model, ids = models("llama"), _prompt(1)
    full = teacher_forced_logits(model, ids, [3, 4, 5, 6], "full")
    press = teacher_forced_logits(model, ids, [3, 4, 5, 6], get_method("kvpress", budget=1.0, press="SnapKVPress(window_size=8)"))
    torch.testing.assert_close(press, full, rtol=0, atol=1e-5)


@needs_kvpress
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_our_snapkv_matches_kvpress_snapkv_at_matched_settings(models, family):
    """Our snapkv with avg pooling and mean head reduction = kvpress's SnapKVPress (which pools with
    avg and averages a KV head's query heads): the same rows kept, so the same logits at every
    decode step (both keep every generated token)."""
    from omnikv.decoding.generation import teacher_forced_logits

    model, ids, cont = models(family), _prompt(2), [3, 4, 5, 6]
    for budget, window, kernel in ((0.25, 8, 5), (20, 4, 3)):
        ours = get_method("snapkv", budget=budget, window_size=window, kernel_size=kernel, pooling="avg", head_reduce="mean")
        theirs = get_method("kvpress", budget=budget, press=f"SnapKVPress(window_size={window}, kernel_size={kernel})")
        torch.testing.assert_close(teacher_forced_logits(model, ids, cont, ours),
                                   teacher_forced_logits(model, ids, cont, theirs), rtol=0, atol=1e-5)


@needs_kvpress
def test_our_streaming_llm_matches_kvpress_at_the_first_decode_step(models):
    """StreamingLLM: the same sinks + recent prompt rows at the first decode step. After it, ours
    slides its window over generated tokens (the paper's method) while kvpress keeps them all, so
    only the prefill's and the first step's logits are held equal."""
    from omnikv.decoding.generation import teacher_forced_logits

    model, ids = models("llama"), _prompt(3)
    ours = teacher_forced_logits(model, ids, [3, 4], get_method("streaming_llm", budget=25, sink_tokens=4))
    theirs = teacher_forced_logits(model, ids, [3, 4], get_method("kvpress", budget=25, press="StreamingLLMPress(n_sink=4)"))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    full = teacher_forced_logits(model, ids, [3, 4], "full")
    assert (ours[1] - full[1]).abs().max() > 1e-3  # the step did evict rows (the test can fail)


@needs_kvpress
def test_presses_prefill_in_one_forward_and_refuse_forks(models):
    """A press's prompt goes through one forward even when chunking is asked (kvpress compresses
    at the end of the prompt's forward: chunks would compress the first chunk only), and its cache
    is not one a shared prefill can seed (each press prefills on its own in `omnikv eval`)."""
    from omnikv.decoding.fork import prefill_needs
    from omnikv.decoding.generation import teacher_forced_logits

    model, ids = models("llama"), _prompt(4)
    method = get_method("kvpress", budget=0.2, press="TOVAPress")
    one = teacher_forced_logits(model, ids, [3, 4, 5], method)
    chunked = teacher_forced_logits(model, ids, [3, 4, 5], method, prefill_chunk_size=32)
    torch.testing.assert_close(one, chunked, rtol=0, atol=0)
    assert prefill_needs(method, model) is None


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from omnikv.models.tiny import make_tiny_checkpoint

    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt")))


@needs_kvpress
@pytest.mark.filterwarnings("ignore:no OmniKV preset")
def test_eval_runs_presses_beside_omnikv_in_one_table(ckpt, tmp_path, capsys):
    """`omnikv eval --methods full,omnikv,kvpress:...`: every press at the common budget, its rows
    in the same summary as the others, each press prefilled on its own (not forked)."""
    from omnikv.cli import main

    methods = "full,omnikv,kvpress:SnapKVPress(window_size=4, kernel_size=3),kvpress:TOVAPress"
    assert main(["eval", "--model", ckpt, "--output", str(tmp_path), "--methods", methods, "--tasks", "passkey",
                 "--lengths", "300", "--samples", "2", "--budget", "0.25", "--max-new-tokens", "3",
                 "--no-progress"]) == 0
    rows = json.loads((tmp_path / "metrics.json").read_text())["rows"]
    by_method = {r["method"]: r for r in rows}
    snap = "kvpress:SnapKVPress(window_size=4, kernel_size=3)"
    assert {"full", "omnikv", snap, "kvpress:TOVAPress"} <= set(by_method)
    for label in (snap, "kvpress:TOVAPress"):  # the same table, the same interval, the budget's rows
        assert by_method[label]["interval"] == by_method["omnikv"]["interval"]
        assert by_method[label]["ci_low"] is not None and 0.25 <= by_method[label]["device_kv_share"] < 0.27
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["prefill"]["own_prefill_methods"] == [snap, "kvpress:TOVAPress"]
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    press = [r for r in records if r["method"] == "kvpress:TOVAPress"]
    assert len(press) == 2 and all(r["prefill_mode"] == "own" for r in press)


@needs_kvpress
def test_bench_and_compare_run_a_press(ckpt, tmp_path, capsys):
    from omnikv.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "--model", ckpt, "--methods", "full,kvpress:KnormPress", "--contexts", "128",
                 "--steps", "2", "--warmup", "1", "--budget", "0.25", "--output-dir", str(out), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    press = [r for r in records if r["method"] == "kvpress:KnormPress"]
    full = [r for r in records if r["method"] == "full"][0]
    # The same decode steps as full, over 32 kept prompt rows (25% of 128) instead of 128.
    assert press[0]["attended_tokens_per_layer"] == [n - (128 - 32) for n in full["attended_tokens_per_layer"]]
    assert main(["compare", "--model", ckpt, "--method", "kvpress:TOVAPress", "--budget", "0.25", "--json",
                 "--max-new-tokens", "2", "--quiet"]) == 0


@needs_kvpress
def test_head_wise_presses_mask_even_after_omnikv_switched_the_model(models):
    """AdaKVPress keeps every row and masks per head through the attention functions kvpress
    wrapped at import; a model an omnikv cache switched to omnikv's attention gives the same
    logits as a fresh one (the press runs on transformers' sdpa), not full attention's."""
    from omnikv.decoding.generation import teacher_forced_logits
    from omnikv.models.tiny import tiny_model

    ids, cont = _prompt(5), [3, 4, 5]
    method = get_method("kvpress", budget=0.25, press="AdaKVPress(press=SnapKVPress(window_size=8))")
    fresh = teacher_forced_logits(tiny_model("llama"), ids, cont, method)
    model = tiny_model("llama")
    teacher_forced_logits(model, ids, cont, get_method("omnikv", budget=0.25))  # switches the model
    torch.testing.assert_close(teacher_forced_logits(model, ids, cont, method), fresh, rtol=0, atol=1e-5)
    full = teacher_forced_logits(model, ids, cont, "full")
    assert (fresh[1:] - full[1:]).abs().max() > 1e-3
