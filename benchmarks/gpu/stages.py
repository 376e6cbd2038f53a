"""The stages of benchmarks/gpu/gpu_bench.py: model, correctness, timing, trace, max context, table."""

from __future__ import annotations

import gc
import gzip
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from omnikv._compat import cache_kwargs
from omnikv.bench.run import BenchSpec, build_method, public_records, run_bench
from omnikv.methods.spec import parse_method, parse_methods
from omnikv.bench.fill import decode_step, first_token, synthetic_fill
from omnikv.bench.report import format_table
from omnikv.methods.memory import meminfo_bytes

GIB = 2**30


def log(msg: str) -> None:
    print(f"[gpu-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Clock:
    """Wall-clock budget of the whole run; stages ask `left()` before starting work."""

    def __init__(self, total: float) -> None:
        self.total = total
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.total - self.elapsed()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (MemoryError, getattr(torch.cuda, "OutOfMemoryError", MemoryError))) or (
        "out of memory" in str(exc).lower()
    )


# -- model -------------------------------------------------------------------------------------------
def random_llama(shape: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A LlamaForCausalLM with random N(0, 0.02) weights built directly on `device` in `dtype`.

    transformers' own initialisation is skipped (it would run twice over 8B parameters); the
    weights are drawn in place afterwards, which takes well under a second on a GPU.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:  # then pay for the default init (still on the device)
            from contextlib import nullcontext as no_init_weights
    config = LlamaConfig(**shape, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights(), torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # RMSNorm weights
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def weight_gib(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / GIB


# -- 1. correctness ----------------------------------------------------------------------------------
SMALL = dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=512, vocab_size=1024, rope_theta=500000.0, max_position_embeddings=8192)


@torch.inference_mode()
def greedy(model, method, prompt: torch.Tensor, n: int):
    """Prefill `prompt` (1, T) through the method's cache, then n greedy steps.

    Returns (tokens list, logits (n, V) float32, cache)."""
    cache = method.make_cache(model)
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
    toks, rows = [], []
    for _ in range(n):
        logits = out.logits[:, -1].float()
        rows.append(logits[0].cpu())
        tok = logits.argmax(-1, keepdim=True)
        toks.append(int(tok))
        out = model(input_ids=tok, use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
    return toks, torch.stack(rows), cache


def _compare(a, b, tol: float) -> dict[str, Any]:
    diff = float((a[1] - b[1]).abs().max())
    return {"tokens_equal": a[0] == b[0], "max_abs_logit_diff": diff, "tolerance": tol,
            "passed": a[0] == b[0] and diff <= tol}


def correctness(device: torch.device, tiny: bool) -> dict[str, Any]:
    """Full-budget OmniKV == full attention; offload on == off at a real budget (fp32)."""
    from omnikv.methods import get_method

    shape = dict(SMALL, hidden_size=128, intermediate_size=256) if tiny else SMALL
    model = random_llama(shape, device, torch.float32, seed=1)
    n_prompt, n_new = (200, 6) if tiny else (1500, 16)
    prompt = torch.randint(0, SMALL["vocab_size"], (1, n_prompt), generator=torch.Generator().manual_seed(3)).to(device)
    base = dict(filter_layers=(1, 4), num_wait_layers=1)
    full = greedy(model, get_method("full"), prompt, n_new)
    res: dict[str, Any] = {}
    eq = {}
    for offload in (False, True):
        m = get_method("omnikv", budget=1.0, sink_tokens=0, recent_tokens=0, offload=offload, **base)
        eq[f"offload={offload}"] = _compare(greedy(model, m, prompt, n_new), full, 1e-3)
    res["full_budget_equivalence"] = {"passed": all(v["passed"] for v in eq.values()), **eq}
    runs = {}
    for offload in (False, True):
        m = get_method("omnikv", budget=64, sink_tokens=4, recent_tokens=16, offload=offload, **base)
        runs[offload] = greedy(model, m, prompt, n_new)
    cmp = _compare(runs[True], runs[False], 1e-6)
    stats = runs[True][2].stats()
    cmp.update(exact=cmp["max_abs_logit_diff"] == 0.0, host_kv_bytes=stats["host_kv_bytes"],
               h2d_bytes_per_step=stats["h2d_bytes_per_step"])
    if device.type == "cuda":  # the bank really is pinned host memory and rows really move
        banks = [seg.bank for seg in runs[True][2].segments.values() if seg.bank is not None]
        cmp["bank_pinned"] = all(b.data.is_pinned() and b.data.device.type == "cpu" for b in banks)
        cmp["passed"] = cmp["passed"] and cmp["bank_pinned"] and stats["h2d_bytes_per_step"] > 0
    res["offload_on_equals_off"] = cmp
    del model, runs, full
    _free(device)
    return res


# -- 2. timing -----------------------------------------------------------------------------------
def timing(model, methods: list[str], contexts: list[int], steps: int, tiny: bool, clock: Clock,
           notes: list[str]) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    device = next(model.parameters()).device
    for ctx in contexts:
        if clock.left() < (20 if tiny else 150):
            notes.append(f"timing at {ctx} skipped: {clock.left():.0f} s left")
            log(notes[-1])
            break
        spec = BenchSpec(methods=parse_methods(",".join(methods)), contexts=[ctx], synthetic_kv=True,
                         steps=steps, warmup=1 if tiny else 8, breakdown_steps=1 if tiny else 6)
        t0 = time.perf_counter()
        recs = public_records(run_bench(model, spec, log=log))
        records.extend(recs)
        log(f"context {ctx} timed in {time.perf_counter() - t0:.1f} s\n" + format_table(recs))
        _free(device)
    return records


# -- 3. trace -------------------------------------------------------------------------------------
def analyze_trace(events: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """Host->device copies in a chrome trace and how much of their time overlaps kernels running on
    other streams (= compute the copy is hidden behind)."""
    done = [e for e in events if e.get("ph") == "X" and "dur" in e]
    copies = [e for e in done if "HtoD" in str(e.get("name", "")) and "memcpy" in str(e.get("cat", "")).lower()]
    kernels = [e for e in done if e.get("cat") == "kernel"]
    if not copies:
        return {"h2d_copies": 0, "note": "no host->device copies in the trace"}
    total = overlapped = pageable = 0.0
    nbytes = 0
    for c in copies:
        a, b = c["ts"], c["ts"] + c["dur"]
        spans = sorted((max(a, k["ts"]), min(b, k["ts"] + k["dur"])) for k in kernels
                       if k.get("tid") != c.get("tid") and k["ts"] < b and k["ts"] + k["dur"] > a)
        covered, end = 0.0, a
        for s, e in spans:  # union of the overlapping kernel intervals
            if e > end:
                covered += e - max(s, end)
                end = e
        total += c["dur"]
        overlapped += covered
        if "pageable" in str(c.get("name", "")).lower():
            pageable += c["dur"]
        nbytes += int((c.get("args") or {}).get("bytes", 0) or 0)
    kernel_us = sum(k["dur"] for k in kernels)
    return {
        "h2d_copies": len(copies),
        "h2d_ms_per_step": round(total / 1e3 / steps, 3),
        "h2d_mb_per_step": round(nbytes / 2**20 / steps, 2) if nbytes else None,
        "overlapped_fraction": round(overlapped / total, 3) if total else None,
        "pageable_fraction": round(pageable / total, 3) if total else None,
        "kernel_ms_per_step": round(kernel_us / 1e3 / steps, 3),
        "copy_streams": sorted({str(c.get("tid")) for c in copies}),
    }


def trace(model, label: str, ctx: int, out: Path, clock: Clock, steps: int = 4) -> dict[str, Any]:
    if clock.left() < 40:
        return {"skipped": f"{clock.left():.0f} s left"}
    from torch.profiler import ProfilerActivity, profile, record_function

    device = next(model.parameters()).device
    cache = build_method(parse_method(label), None).make_cache(model)
    if hasattr(cache, "reserve"):
        cache.reserve(16)
    synthetic_fill(model, cache, ctx)
    tok = first_token(model)
    for _ in range(3):
        tok = decode_step(model, cache, tok)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function("decode_step"):
                tok = decode_step(model, cache, tok)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    del cache
    _free(device)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        data = json.loads(raw.read_text())
        dest = out / "trace_omnikv_offload.json.gz"
        with raw.open("rb") as src, gzip.open(dest, "wb") as gz:
            shutil.copyfileobj(src, gz)
    events = data.get("traceEvents", data if isinstance(data, list) else [])
    result = {"method": label, "context": ctx, "steps": steps, "file": dest.name, **analyze_trace(events, steps)}
    if device.type != "cuda":
        result["note"] = "no CUDA: CPU-only trace, nothing crosses a bus"
    return result


# -- 4. longest context ----------------------------------------------------------------------------
def _mem_available() -> int:
    return meminfo_bytes("MemAvailable") or 0


def _mem_total() -> int:
    return meminfo_bytes("MemTotal") or 0


def try_context(model, label: str, ctx: int, steps: int = 2) -> dict[str, Any]:
    """Fill `label`'s cache to `ctx` tokens and decode `steps` steps; did it fit?"""
    device = next(model.parameters()).device
    cache = None
    t0 = time.perf_counter()
    try:
        cache = build_method(parse_method(label), None).make_cache(model)
        if hasattr(cache, "reserve"):
            cache.reserve(steps + 4)
        synthetic_fill(model, cache, ctx)
        tok = first_token(model)
        times = []
        for _ in range(steps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            s = time.perf_counter()
            tok = decode_step(model, cache, tok)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - s)
        st = cache.stats()
        return {"context": ctx, "fits": True, "ms_per_token": round(1e3 * min(times), 2),
                "device_kv_bytes": st["device_kv_bytes"], "host_kv_bytes": st["host_kv_bytes"],
                "seconds": round(time.perf_counter() - t0, 1)}
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is an answer here
        if not _is_oom(exc):
            raise
        return {"context": ctx, "fits": False, "error": str(exc).splitlines()[0][:160],
                "seconds": round(time.perf_counter() - t0, 1)}
    finally:
        del cache
        _free(device)


def max_context(model, methods: list[str], records: list[dict[str, Any]], tiny: bool, clock: Clock) -> dict[str, Any]:
    """Predict each method's longest context from bytes per token at the largest timed context,
    then check it by filling: at 0.92x the prediction it must fit; device-limited methods are also
    tried at 1.12x, where they must not. Host-RAM-limited methods are never pushed past a safe
    share of free host memory (an out-of-memory kill would lose the whole run)."""
    device = next(model.parameters()).device
    timed = [r for r in records if r.get("ms_per_token")]
    if not timed:
        return {"skipped": "no timing records"}
    ctx = max(r["context"] for r in timed)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        dev_budget = total - weights - 3 * GIB  # headroom for the allocator and activations
        host_budget = int(0.45 * _mem_available())  # pinned banks may be rounded up to 2x
        host_ram = int(0.9 * _mem_total())
        simulated = False
    else:  # tiny/CPU: simulated limits exercise the same code path
        dev_budget, host_budget, simulated = 4 * 2**20, 2 * 2**20, True
        host_ram = 2 * host_budget
    out: dict[str, Any] = {"device_budget_bytes": dev_budget, "host_budget_bytes": host_budget,
                           "simulated_limits": simulated, "from_context": ctx, "methods": {}}
    order = sorted(methods, key=lambda m: (m not in ("full",) and "offload=true" not in m, methods.index(m)))
    for label in order:
        rec = next((r for r in timed if r["method"] == label and r["context"] == ctx), None)
        if rec is None:
            continue
        if clock.left() < (10 if tiny else 45):
            out["methods"][label] = {"skipped": f"{clock.left():.0f} s left"}
            continue
        dev_bytes = rec["peak_device_bytes"] - weights if rec.get("peak_device_bytes") else rec["device_kv_bytes"]
        per_dev = max(dev_bytes, 1) / ctx
        per_host = 2 * rec["host_kv_bytes"] / ctx  # x2: pinned allocations round up to a power of two
        pred_dev = dev_budget / per_dev
        pred_host = host_budget / per_host if per_host else math.inf
        pred = int(min(pred_dev, pred_host))
        limit = "device memory" if pred_dev <= pred_host else "host RAM (safe share)"
        unit = 64 if tiny else 1024
        # What host RAM allows if the bank were allocated exactly (no power-of-two rounding):
        # the bound the method itself has; the trials stay inside the safe share above.
        ram_bound = int(min(pred_dev, host_ram / (per_host / 2) if per_host else math.inf))
        entry: dict[str, Any] = {"predicted": pred, "limited_by": limit, "ram_bound": ram_bound,
                                 "device_bytes_per_token": round(per_dev, 1), "host_bytes_per_token": round(per_host / 2, 1)}
        trials = [try_context(model, label, max(unit, int(0.92 * pred) // unit * unit))]
        if not trials[-1]["fits"] and clock.left() > 30:
            trials.append(try_context(model, label, max(unit, int(0.7 * pred) // unit * unit)))
        if limit == "device memory" and clock.left() > (5 if tiny else 40) and not simulated:
            trials.append(try_context(model, label, int(1.12 * pred) // unit * unit))
        entry["trials"] = trials
        fits = [t["context"] for t in trials if t["fits"]]
        entry["max_context_verified"] = max(fits) if fits else None
        out["methods"][label] = entry
        log(f"max context {label}: {entry}")
    return out


# -- 5. targets and the table ------------------------------------------------------------------------
def targets(summary: dict[str, Any], budget: int) -> dict[str, Any]:
    recs = [r for r in summary.get("timing", []) if r.get("ms_per_token")]
    if not recs:
        return {}
    ctx = max(r["context"] for r in recs)
    at = {r["method"]: r for r in recs if r["context"] == ctx}
    on, off = at.get(f"omnikv:offload=true:budget={budget}"), at.get(f"omnikv:offload=false:budget={budget}")
    full = at.get("full")
    t: dict[str, Any] = {"context": ctx}
    for name, rec in (("decode_speedup_offload_on", on), ("decode_speedup_offload_off", off)):
        if rec and rec.get("ratio_to_full"):
            t[name] = {"value": rec["ratio_to_full"], "target": 2.5, "met": rec["ratio_to_full"] >= 2.5}
    if on and full:
        share = on["device_kv_bytes"] / full["device_kv_bytes"]
        t["device_kv_share_offload_on"] = {"value": round(share, 4), "target": 0.25, "met": share <= 0.25}
    mc = summary.get("max_context", {}).get("methods", {})
    full_max = (mc.get("full") or {}).get("max_context_verified")
    on_max = (mc.get(f"omnikv:offload=true:budget={budget}") or {}).get("max_context_verified")
    if full_max and on_max:
        ratio = on_max / full_max
        t["max_context_ratio"] = {"value": round(ratio, 3), "target": 3.0, "met": ratio >= 3.0}
        bound = (mc.get(f"omnikv:offload=true:budget={budget}") or {}).get("ram_bound")
        if bound:  # the host-RAM bound without the script's safety share / allocator rounding
            r2 = bound / full_max
            t["max_context_ratio_ram_bound"] = {"value": round(r2, 3), "target": 3.0, "met": r2 >= 3.0}
    tr = summary.get("trace") or {}
    if tr.get("overlapped_fraction") is not None:
        t["h2d_overlap"] = {"value": tr["overlapped_fraction"], "target": 0.5, "met": tr["overlapped_fraction"] >= 0.5}
    return t


def render(summary: dict[str, Any]) -> str:
    meta = summary["metadata"]
    lines = ["", "=" * 100, f"SUMMARY  {meta.get('gpu', {}).get('name', meta['device'])} | {meta.get('model')} | "
             f"torch {meta['versions']['torch']} | transformers {meta['versions']['transformers']} | "
             f"commit {(meta['git'].get('commit') or '?')[:10]}"]
    for name, res in summary["correctness"].items():
        extra = res.get("max_abs_logit_diff")
        lines.append(f"correctness {name}: {'PASS' if res['passed'] else 'FAIL'}" + (f" (max |dlogit| {extra:.2e})" if extra is not None else ""))
    lines.append(f"{'context':>8}  {'method':<32} {'ms/tok':>8} {'x full':>7} {'dev KV GiB':>10} {'host KV GiB':>11} "
                 f"{'H2D MB/step':>11} {'peak dev GiB':>12}")
    for r in summary.get("timing", []):
        if not r.get("ms_per_token"):
            lines.append(f"{r['context']:>8}  {r['method']:<32} {r.get('note')}")
            continue
        peak = r.get("peak_device_bytes")
        lines.append(f"{r['context']:>8}  {r['method']:<32} {r['ms_per_token']:>8.2f} {r['ratio_to_full'] or 0:>7.2f} "
                     f"{r['device_kv_bytes'] / GIB:>10.3f} {r['host_kv_bytes'] / GIB:>11.3f} "
                     f"{r['h2d_bytes_per_step'] / 2**20:>11.1f} {'-' if peak is None else f'{peak / GIB:.2f}':>12}")
    tr = summary.get("trace") or {}
    if tr.get("h2d_copies"):
        lines.append(f"H2D overlap ({tr['method']} @ {tr['context']}): {tr['overlapped_fraction']:.0%} of "
                     f"{tr['h2d_ms_per_step']} ms/step of host->device copies overlapped kernels on other streams; "
                     f"pageable share {tr['pageable_fraction']:.0%}; trace {tr['file']}")
    else:
        lines.append(f"H2D overlap: {tr.get('note') or tr.get('skipped') or 'n/a'}")
    for label, e in (summary.get("max_context", {}).get("methods") or {}).items():
        if "skipped" in e:
            lines.append(f"max context {label}: skipped ({e['skipped']})")
        else:
            lines.append(f"max context {label}: verified {e['max_context_verified']} (predicted {e['predicted']}, "
                         f"limited by {e['limited_by']}; host-RAM bound {e['ram_bound']})" + (" [simulated limits]" if summary['max_context'].get('simulated_limits') else ""))
    for name, t in summary.get("targets", {}).items():
        if isinstance(t, dict):
            lines.append(f"target {name}: {t['value']} (target {t['target']}) {'MET' if t['met'] else 'NOT MET'}")
    lines += [f"notes: {n}" for n in summary.get("notes", [])]
    lines.append(f"elapsed {summary.get('elapsed_seconds')} s; details in summary.json")
    return "\n".join(lines)
