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


def parse_bytes(text: str) -> int:
    """'80GiB', '80G', '141GB', '512MiB' or a plain byte count -> bytes (GiB/G = 2^30, GB = 10^9)."""
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(gib|g|gb|mib|m|mb|tib|t|tb)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"bad memory size {text!r}: use e.g. 80GiB, 141GB or 85899345920")
    unit = {None: 1, "gib": GiB, "g": GiB, "gb": 10**9, "mib": 2**20, "m": 2**20, "mb": 10**6,
            "tib": 2**40, "t": 2**40, "tb": 10**12}[m.group(2)]
    value = int(float(m.group(1)) * unit)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"memory size {text!r} must be > 0")
    return value


def register(sub) -> None:
    p = add_command(sub, "plan", run, help="estimate device/host memory for a context length, per method",
                    description="Estimate the device and host memory one request needs at a context length, per "
                                "method (decode steady state and prefill peak), and the longest context each "
                                "method fits in a given device memory, without loading weights.")
    p.add_argument("--model", default="gemma3", help=f"short name, local path, or one of {sorted(KNOWN_SHAPES)}")
    p.add_argument("--context", required=True, help="prompt tokens, e.g. 128k")
    p.add_argument("--methods", default="full,full_prealloc,full_offload,omnikv,quest",
                   help="comma-separated methods (omnikv is planned with offload on and off)")
    p.add_argument("--budget", type=parse_budget, default=None,
                   help="prompt tokens a sparse layer attends to (int) or a fraction of the prompt (float in (0, 1]; 1.0 = all)")
    p.add_argument("--device", default="cuda", help="device the model would run on (cuda or cpu)")
    p.add_argument("--device-memory", type=parse_bytes, default=None,
                   help="device memory to plan for, e.g. 80GiB (default: this machine's free GPU memory, if any)")
    p.add_argument("--host-memory", type=parse_bytes, default=None,
                   help="host memory to plan for (the Context Bank lives there), e.g. 512GiB (default: this "
                        "machine's available memory): plan for the server you will run on, not this one")
    p.add_argument("--dtype-bytes", type=positive_int, default=2, help="bytes per element (2 = bf16/fp16, 4 = fp32)")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=256)
    p.add_argument("--prefill-chunk-size", type=positive_int, default=4096,
                   help="prompt tokens per forward (default 4096; the offload prefill streams prefixes per chunk)")
    p.add_argument("--json", action="store_true")


def plan_rows(config, context: int, names: list[str], args: argparse.Namespace) -> list[dict]:
    """One row per (method, offload): the plan at `context` and the longest context that fits."""
    from omnikv.methods import get_method
    from omnikv.methods.memory import max_context, plan_memory

    rows = []
    for name in names:
        variants = [dict(offload=True), dict(offload=False)] if name == "omnikv" else [{}]
        for opts in variants:
            budget = args.budget
            method = get_method(name, budget=budget, **opts) if (budget is not None or opts) else get_method(name)
            plan = plan_memory(config, context, method, device=args.device, dtype_bytes=args.dtype_bytes,
                               max_new_tokens=args.max_new_tokens, prefill_chunk_size=args.prefill_chunk_size)
            if args.device_memory is not None:
                plan.device_available_bytes = args.device_memory
            if args.host_memory is not None:
                plan.host_available_bytes = args.host_memory
            row = plan.to_dict()
            row["max_context"] = None
            if plan.device.startswith("cuda") and plan.device_available_bytes is not None:
                # the host memory `fits` counts (--host-memory, else this machine's free memory)
                row["max_context"] = max_context(config, method, plan.device_available_bytes,
                                                 dtype_bytes=args.dtype_bytes, max_new_tokens=args.max_new_tokens,
                                                 prefill_chunk_size=args.prefill_chunk_size,
                                                 host_bytes=plan.host_available_bytes)
            row["fits_label"] = _fits_label(plan)
            rows.append(row)
    return rows


def run(args: argparse.Namespace) -> int:
    from omnikv.methods import available_methods

    context = parse_tokens(args.context)
    config = load_config(args.model)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise InputError(f"--methods is empty; give some of: {', '.join(available_methods())}")
    unknown = sorted(set(methods) - set(available_methods()))
    if unknown:
        raise InputError(f"unknown methods {unknown}; available: {', '.join(available_methods())}")
    rows = plan_rows(config, context, methods, args)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    memory = rows[0]["device_available_bytes"]
    where = f"{memory / GiB:.1f} GiB of device memory" if memory else "device memory unknown (--device-memory)"
    print(f"model {args.model}, context {context} tokens, {args.device} ({where}), {args.dtype_bytes} bytes/element, "
          f"{args.prefill_chunk_size}-token prefill chunks, {args.max_new_tokens} new tokens")
    print(f"{'method':14s} {'offload':>7s} {'decode GiB':>10s} {'prefill peak':>12s} {'host GiB':>9s} "
          f"{'dev KV/full':>11s} {'fits':>5s} {'max context':>12s}")
    for r in rows:
        offload = {True: "on", False: "off", None: "-"}[r["offload"]]
        longest = f"{r['max_context']:,}" if r["max_context"] else "-"
        print(f"{r['method']:14s} {offload:>7s} {r['decode_device_bytes'] / GiB:10.2f} "
              f"{r['prefill_peak_device_bytes'] / GiB:12.2f} {r['host_total_bytes'] / GiB:9.2f} "
              f"{r['device_kv_share_of_full']:11.2f} {r['fits_label']:>5s} {longest:>12s}")
    print("decode / prefill peak: device bytes (weights + KV + activations) in the steady decode state and at "
          "the prefill's peak; host: the Context Bank / offloaded KV. GiB = 2^30 bytes; KV exact for our "
          "layouts, activations a rule of thumb. max context: the longest prompt that fits the device memory "
          "at its peak and the host memory (as for fits).")
    if args.host_memory is None:
        print("fits also counts this machine's free host memory for the host bytes (--host-memory to plan another)")
    if any(r["fits_label"] == "?" for r in rows):
        print(f"? = fits in host memory, but {args.device}'s free memory is unknown here: pass --device-memory")
    return 0
def _fits_label(plan) -> str:
    """'NO' when a known limit is exceeded; '?' when the device's free memory cannot be read here
    (planning for a GPU on a machine without it), rather than claiming it fits."""
    if not plan.fits:
        return "NO"
    if plan.device.startswith("cuda") and plan.device_available_bytes is None:
        return "?"
    return "yes"
