"""Prefill seconds and wall time per sample of one eval cell: shared prefill vs separate prefills.

    PYTHONPATH=. python benchmarks/eval/shared_prefill_speed.py --model gemma3 --length 2k --samples 3 \
        [--methods full,omnikv,streaming_llm,h2o,snapkv,quest] [--out results.json]

For each sample both modes run in the same process, back to back, in alternating order (on a
shared machine the load changes over minutes: alternating spreads it over both modes): `shared` =
one `SharedPrefill` of the prompt, every method forked from it (what `omnikv eval` does); `separate`
= every method prefills the whole prompt itself (`--separate-prefill`). Greedy tokens of the two
modes are compared (they must be identical). Prints per-sample seconds and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3")
    ap.add_argument("--length", default="2k")
    ap.add_argument("--task", default="number_string")
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--methods", default="full,omnikv,streaming_llm,h2o,snapkv,quest")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--prefill-chunk-size", type=int, default=1024)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from omnikv.eval.runner import parse_length
    from omnikv.eval.tasks import encode_prompt, generate_samples
    from omnikv.decoding.fork import SharedPrefill, plan_shared_prefill
    from omnikv.decoding.generation import SamplingParams, generate
    from omnikv.methods import get_method
    from omnikv.models import load_model

    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    names = [m for m in args.methods.split(",") if m]
    make = lambda: [get_method(n, budget=None if n.startswith("full") else args.budget) for n in names]
    tail, queries, alone = plan_shared_prefill(make(), model)
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    chunk = args.prefill_chunk_size
    rows = []
    for i, s in enumerate(generate_samples(args.task, tok, parse_length(args.length), args.samples, args.seed,
                                           haystack="narrative")):
        ids = encode_prompt(tok, s.prompt)
        res: dict[str, dict] = {}
        for mode in (("shared", "separate") if i % 2 == 0 else ("separate", "shared")):
            t0 = time.perf_counter()
            prefill, tokens = 0.0, []
            shared = None
            if mode == "shared":
                shared = SharedPrefill.run(model, ids, tail=tail, record_queries=queries, prefill_chunk_size=chunk)
                prefill += shared.seconds
            for m in make():
                r = generate(model, tok, ids, m, params, prefill_chunk_size=chunk,
                             shared=shared if m.name not in alone else None)
                prefill += r.prefill_seconds
                tokens.append(r.token_ids)
            res[mode] = {"wall_seconds": time.perf_counter() - t0, "prefill_seconds": prefill, "tokens": tokens}
        row = {"sample": s.id, "prompt_tokens": len(ids),
               **{f"{k}_{m}": v[m] for k, v in res.items() for m in ("wall_seconds", "prefill_seconds")},
               "identical_tokens": res["shared"]["tokens"] == res["separate"]["tokens"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    tot = {k: sum(r[k] for r in rows) for k in rows[0] if k.endswith("seconds")}
    summary = {
        "model": args.model, "length": args.length, "task": args.task, "methods": names, "tail": tail,
        "samples": len(rows), "all_identical": all(r["identical_tokens"] for r in rows),
        "prefill_speedup": tot["separate_prefill_seconds"] / tot["shared_prefill_seconds"],
        "wall_speedup": tot["separate_wall_seconds"] / tot["shared_wall_seconds"],
        "samples_per_hour_shared": 3600 * len(rows) / tot["shared_wall_seconds"],
        "samples_per_hour_separate": 3600 * len(rows) / tot["separate_wall_seconds"],
        "hardware": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "rows": rows,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=2))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(summary, fh, indent=2)


if __name__ == "__main__":
    main()
