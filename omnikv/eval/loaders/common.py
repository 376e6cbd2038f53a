"""Shared pieces of the dataset loaders: finding files, reading JSONL / JSON, middle truncation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from omnikv.errors import InputError


def find_file(data_dir: str | Path, names: Iterable[str], subdirs: Iterable[str], suite: str) -> Path:
    """The first existing `data_dir/<subdir>/<name>`; InputError listing where it looked otherwise."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise InputError(f"{suite} data directory {root} does not exist; pass --data-dir pointing at the "
                         f"unpacked official {suite} files")
    tried = []
    for sub in subdirs:
        for name in names:
            path = root / sub / name if sub else root / name
            tried.append(str(path))
            if path.is_file():
                return path
    raise InputError(f"no {suite} file found; looked for: {', '.join(tried)}")


def read_records(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Records of a .jsonl file (one JSON object per line) or a .json file holding a list."""
    records: list[dict[str, Any]] = []
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise InputError(f"{path} must hold a JSON list of records")
            records = data
        else:
            with path.open(encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            records.append(json.loads(line))
                        except json.JSONDecodeError as exc:
                            raise InputError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                    if limit is not None and len(records) >= limit:
                        break
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text: {exc}") from None
    return records[:limit] if limit is not None else records


def require(record: dict[str, Any], fields: Iterable[str], where: str) -> None:
    missing = [f for f in fields if f not in record]
    if missing:
        raise InputError(f"{where}: record lacks field(s) {', '.join(missing)}; is this the official format?")


def truncate_middle(tokenizer: Any, prompt: str, max_tokens: int) -> tuple[str, bool]:
    """Keep the first and last max_tokens // 2 tokens of the prompt (LongBench / LongBench v2 /
    InfiniteBench practice: the instruction at the start and the question at the end survive).
    Returns (prompt, truncated?). Tokens are counted without special tokens, as the official code."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return prompt, False
    half = max_tokens // 2
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(ids[len(ids) - half:], skip_special_tokens=True)
    return head + tail, True
