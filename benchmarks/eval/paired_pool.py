"""Pool the paired samples of several `omnikv eval` outputs: each method against full attention.

Reads predictions.jsonl of every directory given (different seeds / lengths / haystacks: distinct
sample ids), pairs each method's score with full attention's on the same sample id, and prints the
paired comparison (omnikv.eval.stats.paired_comparison: same / better / worse, sign test, mean
difference in points with its bootstrap 95% interval) over all pooled samples, plus the number of
samples an interval of that spread would need for its lower bound to clear -1 point.

    python benchmarks/eval/paired_pool.py benchmarks/eval/results/smollm2-p3 benchmarks/eval/results/smollm2-peers \
        --methods omnikv,infllm,tidaldecode --output benchmarks/eval/results/smollm2-peers/pooled.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from omnikv.eval.stats import Z95, paired_comparison


def load(dirs: list[str]) -> dict[tuple[str, str], float]:
    scores: dict[tuple[str, str], float] = {}
    for d in dirs:
        for line in (Path(d) / "predictions.jsonl").read_text().splitlines():
            r = json.loads(line)
            scores[(r["method"], r["sample_id"])] = float(r["score"])
    return scores


def needed_samples(diffs: list[float]) -> int | None:
    """Samples for mean - 1.96 sd / sqrt(n) > -1 point at this mean and spread (None: the mean
    itself is at or below -1 point)."""
    mean = 100 * statistics.fmean(diffs)
    sd = 100 * statistics.pstdev(diffs)
    if mean <= -1:
        return None
    return max(len(diffs), math.ceil((Z95 * sd / (mean + 1)) ** 2)) if sd else len(diffs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--methods", required=True)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    scores = load(args.dirs)
    rows = []
    for method in args.methods.split(","):
        ids = sorted(s for (m, s) in scores if m == method and ("full", s) in scores)
        if not ids:
            continue
        m = [scores[(method, s)] for s in ids]
        f = [scores[("full", s)] for s in ids]
        row = {"method": method, **paired_comparison(m, f),
               "n_needed_for_low_above_-1": needed_samples([a - b for a, b in zip(m, f)])}
        rows.append(row)
        print(f"{method:14s} n={row['n']:4d} same={row['same']} better={row['better']} worse={row['worse']} "
              f"sign p={row['sign_p']:.3f} mean diff {row['mean_diff']:+.1f} "
              f"({row['diff_low']:+.1f}, {row['diff_high']:+.1f}); n for low > -1: {row['n_needed_for_low_above_-1']}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"dirs": args.dirs, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
