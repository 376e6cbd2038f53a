"""Run metadata, the on-screen table, the plot and the result file of `omnikv bench`.

Every result file carries the metadata (hardware, versions, commit, exact command, machine load),
so a number can always be traced back to where and how it was measured.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch


# -- metadata ---------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total() -> int | None:
    from omnikv.methods.memory import meminfo_bytes

    return meminfo_bytes("MemTotal")


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def bandwidth_probe(device: torch.device, mib: int = 256) -> dict[str, float]:
    """Measured copy bandwidth (GB/s, read + write counted once each), for the physical limits."""
    out: dict[str, float] = {}
    n = mib * 1024 * 1024 // 4
    a = torch.empty(n, dtype=torch.float32)
    b = torch.ones(n, dtype=torch.float32)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        a.copy_(b)
        best = min(best, time.perf_counter() - t0)
    out["host_copy_gbps"] = round(2 * a.numel() * 4 / best / 1e9, 2)
    if device.type == "cuda":
        da = torch.empty(n, dtype=torch.float32, device=device)
        db = torch.ones(n, dtype=torch.float32, device=device)
        pinned = b.pin_memory()
        for key, dst, src in (("device_copy_gbps", da, db), ("h2d_pinned_gbps", da, pinned)):
            best = float("inf")
            for _ in range(5):
                torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                dst.copy_(src, non_blocking=True)
                torch.cuda.synchronize(device)
                best = min(best, time.perf_counter() - t0)
            factor = 2 if key == "device_copy_gbps" else 1
            out[key] = round(factor * n * 4 / best / 1e9, 2)
        del da, db, pinned
    return out


def package_version() -> str:
    """The installed omnikv's version ("unknown" when it runs from a tree that was never installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("omnikv")
    except PackageNotFoundError:
        return "unknown"


def run_metadata(command: list[str] | None = None, device: torch.device | None = None,
                 extra: dict[str, Any] | None = None, probe_bandwidth: bool = True) -> dict[str, Any]:
    """Hardware, versions, commit and command of this run."""
    import transformers

    device = device or torch.device("cpu")
    meta: dict[str, Any] = {
        "time_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": shlex.join(command if command is not None else sys.argv),
        "host": {
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "memory_bytes": _mem_total(),
            "load_average_start": load_average(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "omnikv": package_version(),
            "cuda": torch.version.cuda,
        },
        "git": {"commit": _git("rev-parse", "HEAD"), "dirty": bool(_git("status", "--porcelain", "--", "."))},
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["gpu"] = {"name": props.name, "memory_bytes": props.total_memory,
                       "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count()}
    if probe_bandwidth:
        meta["bandwidth"] = bandwidth_probe(device)
    if extra:
        meta.update(extra)
    return meta


def finish_metadata(meta: dict[str, Any]) -> None:
    meta["host"]["load_average_end"] = load_average()


# -- table ------------------------------------------------------------------------------------------
def _mb(x: Any) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def _num(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def budget_line(records: list[dict[str, Any]]) -> str:
    """One line on the budgets: the one budget of every budgeted method, or a loud warning."""
    given = {r["method"]: r.get("budget") for r in records if r.get("budget") is not None}
    if len(set(map(str, given.values()))) > 1:
        return ("WARNING: methods ran at DIFFERENT budgets (" + ", ".join(f"{m} {b}" for m, b in given.items())
                + "): their speeds are not a comparison at equal cost")
    if given:
        return f"budget of every budgeted method: {next(iter(given.values()))} (prompt tokens per budgeted layer; a float is a share of the prompt)"
    return "no budgeted method"


def format_table(records: list[dict[str, Any]]) -> str:
    """A fixed-width table: one row per (context, method)."""
    head = ["context", "method", "ms/tok", "tok/s", "x full", "prefill s", "dev KV MB", "host KV MB",
            "H2D MB/step", "peak RSS MB", "peak dev MB", "compile s", "sel", "gather", "attn", "kv upd", "rest"]
    rows = [head]
    for r in records:
        bd = r.get("breakdown_ms") or {}
        rows.append([
            str(r["context"]), r["method"], _num(r["ms_per_token"], ".1f"), _num(r.get("tokens_per_s"), ".2f"),
            _num(r["ratio_to_full"], ".2f"), _num(r.get("prefill_seconds"), ".1f"),
            _mb(r["device_kv_bytes"]), _mb(r["host_kv_bytes"]), _mb(r["h2d_bytes_per_step"]),
            _mb(r.get("peak_rss_bytes")), _mb(r.get("peak_device_bytes")), _num(r.get("compile_seconds"), ".1f"),
            *[_num(bd.get(c), ".1f") for c in ("selection", "gather", "attention", "kv_update", "rest")],
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) if i != 1 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    notes = [f"  {r['context']} {r['method']}: {r['note']}" for r in records if r.get("note")]
    lines.insert(0, budget_line(records))
    tail = ["breakdown columns: mean ms per step in instrumented steps (selection, gather/transfer, "
            "attention, KV update, rest = total - parts; none for compiled methods); x full = full's ms/tok / "
            "this method's; compile s = seconds of the decode calls that compiled (not in ms/tok)"]
    return "\n".join(lines + (["notes:"] + notes if notes else []) + tail)


# -- plot and file ----------------------------------------------------------------------------------
def plot(records: list[dict[str, Any]], path: Path, meta: dict[str, Any] | None = None) -> Path:
    """PNG: ms/token and device KV (MiB) against context length, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    methods = list(dict.fromkeys(r["method"] for r in records))
    for m in methods:
        pts = sorted((r["context"], r) for r in records if r["method"] == m and r["ms_per_token"])
        if not pts:
            continue
        xs = [c for c, _ in pts]
        axes[0].plot(xs, [r["ms_per_token"] for _, r in pts], marker="o", label=m)
        axes[1].plot(xs, [r["device_kv_bytes"] / 2**20 for _, r in pts], marker="o", label=m)
    for ax, title in zip(axes, ("decode ms / token (median)", "KV bytes on the device (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(budget_line(records), fontsize=9)
    if meta:
        host = meta.get("host", {})
        commit = (meta.get("git", {}).get("commit") or "?")[:10]
        fig.text(0.01, 0.01, f"{meta.get('model', '')} | {meta.get('device')} | {host.get('cpu', '')} | "
                 f"threads {host.get('torch_threads')} | torch {meta['versions']['torch']} | "
                 f"transformers {meta['versions']['transformers']} | commit {commit}", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json_atomic(path: Path, obj: Any) -> Path:
    """`obj` as JSON at `path`, whole or not at all: written beside it, then renamed over it.

    A result file rewritten as a run goes on (the GPU run's summary.json after every stage) must
    survive the run being killed at any moment (run.sh's timeout): writing in place truncates the
    file first, and a kill then leaves it empty or torn, losing every stage measured before."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # left only when the write failed (a full disk): not kept
    return path


def write_results(records: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> Path:
    """JSON file {"metadata": ..., "records": [...]}."""
    return write_json_atomic(path, {"metadata": meta, "records": records})
