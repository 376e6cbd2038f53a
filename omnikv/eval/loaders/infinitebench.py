"""InfiniteBench from the official `<task>.jsonl` files.

Record fields: `id`, `context`, `input`, `answer` (list or string), `options` (list, for the
multiple-choice tasks). Prompts follow InfiniteBench's templates for base models (ending with an
answer prefix), generation lengths are InfiniteBench's, the prompt is middle-truncated to
`max_length` tokens (InfiniteBench: 128K).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omnikv.errors import ConfigError
from omnikv.eval.loaders.common import find_file, read_records, require, truncate_middle
from omnikv.eval.tasks.base import Sample

_RETRIEVE = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
             "I will quiz you about the important information there.\n\n{context}\n\n{input}")

PROMPTS: dict[str, str] = {
    "passkey": _RETRIEVE + " The pass key is",
    "number_string": _RETRIEVE + " The sequence of digits is",
    "kv_retrieval": "Extract the value corresponding to the specified key in the JSON object below.\n\n"
                    "{context}\n\n{input}",
    "longbook_sum_eng": "Summarize the book below:\n\n{context}\n\nSummary:",
    "longbook_choice_eng": "Read the book and answer the question.\n\n{context}\n\nQuestion: {input}\n\n"
                           "Only one of the following options is correct, tell me the answer using one single "
                           "letter (A, B, C, or D). Don't say anything else.\nA. {A}\nB. {B}\nC. {C}\nD. {D}\n"
                           "The letter of the correct answer is",
    "longbook_qa_eng": "Read the book and answer the question. Be very concise in your answer.\n\n{context}\n\n"
                       "Question: {input}\nAnswer:",
    "longbook_qa_chn": "阅读以下书籍然后回答问题。\n\n{context}\n\n问题：{input}\n答案：",
    "longdialogue_qa_eng": "Below is a dialogue script where one random occurrence of a character name is "
                           "replaced with \"$$MASK$$\", and you should try to guess who that character is.\n\n"
                           "{context}\n\nThe name that has been replaced with $$MASK$$ is likely",
    "math_find": "{prefix}\n\n{context}\n\n{input} The {kind} number of the list is: ",
    "math_calc": "Let us calculate the intermediate values of an expression.\n\nExpression: 1 + 3 + 4\n"
                 "Values: [1, 4, 8]\n\nExpression: 8 - 3 + 2 - 4\nValues: [8, 5, 7, 3]\n\n"
                 "Expression: {context}\nValues:",
    "code_run": "There is a function called {func} in the following Python code.\n\n{context}\n\n"
                "Please compute the exact value of {input}. The value of {input} is",
    "code_debug": "Following is a Python code where exactly one of the functions/methods has a deliberate "
                  "error that makes it crash.\n\n{context}\n\nOptions:\nA. {A}\nB. {B}\nC. {C}\nD. {D}\n\n"
                  "The correct option is:",
}

MAX_NEW_TOKENS: dict[str, int] = {
    "passkey": 6, "number_string": 12, "kv_retrieval": 50, "longbook_sum_eng": 1200, "longbook_choice_eng": 40,
    "longbook_qa_eng": 40, "longbook_qa_chn": 40, "longdialogue_qa_eng": 40, "math_find": 3,
    "math_calc": 30000, "code_run": 5, "code_debug": 5,
}

METRIC: dict[str, str] = {
    "passkey": "first_int_match", "number_string": "first_int_match", "kv_retrieval": "kv_retrieval",
    "longbook_sum_eng": "rouge_l", "longbook_choice_eng": "choice_letter", "longbook_qa_eng": "qa_f1",
    "longbook_qa_chn": "qa_f1_zh", "longdialogue_qa_eng": "name_match", "math_find": "first_number_match",
    "math_calc": "math_calc", "code_run": "first_int_match", "code_debug": "choice_letter",
}


def _fields(task: str, rec: dict[str, Any]) -> dict[str, Any]:
    fields = dict(context=rec["context"], input=rec.get("input", ""))
    options = list(rec.get("options") or [])
    if task in ("longbook_choice_eng", "code_debug"):
        if len(options) != 4:
            raise ConfigError(f"InfiniteBench {task} record {rec.get('id')} needs 4 options, has {len(options)}")
        fields.update(zip("ABCD", options))
    if task == "math_find":
        text = fields["input"].lower()
        kind = next((k for k in ("largest", "smallest", "median") if k in text), "requested")
        fields.update(kind=kind, prefix=f"Find the {kind} number from the list below:")
    if task == "code_run":
        call = re.findall(r"\w+\([^()]*\)", fields["input"])
        fields["input"] = call[-1] if call else fields["input"].strip()
        fields["func"] = fields["input"].split("(")[0]
    return fields


def load_infinitebench(data_dir: str | Path, task: str, tokenizer: Any, max_length: int,
                       n_samples: int | None = None) -> list[Sample]:
    """Samples of one InfiniteBench task, prompts middle-truncated to `max_length` tokens."""
    if task not in PROMPTS:
        raise ConfigError(f"unknown InfiniteBench task {task!r}; choose one of {', '.join(PROMPTS)}")
    path = find_file(data_dir, [f"{task}.jsonl"], ("", "data", "InfiniteBench", "infinitebench"), "InfiniteBench")
    samples = []
    for i, rec in enumerate(read_records(path, n_samples)):
        require(rec, ("context", "answer"), f"{path} record {i}")
        answer = rec["answer"]
        answers = [str(a) for a in answer] if isinstance(answer, list) else [str(answer)]
        prompt, truncated = truncate_middle(tokenizer, PROMPTS[task].format(**_fields(task, rec)), max_length)
        samples.append(Sample(
            id=str(rec.get("id", i)), task=f"infinitebench:{task}", prompt=prompt, answers=answers,
            metric=METRIC[task], max_new_tokens=MAX_NEW_TOKENS[task],
            metadata=dict(options=rec.get("options") or None, truncated=truncated, max_length=max_length),
        ))
    return samples
