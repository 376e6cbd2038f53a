"""Argument helpers shared by the CLI commands that load a model and run a KV method.

`add_model_arguments(p)` adds --model/--dtype/--device, `add_method_arguments(p)` the method flags
(--method, --budget, the OmniKV knobs, --prefill-chunk-size), `add_sampling_arguments(p)` the
decoding flags and `add_prompt_arguments(p)` prompt input (argument, --prompt-file, stdin, --chat).
`build_method(args)` turns the parsed flags into a configured `omnikv.methods.Method`;
`read_prompt(args)` and `encode_prompt(...)` give the token ids. Bad values fail with one line:
flag parsers raise `argparse.ArgumentTypeError`, and `one_line_errors(parser)` makes argparse print
that message as one line (no usage block) with exit code 2, like the handlers' `OmniKVError`s.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omnikv.config import HEAD_REDUCTIONS, SELECTORS
from omnikv.errors import ConfigError, InputError

# Chunked prefill bounds activation memory and lets the progress bar move; results are identical
# to one pass (tested in tests/test_omnikv_equivalence.py). 1024 was the fastest size
# measured on CPU for Gemma 3.
DEFAULT_PREFILL_CHUNK = 1024


# ---------------------------------------------------------------------------------------------
# Flag value parsers (argparse `type=` functions)


def parse_budget(text: str) -> int | float:
    """argparse type: `256` -> 256 prompt tokens; `0.1` -> 10% of the prompt (omnikv.budget)."""
    from omnikv.budget import parse_budget as parse

    try:
        return parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_layers(text: str) -> tuple[int, ...]:
    """`2,8,18` -> (2, 8, 18): sorted, distinct, non-negative layer indices."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        layers = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"filter layers must be comma-separated layer indices, e.g. 2,8,18; got {text!r}") from None
    if not layers or any(i < 0 for i in layers):
        raise argparse.ArgumentTypeError(
            f"filter layers must be non-negative layer indices, e.g. 2,8,18; got {text!r}")
    if len(set(layers)) != len(layers):
        raise argparse.ArgumentTypeError(f"filter layers repeat an index: {text!r}")
    return tuple(sorted(layers))


def _int_at_least(minimum: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer >= {minimum}; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{what} must be >= {minimum}; got {value}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _int_at_least(1, "value")
non_negative_int = _int_at_least(0, "value")


def _float_in(low: float, high: float, what: str, *, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number; got {text!r}") from None
        ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
        if not ok:
            span = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"{what} must be in {span}; got {text!r}")
        return value

    return parse


# ---------------------------------------------------------------------------------------------
# Argument groups


def add_command(subparsers: Any, name: str, func: Any, *, help: str, description: str) -> argparse.ArgumentParser:
    """The subparser of command `name`, running `func(args) -> exit code`, reporting bad flags in one
    line (what every `cmd_*.register` starts with)."""
    p = subparsers.add_parser(name, help=help, description=description)
    one_line_errors(p)
    p.set_defaults(func=func)
    return p


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make argparse report bad flags as one line (`omnikv CMD: error: ...`), exit code 2."""

    def error(message: str) -> None:  # replaces print_usage + message
        parser.exit(2, f"{parser.prog}: error: {message} (see {parser.prog} --help)\n")

    parser.error = error  # type: ignore[method-assign]
    return parser


def add_model_arguments(p: argparse.ArgumentParser, *, default: str | None = None) -> None:
    p.add_argument(
        "--model", default=default, required=default is None,
        help="embedded model name (gemma3, smollm2), Hugging Face checkpoint directory or .gguf file"
        + (f" (default {default})" if default else ""))
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")


def add_method_arguments(p: argparse.ArgumentParser, *, method: bool = True) -> None:
    """--method (optional) and the flags that configure it."""
    if method:
        p.add_argument("--method", default="omnikv",
                       help="KV method: omnikv (default), full, full_prealloc, full_offload, streaming_llm, "
                       "h2o, ... (`omnikv models` lists them)")
    g = p.add_argument_group("method options")
    g.add_argument("--budget", type=parse_budget, default=None,
                   help="prompt tokens a sparse layer attends to (int) or a fraction of the prompt (float in (0, 1]); "
                   "default: the model's preset")
    g.add_argument("--preset", default=None,
                   help="OmniKV preset: a built-in name (see `omnikv models`) or a preset JSON file from `omnikv calibrate`")
    g.add_argument("--filter-layers", type=parse_layers, default=None, metavar="I,J,...",
                   help="OmniKV filter layers, e.g. 2,8,18 (default: the model's preset)")
    g.add_argument("--num-wait-layers", type=non_negative_int, default=None, metavar="N",
                   help="dense layers after each filter layer (default: the preset's)")
    g.add_argument("--selector", default=None, choices=SELECTORS,
                   help="how filter layers score tokens (default: the preset's)")
    g.add_argument("--head-reduce", default=None, choices=HEAD_REDUCTIONS,
                   help="how head scores are combined (default: the preset's)")
    g.add_argument("--offload", default=None, action=argparse.BooleanOptionalAction,
                   help="keep sparse layers' KV in host memory (default: on with an accelerator, off on CPU)")
    g.add_argument("--sink-tokens", type=non_negative_int, default=None, metavar="N",
                   help="first prompt tokens always attended (default: the method's)")
    g.add_argument("--recent-tokens", type=non_negative_int, default=None, metavar="N",
                   help="last prompt tokens always attended (default: the method's)")
    g.add_argument("--selection-block", type=positive_int, default=None, metavar="N",
                   help="omnikv: select whole blocks of N prompt tokens (default 1: tokens; vLLM's CPU "
                   "backend uses its block size, 128)")
    g.add_argument("--telemetry", default=None, action="store_true",
                   help="omnikv: also compute each sparse layer's true attention every step and report how much of "
                   "it the selection covers (slower; off by default)")
    g.add_argument("--compile", default=None, action="store_true",
                   help="static-shape decode steps captured with torch.compile (inductor; CUDA graphs on CUDA); "
                   "full_prealloc and omnikv (selector last/softmax_last); the first step compiles (timed apart)")
    g.add_argument("--prefill-chunk-size", type=positive_int, default=DEFAULT_PREFILL_CHUNK, metavar="N",
                   help=f"prefill in chunks of N tokens (default {DEFAULT_PREFILL_CHUNK}; same result, bounded memory)")


def add_sampling_arguments(p: argparse.ArgumentParser, *, max_new_tokens: int | None = 256) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens, metavar="N",
                   help=f"most tokens to generate (default {max_new_tokens if max_new_tokens else 'per mode'})")
    g.add_argument("--temperature", type=_float_in(0, 100, "temperature"), default=0.0,
                   help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-p", type=_float_in(0, 1, "top-p", low_open=True), default=1.0, help="nucleus sampling (default 1.0)")
    g.add_argument("--top-k", type=non_negative_int, default=0, help="sample among the k likeliest tokens (0 = all)")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text is generated (repeatable)")


def add_prompt_arguments(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("prompt", nargs="?", default=None,
                   help="the prompt text; '-' or nothing reads it from stdin" if required
                   else "the prompt text ('-' reads stdin)")
    p.add_argument("--prompt-file", default=None, metavar="FILE", help="read the prompt from a UTF-8 text file")
    p.add_argument("--chat", default=None, action=argparse.BooleanOptionalAction,
                   help="wrap the prompt in the model's chat template (default: on when the tokenizer has one)")


# ---------------------------------------------------------------------------------------------
# Building things from the parsed flags


# The method flags, by option name (a method takes the ones among its fields; `omnikv models`).
METHOD_FLAGS = ("preset", "filter_layers", "num_wait_layers", "selector", "head_reduce", "offload", "sink_tokens",
                "recent_tokens", "selection_block", "telemetry", "compile")


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The method flags the user actually gave (None = not given), by option name. Commands that
    do not define a flag simply do not give it."""
    return {n: getattr(args, n) for n in METHOD_FLAGS if getattr(args, n, None) is not None}


def build_method(args: argparse.Namespace, name: str | None = None):
    """A configured Method from --method (or `name`), --budget, --preset and the method flags.

    A flag the method does not take fails here, naming the methods that do take it; a --preset
    (built-in name or file) is resolved by `omnikv.algorithm.presets.resolve_preset` inside the method."""
    from omnikv.methods import get_method, method_class, methods_taking
    from omnikv.methods.spec import parse_method

    spec = parse_method(name or args.method)  # a spec: `kvpress:TOVAPress`, `snapkv:window_size=16`
    name = spec.name
    cls = method_class(name)  # ConfigError listing the methods when unknown
    options = {**spec.options, **method_options(args)}
    foreign = [k for k in options if k not in cls.option_names()]
    if foreign:
        takers = sorted({m for k in foreign for m in methods_taking(k)})
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in foreign)
        raise ConfigError(f"{flags} configure the {', '.join(takers)} method{'s' if len(takers) > 1 else ''} "
                          f"only, not {name!r}")
    return get_method(name, budget=getattr(args, "budget", None), **options)


def read_text_file(path: str, what: str = "file") -> str:
    """The UTF-8 text of `path`; InputError (one line, what to do) when missing or not UTF-8."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{what} {path} does not exist")
    if p.is_dir():
        raise InputError(f"{what} {path} is a directory; give a text file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{what} {path} is not UTF-8 text (invalid byte at offset {exc.start}); convert it, "
            f"e.g. iconv -f latin1 -t utf-8 {path} > prompt.txt") from None
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror}") from None


def read_stdin() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"stdin is not UTF-8 text (invalid byte at offset {exc.start})") from None


def read_prompt(args: argparse.Namespace, *, optional: bool = False) -> str | None:
    """The prompt from the argument, --prompt-file or stdin (in that order of precedence)."""
    if args.prompt is not None and args.prompt != "-" and args.prompt_file:
        raise InputError("give the prompt either as an argument or with --prompt-file, not both")
    if args.prompt_file:
        text = read_text_file(args.prompt_file, "prompt file")
    elif args.prompt == "-" or (args.prompt is None and not optional and not sys.stdin.isatty()):
        text = read_stdin()
    elif args.prompt is not None:
        text = args.prompt
    elif optional:
        return None
    else:
        raise InputError("no prompt: pass it as an argument, with --prompt-file FILE, or on stdin")
    if not text.strip():
        raise InputError("the prompt is empty")
    return text


def use_chat(args: argparse.Namespace, lm) -> bool:
    chat = getattr(args, "chat", None)
    if chat and not lm.has_chat_template:
        raise ConfigError(f"--chat: the model {lm.name} has no chat template (a base model); drop --chat")
    return lm.has_chat_template if chat is None else bool(chat)


def chat_text(tokenizer, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
    """The chat template rendered as text (special tokens such as BOS included as text)."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def encode(tokenizer, text: str, *, special: bool) -> list[int]:
    """Token ids of `text`; `special` adds the tokenizer's BOS (raw prompts to base models)."""
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_prompt(lm, text: str, chat: bool) -> list[int]:
    """Prompt ids: through the chat template (which writes its own BOS) or raw with BOS."""
    if chat:
        return encode(lm.tokenizer, chat_text(lm.tokenizer, [{"role": "user", "content": text}]), special=False)
    return encode(lm.tokenizer, text, special=True)


def check_fits(lm, n_prompt: int, what: str = "the prompt") -> None:
    """InputError when the prompt (plus one generated token) exceeds the model's context."""
    limit = lm.max_context
    if limit and n_prompt + 1 > limit:
        raise InputError(
            f"{what} is {n_prompt} tokens but {lm.name}'s context is {limit} tokens; shorten it")


def sampling_params(args: argparse.Namespace, *, max_new_tokens: int | None = None, stop: Sequence[str] = ()):
    from omnikv.decoding.generation import SamplingParams

    return SamplingParams(
        max_new_tokens=max_new_tokens or args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
        stop=tuple(args.stop or ()) + tuple(stop),
    )


def load(args: argparse.Namespace):
    """Load --model (validating --dtype/--device first, so a typo fails before a slow load)."""
    from omnikv.models import load_model

    quiet_warnings()
    return load_model(args.model, dtype=args.dtype, device=args.device)


def quiet_warnings() -> None:
    """Print Python warnings (e.g. 'no OmniKV preset for this model') as one line each."""

    def fmt(message, category, filename, lineno, line=None) -> str:  # noqa: ARG001
        return f"omnikv: warning: {message}\n"

    warnings.formatwarning = fmt


# ---------------------------------------------------------------------------------------------
# Output helpers


def human_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover


def stats_line(res, device: str) -> str:
    """One line: prompt tokens, prefill time, decode speed, device/host KV bytes (+ telemetry)."""
    line = (
        f"[{res.method}] prompt {res.prompt_tokens} tokens, prefill {res.prefill_seconds:.2f} s, "
        f"decode {res.generated_tokens} tokens at {res.decode_tokens_per_second:.1f} tok/s, "
        f"KV {human_bytes(res.stats.get('device_kv_bytes'))} on {device}, "
        f"{human_bytes(res.stats.get('host_kv_bytes'))} on host"
    )
    tel = res.stats.get("telemetry")
    if tel and tel.get("mean_coverage") is not None:
        per_layer = " ".join(f"{k}:{v['coverage']:.2f}" for k, v in tel["layers"].items())
        line += (f"\n[telemetry] sparse layers see {tel['mean_coverage']:.3f} of their attention mass "
                 f"(recall of own top-k {tel['mean_recall']:.3f}); per layer {per_layer}")
    return line


def result_dict(res) -> dict[str, Any]:
    """GenerationResult as a JSON-able dict (text, token ids, timings, KV bytes, method, config)."""
    return res.to_dict()
