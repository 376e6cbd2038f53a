"""`omnikv generate`: one prompt through one KV method, streamed to the terminal (or as JSON)."""

from __future__ import annotations

import argparse
import json
import sys

from omnikv.cli import common
from omnikv.cli.common import add_command


def register(subparsers) -> None:
    p = add_command(
        subparsers, "generate", run,
        help="generate a continuation of a prompt with OmniKV (or any other KV method)",
        description="Read a prompt (argument, --prompt-file or stdin), prefill it in chunks and decode with "
        "the chosen KV method. Tokens stream to stdout; a stats line (prompt tokens, prefill time, decode "
        "speed, device and host KV bytes) goes to stderr. --json prints one JSON object instead.",
    )
    common.add_prompt_arguments(p)
    common.add_model_arguments(p)
    common.add_method_arguments(p)
    common.add_sampling_arguments(p, max_new_tokens=256)
    p.add_argument("--json", action="store_true", help="print one JSON object (text, timings, KV bytes, config)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no stats line on stderr")


def run(args: argparse.Namespace) -> int:
    text = common.read_prompt(args)  # input and method errors before the (slow) model load
    method = common.build_method(args)
    params = common.sampling_params(args)
    lm = common.load(args)
    chat = common.use_chat(args, lm)
    ids = common.encode_prompt(lm, text, chat)
    common.check_fits(lm, len(ids))

    from omnikv.decoding.generation import generate

    stream = None
    if not args.json:
        def stream(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

    res = generate(lm.model, lm.tokenizer, ids, method, params, on_token=stream,
                   prefill_chunk_size=args.prefill_chunk_size, progress=not (args.quiet or args.json))
    device = str(next(lm.model.parameters()).device)
    if args.json:
        out = common.result_dict(res)
        out.update(model=lm.name, chat=chat, device=device)
        print(json.dumps(out))
        return 0
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not args.quiet:
        print(common.stats_line(res, device), file=sys.stderr)
    return 0
