"""Where a decode step's time goes, eager against torch.compile, by operator (torch.profiler).

    PYTHONPATH=. .venv/bin/python benchmarks/profile_compiled_step.py --model smollm2 \\
        --method full_prealloc --context 4k --threads 2 --steps 8 --out benchmarks/results/profile-compiled

The bench's breakdown (selection / gather / attention / KV update / rest) cannot look inside a
compiled graph: inductor fuses the step into its own kernels. A profile can: ATen calls that
inductor leaves to ATen (matrix products, SDPA) keep their names, its generated kernels show as
`graph_*` / `cpp_fused_*` / `kernel_*` entries (with `TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE=1`,
which this script sets). Both steps run on the same static cache, filled with synthetic KV, after
warm-up (the compile is outside the profiled steps). Writes `profile-<method>-<context>.json`
(self CPU ms per step by operator group and the top operators) and prints them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE", "1")

import torch  # noqa: E402


def _profile(fn, steps: int) -> tuple[float, list[dict]]:
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    wall = (time.perf_counter() - t0) / steps
    rows = []
    for e in prof.key_averages():
        rows.append({"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                     "calls_per_step": e.count / steps})
    rows.sort(key=lambda r: -r["self_ms_per_step"])
    return 1e3 * wall, rows


GROUPS = (  # (group, test on the profiler's op name), first match wins
    ("matrix products", lambda op: op in ("aten::mm", "aten::bmm", "aten::addmm")),
    ("SDPA kernel", lambda op: op.startswith("aten::_scaled_dot_product")),
    ("inductor-generated kernels", lambda op: op.startswith(("graph_", "cpp_fused", "kernel_"))),
    ("gathers and copies (ATen)", lambda op: op in ("aten::index_select", "aten::index_copy_", "aten::copy_",
                                                    "aten::index_put_", "aten::gather", "aten::cat")),
    ("compiled-graph call and guards", lambda op: op.startswith(("## Call CompiledFxGraph", "TorchDynamo",
                                                                 "Torch-Compiled Region", "Pregraph bytecode"))),
)


def grouped(rows: list[dict]) -> dict[str, float]:
    """Self ms per step summed by GROUPS; what no group takes is "other ATen ops"."""
    out = {name: 0.0 for name, _ in GROUPS}
    out["other ATen ops"] = 0.0
    for r in rows:
        name = next((n for n, test in GROUPS if test(r["op"])), "other ATen ops")
        out[name] += r["self_ms_per_step"]
    return {k: round(v, 2) for k, v in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--method", default="full_prealloc", help="full_prealloc or omnikv (a method with a static step)")
    ap.add_argument("--context", default="4k")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", default=None, help="directory for the JSON profile")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from omnikv.bench.fill import first_token, synthetic_fill
    from omnikv.bench.run import parse_contexts
    from omnikv.methods import get_method, make_decoder
    from omnikv.models import load_model

    context = parse_contexts(args.context)[0]
    model = load_model(args.model).model
    out: dict = {"model": args.model, "method": args.method, "context": context, "threads": args.threads,
                 "torch": torch.__version__, "steps": args.steps}
    for compiled in (False, True):
        method = get_method(args.method, compile=compiled, static=True)
        cache = method.make_cache(model)
        decoder = make_decoder(method, model, cache)
        decode = 3 * args.steps + 16
        cache.reserve(context + decode, decode_tokens=decode)
        synthetic_fill(model, cache, context, 1, 0)
        tok = first_token(model, 1, 0)

        def step(decoder=decoder):  # bound now: the loop deletes the name below
            nonlocal tok
            with torch.inference_mode():
                tok = decoder(tok)[:, -1].argmax(-1, keepdim=True)

        for _ in range(4):  # compiles (compiled run) and warms up
            step()
        ms, rows = _profile(step, args.steps)
        key = "compiled" if compiled else "eager"
        out[key] = {"ms_per_step_profiled": round(ms, 2), "compile_seconds": round(decoder.compile_seconds, 1),
                    "groups": grouped(rows), "top": rows[: args.top]}
        print(f"\n{args.method} {key} at {context}: {ms:.1f} ms/step under the profiler"
              + (f" (compile {decoder.compile_seconds:.0f} s)" if compiled else ""))
        for r in rows[: args.top]:
            print(f"  {r['self_ms_per_step']:8.2f} ms  x{r['calls_per_step']:6.1f}  {r['op'][:90]}")
        for name, value in out[key]["groups"].items():
            print(f"  = {value:8.2f} ms  {name}")
        del cache, decoder, step  # free this cache before the next one is built
    if args.out:
        path = Path(args.out)
        path.mkdir(parents=True, exist_ok=True)
        (path / f"profile-{args.method}-{context}.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
