"""One-call GPU benchmark of OmniKV on a random-weight model with Llama-3-8B's shapes.

Run through `benchmarks/gpu/run.sh` (which sets up paths and a wall-clock limit). Stages (`--stage
NAME` runs one; the default runs all in ~4 minutes on an H200), each skipped with a note when the
time budget runs short:

1. correctness (small fp32 model): OmniKV at full budget == full attention, and OmniKV with offload
   on == off at a real budget (both gather every row; tolerance 1e-4), with the transfer strategy
   the cache picked (device gather from mapped host memory, or host gather) and its syncs per step;
2. timing (bf16, 32K and 128K, synthetic KV): full vs full_prealloc vs OmniKV offload off/on, and
   compiled (torch.compile, CUDA graphs) full_prealloc and OmniKV offload on, interleaved, through
   `omnikv.bench.run_bench`, with each record's bytes/bandwidth bound and compile seconds;
3. prefill: one real chunked prefill at 32K through OmniKV with offload (seconds, H2D/D2H bytes);
4. trace: a torch.profiler trace of OmniKV decode steps with offload, and how much of the
   host->device traffic (memcpys and side-stream gather kernels) overlaps compute kernels;
5. throughput: decode tokens/s at 128K with the largest batch each method fits;
6. a compact table, printed last; details in $OUT/summary.json, the plot and the trace.

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
STAGES = ("correctness", "timing", "prefill", "trace", "throughput")
TINY = dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=512, rope_theta=500000.0, max_position_embeddings=1 << 20)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for summary.json, bench.png, the trace")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, runs on CPU (test suite)")
    p.add_argument("--budget-seconds", type=float, default=None, help="wall-clock budget (default 500, tiny 240)")
    p.add_argument("--contexts", default=None, help="default 32k,64k,128k (tiny 256,512,1k)")
    p.add_argument("--budget", type=int, default=2048, help="tokens per sparse/Quest layer (paper latency setting 2048)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 32, tiny 3)")
    p.add_argument("--compiled", default=None, action=argparse.BooleanOptionalAction,
                   help="also time compiled (torch.compile, CUDA graphs) full_prealloc and OmniKV offload on. "
                   "Default: on with --tiny, off on a GPU, where inductor compiling at 8B shapes could use up "
                   "the budget: run it as a second call, `run.sh --stage timing --compiled`")
    p.add_argument("--stage", choices=STAGES, action="append", default=None,
                   help="run only this stage (repeatable); default: all")
    args = p.parse_args(argv)
    from omnikv.bench.run import parse_contexts
    from omnikv.bench.report import finish_metadata, run_metadata

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tiny = args.tiny
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clock = stages.Clock(args.budget_seconds or (240.0 if tiny else 230.0))
    contexts = parse_contexts(args.contexts or ("256,512" if tiny else "32k,128k"))
    steps = args.steps or (3 if tiny else 32)
    wanted = set(args.stage or STAGES)
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
    summary["correctness"] = stages.correctness(device, tiny) if "correctness" in wanted else {}
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
    # Without a GPU (--tiny on CPU) the offload run goes through the simulated transfer: the same
    # ordering logic, streams and counters as on CUDA.
    sim = ":transfer=simulated" if device.type == "cpu" else ""
    on, off = f"omnikv:offload=true{sim}:budget={budget}", f"omnikv:offload=false:budget={budget}"
    # The two CUDA gather strategies side by side (device gather from mapped host memory: no sync,
    # every selected row each step; host gather: one sync per segment, only the changed rows).
    host = f"omnikv:offload=true:transfer={'simulated_host_gather' if sim else 'cuda_host_gather'}:budget={budget}"
    # Compiled static-shape steps (torch.compile; CUDA graphs on CUDA), compile time reported apart
    # per record. --tiny on CPU traces with dynamo only (backend eager): inductor would take minutes.
    cb = ":compile_backend=eager" if device.type == "cpu" else ""
    compiled = [f"full_prealloc:compile=true{cb}", f"omnikv:offload=true{sim}:compile=true{cb}:budget={budget}"]
    compiled = compiled if (args.compiled if args.compiled is not None else tiny) else []
    methods = ["full", "full_prealloc", off, on, host]
    summary["methods"] = methods
    summary["compiled_methods"] = compiled
    # --tiny: the compiled rows at the first context only (compiling is most of their cost there)
    records = stages.timing(model, methods, contexts, steps, tiny, clock, summary["notes"], compiled,
                            contexts[:1] if tiny else None) if "timing" in wanted else []
    summary["timing"] = records
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    summary["bounds"] = stages.bounds(records, weights)
    save()
    if records:
        from omnikv.bench.report import plot

        plot([r for r in records if r.get("ms_per_token")], out / "bench.png", meta)

    # 3. a real chunked prefill -----------------------------------------------------------------
    if "prefill" in wanted:
        summary["prefill"] = stages.real_prefill(model, on, contexts[0], 64 if tiny else 2048, clock)
        log(f"prefill: {summary['prefill']}")
        save()

    # 4. profiler trace -------------------------------------------------------------------------
    if "trace" in wanted:
        trace_ctx = contexts[-1] if tiny else min(contexts[-1], 65536)
        summary["trace"] = stages.trace(model, on, trace_ctx, out, clock)
        log(f"trace: {summary['trace']}")
        save()

    # 5. throughput at the largest batch --------------------------------------------------------
    if "throughput" in wanted:
        summary["throughput"] = stages.throughput(model, ["full_prealloc", on], contexts[-1], clock, tiny)
        save()

    # 5. summary ---------------------------------------------------------------------------------
    finish_metadata(meta)
    summary["targets"] = stages.targets(summary, on)
    summary["elapsed_seconds"] = round(clock.elapsed(), 1)
    save()
    print(stages.render(summary), flush=True)
    ok = all(res["passed"] for res in summary["correctness"].values())  # empty when not run
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
