"""`omnikv serve`: an OpenAI-compatible HTTP server for one model and one KV method."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from omnikv.cli.common import add_command, build_method, parse_budget
from omnikv.errors import ConfigError

API_KEY_ENV = "OMNIKV_API_KEY"
# Prefill in chunks by default: a client that disconnects during a long prefill frees the worker at
# the next chunk, and activation memory stays bounded. Chunked prefill equals one pass up to float
# rounding (tests/test_omnikv_equivalence.py, tests/test_prefix_cache.py).
DEFAULT_PREFILL_CHUNK = 512
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'4GiB', '512MB', '1e9', '0' -> bytes (binary units: KiB, MiB, GiB; decimal: KB, MB, GB)."""
    value = text.strip().lower().replace("_", "")
    unit = value.lstrip("0123456789.e+")
    number = value[: len(value) - len(unit)]
    try:
        n = float(number) * _UNITS[unit.strip()]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give bytes or a number with KiB/MiB/GiB (or KB/MB/GB), e.g. 4GiB") from None
    if n < 0 or n != n:
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be >= 0")
    return int(n)


def register(subparsers: Any) -> None:
    p = add_command(
        subparsers, "serve", run,
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve /v1/chat/completions, /v1/completions, /v1/models, /tokenize, /detokenize, /version, /health and /metrics. "
        "Binds to 127.0.0.1 unless --host says otherwise.",
    )
    p.add_argument("--model", required=True, help="embedded model name (smollm2, gemma3), HF directory or .gguf file")
    p.add_argument("--method", default="omnikv", help="KV method: omnikv (default), full, full_prealloc, full_offload, ... (see docs/methods.md)")
    p.add_argument("--budget", type=parse_budget, default=None, help="tokens (int) or prompt fraction (float in (0, 1]) attended per sparse layer")
    p.add_argument("--preset", default=None, help="OmniKV preset name or preset JSON file (omnikv method only)")
    p.add_argument("--compile", default=None, action="store_true",
                   help="capture the method's static-shape decode step with torch.compile (full_prealloc, omnikv; "
                   "CUDA graphs on CUDA); the first request of each shape pays the compile")
    p.add_argument("--served-model-name", default=None, help="model id clients use (default: the model's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--allowed-host",
        action="append",
        default=None,
        metavar="NAME",
        help="Host header value (without port) to accept, repeatable; on a loopback bind 127.0.0.1, localhost and ::1 "
        "are always accepted and other names refused (DNS rebinding); on other binds any Host is accepted unless given",
    )
    p.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} if set)")
    p.add_argument("--max-queue", type=int, default=16, help="requests that may wait; more get 429 (default 16)")
    p.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024, help="largest request body (default 8 MiB)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest accepted prompt (default: model context)")
    p.add_argument("--max-tokens-limit", type=int, default=None, help="largest accepted max_tokens (default: model context)")
    p.add_argument("--default-max-tokens", type=int, default=None,
                   help="completion length when a request omits max_tokens (default: 16 for /v1/completions as OpenAI, 256 for chat)")
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="decode up to this many waiting requests together when their sampling settings match "
        "(default: 4 on CUDA, 1 on CPU, where decoding is compute-bound and batching gains little)",
    )
    p.add_argument("--prefill-chunk-size", type=int, default=DEFAULT_PREFILL_CHUNK,
                   help=f"prefill in chunks of this many tokens (default {DEFAULT_PREFILL_CHUNK}); a client that disconnects "
                   "frees the server at the next chunk")
    p.add_argument("--prefix-cache-bytes", type=parse_bytes, default=None, metavar="SIZE",
                   help="host memory for the prompt prefixes kept for reuse (e.g. 4GiB; 0 = off; default: 1/8 of the "
                   "machine's memory): a request that begins like an earlier one prefills only the rest")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def check_args(args: argparse.Namespace) -> str | None:
    """Validate limits before loading anything; return the API key to use (flag wins over env)."""
    for name in ("max_queue", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_prompt_tokens", "max_tokens_limit", "prefill_chunk_size", "max_batch_size", "default_max_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    if api_key is not None and not api_key.strip():
        raise ConfigError(f"the API key is empty; pass a non-empty --api-key or unset {API_KEY_ENV}")
    return api_key


def run(args: argparse.Namespace) -> int:
    api_key = check_args(args)
    from omnikv.models import load_model
    from omnikv.server.app import create_app
    from omnikv.server.engine import Engine
    from omnikv.server.middleware import LOOPBACK_HOSTS
    from omnikv.server.runner import bind_socket, is_loopback, serve_forever

    if not is_loopback(args.host) and api_key is None:
        print(
            f"omnikv serve: warning: binding {args.host} (reachable from other machines) without an API key; "
            f"set --api-key or ${API_KEY_ENV}",
            file=sys.stderr,
        )
    method = build_method(args)  # fail fast, before loading
    sock = bind_socket(args.host, args.port)  # a port in use fails now, not after loading the model
    if is_loopback(args.host):
        allowed_hosts: list[str] | None = [*LOOPBACK_HOSTS, *(args.allowed_host or [])]
    else:
        allowed_hosts = args.allowed_host  # None: any Host (the bind is reachable by name anyway)
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    # Build one cache now: a method that cannot run this model (a preset made for another model,
    # filter layers out of range, an unsupported architecture) fails here, not on every request.
    method.make_cache(loaded.model)
    batch = args.max_batch_size
    if batch is None:
        batch = 4 if next(loaded.model.parameters()).device.type == "cuda" else 1
    from omnikv.decoding.prefix_cache import default_max_bytes

    store = args.prefix_cache_bytes if args.prefix_cache_bytes is not None else default_max_bytes()
    engine = Engine.from_loaded(
        loaded, method, name=args.served_model_name, prefill_chunk_size=args.prefill_chunk_size, max_batch_size=batch,
        prefix_cache_bytes=store,
    )
    app = create_app(
        engine,
        api_key=api_key,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=args.default_max_tokens,
        allowed_hosts=allowed_hosts,
    )
    port = sock.getsockname()[1]
    reuse = f"prefix cache {store / 2**30:.2f} GiB" if engine.prefix_cache is not None and engine.prefix_cache.enabled else "prefix cache off"
    print(f"omnikv serve: {engine.name} with method {args.method} on http://{args.host}:{port}/v1 ({reuse})", file=sys.stderr)
    serve_forever(app, args.host, port, log_level=args.log_level, sock=sock)
    return 0
