"""`omnikv plan`: how much device and host memory a context needs, per method (no weights loaded)."""

from __future__ import annotations

import argparse
import json

from omnikv.cli.common import add_command, non_negative_int, parse_budget, positive_int
from omnikv.errors import InputError, ModelLoadError

GiB = 1024**3

# Shapes of well-known checkpoints, so hardware can be sized without the files.
KNOWN_SHAPES = {
    "llama-3-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
        tie_word_embeddings=False,
    ),
}


def parse_tokens(text: str) -> int:
    from omnikv.budget import parse_token_count

    return parse_token_count(text, "context")


def load_config(spec: str):
    from transformers import AutoConfig

    if spec in KNOWN_SHAPES:
        kw = dict(KNOWN_SHAPES[spec])
        return AutoConfig.for_model(kw.pop("model_type"), **kw)
    from pathlib import Path

    from omnikv.models import EMBEDDED_MODELS, ensure_gguf_converted, ensure_converted

    if spec in EMBEDDED_MODELS:
        path = ensure_converted(EMBEDDED_MODELS[spec])
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise ModelLoadError(f"model {spec!r} not found: give a short name ({', '.join(EMBEDDED_MODELS)}), "
                                 f"one of {sorted(KNOWN_SHAPES)}, a checkpoint directory or a .gguf file")
        if path.is_file():
            path = ensure_gguf_converted(path.resolve())
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read a model config from {path}: {exc}") from None


def register(sub) -> None:
    p = add_command(sub, "plan", run, help="estimate device/host memory for a context length, per method",
                    description="Estimate the device and host memory one request needs at a context length, per method, without loading weights.")
    p.add_argument("--model", default="gemma3", help=f"short name, local path, or one of {sorted(KNOWN_SHAPES)}")
    p.add_argument("--context", required=True, help="prompt tokens, e.g. 128k")
    p.add_argument("--methods", default="full,full_offload,omnikv,quest", help="comma-separated methods")
    p.add_argument("--budget", type=parse_budget, default=None,
                   help="prompt tokens a sparse layer attends to (int) or a fraction of the prompt (float in (0, 1]; 1.0 = all)")
    p.add_argument("--device", default="cuda", help="device the model would run on (cuda or cpu)")
    p.add_argument("--dtype-bytes", type=positive_int, default=2, help="bytes per element (2 = bf16/fp16, 4 = fp32)")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=256)
    p.add_argument("--prefill-chunk-size", type=positive_int, default=None)
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from omnikv.methods.memory import plan_memory
    from omnikv.methods import available_methods

    context = parse_tokens(args.context)
    budget = args.budget
    try:
        config = load_config(args.model)
    except ModelLoadError:
        raise
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise InputError(f"--methods is empty; give some of: {', '.join(available_methods())}")
    unknown = sorted(set(methods) - set(available_methods()))
    if unknown:
        raise InputError(f"unknown methods {unknown}; available: {', '.join(available_methods())}")
    plans = [
        plan_memory(
            config, context, m, device=args.device, dtype_bytes=args.dtype_bytes,
            max_new_tokens=args.max_new_tokens, prefill_chunk_size=args.prefill_chunk_size, budget=budget,
        )
        for m in methods
    ]
    if args.json:
        print(json.dumps([p.to_dict() for p in plans], indent=2))
        return 0
    print(f"model {args.model}, context {context} tokens, {args.device}, {args.dtype_bytes} bytes/element")
    print(f"{'method':14s} {'device GiB':>10s} {'host GiB':>9s} {'KV on device':>12s} {'KV in bank':>11s} "
          f"{'dev KV/full':>11s} {'fits':>5s}")
    for p in plans:
        d = p.to_dict()
        print(
            f"{p.method:14s} {p.device_total_bytes / GiB:10.2f} {p.host_total_bytes / GiB:9.2f} "
            f"{p.device_kv_bytes / GiB:12.2f} {p.host_kv_bytes / GiB:11.2f} "
            f"{d['device_kv_share_of_full']:11.2f} {_fits_label(p):>5s}"
        )
    print("GiB = 2^30 bytes; estimates (KV exact for our layouts, activations a rule of thumb); "
          "on a CPU run everything is host memory.")
    if any(_fits_label(p) == "?" for p in plans):
        print(f"? = fits in host memory, but {args.device}'s free memory is unknown on this machine")
    return 0


def _fits_label(plan) -> str:
    """'NO' when a known limit is exceeded; '?' when the device's free memory cannot be read here
    (planning for a GPU on a machine without it), rather than claiming it fits."""
    if not plan.fits:
        return "NO"
    if plan.device.startswith("cuda") and plan.device_available_bytes is None:
        return "?"
    return "yes"
