"""Attention capture on tiny random models, agreement with the library's selector, CLI smoke tests."""

from __future__ import annotations

import json

import pytest
import torch

from omnikv.hf.compat import cache_kwargs

from omnikv.analysis.capture import full_attention_layers, record_decode_attention
from omnikv.analysis.selection_sets import topk_indices

testing = pytest.importorskip("omnikv.models.tiny")


def _eager_decode_attentions(model, ids, steps):
    """Reference: the same greedy decode with eager attention and output_attentions=True."""
    from transformers import DynamicCache

    model.set_attn_implementation("eager")
    try:
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, **cache_kwargs(cache), use_cache=True)
        token = out.logits[0, -1].argmax().view(1, 1)
        per_step = []
        for _ in range(steps):
            out = model(input_ids=token, **cache_kwargs(cache), use_cache=True, output_attentions=True)
            per_step.append([a[0, :, 0, :] for a in out.attentions])  # (H, T) per layer
            token = out.logits[0, -1].argmax().view(1, 1)
        return per_step
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_captured_probabilities_equal_eager_attention(family):
    model = testing.tiny_model(family, seed=1)
    ids = torch.randint(3, 200, (1, 30), generator=torch.Generator().manual_seed(0))
    rec = record_decode_attention(model, ids, steps=3)
    assert model.config._attn_implementation == "sdpa"  # restored
    assert rec.layer_ids == full_attention_layers(model.config)
    ref = _eager_decode_attentions(model, ids, 3)
    probs = rec.probs()
    for s in range(3):
        for row, layer in enumerate(rec.layer_ids):
            expect = ref[s][layer]  # includes the sliding-window mask on hybrid models
            got = probs[s, row, :, : expect.shape[-1]]
            assert torch.allclose(got, expect, atol=1e-5), (s, layer)
            assert float(probs[s, row, :, expect.shape[-1] :].sum()) == 0.0  # not-yet-generated slots


def test_capture_does_not_change_generation():
    model = testing.tiny_model("llama", seed=2)
    ids = torch.randint(3, 200, (1, 25), generator=torch.Generator().manual_seed(1))
    rec = record_decode_attention(model, ids, steps=5)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert rec.generated_ids == out[0, 25:].tolist()


def test_topk_agrees_with_the_library_selector():
    selection = pytest.importorskip("omnikv.algorithm.selection")
    g = torch.Generator().manual_seed(4)
    hq, hk, t, d = 6, 2, 40, 8
    q = torch.randn(1, hq, 1, d, generator=g)
    k = torch.randn(1, hk, t, d, generator=g)
    scale = d**-0.5
    # logits per query head over the prompt: (H, T); query head h reads KV head h // (hq // hk)
    logits = torch.einsum("hd,htd->ht", q[0, :, 0], k[0].repeat_interleave(hq // hk, 0)) * scale
    for head_reduce in ("max", "sum", "per_kv_head"):
        lib_scores = selection.filter_scores(q, k, scale, "last", head_reduce)
        lib = selection.select_topk(lib_scores, 9, sink=2, recent=3)[0]
        ours = topk_indices(logits, 9, head_reduce, hk, sink=2, recent=3).sort(-1).values
        assert torch.equal(ours, lib), head_reduce


def test_cli_analyze_and_calibrate_on_a_tiny_checkpoint(tmp_path, capsys):
    from omnikv.cli import main

    ckpt = testing.make_tiny_checkpoint(tmp_path / "ckpt", family="llama", num_hidden_layers=6)
    text = tmp_path / "in.txt"
    text.write_text(" ".join(f"word{i % 37} is next to word{(i * 7) % 41}." for i in range(120)))
    out = tmp_path / "an"
    rc = main(["analyze", "--model", str(ckpt), "--input", str(text), "--length", "200", "--steps", "3",
               "--k", "80,0.2", "--head-reduce", "max,per_kv_head", "--output-dir", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["layer_ids"]) == 6 and report["inputs"][0]["prompt_tokens"] == 200
    entry = report["coverage"]["k=80/max/sink+recent"]
    assert len(entry["matrix"]) == 6 and len(entry["decay"]) == 6
    assert all(abs(sum(report["mass"][p][j] for p in report["mass"]) - 1) < 1e-3 for j in range(6))
    for png in ("coverage_heatmap.png", "coverage_decay.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    preset = tmp_path / "preset.json"
    rc = main(["calibrate", "--model", str(ckpt), "--input", str(text), "--length", "200", "--steps", "3",
               "--num-filters", "2", "--num-wait", "0", "--budget", "80",
               "--output", str(preset), "--report", str(tmp_path / "cal.json")])
    assert rc == 0
    data = json.loads(preset.read_text())
    assert data["num_layers"] == 6 and data["model_type"] == "llama" and len(data["filter_layers"]) == 2
    cal = json.loads((tmp_path / "cal.json").read_text())
    ours, base = cal["choices"][0], cal["choices"][1]
    # same dense-layer cap as the paper-style baseline, and never worse than it
    assert ours["num_dense"] <= base["num_dense"] and ours["missed_mass"] <= base["missed_mass"] + 1e-9
    assert "exhaustive check: DP result is optimal" in capsys.readouterr().out

    # calibrating from the analysis report (no model run) uses the same matrix
    again = tmp_path / "again.json"
    rc = main(["calibrate", "--from-report", str(out / "report.json"), "--budget", "0.2", "--num-filters", "2",
               "--num-wait", "0", "--output", str(again)])
    assert rc == 0
    ours = json.loads(again.read_text())
    from omnikv.analysis.search import choose_filter_layers

    matrix = torch.tensor(report["coverage"]["k=0.2/max/sink+recent"]["matrix"], dtype=torch.float64)
    assert ours["filter_layers"] == choose_filter_layers(matrix, 2, 0).filter_layers
    rc = main(["calibrate", "--from-report", str(out / "report.json"), "--budget", "0.5"])
    assert rc == 2 and "no variant" in capsys.readouterr().err


def test_cli_reports_missing_inputs_as_user_errors(tmp_path, capsys):
    from omnikv.cli import main

    ckpt = testing.make_tiny_checkpoint(tmp_path / "ckpt", family="llama")
    rc = main(["calibrate", "--model", str(ckpt), "--input", str(tmp_path / "nope.txt")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_cli_checks_options_before_loading_the_model(capsys):
    from omnikv.cli import main

    # the model name does not exist: these must fail on the options first
    assert main(["analyze", "--model", "no-such-model", "--task", "no-such-task"]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert main(["analyze", "--model", "no-such-model", "--input", "x.txt", "--k", "1.5"]) == 2
    assert "(0, 1]" in capsys.readouterr().err
    assert main(["calibrate", "--budget", "256"]) == 2
    assert "--from-report" in capsys.readouterr().err


def test_file_prompts_keep_head_and_tail(tmp_path):
    from omnikv.analysis.inputs import prompts_from_files
    from omnikv.errors import InputError

    tok = testing.build_tokenizer()
    f = tmp_path / "t.txt"
    f.write_text("".join(chr(ord("a") + i % 26) for i in range(300)))
    full = list(tok(f.read_text(), add_special_tokens=True)["input_ids"])
    (_, ids), = prompts_from_files(tok, [str(f)], length=100)
    assert ids == full[:50] + full[-50:]
    (_, whole), = prompts_from_files(tok, [str(f)], length=None)
    assert whole == full
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(InputError, match="empty"):
        prompts_from_files(tok, [str(tmp_path / "e.txt")])


def test_calibrate_without_inputs_uses_the_builtin_haystack(tmp_path, capsys):
    from omnikv.cli import main

    # A short context: the default prompt must fit it (context - steps - 1 tokens).
    ckpt = testing.make_tiny_checkpoint(tmp_path / "ckpt", family="llama", num_hidden_layers=6,
                                        max_position_embeddings=256)
    preset = tmp_path / "preset.json"
    rc = main(["calibrate", "--model", str(ckpt), "--steps", "3", "--num-filters", "2", "--num-wait", "0",
               "--budget", "40", "--output", str(preset)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "built-in narrative haystack, 1 prompt(s) of 252 tokens" in err
    assert "recorded narrative haystack (seed 0): 252 prompt tokens" in err
    data = json.loads(preset.read_text())
    assert len(data["filter_layers"]) == 2 and data["num_layers"] == 6


def test_haystack_prompts_have_the_asked_length():
    from omnikv.analysis.inputs import default_length, prompts_from_haystack

    (source, ids), = prompts_from_haystack(testing.build_tokenizer(), 300, 1, seed=2)
    assert len(ids) == 300 and "seed 2" in source
    assert default_length(256, 3) == 252 and default_length(None, 3) == 2048 and default_length(8192, 3, 500) == 500
