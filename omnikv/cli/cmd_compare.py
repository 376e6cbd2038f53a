"""`omnikv compare`: one prompt through full attention and through OmniKV (or another method).

Without a prompt it runs the demo: a long story made by `omnikv.cli.demo` with a pass key hidden in it,
and says whether each method's answer finds the key. Default model: gemma3 (Gemma 3 270M base), the
one embedded model that retrieves from long documents (passkey 6/6 up to 16K tokens with full
attention; SmolLM2-135M already fails beyond ~1K), so a miss is the KV method's, not the model's.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from omnikv.cli import common
from omnikv.cli.common import add_command
from omnikv.errors import ConfigError
from omnikv.methods import REFERENCE

DEFAULT_MODEL = "gemma3"
DEMO_TOKENS = 4000
DEMO_MAX_NEW_TOKENS = 12
PROMPT_MAX_NEW_TOKENS = 128


def register(subparsers) -> None:
    p = add_command(
        subparsers, "compare", run,
        help="run a prompt (default: a long demo document with a hidden pass key) through full attention and OmniKV",
        description="Run the same prompt through full attention and through --method (default omnikv), greedy by "
        "default, and print both answers, whether they agree, and both timings and KV memory. With no prompt, "
        "the prompt is a generated story of --demo-tokens tokens with a pass key hidden in it, and the report "
        "says whether each answer finds the key.",
    )
    common.add_prompt_arguments(p, required=False)
    common.add_model_arguments(p, default=DEFAULT_MODEL)
    common.add_method_arguments(p)
    common.add_sampling_arguments(p, max_new_tokens=None)
    g = p.add_argument_group("demo (used when no prompt is given)")
    g.add_argument("--demo-tokens", type=common.positive_int, default=DEMO_TOKENS, metavar="N",
                   help=f"length of the demo document in tokens (default {DEMO_TOKENS})")
    g.add_argument("--demo-depth", type=float, default=0.5, metavar="F",
                   help="where the pass key is hidden: fraction of the story before it (default 0.5)")
    g.add_argument("--demo-seed", type=int, default=0, help="seed of the story and the key (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object with both results")
    p.add_argument("--quiet", action="store_true", help="no progress messages on stderr")


def run(args: argparse.Namespace) -> int:
    if args.method == REFERENCE:
        raise ConfigError(f"compare always runs {REFERENCE!r} as the reference; choose another --method (e.g. omnikv)")
    text = common.read_prompt(args, optional=True)
    if not 0.0 <= args.demo_depth <= 1.0:
        raise ConfigError(f"--demo-depth must be a fraction in [0, 1]; got {args.demo_depth}")
    from omnikv.methods import get_method

    # The reference takes no options: --budget and the method flags configure the compared method.
    methods = [get_method(REFERENCE), common.build_method(args)]
    max_new = args.max_new_tokens or (PROMPT_MAX_NEW_TOKENS if text is not None else DEMO_MAX_NEW_TOKENS)
    params = common.sampling_params(args, max_new_tokens=max_new)
    lm = common.load(args)

    demo = None
    if text is None:
        from omnikv.cli.demo import demo_prompt

        if lm.max_context and args.demo_tokens >= lm.max_context:
            raise ConfigError(f"--demo-tokens {args.demo_tokens} does not fit {lm.name}'s context of "
                              f"{lm.max_context} tokens; choose fewer")
        demo = demo_prompt(lm.tokenizer, args.demo_tokens, depth=args.demo_depth, seed=args.demo_seed)
        # Raw prompt with an answer prefix: what works for both base and instruct models (docs/evaluation.md).
        chat = bool(args.chat) and common.use_chat(args, lm)
        text = demo.prompt
    else:
        chat = common.use_chat(args, lm)
    ids = common.encode_prompt(lm, text, chat)
    common.check_fits(lm, len(ids))

    from omnikv.decoding.generation import generate

    # A short warm-up run, so that one-time costs (kernel selection, allocator growth) do not land
    # in whichever method happens to run first.
    from omnikv.decoding.generation import SamplingParams

    generate(lm.model, lm.tokenizer, ids[:32], REFERENCE, SamplingParams(max_new_tokens=2, ignore_eos=True))
    results = []
    for method in methods:
        if not (args.quiet or args.json):
            print(f"omnikv compare: running {method.name} on {len(ids)} prompt tokens ...", file=sys.stderr)
        results.append(generate(lm.model, lm.tokenizer, ids, method, params,
                                prefill_chunk_size=args.prefill_chunk_size, progress=not (args.quiet or args.json)))
    device = str(next(lm.model.parameters()).device)
    summary = summarize(results[0], results[1], demo)
    if args.json:
        print(json.dumps({
            "model": lm.name, "device": device, "chat": chat, "prompt_tokens": len(ids),
            "demo": demo.to_dict() if demo else None,
            "results": {r.method: common.result_dict(r) for r in results},
            **summary,
        }))
    else:
        print(render(lm.name, device, len(ids), results, summary, demo, methods[1]))
    return 0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def summarize(ref, other, demo) -> dict[str, Any]:
    """Agreement of the two answers: identical text, shared leading tokens, and (demo) key found."""
    identical = ref.text.strip() == other.text.strip()
    out: dict[str, Any] = {
        "identical": identical,
        "common_prefix_tokens": common_prefix(ref.token_ids, other.token_ids),
    }
    if demo is not None:
        found = {ref.method: demo.found(ref.text), other.method: demo.found(other.text)}
        out["found_key"] = found
        # On the demo "agree" means the same answer to the question: the same first number.
        from omnikv.cli.demo import first_number

        out["agree"] = identical or (first_number(ref.text) is not None
                                     and first_number(ref.text) == first_number(other.text))
    else:
        out["agree"] = identical
    return out


def config_summary(method, res) -> str:
    """The compared method's configuration, as the method itself summarises it."""
    return method.summarize({"prompt_tokens": res.prompt_tokens, **res.stats}, res.config or {})


def render(model: str, device: str, n_prompt: int, results, summary: dict[str, Any], demo, compared) -> str:
    """`compared` is the method of results[1] (it says how it was configured)."""
    ref, other = results
    lines = []
    if demo is not None:
        lines.append(f"Demo: a {demo.tokens}-token story with the pass key {demo.key} hidden at "
                     f"{demo.depth:.0%} depth; model {model} on {device}.")
    else:
        lines.append(f"Prompt: {n_prompt} tokens; model {model} on {device}.")
    rows: list[tuple[str, str, str]] = [("", ref.method, other.method)]
    answers = [json.dumps(r.text, ensure_ascii=False) for r in results]
    inline = all(len(a) <= 40 for a in answers)
    if inline:
        rows.append(("answer", *answers))
    if demo is not None:
        found = summary["found_key"]
        rows.append(("finds the key", *("yes" if found[r.method] else "NO" for r in results)))
    rows += [
        ("prefill", *(f"{r.prefill_seconds:.2f} s" for r in results)),
        ("decode", *(f"{r.decode_tokens_per_second:.1f} tok/s" for r in results)),
        ("device KV", *(common.human_bytes(r.stats.get("device_kv_bytes")) for r in results)),
        ("host KV", *(common.human_bytes(r.stats.get("host_kv_bytes")) for r in results)),
    ]
    w0 = max(len(r[0]) for r in rows) + 2
    w1 = max(len(r[1]) for r in rows) + 3
    lines.append("")
    lines += [f"{a:<{w0}}{b:<{w1}}{c}".rstrip() for a, b, c in rows]
    if not inline:
        for r, a in zip(results, answers):
            lines += ["", f"{r.method} answer:", r.text if r.text.strip() else f"{a} (nothing visible)"]
    lines.append("")
    lines.append(f"{other.method}: {config_summary(compared, other)}")
    if summary["identical"]:
        verdict = "yes (identical text)"
    elif summary["agree"]:
        verdict = f"yes (same key; texts differ after {summary['common_prefix_tokens']} tokens)"
    else:
        verdict = f"no (texts differ after {summary['common_prefix_tokens']} tokens)"
    lines.append(f"answers agree: {verdict}")
    return "\n".join(lines)
