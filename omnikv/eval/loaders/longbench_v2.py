"""LongBench v2 from the official `data.json` (a JSON list; `.jsonl` also accepted).

Record fields: `_id`, `domain`, `sub_domain`, `difficulty`, `length`, `question`, `choice_A` ..
`choice_D`, `answer` (a letter), `context`. Zero-shot prompt (no chain of thought), 128 new tokens,
prompt middle-truncated to `max_length` tokens, scored by the letter in "The correct answer is (X)".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omnikv.eval.loaders.common import find_file, read_records, require, truncate_middle
from omnikv.eval.tasks.base import Sample

TEMPLATE = (
    "Please read the following text and answer the question below.\n\n<text>\n{context}\n</text>\n\n"
    "What is the correct answer to this question: {question}\nChoices:\n(A) {choice_A}\n(B) {choice_B}\n"
    "(C) {choice_C}\n(D) {choice_D}\n\nFormat your response as follows: \"The correct answer is "
    "(insert answer here)\"."
)
MAX_NEW_TOKENS = 128
_FIELDS = ("question", "choice_A", "choice_B", "choice_C", "choice_D", "answer", "context")


def load_longbench_v2(data_dir: str | Path, tokenizer: Any, max_length: int, n_samples: int | None = None,
                      *, difficulty: str | None = None, length: str | None = None) -> list[Sample]:
    """Samples of LongBench v2, optionally only one difficulty ("easy"/"hard") or length class
    ("short"/"medium"/"long"); `n_samples` keeps the first n after filtering."""
    path = find_file(data_dir, ["data.json", "data.jsonl", "longbench_v2.json"],
                     ("", "data", "LongBench-v2", "longbench_v2", "LongBench-v2/data"), "LongBench v2")
    samples = []
    for i, rec in enumerate(read_records(path)):
        require(rec, _FIELDS, f"{path} record {i}")
        if (difficulty and rec.get("difficulty") != difficulty) or (length and rec.get("length") != length):
            continue
        prompt, truncated = truncate_middle(tokenizer, TEMPLATE.format(**rec), max_length)
        samples.append(Sample(
            id=str(rec.get("_id", i)), task="longbench-v2", prompt=prompt, answers=[str(rec["answer"]).strip()],
            metric="multiple_choice", max_new_tokens=MAX_NEW_TOKENS,
            metadata=dict(domain=rec.get("domain"), sub_domain=rec.get("sub_domain"),
                          difficulty=rec.get("difficulty"), length_class=rec.get("length"),
                          truncated=truncated, max_length=max_length),
        ))
        if n_samples is not None and len(samples) >= n_samples:
            break
    return samples
