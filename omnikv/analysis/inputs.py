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


DEFAULT_HAYSTACK = "narrative"  # the embedded story small models retrieve best from (eval/tasks/text.py)


def default_length(max_context: int | None, steps: int, wanted: int | None = None) -> int:
    """Prompt length for the built-in haystack: `wanted` (default 2048 tokens, the length the
    presets were measured at) but never past the model's context minus the recorded steps."""
    length = wanted or 2048
    if max_context:
        length = min(length, max_context - steps - 1)
    if length < 2:
        raise ConfigError(f"the model's context ({max_context} tokens) leaves no room for a prompt and {steps} steps")
    return length


def prompts_from_haystack(
    tokenizer: Any, length: int, num_samples: int = 1, seed: int = 0
) -> list[tuple[str, list[int]]]:
    """(source, token ids) of `num_samples` prompts of exactly `length` tokens of the embedded
    narrative haystack (seeds seed, seed+1, ...): what calibration uses when given no inputs."""
    from omnikv.eval.tasks.text import haystack_units

    out = []
    for s in range(seed, seed + num_samples):
        n = max(8, length // 8)  # sentences; doubled until the story is long enough
        while True:
            ids = list(tokenizer(" ".join(haystack_units(DEFAULT_HAYSTACK, n, s)), add_special_tokens=True)["input_ids"])
            if len(ids) >= length:
                break
            n *= 2
        out.append((f"{DEFAULT_HAYSTACK} haystack (seed {s})", ids[:length]))
    return out
