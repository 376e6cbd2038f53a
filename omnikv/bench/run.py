"""Decode-speed and memory benchmark: one timing code path for `omnikv bench` and benchmarks/.

For each context length, every method's cache is filled (synthetic KV or a real prefill), warmed
up, and then the methods are timed *interleaved*: round r runs one decode step of every method (in
an order rotated each round), so slow drifts of a shared machine hit all methods alike and the
ratio to `full` is measured pair by pair. After the clean rounds, a few instrumented rounds give a
breakdown of a step into selection, gather/transfer, attention, KV update and the rest.

Example:
    from omnikv.methods.spec import parse_methods
    spec = BenchSpec(methods=parse_methods("full,full_prealloc,omnikv"), contexts=[8192, 32768])
    records = run_bench(model, spec)
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from omnikv.bench.fill import (
    decode_step,
    first_token,
    kv_shapes,
    model_device_dtype,
    needs_real_prefill,
    prefill_fill,
    synthetic_fill,
)
from omnikv.bench.probe import CATEGORIES, MemoryWindow, StepBreakdown, current_rss
from omnikv.errors import ConfigError
from omnikv.methods import REFERENCE, get_method, make_decoder  # ratio_to_full compares every method with REFERENCE
from omnikv.methods.spec import BudgetPlan, MethodSpec, plan_budgets
from omnikv.budget import parse_token_count



@dataclass
class BenchSpec:
    methods: list[MethodSpec]
    contexts: list[int]
    synthetic_kv: bool = True
    steps: int = 64
    warmup: int = 8
    breakdown_steps: int = 16
    batch: int = 1
    budget: int | float | None = None  # passed to every method except the full-attention ones
    prefill_chunk: int | None = 2048
    seed: int = 0
    # A method that fails (any error, not only out of memory) is recorded with its error, and the
    # others go on: for one-shot runs such as benchmarks/gpu/, where a crash loses the whole call.
    keep_going: bool = False

    def __post_init__(self) -> None:
        if not self.methods:
            raise ConfigError("give at least one method, e.g. --methods full,omnikv")
        if not self.contexts:
            raise ConfigError("give at least one context length, e.g. --contexts 8k,16k")
        labels = [m.label for m in self.methods]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"a method is listed twice: {labels}")
        for name, value, low in (("steps", self.steps, 1), ("warmup", self.warmup, 0),
                                 ("breakdown_steps", self.breakdown_steps, 0), ("batch", self.batch, 1)):
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an int >= {low}; got {value!r}")


# -- parsing ------------------------------------------------------------------------------------
def parse_context(text: str) -> int:
    """'8k' -> 8192, '1m' -> 1048576, '3000' -> 3000."""
    return parse_token_count(text, "context length")


def parse_contexts(text: str) -> list[int]:
    return [parse_context(x) for x in text.split(",") if x.strip()]


# -- one method at one context --------------------------------------------------------------------
@dataclass
class _Run:
    spec: MethodSpec
    method: Any
    cache: Any = None
    tok: torch.Tensor | None = None
    fill_seconds: float | None = None
    prefill_seconds: float | None = None
    peak_rss: int | None = None
    peak_device: int | None = None
    baseline_device: int = 0  # device bytes held before any cache of this context was built
    resident_device: int | None = None  # device bytes the method holds once filled and warm
    times: list[float] = field(default_factory=list)
    h2d: list[int] = field(default_factory=list)
    breakdown: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    note: str | None = None
    decoder: Any = None  # omnikv.hf.static.StaticDecoder for static / compile=true methods


COMPILED_MIN_WARMUP = 3  # compile on the first step; CUDA graphs record after a warm-up call


def _step(model, run: _Run, tok: torch.Tensor) -> torch.Tensor:
    """One decode step of `run` (through its static decoder when it has one)."""
    if run.decoder is None:
        return decode_step(model, run.cache, tok, run.method)
    with torch.inference_mode():
        return run.decoder(tok)[:, -1].argmax(-1, keepdim=True)


# Budget of every budgeted method in `omnikv bench` when --budget is not given: a token count, not a
# share, so that every context length times the same work per budgeted layer (the paper's latency
# setting); it is also the embedded models' preset budget, so OmniKV's documented timings hold.
BENCH_DEFAULT_BUDGET = 1024


def budget_plan(spec: BenchSpec) -> BudgetPlan:
    """One budget for every budgeted method (spec.budget, else BENCH_DEFAULT_BUDGET); a method
    spec's own `budget=` option differs and is flagged (see omnikv.methods.spec.plan_budgets)."""
    return plan_budgets(spec.methods, spec.budget, BENCH_DEFAULT_BUDGET)


def build_method(ms: MethodSpec, budget: int | float | None):
    """The method of `ms` at `budget` (the plan's budget for it); None = the spec's own `budget=`
    option, else the method's default."""
    options = dict(ms.options)
    own = options.pop("budget", None)
    return get_method(ms.name, budget=budget if budget is not None else own, **options)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower()


def _fill(model, run: _Run, spec: BenchSpec, context: int, baseline: tuple[int, int], device) -> None:
    run.cache = run.method.make_cache(model)
    run.decoder = make_decoder(run.method, model, run.cache)
    decode_tokens = spec.warmup + spec.steps + spec.breakdown_steps + 8
    warmup = spec.warmup
    if run.decoder is not None:  # a static cache is sized for the prompt and every step at once
        if run.decoder.compiled:
            decode_tokens += COMPILED_MIN_WARMUP
            warmup = max(warmup, COMPILED_MIN_WARMUP)
        run.cache.reserve(context + decode_tokens, decode_tokens=decode_tokens)
    elif hasattr(run.cache, "reserve"):
        run.cache.reserve(decode_tokens)
    with MemoryWindow(baseline[0], baseline[1], device) as mem:
        if spec.synthetic_kv:
            run.fill_seconds = synthetic_fill(model, run.cache, context, spec.batch, spec.seed)
            run.tok = first_token(model, spec.batch, spec.seed)
        else:
            run.prefill_seconds, run.tok = prefill_fill(
                model, run.cache, context, spec.batch, spec.prefill_chunk, spec.seed, run.method
            )
            run.fill_seconds = run.prefill_seconds
        for _ in range(warmup):  # includes compiling (timed apart, in the decoder)
            run.tok = _step(model, run, run.tok)
    run.peak_rss, run.peak_device = mem.peak_rss, mem.peak_device
    run.baseline_device, run.resident_device = baseline[1], mem.resident_device


def _failure(exc: BaseException, where: str, keep_going: bool) -> str:
    """The note for a method that failed `where`; re-raises what is neither out of memory nor
    tolerated (`keep_going`)."""
    first = (str(exc).splitlines() or [""])[0][:200]
    if _is_oom(exc):
        return f"out of memory {where}: {first}"
    if not keep_going:
        raise exc
    return f"failed {where}: {type(exc).__name__}: {first}"


def _drop(run: _Run, note: str, device, log: Callable[[str], None]) -> None:
    """Free a failed run's cache (its record keeps what was measured before, and the note)."""
    run.note, run.cache, run.decoder, run.times, run.h2d = note, None, None, [], []
    log(f"{run.spec.label}: {note}")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _timed_rounds(model, runs: list[_Run], steps: int, device, keep_going: bool = False,
                  log: Callable[[str], None] = lambda _m: None) -> None:
    live = list(runs)
    for r in range(steps):
        k = r % len(live) if live else 0
        for run in live[k:] + live[:k]:  # rotate so no method always follows the same one
            try:
                _sync(device)
                t0 = time.perf_counter()
                run.tok = _step(model, run, run.tok)
                _sync(device)
            except Exception as exc:  # noqa: BLE001 - one method failing must not lose the others
                _drop(run, _failure(exc, f"at timed step {r}", keep_going), device, log)
                live.remove(run)
                continue
            run.times.append(time.perf_counter() - t0)
            stats = run.cache.stats() if hasattr(run.cache, "stats") else {}
            run.h2d.append(int(stats.get("h2d_bytes_per_step", 0) or 0))


def _breakdown_rounds(model, runs: list[_Run], steps: int, device) -> None:
    if steps <= 0:
        return
    # The probe wraps attention functions in timers: inside a compiled step that would force a
    # recompile with graph breaks, so compiled runs have no breakdown.
    runs = [run for run in runs if run.cache is not None and (run.decoder is None or not run.decoder.compiled)]
    if not runs:
        return
    probe = StepBreakdown(sync=device.type == "cuda")
    probe.install([run.cache for run in runs])
    try:
        for _ in range(steps):
            for run in runs:
                _sync(device)
                probe.take()
                t0 = time.perf_counter()
                run.tok = _step(model, run, run.tok)
                _sync(device)
                run.breakdown.append((time.perf_counter() - t0, probe.take()))
    finally:
        probe.uninstall()


# -- records --------------------------------------------------------------------------------------
def _kv_token_bytes(model, batch: int) -> int:
    """Bytes of one token's K and V in one layer."""
    _, kv_heads, head_dim = kv_shapes(model)
    _, dtype = model_device_dtype(model)
    return 2 * batch * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _breakdown_ms(samples: list[tuple[float, dict[str, float]]]) -> dict[str, float] | None:
    """Mean ms per category over the instrumented steps (means, so the parts add up to total)."""
    if not samples:
        return None
    n = len(samples)
    out = {c: 1e3 * sum(parts[c] for _, parts in samples) / n for c in CATEGORIES}
    out["total"] = 1e3 * sum(total for total, _ in samples) / n
    out["rest"] = out["total"] - sum(out[c] for c in CATEGORIES)
    return {k: round(v, 4) for k, v in out.items()}


def _record(model, run: _Run, context: int, spec: BenchSpec, weights: int) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "method": run.spec.label,
        "method_name": run.spec.name,
        "budget": run.method.budget,
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in run.spec.options.items()},
        "context": context,
        "batch": spec.batch,
        "fill": "synthetic" if spec.synthetic_kv else "prefill",
        "ms_per_token": None,
        "ratio_to_full": None,
        "device_kv_bytes": None,
        "host_kv_bytes": None,
        "h2d_bytes_per_step": None,
        "note": run.note,
    }
    if not run.times:
        return rec
    ms = [1e3 * t for t in run.times]
    stats = run.cache.stats() if hasattr(run.cache, "stats") else {}
    rec["transfer"] = stats.get("transfer")  # the strategy that ran, e.g. "cuda/device_gather"
    rec["reload"] = stats.get("reload")  # how changed rows were refreshed, e.g. "triton kernel"
    attended = stats.get("attended_tokens_per_layer") or []
    kv_read = sum(attended) * _kv_token_bytes(model, 1) * spec.batch if attended else None
    med = statistics.median(ms)
    rec.update(
        ms_per_token=round(med, 4),
        ms_per_token_mean=round(statistics.fmean(ms), 4),
        ms_p10=round(_quantile(ms, 0.1), 4),
        ms_p90=round(_quantile(ms, 0.9), 4),
        steps=len(ms),
        tokens_per_s=round(1e3 * spec.batch / med, 3),
        prefill_seconds=None if run.prefill_seconds is None else round(run.prefill_seconds, 4),
        fill_seconds=None if run.fill_seconds is None else round(run.fill_seconds, 4),
        device_kv_bytes=int(stats.get("device_kv_bytes", 0)),
        host_kv_bytes=int(stats.get("host_kv_bytes", 0)),
        h2d_bytes_per_step=int(statistics.median(run.h2d)) if run.h2d else 0,
        full_kv_bytes=context * _kv_token_bytes(model, spec.batch) * kv_shapes(model)[0],
        attended_tokens_per_layer=attended,
        kv_read_bytes_per_step=kv_read,
        weight_bytes=weights,
        peak_rss_bytes=run.peak_rss,
        peak_device_bytes=run.peak_device,
        # what this method's fill + warm-up added on the device at its peak (a prefill's peak)
        fill_peak_device_bytes=None if run.peak_device is None else run.peak_device - run.baseline_device,
        resident_device_bytes=run.resident_device,  # allocated, measured (device_kv_bytes: counted)
        breakdown_ms=_breakdown_ms(run.breakdown),
        config=_jsonable(run.method.describe()),
        telemetry=stats.get("telemetry"),  # omnikv:telemetry=true: selection coverage per layer
        compiled=bool(run.decoder is not None and run.decoder.compiled),
        compile_seconds=None if run.decoder is None or not run.decoder.compiled else round(run.decoder.compile_seconds, 3),
        compiles=None if run.decoder is None or not run.decoder.compiled else run.decoder.compiles,
        _times=ms,
    )
    return rec


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def add_ratios(records: list[dict[str, Any]]) -> None:
    """ratio_to_full = full's ms/token / this method's (same context); >1 = faster than full.

    Also `ratio_to_full_paired`: the median over rounds of full's step time / this method's step
    time in the same round (robust to load changes during the run).
    """
    by_ctx: dict[int, dict[str, Any]] = {}
    for rec in records:
        if rec["method_name"] == REFERENCE and rec["ms_per_token"] and rec["context"] not in by_ctx:
            by_ctx[rec["context"]] = rec
    for rec in records:
        ref = by_ctx.get(rec["context"])
        if ref is None or not rec["ms_per_token"]:
            continue
        rec["ratio_to_full"] = round(ref["ms_per_token"] / rec["ms_per_token"], 4)
        a, b = ref.get("_times") or [], rec.get("_times") or []
        pairs = [x / y for x, y in zip(a, b) if y > 0]
        rec["ratio_to_full_paired"] = round(statistics.median(pairs), 4) if pairs else None


# -- the run --------------------------------------------------------------------------------------
def run_bench(model, spec: BenchSpec, log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Time every method of `spec` at every context; one record per (method, context)."""
    log = log or (lambda _msg: None)
    device, _ = model_device_dtype(model)
    model.eval()
    weights = weight_bytes(model)
    records: list[dict[str, Any]] = []
    plan = budget_plan(spec)
    if plan.warning():
        log(plan.warning())
    # Bad options fail before any work; so does a model the methods do not support (one cache each),
    # except under `keep_going` (the one-shot GPU run), where such a method is recorded at fill.
    methods = [build_method(ms, plan.budgets[ms.label]) for ms in spec.methods]
    if not spec.keep_going:
        for method in methods:
            method.make_cache(model)
    for context in spec.contexts:
        gc.collect()
        baseline = (current_rss(), torch.cuda.memory_allocated(device) if device.type == "cuda" else 0)
        runs: list[_Run] = []
        ctx_records: list[dict[str, Any]] = []
        for ms, method in zip(spec.methods, methods):
            run = _Run(ms, method)
            if spec.synthetic_kv and needs_real_prefill(run.method):
                run.note = f"skipped: {ms.name} decides what to keep from prefill attention; run without --synthetic-kv"
                log(f"[{context}] {ms.label}: {run.note}")
                ctx_records.append(_record(model, run, context, spec, weights))
                continue
            log(f"[{context}] {ms.label}: filling ({'synthetic KV' if spec.synthetic_kv else 'prefill'})")
            try:
                _fill(model, run, spec, context, baseline, device)
            except Exception as exc:  # noqa: BLE001 - one method out of memory must not lose the others
                _drop(run, _failure(exc, "at fill", spec.keep_going), device, lambda m: log(f"[{context}] {m}"))
                ctx_records.append(_record(model, run, context, spec, weights))
                continue
            runs.append(run)
        if runs:
            log(f"[{context}] timing {spec.steps} interleaved steps of {', '.join(r.spec.label for r in runs)}")
            _timed_rounds(model, runs, spec.steps, device, spec.keep_going, lambda m: log(f"[{context}] {m}"))
            try:
                _breakdown_rounds(model, runs, spec.breakdown_steps, device)
            except Exception as exc:  # noqa: BLE001 - the timed steps above are kept
                note = _failure(exc, "in the breakdown steps", spec.keep_going)
                log(f"[{context}] {note}")
                for run in runs:
                    run.breakdown = []
        ctx_records.extend(_record(model, run, context, spec, weights) for run in runs)
        order = {ms.label: i for i, ms in enumerate(spec.methods)}
        ctx_records.sort(key=lambda r: order[r["method"]])
        records.extend(ctx_records)
        for run in runs:
            run.cache = None
        del runs
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    add_ratios(records)
    return records


def public_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records without the private per-step times (what goes to JSON)."""
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in records]
