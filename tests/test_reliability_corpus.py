"""Hostile-input corpus: the Python API, every CLI command and the server, each fed bad input.

Every row of a table is (input -> the clear error it must raise, or the correct result it must give).
"Clear" means: an `omnikv.errors` subclass (so the CLI prints one line and the server answers 4xx)
whose message names the problem. Nothing may escape as a raw traceback (IndexError, shape errors,
allocation failures) and nothing may hang: every test runs under a SIGALRM watchdog. The table is
rendered in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import sys
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
import torch

from omnikv.algorithm.cache import OmniKVCache
from omnikv.cli import main as cli_main
from omnikv.config import OmniKVConfig
from omnikv.errors import ConfigError, InputError, ModelLoadError, OmniKVError, ResourceError, UnsupportedModelError
from omnikv.hf.compat import cache_kwargs
from omnikv.decoding.generation import SamplingParams, Session, generate, teacher_forced_logits
from omnikv.methods import available_methods, get_method
from omnikv.models.tiny import build_tokenizer, make_tiny_checkpoint, make_tiny_gguf, tiny_model

LIMIT = 64  # max_position_embeddings of the models below: "at the limit" is cheap to reach
SPARSE = OmniKVConfig(filter_layers=(1,), num_wait_layers=0, budget=8, sink_tokens=2, recent_tokens=2)
WATCHDOG_S = 120  # far above any test's run time; a hang fails instead of blocking the suite


@pytest.fixture(autouse=True)
def watchdog():
    def boom(signum, frame):  # noqa: ARG001
        raise TimeoutError(f"test ran over {WATCHDOG_S} s: something hangs")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(WATCHDOG_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def small():
    """Tiny llama (4 layers, 2 KV heads) with a 64-token context."""
    return tiny_model("llama", max_position_embeddings=LIMIT)


@pytest.fixture(scope="module")
def other():
    """Same layer count, different KV heads: 'another model' for a cache built for `small`."""
    return tiny_model("llama", seed=1, num_key_value_heads=4, max_position_embeddings=LIMIT)


def ids(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g).tolist()


def greedy(model, tok, prompt: list[int], method, n: int = 4):
    return generate(model, tok, prompt, method, SamplingParams(max_new_tokens=n, ignore_eos=True))


# ----------------------------------------------------------------------------------------------
# Python API: inputs that must raise a clear error


def _bad_vocab(small, tok, other):
    return greedy(small, tok, [1, 2, small.get_input_embeddings().num_embeddings], "full")


API_ERRORS: list[tuple[str, Callable[..., Any], type[Exception], str]] = [
    ("empty prompt", lambda m, t, o: greedy(m, t, [], "omnikv"), InputError, "empty"),
    ("empty tensor prompt", lambda m, t, o: greedy(m, t, torch.zeros(1, 0, dtype=torch.long), "full"), InputError, "empty"),
    ("prompt one past the limit", lambda m, t, o: greedy(m, t, ids(LIMIT + 1), get_method("omnikv", config=SPARSE)), InputError, f"{LIMIT + 1} tokens"),
    ("token id = vocab size", _bad_vocab, InputError, "outside the model's vocabulary"),
    ("negative token id", lambda m, t, o: greedy(m, t, [5, -1], "full"), InputError, "outside the model's vocabulary"),
    ("batch of 2 to generate()", lambda m, t, o: greedy(m, t, torch.zeros(2, 3, dtype=torch.long), "full"), InputError, "one sequence"),
    ("empty continuation (teacher forcing)", lambda m, t, o: teacher_forced_logits(m, [1, 2], [], "full"), InputError, "empty"),
    ("feed with nothing pending", lambda m, t, o: Session(m, t, "full").feed(), InputError, "append"),
    ("max_new_tokens 0", lambda m, t, o: SamplingParams(max_new_tokens=0), ConfigError, "max_new_tokens"),
    ("max_new_tokens -5", lambda m, t, o: SamplingParams(max_new_tokens=-5), ConfigError, "max_new_tokens"),
    ("max_new_tokens True", lambda m, t, o: SamplingParams(max_new_tokens=True), ConfigError, "max_new_tokens"),
    ("temperature -1", lambda m, t, o: SamplingParams(temperature=-1.0), ConfigError, "temperature"),
    ("temperature nan", lambda m, t, o: SamplingParams(temperature=float("nan")), ConfigError, "temperature"),
    ("temperature inf", lambda m, t, o: SamplingParams(temperature=float("inf")), ConfigError, "temperature"),
    ("top_p 0", lambda m, t, o: SamplingParams(top_p=0.0), ConfigError, "top_p"),
    ("top_k -1", lambda m, t, o: SamplingParams(top_k=-1), ConfigError, "top_k"),
    ("empty stop string", lambda m, t, o: SamplingParams(stop=("",)), ConfigError, "stop"),
    ("seed 2**64", lambda m, t, o: SamplingParams(seed=2**64, temperature=1.0), ConfigError, "seed"),
    ("seed as a string", lambda m, t, o: SamplingParams(seed="7"), ConfigError, "seed"),
    ("unknown method", lambda m, t, o: get_method("omnikvv"), ConfigError, "unknown method"),
    ("unknown omnikv option", lambda m, t, o: get_method("omnikv", filter_layer=(1,)), ConfigError, "unknown omnikv options"),
    ("filter layer = num layers", lambda m, t, o: OmniKVCache(m, SPARSE.replace(filter_layers=(4,))), ConfigError, "valid indices 0..3"),
    ("filter layer 10**9", lambda m, t, o: OmniKVCache(m, SPARSE.replace(filter_layers=(10**9,))), ConfigError, "has 4 layers"),
    ("negative filter layer", lambda m, t, o: SPARSE.replace(filter_layers=(-1,)), ConfigError, "filter_layers entries must be an int >= 0"),
    ("no filter layer", lambda m, t, o: SPARSE.replace(filter_layers=()), ConfigError, "empty"),
    ("unsorted filter layers", lambda m, t, o: SPARSE.replace(filter_layers=(2, 1)), ConfigError, "sorted"),
    ("filter layers as an int", lambda m, t, o: SPARSE.replace(filter_layers=2), ConfigError, "tuple"),
    ("refresh_every 0", lambda m, t, o: SPARSE.replace(refresh_every=0), ConfigError, "refresh_every"),
    ("window_size 0", lambda m, t, o: SPARSE.replace(window_size=0), ConfigError, "window_size"),
    ("selector typo", lambda m, t, o: SPARSE.replace(selector="top"), ConfigError, "selector"),
    ("cache reused with another model", lambda m, t, o: _reuse_with(m, o), UnsupportedModelError, "build one per model"),
    ("fresh cache used with another model", lambda m, t, o: o(torch.tensor([ids(5)]), **cache_kwargs(OmniKVCache(m, SPARSE))), UnsupportedModelError, "built for llama/4L/2kv"),
    ("cache used with a deeper model", lambda m, t, o: tiny_model("llama", num_hidden_layers=6)(torch.tensor([ids(5)]), **cache_kwargs(OmniKVCache(m, SPARSE))), UnsupportedModelError, "build one per model"),
    ("generate twice, same prompt, one cache", lambda m, t, o: _generate_twice_same(m), InputError, "build a new cache"),
    ("cache reused with another batch size", lambda m, t, o: _other_batch(m), InputError, "one batch"),
]

BAD_BUDGETS = [0, -1, 0.0, -0.5, 1.5, float("nan"), float("inf"), True, "10"]


def _reuse_with(model, other):
    cache = OmniKVCache(model, SPARSE)
    prompt = torch.tensor([ids(20)])
    out = model.generate(prompt, **cache_kwargs(cache), max_new_tokens=3, do_sample=False)
    return other.generate(out, **cache_kwargs(cache), max_new_tokens=3, do_sample=False)


def _generate_twice_same(model):
    cache = OmniKVCache(model, SPARSE)
    prompt = torch.tensor([ids(20)])
    model.generate(prompt, **cache_kwargs(cache), max_new_tokens=3, do_sample=False)
    return model.generate(prompt, **cache_kwargs(cache), max_new_tokens=3, do_sample=False)


def _other_batch(model):
    cache = OmniKVCache(model, SPARSE)
    model(torch.tensor([ids(20)]), **cache_kwargs(cache))
    return model(torch.tensor([ids(4), ids(4, 1)]), **cache_kwargs(cache))


@pytest.mark.parametrize("name,call,error,needle", API_ERRORS, ids=[r[0] for r in API_ERRORS])
def test_api_hostile_input_raises_clear_error(name, call, error, needle, small, tok, other):
    with pytest.raises(error) as info:
        call(small, tok, other)
    assert isinstance(info.value, OmniKVError)
    assert needle in str(info.value)


BUDGET_TABLE = ["full", "omnikv", "streaming_llm", "h2o", "snapkv", "quest", "full_offload", "kvpress", "infllm",
                "tidaldecode"]


@pytest.mark.parametrize("method", BUDGET_TABLE)
@pytest.mark.parametrize("budget", BAD_BUDGETS, ids=repr)
def test_api_bad_budget_is_config_error_for_every_method(method, budget):
    with pytest.raises(ConfigError, match="budget"):
        get_method(method, budget=budget)


def test_every_registered_method_is_in_the_budget_table():
    assert set(available_methods()) - {"full_prealloc"} <= set(BUDGET_TABLE)


# ----------------------------------------------------------------------------------------------
# Python API: edge inputs that must give the correct result


def test_single_token_prompt_every_method_equals_full(small, tok):
    ref = greedy(small, tok, [65], "full", n=6)
    assert ref.generated_tokens == 6
    for method in [get_method("omnikv", config=SPARSE), "full_offload", "full_prealloc"]:
        assert greedy(small, tok, [65], method, n=6).token_ids == ref.token_ids
    # Lossy methods with a budget >= the whole sequence keep everything: equal to full too.
    for method in ["h2o", "snapkv", "quest"]:
        assert greedy(small, tok, [65], get_method(method, budget=64), n=6).token_ids == ref.token_ids


def test_prompt_exactly_at_the_limit_gives_one_token_equal_to_full(small, tok):
    prompt = ids(LIMIT)
    ref = greedy(small, tok, prompt, "full")
    res = greedy(small, tok, prompt, get_method("omnikv", config=SPARSE))
    # The whole context is prompt: one token can be sampled (it is not fed back), then it stops.
    assert ref.generated_tokens == res.generated_tokens == 1 and res.finish_reason == "length"
    assert res.token_ids == ref.token_ids


def test_prompt_one_below_the_limit_fills_the_context(small, tok):
    res = greedy(small, tok, ids(LIMIT - 1), get_method("omnikv", config=SPARSE), n=50)
    assert res.generated_tokens == 2 and res.stats["seq_length"] == LIMIT


def test_huge_max_new_tokens_stops_at_the_context_without_huge_allocation(small, tok):
    res = greedy(small, tok, ids(10), get_method("omnikv", config=SPARSE), n=10**12)
    assert res.finish_reason == "length" and res.generated_tokens == LIMIT - 10 + 1
    assert res.stats["seq_length"] == LIMIT


def test_huge_token_budget_equals_full_attention(small, tok):
    prompt = ids(30)
    ref = greedy(small, tok, prompt, "full", n=8)
    res = greedy(small, tok, prompt, get_method("omnikv", config=SPARSE.replace(budget=10**18)), n=8)
    assert res.token_ids == ref.token_ids and res.stats["selected_tokens"] == 30


def test_generate_twice_continuing_the_first_output_equals_a_fresh_run(small):
    """The right way to reuse a cache: pass the previous output extended by new tokens."""
    cache = OmniKVCache(small, SPARSE)
    first = small.generate(torch.tensor([ids(20)]), **cache_kwargs(cache), max_new_tokens=3, do_sample=False)
    extended = torch.cat([first, torch.tensor([ids(6, 1)])], dim=1)
    again = small.generate(extended, **cache_kwargs(cache), max_new_tokens=5, do_sample=False)
    fresh = small.generate(extended, **cache_kwargs(OmniKVCache(small, SPARSE)), max_new_tokens=5, do_sample=False)
    assert again.tolist() == fresh.tolist()
    assert cache.get_seq_length() == extended.shape[1] + 4


def test_unsupported_architecture_is_refused(small):
    model = tiny_model("llama", max_position_embeddings=LIMIT)
    model.config.layer_types = ["full_attention", "linear_attention", "full_attention", "full_attention"]
    for method in [get_method("omnikv"), get_method("h2o", budget=128), get_method("quest", budget=128)]:
        with pytest.raises(UnsupportedModelError, match="--method full"):
            method.make_cache(model)


def test_beam_search_is_refused_clearly(small):
    with pytest.raises(UnsupportedModelError, match="beam search"):
        small.generate(torch.tensor([ids(10)]), **cache_kwargs(OmniKVCache(small, SPARSE)), num_beams=2, max_new_tokens=2)


# -- presets -----------------------------------------------------------------------------------

def _preset(tmp_path: Path, **meta) -> str:
    data = {"filter_layers": [1], "num_wait_layers": 0, "budget": 8, "sink_tokens": 2, "recent_tokens": 2,
            "selector": "last", "head_reduce": "max", **meta}
    p = tmp_path / "preset.json"
    p.write_text(json.dumps(data))
    return str(p)


@pytest.mark.parametrize("meta,needle", [
    ({"model_type": "gemma3_text", "num_layers": 4}, "made for a gemma3_text model"),
    ({"model_type": "llama", "num_layers": 30}, "made for a model with 30 layers"),
])
def test_preset_for_another_model_is_refused(tmp_path, small, tok, meta, needle):
    method = get_method("omnikv", preset=_preset(tmp_path, **meta))
    with pytest.raises(ConfigError, match=needle):
        greedy(small, tok, ids(10), method)


def test_preset_for_this_model_is_used(tmp_path, small, tok):
    method = get_method("omnikv", preset=_preset(tmp_path, model_type="llama", num_layers=4))
    res = greedy(small, tok, ids(30), method)
    assert res.stats["selected_tokens"] == 8 and res.config["filter_layers"] == [1]


@pytest.mark.parametrize("content,needle", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"filter_layers": [1], "bogus": 1}', "unknown OmniKV config keys"),
    (b'{"filter_layers": [1], "budget": -3}', "budget"),
])
def test_broken_preset_files(tmp_path, content, needle):
    p = tmp_path / "p.json"
    p.write_bytes(content)
    with pytest.raises(ConfigError, match=needle):
        get_method("omnikv", preset=str(p))
    with pytest.raises(ConfigError, match="does not exist"):
        get_method("omnikv", preset=str(tmp_path / "missing.json"))


# -- model files -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("rel") / "llama", "llama", max_position_embeddings=LIMIT))


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, ckpt) -> dict[str, str]:
    """Corrupted model files and directories, by name."""
    import shutil

    root = tmp_path_factory.mktemp("bad")
    out: dict[str, str] = {}
    (root / "garbage.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    out["garbage gguf"] = str(root / "garbage.gguf")
    good = make_tiny_gguf(root / "good.gguf")
    data = good.read_bytes()
    (root / "truncated.gguf").write_bytes(data[: len(data) // 2])
    out["truncated gguf"] = str(root / "truncated.gguf")
    (root / "empty.gguf").write_bytes(b"")
    out["empty gguf"] = str(root / "empty.gguf")
    for name, damage in [
        ("truncated safetensors", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000])),
        ("garbage safetensors", lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64)),
        ("config.json not JSON", lambda d: (d / "config.json").write_text("{oops")),
        ("config.json unknown model_type", lambda d: (d / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))),
        ("no weights", lambda d: (d / "model.safetensors").unlink()),
    ]:
        d = root / name.replace(" ", "_").replace(".", "_")
        shutil.copytree(ckpt, d)
        damage(d)
        out[name] = str(d)
    out["missing path"] = str(root / "nowhere")
    (root / "empty_dir").mkdir()
    out["empty directory"] = str(root / "empty_dir")
    return out


BAD_MODEL_NAMES = ["garbage gguf", "truncated gguf", "empty gguf", "truncated safetensors", "garbage safetensors",
                   "config.json not JSON", "config.json unknown model_type", "no weights", "missing path", "empty directory"]


@pytest.mark.parametrize("name", BAD_MODEL_NAMES)
def test_corrupted_model_files_raise_model_load_error(bad_models, name):
    from omnikv.models import load_model

    with pytest.raises((ModelLoadError, UnsupportedModelError)) as info:
        load_model(bad_models[name])
    assert bad_models[name].split("/")[-1] in str(info.value) or "nowhere" in str(info.value)


# -- memory guard -------------------------------------------------------------------------------

def test_memory_guard_refuses_before_any_prefill(monkeypatch, tok):
    import omnikv.methods.memory as memory

    model = tiny_model("llama")  # 4096-token context: 2000 tokens are allowed by the limit
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 1024)
    sess = Session(model, tok, get_method("omnikv", config=SPARSE))
    sess.append(ids(2000))
    with pytest.raises(ResourceError) as info:
        sess.feed()
    msg = str(info.value)
    assert "GiB of host memory" in msg and "try" in msg and "--budget" in msg
    assert sess.cache.get_seq_length() == 0 and sess.history == []  # refused before any work
    assert len(sess.pending) == 2000  # nothing lost: the request can be retried
    monkeypatch.setenv("OMNIKV_MEMORY_GUARD", "0")
    assert sess.feed().shape == (model.config.vocab_size,)


def test_budget_below_sink_plus_recent_is_fitted_not_refused():
    with pytest.warns(UserWarning, match="sink_tokens \\+ recent_tokens"):
        cfg = SPARSE.replace(budget=3, sink_tokens=5, recent_tokens=7)
    assert cfg.sink_tokens + cfg.recent_tokens == 3 and cfg.sink_tokens >= 1


@pytest.mark.parametrize("context", [0, -1, 10**15])
def test_plan_memory_extreme_contexts_do_not_crash(context, small):
    from omnikv.methods.memory import plan_memory

    plan = plan_memory(small.config, max(context, 0), get_method("omnikv", config=SPARSE))
    assert plan.host_total_bytes >= plan.weights_bytes >= 0
    if context == 10**15:
        assert not plan.fits


# ----------------------------------------------------------------------------------------------
# CLI: every command, in-process through omnikv.cli.main (the code path of `python -m omnikv`)


def run_main(argv: list[str], capsys, stdin: bytes | None = None) -> tuple[int, str, str]:
    """Exit code, stdout, stderr of `omnikv ARGV` (SystemExit from argparse counted as a code)."""
    capsys.readouterr()
    ctx = contextlib.nullcontext()
    if stdin is not None:
        fake = io.TextIOWrapper(io.BytesIO(stdin))
        ctx = _patched_stdin(fake)
    with ctx:
        try:
            code = cli_main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


@contextlib.contextmanager
def _patched_stdin(fake):
    old = sys.stdin
    sys.stdin = fake
    try:
        yield
    finally:
        sys.stdin = old


def assert_one_line(code: int, err: str, cmd: str, *needles: str) -> None:
    # Progress notes ("omnikv: converting ...") and warnings may precede the error line.
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("omnikv: ")]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"omnikv {cmd}: error: "), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory, ckpt) -> dict[str, str]:
    root = tmp_path_factory.mktemp("inputs")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (root / "empty.txt").write_text("")
    (root / "blank.txt").write_text("  \n\t\n")
    (root / "at_limit.txt").write_text("a" * LIMIT)
    (root / "below.txt").write_text("a" * (LIMIT - 1))
    (root / "other_preset.json").write_text(json.dumps({
        "filter_layers": [1], "num_wait_layers": 0, "budget": 8, "sink_tokens": 2, "recent_tokens": 2,
        "selector": "last", "head_reduce": "max", "model_type": "gemma3_text", "num_layers": 18}))
    return {p.stem: str(p) for p in root.iterdir()} | {"dir": str(root)}


def cli_cases(ckpt: str, f: dict[str, str], bad: dict[str, str]) -> list[tuple[str, list[str], list[str]]]:
    """(command, argv, substrings of the one-line error)."""
    m = ["--model", ckpt]
    gen = ["generate", *m, "--no-chat"]
    return [
        ("generate", [*gen, ""], ["empty"]),
        ("generate", [*gen, "--prompt-file", f["latin1"]], ["not UTF-8", "iconv"]),
        ("generate", [*gen, "--prompt-file", f["empty"]], ["empty"]),
        ("generate", [*gen, "--prompt-file", f["blank"]], ["empty"]),
        ("generate", [*gen, "--prompt-file", f["dir"]], ["directory"]),
        ("generate", [*gen, "--prompt-file", f["dir"] + "/missing.txt"], ["does not exist"]),
        ("generate", [*gen, "hi", "--prompt-file", f["below"]], ["not both"]),
        ("generate", [*gen, "--prompt-file", f["at_limit"]], [f"{LIMIT} tokens", "shorten"]),
        ("generate", [*gen, "hi", "--budget", "0"], ["budget"]),
        ("generate", [*gen, "hi", "--budget", "-3"], ["budget"]),
        ("generate", [*gen, "hi", "--budget", "nan"], ["budget"]),
        ("generate", [*gen, "hi", "--budget", "1.5"], ["budget"]),
        ("generate", [*gen, "hi", "--budget", "1e400"], ["budget"]),
        ("generate", [*gen, "hi", "--filter-layers", "9"], ["filter_layers contains 9", "0..3"]),
        ("generate", [*gen, "hi", "--filter-layers", "-1"], ["non-negative"]),
        ("generate", [*gen, "hi", "--filter-layers", "1,1"], ["repeat"]),
        ("generate", [*gen, "hi", "--max-new-tokens", "0"], [">= 1"]),
        ("generate", [*gen, "hi", "--max-new-tokens", "-1"], [">= 1"]),
        ("generate", [*gen, "hi", "--temperature", "-1"], ["temperature"]),
        ("generate", [*gen, "hi", "--top-p", "0"], ["top"]),
        ("generate", [*gen, "hi", "--seed", "abc"], ["seed"]),
        ("generate", [*gen, "hi", "--method", "nope"], ["nope"]),
        ("generate", [*gen, "hi", "--method", "full", "--filter-layers", "1"], ["filter"]),
        ("generate", [*gen, "hi", "--preset", f["other_preset"]], ["made for a gemma3_text model"]),
        ("generate", [*gen, "hi", "--preset", "no-such-preset"], ["no-such-preset"]),
        ("generate", [*gen, "hi", "--device", "tpu"], ["tpu"]),
        ("generate", [*gen, "hi", "--dtype", "int3"], ["int3"]),
        ("generate", ["generate", "--model", bad["garbage gguf"], "hi"], ["garbage.gguf"]),
        ("generate", ["generate", "--model", bad["truncated safetensors"], "hi"], ["truncated_safetensors"]),
        ("generate", ["generate", "--model", bad["missing path"], "hi"], ["nowhere"]),
        ("chat", ["chat", *m, "--context-file", f["latin1"]], ["not UTF-8"]),
        ("chat", ["chat", *m, "--context-file", f["empty"]], ["empty"]),
        ("chat", ["chat", *m, "--context-file", f["below"], "--budget", "0"], ["budget"]),
        ("compare", ["compare", *m, "--no-chat", "--prompt-file", f["latin1"]], ["not UTF-8"]),
        ("compare", ["compare", *m, "--no-chat", "hi", "--budget", "-1"], ["budget"]),
        ("compare", ["compare", *m, "--no-chat", "--prompt-file", f["at_limit"]], [f"{LIMIT} tokens"]),
        ("plan", ["plan", *m, "--context", "abc"], ["abc"]),
        ("plan", ["plan", *m, "--context", "0"], ["context"]),
        ("plan", ["plan", *m, "--context", "-5"], ["-5"]),
        ("plan", ["plan", *m, "--context", "128k", "--methods", "bogus"], ["bogus"]),
        ("plan", ["plan", *m, "--context", "128k", "--budget", "0"], ["budget"]),
        ("plan", ["plan", "--model", bad["config.json not JSON"], "--context", "1k"], ["config"]),
        ("serve", ["serve", *m, "--port", "70000"], ["port"]),
        ("serve", ["serve", *m, "--max-queue", "0"], ["queue"]),
        ("serve", ["serve", *m, "--budget", "0"], ["budget"]),
        ("serve", ["serve", "--model", bad["empty gguf"]], ["empty.gguf"]),
        ("serve", ["serve", *m, "--preset", f["other_preset"]], ["gemma3_text"]),
        ("eval", ["eval", *m, "--output", f["dir"] + "/eval", "--lengths", "abc"], ["abc"]),
        ("eval", ["eval", *m, "--output", f["dir"] + "/eval", "--budget", "0"], ["budget"]),
        ("bench", ["bench", *m, "--contexts", "abc"], ["abc"]),
        ("bench", ["bench", *m, "--steps", "-1"], ["steps"]),
        ("analyze", ["analyze", *m, "--input", f["latin1"]], ["UTF-8"]),
        ("calibrate", ["calibrate", *m, "--input", f["latin1"]], ["UTF-8"]),
        ("calibrate", ["calibrate", *m, "--from-report", f["latin1"]], ["latin1"]),
        ("plan", ["plan", *m, "--context", "infk"], ["infk"]),
        ("plan", ["plan", *m, "--context", "1k", "--budget", "inf"], ["budget"]),
        ("plan", ["plan", *m, "--context", "1k", "--dtype-bytes", "0"], ["dtype-bytes"]),
        ("plan", ["plan", *m, "--context", "1k", "--max-new-tokens", "-1"], ["max-new-tokens"]),
        ("plan", ["plan", *m, "--context", "1k", "--methods", ","], ["--methods is empty"]),
        ("generate", [*gen, "hi", "--seed", str(2**90)], ["seed"]),
    ]


CLI_IDS = [
    "generate-empty", "generate-latin1", "generate-empty-file", "generate-blank-file", "generate-dir", "generate-missing-file",
    "generate-two-prompts", "generate-at-limit", "generate-budget-0", "generate-budget-neg", "generate-budget-nan",
    "generate-budget-1.5", "generate-budget-1e400", "generate-filter-out-of-range", "generate-filter-neg",
    "generate-filter-repeat", "generate-max-new-0", "generate-max-new-neg", "generate-temp-neg", "generate-top-p-0",
    "generate-seed-abc", "generate-unknown-method", "generate-omnikv-flag-on-full", "generate-preset-other-model",
    "generate-preset-missing", "generate-device-tpu", "generate-dtype-int3", "generate-garbage-gguf",
    "generate-truncated-safetensors", "generate-missing-model", "chat-latin1", "chat-empty", "chat-budget-0",
    "compare-latin1", "compare-budget-neg", "compare-at-limit", "plan-context-abc", "plan-context-0", "plan-context-neg",
    "plan-unknown-method", "plan-budget-0", "plan-bad-config", "serve-port", "serve-queue-0", "serve-budget-0",
    "serve-empty-gguf", "serve-preset-other-model", "eval-lengths-abc", "eval-budget-0", "bench-contexts-abc",
    "bench-steps-neg", "analyze-latin1", "calibrate-latin1", "calibrate-report-not-json", "plan-context-infk",
    "plan-budget-inf", "plan-dtype-bytes-0", "plan-max-new-neg", "plan-no-methods", "generate-seed-2**90",
]


@pytest.mark.parametrize("index", range(len(CLI_IDS)), ids=CLI_IDS)
def test_cli_hostile_input_one_line_error(index, capsys, ckpt, files, bad_models, monkeypatch):
    # serve must fail before binding a port; a bug here would block, so the watchdog guards it.
    monkeypatch.setenv("OMNIKV_MEMORY_GUARD", "1")
    cmd, argv, needles = cli_cases(ckpt, files, bad_models)[index]
    code, _out, err = run_main(argv, capsys)
    assert_one_line(code, err, cmd, *needles)


def test_cli_non_utf8_stdin_is_one_line_error(capsys, ckpt):
    code, _out, err = run_main(["generate", "--model", ckpt, "--no-chat", "-"], capsys, stdin=b"\xff\xfe\xfa bad")
    assert_one_line(code, err, "generate", "stdin is not UTF-8")


def test_cli_edge_inputs_give_correct_results(capsys, ckpt, files, small, tok):
    from omnikv.models import load_model

    lm = load_model(ckpt)
    # One byte = one token: a single-token prompt, and one that leaves room for exactly one token.
    for prompt_args, n_prompt in [(["A"], 1), (["--prompt-file", files["below"]], LIMIT - 1)]:
        code, out, err = run_main(["generate", "--model", ckpt, "--no-chat", "--json", "--quiet", "--method", "omnikv",
                                   "--filter-layers", "1", "--num-wait-layers", "0", "--budget", "8",
                                   "--sink-tokens", "2", "--recent-tokens", "2",
                                   "--max-new-tokens", "1000000000000", *prompt_args], capsys)
        assert code == 0, err
        body = json.loads(out)
        prompt = lm.tokenizer("A" if n_prompt == 1 else "a" * n_prompt, add_special_tokens=True)["input_ids"]
        assert body["prompt_tokens"] == len(prompt) == n_prompt
        ref = generate(lm.model, lm.tokenizer, prompt, get_method("omnikv", config=SPARSE), SamplingParams(max_new_tokens=LIMIT))
        assert body["token_ids"] == ref.token_ids[: len(body["token_ids"])]
        assert body["finish_reason"] in ("length", "stop")
        assert body["prompt_tokens"] + body["generated_tokens"] <= LIMIT + 1
    code, out, err = run_main(["plan", "--model", ckpt, "--context", "1000000k", "--json"], capsys)
    assert code == 0, err
    plans = json.loads(out)
    assert all(isinstance(p["fits"], bool) for p in plans)
    # Planning for a GPU on a machine without one: the device side is unknown, not "fits".
    if not torch.cuda.is_available():
        code, out, err = run_main(["plan", "--model", ckpt, "--context", "1k", "--device", "cuda"], capsys)
        assert code == 0, err
        rows = [ln.split() for ln in out.splitlines() if ln.split() and ln.split()[0] in ("full", "omnikv")]
        assert rows and all(r[-2] == "?" for r in rows), out  # the fits column, before max context


def test_cli_subprocess_no_traceback_for_corrupt_gguf(bad_models):
    import os
    import subprocess

    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "omnikv", "generate", "--model", bad_models["truncated gguf"], "hi"],
                          capture_output=True, env=env, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert [ln for ln in err.splitlines() if ln.strip()][-1].startswith("omnikv generate: error: ")


# ----------------------------------------------------------------------------------------------
# Server: real uvicorn on a loopback port, the tiny checkpoint with OmniKV


@pytest.fixture(scope="module")
def server(ckpt):
    from omnikv.models import load_model
    from omnikv.server import Engine, ServerThread, create_app

    lm = load_model(ckpt)
    engine = Engine.from_loaded(lm, get_method("omnikv", config=SPARSE))
    with ServerThread(create_app(engine, max_queue=4)) as srv:
        yield srv, engine


SERVER_BAD: list[tuple[str, str, Any]] = [
    ("empty prompt", "/v1/completions", {"prompt": "", "max_tokens": 2}),
    ("empty id list", "/v1/completions", {"prompt": [], "max_tokens": 2}),
    ("negative id", "/v1/completions", {"prompt": [5, -1], "max_tokens": 2}),
    ("id past vocab", "/v1/completions", {"prompt": [5, 10**9], "max_tokens": 2}),
    ("id past int64", "/v1/completions", {"prompt": [5, 2**70], "max_tokens": 2}),
    ("prompt at the limit", "/v1/completions", {"prompt": "a" * LIMIT, "max_tokens": 2}),
    ("prompt past the limit", "/v1/completions", {"prompt": "a" * (LIMIT + 1), "max_tokens": 2}),
    ("huge prompt", "/v1/completions", {"prompt": "a" * 200_000, "max_tokens": 2}),
    ("max_tokens 0", "/v1/completions", {"prompt": "hi", "max_tokens": 0}),
    ("max_tokens -1", "/v1/completions", {"prompt": "hi", "max_tokens": -1}),
    ("max_tokens string", "/v1/completions", {"prompt": "hi", "max_tokens": "many"}),
    ("temperature -1", "/v1/completions", {"prompt": "hi", "temperature": -1}),
    ("top_p 5", "/v1/completions", {"prompt": "hi", "top_p": 5}),
    ("seed 2**80", "/v1/completions", {"prompt": "hi", "seed": 2**80}),
    ("n 17", "/v1/completions", {"prompt": "hi", "n": 17}),  # n <= 16 is served
    ("65 prompts", "/v1/completions", {"prompt": ["a"] * 65}),  # up to 64 are served
    ("logit_bias", "/v1/completions", {"prompt": "hi", "logit_bias": {"1": 100}}),
    ("text/plain body", "/v1/completions", b"text/plain"),
    ("wrong model name", "/v1/completions", {"prompt": "hi", "model": "gpt-9"}),
    ("no messages", "/v1/chat/completions", {"messages": []}),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}),
    ("messages not a list", "/v1/chat/completions", {"messages": "hi"}),
    ("invalid JSON", "/v1/completions", b"{not json"),
    ("non-UTF-8 body", "/v1/completions", b'{"prompt": "\xff\xfe"}'),
    ("JSON array body", "/v1/completions", b"[1, 2, 3]"),
    ("NaN temperature", "/v1/completions", b'{"prompt": "hi", "temperature": NaN}'),
]


@pytest.mark.parametrize("name,path,body", SERVER_BAD, ids=[r[0] for r in SERVER_BAD])
def test_server_hostile_request_is_4xx_json(server, name, path, body):
    srv, _engine = server
    with httpx.Client(base_url=srv.url, timeout=httpx.Timeout(60.0)) as c:
        if body == b"text/plain":  # what a cross-site form or fetch without preflight sends
            r = c.post(path, content=b'{"prompt": "hi"}', headers={"content-type": "text/plain"})
        elif isinstance(body, bytes):
            r = c.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = c.post(path, json=body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["message"] and "Traceback" not in err["message"]


def test_server_edge_requests_are_answered_correctly_and_it_survives(server):
    srv, engine = server
    with httpx.Client(base_url=srv.url, timeout=httpx.Timeout(60.0)) as c:
        # A single-token prompt and a prompt one below the limit (room for one token): correct answers.
        for prompt in ["A", "a" * (LIMIT - 1)]:
            # max_tokens beyond the context is refused up front, naming the numbers ...
            r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 10**6, "temperature": 0})
            assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"], r.text
            # ... and exactly filling it is answered.
            room = LIMIT - len(prompt)
            r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": room, "temperature": 0})
            assert r.status_code == 200, r.text
            body = r.json()
            ids_ = engine.encode_prompt(prompt)
            n = body["usage"]["completion_tokens"]
            ref = generate(engine.model, engine.tokenizer, ids_, engine.method, SamplingParams(max_new_tokens=max(n, 1)))
            assert body["choices"][0]["text"] == ref.text
            assert body["usage"]["prompt_tokens"] + n <= LIMIT + 1
        assert c.get("/health").status_code == 200
