"""Render a bench.json (from `omnikv bench`) as the Markdown tables used in docs/performance.md.

    python benchmarks/md_table.py benchmarks/results/cpu-smollm2/bench.json
"""

from __future__ import annotations

import json
import sys


def _mb(x) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}"  # None: the run had no `full` to compare with


def render(path: str) -> str:
    data = json.load(open(path, encoding="utf-8"))
    meta, recs = data["metadata"], data["records"]
    host = meta["host"]
    lines = [
        f"Run {meta['time_utc']}, commit `{(meta['git']['commit'] or '?')[:10]}`"
        f"{' (+ uncommitted changes)' if meta['git'].get('dirty') else ''}; {meta.get('model')} ({meta.get('dtype')}); "
        f"{host['cpu']}, {host['cpu_count']} cores, torch threads {host['torch_threads']}; torch {meta['versions']['torch']}, "
        f"transformers {meta['versions']['transformers']}; load average {host.get('load_average_start')} -> "
        f"{host.get('load_average_end')}; copy bandwidth {meta.get('bandwidth', {}).get('host_copy_gbps')} GB/s.",
        f"Command: `{meta['command']}`",
        "",
        "| context | method | ms/token (median) | p10-p90 | x full | x full (paired) | device KV MB | H2D MB/step | peak RSS MB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in recs:
        if not r.get("ms_per_token"):
            lines.append(f"| {r['context']} | {r['method']} | {r.get('note')} | | | | | | |")
            continue
        lines.append(
            f"| {r['context']} | {r['method']} | {r['ms_per_token']:.1f} | {r['ms_p10']:.0f}-{r['ms_p90']:.0f} | "
            f"{_ratio(r['ratio_to_full'])} | {_ratio(r.get('ratio_to_full_paired'))} | {_mb(r['device_kv_bytes'])} | "
            f"{_mb(r['h2d_bytes_per_step'])} | {_mb(r.get('peak_rss_bytes'))} |"
        )
    broken_down = [r for r in recs if r.get("breakdown_ms")]
    if broken_down:
        lines += ["", "Breakdown of a decode step (mean ms over the instrumented steps; rest = total - parts):", "",
                  "| context | method | selection | gather | attention | KV update | rest | total |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in broken_down:
        b = r["breakdown_ms"]
        lines.append(f"| {r['context']} | {r['method']} | {b['selection']:.1f} | {b['gather']:.1f} | "
                     f"{b['attention']:.1f} | {b['kv_update']:.1f} | {b['rest']:.1f} | {b['total']:.1f} |")
    compiled = [r for r in recs if r.get("compile_seconds") is not None]
    if compiled:
        lines += ["", "Compiled methods: seconds spent in the decode calls that compiled (not in ms/token):", "",
                  "| context | method | compile s | compiles |", "|---:|---|---:|---:|"]
        lines += [f"| {r['context']} | {r['method']} | {r['compile_seconds']:.1f} | {r.get('compiles')} |"
                  for r in compiled]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(sys.argv[1]))
