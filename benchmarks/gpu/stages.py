"""The stages of benchmarks/gpu/gpu_bench.py: model, correctness, timing, trace, max context, table."""

from __future__ import annotations

import gc
import gzip
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from omnikv.hf.compat import cache_kwargs
from omnikv.bench.run import BenchSpec, build_method, public_records, run_bench
from omnikv.methods.spec import parse_method, parse_methods
from omnikv.bench.fill import decode_step, first_token, synthetic_fill
from omnikv.bench.report import format_table

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


def sized_cache(model, label: str, ctx: int, decode_tokens: int):
    """A fresh cache of method `label`, sized once for `ctx` prompt + `decode_tokens` new tokens."""
    cache = build_method(parse_method(label), None).make_cache(model)
    if hasattr(cache, "reserve"):
        cache.reserve(ctx + decode_tokens, decode_tokens=decode_tokens)
    return cache


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
    # Both sides gather every selected row (partial_reload=False): the offload path's device gather
    # lays the rows out in selection order like the on-device gather, so the attention inputs are
    # the same rows in the same order; the tolerance covers kernel choice (fp32).
    for offload in (False, True):
        sim = {"transfer": "simulated"} if offload and device.type == "cpu" else {}  # no GPU: simulate it
        m = get_method("omnikv", budget=64, sink_tokens=4, recent_tokens=16, offload=offload,
                       partial_reload=False, **base, **sim)
        runs[offload] = greedy(model, m, prompt, n_new)
    cmp = _compare(runs[True], runs[False], 1e-4)
    stats = runs[True][2].stats()
    cmp.update(exact=cmp["max_abs_logit_diff"] == 0.0, host_kv_bytes=stats["host_kv_bytes"],
               h2d_bytes_per_step=stats["h2d_bytes_per_step"], host_syncs_per_step=stats.get("host_syncs_per_step"),
               transfer=stats.get("transfer"), pinned_host_bytes=stats.get("pinned_host_bytes"))
    if device.type == "cuda":  # the bank really is page-locked host memory and rows really move
        banks = [seg.bank for seg in runs[True][2].all_segments() if seg.bank is not None and seg.bank.data is not None]
        cmp["bank_pinned"] = all(b.data.is_pinned() and b.data.device.type == "cpu" for b in banks)
        cmp["passed"] = cmp["passed"] and cmp["bank_pinned"] and stats["h2d_bytes_per_step"] > 0
    res["offload_on_equals_off"] = cmp
    del model, runs, full
    _free(device)
    return res


# -- 2. timing -----------------------------------------------------------------------------------
def timing(model, methods: list[str], contexts: list[int], steps: int, tiny: bool, clock: Clock,
           notes: list[str], compiled: list[str] = (), compiled_contexts: list[int] | None = None) -> list[dict[str, Any]]:
    """Every method at every context; the `compiled` ones only at `compiled_contexts` (None: all)."""
    records: list[dict[str, Any]] = []
    device = next(model.parameters()).device
    for ctx in contexts:
        if clock.left() < (20 if tiny else 150):
            notes.append(f"timing at {ctx} skipped: {clock.left():.0f} s left")
            log(notes[-1])
            break
        labels = methods + [m for m in compiled if compiled_contexts is None or ctx in compiled_contexts]
        spec = BenchSpec(methods=parse_methods(",".join(labels)), contexts=[ctx], synthetic_kv=True,
                         steps=steps, warmup=1 if tiny else 8, breakdown_steps=1 if tiny else 6)
        t0 = time.perf_counter()
        recs = public_records(run_bench(model, spec, log=log))
        records.extend(recs)
        log(f"context {ctx} timed in {time.perf_counter() - t0:.1f} s\n" + format_table(recs))
        _free(device)
    return records


# -- 3. trace -------------------------------------------------------------------------------------
def analyze_trace(events: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """Host->device traffic in a chrome trace and how much of its time overlaps kernels of the
    compute stream. Traffic = HtoD memcpys plus kernels on side streams (the device gather reads
    mapped host memory from a kernel, so it shows as a kernel, not a memcpy). The compute stream is
    the one with the most kernel time."""
    done = [e for e in events if e.get("ph") == "X" and "dur" in e]
    kernels = [e for e in done if e.get("cat") == "kernel"]
    per_stream: dict[Any, float] = {}
    for k in kernels:
        per_stream[k.get("tid")] = per_stream.get(k.get("tid"), 0.0) + k["dur"]
    compute = max(per_stream, key=per_stream.get) if per_stream else None
    memcpys = [e for e in done if "HtoD" in str(e.get("name", "")) and "memcpy" in str(e.get("cat", "")).lower()]
    side_kernels = [k for k in kernels if k.get("tid") != compute]
    moves = memcpys + side_kernels
    if not moves:
        return {"h2d_copies": 0, "note": "no host->device copies or side-stream kernels in the trace"}
    main = [k for k in kernels if k.get("tid") == compute]
    total = overlapped = pageable = 0.0
    nbytes = 0
    for c in moves:
        a, b = c["ts"], c["ts"] + c["dur"]
        spans = sorted((max(a, k["ts"]), min(b, k["ts"] + k["dur"])) for k in main if k["ts"] < b and k["ts"] + k["dur"] > a)
        covered, end = 0.0, a
        for s, e in spans:  # union of the overlapping compute-kernel intervals
            if e > end:
                covered += e - max(s, end)
                end = e
        total += c["dur"]
        overlapped += covered
        if "pageable" in str(c.get("name", "")).lower():
            pageable += c["dur"]
        nbytes += int((c.get("args") or {}).get("bytes", 0) or 0)
    kernel_us = sum(k["dur"] for k in main)
    return {
        "h2d_copies": len(memcpys),
        "side_stream_kernels": len(side_kernels),
        "h2d_ms_per_step": round(total / 1e3 / steps, 3),
        "h2d_mb_per_step": round(nbytes / 2**20 / steps, 2) if nbytes else None,
        "overlapped_fraction": round(overlapped / total, 3) if total else None,
        "pageable_fraction": round(pageable / total, 3) if total else None,
        "kernel_ms_per_step": round(kernel_us / 1e3 / steps, 3),
        "copy_streams": sorted({str(c.get("tid")) for c in moves}),
    }


def trace(model, label: str, ctx: int, out: Path, clock: Clock, steps: int = 4) -> dict[str, Any]:
    if clock.left() < 40:
        return {"skipped": f"{clock.left():.0f} s left"}
    from torch.profiler import ProfilerActivity, profile, record_function

    device = next(model.parameters()).device
    cache = sized_cache(model, label, ctx, 16)
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


# -- 5. targets and the table ------------------------------------------------------------------------
def targets(summary: dict[str, Any], on_label: str) -> dict[str, Any]:
    """The issue's targets at the largest timed context with offload: decode >= 1.7x stock full
    attention and >= 1.3x full_prealloc at batch 1, device KV <= 25% of full, throughput >= 3x full
    attention's (each at its largest batch), copies overlapped (trace)."""
    recs = [r for r in summary.get("timing", []) if r.get("ms_per_token")]
    t: dict[str, Any] = {}
    if recs:
        ctx = max(r["context"] for r in recs)
        at = {r["method"]: r for r in recs if r["context"] == ctx}
        on = at.get(on_label)
        full, pre = at.get("full"), at.get("full_prealloc")
        t["context"] = ctx
        if on and full:
            x = full["ms_per_token"] / on["ms_per_token"]
            t["decode_vs_full_offload_on"] = {"value": round(x, 3), "target": 1.7, "met": x >= 1.7}
            share = on["device_kv_bytes"] / full["device_kv_bytes"]
            t["device_kv_share_offload_on"] = {"value": round(share, 4), "target": 0.25, "met": share <= 0.25}
        if on and pre:
            x = pre["ms_per_token"] / on["ms_per_token"]
            t["decode_vs_full_prealloc_offload_on"] = {"value": round(x, 3), "target": 1.3, "met": x >= 1.3}
    tp = (summary.get("throughput") or {}).get("methods", {})
    a = (tp.get(on_label) or {}).get("tokens_per_second")
    b = (tp.get("full_prealloc") or {}).get("tokens_per_second")
    if a and b:
        t["throughput_vs_full"] = {"value": round(a / b, 3), "target": 3.0, "met": a / b >= 3.0}
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
    pf = summary.get("prefill") or {}
    if pf.get("prefill_seconds") is not None:
        lines.append(f"prefill {pf['context']} tokens ({pf['method']}, chunk {pf['chunk']}): {pf['prefill_seconds']} s, "
                     f"H2D {pf['h2d_bytes_prefill']} B, D2H {pf['d2h_bytes_prefill']} B, transfer {pf['transfer']}")
    for label, e in ((summary.get("throughput") or {}).get("methods") or {}).items():
        lines.append(f"throughput {label} @ {summary['throughput']['context']}: {e.get('tokens_per_second')} tok/s "
                     f"(batch {(e.get('largest') or e.get('batch_1') or {}).get('batch')})")
    for b in summary.get("bounds", []):
        lines.append(f"bound {b['context']:>7} {b['method']:<32} measured {b['measured_ms']} ms, bound {b['bound_ms']} ms "
                     f"({b['limited_by']}), {b['over_bound_x']}x over")
    for name, t in summary.get("targets", {}).items():
        if isinstance(t, dict):
            lines.append(f"target {name}: {t['value']} (target {t['target']}) {'MET' if t['met'] else 'NOT MET'}")
    lines += [f"notes: {n}" for n in summary.get("notes", [])]
    lines.append(f"elapsed {summary.get('elapsed_seconds')} s; details in summary.json")
    return "\n".join(lines)


# -- 6. a real chunked prefill ------------------------------------------------------------------------
def real_prefill(model, label: str, ctx: int, chunk: int, clock: Clock) -> dict[str, Any]:
    """One real chunked prefill of random ids through `label`'s cache: seconds and the bytes the
    transfer interface counted (host->device should be ~0, device->host the prompt's rows once)."""
    if clock.left() < 30:
        return {"skipped": f"{clock.left():.0f} s left"}
    from omnikv.bench.fill import prefill_fill

    device = next(model.parameters()).device
    cache = sized_cache(model, label, ctx, 8)
    seconds, tok = prefill_fill(model, cache, ctx, chunk=chunk)
    tok = decode_step(model, cache, tok)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    st = cache.stats()
    keys = ("h2d_bytes_prefill", "d2h_bytes_prefill", "host_kv_bytes", "pinned_host_bytes", "device_kv_bytes",
            "host_syncs_per_step", "h2d_bytes_per_step", "transfer")
    res = {"method": label, "context": ctx, "chunk": chunk, "prefill_seconds": round(seconds, 2),
           **{k: st.get(k) for k in keys}}
    del cache
    _free(device)
    return res


# -- 7. throughput at the largest batch ---------------------------------------------------------------
def throughput(model, labels: list[str], ctx: int, clock: Clock, tiny: bool, steps: int = 4) -> dict[str, Any]:
    """Decode tokens/s at `ctx` with the largest batch each method fits: batch 1 first, then the
    batch its measured device bytes per sequence predict (x0.9), halving on out-of-memory."""
    device = next(model.parameters()).device
    out: dict[str, Any] = {"context": ctx, "methods": {}}
    for label in labels:
        if clock.left() < (10 if tiny else 40):
            out["methods"][label] = {"skipped": f"{clock.left():.0f} s left"}
            continue
        one = _batch_run(model, label, ctx, 1, steps)
        entry: dict[str, Any] = {"batch_1": one}
        if one.get("fits") and device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            per_seq = max(one["device_kv_bytes"], 1)
            batch = max(1, int(0.9 * (free - 2 * GIB) / per_seq))
            while batch > 1 and clock.left() > 30:
                run = _batch_run(model, label, ctx, batch, steps)
                if run.get("fits"):
                    entry["largest"] = run
                    break
                batch //= 2
        best = entry.get("largest") or one
        entry["tokens_per_second"] = best.get("tokens_per_second")
        out["methods"][label] = entry
        log(f"throughput {label} @ {ctx}: {entry}")
    return out


def _batch_run(model, label: str, ctx: int, batch: int, steps: int) -> dict[str, Any]:
    device = next(model.parameters()).device
    cache = None
    try:
        cache = sized_cache(model, label, ctx, steps + 4)
        synthetic_fill(model, cache, ctx, batch=batch)
        tok = first_token(model).expand(batch, 1).contiguous()
        tok = decode_step(model, cache, tok)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        s = time.perf_counter()
        for _ in range(steps):
            tok = decode_step(model, cache, tok)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = (time.perf_counter() - s) / steps
        st = cache.stats()
        return {"batch": batch, "fits": True, "ms_per_step": round(1e3 * dt, 2),
                "tokens_per_second": round(batch / dt, 1), "device_kv_bytes": st["device_kv_bytes"] // batch}
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is an answer here
        if not _is_oom(exc):
            raise
        return {"batch": batch, "fits": False, "error": str(exc).splitlines()[0][:160]}
    finally:
        del cache
        _free(device)


# -- 8. bandwidth bounds --------------------------------------------------------------------------------
# H200 SXM: HBM3e 4.8 TB/s; PCIe Gen5 x16 ~55 GB/s achievable host->device from page-locked memory.
HBM_BYTES_PER_S = 4.8e12
PCIE_BYTES_PER_S = 55e9


def bounds(records: list[dict[str, Any]], weights_bytes: int) -> list[dict[str, Any]]:
    """Per timed record: the step's lower bound from bytes and bandwidths (weights + device KV read
    once at HBM speed; host->device bytes at PCIe speed, when not hidden) and how far the measured
    step is above it, so a missed target names the part that is over its bound."""
    out = []
    for r in records:
        if not r.get("ms_per_token"):
            continue
        hbm_ms = 1e3 * (weights_bytes + r["device_kv_bytes"]) / HBM_BYTES_PER_S
        pcie_ms = 1e3 * r.get("h2d_bytes_per_step", 0) / PCIE_BYTES_PER_S
        bound = max(hbm_ms, pcie_ms)
        out.append({"method": r["method"], "context": r["context"], "measured_ms": r["ms_per_token"],
                    "hbm_bound_ms": round(hbm_ms, 3), "pcie_bound_ms": round(pcie_ms, 3),
                    "bound_ms": round(bound, 3), "over_bound_x": round(r["ms_per_token"] / bound, 2) if bound else None,
                    "limited_by": "host->device link" if pcie_ms > hbm_ms else "HBM (weights + KV)"})
    return out
