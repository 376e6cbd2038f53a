"""One-call GPU benchmark of OmniKV on a random-weight model with Llama-3-8B's shapes.

Run through `benchmarks/gpu/run.sh` (which sets up paths and a wall-clock limit). Stages, each
skipped with a note when the time budget runs short:

1. correctness on the device (small fp32 model): OmniKV at full budget == full attention, and
   OmniKV with offload on == offload off at a real budget (same tokens, same logits);
2. timing (bf16, 32K/64K/128K, synthetic KV): full vs full_prealloc vs OmniKV (offload off/on)
   vs Quest, interleaved, through `omnikv.bench.run_bench`;
3. a torch.profiler trace of OmniKV decode steps with offload, and how much of the host->device
   copy time overlaps kernels on other streams;
4. the longest context each method fits (predicted from the measured bytes per token, then
   checked by filling at that length);
5. a compact table, printed last; details in $OUT/summary.json, the plot and the trace.

`--tiny` runs every stage with tiny shapes (on CPU when there is no GPU) for the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import stages  # noqa: E402  (benchmarks/gpu/stages.py)

LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=1 << 20)
TINY = dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=512, rope_theta=500000.0, max_position_embeddings=1 << 20)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for summary.json, bench.png, the trace")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, runs on CPU (test suite)")
    p.add_argument("--budget-seconds", type=float, default=None, help="wall-clock budget (default 500, tiny 240)")
    p.add_argument("--contexts", default=None, help="default 32k,64k,128k (tiny 256,512,1k)")
    p.add_argument("--budget", type=int, default=2048, help="tokens per sparse/Quest layer (paper latency setting 2048)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 64, tiny 4)")
    args = p.parse_args(argv)
    from omnikv.bench.run import parse_contexts
    from omnikv.bench.report import finish_metadata, run_metadata

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tiny = args.tiny
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clock = stages.Clock(args.budget_seconds or (240.0 if tiny else 500.0))
    contexts = parse_contexts(args.contexts or ("256,512" if tiny else "32k,64k,128k"))
    steps = args.steps or (3 if tiny else 64)
    if tiny and device.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors: more threads only add contention on a shared machine
    budget = min(args.budget, 96) if tiny else args.budget
    log = stages.log
    log(f"device {device}; torch {torch.__version__}; budget {clock.total:.0f} s; tiny={tiny}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 for the correctness stage

    meta = run_metadata(["benchmarks/gpu/run.sh", *sys.argv[1:]] if argv is None else ["benchmarks/gpu/run.sh", *argv], device)
    summary: dict = {"metadata": meta, "notes": []}

    def save() -> None:  # after every stage: a run cut short still leaves what it measured
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")

    warnings.filterwarnings("ignore", message="no OmniKV preset")

    # 1. correctness --------------------------------------------------------------------------
    summary["correctness"] = stages.correctness(device, tiny)
    for name, res in summary["correctness"].items():
        log(f"correctness {name}: {'PASS' if res['passed'] else 'FAIL'} {res}")
    save()

    # 2. timing ---------------------------------------------------------------------------------
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    t0 = time.perf_counter()
    model = stages.random_llama(TINY if tiny else LLAMA3_8B, device, dtype)
    log(f"built random {'tiny' if tiny else 'Llama-3-8B-shaped'} model in {time.perf_counter() - t0:.1f} s "
        f"({stages.weight_gib(model):.2f} GiB of weights)")
    meta["model"] = "random llama, " + ("tiny" if tiny else "Llama-3-8B shapes") + f", {dtype}"
    methods = ["full", "full_prealloc", f"omnikv:offload=false:budget={budget}",
               f"omnikv:offload=true:budget={budget}", f"quest:budget={budget}"]
    summary["methods"] = methods
    records = stages.timing(model, methods, contexts, steps, tiny, clock, summary["notes"])
    summary["timing"] = records
    save()
    if records:
        from omnikv.bench.report import plot

        plot([r for r in records if r.get("ms_per_token")], out / "bench.png", meta)

    # 3. profiler trace -------------------------------------------------------------------------
    trace_ctx = contexts[-1] if tiny else min(contexts[-1], 65536)
    summary["trace"] = stages.trace(model, f"omnikv:offload=true:budget={budget}", trace_ctx, out, clock)
    log(f"trace: {summary['trace']}")
    save()

    # 4. longest context ------------------------------------------------------------------------
    summary["max_context"] = stages.max_context(model, methods, records, tiny, clock)

    # 5. summary ---------------------------------------------------------------------------------
    finish_metadata(meta)
    summary["targets"] = stages.targets(summary, budget)
    summary["elapsed_seconds"] = round(clock.elapsed(), 1)
    save()
    print(stages.render(summary), flush=True)
    ok = all(res["passed"] for res in summary["correctness"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
