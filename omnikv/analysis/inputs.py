"""Prompts for analysis and calibration: local text files, or the evaluation task generators."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omnikv.errors import ConfigError, InputError


def _fit(ids: list[int], length: int | None) -> list[int]:
    # Keep the head and the tail: instructions and the question usually sit at the two ends.
    if length is None or len(ids) <= length:
        return ids
    head = length // 2
    return ids[:head] + ids[len(ids) - (length - head) :]


def prompts_from_files(tokenizer: Any, paths: list[str], length: int | None = None) -> list[tuple[str, list[int]]]:
    """(source, token ids) per text file, cut to `length` tokens (middle removed) when longer."""
    out = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise InputError(f"input file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputError(f"input file {path} is not UTF-8 text") from None
        if not text.strip():
            raise InputError(f"input file {path} is empty")
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        out.append((str(path), _fit(ids, length)))
    return out


def check_task(task: str) -> None:
    """Raise ConfigError unless `task` is a local task generator."""
    _task_generator(task)


def _task_generator(task: str):
    from omnikv.eval.tasks import TASKS

    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(sorted(TASKS))}")
    return TASKS[task]


def prompts_from_task(
    tokenizer: Any, task: str, length: int, num_samples: int = 1, seed: int = 0
) -> list[tuple[str, list[int]]]:
    """(source, token ids) of `num_samples` prompts of a local evaluation task (omnikv.eval.tasks)."""
    generate = _task_generator(task)
    samples = generate(tokenizer, length, num_samples, seed)
    # the same token ids the evaluation runner feeds (special tokens added)
    return [(f"{task}:{s.id}", list(tokenizer(s.prompt, add_special_tokens=True)["input_ids"])) for s in samples]
