"""`omnikv bench`: parsing, synthetic fill, the interleaved run, records, CLI output, GPU script."""

import json
import sys
from pathlib import Path

import pytest
import torch

from omnikv.bench.run import BenchSpec, add_ratios, parse_context, parse_contexts, public_records, run_bench
from omnikv.methods.spec import parse_method
from omnikv.bench.fill import decode_step, first_token, synthetic_fill
from omnikv.bench.probe import StepBreakdown
from omnikv.algorithm.layers import SparseLayer
from omnikv.errors import ConfigError
from omnikv.methods import get_method

ROOT = Path(__file__).resolve().parent.parent
LAYERS, KV_HEADS, HEAD_DIM = 4, 2, 16  # tiny llama (omnikv.models.tiny defaults)
TOKEN_BYTES = 2 * KV_HEADS * HEAD_DIM * 4  # K and V of one token in one layer, fp32
OMNI = "omnikv:filter_layers=1:num_wait_layers=0:budget=80"  # plan: dense 0, filter 1, sparse 2, 3
pytestmark = pytest.mark.filterwarnings("ignore:no OmniKV preset")
REQUIRED = ("method", "context", "ms_per_token", "ratio_to_full", "device_kv_bytes", "host_kv_bytes", "h2d_bytes_per_step")


@pytest.fixture(scope="module")
def tiny(models):
    return models("llama")


def test_parse_context_and_methods():
    assert parse_context("8k") == 8192
    assert parse_context("1M") == 1048576
    assert parse_context("3000") == 3000
    assert parse_contexts("4k, 0.5k,100") == [4096, 512, 100]
    for bad in ("abc", "0", "1.5", "-4k"):
        with pytest.raises(ConfigError):
            parse_context(bad)
    m = parse_method("omnikv:offload=false:budget=2048:filter_layers=2/8/18:selector=uniform")
    assert (m.name, m.label) == ("omnikv", "omnikv:offload=false:budget=2048:filter_layers=2/8/18:selector=uniform")
    assert m.options == {"offload": False, "budget": 2048, "filter_layers": (2, 8, 18), "selector": "uniform"}
    assert parse_method("omnikv:filter_layers=3:budget=0.1").options == {"filter_layers": (3,), "budget": 0.1}
    with pytest.raises(ConfigError):
        parse_method("omnikv:offload")
    with pytest.raises(ConfigError):
        BenchSpec(methods=[parse_method("full"), parse_method("full")], contexts=[8])
    with pytest.raises(ConfigError):
        BenchSpec(methods=[parse_method("full")], contexts=[8], steps=0)


def test_synthetic_fill_sets_prompt_bookkeeping(tiny):
    """A synthetic fill must leave the cache exactly as a prefill of that length would."""
    method = get_method("omnikv", filter_layers=(1,), num_wait_layers=0, budget=80)
    cache = method.make_cache(tiny)
    synthetic_fill(tiny, cache, 300)
    assert cache.get_seq_length() == 300
    assert cache.state.prompt_len == 300
    tok = decode_step(tiny, cache, first_token(tiny))
    assert tok.shape == (1, 1)
    sparse = [i for i, layer in enumerate(cache.layers) if isinstance(layer, SparseLayer)]
    assert sparse == [2, 3]
    attended = cache.stats()["attended_tokens_per_layer"]
    # dense/filter layers see prompt + the new token; sparse layers the 80 selected + the new token
    assert attended == [301, 301, 81, 81]


def test_run_bench_synthetic_records_and_accounting(tiny):
    spec = BenchSpec(methods=[parse_method(x) for x in ("full", "full_prealloc", OMNI, OMNI + ":offload=true", "h2o")],
                     contexts=[200, 400], steps=4, warmup=2, breakdown_steps=2)
    records = public_records(run_bench(tiny, spec))
    assert [(r["context"], r["method"]) for r in records] == [
        (c, m.label) for c in (200, 400) for m in spec.methods]
    for r in records:
        assert all(k in r for k in REQUIRED)
        json.dumps(r)  # JSON-able
        if r["method_name"] == "h2o":  # needs prefill attention: skipped with a note
            assert r["ms_per_token"] is None and "skipped" in r["note"]
            continue
        seq = r["context"] + spec.warmup + spec.steps + spec.breakdown_steps  # tokens in the cache
        assert r["steps"] == 4 and r["ms_per_token"] > 0
        assert abs(r["tokens_per_s"] - 1000 / r["ms_per_token"]) <= 1e-3 * max(1.0, r["tokens_per_s"])
        if r["method"].startswith("full"):
            assert r["device_kv_bytes"] == LAYERS * seq * TOKEN_BYTES
            assert r["host_kv_bytes"] == 0
            assert r["breakdown_ms"]["selection"] == 0
        elif r["method"].endswith("offload=true"):
            # sparse layers 2, 3 keep every prompt row in the (host) bank: counted as host, not
            # device; their generated rows stay on the device until a new prompt forward
            assert r["host_kv_bytes"] == 2 * r["context"] * TOKEN_BYTES
            assert r["breakdown_ms"]["selection"] > 0 and r["breakdown_ms"]["gather"] > 0
        else:
            assert r["host_kv_bytes"] == 0
        assert r["h2d_bytes_per_step"] == 0  # CPU: nothing crosses a bus
        assert r["breakdown_ms"]["attention"] > 0
        assert r["peak_rss_bytes"] > 0 and r["peak_device_bytes"] is None
        ref = next(x for x in records if x["context"] == r["context"] and x["method"] == "full")
        assert r["ratio_to_full"] == pytest.approx(ref["ms_per_token"] / r["ms_per_token"], rel=1e-3)


def test_run_bench_real_prefill_runs_lossy_methods(tiny):
    spec = BenchSpec(methods=[parse_method("full"), parse_method("h2o:budget=64")], contexts=[150],
                     synthetic_kv=False, steps=3, warmup=1, breakdown_steps=0, prefill_chunk=64)
    full, h2o = public_records(run_bench(tiny, spec))
    assert full["fill"] == "prefill" and full["prefill_seconds"] > 0
    assert h2o["ms_per_token"] > 0 and h2o["note"] is None
    assert h2o["device_kv_bytes"] < full["device_kv_bytes"]  # H2O really evicted
    assert full["device_kv_bytes"] == LAYERS * (150 + 1 + 3) * TOKEN_BYTES
    assert full["breakdown_ms"] is None


def test_ratio_arithmetic():
    recs = [
        {"method": "full", "method_name": "full", "context": 8, "ms_per_token": 10.0, "_times": [10, 12, 8]},
        {"method": "x", "method_name": "omnikv", "context": 8, "ms_per_token": 4.0, "_times": [5, 3, 4]},
        {"method": "x", "method_name": "omnikv", "context": 16, "ms_per_token": 4.0, "_times": [4]},
    ]
    add_ratios(recs)
    assert recs[0]["ratio_to_full"] == 1.0
    assert recs[1]["ratio_to_full"] == 2.5
    assert recs[1]["ratio_to_full_paired"] == 2.0  # median of 10/5, 12/3, 8/4
    assert "ratio_to_full" not in recs[2]  # no full at that context


def test_breakdown_probe_restores_everything(tiny):
    import omnikv.algorithm.layers
    import omnikv.hf.layers
    import omnikv.offload.segment

    before = (omnikv.algorithm.layers.filter_scores, omnikv.hf.layers.sdpa_attention, omnikv.offload.segment.Segment.load)
    cache = get_method("full_prealloc").make_cache(tiny)
    probe = StepBreakdown()
    probe.install([cache])
    assert omnikv.hf.layers.sdpa_attention is not before[1]
    assert "update" in cache.__dict__
    synthetic_fill(tiny, cache, 50)
    decode_step(tiny, cache, first_token(tiny))
    parts = probe.take()
    probe.uninstall()
    assert parts["attention"] > 0 and parts["kv_update"] > 0 and parts["selection"] == 0
    assert (omnikv.algorithm.layers.filter_scores, omnikv.hf.layers.sdpa_attention, omnikv.offload.segment.Segment.load) == before
    assert "update" not in cache.__dict__


def test_cli_json_files_and_metadata(tmp_path, capsys):
    from omnikv.cli import main
    from omnikv.models.tiny import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    code = main(["bench", "--model", str(ckpt), "--methods", f"full,{OMNI}", "--contexts", "128,256",
                 "--synthetic-kv", "--steps", "3", "--warmup", "1", "--breakdown-steps", "1",
                 "--output-dir", str(out), "--json"])
    assert code == 0
    captured = capsys.readouterr()
    records = json.loads(captured.out)  # stdout holds the JSON list only
    assert [(r["method"], r["context"]) for r in records] == [("full", 128), (OMNI, 128), ("full", 256), (OMNI, 256)]
    assert "ms/tok" in captured.err  # the table went to stderr
    saved = json.loads((out / "bench.json").read_text())
    meta = saved["metadata"]
    assert meta["command"].startswith("omnikv bench") and "--synthetic-kv" in meta["command"]
    assert meta["versions"]["torch"] == torch.__version__ and meta["versions"]["transformers"]
    assert meta["host"]["cpu_count"] and meta["git"]["commit"]
    assert meta["spec"]["contexts"] == [128, 256]
    assert saved["records"] == records
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bad_input_is_one_line_error(capsys):
    from omnikv.cli import main

    assert main(["bench", "--model", "/nonexistent/dir", "--contexts", "8q"]) == 2
    assert "bad context length" in capsys.readouterr().err


def test_gpu_script_without_cuda_says_where_to_run_it(tmp_path, capsys):
    """Without CUDA the GPU script stops at once with what to do (its CPU rehearsal, with a fake
    torch.cuda, is tests/test_gpu_rehearsal.py)."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
    import gpu_bench

    assert gpu_bench.main(["--out", str(tmp_path), "--tiny"]) == 2
    assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "summary.json").exists()


def test_bench_records_selection_telemetry():
    """`omnikv:telemetry=true` puts the per-layer coverage of the selection in the bench record."""
    from omnikv.models.tiny import tiny_model

    spec = BenchSpec(
        methods=[parse_method("omnikv:telemetry=true:filter_layers=1:num_wait_layers=0:budget=32:sink_tokens=2:recent_tokens=4")],
        contexts=[256], synthetic_kv=True, steps=3, warmup=1, breakdown_steps=0,
    )
    (rec,) = public_records(run_bench(tiny_model("llama"), spec))
    tel = rec["telemetry"]
    assert set(tel["layers"]) == {"2", "3"} and 0 < tel["mean_coverage"] <= 1


def test_a_method_that_fails_does_not_spoil_the_others(monkeypatch):
    """Out of memory in one method's timed steps, any error in another's fill (`keep_going`, as
    the one-shot GPU run uses): both recorded with their reason, the third method timed."""
    from omnikv.bench import run as bench_run
    from omnikv.methods.omnikv import OmniKV
    from omnikv.methods.spec import parse_methods
    from omnikv.models.tiny import tiny_model

    real_step = bench_run._step

    def step(model, run, tok):
        if run.spec.name == "full_prealloc" and len(run.times) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(model, run, tok)

    def make_cache(self, model):
        raise RuntimeError("not capturable: a stream was captured")

    monkeypatch.setattr(bench_run, "_step", step)
    monkeypatch.setattr(OmniKV, "make_cache", make_cache)
    spec = BenchSpec(methods=parse_methods("full,full_prealloc,omnikv:budget=32"), contexts=[128], steps=3,
                     warmup=1, breakdown_steps=1, keep_going=True)
    full, pre, omni = public_records(run_bench(tiny_model("llama"), spec))
    assert full["ms_per_token"] and full["steps"] == 3 and full["breakdown_ms"]
    assert pre["ms_per_token"] is None and pre["note"].startswith("out of memory at timed step 1")
    assert omni["ms_per_token"] is None and omni["note"] == "failed at fill: RuntimeError: not capturable: a stream was captured"
    with pytest.raises(RuntimeError, match="not capturable"):  # without keep_going: only out of memory is tolerated
        run_bench(tiny_model("llama"), BenchSpec(methods=parse_methods("full,omnikv"), contexts=[128], steps=1,
                                                 warmup=0, breakdown_steps=0))


def test_one_budget_for_every_budgeted_method():
    """Without --budget every budgeted method gets BENCH_DEFAULT_BUDGET; a per-method budget is
    kept but flagged in the table's first line."""
    from omnikv.bench.report import budget_line
    from omnikv.bench.run import BENCH_DEFAULT_BUDGET, budget_plan

    spec = BenchSpec(methods=[parse_method(m) for m in ("full", "omnikv", "quest")], contexts=[64])
    plan = budget_plan(spec)
    assert plan.budgets == {"full": None, "omnikv": BENCH_DEFAULT_BUDGET, "quest": BENCH_DEFAULT_BUDGET}
    assert not plan.unequal and plan.warning() is None
    spec = BenchSpec(methods=[parse_method(m) for m in ("full", "omnikv", "quest:budget=64")], contexts=[64],
                     budget=0.1)
    plan = budget_plan(spec)
    assert plan.budgets == {"full": None, "omnikv": 0.1, "quest:budget=64": 64} and plan.unequal
    assert "DIFFERENT budgets" in plan.warning()
    recs = [{"method": label, "budget": b} for label, b in plan.budgets.items()]
    assert budget_line(recs).startswith("WARNING: methods ran at DIFFERENT budgets (omnikv 0.1, quest:budget=64 64)")
    assert budget_line(recs[:2]).startswith("budget of every budgeted method: 0.1")
    from omnikv.bench.run import build_method

    # Without a plan's budget (benchmarks/gpu/stages.py builds one cache this way) the spec's own counts.
    assert build_method(parse_method("h2o:budget=64"), None).budget == 64
    assert build_method(parse_method("h2o:budget=64"), 0.2).budget == 0.2


def test_a_result_file_is_replaced_whole_never_rewritten_in_place(tmp_path, monkeypatch):
    """The GPU run rewrites summary.json after every stage and may be killed at any moment (run.sh's
    timeout). Writing in place truncates first, so a kill leaves the file empty or torn and every
    stage before is lost. The new version must appear only by a rename of a complete file: at that
    moment the old version is still there, whole, and the new one is complete beside it."""
    import os

    from omnikv.bench import report

    path = tmp_path / "summary.json"
    report.write_json_atomic(path, {"version": 1, "rows": list(range(1000))})
    seen = []
    real_replace = os.replace

    def watching_replace(src, dst):
        # The last moment a kill could come before the new version is in place.
        seen.append((json.loads(Path(dst).read_text())["version"], json.loads(Path(src).read_text())["version"]))
        real_replace(src, dst)

    monkeypatch.setattr(report.os, "replace", watching_replace)
    report.write_json_atomic(path, {"version": 2, "rows": list(range(1000))})
    assert seen == [(1, 2)]
    assert json.loads(path.read_text())["version"] == 2 and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
