"""Which prompt rows H2O and SnapKV keep on a needle task, and whether the needle is among them.

For each passkey sample (SmolLM2, seed 0, narrative haystack), one prefill and one decode step per
method at the given budget; then, over every (layer, KV head): the share that keeps every token of
the needle's value, and where the kept rows outside the recent window / observation window sit
(mean relative position in the prompt, 0 = first token). Writes JSON next to the printed table.

    python benchmarks/eval/h2o_needle_rows.py --samples 8 --length 1024 --budget 0.1 \
        --output benchmarks/eval/results/h2o-needle/rows.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from omnikv.bench.report import finish_metadata, run_metadata
from omnikv.eval.tasks.infinitebench_synth import passkey
from omnikv.methods import get_method
from omnikv.methods.lossy import LossyLayer
from omnikv.models import load_model


def needle_positions(tokenizer, prompt: str, value: str) -> list[int]:
    """Token positions of the first occurrence of `value` in the prompt (by character offsets)."""
    enc = tokenizer(prompt, return_offsets_mapping=True)
    start = prompt.index(value)
    end = start + len(value)
    return [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]


def kept_report(cache, needle: list[int], prompt_len: int, protected_tail: int) -> dict:
    layers = [l for l in cache.layers if isinstance(l, LossyLayer)]
    keeps, rel = 0, []
    total = 0
    for layer in layers:
        kept = layer.kept_positions()[0]  # (G, kept)
        for row in kept.tolist():
            total += 1
            rows = set(row)
            keeps += all(p in rows for p in needle)
            older = [p for p in row if p < prompt_len - protected_tail]
            if older:
                rel.append(sum(older) / len(older) / prompt_len)
    return {"needle_kept_share": keeps / total, "mean_rel_pos_of_older_kept": sum(rel) / max(1, len(rel))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--output", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    meta = run_metadata(probe_bandwidth=False)  # hardware, versions, commit, command, load
    lm = load_model("smollm2", dtype="float32", device="cpu")
    tok, model = lm.tokenizer, lm.model
    rows = []
    for s in passkey(tok, args.length, args.samples, seed=0, haystack="narrative"):
        ids = tok(s.prompt, return_tensors="pt").input_ids
        t = ids.shape[1]
        needle = needle_positions(tok, s.prompt, s.answers[0])
        k = get_method("h2o", budget=args.budget).budget_rule.tokens(t, clip=False)
        for name, tail in (("h2o", k // 2), ("snapkv", 32)):
            method = get_method(name, budget=args.budget)
            cache = method.make_cache(model)
            with torch.inference_mode():
                out = model.generate(ids, cache=cache, max_new_tokens=6, do_sample=False)
            answer = tok.decode(out[0, t:])
            rep = kept_report(cache, needle, t, tail)
            rows.append({"sample": s.id, "depth": s.metadata["depth"], "method": name, "prompt_tokens": t,
                         "needle_tokens": needle, "answer": answer, "correct": s.answers[0] in answer, **rep})
            print(f"{s.id} depth {s.metadata['depth']:.2f} {name:7s} needle kept in "
                  f"{rep['needle_kept_share']:.0%} of (layer, head); older kept rows at "
                  f"{rep['mean_rel_pos_of_older_kept']:.2f} of the prompt; answer {answer!r}", flush=True)
    finish_metadata(meta)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
