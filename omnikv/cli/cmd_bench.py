"""`omnikv bench`: decode speed and KV memory per method and context length (table, PNG, JSON)."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from omnikv.cli.common import add_command, parse_budget
from omnikv.errors import ConfigError

DEFAULT_METHODS = "full,full_prealloc,omnikv"


def register(subparsers) -> None:
    p = add_command(
        subparsers, "bench", run,
        help="time decode (ms/token) and measure KV memory per method and context length",
        description="For each context length, fill every method's cache (synthetic KV with "
        "--synthetic-kv, else a real prefill), then time decode steps with the methods interleaved "
        "round by round. Prints a table, writes bench.json (records + run metadata) and bench.png "
        "(ms/token and device KV against context) under --output-dir; --json prints the records on "
        "stdout (the table then goes to stderr).",
    )
    p.add_argument("--model", default="smollm2", help="embedded model name (smollm2, gemma3), HF directory or .gguf file")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated methods; options as name:key=value, e.g. "
                   f"'full,omnikv:offload=false:budget=2048' (default {DEFAULT_METHODS})")
    p.add_argument("--contexts", default="4k,8k,16k,32k", help="comma-separated context lengths, e.g. 8k,16k,32k")
    p.add_argument("--synthetic-kv", action="store_true",
                   help="fill caches with random KV of the right shapes instead of a real prefill "
                   "(decode timings barely depend on the values; OmniKV's partial reload is the exception: "
                   "synthetic KV is its worst case; H2O/SnapKV are skipped)")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps per method and context (default 64)")
    p.add_argument("--warmup", type=int, default=8, help="untimed decode steps first (default 8)")
    p.add_argument("--breakdown-steps", type=int, default=16,
                   help="extra instrumented steps for the selection/gather/attention/rest breakdown (0: none)")
    p.add_argument("--budget", type=parse_budget, default=None,
                   help="the one budget of every budgeted method: prompt tokens (int) or prompt fraction "
                   "(default 1024 tokens for all of them; a per-method budget such as omnikv:budget=2048 "
                   "is flagged in the table)")
    p.add_argument("--compile", action="store_true",
                   help="add compile=true to every method that has a static-shape step (full_prealloc, omnikv); "
                   "to compare compiled and eager in one run, list both, e.g. omnikv,omnikv:compile=true")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--prefill-chunk", type=int, default=2048, help="chunk size of the real prefill (default 2048)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="omnikv-bench", help="where bench.json and bench.png go (default ./omnikv-bench)")
    p.add_argument("--json", action="store_true", help="print the records as a JSON list on stdout")
    p.add_argument("--no-plot", action="store_true", help="do not write bench.png")


def command_of(args: argparse.Namespace) -> list[str]:
    """The exact command, rebuilt from the parsed arguments (also right when called as a function)."""
    cmd = ["omnikv", "bench"]
    for key, value in sorted(vars(args).items()):
        if key in ("func", "command") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        cmd += [flag] if value is True else [flag, str(value)]
    return cmd


def run(args: argparse.Namespace) -> int:
    import torch

    from omnikv.bench.run import BenchSpec, budget_plan, parse_contexts, public_records, run_bench
    from omnikv.methods.spec import parse_methods, with_compile
    from omnikv.bench.report import finish_metadata, format_table, plot, run_metadata, write_results
    from omnikv.models import load_model

    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1; got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.prefill_chunk < 1:
        raise ConfigError(f"--prefill-chunk must be >= 1; got {args.prefill_chunk}")
    methods = parse_methods(args.methods)
    if args.compile:
        methods = [with_compile(m) for m in methods]
    spec = BenchSpec(
        methods=methods, contexts=parse_contexts(args.contexts),
        synthetic_kv=args.synthetic_kv, steps=args.steps, warmup=args.warmup,
        breakdown_steps=args.breakdown_steps, batch=args.batch, budget=args.budget,
        prefill_chunk=args.prefill_chunk, seed=args.seed,
    )
    out = sys.stderr if args.json else sys.stdout

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    model = lm.model
    device = next(model.parameters()).device
    limit = lm.max_context
    longest = max(spec.contexts)
    if limit and longest > limit:
        log(f"note: {longest} tokens exceed {lm.name}'s trained context ({limit}); timings are still "
            "valid, outputs would not be")
    meta = run_metadata(command_of(args), device)
    from omnikv.hf.compat import text_config, text_shape

    shape = text_shape(model)
    meta.update(model=lm.name, model_source=str(lm.source), dtype=str(next(model.parameters()).dtype),
                model_config={"model_type": text_config(model).model_type, "layers": shape.layers,
                              "hidden": shape.hidden, "heads": shape.heads, "kv_heads": shape.kv_heads},
                spec={"methods": [m.label for m in spec.methods], "contexts": spec.contexts,
                      "fill": "synthetic" if spec.synthetic_kv else "prefill", "steps": spec.steps,
                      "warmup": spec.warmup, "breakdown_steps": spec.breakdown_steps, "batch": spec.batch,
                      "budget": spec.budget, "budgets": budget_plan(spec).to_json(),
                      "prefill_chunk": spec.prefill_chunk, "seed": spec.seed})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the preset fallback warning, once per cache
        records = public_records(run_bench(model, spec, log=log))
    finish_metadata(meta)
    out_dir = Path(args.output_dir)
    written = [write_results(records, meta, out_dir / "bench.json")]
    if not args.no_plot:
        written.append(plot(records, out_dir / "bench.png", meta))
    print(format_table(records), file=out)
    for path in written:
        print(f"wrote {path}", file=out)
    if args.json:
        print(json.dumps(records))
    return 0
