"""Decode speed under vLLM: stock CPU attention (`--method full`) vs the OmniKV backend.

Runs in the vLLM venv (integrations/vllm/.venv). One engine per run (the method is fixed at engine
start); for each context length and concurrency it adds the requests (random token ids, fixed
seed, no prefix caching), steps the engine until every request has its first token (prefill), then
times the remaining steps: decode tokens/s = tokens generated in those steps / their wall time.

    .venv/bin/python bench_decode.py --method omnikv --contexts 4096,8000 --concurrency 1,4 --output r.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import time
from pathlib import Path


def _env(method: str, budget: str | None) -> None:
    from omnikv_vllm.cli import cpu_env_defaults, method_env

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # 4 x 8K tokens of SmolLM2 fp32 need ~1.5 GiB
    os.environ.update(cpu_env_defaults())
    os.environ.update(method_env(method, None if budget is None else json.loads(budget)))


def run_case(engine, prompts: list[list[int]], new_tokens: int) -> dict:
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    tag = f"{time.monotonic_ns()}"
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", TokensPrompt(prompt_token_ids=p), params)
    counts: dict[str, int] = {}
    start = time.perf_counter()
    while len([c for c in counts.values() if c >= 1]) < len(prompts):
        for out in engine.step():
            counts[out.request_id] = len(out.outputs[0].token_ids)
    prefill_s = time.perf_counter() - start
    before = sum(counts.values())
    steps, t0 = 0, time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            counts[out.request_id] = len(out.outputs[0].token_ids)
        steps += 1
    decode_s = time.perf_counter() - t0
    tokens = sum(counts.values()) - before
    return {"prefill_seconds": round(prefill_s, 3), "decode_seconds": round(decode_s, 3), "decode_steps": steps,
            "decode_tokens": tokens, "decode_tokens_per_second": round(tokens / decode_s, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--method", choices=("full", "omnikv"), required=True)
    ap.add_argument("--budget", default=None, help="OmniKV budget override (JSON number); default: preset")
    ap.add_argument("--contexts", default="4096,8000")
    ap.add_argument("--concurrency", default="1,4")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--output", required=True)
    args = ap.parse_args()
    _env(args.method, args.budget)
    from omnikv_vllm import models
    from omnikv_vllm.cli import build_llm

    contexts = [int(c) for c in args.contexts.split(",")]
    llm = build_llm(models.resolve(args.model), method=args.method, budget=None, dtype="float32",
                    max_model_len=max(contexts) + args.new_tokens + 8, enable_prefix_caching=False,
                    max_num_seqs=max(int(c) for c in args.concurrency.split(",")))
    vocab = llm.get_tokenizer().vocab_size
    rows = []
    for ctx in contexts:
        for conc in (int(c) for c in args.concurrency.split(",")):
            rng = random.Random(ctx * 10 + conc)
            prompts = [[rng.randrange(100, vocab) for _ in range(ctx)] for _ in range(conc)]
            rows.append({"context": ctx, "concurrency": conc, **run_case(llm.llm_engine, prompts, args.new_tokens)})
            print(json.dumps(rows[-1]), flush=True)
    import torch
    import vllm

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"method": args.method, "budget": args.budget or "preset", "model": args.model, "dtype": "float32",
            "new_tokens": args.new_tokens, "vllm": vllm.__version__, "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
            "threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"), "commit": commit}
    Path(args.output).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
