"""`omnikv eval`: accuracy and fidelity of methods on long-context tasks (see docs/evaluation.md).

    omnikv eval --model smollm2 --methods full,omnikv --tasks passkey,niah_single_2 --lengths 1k,2k \\
        --samples 5 --budget 0.1 --output runs/eval1 [--shard 0/2] [--resume] [--fidelity] [--perplexity]
    omnikv eval merge runs/shard0 runs/shard1 --output runs/merged
    omnikv eval --list-tasks
    omnikv eval --list-methods
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from omnikv.cli.common import add_command, parse_budget
from omnikv.errors import ConfigError


def method_labels(args: argparse.Namespace) -> list[str]:
    """The --methods specs to run; with --compile, compile=true added where a static step exists."""
    from omnikv.methods.spec import split_specs

    methods = split_specs(args.methods)
    if not getattr(args, "compile", False):
        return methods
    from omnikv.methods.spec import parse_method, with_compile

    return [with_compile(parse_method(m)).label for m in methods]


def register(subparsers) -> None:
    p = add_command(
        subparsers, "eval", run,
        help="evaluate methods on synthetic (RULER, InfiniteBench, 2StageRetr) or local benchmark tasks",
        description="Run each method on each (task, length, sample), score the greedy output, and write "
        "predictions.jsonl, metrics.json, run.json, summary.md and scores.png to --output. "
        "`omnikv eval merge DIR... --output OUT` merges shard outputs and recomputes the metrics.",
    )
    p.add_argument("action", nargs="*", metavar="merge DIR",
                   help="`merge DIR [DIR ...]`: merge shard output directories into --output")
    p.add_argument("--model", help="embedded name (smollm2, gemma3), HF checkpoint directory or .gguf file")
    p.add_argument("--methods", default="full,omnikv",
                   help="comma-separated methods, variants as name:key=value, e.g. "
                   "'full,omnikv,omnikv:selector=uniform' (default full,omnikv)")
    p.add_argument("--tasks", default=None,
                   help="comma-separated tasks; see --list-tasks (default passkey; shared_context with --documents)")
    p.add_argument("--documents", default=None, metavar="FILE",
                   help="your own documents and questions for the shared_context task: a JSONL file, one "
                   '{"document": ..., "questions": [{"question": ..., "answers": [...]}]} per line '
                   "(docs/evaluation.md, \"Your own documents\")")
    p.add_argument("--lengths", default="1k", help="comma-separated prompt lengths in tokens: 2048, 2k, 1.5k "
                   "(k = 1024); for dataset tasks the truncation limit (default 1k)")
    p.add_argument("--samples", type=int, default=5, help="samples per (task, length) (default 5)")
    p.add_argument("--budget", type=parse_budget, default=None,
                   help="the one budget of every budgeted method: prompt tokens a budgeted layer attends (int) "
                   "or a fraction of the prompt (default 0.1 for all of them; a per-method budget such as "
                   "omnikv:budget=1024 is flagged in every report)")
    p.add_argument("--output", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated samples (default 0)")
    p.add_argument("--shard", default=None,
                   help="i/n: run every n-th work unit starting at i (default 0/1; under `accelerate launch` "
                   "or torchrun: this process's rank, into OUTPUT/shard-i-of-n, merged by the last to finish)")
    p.add_argument("--resume", action="store_true", help="continue a run in --output, skipping finished items")
    p.add_argument("--fidelity", action="store_true",
                   help="also measure agreement / KL against full attention (adds full to the methods)")
    p.add_argument("--perplexity", action="store_true", help="also record each method's perplexity of the reference answer")
    p.add_argument("--haystack", choices=("noise", "narrative", "pydoc"), default=None,
                   help="haystack of every task that has a prose one (niah_single_*, multikey_1, multivalue, "
                   "multiquery, vt, passkey, number_string); default: each task's own")
    p.add_argument("--question-position", choices=("after", "before"), default="after",
                   help="where generated needle tasks state their question: after the haystack (default, RULER's "
                   "layout) or before it (then only a neutral answer prefix follows the haystack); for niah_*, "
                   "passkey, number_string, kv_retrieval and vt (docs/evaluation.md)")
    p.add_argument("--task-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="generator option for every generated task, e.g. n_keys=4 (value parsed as JSON)")
    p.add_argument("--method-opt", action="append", default=[], metavar="[METHOD.]KEY=VALUE",
                   help="method option, e.g. omnikv.preset=p.json or sink_tokens=4 (all non-full methods)")
    p.add_argument("--preset", default=None, help="OmniKV preset: a built-in name or a preset file (same as --method-opt omnikv.preset=...)")
    p.add_argument("--data-dir", default=None, help="directory with official LongBench / InfiniteBench files")
    p.add_argument("--max-new-tokens", type=int, default=None, help="cap every sample's generation length")
    p.add_argument("--prefill-chunk-size", type=int, default=None, help="chunked prefill (tokens per chunk)")
    p.add_argument("--separate-prefill", action="store_true",
                   help="prefill every method (and fidelity / perplexity pass) on its own instead of forking "
                   "all of them from one shared prefill per sample (same results, slower; for timing)")
    p.add_argument("--compile", action="store_true",
                   help="add compile=true to every method with a static-shape decode step (full_prealloc, omnikv): "
                   "torch.compile captures its step, compile time reported apart; to compare both in one run list "
                   "them instead, e.g. omnikv,omnikv:compile=true")
    p.add_argument("--dtype", default=None, help="model dtype (default float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--merge", nargs="+", metavar="DIR", default=None, help="same as `merge DIR...`")
    p.add_argument("--list-tasks", action="store_true", help="list the built-in tasks and exit")
    p.add_argument("--list-methods", action="store_true",
                   help="list the methods --methods takes, with their options (kvpress's presses when kvpress is "
                        "installed), and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


COMMON_OPTIONS = frozenset({"budget", "static", "compile", "compile_backend", "compile_mode"})


def print_methods() -> None:
    """One line per registered method: its name, what it keeps (exact / drop-free / lossy) and its
    own options (every budgeted method also takes budget=)."""
    from omnikv.methods import available_methods, method_class
    from omnikv.methods.presses import kvpress_available, press_names

    for name in available_methods():
        cls = method_class(name)
        kind = "exact" if not cls.takes_budget else "lossy" if cls.lossy else "drop-free"
        options = sorted(cls.option_names() - COMMON_OPTIONS)
        print(f"{name:14s} {kind:9s} options: {', '.join(options) or '-'}")
    if kvpress_available():
        print("kvpress presses (kvpress:<Press> or kvpress:<Press>(key=value, ...)): " + ", ".join(press_names()))
    else:
        print("kvpress presses: kvpress is not installed (pip install kvpress; kvpress 0.5.5 needs transformers < 5.3)")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_options(items: list[str], flag: str) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} {item!r}: use KEY=VALUE")
        out.append((key.strip(), _parse_value(value)))
    return out


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def run(args: argparse.Namespace) -> int:
    from omnikv.eval.launch import finish_shard, launcher_rank, start_shard
    from omnikv.eval.runner import EvalConfig, merge_outputs, parse_length, parse_shard, run_eval

    if args.list_methods:
        print_methods()
        return 0
    if args.list_tasks:
        from omnikv.eval.loaders import SUITES
        from omnikv.eval.tasks import TASKS

        for name, gen in sorted(TASKS.items()):
            print(f"{name:22s} {(gen.__doc__ or '').strip().splitlines()[0]}")
        print("dataset tasks (need --data-dir): " + ", ".join(f"{s}:<name>" for s in SUITES))
        return 0
    merge_dirs = args.merge
    if args.action:
        if args.action[0] != "merge":
            raise ConfigError(f"unknown eval action {args.action[0]!r}; the only one is `merge DIR...`")
        merge_dirs = args.action[1:]
    if not args.output:
        raise ConfigError("--output DIR is required")
    if merge_dirs is not None:
        metrics = merge_outputs([Path(d) for d in merge_dirs], Path(args.output))
        print(f"merged {len(merge_dirs)} directories into {args.output} "
              f"({sum(r['n'] for r in metrics['rows'])} records)")
        return _report_failures(Path(args.output), "merged output")
    if not args.model:
        raise ConfigError("--model is required (embedded name, checkpoint directory or .gguf file)")

    task_options = dict(_parse_options(args.task_opt, "--task-opt"))
    method_options: dict[str, dict[str, Any]] = {}
    for key, value in _parse_options(args.method_opt, "--method-opt"):
        method, dot, opt = key.rpartition(".")
        method_options.setdefault(method if dot else "*", {})[opt] = value
    if args.preset:
        method_options.setdefault("omnikv", {})["preset"] = args.preset
    tasks = _split(args.tasks or ("shared_context" if args.documents else "passkey"))
    output, shard, device = Path(args.output), parse_shard(args.shard or "0/1"), args.device
    launched = launcher_rank() if args.shard is None else None
    if launched is not None:  # accelerate launch / torchrun: one shard per process
        rank, world, local = launched
        shard = (rank, world)
        output = start_shard(Path(args.output), rank, world)
        import torch

        if device is None and torch.cuda.is_available():
            device = f"cuda:{local % torch.cuda.device_count()}"
        if device is not None and torch.device(device).type == "cuda":
            # Make it this process's current device: otherwise every rank opens a context (and
            # current-stream work) on GPU 0.
            torch.cuda.set_device(torch.device(device))
    config = EvalConfig(
        model=args.model, methods=method_labels(args), tasks=tasks,
        lengths=[parse_length(x) for x in _split(args.lengths)], output=output,
        samples=args.samples, budget=args.budget, seed=args.seed, shard=shard,
        resume=args.resume, fidelity=args.fidelity, perplexity=args.perplexity, task_options=task_options,
        haystack=args.haystack, question_position=args.question_position, method_options=method_options, data_dir=args.data_dir, dtype=args.dtype, device=device,
        prefill_chunk_size=args.prefill_chunk_size, max_new_tokens=args.max_new_tokens,
        progress=not args.no_progress, shared_prefill=not args.separate_prefill, documents=args.documents,
    )
    metrics = run_eval(config)
    if launched is not None:
        metrics = finish_shard(Path(args.output), launched[0], launched[1])
        if metrics is None:
            print(f"shard {launched[0]}/{launched[1]} done in {output}; the last shard to finish merges into {args.output}")
            return _report_failures(output, f"shard {launched[0]}/{launched[1]}")
        output = Path(args.output)
    print((output / "summary.md").read_text(), end="")
    n = sum(r["n"] for r in metrics["rows"])
    print(f"{n} records in {output}/predictions.jsonl")
    return _report_failures(output, "run")


def _report_failures(output: Path, what: str) -> int:
    """1 (and why, on stderr) when `output`'s run.json names failed methods, else 0."""
    run_json = output / "run.json"
    failed = json.loads(run_json.read_text()).get("failed_methods") if run_json.is_file() else None
    if not failed:
        return 0
    for name, why in failed.items():
        print(f"omnikv eval: method {name} failed: {why}", file=sys.stderr)
    print(f"omnikv eval: {len(failed)} method(s) failed in this {what} and have no records past their error; "
          f"the others are complete (--resume tries the failed ones again)", file=sys.stderr)
    return 1

