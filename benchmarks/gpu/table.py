"""The judgement of a GPU run: step bounds from the bandwidths measured on the card, the targets
(met / not met / not measurable, with the reason) and the one summary table.

Pure functions of summary.json, so the table can be printed from whatever a run saved, also when
the run itself was cut off: `python benchmarks/gpu/table.py $OUT/summary.json` (run.sh does that
when gpu_bench.py did not finish). In the CI rehearsal (`summary["simulated"]`) every measured
number is printed as "simulated": the rows and the targets' status are what is checked there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

GIB = 2**30
SHORT = {"on": "omnikv offload", "host": "omnikv offload, host gather", "off": "omnikv no offload",
         "full": "full (stock)", "pre": "full_prealloc", "on_captured": "omnikv offload, captured",
         "pre_captured": "full_prealloc, captured"}


# -- bounds ---------------------------------------------------------------------------------------------
def bounds(records: list[dict[str, Any]], bw: dict[str, Any], model: dict[str, Any]) -> list[dict[str, Any]]:
    """Per timed record, the step's lower bound as a sum of its serial parts: weights (not the
    input embedding table: one row of it is read per token) + the KV the step attends, at the HBM
    read bandwidth measured here; the selected rows across the link at the link's measured speed
    (a gather kernel over mapped memory for the device gather; a host gather plus a copy for the
    host gather). A filter layer must finish before its rows can move, and the sparse layers wait
    for them: the link's time adds to the step, it is not hidden under the weights."""
    hbm = (bw.get("hbm_read_gbps") or 0) * 1e9
    if not hbm:
        return []
    weights_read = model["weight_bytes"] - model["embedding_bytes"]
    out = []
    for r in records:
        if not r.get("ms_per_token"):
            continue
        kv = r.get("kv_read_bytes_per_step") or r.get("device_kv_bytes") or 0
        hbm_ms = 1e3 * (weights_read + kv) / hbm
        moved = r.get("h2d_bytes_per_step") or 0
        transfer = r.get("transfer") or ""
        if transfer.endswith("device_gather"):
            link = (bw.get("mapped_gather_gbps") or bw.get("h2d_copy_gbps") or 0) * 1e9
            host_ms = 0.0
        else:
            link = (bw.get("h2d_copy_gbps") or 0) * 1e9
            host_ms = 1e3 * moved / ((bw.get("host_copy_gbps") or 0) * 1e9) if moved and bw.get("host_copy_gbps") else 0.0
        link_ms = 1e3 * moved / link if moved and link else 0.0
        bound = hbm_ms + link_ms + host_ms
        out.append({"context": r["context"], "group": r.get("group"), "method": r["method"], "measured_ms": r["ms_per_token"],
                    "hbm_ms": round(hbm_ms, 3), "link_ms": round(link_ms, 3), "host_gather_ms": round(host_ms, 3),
                    "bound_ms": round(bound, 3), "over_bound_x": round(r["ms_per_token"] / bound, 2) if bound else None})
    return out


# -- targets --------------------------------------------------------------------------------------------
def _record(summary: dict[str, Any], ctx: int, group: str, key: str) -> tuple[dict[str, Any] | None, str]:
    """The timed record of method `key` (a Labels field) in `group` at `ctx`, or None and why not."""
    label = summary.get("labels", {}).get(key)
    stage = summary.get("stages", {}).get(f"timing {ctx} {group}")
    if stage is None:
        return None, f"timing {group} at {ctx} did not run"
    if stage.get("status") != "done":
        return None, f"timing {group} at {ctx} {stage.get('status')}: {stage.get('reason')}"
    for r in summary.get("timing", []):
        if r["context"] == ctx and r.get("group") == group and r["method"] == label:
            if r.get("ms_per_token"):
                return r, ""
            return None, f"{SHORT.get(key, key)}: {r.get('note') or 'no timing'}"
    return None, f"{SHORT.get(key, key)} is not in the {group} group's records"


def _ratio(summary, ctx, group, num: str, den: str) -> tuple[float | None, str]:
    a, why_a = _record(summary, ctx, group, num)
    b, why_b = _record(summary, ctx, group, den)
    if a is None or b is None:
        return None, why_a or why_b
    return a["ms_per_token"] / b["ms_per_token"], ""


def _stage_reason(summary: dict[str, Any], stage: str) -> str:
    """Why `stage` (e.g. "trace", whatever its context) gave no result; "" when it ran."""
    for name, st in (summary.get("stages") or {}).items():
        if name == stage or name.startswith(stage + " "):
            return f"{name} {st.get('status')}: {st.get('reason')}" if st.get("status") != "done" else ""
    return f"{stage} did not run"


def _k(ctx: int) -> str:
    return f"{ctx // 1024}K" if ctx >= 1024 and ctx % 1024 == 0 else str(ctx)


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the run at its largest context: value, target, status, reason."""
    ctx = max(summary.get("contexts") or [0])
    out: list[dict[str, Any]] = []

    def add(key: str, name: str, value: float | None, op: str, goal: float, reason: str = "", real: bool = False) -> None:
        if value is None:
            status = "not measurable"
        elif summary.get("simulated") and not real:  # the rehearsal's correctness is real CPU arithmetic
            status = "simulated"
        else:
            status = "met" if (value >= goal if op == ">=" else value <= goal) else "not met"
        out.append({"key": key, "name": name, "value": None if value is None else round(value, 4), "target": f"{op} {goal:g}",
                    "status": status, "reason": reason if value is None else "", "real": real})

    corr = summary.get("correctness") or {}
    why = _stage_reason(summary, "correctness")
    add("correctness", "correctness (offload on == off, full budget == full)", None if why else float(all(v.get("passed") for v in corr.values())),
        ">=", 1.0, why, real=True)
    for group, tag in (("eager", "eager"), ("captured", "captured")):
        on, pre = ("on", "pre") if group == "eager" else ("on_captured", "pre_captured")
        x, why = _ratio(summary, ctx, group, "full", on)
        add(f"decode_vs_full_{tag}", f"decode vs stock full, {tag}, batch 1, {_k(ctx)}", x, ">=", 1.7, why)
        x, why = _ratio(summary, ctx, group, pre, on)
        add(f"decode_vs_prealloc_{tag}", f"decode vs full_prealloc, {tag}, batch 1, {_k(ctx)}", x, ">=", 1.3, why)
    on, why = _record(summary, ctx, "eager", "on")
    goal = (summary.get("device_kv_target") or {}).get(str(ctx))
    share = None
    if on is not None and goal is not None:
        held = on.get("resident_device_bytes") if on.get("resident_device_bytes") is not None else on["device_kv_bytes"]
        share = held / on["full_kv_bytes"]
    add("device_kv_share", f"device KV share with offload, {_k(ctx)} (formula: {goal['formula'] if goal else '?'})", share, "<=",
        round(goal["value"] * 1.02, 4) if goal else 0.0, why or ("" if goal else "no formula computed"))
    tp = summary.get("throughput") or {}
    labels = summary.get("labels", {})
    a = ((tp.get("methods") or {}).get(labels.get("on")) or {}).get("tokens_per_second")
    b = ((tp.get("methods") or {}).get(labels.get("pre")) or {}).get("tokens_per_second")
    add("throughput", f"throughput vs full_prealloc, largest batch each, {_k(tp.get('context', ctx))}", a / b if a and b else None,
        ">=", 3.0, _stage_reason(summary, "throughput") or "a method fitted no batch")
    tr = summary.get("trace") or {}
    frac = tr.get("overlapped_fraction")
    if summary.get("simulated") and not _stage_reason(summary, "trace"):
        frac = 0.0  # the CPU trace has no device streams; the stage ran, which is what is checked
    add("h2d_overlap", "host->device traffic overlapping compute (trace)", frac, ">=", 0.5,
        _stage_reason(summary, "trace") or tr.get("note") or "no host->device traffic in the trace")
    return out


# -- the table ------------------------------------------------------------------------------------------
def _num(x: Any, fmt: str, simulated: bool) -> str:
    if x is None:
        return "-"
    return "simulated" if simulated else format(x, fmt)


def render(summary: dict[str, Any]) -> str:
    sim = bool(summary.get("simulated"))
    meta = summary.get("metadata") or {}
    versions = meta.get("versions") or {}
    lines = ["", "=" * 110,
             f"SUMMARY  {(meta.get('gpu') or {}).get('name', meta.get('device'))} | {meta.get('model')} | "
             f"torch {versions.get('torch')} | transformers {versions.get('transformers')} | "
             f"commit {((meta.get('git') or {}).get('commit') or '?')[:10]}" + ("  [REHEARSAL: fake CUDA on a CPU]" if sim else "")]
    for name, st in (summary.get("stages") or {}).items():
        if st.get("status") != "done":
            lines.append(f"stage {name}: {st.get('status')}: {st.get('reason')}")
    for name, res in (summary.get("correctness") or {}).items():
        extra = res.get("max_abs_logit_diff")
        lines.append(f"correctness {name}: {'PASS' if res.get('passed') else 'FAIL'}"
                     + (f" (max |dlogit| {_num(extra, '.2e', sim)}; transfer {res.get('transfer')}, bank "
                        f"{res.get('host_memory')}; {res.get('gather_reason')})" if extra is not None and "host_memory" in res else "")
                     + (f" (max |dlogit| {_num(extra, '.2e', sim)}; reload {res.get('reload')}, H2D "
                        f"{_num((res.get('h2d_bytes_per_step') or 0) / 2**20, '.2f', sim)} MB/step vs "
                        f"{_num((res.get('full_gather_h2d_bytes_per_step') or 0) / 2**20, '.2f', sim)} with every row)"
                        if extra is not None and "reload" in res else ""))
    bw = summary.get("bandwidths") or {}
    if bw:
        mm = bw.get("mapped_memory") or {}
        lines.append(f"bandwidth GB/s: HBM read {_num(bw.get('hbm_read_gbps'), '.0f', sim)}, host->device copy "
                     f"{_num(bw.get('h2d_copy_gbps'), '.1f', sim)}, gather from mapped host memory "
                     f"{_num(bw.get('mapped_gather_gbps'), '.1f', sim)}, host copy {_num(bw.get('host_copy_gbps'), '.1f', sim)}; "
                     f"mapped memory {'usable' if mm.get('usable') else 'NOT usable'} ({mm.get('reason')})")
    names = {v: k for k, v in (summary.get("labels") or {}).items()}
    bnd = {(b["context"], b.get("group"), b["method"]): b for b in summary.get("bounds") or []}
    lines.append(f"{'context':>8} {'group':<11} {'method':<27} {'transfer':<18} {'ms/tok':>9} {'x full':>9} "
                 f"{'dev KV GiB':>10} {'held GiB':>9} {'fill pk GiB':>11} {'H2D MB/st':>9} {'bound ms':>9} {'x bound':>9}")
    for r in summary.get("timing") or []:
        name = SHORT.get(names.get(r["method"]), r["method"])
        head = f"{r['context']:>8} {r.get('group', ''):<11} {name:<27} "
        if not r.get("ms_per_token"):
            lines.append(head + f"{r.get('note')}")
            continue
        b = bnd.get((r["context"], r.get("group"), r["method"])) or {}
        gib = lambda k: None if r.get(k) is None else r[k] / GIB  # noqa: E731
        lines.append(head + f"{(r.get('transfer') or '-'):<18} {_num(r['ms_per_token'], '.2f', sim):>9} "
                     f"{_num(r.get('ratio_to_full'), '.2f', sim):>9} {_num(gib('device_kv_bytes'), '.3f', sim):>10} "
                     f"{_num(gib('resident_device_bytes'), '.3f', sim):>9} {_num(gib('fill_peak_device_bytes'), '.2f', sim):>11} "
                     f"{_num((r.get('h2d_bytes_per_step') or 0) / 2**20, '.1f', sim):>9} {_num(b.get('bound_ms'), '.2f', sim):>9} "
                     f"{_num(b.get('over_bound_x'), '.2f', sim):>9}")
    reloads = {f"{SHORT.get(names.get(r['method']), r['method'])} @ {r['context']}": r["reload"]
               for r in summary.get("timing") or [] if r.get("reload") not in (None, "off", "inline")}
    if reloads:  # which rows crossed the link: the changed ones (the kernel) or every selected one
        lines.append("reload of changed rows: " + "; ".join(f"{k}: {v}" for k, v in reloads.items()))
    tr = summary.get("trace") or {}
    if tr.get("h2d_copies") or tr.get("side_stream_kernels"):
        lines.append(f"trace ({SHORT.get(names.get(tr['method']), tr['method'])} @ {tr['context']}): "
                     f"{_num(tr.get('overlapped_fraction'), '.0%', sim)} of {_num(tr.get('h2d_ms_per_step'), '.2f', sim)} "
                     f"ms/step of host->device traffic overlapped compute; file {tr.get('file')}")
    elif tr:
        lines.append(f"trace: {tr.get('note')}")
    for label, e in ((summary.get("throughput") or {}).get("methods") or {}).items():
        sized = e.get("sized") or {}
        lines.append(f"throughput {SHORT.get(names.get(label), label)} @ {summary['throughput']['context']}: "
                     f"{_num(e.get('tokens_per_second'), '.1f', sim)} tok/s at batch {e.get('batch')} (sized "
                     f"{sized.get('batch')}: device allows {sized.get('by_device')}, host {sized.get('by_host')}; peak/seq "
                     f"{_num((e.get('batch_1') or {}).get('peak_device_bytes', 0) / GIB, '.2f', sim)} GiB)")
    pf = summary.get("prefill") or {}
    if pf.get("prefill_seconds") is not None:
        lines.append(f"prefill {pf['context']} tokens ({SHORT.get(names.get(pf['method']), pf['method'])}, chunk {pf['chunk']}): "
                     f"{_num(pf['prefill_seconds'], '.2f', sim)} s, peak {_num(pf['prefill_peak_device_bytes'] / GIB, '.2f', sim)} "
                     f"GiB above the weights, H2D {_num(pf['h2d_bytes_prefill'], 'd', sim)} B, D2H "
                     f"{_num(pf['d2h_bytes_prefill'], 'd', sim)} B, transfer {pf['transfer']}")
    lim = summary.get("limits") or {}
    if lim.get("methods"):
        lines.append("longest prompt that fits (plan_memory, batch 1, this card and MemAvailable): " + ", ".join(
            f"{SHORT.get(names.get(k), k)} {_num(v['max_context'], 'd', sim)}" for k, v in lim["methods"].items()))
    lines.append("targets:")
    for t in summary.get("targets") or targets(summary):
        status = t["status"].upper() + (f": {t['reason']}" if t.get("reason") else "")
        lines.append(f"  {t['name']:<78} {_num(t['value'], '.3f', sim and not t.get('real')):>9}  {t['target']:<8} {status}")
    lines += [f"note: {n}" for n in summary.get("notes", [])]
    lines.append(f"elapsed {summary.get('elapsed_seconds')} s; details in summary.json")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python benchmarks/gpu/table.py SUMMARY_JSON", file=sys.stderr)
        return 2
    try:
        summary = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {args[0]}: {exc}", file=sys.stderr)
        return 2
    summary["targets"] = targets(summary)
    print(render(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
