"""Loaders for official long-context benchmarks from a local directory (nothing is downloaded).

Task names on the command line: `longbench:<dataset>`, `longbench-e:<dataset>`, `longbench-v2`
(optionally `longbench-v2:easy|hard|short|medium|long`), `infinitebench:<task>`. `load_dataset_task`
maps such a name to samples; the "length" of a dataset task is the maximum prompt length (middle
truncation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omnikv.errors import ConfigError
from omnikv.eval.loaders.infinitebench import load_infinitebench
from omnikv.eval.loaders.longbench import load_longbench
from omnikv.eval.loaders.longbench_v2 import load_longbench_v2
from omnikv.eval.tasks.base import Sample

SUITES = ("longbench", "longbench-e", "longbench-v2", "infinitebench")


def is_dataset_task(name: str) -> bool:
    return name.split(":", 1)[0].lower() in SUITES


def load_dataset_task(name: str, data_dir: str | Path | None, tokenizer: Any, max_length: int,
                      n_samples: int | None = None) -> list[Sample]:
    """Samples of a dataset task name (see module docstring) read from `data_dir`."""
    suite, _, sub = name.partition(":")
    suite = suite.lower()
    if data_dir is None:
        raise ConfigError(f"task {name!r} reads official {suite} files: pass --data-dir DIR")
    if suite == "longbench":
        return load_longbench(data_dir, sub, tokenizer, max_length, n_samples)
    if suite == "longbench-e":
        return load_longbench(data_dir, sub, tokenizer, max_length, n_samples, variant="e")
    if suite == "longbench-v2":
        opts: dict[str, str] = {}
        if sub in ("easy", "hard"):
            opts["difficulty"] = sub
        elif sub in ("short", "medium", "long"):
            opts["length"] = sub
        elif sub:
            raise ConfigError(f"longbench-v2 filter must be easy, hard, short, medium or long; got {sub!r}")
        return load_longbench_v2(data_dir, tokenizer, max_length, n_samples, **opts)
    if suite == "infinitebench":
        return load_infinitebench(data_dir, sub, tokenizer, max_length, n_samples)
    raise ConfigError(f"unknown benchmark suite {suite!r}; choose one of {', '.join(SUITES)}")


__all__ = ["SUITES", "is_dataset_task", "load_dataset_task", "load_infinitebench", "load_longbench",
           "load_longbench_v2"]
