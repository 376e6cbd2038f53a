"""Download-free task generators and the `TASKS` registry.

Every generator has the signature `gen(tokenizer, length_tokens, n_samples, seed=0, **opts) ->
list[Sample]`: prompts are fitted to exactly `length_tokens` tokens of `tokenizer` (counted with
special tokens, as `encode_prompt` encodes them), needle depths are spread evenly over the samples,
and the same seed gives the same samples.
"""

from __future__ import annotations

from typing import Any, Callable

from omnikv.errors import ConfigError
from omnikv.eval.tasks.base import (LENGTH_TOLERANCE, QUESTION_POSITIONS, Sample, check_question_position,
                                    count_tokens, encode_prompt, fit_length, spread_depths)
from omnikv.eval.tasks.infinitebench_synth import INFINITEBENCH_SYNTH_TASKS
from omnikv.eval.tasks.ruler import NIAH_VARIANTS, RULER_TASKS
from omnikv.eval.tasks.shared_context import shared_context
from omnikv.eval.tasks.two_stage import two_stage_retrieval

Generator = Callable[..., list[Sample]]

TASKS: dict[str, Generator] = {**RULER_TASKS, **INFINITEBENCH_SYNTH_TASKS, "two_stage_retrieval": two_stage_retrieval,
                               "shared_context": shared_context}
# Tasks that take `question_position` (the question before or after the haystack). The others
# do not: cwe, fwe and math_find ask about the whole list, with no key to know in advance;
# two_stage_retrieval's question is a chain of two look-ups stated as one; shared_context asks its
# questions after the document by design (one document, several questions in turn).
QUESTION_POSITION_TASKS: tuple[str, ...] = (*NIAH_VARIANTS, "passkey", "number_string", "kv_retrieval", "vt")
# Short aliases accepted on the command line.
ALIASES: dict[str, str] = {"2stage": "two_stage_retrieval", "2stageretr": "two_stage_retrieval",
                           "niah": "niah_single_2", "variable_tracking": "vt", "common_words": "cwe",
                           "frequent_words": "fwe", "scbench": "shared_context", "multi_question": "shared_context"}


def get_task(name: str) -> Generator:
    """The generator registered as `name` (or an alias); ConfigError listing the choices otherwise."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise ConfigError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[key]


def canonical_task_name(name: str) -> str:
    get_task(name)
    return ALIASES.get(name.lower(), name.lower())


def takes_prose_haystack(name: str) -> bool:
    """Whether task `name` has a noise/narrative/pydoc haystack that `haystack=` may change (the
    needle-haystack variants niah_multikey_2/3 and the list/dict tasks do not)."""
    import inspect

    from omnikv.eval.tasks.ruler import NIAH_VARIANTS

    key = canonical_task_name(name)
    if key in NIAH_VARIANTS:
        return NIAH_VARIANTS[key].get("haystack") != "needles"
    return "haystack" in inspect.signature(TASKS[key]).parameters


def takes_question_position(name: str) -> bool:
    """Whether task `name` can state its question before the haystack (QUESTION_POSITION_TASKS)."""
    return canonical_task_name(name) in QUESTION_POSITION_TASKS


def check_question_position_for(name: str, position: str) -> None:
    """ConfigError unless `position` is a known position that task `name` supports ("after", the
    layout of every generated task, is accepted everywhere)."""
    check_question_position(position, name)
    if position != "after" and not takes_question_position(name):
        raise ConfigError(f"task {name!r} has no question_position={position!r}; the tasks that take it: "
                          f"{', '.join(QUESTION_POSITION_TASKS)}")


def generate_samples(name: str, tokenizer: Any, length_tokens: int, n_samples: int, seed: int = 0,
                     **opts: Any) -> list[Sample]:
    """Generate samples of task `name`; unknown options raise ConfigError naming the task."""
    gen = get_task(name)
    if "question_position" in opts:
        check_question_position_for(name, opts["question_position"])
        if opts["question_position"] == "after" and not takes_question_position(name):
            opts = {k: v for k, v in opts.items() if k != "question_position"}  # its only layout
    try:
        return gen(tokenizer, length_tokens, n_samples, seed, **opts)
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            raise ConfigError(f"task {name!r} does not take option(s) {sorted(opts)}: {exc}") from None
        raise


__all__ = ["ALIASES", "LENGTH_TOLERANCE", "QUESTION_POSITIONS", "QUESTION_POSITION_TASKS", "TASKS", "Sample",
           "canonical_task_name", "check_question_position_for", "count_tokens", "encode_prompt", "fit_length",
           "generate_samples", "get_task", "spread_depths", "takes_prose_haystack", "takes_question_position"]
