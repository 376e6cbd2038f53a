"""Inductor levers for the compiled static decode step, A/B in one process, interleaved.

    PYTHONPATH=. .venv/bin/python benchmarks/compile_levers.py --model smollm2 --method full_prealloc \\
        --context 4k --threads 1 --steps 30 --out benchmarks/results/compile-levers

Each variant gets its own static cache (same synthetic KV, same first token) and its own compiled
copy of the step function (a fresh code object, so dynamo compiles it anew under the variant's
inductor settings); the timed steps then alternate between the variants, so a loaded machine
slows all of them alike. Variants:

* `eager`: the static step without compiling (the reference for the greedy tokens);
* `plain`: plain inductor (`compile_mode=default`);
* `cpp_wrapper`: plain inductor with its C++ wrapper around the kernels instead of the Python one;
* `cpu_default`: what `compile=true` runs on CPU (`omnikv.hf.static.CPU_INDUCTOR_CONFIG`: weights
  frozen into the graph, matrix products autotuned against inductor's C++ GEMM; KV buffers not
  marked static-address);
* `freezing_marked`: the same with the KV buffers marked static-address, as CUDA graphs need them -
  shows why `omnikv.hf.static.mark_static` leaves them unmarked on CPU (freezing folds marked buffers
  as constants: the tokens leave the reference).

Also reports dynamo's guard evaluation for the `plain` graph, timed directly on its cache entry
(private API: reported as null if this torch lacks it). Writes `levers-<method>-<context>.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
import types
from pathlib import Path

import torch

VARIANTS = {  # name: (compiled, compile_mode, inductor config patched in, force static-address marks)
    "eager": (False, None, {}, False),
    "plain": (True, "default", {}, False),
    "cpp_wrapper": (True, "default", {"cpp_wrapper": True}, False),
    "cpu_default": (True, None, {}, False),
    "freezing_marked": (True, None, {}, True),
}


@contextlib.contextmanager
def _forced_static_marks():
    """Mark static-address buffers as on CUDA, whatever the device."""
    import importlib

    def mark(device, *tensors):
        for t in tensors:
            torch._dynamo.mark_static_address(t)

    # every module that marks buffers of a static run (they call `mark_static` as a module global)
    modules = [importlib.import_module(f"omnikv.{m}") for m in ("hf.static", "hf.layers", "offload.bank", "offload.gathers")]
    saved = [m.mark_static for m in modules]
    for m in modules:
        m.mark_static = mark
    try:
        yield
    finally:
        for m, original in zip(modules, saved):
            m.mark_static = original


def _own_compiled_step(decoder, name: str) -> None:
    """Give `decoder` a compiled step of its own (`omnikv.hf.static.step_function` keyed by variant):
    variants sharing one code object would share the first variant's graph."""
    from omnikv.hf.static import step_function

    fn = step_function(f"levers-{name}")
    decoder._fn = torch.compile(types.MethodType(fn, decoder), dynamic=False, fullgraph=True, **decoder.options)
    decoder._lever_code = fn.__code__  # for _guard_ms


def _guard_ms(decoder, reps: int = 200) -> float | None:
    """Milliseconds to evaluate the guards of `decoder`'s compiled step once (private dynamo API)."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        entries = _debug_get_cache_entry_list(decoder._lever_code)
        gm = entries[0].guard_manager
        st = decoder.cache.static
        f_locals = {"self": decoder, "input_ids": decoder._ids,
                    "position_ids": st.pos.view(1, 1).expand(decoder._ids.shape[0], 1), "attention_mask": None}
        st.prepared = True  # as during a step
        if not gm.check(f_locals):
            return None
        t0 = time.perf_counter()
        for _ in range(reps):
            gm.check(f_locals)
        return 1e3 * (time.perf_counter() - t0) / reps
    except Exception:  # noqa: BLE001 - a private API: no number rather than a failed run
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--method", default="full_prealloc", help="full_prealloc or omnikv")
    ap.add_argument("--context", default="4k")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--out", default=None, help="directory for the JSON result")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import torch._inductor.config as inductor_config

    from omnikv.bench.fill import first_token, synthetic_fill
    from omnikv.bench.run import parse_contexts
    from omnikv.methods import get_method, make_decoder
    from omnikv.models import load_model

    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    context = parse_contexts(args.context)[0]
    model = load_model(args.model).model
    decode = args.steps + 8
    runs: dict[str, dict] = {}
    with torch.inference_mode():
        for name in names:
            compiled, mode, config, marks = VARIANTS[name]
            method = get_method(args.method, compile=compiled, static=True, compile_mode=mode)
            cache = method.make_cache(model)
            decoder = make_decoder(method, model, cache)
            if compiled:
                _own_compiled_step(decoder, name)
            cache.reserve(context + decode, decode_tokens=decode)
            synthetic_fill(model, cache, context, 1, 0)
            tok = first_token(model, 1, 0)
            tokens = []
            t0 = time.perf_counter()
            with inductor_config.patch(config), (_forced_static_marks() if marks else contextlib.nullcontext()):
                for _ in range(3):  # compiles (compiled variants) and warms up
                    tok = decoder(tok)[:, -1].argmax(-1, keepdim=True)
                    tokens.append(int(tok))
            first_s = time.perf_counter() - t0
            runs[name] = {"decoder": decoder, "tok": tok, "tokens": tokens, "ms": [], "first_steps_s": first_s}
            print(f"{name}: first 3 steps {first_s:.1f} s (compile included)", flush=True)
        for _ in range(args.steps):
            for r in runs.values():
                t0 = time.perf_counter()
                r["tok"] = r["decoder"](r["tok"])[:, -1].argmax(-1, keepdim=True)
                r["ms"].append(1e3 * (time.perf_counter() - t0))
                r["tokens"].append(int(r["tok"]))
        guard = _guard_ms(runs["plain"]["decoder"]) if "plain" in runs else None
    ref = runs.get("eager", next(iter(runs.values())))["tokens"]
    out = {"model": args.model, "method": args.method, "context": context, "threads": args.threads,
           "steps": args.steps, "torch": torch.__version__, "guard_check_ms_plain": guard, "variants": {}}
    print(f"\n{args.method} at {context}, {args.threads} thread(s), {args.steps} interleaved steps")
    for name, r in runs.items():
        first_diff = next((i for i, (a, b) in enumerate(zip(r["tokens"], ref)) if a != b), None)
        row = {"median_ms": round(statistics.median(r["ms"]), 2), "min_ms": round(min(r["ms"]), 2),
               "first_steps_s": round(r["first_steps_s"], 1), "tokens_match_reference": first_diff is None,
               "first_token_mismatch_step": first_diff}
        out["variants"][name] = row
        print(f"  {name:16s} median {row['median_ms']:7.2f} ms  min {row['min_ms']:7.2f}  "
              f"first steps {row['first_steps_s']:6.1f} s  tokens == eager: {row['tokens_match_reference']}")
    print(f"  guard evaluation of the plain graph: {guard if guard is None else round(guard, 3)} ms")
    if args.out:
        path = Path(args.out)
        path.mkdir(parents=True, exist_ok=True)
        (path / f"levers-{args.method}-{context}.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
