"""Paired comparison of every method against a chosen reference method of the same run (the eval's
summary pairs against full attention only): e.g. block selection against token selection.

    python benchmarks/eval/paired_table.py RUN_DIR --reference omnikv [--reference full ...]

Reads RUN_DIR/predictions.jsonl; prints one markdown table per reference, the rows and format of
the eval summary's own paired table (`omnikv.eval.report.paired_rows` / `paired_markdown`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omnikv.eval.report import paired_markdown, paired_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="an `omnikv eval --output` directory")
    ap.add_argument("--reference", action="append", required=True, help="method to pair against (repeatable)")
    args = ap.parse_args()
    path = args.run / "predictions.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass the --output directory of an `omnikv eval` run")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    methods = list(dict.fromkeys(r["method"] for r in records))
    tasks = list(dict.fromkeys(r["task"] for r in records))
    lengths = sorted({int(r["length"]) for r in records})
    for ref in args.reference:
        if ref not in methods:
            raise SystemExit(f"--reference {ref!r} is not a method of this run; it has {', '.join(methods)}")
        rows = paired_rows(records, methods, tasks, lengths, reference=ref)
        print("\n" + "\n".join(paired_markdown(rows, f"`{ref}`")))

if __name__ == "__main__":
    main()
