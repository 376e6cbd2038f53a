"""Shared steps of `omnikv analyze` and `omnikv calibrate`: load, pick prompts, record attention."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from omnikv.analysis.capture import AttentionRecord, record_decode_attention
from omnikv.analysis.inputs import (
    DEFAULT_HAYSTACK,
    check_task,
    default_length,
    prompts_from_files,
    prompts_from_haystack,
    prompts_from_task,
)
from omnikv.errors import ConfigError

# Settings a preset may carry that analysis / calibration reuse.
PRESET_SETTINGS = (
    "filter_layers", "num_wait_layers", "budget", "sink_tokens", "recent_tokens", "selector", "head_reduce",
)


def add_input_arguments(p, model_required: bool = True) -> None:
    """Model, prompt and decode options common to both commands."""
    p.add_argument("--model", required=model_required,
                   help="embedded name (smollm2, gemma3), HF directory or .gguf file")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", action="append", metavar="FILE", help="text file used as a prompt (repeatable)")
    src.add_argument("--task", help="local evaluation task generating the prompts (e.g. niah_single_1)")
    p.add_argument("--length", type=int, default=None,
                   help="prompt length in tokens (default 2048; the built-in haystack: at most the model's context)")
    p.add_argument("--samples", type=int, default=1, help="prompts generated with --task (default 1)")
    p.add_argument("--steps", type=int, default=16, help="greedy decode steps recorded per prompt (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the task generator")
    p.add_argument("--device", default="cpu", help="torch device (default cpu; analysis runs in float32)")
    p.add_argument("--preset", metavar="NAME|FILE", help="built-in preset name or preset file: its budget, "
                   "sink/recent, selector, head reduction (and for calibrate: filter layers as the baseline) "
                   "become the defaults")


def load_preset_settings(preset: str | None) -> dict[str, Any]:
    """The OmniKV settings of a preset (built-in name or file: `omnikv.algorithm.presets.resolve_preset`)."""
    if not preset:
        return {}
    from omnikv.algorithm.presets import resolve_preset

    cfg, _ = resolve_preset(preset)
    return {k: (list(v) if k == "filter_layers" else v) for k, v in cfg.to_dict().items() if k in PRESET_SETTINGS}


def load(model: str, device: str):
    from omnikv.models import load_model

    return load_model(model, dtype="float32", device=device)


def check_input_args(args, *, require_inputs: bool = True) -> None:
    """Fail on bad prompt options before the (slow) model load. Without `require_inputs`
    (calibrate), no --input / --task means the built-in narrative haystack."""
    if (args.length is not None and args.length < 2) or args.steps < 1 or args.samples < 1:
        raise ConfigError("--length must be >= 2, --steps >= 1 and --samples >= 1")
    if require_inputs and not args.input and not args.task:
        raise ConfigError("give the prompts: --input FILE (repeatable) or --task NAME --length L")
    for path in args.input or []:
        if not Path(path).is_file():
            raise ConfigError(f"input file {path} does not exist")
    if args.task:
        check_task(args.task)


def record_inputs(lm, args, *, require_inputs: bool = True) -> tuple[list[AttentionRecord], list[str]]:
    """Build the prompts the arguments ask for and record each one's decode attention."""
    check_input_args(args, require_inputs=require_inputs)
    max_ctx = getattr(lm, "max_context", None)
    if args.input:
        prompts = prompts_from_files(lm.tokenizer, args.input, args.length or 2048)
    elif args.task:
        prompts = prompts_from_task(lm.tokenizer, args.task, args.length or 2048, args.samples, args.seed)
    else:
        length = default_length(max_ctx, args.steps, args.length)
        prompts = prompts_from_haystack(lm.tokenizer, length, args.samples, args.seed)
        print(f"no --input or --task: using the built-in {DEFAULT_HAYSTACK} haystack, {args.samples} prompt(s) of "
              f"{length} tokens (seed {args.seed}); pass --input FILE or --task NAME to calibrate on your own data",
              file=sys.stderr)
    records, sources = [], []
    for source, ids in prompts:
        if max_ctx and len(ids) + args.steps > max_ctx:
            raise ConfigError(f"{source}: {len(ids)} + {args.steps} tokens exceed the model's context {max_ctx}")
        t0 = time.perf_counter()
        records.append(record_decode_attention(lm.model, ids, args.steps))
        print(f"recorded {source}: {len(ids)} prompt tokens, {args.steps} steps "
              f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
        sources.append(source)
    return records, sources

