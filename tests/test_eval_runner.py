"""The eval runner and `omnikv eval` end to end on a tiny random checkpoint: outputs, resume,
shards + merge; plus the pure helpers (length / shard parsing, aggregation, summary)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omnikv.cli import main
from omnikv.errors import ConfigError
from omnikv.eval import report
from omnikv.eval.metrics import score_sample
from omnikv.eval.runner import EvalConfig, parse_length, parse_shard, read_predictions, record_key

pytestmark = pytest.mark.filterwarnings("ignore:no OmniKV preset")

ARGS = ["--methods", "full,omnikv", "--tasks", "passkey", "--lengths", "300", "--samples", "2",
        "--budget", "0.5", "--max-new-tokens", "3", "--no-progress"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from omnikv.models.tiny import make_tiny_checkpoint

    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def full_run(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["eval", "--model", ckpt, "--output", str(out), "--fidelity", *ARGS]) == 0
    return out


def _keys(path):
    return sorted(record_key(r) for r in read_predictions(path / "predictions.jsonl"))


def test_outputs(full_run):
    records = read_predictions(full_run / "predictions.jsonl")
    assert len(records) == 4  # 2 methods x 1 task x 1 length x 2 samples
    assert {(r["method"], r["sample_id"]) for r in records} == {
        (m, f"passkey-300-0-{i}") for m in ("full", "omnikv") for i in (0, 1)}
    for r in records:
        assert r["prompt_tokens"] == 300 and r["length"] == 300
        assert r["score"] == score_sample(r["metric"], r["prediction"], r["answers"], r["metadata"])
        assert len(r["budget_report"]["attended_tokens_per_layer"]) == 4
        assert r["budget_report"]["device_kv_share"] > 0
        assert r["config"]["method"] == r["method"]
    omni = [r for r in records if r["method"] == "omnikv"]
    assert all(r["budget"] == 0.5 and 0 <= r["fidelity"]["greedy_agreement"] <= 1 for r in omni)
    assert all(r["fidelity"]["mean_kl"] >= 0 for r in omni)
    # Sparse layers attend to fewer tokens than the sequence.
    assert all(min(r["budget_report"]["attended_tokens_per_layer"]) < r["stats"]["seq_length"] for r in omni)

    metrics = json.loads((full_run / "metrics.json").read_text())
    assert {(row["method"], row["n"]) for row in metrics["rows"]} == {("full", 2), ("omnikv", 2)}
    for row in metrics["rows"]:
        mine = [r["score"] for r in records if r["method"] == row["method"]]
        assert row["score"] == pytest.approx(100 * sum(mine) / len(mine))
    summary = (full_run / "summary.md").read_text()
    assert "| task | length | full | omnikv |" in summary and "| passkey (n=2) | 300 |" in summary
    assert "Paired against full attention" in summary
    assert (full_run / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = json.loads((full_run / "run.json").read_text())
    assert run["args"]["methods"] == ["full", "omnikv"] and run["new_records"] == 4
    assert set(run["versions"]) >= {"torch", "transformers", "omnikv"}
    assert run["hardware"]["cpu_count"] >= 1 and "platform" in run["hardware"]
    # Run from this checkout: the commit; installed as a package: its version (tests/test_packaging.py).
    assert run["code_version"] == f"git {run['git_commit']}" and set(run["methods"]) == {"full", "omnikv"}


def test_resume_does_no_new_work(full_run, ckpt):
    before = (full_run / "predictions.jsonl").read_text()
    assert main(["eval", "--model", ckpt, "--output", str(full_run), "--fidelity", *ARGS]) == 2  # needs --resume
    assert main(["eval", "--model", ckpt, "--output", str(full_run), "--fidelity", "--resume", *ARGS]) == 0
    assert (full_run / "predictions.jsonl").read_text() == before
    assert json.loads((full_run / "run.json").read_text())["new_records"] == 0


def test_resume_after_a_crash_redoes_only_missing(full_run, ckpt, tmp_path):
    lines = (full_run / "predictions.jsonl").read_text().splitlines()
    (tmp_path / "predictions.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])  # torn last line
    (tmp_path / "run.json").write_text((full_run / "run.json").read_text())
    assert main(["eval", "--model", ckpt, "--output", str(tmp_path), "--fidelity", "--resume", *ARGS]) == 0
    assert json.loads((tmp_path / "run.json").read_text())["new_records"] == 1
    assert _keys(tmp_path) == _keys(full_run)


def test_a_predictions_file_replaced_mid_run_keeps_every_record(full_run, ckpt, tmp_path, monkeypatch):
    """git stash / checkout / pull rewrite a tracked file as a new file (a new inode): a run that held
    predictions.jsonl open would go on writing into the unlinked old one and lose every later
    record. Replaced after the first record, the file still ends with all of them."""
    import os

    import omnikv.decoding.generation as generation

    real, calls = generation.generate, {"n": 0}
    pred = tmp_path / "predictions.jsonl"

    def replacing_after_the_first(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the first record is written: replace the file as git does
            copy = tmp_path / "predictions.jsonl.new"
            copy.write_bytes(pred.read_bytes())
            inode = pred.stat().st_ino
            os.replace(copy, pred)
            assert pred.stat().st_ino != inode
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "generate", replacing_after_the_first)
    assert main(["eval", "--model", ckpt, "--output", str(tmp_path), "--fidelity", *ARGS]) == 0
    assert calls["n"] >= 4 and _keys(tmp_path) == _keys(full_run)
    assert json.loads((tmp_path / "metrics.json").read_text())["rows"][0]["n"] == 2


def test_shards_merge_to_the_unsharded_run(full_run, ckpt, tmp_path):
    for i in (0, 1):
        assert main(["eval", "--model", ckpt, "--output", str(tmp_path / f"s{i}"), "--shard", f"{i}/2",
                     "--fidelity", *ARGS]) == 0
    s0, s1 = _keys(tmp_path / "s0"), _keys(tmp_path / "s1")
    assert s0 and s1 and not set(s0) & set(s1)
    assert main(["eval", "merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--output", str(tmp_path / "m")]) == 0
    assert _keys(tmp_path / "m") == _keys(full_run)
    merged = {record_key(r): r["prediction"] for r in read_predictions(tmp_path / "m" / "predictions.jsonl")}
    ref = {record_key(r): r["prediction"] for r in read_predictions(full_run / "predictions.jsonl")}
    assert merged == ref  # greedy decoding is deterministic
    m = json.loads((tmp_path / "m" / "metrics.json").read_text())
    timing_free = lambda rows: [{k: v for k, v in r.items() if k != "decode_tokens_per_second"} for r in rows]
    assert timing_free(m["rows"]) == timing_free(json.loads((full_run / "metrics.json").read_text())["rows"])
    # --merge spelling, merging a directory twice does not duplicate records.
    assert main(["eval", "--merge", str(tmp_path / "m"), str(tmp_path / "s0"), "--output", str(tmp_path / "m2")]) == 0
    assert _keys(tmp_path / "m2") == _keys(full_run)


def test_cli_errors(tmp_path, capsys):
    assert main(["eval", "--output", str(tmp_path), "--tasks", "passkey"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["eval", "--model", "x", "--output", str(tmp_path), "--tasks", "nope"]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert main(["eval", "merge", str(tmp_path / "none"), "--output", str(tmp_path / "o")]) == 2
    assert main(["eval", "--model", "x", "--output", str(tmp_path), "--shard", "2/2"]) == 2


def test_parse_length_and_shard():
    assert parse_length("4k") == 4096 and parse_length("1.5k") == 1536 and parse_length("2000") == 2000
    assert parse_shard("1/4") == (1, 4)
    for bad in ("", "2x", "0", "1.3"):
        with pytest.raises(ConfigError):
            parse_length(bad)
    with pytest.raises(ConfigError):
        parse_shard("4/4")


def test_config_puts_full_first_for_fidelity(tmp_path):
    cfg = EvalConfig(model="m", methods=["omnikv"], tasks=["2stage"], lengths=[100], output=tmp_path, fidelity=True)
    assert cfg.run_methods() == ["full", "omnikv"] and cfg.tasks == ["two_stage_retrieval"]
    cfg = EvalConfig(model="m", methods=["omnikv", "full"], tasks=["passkey"], lengths=[100], output=tmp_path)
    assert cfg.run_methods() == ["full", "omnikv"]


def _rec(method, task, length, sid, score, **extra):
    return dict(method=method, task=task, length=length, sample_id=sid, score=score, metric="m", **extra)


def test_aggregate_and_summary_by_hand():
    records = [_rec("full", "a", 100, "0", 1.0), _rec("full", "a", 100, "1", 0.0),
               _rec("omnikv", "a", 100, "0", 1.0, fidelity={"greedy_agreement": 0.5, "top1_agreement": 1.0,
                                                            "mean_kl": 0.25}),
               _rec("full", "b", 100, "0", 0.5), _rec("omnikv", "b", 100, "0", 0.0)]
    m = report.aggregate(records)
    rows = {(r["method"], r["task"]): r for r in m["rows"]}
    assert rows[("full", "a")]["score"] == 50.0 and rows[("full", "a")]["n"] == 2
    assert rows[("omnikv", "a")]["greedy_agreement"] == 0.5 and rows[("full", "a")]["greedy_agreement"] is None
    assert m["average"] == {"full": {"100": 50.0}, "omnikv": {"100": 50.0}}
    md = report.summary_markdown(m)
    # Wilson 95% of 1/2: 9.5-90.5; of 1/1: 20.7-100; bootstrap of the single 0.5: 50-50
    assert "| a (n=2) | 100 | 50.0 (9-91) | 100.0 (21-100) |" in md and "| b (n=1) | 100 | 50.0 (50-50) | 0.0 (0-79) |" in md
    assert rows[("full", "a")]["interval"] == "wilson" and rows[("full", "b")]["interval"] == "bootstrap"
    paired = {(p["method"], p["task"], p["length"]): p for p in m["paired"]}
    assert set(paired) == {("omnikv", "a", 100), ("omnikv", "b", 100), ("omnikv", "*", 0)}
    assert (paired[("omnikv", "a", 100)]["same"], paired[("omnikv", "b", 100)]["worse"]) == (1, 1)
    assert paired[("omnikv", "*", 0)]["n"] == 2 and paired[("omnikv", "*", 0)]["mean_diff"] == -25.0
    assert "| omnikv | * | all | 2 | 1 | 0 | 1 | 1.000 | -25.0" in md
    assert "| **average** | 100 | 50.0 | 50.0 |" in md
    assert "| a | 100 | omnikv | 0.500 | 1.000 | 0.2500 |" in md


def test_chinese_note_and_dataset_task(ckpt, tmp_path, capsys):
    from omnikv.eval.metrics import CHINESE_TOKENIZATION

    data = tmp_path / "lb"
    data.mkdir()
    (data / "multifieldqa_zh.jsonl").write_text(json.dumps(
        {"input": "首都？", "context": "北京是首都。" * 5, "answers": ["北京"], "length": 30,
         "dataset": "multifieldqa_zh", "language": "zh", "all_classes": None, "_id": "z1"}, ensure_ascii=False) + "\n")
    out = tmp_path / "out"
    assert main(["eval", "--model", ckpt, "--methods", "full", "--tasks", "longbench:multifieldqa_zh",
                 "--data-dir", str(data), "--lengths", "60", "--samples", "1", "--max-new-tokens", "2",
                 "--output", str(out), "--no-progress"]) == 0
    (rec,) = read_predictions(out / "predictions.jsonl")
    assert rec["task"] == "longbench:multifieldqa_zh" and rec["metric"] == "qa_f1_zh" and rec["sample_id"] == "z1"
    assert rec["prompt_tokens"] <= 60 and rec["metadata"]["truncated"]
    run = json.loads((out / "run.json").read_text())
    assert run["chinese_tokenization"] == CHINESE_TOKENIZATION
    if CHINESE_TOKENIZATION == "characters":
        assert "jieba is not installed" in capsys.readouterr().err and run["notes"]


def test_method_variants_run_side_by_side(ckpt, tmp_path):
    """`name:key=value` specs run as methods of their own, labelled as written, with their options
    (the spec's budget overrides --budget) reaching the method."""
    out = tmp_path / "variants"
    args = ["eval", "--model", ckpt, "--output", str(out), "--methods", "omnikv,omnikv:budget=1.0:selector=uniform",
            "--tasks", "passkey", "--lengths", "300", "--samples", "1", "--budget", "0.5",
            "--max-new-tokens", "2", "--no-progress"]
    assert main(args) == 0
    recs = {r["method"]: r for r in read_predictions(out / "predictions.jsonl")}
    assert set(recs) == {"omnikv", "omnikv:budget=1.0:selector=uniform"}
    variant = recs["omnikv:budget=1.0:selector=uniform"]
    assert variant["budget"] == 1.0 and variant["config"]["selector"] == "uniform"
    assert recs["omnikv"]["budget"] == 0.5 and recs["omnikv"]["config"]["selector"] == "last"
    with pytest.raises(ConfigError, match="key=value"):
        EvalConfig(model="m", methods=["omnikv:uniform"], tasks=["passkey"], lengths=[100], output=tmp_path)


def test_context_check_counts_the_capped_generation(ckpt, tmp_path, capsys):
    """A prompt that fills the model's context (4096) up to the --max-new-tokens cap runs; without
    the cap the task's own generation length does not fit and the error says what to drop."""
    base = ["eval", "--model", ckpt, "--methods", "full", "--tasks", "passkey", "--lengths", "4094",
            "--samples", "1", "--no-progress"]
    assert main([*base, "--output", str(tmp_path / "uncapped")]) == 2
    assert "drop that length" in capsys.readouterr().err
    assert main([*base, "--output", str(tmp_path / "capped"), "--max-new-tokens", "2"]) == 0
    (rec,) = read_predictions(tmp_path / "capped" / "predictions.jsonl")
    assert rec["prompt_tokens"] == 4094 and rec["generated_tokens"] <= 2


def test_accelerate_launch_shards_and_merges(full_run, ckpt, tmp_path, monkeypatch, capsys):
    """Under a launcher (RANK / WORLD_SIZE / LOCAL_RANK, as accelerate launch and torchrun set
    them) each process runs its shard into OUTPUT/shard-i-of-n and the last one to finish merges:
    the merged records are those of the single-process run. The processes are run one after the
    other here; the first one finds the second not done and does not merge."""
    out = tmp_path / "launched"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        assert main(["eval", "--model", ckpt, "--output", str(out), "--fidelity", *ARGS]) == 0
        said = capsys.readouterr().out
        if rank == 0:
            assert "the last shard to finish merges" in said and not (out / "predictions.jsonl").exists()
    assert _keys(out / "shard-0-of-2") and _keys(out / "shard-1-of-2")
    assert not set(_keys(out / "shard-0-of-2")) & set(_keys(out / "shard-1-of-2"))
    assert _keys(out) == _keys(full_run)
    assert json.loads((out / "run.json").read_text())["merged_from"][0].endswith("shard-0-of-2")


def test_shared_prefill_gives_the_separate_runs_results(ckpt, tmp_path):
    """The default (one prefill per sample, every method and pass forked from it) against
    --separate-prefill: same predictions, scores and fidelity; only the prefill bookkeeping differs."""
    args = ["--methods", "full,omnikv,snapkv,h2o", "--tasks", "passkey", "--lengths", "300", "--samples", "2",
            "--budget", "0.5", "--max-new-tokens", "3", "--no-progress", "--fidelity", "--perplexity"]
    assert main(["eval", "--model", ckpt, "--output", str(tmp_path / "shared"), *args]) == 0
    assert main(["eval", "--model", ckpt, "--output", str(tmp_path / "own"), "--separate-prefill", *args]) == 0
    shared = {record_key(r): r for r in read_predictions(tmp_path / "shared" / "predictions.jsonl")}
    own = {record_key(r): r for r in read_predictions(tmp_path / "own" / "predictions.jsonl")}
    assert shared.keys() == own.keys() and len(shared) == 8
    for key, a in shared.items():
        b = own[key]
        assert a["prefill_mode"] == "shared" and b["prefill_mode"] == "own"
        assert a["shared_prefill_seconds"] > 0 and b["shared_prefill_seconds"] is None
        assert (a["token_ids"], a["score"]) == (b["token_ids"], b["score"])
        if "fidelity" in b:
            assert a["fidelity"]["greedy_agreement"] == b["fidelity"]["greedy_agreement"]
            assert a["fidelity"]["mean_kl"] == pytest.approx(b["fidelity"]["mean_kl"], abs=1e-5)
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-4)
    run = json.loads((tmp_path / "shared" / "run.json").read_text())
    assert run["prefill"]["shared"] and run["prefill"]["record_queries"] and run["prefill"]["tail"] >= 32


def test_compile_flag_gives_the_eager_results(ckpt, tmp_path):
    """`omnikv eval --compile`: methods with a static step run compiled (forked from the shared
    prefill like the others, teacher-forced passes included) and score what the eager run scores.
    aot_eager traces the whole step as inductor would, in seconds."""
    import torch

    torch._dynamo.reset()  # other tests' graphs count against torch's recompile limit
    args = ["--methods", "full,full_prealloc,omnikv", "--tasks", "passkey", "--lengths", "300", "--samples", "2",
            "--budget", "0.5", "--max-new-tokens", "3", "--no-progress", "--fidelity", "--perplexity"]
    backend = ["--method-opt", "omnikv.compile_backend=aot_eager", "--method-opt", "full_prealloc.compile_backend=aot_eager"]
    assert main(["eval", "--model", ckpt, "--output", str(tmp_path / "eager"), *args]) == 0
    assert main(["eval", "--model", ckpt, "--output", str(tmp_path / "compiled"), "--compile", *backend, *args]) == 0
    eager = {(r["method"], r["sample_id"]): r for r in read_predictions(tmp_path / "eager" / "predictions.jsonl")}
    compiled = {(r["method"].removesuffix(":compile=true"), r["sample_id"]): r
                for r in read_predictions(tmp_path / "compiled" / "predictions.jsonl")}
    assert eager.keys() == compiled.keys() and len(eager) == 6
    labels = {r["method"] for r in compiled.values()}
    assert labels == {"full", "full_prealloc:compile=true", "omnikv:compile=true"}
    for key, a in eager.items():
        b = compiled[key]
        assert (a["token_ids"], a["score"]) == (b["token_ids"], b["score"])
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-4)
        if key[0] != "full":
            assert b["prefill_mode"] == "shared" and "compile_seconds" in b["stats"]
    for label in ("full_prealloc:compile=true", "omnikv:compile=true"):  # compiled once, reused after
        assert sum(r["stats"]["compiles"] for r in compiled.values() if r["method"] == label) >= 1


def test_one_budget_for_every_budgeted_method_by_default(ckpt, tmp_path, capsys):
    """Without --budget every budgeted method runs at EVAL_DEFAULT_BUDGET (not OmniKV's preset and
    SnapKV's own default), and summary.md, run.json and metrics.json state the model, the lengths,
    the samples, each method's budget (resolved) and its measured attended share."""
    from omnikv.eval.runner import EVAL_DEFAULT_BUDGET

    out = tmp_path / "fair"
    assert main(["eval", "--model", ckpt, "--output", str(out), "--methods", "full,omnikv,snapkv",
                 "--tasks", "passkey", "--lengths", "300", "--samples", "1", "--max-new-tokens", "2",
                 "--no-progress"]) == 0
    assert "DIFFERENT" not in capsys.readouterr().err
    recs = {r["method"]: r for r in read_predictions(out / "predictions.jsonl")}
    assert recs["full"]["budget"] is None
    assert recs["omnikv"]["budget"] == recs["snapkv"]["budget"] == EVAL_DEFAULT_BUDGET
    assert recs["omnikv"]["config"]["budget"] == EVAL_DEFAULT_BUDGET  # the cache really ran with it
    run = json.loads((out / "run.json").read_text())
    assert run["budgets"]["per_method"] == {"full": None, "omnikv": 0.1, "snapkv": 0.1}
    assert not run["budgets"]["unequal"] and run["budgets"]["common_source"] == "default"
    assert "preset" not in run["methods"]["omnikv"] and run["methods"]["omnikv"]["filter_layers"]  # resolved
    metrics = json.loads((out / "metrics.json").read_text())
    budgets = {b["method"]: b for b in metrics["budgets"]}
    assert budgets["snapkv"]["budget_tokens"] == 30 and budgets["full"]["budget_tokens"] is None  # ceil(0.1 * 300)
    for m in ("omnikv", "snapkv"):
        share = budgets[m]["attended_fraction"]
        assert share == pytest.approx(recs[m]["budget_report"]["attended_fraction"]) and 0 < share < 1
    summary = (out / "summary.md").read_text()
    assert f"Model **{Path(ckpt).name}**; task lengths 300 tokens; samples per cell 1 (seed 0)" in summary
    assert "Every budgeted method ran at one budget: 0.1 of the prompt." in summary
    assert f"| snapkv | 300 | 0.1 of the prompt | 30 | {budgets['snapkv']['attended_fraction']:.3f}" in summary
    assert "| full | 300 | none (exact) | all | 1.000 (1.000-1.000)" in summary
    assert report.plot_title(metrics, run).startswith(f"{Path(ckpt).name}, budget 0.1 of the prompt, n = 1")


def test_per_method_budget_is_flagged_everywhere(ckpt, tmp_path, capsys):
    out = tmp_path / "unfair"
    assert main(["eval", "--model", ckpt, "--output", str(out), "--methods", "omnikv:budget=100,snapkv",
                 "--tasks", "passkey", "--lengths", "300", "--samples", "1", "--max-new-tokens", "2",
                 "--budget", "0.2", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "WARNING: methods run at DIFFERENT budgets (omnikv:budget=100 100, snapkv 0.2)" in captured.err
    recs = {r["method"]: r for r in read_predictions(out / "predictions.jsonl")}
    assert recs["omnikv:budget=100"]["budget"] == 100 and recs["snapkv"]["budget"] == 0.2
    run = json.loads((out / "run.json").read_text())
    assert run["budgets"]["unequal"] and run["budgets"]["own"] == {"omnikv:budget=100": 100}
    summary = (out / "summary.md").read_text()
    assert "**WARNING: the methods ran at DIFFERENT budgets** (omnikv:budget=100: 100 tokens, snapkv: 0.2 of the prompt)" in summary
    metrics = json.loads((out / "metrics.json").read_text())
    assert "DIFFERENT budgets per method" in report.plot_title(metrics, run)
    with pytest.raises(ConfigError, match="takes no budget"):
        from omnikv.eval.runner import build_methods

        build_methods(EvalConfig(model="m", methods=["full:budget=0.1"], tasks=["passkey"], lengths=[100],
                                 output=tmp_path))


def test_intervals_carry_no_float_noise():
    from omnikv.eval.stats import paired_comparison, score_interval

    # Wilson's lower bound at 0 successes is 5.55e-15 before rounding.
    assert score_interval([0.0] * 3)["low"] == 0.0 and score_interval([1.0] * 7)["high"] == 100.0
    p = paired_comparison([0.0, 1.0, 1.0], [1.0, 1.0, 0.0])
    assert all(v == round(v, 6) for v in (p["mean_diff"], p["diff_low"], p["diff_high"]))


def test_question_position_before_runs_apart_from_after(ckpt, tmp_path):
    """--question-position before: its records carry the position and ids of their own, so both
    layouts share one output under --resume (and merge) and get rows of their own in the summary."""
    out = tmp_path / "qpos"
    base = ["eval", "--model", ckpt, "--output", str(out), "--methods", "full", "--tasks", "passkey",
            "--lengths", "300", "--samples", "2", "--max-new-tokens", "2", "--no-progress"]
    assert main(base) == 0
    assert main(base + ["--question-position", "before", "--resume"]) == 0
    recs = read_predictions(out / "predictions.jsonl")
    assert len(recs) == 4 and len({record_key(r) for r in recs}) == 4
    before = [r for r in recs if r["question_position"] == "before"]
    assert len(before) == 2 and all(r["sample_id"].endswith("-qbefore") for r in before)
    assert all(r["metadata"]["question_position"] == "before" for r in before)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {r["task"] for r in metrics["rows"]} == {"passkey", "passkey (question before)"}
    summary = (out / "summary.md").read_text()
    assert "| passkey (question before) (n=2) | 300 |" in summary and "| passkey (n=2) | 300 |" in summary
    assert "Question position: after and before the haystack" in summary
    merged = tmp_path / "merged"
    assert main(["eval", "merge", str(out), "--output", str(merged)]) == 0
    assert sum(r["n"] for r in json.loads((merged / "metrics.json").read_text())["rows"]) == 4


def test_question_position_errors_before_the_model_loads(tmp_path):
    with pytest.raises(ConfigError, match="the tasks that take it"):
        EvalConfig(model="m", methods=["full"], tasks=["passkey", "cwe"], lengths=[100], output=tmp_path,
                   question_position="before")
    with pytest.raises(ConfigError, match="dataset tasks"):
        EvalConfig(model="m", methods=["full"], tasks=["longbench:qasper"], lengths=[100], output=tmp_path,
                   question_position="before")
    with pytest.raises(ConfigError, match="one of after, before"):
        EvalConfig(model="m", methods=["full"], tasks=["passkey"], lengths=[100], output=tmp_path,
                   question_position="first")
    with pytest.raises(ConfigError, match="disagree"):
        EvalConfig(model="m", methods=["full"], tasks=["passkey"], lengths=[100], output=tmp_path,
                   question_position="before", task_options={"question_position": "after"})
    with pytest.raises(SystemExit):  # argparse: invalid choice
        main(["eval", "--model", "m", "--output", str(tmp_path), "--question-position", "middle"])


def test_a_method_that_raises_is_reported_and_the_others_finish(ckpt, tmp_path, monkeypatch, capsys):
    """A method failing mid-run (as a kvpress press does on a model it does not handle) loses no other
    method's records and no process: it is skipped from its first error on, the report and the exit
    status say so, and --resume runs what it missed once it works."""
    import omnikv.decoding.generation as generation

    real, calls = generation.generate, {"n": 0}

    def failing_second_snapkv(model, tok, ids, method, *args, **kwargs):
        if method.describe()["method"] == "snapkv":
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("press does not support this model")
        return real(model, tok, ids, method, *args, **kwargs)

    monkeypatch.setattr(generation, "generate", failing_second_snapkv)
    args = ["eval", "--model", ckpt, "--output", str(tmp_path), *ARGS, "--methods", "full,snapkv,omnikv", "--samples", "3"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "method snapkv failed on passkey 300 passkey-300-0-1: RuntimeError: press does not support this model" in err
    records = read_predictions(tmp_path / "predictions.jsonl")
    count = {m: sum(r["method"] == m for r in records) for m in ("full", "snapkv", "omnikv")}
    assert count == {"full": 3, "snapkv": 1, "omnikv": 3}
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["failed_methods"]["snapkv"].startswith("RuntimeError: press does not support this model")
    assert "**Failed methods**" in (tmp_path / "summary.md").read_text()
    monkeypatch.setattr(generation, "generate", real)
    assert main([*args, "--resume"]) == 0
    records = read_predictions(tmp_path / "predictions.jsonl")
    assert sum(r["method"] == "snapkv" for r in records) == 3
    assert "failed_methods" not in json.loads((tmp_path / "run.json").read_text())
    assert "Failed methods" not in (tmp_path / "summary.md").read_text()


def test_a_shards_failed_method_is_carried_by_the_merge(ckpt, tmp_path, monkeypatch, capsys):
    """A method that failed in one shard has no records past its error there: the shard's exit
    status, the merged run.json, summary.md and the merge's exit status say so."""
    import omnikv.decoding.generation as generation

    real = generation.generate

    def failing_snapkv(model, tok, ids, method, *args, **kwargs):
        if method.describe()["method"] == "snapkv":
            raise RuntimeError("press does not support this model")
        return real(model, tok, ids, method, *args, **kwargs)

    args = [*ARGS, "--methods", "full,snapkv", "--samples", "2"]
    monkeypatch.setattr(generation, "generate", failing_snapkv)
    assert main(["eval", "--model", ckpt, "--output", str(tmp_path / "s0"), "--shard", "0/2", *args]) == 1
    monkeypatch.setattr(generation, "generate", real)
    assert main(["eval", "--model", ckpt, "--output", str(tmp_path / "s1"), "--shard", "1/2", *args]) == 0
    capsys.readouterr()
    assert main(["eval", "merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--output", str(tmp_path / "m")]) == 1
    assert "method snapkv failed" in capsys.readouterr().err
    run = json.loads((tmp_path / "m" / "run.json").read_text())
    assert list(run["failed_methods"]) == ["snapkv"]
    assert run["failed_methods"]["snapkv"].startswith(f"{tmp_path / 's0'}: RuntimeError: press does not support")
    assert "**Failed methods**" in (tmp_path / "m" / "summary.md").read_text()
    # the clean shard alone merges clean
    assert main(["eval", "merge", str(tmp_path / "s1"), "--output", str(tmp_path / "m1")]) == 0
    assert "failed_methods" not in json.loads((tmp_path / "m1" / "run.json").read_text())
