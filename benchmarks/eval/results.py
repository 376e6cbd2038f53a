"""Build the tables behind docs/results.md from the stage directories run_suite.sh writes.

    python benchmarks/eval/results.py runs/suite benchmarks/eval/results
    python benchmarks/eval/results.py --seed runs/suite benchmarks/eval/results   # see seed_stages

For each group of stages (gemma3, smollm2, fidelity-*), merges the predictions, writes
metrics.json / summary.md / scores.png / run.json (the runner's own report code), plus budget.md
(attended tokens per layer and device KV share per method and length), paired.md (sample by
sample against full attention), headline.md and failures.md (samples
that full attention gets right and a method gets wrong). Only finished records are used, so it
can run while stages are still going; missing cells show as "-".
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from omnikv.eval.runner import read_predictions, write_reports

GROUPS = {
    "gemma3": ["gemma3-2k", "gemma3-4k", "gemma3-8k-s0", "gemma3-8k-s1", "gemma3-16k"],
    "gemma3-more": ["gemma3-more-2k", "gemma3-more-4k", "gemma3-more-8k-s0", "gemma3-more-8k-s1",
                    "gemma3-more-uniform-2k", "gemma3-more-uniform-4k", "gemma3-more-uniform-8k"],
    # 16K apart: full attention and OmniKV on the three tasks, the other methods on number_string only.
    "gemma3-more-16k": ["gemma3-more-16k-s0", "gemma3-more-16k-s1", "gemma3-more-16k-lossy-s0",
                        "gemma3-more-16k-lossy-s1"],
    "smollm2": ["smollm2-1k"],
    # Third pass (issue 14): one shared prefill per sample, 20-sample design in quarter shards; the
    # unsharded p3-gemma3-2k stage was stopped after its first passkey samples (same sample ids).
    "gemma3-p3": ["p3-gemma3-2k"] + [f"p3-gemma3-{n}-q{q}" for n in ("2k", "4k", "8k") for q in range(4)],
    "gemma3-p3-heldout": [f"p3-heldout-{n}-q{q}" for n in ("2k", "4k") for q in range(4)],
    "gemma3-p3-16k": [f"p3-gemma3-16k-q{q}" for q in range(4)],
    "smollm2-p3": ["p3-smollm2-1k"],
    "fidelity-gemma3-p3": ["p3-fid-gemma3-4k", "p3-fid-gemma3-8k"],
    "gemma3-p3-shared-context": ["p3-shared-context-2k"],
    "fidelity-gemma3": ["fid-gemma3-4k", "fid-gemma3-8k"],
    "fidelity-smollm2": ["fid-smollm2-4k", "fid-smollm2-8k"],
}
# Sliding-window layers and the rows transformers keeps in each (window - 1): they are the same for
# every method, so the share of the *budgeted* (full-attention) layers is reported separately.
# Gemma 3 270M has 15 of them (window 512); SmolLM2 has none. Every Gemma 3 group names the model.
GEMMA3_SLIDING = (15, 511)


def sliding_layers(group: str) -> tuple[int, int]:
    """(sliding-window layers, rows each keeps) of the model behind `group`."""
    return GEMMA3_SLIDING if "gemma3" in group else (0, 0)


MAX_COPY = 8 * 1024 * 1024  # predictions.jsonl copied next to the tables only when this small (resume seeds from it)


def rle(values: list[int]) -> str:
    """[511, 511, 4100, 511] -> '511x2, 4100, 511' (per-layer attended tokens, compactly)."""
    out, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        out.append(f"{values[i]}x{j - i + 1}" if j > i else str(values[i]))
        i = j + 1
    return ", ".join(out)


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def budget_table(group: str, records: list[dict]) -> str:
    n_slide, win = sliding_layers(group)
    by = defaultdict(list)
    for r in records:
        by[(r["method"], int(r["length"]))].append(r)
    lines = ["| method | length | attended tokens per layer (last decode step, sample 0) | "
             "device KV share, all layers | share of the full-attention layers' KV |",
             "|---|---|---|---|---|"]
    order = list(dict.fromkeys(r["method"] for r in records))
    for (m, length), rs in sorted(by.items(), key=lambda kv: (kv[0][1], order.index(kv[0][0]))):
        shares, fa_shares = [], []
        for r in rs:
            b = r["budget_report"]
            if b.get("device_kv_bytes") is None or not b.get("full_kv_bytes"):
                continue
            seq = int(r["stats"].get("seq_length") or r["prompt_tokens"])
            n_layers = len(b["attended_tokens_per_layer"])
            row_bytes = b["full_kv_bytes"] / (n_slide * min(win, seq) + (n_layers - n_slide) * seq)
            slide_bytes = row_bytes * n_slide * min(win, seq)
            shares.append(b["device_kv_bytes"] / b["full_kv_bytes"])
            fa_shares.append((b["device_kv_bytes"] - slide_bytes) / (b["full_kv_bytes"] - slide_bytes))
        att = rle(rs[0]["budget_report"]["attended_tokens_per_layer"])
        s, f = mean(shares), mean(fa_shares)
        lines.append(f"| {m} | {length} | {att} | {'-' if s is None else f'{100 * s:.1f}%'} | "
                     f"{'-' if f is None else f'{100 * f:.1f}%'} |")
    return "\n".join(lines) + "\n"


def failures(records: list[dict]) -> str:
    full = {(r["task"], r["length"], r["sample_id"]): r for r in records if r["method"] == "full"}
    lines = ["| method | task | length | needle depth | full | method's output | reference |", "|---|---|---|---|---|---|---|"]
    for r in records:
        f = full.get((r["task"], r["length"], r["sample_id"]))
        if r["method"] == "full" or f is None or r["score"] >= f["score"]:
            continue
        depth = r.get("metadata", {}).get("depth")
        pred = r["prediction"].replace("\n", " ").replace("|", "/")[:60]
        fpred = f["prediction"].replace("\n", " ").replace("|", "/")[:30]
        lines.append(f"| {r['method']} | {r['task']} | {r['length']} | {depth if depth is None else round(depth, 2)} | "
                     f"{fpred!r} | {pred!r} | {', '.join(r['answers'])} |")
    return "\n".join(lines) + "\n"


def headline(metrics: dict) -> str:
    """Per method: mean score over every (task, length) cell where full attention also ran."""
    cells = defaultdict(dict)
    for row in metrics["rows"]:
        cells[row["method"]][(row["task"], row["length"])] = row["score"]
    full = cells.get("full", {})
    lines = ["| method | cells | mean score | vs full (same cells) |", "|---|---|---|---|"]
    for m in metrics["methods"]:
        common = [k for k in cells[m] if k in full]
        if not common:
            continue
        s = sum(cells[m][k] for k in common) / len(common)
        d = s - sum(full[k] for k in common) / len(common)
        lines.append(f"| {m} | {len(common)} | {s:.1f} | {d:+.1f} |")
    return "\n".join(lines) + "\n"


def paired(records: list[dict]) -> str:
    """Per method, sample by sample against full attention: with binary scores and 3 samples per
    cell, this (not the cell means) is what can show whether a method loses anything."""
    full = {(r["task"], r["length"], r["sample_id"]): r for r in records if r["method"] == "full"}
    stats = defaultdict(lambda: [0, 0, 0, 0, 0])  # samples, identical output, same score, better, worse
    for r in records:
        f = full.get((r["task"], r["length"], r["sample_id"]))
        if r["method"] == "full" or f is None:
            continue
        s = stats[r["method"]]
        s[0] += 1
        s[1] += r["prediction"] == f["prediction"]
        s[2] += r["score"] == f["score"]
        s[3] += r["score"] > f["score"]
        s[4] += r["score"] < f["score"]
    lines = ["| method | samples | identical output to full | same score | better | worse |", "|---|---|---|---|---|---|"]
    lines += [f"| {m} | {a} | {b} | {c} | {d} | {e} |" for m, (a, b, c, d, e) in stats.items()]
    return "\n".join(lines) + "\n"


SELECTOR_PAIRS = (("omnikv:selector=union", "omnikv"), ("omnikv:selector=union", "omnikv:selector=uniform"),
                  ("omnikv:selector=uniform", "omnikv"))


def selectors(records: list[dict]) -> str:
    """The OmniKV selectors against each other, sample by sample (exact sign test, bootstrap
    interval of the mean difference): the evidence for or against a default selector."""
    from omnikv.eval.stats import paired_comparison

    score = {(r["method"], r["task"], int(r["length"]), str(r["sample_id"])): float(r["score"]) for r in records}
    tasks = sorted({k[1] for k in score})
    out = ["| A | B | task | n | same | A better | A worse | sign p | mean A - B (95%) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for a, b in SELECTOR_PAIRS:
        for task in tasks + ["*"]:
            keys = [k[1:] for k in score if k[0] == a and (task == "*" or k[1] == task) and (b,) + k[1:] in score]
            if not keys:
                continue
            p = paired_comparison([score[(a,) + k] for k in keys], [score[(b,) + k] for k in keys])
            out.append(f"| {a} | {b} | {task} | {p['n']} | {p['same']} | {p['better']} | {p['worse']} | "
                       f"{p['sign_p']:.3f} | {p['mean_diff']:+.1f} ({p['diff_low']:+.1f}, {p['diff_high']:+.1f}) |")
    return "\n".join(out) + "\n" if len(out) > 2 else ""


def main(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for group, stages in GROUPS.items():
        records, runs = {}, []
        for st in stages:
            d = src / st
            for r in read_predictions(d / "predictions.jsonl"):
                records.setdefault((r["method"], r["task"], r["length"], r["sample_id"]), r)
            if (d / "run.json").is_file():
                runs.append({"stage": st, **json.loads((d / "run.json").read_text())})
        if not records:
            continue
        out = dst / group
        out.mkdir(parents=True, exist_ok=True)
        recs = list(records.values())
        metrics = write_reports(out, recs, title=f"omnikv eval: {group}")
        (out / "run.json").write_text(json.dumps({"stages": runs}, indent=2, default=str))
        (out / "budget.md").write_text(budget_table(group, recs))
        (out / "failures.md").write_text(failures(recs))
        (out / "headline.md").write_text(headline(metrics))
        (out / "paired.md").write_text(paired(recs))
        sel = selectors(recs)
        if sel:
            (out / "selectors.md").write_text(sel)
        pred = out / "predictions.jsonl"
        with pred.open("w", encoding="utf-8") as fh:
            for r in recs:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        if pred.stat().st_size > MAX_COPY:
            pred.unlink()
        print(f"{group}: {len(recs)} records -> {out}")


def seed_stages(src: Path, dst: Path) -> None:
    """Re-create missing stage directories under `src` from the merged predictions in `dst` (the
    committed tables), so that `run_suite.sh` resumes where the tables stand when the raw
    `runs/suite/` is gone: each missing stage of a group gets the group's records; `--resume`
    skips what is there and the merge above drops the duplicates."""
    for group, stages in GROUPS.items():
        pred = dst / group / "predictions.jsonl"
        if not pred.is_file():
            continue
        for st in stages:
            d = src / st
            if not (d / "predictions.jsonl").is_file():
                d.mkdir(parents=True, exist_ok=True)
                (d / "predictions.jsonl").write_bytes(pred.read_bytes())
                print(f"seeded {d} from {pred}")


if __name__ == "__main__":
    if sys.argv[1] == "--seed":  # results.py --seed runs/suite benchmarks/eval/results
        seed_stages(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        main(Path(sys.argv[1]), Path(sys.argv[2]))
