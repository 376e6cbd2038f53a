"""The stages of benchmarks/gpu/gpu_bench.py: the rig, model, correctness, timing groups, trace,
throughput, prefill, and the longest context each method fits. Targets and the table: table.py.

Every CUDA call goes through `torch.cuda` with `rig.device`, the device tensors live on: a GPU, or
the CPU in the CI rehearsal (tests/test_gpu_rehearsal.py), where `torch.cuda` is a fake that takes
the CPU for cuda:0. Branches key on `rig.cuda` (CUDA calls) - never on the tensors' device type -
so the rehearsal runs the lines the GPU will run.
"""

from __future__ import annotations

import gc
import gzip
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from omnikv.bench.fill import decode_step, first_token, prefill_fill, synthetic_fill
from omnikv.bench.report import format_table
from omnikv.bench.run import BenchSpec, build_method, public_records, run_bench
from omnikv.hf.compat import cache_kwargs
from omnikv.methods.spec import parse_method, parse_methods

GIB = 2**30


def log(msg: str) -> None:
    print(f"[gpu-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Clock:
    """Wall-clock budget of the whole run; a stage starts only when its estimate fits."""

    def __init__(self, total: float) -> None:
        self.total = total
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.total - self.elapsed()

    def fits(self, estimate: float) -> bool:
        return self.left() >= estimate


@dataclass
class Rig:
    """Where the run happens. `cuda`: torch.cuda answers (a GPU, or the rehearsal's fake);
    `device`: where tensors live; `simulated`: the rehearsal (tensors on the CPU, numbers meaningless)."""

    device: torch.device
    cuda: bool
    tiny: bool
    clock: Clock
    out: Path
    compile_backend: str | None = None  # None: inductor with CUDA graphs (reduce-overhead) on a GPU

    @property
    def simulated(self) -> bool:
        return self.device.type != "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)) or "out of memory" in str(exc).lower()


def first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:240]}"


# -- the methods ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Labels:
    """The method labels of a run (`omnikv.methods.spec` syntax)."""

    on: str  # OmniKV, offload on, CUDA transfer, the strategy the machine allows (device gather first)
    host: str  # offload on, gather on the host (one sync per segment, only the changed rows move)
    off: str  # offload off: the bank on the device
    full: str = "full"  # transformers' own dynamic cache
    pre: str = "full_prealloc"  # full attention into preallocated buffers
    on_captured: str = ""  # static step, compiled (CUDA graphs on a GPU)
    pre_captured: str = ""

    @classmethod
    def make(cls, budget: int, compile_backend: str | None) -> Labels:
        cb = f":compile_backend={compile_backend}" if compile_backend else ""
        return cls(on=f"omnikv:offload=true:transfer=cuda:budget={budget}",
                   host=f"omnikv:offload=true:transfer=cuda_host_gather:budget={budget}",
                   off=f"omnikv:offload=false:budget={budget}",
                   on_captured=f"omnikv:offload=true:transfer=cuda:compile=true{cb}:budget={budget}",
                   pre_captured=f"full_prealloc:compile=true{cb}")


# -- model -------------------------------------------------------------------------------------------
def random_llama(shape: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A LlamaForCausalLM with random N(0, 0.02) weights built directly on `device` in `dtype`
    (transformers' own initialisation skipped: it would run twice over 8B parameters)."""
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


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def embedding_bytes(model) -> int:
    """The input embedding table: one row of it is read per token, not the table."""
    emb = model.get_input_embeddings().weight
    return emb.numel() * emb.element_size()


def sized_cache(model, label: str, ctx: int, decode_tokens: int):
    """A fresh cache of method `label`, sized once for `ctx` prompt + `decode_tokens` new tokens."""
    cache = build_method(parse_method(label), None).make_cache(model)
    if hasattr(cache, "reserve"):
        cache.reserve(ctx + decode_tokens, decode_tokens=decode_tokens)
    return cache


# -- correctness --------------------------------------------------------------------------------------
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


def correctness(rig: Rig) -> dict[str, Any]:
    """Full-budget OmniKV == full attention (offload off and on); offload on == off at a real
    budget (fp32), through the CUDA transfer, with the strategy it ran and the bank's memory."""
    from omnikv.methods import get_method

    shape = dict(SMALL, hidden_size=128, intermediate_size=256) if rig.tiny else SMALL
    model = random_llama(shape, rig.device, torch.float32, seed=1)
    n_prompt, n_new = (120, 4) if rig.tiny else (1500, 16)
    prompt = torch.randint(0, SMALL["vocab_size"], (1, n_prompt), generator=torch.Generator().manual_seed(3))
    prompt = prompt.to(rig.device)
    base = dict(filter_layers=(1, 4), num_wait_layers=1)
    cuda = {"transfer": "cuda"} if rig.cuda else {}
    full = greedy(model, get_method("full"), prompt, n_new)
    res: dict[str, Any] = {}
    eq = {}
    for offload in (False, True):
        m = get_method("omnikv", budget=1.0, sink_tokens=0, recent_tokens=0, offload=offload, **base,
                       **(cuda if offload else {}))
        eq[f"offload={offload}"] = _compare(greedy(model, m, prompt, n_new), full, 1e-3)
    res["full_budget_equivalence"] = {"passed": all(v["passed"] for v in eq.values()), **eq}
    # Both sides gather every selected row (partial_reload=False): the same rows in the same order;
    # the tolerance covers kernel choice (fp32).
    runs = {}
    for offload in (False, True):
        m = get_method("omnikv", budget=64, sink_tokens=4, recent_tokens=16, offload=offload,
                       partial_reload=False, **base, **(cuda if offload else {}))
        runs[offload] = greedy(model, m, prompt, n_new)
    cmp = _compare(runs[True], runs[False], 1e-4)
    cache = runs[True][2]
    stats = cache.stats()
    transfer = cache.transfer
    cmp.update(exact=cmp["max_abs_logit_diff"] == 0.0, host_kv_bytes=stats["host_kv_bytes"],
               h2d_bytes_per_step=stats["h2d_bytes_per_step"], host_syncs_per_step=stats.get("host_syncs_per_step"),
               transfer=stats.get("transfer"), pinned_host_bytes=stats.get("pinned_host_bytes"),
               host_memory=getattr(transfer, "host_memory", None), gather_reason=getattr(transfer, "gather_reason", None))
    if rig.cuda:  # the bank is page-locked host memory (unless the machine has none) and rows cross the link
        banks = [seg.bank for seg in cache.all_segments() if seg.bank is not None and seg.bank.data is not None]
        cmp["bank_pinned"] = bool(banks) and all(b.data.is_pinned() and b.data.device.type == "cpu" for b in banks)
        moved = stats["h2d_bytes_per_step"] > 0 or rig.simulated  # rehearsal: bank and "device" share the CPU
        cmp["passed"] = cmp["passed"] and (cmp["bank_pinned"] or cmp["host_memory"] == "pageable") and moved
    res["offload_on_equals_off"] = cmp
    # The partial reload (on a GPU: the Triton kernel, after its first-use check) against offload
    # off: the changed rows land in freed slots, so the order of the rows differs (fp32 tolerance).
    m = get_method("omnikv", budget=64, sink_tokens=4, recent_tokens=16, offload=True, partial_reload=True,
                   **base, **cuda)
    partial = greedy(model, m, prompt, n_new)
    pcmp = _compare(partial, runs[False], 1e-4)
    pstats = partial[2].stats()
    pcmp.update(reload=pstats.get("reload"), transfer=pstats.get("transfer"),
                h2d_bytes_per_step=pstats["h2d_bytes_per_step"], full_gather_h2d_bytes_per_step=stats["h2d_bytes_per_step"])
    res["partial_reload_equals_off"] = pcmp
    del model, runs, full, cache, partial
    rig.free()
    return res


# -- bandwidths of this card ----------------------------------------------------------------------------
def bandwidths(rig: Rig) -> dict[str, Any]:
    """GB/s measured here: HBM read (a reduction over 1 GiB), host->device copy from registered
    host memory, and a gather kernel reading mapped host memory (what the device gather does).
    The step bounds (table.py) are built from these, not from a data sheet."""
    from omnikv.offload.mapped import mapped_memory
    from omnikv.offload.transfer import CudaTransfer

    mib = 16 if rig.tiny else 1024
    out: dict[str, Any] = {}

    def best(fn, reps: int = 5) -> float:
        fn()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return max(min(times), 1e-9)

    x = torch.ones(mib * 2**20 // 2, dtype=torch.bfloat16, device=rig.device)
    out["hbm_read_gbps"] = round(x.numel() * 2 / best(lambda: x.sum()) / 1e9, 1)
    del x
    transfer = CudaTransfer()
    n = (mib // 2) * 2**20
    host = transfer.host_empty((n,), torch.uint8, torch.device("cpu"))
    host.fill_(1)
    dev = torch.empty(n, dtype=torch.uint8, device=rig.device)
    out["h2d_copy_gbps"] = round(n / best(lambda: dev.copy_(host, non_blocking=True)) / 1e9, 1)
    out["host_memory"] = transfer.host_memory
    answer = mapped_memory(rig.device)
    out["mapped_memory"] = {"usable": answer.usable, "reason": answer.reason}
    if answer.usable and transfer.host_memory == "registered":
        row = 16 * 2**10  # one token of a 4-layer segment of Llama-3-8B (4 x 2 x 8 x 128 x 2 bytes)
        view = transfer.gather_source(host, rig.device).view(-1, row)
        picks = torch.randperm(view.shape[0], device=rig.device)[: view.shape[0] // 4]
        sec = best(lambda: view.index_select(0, picks))
        out["mapped_gather_gbps"] = round(picks.numel() * row / sec / 1e9, 1)
    t = torch.empty(n, dtype=torch.uint8)
    t0 = time.perf_counter()
    t.copy_(host)
    out["host_copy_gbps"] = round(n / max(time.perf_counter() - t0, 1e-9) / 1e9, 1)
    del host, dev, t, transfer
    rig.free()
    return out


# -- timing: interleaved groups that fit the card ----------------------------------------------------------
def timing_groups(labels: Labels) -> list[tuple[str, list[str]]]:
    """(group, methods) in the order they run at each context. Methods in one group are timed
    interleaved (their caches alive together): each group holds the pair a target compares, and
    no more, so 128K fits an H100 80GB; between groups every cache is freed. Offload methods fill
    first, while their fill peak (the sparse layers' rows stay on the device until decoding)
    has the card to itself."""
    return [
        ("eager", [labels.on, labels.host, labels.full, labels.pre]),
        ("captured", [labels.on_captured, labels.pre_captured, labels.full]),
        ("offload_off", [labels.off, labels.on]),
    ]


def time_group(model, rig: Rig, group: str, labels: list[str], ctx: int) -> list[dict[str, Any]]:
    """One interleaved run of `labels` at `ctx`; a method that fails is recorded and the others
    go on (`keep_going`); a compiled method's failure is recorded as not capturable."""
    steps, warmup, breakdown = (3, 1, 1) if rig.tiny else (32, 8, 6)
    if group == "captured":
        breakdown = 0  # compiled steps have none, and the eager reference does not need one here
    spec = BenchSpec(methods=parse_methods(",".join(labels)), contexts=[ctx], synthetic_kv=True, steps=steps,
                     warmup=warmup, breakdown_steps=breakdown, keep_going=True)
    t0 = time.perf_counter()
    recs = public_records(run_bench(model, spec, log=log))
    for r in recs:
        r["group"] = group
        if r.get("options", {}).get("compile") and not r.get("ms_per_token"):
            r["note"] = f"not capturable: {r.get('note')}"
    log(f"{group} @ {ctx} timed in {time.perf_counter() - t0:.1f} s\n" + format_table(recs))
    rig.free()
    return recs


# -- trace ----------------------------------------------------------------------------------------------
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
    return {
        "h2d_copies": len(memcpys),
        "side_stream_kernels": len(side_kernels),
        "h2d_ms_per_step": round(total / 1e3 / steps, 3),
        "h2d_mb_per_step": round(nbytes / 2**20 / steps, 2) if nbytes else None,
        "overlapped_fraction": round(overlapped / total, 3) if total else None,
        "pageable_fraction": round(pageable / total, 3) if total else None,
        "kernel_ms_per_step": round(sum(k["dur"] for k in main) / 1e3 / steps, 3),
        "copy_streams": sorted({str(c.get("tid")) for c in moves}),
    }


def trace(model, rig: Rig, label: str, ctx: int, steps: int = 4) -> dict[str, Any]:
    """A torch.profiler trace of `steps` decode steps of `label` ($OUT/trace_omnikv_offload.json.gz)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    cache = sized_cache(model, label, ctx, 16)
    synthetic_fill(model, cache, ctx)
    tok = first_token(model)
    for _ in range(3):
        tok = decode_step(model, cache, tok)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if not rig.simulated else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function("decode_step"):
                tok = decode_step(model, cache, tok)
        rig.sync()
    transfer = cache.stats().get("transfer")
    del cache
    rig.free()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        data = json.loads(raw.read_text())
        dest = rig.out / "trace_omnikv_offload.json.gz"
        with raw.open("rb") as src, gzip.open(dest, "wb") as gz:
            shutil.copyfileobj(src, gz)
    events = data.get("traceEvents", data if isinstance(data, list) else [])
    result = {"method": label, "context": ctx, "steps": steps, "transfer": transfer, "file": dest.name,
              **analyze_trace(events, steps)}
    if rig.simulated:
        result["note"] = "rehearsal: CPU-only trace, nothing crosses a bus"
    return result


# -- throughput at the largest batch that fits --------------------------------------------------------------
def throughput(model, rig: Rig, labels: list[str], ctx: int, steps: int = 4) -> dict[str, Any]:
    """Decode tokens/s at `ctx` with the largest batch each method fits: batch 1 measures the
    method's peak per sequence (device bytes above what was held, and page-locked host bytes);
    the batch is sized from that peak against free device memory and MemAvailable (x0.9); one
    retry at 0.6x that batch on out-of-memory, no more."""
    from omnikv.methods.memory import host_available_bytes

    out: dict[str, Any] = {"context": ctx, "methods": {}}
    cap = 4 if rig.tiny else 64
    for label in labels:
        one = _batch_run(model, rig, label, ctx, 1, steps)
        entry: dict[str, Any] = {"batch_1": one}
        if one.get("fits"):
            free_dev, _ = torch.cuda.mem_get_info(rig.device)
            by_dev = int(0.9 * free_dev / max(one["peak_device_bytes"], 1))
            host_avail = host_available_bytes()
            pinned = one.get("pinned_host_bytes") or 0
            by_host = int(0.9 * host_avail / pinned) if pinned and host_avail else cap
            batch = max(1, min(by_dev, by_host, cap))
            entry["sized"] = {"by_device": by_dev, "by_host": by_host, "cap": cap, "batch": batch,
                              "free_device_bytes": free_dev, "host_available_bytes": host_avail}
            for _ in range(2):  # the sized batch, then one retry
                if batch <= 1:
                    break
                run = _batch_run(model, rig, label, ctx, batch, steps)
                entry.setdefault("tries", []).append(run)
                if run.get("fits"):
                    entry["largest"] = run
                    break
                batch = int(batch * 0.6)
        best = entry.get("largest") or one
        entry["batch"] = best.get("batch")
        entry["tokens_per_second"] = best.get("tokens_per_second")
        out["methods"][label] = entry
        log(f"throughput {label} @ {ctx}: batch {entry['batch']}, {entry['tokens_per_second']} tok/s")
    return out


def _batch_run(model, rig: Rig, label: str, ctx: int, batch: int, steps: int) -> dict[str, Any]:
    cache = None
    try:
        rig.free()
        held = torch.cuda.memory_allocated(rig.device)
        torch.cuda.reset_peak_memory_stats(rig.device)
        cache = sized_cache(model, label, ctx, steps + 4)
        synthetic_fill(model, cache, ctx, batch=batch)
        tok = first_token(model).expand(batch, 1).contiguous()
        tok = decode_step(model, cache, tok)
        rig.sync()
        s = time.perf_counter()
        for _ in range(steps):
            tok = decode_step(model, cache, tok)
        rig.sync()
        dt = (time.perf_counter() - s) / steps
        st = cache.stats()
        peak = torch.cuda.max_memory_allocated(rig.device) - held
        return {"batch": batch, "fits": True, "ms_per_step": round(1e3 * dt, 2), "tokens_per_second": round(batch / dt, 1),
                "peak_device_bytes": peak // batch, "pinned_host_bytes": (st.get("pinned_host_bytes") or 0) // batch,
                "device_kv_bytes": st["device_kv_bytes"] // batch, "transfer": st.get("transfer")}
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is an answer here
        if not is_oom(exc):
            raise
        return {"batch": batch, "fits": False, "error": first_line(exc)}
    finally:
        del cache
        rig.free()


# -- a real chunked prefill ----------------------------------------------------------------------------------
def real_prefill(model, rig: Rig, label: str, ctx: int, chunk: int) -> dict[str, Any]:
    """One real chunked prefill of random ids through `label`'s cache: seconds, the device peak
    above what was held (the prefill peak), and the bytes the transfer counted (host->device ~0,
    device->host the prompt's rows once)."""
    rig.free()
    held = torch.cuda.memory_allocated(rig.device)
    torch.cuda.reset_peak_memory_stats(rig.device)
    cache = sized_cache(model, label, ctx, 8)
    seconds, tok = prefill_fill(model, cache, ctx, chunk=chunk)
    peak = torch.cuda.max_memory_allocated(rig.device) - held
    tok = decode_step(model, cache, tok)
    rig.sync()
    st = cache.stats()
    keys = ("h2d_bytes_prefill", "d2h_bytes_prefill", "host_kv_bytes", "pinned_host_bytes", "device_kv_bytes",
            "device_kv_peak_bytes",
            "host_syncs_per_step", "h2d_bytes_per_step", "transfer")
    res = {"method": label, "context": ctx, "chunk": chunk, "prefill_seconds": round(seconds, 2),
           "prefill_peak_device_bytes": peak, **{k: st.get(k) for k in keys}}
    del cache
    rig.free()
    return res


# -- the longest context each method fits (the library's memory plan) -----------------------------------------
def context_limits(model, rig: Rig, labels: Labels) -> dict[str, Any]:
    """Per method: the longest prompt `omnikv.methods.memory.plan_memory` says fits this card
    (95% of its memory) and this machine's MemAvailable, batch 1, 256 new tokens, 2048-token
    prefill chunks, with the weights measured. An estimate from the plan, not a measurement."""
    from omnikv.methods.memory import host_available_bytes, max_context

    _, total = torch.cuda.mem_get_info(rig.device)
    dev_avail, host_avail = int(0.95 * total), host_available_bytes()
    weights = weight_bytes(model)
    dtype_bytes = next(model.parameters()).element_size()
    out: dict[str, Any] = {"device_available_bytes": dev_avail, "host_available_bytes": host_avail, "methods": {}}
    for label in (labels.full, labels.pre, labels.off, labels.on):
        method = build_method(parse_method(label), None)
        longest = max_context(model.config, method, dev_avail, dtype_bytes=dtype_bytes, prefill_chunk_size=2048,
                              weights_bytes=weights, host_bytes=host_avail, step=1024)
        out["methods"][label] = {"max_context": longest or None}
    return out


def device_kv_target(model, label: str, ctx: int, generated: int) -> dict[str, Any]:
    """The device-KV share OmniKV with offload should hold at `ctx` after `generated` decode
    steps, from its preset: every row of the dense and filter layers, plus k selected + the
    generated rows of each sparse layer (the working buffers), over full attention's rows:

        share = (dense + sparse * (k + generated) / (ctx + generated)) / layers

    (the method's own `kv_plan`, so the formula and the library's memory plan are one)."""
    from omnikv.algorithm.roles import Role, plan_layers
    from omnikv.hf.compat import layer_types
    from omnikv.methods.memory import KVContext

    method = build_method(parse_method(label), None)
    dtype_bytes = next(model.parameters()).element_size()
    kv = KVContext.of(model.config, ctx, generated, dtype_bytes, on_accelerator=True)
    plan = method.kv_plan(kv)
    cfg = method.config_for(model.config, warn=False)
    roles = plan_layers(cfg, list(layer_types(model.config)))
    sparse = len(roles.layers_with(Role.SPARSE))
    layers = len(roles.roles)
    k = cfg.resolve_budget(ctx)
    return {"value": round(plan.device_kv_bytes / kv.full_kv_bytes, 4), "dense_layers": layers - sparse,
            "sparse_layers": sparse, "k": k, "generated": generated,
            "formula": f"({layers - sparse} + {sparse} x ({k} + {generated}) / {ctx + generated}) / {layers}"}
