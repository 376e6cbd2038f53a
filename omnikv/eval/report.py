"""Aggregate per-sample records into metrics, a markdown summary and a plot.

Input is the list of prediction records the runner writes (one dict per (method, task, length,
sample)); everything here is recomputed from those records, so merged shards give the same
reports as one unsharded run.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from omnikv.eval.stats import paired_comparison, score_interval

_FIDELITY_KEYS = ("greedy_agreement", "top1_agreement", "mean_kl")


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


def _ordered(values: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def task_label(record: dict[str, Any]) -> str:
    """The task name a report shows for `record`: its task, marked "(question before)" when the
    question preceded the haystack, so both layouts of one task get their own rows."""
    if record.get("question_position") not in (None, "after"):
        return f"{record['task']} (question {record['question_position']})"
    return record["task"]


def aggregate(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean score (x100) with its 95% interval, and fidelity / perplexity / speed / budget per
    (method, task, length); paired comparisons of every method against full attention.

    Returns {"rows": [...], "methods": [...], "tasks": [...], "lengths": [...],
    "average": {method: {length: mean of task scores}}, "paired": [...]}. A row's `ci_low` /
    `ci_high` bound its score (Wilson or bootstrap: `interval`); a paired entry compares one
    method with "full" on the samples both ran, per (task, length), per length over all tasks
    (task "*") and over everything (task "*", length 0) - see omnikv.eval.stats. Tasks are
    `task_label`s: a task asked before its haystack is a task of its own here."""
    positions = _ordered(r.get("question_position") or "after" for r in records)
    records = [{**r, "task": task_label(r)} for r in records]
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["method"], r["task"], int(r["length"]))].append(r)
    rows = []
    for (method, task, length), recs in groups.items():
        fid = [r.get("fidelity") or {} for r in recs]
        ci = score_interval([float(r["score"]) for r in recs])
        rows.append({
            "method": method, "task": task, "length": length, "n": len(recs),
            "metric": recs[0].get("metric"),
            "score": 100.0 * _mean(r["score"] for r in recs),
            "ci_low": ci["low"], "ci_high": ci["high"], "interval": ci["interval"],
            **{k: _mean(f.get(k) for f in fid) for k in _FIDELITY_KEYS},
            "perplexity": _mean(r.get("perplexity") for r in recs),
            "decode_tokens_per_second": _mean(r.get("decode_tokens_per_second") for r in recs),
            "attended_fraction": _mean((r.get("budget_report") or {}).get("attended_fraction") for r in recs),
            "device_kv_share": _mean((r.get("budget_report") or {}).get("device_kv_share") for r in recs),
        })
    methods = _ordered(r["method"] for r in records)
    tasks = _ordered(r["task"] for r in records)
    lengths = sorted({int(r["length"]) for r in records})
    rows.sort(key=lambda r: (tasks.index(r["task"]), r["length"], methods.index(r["method"])))
    average: dict[str, dict[str, float]] = {}
    for m in methods:
        average[m] = {}
        for length in lengths:
            scores = [r["score"] for r in rows if r["method"] == m and r["length"] == length]
            if scores:
                average[m][str(length)] = sum(scores) / len(scores)
    return {"rows": rows, "methods": methods, "tasks": tasks, "lengths": lengths, "average": average,
            "paired": paired_rows(records, methods, tasks, lengths), "per_question": per_question_rows(records),
            "budgets": budget_rows(records, methods, lengths), "question_positions": positions}


def budget_rows(records: list[dict[str, Any]], methods: list[str], lengths: list[int]) -> list[dict[str, Any]]:
    """Per (method, length): the budget as given (`budget`, None for exact methods), what it
    resolved to (`budget_tokens`: prompt tokens a budgeted layer attends, mean over samples), and
    what the method measurably attended: `attended_fraction` (mean over all layers and samples of
    attended rows / sequence, with its min-max over samples) and `device_kv_share` (its device
    KV bytes / full attention's)."""
    from omnikv.budget import Budget

    out = []
    for m in methods:
        for length in lengths:
            recs = [r for r in records if r["method"] == m and int(r["length"]) == length]
            if not recs:
                continue
            given = _ordered(r.get("budget") for r in recs)
            tokens = [Budget(r["budget"]).tokens(int(r["prompt_tokens"])) for r in recs
                      if r.get("budget") is not None and r.get("prompt_tokens")]
            shares = [s for s in ((r.get("budget_report") or {}).get("attended_fraction") for r in recs) if s is not None]
            out.append({
                "method": m, "length": length, "n": len(recs),
                "budget": given[0] if len(given) == 1 else given,
                "budget_tokens": sum(tokens) / len(tokens) if tokens else None,
                "attended_fraction": _mean(shares),
                "attended_fraction_low": min(shares) if shares else None,
                "attended_fraction_high": max(shares) if shares else None,
                "device_kv_share": _mean((r.get("budget_report") or {}).get("device_kv_share") for r in recs),
            })
    return out


def unequal_budgets(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """{method: budget} of the budgeted methods when they ran at different budgets, else None."""
    given: dict[str, Any] = {}
    for b in metrics.get("budgets") or []:
        if b["budget"] is not None:
            given.setdefault(b["method"], b["budget"])
    return given if len({json.dumps(v) for v in given.values()}) > 1 else None


def per_question_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Shared-context tasks: score (x100, 95% interval) per (method, task, length, question index:
    0 = asked first)."""
    groups: dict[tuple[str, str, int, int], list[float]] = defaultdict(list)
    for r in records:
        if r.get("question_index") is not None:
            groups[(r["method"], r["task"], int(r["length"]), int(r["question_index"]))].append(float(r["score"]))
    out = []
    for (method, task, length, qi), scores in groups.items():
        ci = score_interval(scores)
        out.append({"method": method, "task": task, "length": length, "question_index": qi, "n": len(scores),
                    "score": 100.0 * sum(scores) / len(scores), "ci_low": ci["low"], "ci_high": ci["high"],
                    "interval": ci["interval"]})
    out.sort(key=lambda r: (r["task"], r["length"], r["question_index"]))
    return out


def paired_rows(records: list[dict[str, Any]], methods: list[str], tasks: list[str],
                lengths: list[int], reference: str = "full") -> list[dict[str, Any]]:
    """Every method vs `reference` on the samples both ran (matched by task, length, sample id)."""
    score = {(r["method"], r["task"], int(r["length"]), str(r["sample_id"])): float(r["score"]) for r in records}
    ref = {k[1:]: v for k, v in score.items() if k[0] == reference}
    if not ref:
        return []
    out = []
    for m in methods:
        if m == reference:
            continue
        pairs = [(k[1:], v, ref[k[1:]]) for k, v in score.items() if k[0] == m and k[1:] in ref]
        scopes = [(t, n) for t in tasks for n in lengths] + [("*", n) for n in lengths] + [("*", 0)]
        for task, length in scopes:
            sel = [(a, b) for (t, n, _), a, b in pairs if task in ("*", t) and length in (0, n)]
            if sel and not (task == "*" and length != 0 and len(lengths) == 1):  # = the "all" row
                out.append({"method": m, "task": task, "length": length,
                            **paired_comparison([a for a, _ in sel], [b for _, b in sel])})
    return out


def paired_markdown(paired: list[dict[str, Any]], reference: str) -> list[str]:
    """`paired_rows` as markdown lines: an explanation and the table."""
    out = [f"Paired against {reference} (same samples): samples scoring the same / better / worse, "
           "exact two-sided sign test (McNemar on 0/1 scores), mean difference in points with its "
           "bootstrap 95% interval. Task `*` = all tasks; length `all` = every length.", "",
           "| method | task | length | n | same | better | worse | sign p | mean diff (95%) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for p in paired:
        out.append(f"| {p['method']} | {p['task']} | {p['length'] or 'all'} | {p['n']} | {p['same']} | "
                   f"{p['better']} | {p['worse']} | {_fmt_p(p['sign_p'])} | {p['mean_diff']:+.1f} "
                   f"({p['diff_low']:+.1f}, {p['diff_high']:+.1f}) |")
    return out


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _fmt_ci(row: dict[str, Any]) -> str:
    """`score (low-high)`: the 95% interval next to the score."""
    if row.get("ci_low") is None:
        return _fmt(row["score"])
    return f"{row['score']:.1f} ({row['ci_low']:.0f}-{row['ci_high']:.0f})"


def _fmt_p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _budget_text(budget: Any) -> str:
    if budget is None:
        return "none (exact)"
    if isinstance(budget, list):
        return "mixed: " + ", ".join(map(str, budget))
    return f"{budget:g} of the prompt" if isinstance(budget, float) else f"{budget} tokens"


def setting_lines(metrics: dict[str, Any], meta: dict[str, Any] | None = None) -> list[str]:
    """What every report states first: model, task lengths, samples, each method's budget as given
    and as resolved, and its measured attended share; a loud line when budgets differ."""
    meta = meta or {}
    args = meta.get("args") or {}
    model = (meta.get("model") or {}).get("name") or args.get("model") or "?"
    ns = sorted({r["n"] for r in metrics["rows"]})
    out = [f"Model **{model}**; task lengths {', '.join(map(str, metrics['lengths']))} tokens; "
           f"samples per cell {', '.join(map(str, ns))}"
           + (f" (seed {args['seed']})" if args.get("seed") is not None else "") + "; greedy decoding."]
    positions = metrics.get("question_positions") or ["after"]
    if positions != ["after"]:
        out += ["", "Question position: " + " and ".join(positions) + " the haystack (tasks asked before it "
                "are marked \"(question before)\"; docs/evaluation.md, \"Question before the context\")."]
    unequal = unequal_budgets(metrics)
    if unequal:
        out += ["", "> **WARNING: the methods ran at DIFFERENT budgets** ("
                + ", ".join(f"{m}: {_budget_text(b)}" for m, b in unequal.items())
                + "). Their scores are not a comparison at equal cost; run without per-method budgets "
                "to give every budgeted method one budget."]
    else:
        common = next((b["budget"] for b in metrics.get("budgets") or [] if b["budget"] is not None), None)
        if common is not None:
            out += ["", f"Every budgeted method ran at one budget: {_budget_text(common)}."]
    rows = metrics.get("budgets") or []
    if rows:
        out += ["", "Budget per method: as given, resolved to prompt tokens per budgeted layer, and measured: "
                "the share of the sequence attended at the last decode step, averaged over all layers "
                "(min-max over samples), and device KV as a share of full attention's.", "",
                "| method | length | budget | resolved (tokens per budgeted layer) | attended share, all layers | device KV share |",
                "|---|---|---|---|---|---|"]
        for b in rows:
            share = "-" if b["attended_fraction"] is None else (
                f"{b['attended_fraction']:.3f} ({b['attended_fraction_low']:.3f}-{b['attended_fraction_high']:.3f})")
            out.append(f"| {b['method']} | {b['length']} | {_budget_text(b['budget'])} | "
                       f"{_fmt(b['budget_tokens'], 0) if b['budget_tokens'] is not None else 'all'} | {share} | "
                       f"{_fmt(b['device_kv_share'], 3)} |")
    return out


def summary_markdown(metrics: dict[str, Any], title: str = "omnikv eval", meta: dict[str, Any] | None = None) -> str:
    """Markdown: the setting (model, lengths, samples, budgets and measured attended shares), a
    score table (task x length rows, method columns), the average row, the paired table, and
    per-question / fidelity / perplexity tables when measured. `meta` is the run's run.json."""
    methods, rows = metrics["methods"], metrics["rows"]
    index = {(r["task"], r["length"], r["method"]): r for r in rows}
    keys = _ordered((r["task"], r["length"]) for r in rows)
    failed = (meta or {}).get("failed_methods") or {}
    out = [f"# {title}", "", *setting_lines(metrics, meta), ""]
    if failed:
        out += ["**Failed methods** (skipped after their first error; `--resume` tries them again):", "",
                *[f"- `{name}`: {why}" for name, why in failed.items()], ""]
    out += ["Scores (x100; metric per task in metrics.json), with the 95% interval in "
           "parentheses (Wilson for 0/1 scores, else a bootstrap of the mean).", "",
           "| task | length | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for task, length in keys:
        cells = [_fmt_ci(index[(task, length, m)]) if (task, length, m) in index else "-" for m in methods]
        n = max(index[(task, length, m)]["n"] for m in methods if (task, length, m) in index)
        out.append(f"| {task} (n={n}) | {length} | " + " | ".join(cells) + " |")
    for length in metrics["lengths"]:
        cells = [_fmt(metrics["average"].get(m, {}).get(str(length))) for m in methods]
        out.append(f"| **average** | {length} | " + " | ".join(cells) + " |")
    paired = metrics.get("paired") or []
    if paired:
        out += [""] + paired_markdown(paired, "full attention")
    per_q = metrics.get("per_question") or []
    if per_q:
        qkeys = _ordered((r["task"], r["length"], r["question_index"]) for r in per_q)
        qidx = {(r["task"], r["length"], r["question_index"], r["method"]): r for r in per_q}
        out += ["", "Shared-context task per question index (0 = asked first; each about another part "
                "of the document), score with 95% interval.", "",
                "| task | length | question | " + " | ".join(methods) + " |",
                "|---|---|---|" + "---|" * len(methods)]
        for task, length, qi in qkeys:
            cells = [_fmt_ci(qidx[(task, length, qi, m)]) if (task, length, qi, m) in qidx else "-" for m in methods]
            out.append(f"| {task} | {length} | {qi} | " + " | ".join(cells) + " |")
    fid_rows = [r for r in rows if r.get("greedy_agreement") is not None]
    if fid_rows:
        out += ["", "Fidelity against full attention (teacher-forced on full attention's greedy output).", "",
                "| task | length | method | greedy agreement | top-1 agreement | mean KL (nats) |",
                "|---|---|---|---|---|---|"]
        for r in fid_rows:
            out.append(f"| {r['task']} | {r['length']} | {r['method']} | {_fmt(r['greedy_agreement'], 3)} | "
                       f"{_fmt(r['top1_agreement'], 3)} | {_fmt(r['mean_kl'], 4)} |")
    ppl_rows = [r for r in rows if r.get("perplexity") is not None]
    if ppl_rows:
        out += ["", "Perplexity of the reference answer after the prompt.", "",
                "| task | length | method | perplexity |", "|---|---|---|---|"]
        out += [f"| {r['task']} | {r['length']} | {r['method']} | {_fmt(r['perplexity'], 3)} |" for r in ppl_rows]
    return "\n".join(out) + "\n"


def _length_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def plot_title(metrics: dict[str, Any], meta: dict[str, Any] | None = None) -> str:
    """The figure's title: model, budget(s) and samples per cell."""
    meta = meta or {}
    model = (meta.get("model") or {}).get("name") or (meta.get("args") or {}).get("model") or "?"
    budgets = _ordered(json.dumps(b["budget"]) for b in metrics.get("budgets") or [] if b["budget"] is not None)
    if not budgets:
        budget = "no budgeted method"
    elif len(budgets) == 1:
        budget = "budget " + _budget_text(json.loads(budgets[0]))
    else:
        budget = "DIFFERENT budgets per method: " + ", ".join(
            f"{m} {_budget_text(b)}" for m, b in (unequal_budgets(metrics) or {}).items())
    ns = sorted({r["n"] for r in metrics["rows"]})
    return f"{model}, {budget}, n = {'/'.join(map(str, ns))} per point; bars: 95% intervals"


def plot_scores(metrics: dict[str, Any], path: Path, meta: dict[str, Any] | None = None) -> bool:
    """Score vs length per method: one panel per task (with 95% interval error bars) plus the
    average, under a title naming the model, the budget(s) and the samples. Returns False (and
    writes nothing) if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = list(metrics["tasks"]) + ["average"]
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    lengths = metrics["lengths"]
    for ax, panel in zip(axes.flat, panels):
        for j, m in enumerate(metrics["methods"]):
            if panel == "average":
                pts = sorted((int(k), v, v, v) for k, v in metrics["average"].get(m, {}).items())
            else:
                pts = sorted((r["length"], r["score"], r.get("ci_low", r["score"]), r.get("ci_high", r["score"]))
                             for r in metrics["rows"] if r["task"] == panel and r["method"] == m)
            if pts:
                # Distinct markers and dashes keep overlapping methods (equal scores) visible; a
                # small per-method x offset keeps their error bars apart.
                xs = [p[0] * (1 + 0.02 * (j - (len(metrics["methods"]) - 1) / 2)) for p in pts]
                ys = [p[1] for p in pts]
                err = [[max(0.0, p[1] - p[2]) for p in pts], [max(0.0, p[3] - p[1]) for p in pts]]
                ax.errorbar(xs, ys, yerr=None if panel == "average" else err, marker="os^Dvx"[j % 6],
                            linestyle=("-", "--", ":", "-.")[j % 4], markersize=7 - j % 3, capsize=3, label=m)
        ax.set_title("average over tasks" if panel == "average" else panel, fontsize=9)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("score")
        ax.set_ylim(-5, 105)
        if len(lengths) > 1:
            ax.set_xscale("log", base=2)
            ax.minorticks_off()
        else:  # one length: keep the per-method offsets small around it
            ax.set_xlim(lengths[0] * 0.85, lengths[0] * 1.15)
        ax.set_xticks(lengths)
        ax.set_xticklabels([_length_label(n) for n in lengths], fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(plot_title(metrics, meta), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
