"""Decode speed under vLLM: stock CPU attention against the OmniKV backend, interleaved in one run.

Runs in the vLLM venv (integrations/vllm/.venv). One engine, in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), with the OmniKV backend installed and prefix caching on. For
each context length and concurrency: random-token prompts (fixed seed) are prefilled once (not
timed: prefix caching keeps them); then `--repeats` times the same prompts are decoded
`--new-tokens` tokens each, the decode steps alternating stock / OmniKV one by one (which goes
first alternates between repeats), each step timed (wall and process CPU time). "stock" is the
same engine with OmniKV's step state off (`omnikv_vllm.backend.set_active(False)`): every layer
runs vLLM's CPU_ATTN code unchanged, over the same weights and cached prompt blocks; adjacent steps
see the same machine load, which matters on a shared machine. OmniKV selects afresh at every step
(refresh_every=1), so no step depends on the method of the step before.
Decode tokens/s = requests / median step wall time.

With OMNIKV_VLLM_PROFILE=1 (set here) the OmniKV runs also sum the time spent selecting (filter
layers, after their stock attention) and in the sparse layers' attention: their shares of a decode
step are reported next to the speeds.

    .venv/bin/python bench_decode.py --contexts 8192,16384 --concurrency 1,4 --output r.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import time
from pathlib import Path

METHODS = ("stock", "omnikv")


def _env(kv_space: str) -> None:
    from omnikv_vllm.cli import cpu_env_defaults, method_env

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = kv_space
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine here: set_active and the profile reach it
    os.environ["OMNIKV_VLLM_PROFILE"] = "1"
    # SmolLM2 was trained to 8K positions; past them its outputs are not meaningful, but the
    # decode cost (what is measured here, on random tokens) is the same computation.
    os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    os.environ.update(cpu_env_defaults())
    os.environ.update(method_env("omnikv", None))


def _drain(engine, n: int, counts: dict[str, int]) -> None:
    while len([c for c in counts.values() if c >= 1]) < n:
        for out in engine.step():
            counts[out.request_id] = len(out.outputs[0].token_ids)


def decode_run(engine, prompts: list[list[int]], new_tokens: int, first: str) -> dict[str, dict]:
    """One decode of every prompt (prefix-cached), the methods alternating step by step (`first`
    on even steps): per method, each step's wall and CPU seconds and OmniKV's parts."""
    from vllm import SamplingParams, TokensPrompt

    from omnikv_vllm import backend, profile

    backend.set_active(True)  # the tracker sees the prompts either way; OmniKV decodes the first tokens
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    tag = f"run-{time.monotonic_ns()}"
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", TokensPrompt(prompt_token_ids=p), params)
    counts: dict[str, int] = {}
    _drain(engine, len(prompts), counts)  # the prompts' uncached tails and first tokens
    order = (first, METHODS[1] if first == METHODS[0] else METHODS[0])
    res = {m: {"wall": [], "cpu": [], "faults": [], "sparse": [], "parts": {}} for m in METHODS}
    n = 0
    while engine.has_unfinished_requests():
        method = order[n % 2]
        backend.set_active(method == "omnikv")  # read when the step's metadata is built
        before = profile.totals()
        f0 = resource.getrusage(resource.RUSAGE_SELF)
        w0, c0 = time.perf_counter(), time.process_time()
        engine.step()
        res[method]["wall"].append(time.perf_counter() - w0)
        res[method]["cpu"].append(time.process_time() - c0)
        f1 = resource.getrusage(resource.RUSAGE_SELF)
        res[method]["faults"].append((f1.ru_minflt - f0.ru_minflt) + (f1.ru_majflt - f0.ru_majflt))
        after = profile.totals()
        parts = res[method]["parts"]
        for k in after:  # "selection", "sparse attention" and "sparse attention@<layer>"
            parts[k] = parts.get(k, 0.0) + after[k] - before.get(k, 0.0)
        res[method]["sparse"].append(after.get("sparse attention", 0.0) - before.get("sparse attention", 0.0))
        n += 1
    backend.set_active(True)
    return res


def run_cell(llm, ctx: int, conc: int, args) -> dict:
    from vllm import SamplingParams, TokensPrompt

    vocab = llm.get_tokenizer().vocab_size
    rng = random.Random(ctx * 10 + conc)
    prompts = [[rng.randrange(100, vocab) for _ in range(ctx)] for _ in range(conc)]
    t0 = time.perf_counter()
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], SamplingParams(max_tokens=1), use_tqdm=False)
    prefill_s = time.perf_counter() - t0
    runs = [decode_run(llm.llm_engine, prompts, args.new_tokens, METHODS[rep % 2]) for rep in range(args.repeats)]
    row = {"context": ctx, "concurrency": conc, "prefill_seconds": round(prefill_s, 2),
           "load_average": os.getloadavg()}
    for method in METHODS:
        wall = [s for r in runs for s in r[method]["wall"]]
        cpu = [s for r in runs for s in r[method]["cpu"]]
        med, cmed = statistics.median(wall), statistics.median(cpu)
        row[method] = {"median_step_s": round(med, 5), "tokens_per_s": round(conc / med, 3),
                       "median_step_cpu_s": round(cmed, 5), "steps": len(wall),
                       "step_s_min_max": [round(min(wall), 5), round(max(wall), 5)]}
    total = sum(s for r in runs for s in r["omnikv"]["wall"])
    shares = {k: sum(r["omnikv"]["parts"].get(k, 0.0) for r in runs) / total for k in ("selection", "sparse attention")}
    shares["elsewhere"] = 1 - sum(shares.values())
    row["omnikv"]["step_shares"] = {k: round(v, 3) for k, v in shares.items()}
    # Where sparse attention's time goes: per step (in step order, both decodes) and per layer
    # (seconds per OmniKV step); page faults per step of each method (minor + major, this process).
    steps = sum(len(r["omnikv"]["wall"]) for r in runs)
    row["omnikv"]["sparse_attention_per_step_s"] = [round(s, 4) for r in runs for s in r["omnikv"]["sparse"]]
    layers = sorted({k for r in runs for k in r["omnikv"]["parts"] if "@" in k}, key=lambda k: int(k.split("@")[1]))
    row["omnikv"]["sparse_attention_per_layer_s"] = {
        k.split("@")[1]: round(sum(r["omnikv"]["parts"].get(k, 0.0) for r in runs) / steps, 5) for k in layers}
    # Decode rows whose filter-layer scores held a NaN (a NaN query or keys: SmolLM2 past its 8K
    # positions without _positions_override; the selection ranks them last and keeps its forced
    # blocks and budget).
    row["omnikv"]["rows_with_nan_scores"] = int(sum(r["omnikv"]["parts"].get("rows with NaN scores", 0) for r in runs))
    for method in METHODS:
        row[method]["page_faults_per_step_median"] = statistics.median(f for r in runs for f in r[method]["faults"])
    row["ratio"] = round(row["omnikv"]["tokens_per_s"] / row["stock"]["tokens_per_s"], 3)
    row["ratio_cpu_time"] = round(row["stock"]["median_step_cpu_s"] / row["omnikv"]["median_step_cpu_s"], 3)
    return row


def _positions_override(model_dir: Path, max_len: int) -> dict:
    """hf_overrides raising the model's max_position_embeddings to max_len when it is below.

    vLLM sizes its rotary cos/sin cache by max_position_embeddings; past it (allowed here with
    VLLM_ALLOW_LONG_MAX_MODEL_LEN=1) SmolLM2 (8K positions) returned NaN logits at 16K with stock
    attention, and finite ones with this override (docs/vllm.md). The outputs past 8K mean nothing
    either way: what is measured is the cost."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    known = config.get("max_position_embeddings")
    return {"max_position_embeddings": max_len} if known is not None and known < max_len else {}


def _commit() -> str:
    """The checkout's commit, "+dirty" with uncommitted changes to tracked files (read at start:
    the code this process imported)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    return commit + ("+dirty" if dirty else "")


def _meta(args, commit: str) -> dict:
    import torch
    import vllm

    from omnikv_vllm import backend

    model = backend._Model._instance
    return {"model": args.model, "hf_overrides": getattr(args, "hf_overrides", {}), "dtype": "float32", "new_tokens": args.new_tokens, "repeats": args.repeats,
            "omnikv_config": str(model.config) if model else None,
            "layers": model.plan.summary() if model else None,
            "vllm": vllm.__version__, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "cores": len(os.sched_getaffinity(0)), "threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
            "kv_space_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE"), "commit": commit,
            "nice": os.nice(0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--contexts", default="8192,16384,32768")
    ap.add_argument("--concurrency", default="1,4")
    ap.add_argument("--cells", default=None,
                    help="explicit CTXxN cells, e.g. 8192x1,8192x4,32768x1 (run in this order; overrides "
                    "--contexts/--concurrency)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--kv-space", default="7", help="VLLM_CPU_KVCACHE_SPACE in GiB (7 fits 32K x 4 requests)")
    ap.add_argument("--output", required=True)
    args = ap.parse_args()
    if args.cells:
        cells = [tuple(int(x) for x in c.split("x")) for c in args.cells.split(",")]
    else:
        cells = [(int(c), int(n)) for c in args.contexts.split(",") for n in args.concurrency.split(",")]
    commit = _commit()
    _env(args.kv_space)
    from omnikv_vllm import models
    from omnikv_vllm.cli import build_llm

    model_dir = models.resolve(args.model)
    max_len = max(c for c, _ in cells) + args.new_tokens + 8
    args.hf_overrides = _positions_override(model_dir, max_len)  # also recorded in bench.json
    llm = build_llm(model_dir, method="omnikv", budget=None, dtype="float32", max_model_len=max_len,
                    enable_prefix_caching=True, max_num_seqs=max(n for _, n in cells),
                    hf_overrides=args.hf_overrides)
    out = Path(args.output)
    rows = []
    for ctx, conc in cells:
        rows.append(run_cell(llm, ctx, conc, args))
        print(json.dumps(rows[-1]), flush=True)
        out.write_text(json.dumps({"meta": _meta(args, commit), "rows": rows}, indent=2))  # after every cell


if __name__ == "__main__":
    main()
