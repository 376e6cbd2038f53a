"""One source of truth: lazy top-level exports, the preset resolver, the Budget rule, methods that
own their capabilities and memory plans, the shared stop matcher and masked softmax."""

import json
import subprocess
import sys
import warnings

import pytest
import torch

from omnikv import ConfigError
from omnikv.budget import Budget, parse_budget
from omnikv.methods import available_methods, get_method, method_class, methods_taking
from omnikv.models.tiny import tiny_config


# -- package surface ------------------------------------------------------------------------------


def test_core_imports_do_not_pull_in_transformers():
    code = (
        "import sys, omnikv.algorithm.selection, omnikv.config, omnikv.budget, omnikv.algorithm.roles\n"
        "heavy = [m for m in ('transformers', 'omnikv.algorithm.cache', 'omnikv.models', 'omnikv.decoding.generation') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_readme_names_are_importable_from_the_top_level():
    import omnikv

    for name in ("load_model", "generate", "SamplingParams", "Session", "get_method", "available_methods",
                 "OmniKVCache", "OmniKVConfig", "preset_for_model", "teacher_forced_logits", "Budget"):
        assert name in omnikv.__all__ and name in dir(omnikv)
        assert getattr(omnikv, name) is not None
    from omnikv.decoding.generation import Session
    from omnikv.models import load_model

    assert omnikv.Session is Session and omnikv.load_model is load_model
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        omnikv.nope  # noqa: B018


# -- Budget ---------------------------------------------------------------------------------------


def test_budget_one_rule_for_ints_and_fractions():
    assert Budget.parse("1.0").tokens(500) == 500  # the whole prompt, in every command
    assert Budget.parse("1").tokens(500) == 1
    assert Budget(0.1).tokens(95) == 10  # rounded up
    assert Budget(300).tokens(200) == 200 and Budget(300).tokens(200, clip=False) == 300
    assert Budget(8).tokens(100, floor=68) == 68
    assert Budget(8).tokens(0) == 0
    assert parse_budget("256") == 256 and isinstance(parse_budget("0.5"), float)
    for bad in ("0", "-3", "1.5", "abc", "nan", "inf"):
        with pytest.raises(ConfigError, match="budget"):
            Budget.parse(bad)
    for bad in (0, 1.5, True, "10"):
        with pytest.raises(ConfigError, match="budget"):
            Budget(bad)


def test_every_budget_consumer_uses_the_same_rule():
    from omnikv.config import OmniKVConfig

    cfg = OmniKVConfig(budget=0.3, sink_tokens=2, recent_tokens=3)
    for n in (1, 7, 100, 1001):
        assert cfg.resolve_budget(n) == Budget(0.3).selected(n, sink=2, recent=3) == Budget(0.3).tokens(n, floor=5)


def test_plan_budget_one_means_the_whole_prompt():
    def plan(budget):
        r = subprocess.run([sys.executable, "-m", "omnikv", "plan", "--model", "llama-3-8b", "--context", "4k",
                            "--methods", "omnikv", "--budget", budget, "--json"], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)[0]

    whole, one = plan("1.0"), plan("1")
    assert "4096 selected tokens" in whole["notes"][0] and "1 selected tokens" in one["notes"][0]
    r = subprocess.run([sys.executable, "-m", "omnikv", "plan", "--model", "llama-3-8b", "--context", "4k",
                        "--budget", "1.5"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "(0, 1]" in r.stderr and "Traceback" not in r.stderr


# -- presets --------------------------------------------------------------------------------------


def test_get_method_takes_a_preset_name_or_a_file(tmp_path):
    from omnikv.algorithm.presets import PRESETS, resolve_preset

    smol = next(p for p in PRESETS if p.name == "smollm2-135m")
    method = get_method("omnikv", preset="smollm2-135m")
    assert method.base == smol.config
    assert get_method("omnikv", preset="smollm2-135m", budget=0.2).base.budget == 0.2
    path = tmp_path / "p.json"
    path.write_text(json.dumps({**smol.config.to_dict(), "model_type": "llama", "num_layers": 30}))
    cfg, made_for = resolve_preset(str(path))
    assert cfg.filter_layers == smol.config.filter_layers and made_for == {"model_type": "llama", "num_layers": 30}
    with pytest.raises(ConfigError, match=r"neither a built-in preset \(llama-3-8b-paper"):
        get_method("omnikv", preset="smollm2")
    with pytest.raises(ConfigError, match="does not exist"):
        get_method("omnikv", preset=str(tmp_path / "missing.json"))


def test_analysis_reads_a_preset_name():
    from omnikv.analysis.session import load_preset_settings

    s = load_preset_settings("gemma3-270m")
    assert s["filter_layers"] == [5] and s["budget"] == 1024


def test_eval_runner_resolves_a_preset_name(tmp_path):
    from omnikv.eval.runner import EvalConfig

    cfg = EvalConfig(model="m", methods=["omnikv"], tasks=["passkey"], lengths=[100], output=tmp_path,
                     method_options={"omnikv": {"preset": "smollm2-135m"}})
    opts = cfg.method_options["omnikv"]
    assert get_method("omnikv", **opts).base.filter_layers == (3, 14, 21)


# -- methods own their capabilities ---------------------------------------------------------------


def test_method_capabilities_are_declared_by_the_methods():
    caps = {n: (method_class(n).takes_budget, method_class(n).needs_real_prefill, method_class(n).lossy)
            for n in available_methods()}
    assert caps == {
        "full": (False, False, False), "full_offload": (False, False, False), "full_prealloc": (False, False, False),
        "omnikv": (True, False, False), "quest": (True, False, False), "streaming_llm": (True, False, True),
        "h2o": (True, True, True), "snapkv": (True, True, True), "kvpress": (True, True, True),
        "infllm": (True, True, False), "tidaldecode": (True, False, False),
    }
    assert methods_taking("filter_layers") == ["omnikv"]
    assert methods_taking("sink_tokens") == ["h2o", "infllm", "omnikv", "streaming_llm"]


def test_the_registry_finds_every_method_module():
    """No list of modules to keep in step: every module of omnikv/methods that registers a method
    is imported by the registry, and every registered method comes from one of them."""
    import ast
    from pathlib import Path

    import omnikv.methods as registry

    folder = Path(registry.__file__).parent
    registering = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "register":
                registering.add(f"omnikv.methods.{path.stem}")
    assert registering and registering <= set(registry.method_modules())
    assert {method_class(n).__module__ for n in available_methods()} == registering


def test_a_new_method_module_needs_no_other_edit(tmp_path, monkeypatch):
    import omnikv.methods as registry

    (tmp_path / "toy_method.py").write_text(
        "from dataclasses import dataclass\n"
        "from omnikv.methods import register\n"
        "from omnikv.methods.base import Method\n\n\n"
        "@register('toy')\n@dataclass(eq=False)\nclass Toy(Method):\n"
        "    takes_budget = False\n\n    def make_cache(self, model):\n        raise NotImplementedError\n"
    )
    monkeypatch.setattr(registry, "__path__", [*registry.__path__, str(tmp_path)])
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_loaded", False)
    try:
        assert "toy" in available_methods() and get_method("toy").name == "toy"
        with pytest.raises(ConfigError, match="registered twice"):
            registry.register("full")(method_class("toy"))
    finally:
        sys.modules.pop("omnikv.methods.toy_method", None)


def test_static_and_compile_are_method_fields():
    for name in available_methods():
        assert {"static", "compile", "compile_backend", "compile_mode"} <= method_class(name).option_names()
    m = get_method("full_prealloc", compile_backend="aot_eager")
    assert (m.static, m.compile, m.compile_backend) == (True, True, "aot_eager")
    assert not get_method("full_prealloc").static
    with pytest.raises(ConfigError, match="static must be true or false"):
        get_method("omnikv", static="yes")


def test_each_small_concept_has_one_owner():
    """What the package decides in one place stays there (the scattered copies these replaced
    had drifted: some config lookups without decoder=True, some scaling lookups without a
    default)."""
    from pathlib import Path

    import omnikv

    root = Path(omnikv.__file__).parent
    sources = {str(p.relative_to(root)): p.read_text() for p in root.rglob("*.py")}

    def where(needle: str) -> list[str]:
        return sorted(name for name, text in sources.items() if needle in text)

    assert where("get_text_config(") == ["hf/compat.py"]  # text_config / text_shape
    assert where("def check_int") == ["errors.py"]
    assert where('kwargs.get("scaling")') == ["hf/attention.py"]  # scaling_of
    assert where('("last", "softmax_last")') == ["config.py"]  # QUERY_SELECTORS
    assert where("def keys(") == ["hf/layers.py"]  # ManagedLayer.keys over kv_view()
    assert where("floor=") == ["budget.py"]  # Budget.selected: the floor rule


MAX_FUNCTION_LINES = 80


def _long_functions(root: str, limit: int) -> list[str]:
    """Functions of the package longer than `limit` lines whose body does not open with a comment
    saying why (a `# long:` line right after the signature/docstring)."""
    import ast
    import pathlib

    found = []
    for path in sorted(pathlib.Path(root).rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            if length <= limit:
                continue
            body_head = lines[node.lineno - 1:node.body[0].end_lineno + 2]
            if not any(line.strip().startswith("# long:") for line in body_head):
                found.append(f"{path}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_functions_are_short_or_say_why(tmp_path):
    """A function a newcomer reads in one screen; a longer one says why it is not split."""
    import omnikv

    package = str(__import__("pathlib").Path(omnikv.__file__).parent)
    assert _long_functions(package, MAX_FUNCTION_LINES) == []
    # the check itself sees a long function and accepts one that says why
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "bad.py").write_text(f"def long():\n{body}\n")
    (tmp_path / "ok.py").write_text(f"def long():\n    # long: one table, read top to bottom\n{body}\n")
    assert [f.split()[1] for f in _long_functions(str(tmp_path), MAX_FUNCTION_LINES)] == ["long"]
    assert all("bad.py" in f for f in _long_functions(str(tmp_path), MAX_FUNCTION_LINES))


def test_methods_validate_their_fields():
    with pytest.raises(ConfigError, match="page_size"):
        get_method("quest", page_size=0)
    with pytest.raises(ConfigError, match="kernel_size"):
        get_method("snapkv", kernel_size=4)
    with pytest.raises(ConfigError, match="bad options for method 'h2o': window_size"):
        get_method("h2o", window_size=3)
    with pytest.raises(ConfigError, match="unknown omnikv options"):
        get_method("omnikv", page_size=16)
    assert get_method("quest").budget == get_method("h2o").budget == 0.067  # OmniKV's default


def test_each_method_plans_its_own_kv():
    from omnikv.methods import memory

    cfg = tiny_config("llama", num_hidden_layers=6)  # 2 KV heads x 16 dims
    row = 2 * 2 * 16 * 2
    ctx, new = 1000, 24
    full = row * 6 * (ctx + new)

    def kv(name, **opts):
        p = memory.plan_memory(cfg, ctx, get_method(name, **opts), dtype_bytes=2, max_new_tokens=new, device="cuda")
        return p.device_kv_bytes, p.host_kv_bytes

    assert kv("full") == kv("full_prealloc") == (full, 0)
    assert kv("full_offload") == (2 * row * (ctx + new), full)
    # Quest: 4 budgeted layers (index >= 2), min + max key rows per 16-token page
    pages = -(-(ctx + new) // 16)
    assert kv("quest") == (full + 4 * 2 * (row // 2) * pages, 0)
    assert kv("quest", page_size=32, dense_layers=4)[0] == full + 2 * 2 * (row // 2) * -(-(ctx + new) // 32)
    for name in ("streaming_llm", "h2o", "snapkv"):
        assert kv(name, budget=100) == (full, 0)  # the peak: the whole prompt before the first decode step
    # InfLLM: every row + one representative key row per 16-token block of the prompt, every layer
    assert kv("infllm", budget=100) == (full + 6 * (row // 2) * -(-ctx // 16), 0)
    # TidalDecode (default selection layers 2 and 4 of 6): every row + the working buffer (100
    # selected + 24 generated rows) of the 2 sparse layers, 3 and 5
    assert kv("tidaldecode", budget=100) == (full + 2 * row * (100 + new), 0)
    notes = memory.plan_memory(cfg, ctx, get_method("snapkv", budget=100), max_new_tokens=new).notes
    steady = row // 2 * 6 * (100 + new) * 2  # fp32 plan: 4 bytes
    assert f"{steady / memory.GiB:.3f} GiB" in notes[0]


def test_summaries_come_from_the_method():
    from omnikv.config import OmniKVConfig

    omni = get_method("omnikv", config=OmniKVConfig(filter_layers=(1,), num_wait_layers=0, budget=64, sink_tokens=0, recent_tokens=0))
    line = omni.summarize({"layer_roles": ["dense", "filter", "sparse", "sparse"], "selected_tokens": 64,
                           "prompt_tokens": 300}, omni.describe())
    assert line == "filter layers [1], budget 64, sparse layers [2, 3] attend 64 of 300 prompt tokens"
    assert get_method("h2o", budget=32).summarize({}, get_method("h2o", budget=32).describe()) == "budget 32"
    full = get_method("full")
    assert full.summarize({}, full.describe()) == "transformers DynamicCache"


def test_cli_refuses_flags_a_method_does_not_take():
    from omnikv.cli import common

    import argparse

    args = argparse.Namespace(method="full", budget=None, sink_tokens=4)
    with pytest.raises(ConfigError, match="--sink-tokens configure the h2o, infllm, omnikv, streaming_llm methods only"):
        common.build_method(args)
    args = argparse.Namespace(method="omnikv", budget=64, preset="gemma3-270m")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert common.build_method(args).base.budget == 64


# -- shared helpers -------------------------------------------------------------------------------


@pytest.mark.parametrize("pieces", [["ab", "c\nUs", "er: x"], ["abc\n", "User", ":", " x"], ["abc\nUser: x"]])
def test_stop_matcher_streams_and_scans_alike(pieces):
    from omnikv.decoding.stops import StopMatcher

    m = StopMatcher(["\nUser:"])
    streamed = "".join(m.feed(p) for p in pieces) + m.flush()
    cut, safe = StopMatcher(["\nUser:"]).scan("".join(pieces))
    assert streamed == "abc" and (cut, safe) == (3, 3)
    assert StopMatcher(["\nUser:"]).scan("abc\nUs") == (None, 3)  # a tail that may start a stop waits
    assert StopMatcher([]).scan("abc") == (None, 3)


def test_masked_softmax_matches_a_plain_reference():
    from omnikv.hf.attention import attention_probs, masked_softmax

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 3, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    mask = torch.rand(2, 1, 3, 5, generator=g) > 0.3
    mask[0, 0, 1] = False  # a row with nothing to attend -> zeros
    probs = attention_probs(q, k, mask, 0.5)  # (B, Hk, g, q, n)
    for h in range(4):
        logits = q[:, h] @ k[:, h // 2].transpose(-1, -2) * 0.5
        ref = torch.softmax(logits.masked_fill(~mask[:, 0], float("-inf")), dim=-1).nan_to_num(0.0)
        torch.testing.assert_close(probs[:, h // 2, h % 2], ref)
    assert probs[0, :, :, 1].abs().sum() == 0
    x = torch.randn(3, 4, generator=g)
    torch.testing.assert_close(masked_softmax(x, None), torch.softmax(x, dim=-1))
