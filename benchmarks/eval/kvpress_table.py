"""The OmniKV-vs-kvpress tables of docs/results.md from run_kvpress.sh's outputs.

Reads `<dir>/<position>-b<budget>/metrics.json` (the runner's own aggregation: Wilson intervals,
paired comparisons against full attention on the same samples) and prints, per question position,
one row per method with each budget's score (95% interval) and its paired difference from full
attention (points, bootstrap 95% interval), then the measured attended / device KV shares.

    python benchmarks/eval/kvpress_table.py benchmarks/eval/results/kvpress-smollm2-1k
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BUDGETS = ("0.05", "0.1", "0.25")
POSITIONS = ("after", "before")


def load(root: Path) -> dict[tuple[str, str], dict]:
    out = {}
    for pos in POSITIONS:
        for b in BUDGETS:
            path = root / f"{pos}-b{b}" / "metrics.json"
            if path.is_file():
                out[(pos, b)] = json.loads(path.read_text())
    return out


def cell(metrics: dict | None, method: str) -> str:
    if metrics is None:
        return "not run"
    row = next((r for r in metrics["rows"] if r["method"] == method), None)
    if row is None:
        return "not run"
    text = f"{row['score']:.0f} ({row['ci_low']:.0f}-{row['ci_high']:.0f})"
    pair = next((p for p in metrics["paired"] if p["method"] == method and p["task"] != "*"), None)
    if pair is not None:
        text += f"; {pair['mean_diff']:+.0f} [{pair['diff_low']:+.0f}, {pair['diff_high']:+.0f}]"
        text += f" {pair['better']}/{pair['worse']}"
    return text + ("" if row["n"] == 20 else f" (n={row['n']})")


def main(root: Path) -> None:
    runs = load(root)
    methods = list(dict.fromkeys(m for metrics in runs.values() for m in metrics["methods"]))
    for pos in POSITIONS:
        print(f"\nQuestion {pos} the haystack:\n")
        print("| method | " + " | ".join(f"{float(b):.0%} kept" for b in BUDGETS) + " |")
        print("|---|" + "---|" * len(BUDGETS))
        for m in methods:
            print(f"| {m} | " + " | ".join(cell(runs.get((pos, b)), m) for b in BUDGETS) + " |")
    print("\nMeasured shares (question after / before), attended share of the sequence at the last step, "
          "all layers / device KV share of full attention's:\n")
    print("| method | " + " | ".join(f"{float(b):.0%} kept" for b in BUDGETS) + " |")
    print("|---|" + "---|" * len(BUDGETS))
    for m in methods:
        cells = []
        for b in BUDGETS:
            parts = []
            for pos in POSITIONS:
                row = next((r for r in (runs.get((pos, b)) or {}).get("budgets", []) if r["method"] == m), None)
                parts.append("-" if row is None or row["attended_fraction"] is None else
                             f"{row['attended_fraction']:.3f}/{row['device_kv_share']:.3f}")
            cells.append(" ; ".join(parts))
        print(f"| {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/eval/results/kvpress-smollm2-1k"))
