"""Memory planning: KV bytes by hand, the guard refuses before any work, `omnikv plan` CLI."""

import json
import subprocess
import sys

import pytest

from omnikv import OmniKVConfig, ResourceError
from omnikv.methods import memory
from omnikv.decoding.generation import SamplingParams, generate
from omnikv.methods import get_method
from omnikv.models.tiny import tiny_config


def test_kv_bytes_by_hand():
    cfg = tiny_config("llama", num_hidden_layers=6)  # 2 kv heads x 16 dims
    row = 2 * 2 * 16 * 4  # K+V, fp32
    full = memory.plan_memory(cfg, 1000, "full", dtype_bytes=4, max_new_tokens=24)
    assert full.device_kv_bytes == 6 * 1024 * row
    ocfg = OmniKVConfig(filter_layers=(1, 3), num_wait_layers=0, budget=100, sink_tokens=0, recent_tokens=0, offload=True)
    om = memory.plan_memory(cfg, 1000, get_method("omnikv", config=ocfg), dtype_bytes=4, max_new_tokens=24)
    # dense 0, filters 1 and 3 keep everything; sparse 2, 4, 5 keep 100 selected + 24 generated
    assert om.device_kv_bytes == 3 * 1024 * row + 3 * (100 + 24) * row
    assert om.host_kv_bytes == 3 * 1024 * row


def test_hybrid_sliding_layers_count_their_window_only():
    cfg = tiny_config("gemma3_text", num_hidden_layers=6)
    window = cfg.sliding_window
    row = 2 * 2 * 16 * 2
    p = memory.plan_memory(cfg, 4000, "full", dtype_bytes=2, max_new_tokens=0)
    assert p.device_kv_bytes == row * (3 * 4000 + 3 * window)


def test_check_fits_names_the_numbers_and_the_fix(monkeypatch):
    cfg = tiny_config("llama")
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 1000)
    plan = memory.plan_memory(cfg, 5000, "full", device="cpu")
    assert not plan.fits
    with pytest.raises(ResourceError, match=r"GiB of host memory.*try .*--method omnikv"):
        memory.check_fits(plan)


def test_session_refuses_before_prefill(monkeypatch, models):
    model = models("llama")
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 10)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ResourceError):
            generate(model, None, list(range(200)) * 8, get_method("full"), SamplingParams(max_new_tokens=2))
    finally:
        model._forward_pre_hooks.clear()
    assert calls == [], "the guard must refuse before any forward pass"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "omnikv", *args], capture_output=True, text=True, timeout=120)


def test_plan_cli_json_and_errors():
    # Host memory given: the answer must not depend on this machine's free memory (16 GiB of bank at 128K).
    r = run_cli("plan", "--model", "llama-3-8b", "--context", "128k", "--host-memory", "1TiB", "--json")
    assert r.returncode == 0, r.stderr
    rows = {(d["method"], d["offload"]): d for d in json.loads(r.stdout)}
    assert rows["full", False]["device_kv_bytes"] == 32 * 131328 * 2 * 8 * 128 * 2
    # the paper's setting: 8 dense of 32 layers + 6.7% on 24 sparse -> ~30% of full on the device
    assert 0.28 < rows["omnikv", True]["device_kv_share_of_full"] < 0.32
    assert rows["omnikv", False]["device_kv_share_of_full"] > 1  # offload off: the bank is on the device too
    for row in rows.values():
        assert row["prefill_peak_device_bytes"] >= row["weights_bytes"] + row["device_kv_bytes"]
        assert row["decode_device_bytes"] > row["weights_bytes"]
        assert row["max_context"] is None and row["fits_label"] == "?"  # no device memory known here
    # A host that cannot hold the Context Bank: the offload rows do not fit, whatever the device.
    r = run_cli("plan", "--model", "llama-3-8b", "--context", "128k", "--device-memory", "80GiB",
                "--host-memory", "4GiB", "--methods", "full,omnikv", "--json")
    small = {(d["method"], d["offload"]): d for d in json.loads(r.stdout)}
    assert small["omnikv", True]["fits_label"] == "NO" and small["full", False]["fits_label"] != "NO"
    for bad, msg in ((["--context", "1k", "--device-memory", "lots"], "bad memory size"),
                     (["--context", "1k", "--host-memory", "0"], "must be > 0"),
                     (["--context", "abc"], "not a token count"), (["--context", "0"], "> 0"),
                     (["--context", "1k", "--methods", "magic"], "unknown methods")):
        r = run_cli("plan", "--model", "llama-3-8b", *bad)
        assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr


def test_plan_longest_context_on_80gib_omnikv_offload_fits_3x_full():
    """The issue's target, from the plan: Llama-3-8B shapes on an 80 GiB device, the longest
    prompt OmniKV with offload fits (prefill peak included) is >= 3x full attention's."""
    r = run_cli("plan", "--model", "llama-3-8b", "--context", "128k", "--device-memory", "80GiB", "--host-memory", "1TiB", "--json")
    assert r.returncode == 0, r.stderr
    rows = {(d["method"], d["offload"]): d for d in json.loads(r.stdout)}
    full, omni = rows["full", False], rows["omnikv", True]
    assert omni["max_context"] >= 3 * full["max_context"] > 3 * 400_000
    assert omni["fits"] and omni["prefill_peak_device_bytes"] < full["prefill_peak_device_bytes"]
    assert rows["omnikv", False]["max_context"] < full["max_context"]  # the bank on the device costs more
    text = run_cli("plan", "--model", "llama-3-8b", "--context", "128k", "--device-memory", "80GiB", "--host-memory",
                   "1TiB").stdout
    assert "max context" in text and f"{omni['max_context']:,}" in text


def test_plan_longest_context_counts_the_host_memory_for_the_bank():
    """With offload the Context Bank grows in host memory: the longest context is the shorter of
    what the device and what the host hold (the same host figure `fits` uses); full attention,
    with nothing on the host, is unchanged."""
    def rows(host: str) -> dict:
        r = run_cli("plan", "--model", "llama-3-8b", "--context", "128k", "--device-memory", "80GiB",
                    "--host-memory", host, "--methods", "full,omnikv", "--json")
        assert r.returncode == 0, r.stderr
        return {(d["method"], d["offload"]): d for d in json.loads(r.stdout)}

    big, small = rows("1TiB"), rows("64GiB")
    assert small["full", False]["max_context"] == big["full", False]["max_context"]
    longest = small["omnikv", True]["max_context"]
    assert 0 < longest < big["omnikv", True]["max_context"]
    from omnikv.cli.cmd_plan import load_config
    from omnikv.methods.memory import plan_memory

    config, method = load_config("llama-3-8b"), get_method("omnikv", offload=True)
    cli = dict(device="cuda", dtype_bytes=2, max_new_tokens=256, prefill_chunk_size=4096)  # the CLI's defaults
    assert plan_memory(config, longest, method, **cli).host_total_bytes <= 64 * 2**30
    assert plan_memory(config, longest + 256, method, **cli).host_total_bytes > 64 * 2**30
