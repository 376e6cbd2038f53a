"""The shared-context task on a user's own documents and questions, read from a JSONL file.

One JSON object per line (blank lines and lines starting with `#` are skipped):

    {"id": "manual", "document": "The whole text ...",
     "questions": [{"question": "Who wrote the manual?", "answers": ["Ada Lovelace"]},
                   {"question": "Which year?", "answers": ["1843"]}]}

- `document` (the text) or `document_file` (a UTF-8 text file, relative to the JSONL file's folder);
- `questions`: at least one, each with `question` (text) and `answers` (strings; a question scores
  the share of them its answer contains, case-insensitive: `string_match_all`);
- optional `id` (default: the line number) and `question_template` (default
  `"\\nQuestion: {question}\\nAnswer:"`, how a question follows the document or the previous answer).

Each document is one sample, its questions asked in the file's order after the document was read
once (`omnikv.eval.multiturn`). A document longer than the run's length is refused (the answer
may sit in any part of it, so it is never truncated).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omnikv.errors import InputError
from omnikv.eval.tasks.base import Sample, count_tokens

TASK = "shared_context"
QUESTION_TEMPLATE = "\nQuestion: {question}\nAnswer:"
ANSWER_TOKENS = 32
_KEYS = {"id", "document", "document_file", "questions", "question_template"}
_FORMAT = ('each line: {"document": "...", "questions": [{"question": "...", "answers": ["..."]}]} '
           "(see docs/evaluation.md, \"Your own documents\")")


def _bad(where: str, what: str) -> InputError:
    return InputError(f"{where}: {what}; {_FORMAT}")


def _question(where: str, q: Any, template: str) -> dict[str, Any]:
    if not isinstance(q, dict) or set(q) - {"question", "answers"}:
        raise _bad(where, "a question must be an object with the keys question and answers")
    text, answers = q.get("question"), q.get("answers")
    if not isinstance(text, str) or not text.strip():
        raise _bad(where, "a question needs a non-empty `question` string")
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise _bad(where, f"question {text!r} needs `answers`: a list of non-empty strings")
    return {"text": template.format(question=text), "answers": answers, "depth": None, "needle": None}


def _document(where: str, rec: dict[str, Any], folder: Path) -> str:
    if ("document" in rec) == ("document_file" in rec):
        raise _bad(where, "give exactly one of `document` (the text) and `document_file` (a path)")
    if "document" in rec:
        text = rec["document"]
        if not isinstance(text, str):
            raise _bad(where, "`document` must be a string")
    else:
        path = folder / str(rec["document_file"])
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise _bad(where, f"document_file {path} does not exist") from None
        except UnicodeDecodeError:
            raise _bad(where, f"document_file {path} is not UTF-8 text") from None
    if not text.strip():
        raise _bad(where, "the document is empty")
    return text


def read_documents(path: str | Path) -> list[dict[str, Any]]:
    """The records of a documents file, validated: [{"id", "document", "questions": [{"text",
    "answers", ...}]}]. InputError naming the file, line and fix for anything malformed."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"documents file {path} does not exist") from None
    except UnicodeDecodeError:
        raise InputError(f"documents file {path} is not UTF-8 text") from None
    out, ids = [], set()
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _bad(where, f"not valid JSON ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise _bad(where, "a line must hold one JSON object")
        unknown = sorted(set(rec) - _KEYS)
        if unknown:
            raise _bad(where, f"unknown key(s) {', '.join(unknown)}")
        template = rec.get("question_template", QUESTION_TEMPLATE)
        if not isinstance(template, str) or "{question}" not in template:
            raise _bad(where, "`question_template` must be a string containing {question}")
        questions = rec.get("questions")
        if not isinstance(questions, list) or not questions:
            raise _bad(where, "`questions` must be a non-empty list")
        doc_id = str(rec.get("id", f"line{lineno}"))
        if doc_id in ids:
            raise _bad(where, f"id {doc_id!r} is used twice")
        ids.add(doc_id)
        out.append({"id": doc_id, "document": _document(where, rec, path.parent),
                    "questions": [_question(where, q, template) for q in questions]})
    if not out:
        raise InputError(f"documents file {path} holds no document; {_FORMAT}")
    return out


def user_documents(tokenizer: Any, length_tokens: int, n_samples: int, path: str | Path) -> list[Sample]:
    """The first `n_samples` documents of the file as shared-context samples; InputError when one
    is longer than `length_tokens` tokens."""
    samples = []
    for rec in read_documents(path)[:n_samples]:
        n_tok = count_tokens(tokenizer, rec["document"])
        if n_tok > length_tokens:
            raise InputError(f"document {rec['id']!r} of {path} is {n_tok} tokens, longer than the length "
                             f"{length_tokens}; pass --lengths {n_tok} or more (documents are never truncated)")
        answers = [a for q in rec["questions"] for a in q["answers"]]
        samples.append(Sample(
            id=f"{TASK}-file-{rec['id']}", task=TASK, prompt=rec["document"], answers=answers,
            metric="string_match_all", max_new_tokens=ANSWER_TOKENS,
            metadata=dict(questions=rec["questions"], documents_file=str(path), document_id=rec["id"],
                          target_length=length_tokens, length=n_tok),
        ))
    return samples
