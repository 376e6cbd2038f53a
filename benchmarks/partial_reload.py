"""How much of OmniKV's selection changes per decode step on real text, and the host->device bytes
per step that a partial reload (omnikv/offload/reload.py) would move instead of a full gather.

Real models (SmolLM2-135M, Gemma 3 270M, shipped in PyPI packages: shared/docs/models.md), real prose
(docstrings of the Python standard library, `omnikv.eval.tasks.text`'s "pydoc" haystack), a chunked
prefill, then greedy decode steps with each model's OmniKV preset. Per step and filter layer: the
share of the k selected rows that were not selected at the previous step. Link bytes per step are
given for the GPU layout (bf16, 2 bytes per element): full = every selected row of every sparse
layer of the segment; partial = only the changed rows (what the Triton kernel reads).

    nice -n 5 .venv/bin/python benchmarks/partial_reload.py [--models smollm2,gemma3] [--context 4096]
        [--steps 32] [--out benchmarks/results/partial-reload]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def prose_ids(tokenizer, context: int) -> torch.Tensor:
    from omnikv.eval.tasks.text import haystack_units

    n = 64
    while True:
        ids = tokenizer(" ".join(haystack_units("pydoc", n, seed=0)), add_special_tokens=True)["input_ids"]
        if len(ids) >= context:
            return torch.tensor([ids[:context]])
        n *= 2


@torch.no_grad()
def measure(name: str, context: int, steps: int, chunk: int) -> dict:
    from omnikv.hf.compat import cache_kwargs
    from omnikv.methods import get_method
    from omnikv.models import load_model

    lm = load_model(name, dtype=torch.float32, device="cpu")
    model = lm.model
    method = get_method("omnikv")
    cache = method.make_cache(model)
    ids = prose_ids(lm.tokenizer, context)
    t0 = time.perf_counter()
    for s in range(0, context, chunk):
        out = model(input_ids=ids[:, s : s + chunk], use_cache=True, **cache_kwargs(cache))
    prefill_s = time.perf_counter() - t0
    tok = out.logits[:, -1:].argmax(-1)
    prev, shares = None, {f: [] for f in cache.segments}
    for _ in range(steps):
        out = model(input_ids=tok, use_cache=True, **cache_kwargs(cache))
        tok = out.logits[:, -1:].argmax(-1)
        sel = {f: idx.clone() for f, idx in cache.selected_indices().items()}
        if prev is not None:
            for f, idx in sel.items():
                k = idx.shape[-1]
                kept = torch.isin(idx, prev[f]).sum().item() / idx.numel()
                shares[f].append(1 - kept)
        prev = sel
    shape = model.config.get_text_config(decoder=True)
    head_dim = getattr(shape, "head_dim", None) or shape.hidden_size // shape.num_attention_heads
    row_bf16 = 2 * shape.num_key_value_heads * head_dim * 2  # K + V of one token in one layer, bf16
    k = cache.state.k
    per_filter = {}
    full_bytes = partial_bytes = 0
    for f, seg in cache.segments.items():
        layers = sum(len(s.layers) for s in cache.segment_groups[f])
        mean = statistics.fmean(shares[f]) if shares[f] else 0.0
        full = k * layers * row_bf16
        per_filter[str(f)] = {"sparse_layers": layers, "changed_share_mean": round(mean, 4),
                              "changed_share_median": round(statistics.median(shares[f]), 4) if shares[f] else None,
                              "full_bytes_per_step": full, "partial_bytes_per_step": round(mean * full)}
        full_bytes += full
        partial_bytes += mean * full
    return {"model": name, "context": context, "k": k, "steps": steps, "prefill_chunk": chunk,
            "config": {key: str(v) for key, v in vars(cache.config).items()} if hasattr(cache.config, "__dict__") else str(cache.config),
            "prefill_seconds": round(prefill_s, 1), "per_filter_layer": per_filter,
            "link_bytes_per_step_full": full_bytes, "link_bytes_per_step_partial": round(partial_bytes),
            "changed_share_overall": round(partial_bytes / full_bytes, 4) if full_bytes else None}


def main() -> None:
    from omnikv.bench.report import finish_metadata, run_metadata

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2,gemma3")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--out", default="benchmarks/results/partial-reload")
    a = p.parse_args()
    torch.set_num_threads(1)
    meta = run_metadata(probe_bandwidth=False)  # hardware, versions, commit, command, load
    rows = [measure(m.strip(), a.context, a.steps, a.chunk) for m in a.models.split(",") if m.strip()]
    finish_metadata(meta)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["| model | context | k | filter layer (sparse layers) | changed per step (mean / median) | link bytes per step: full gather | partial reload |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        for f, d in r["per_filter_layer"].items():
            lines.append(f"| {r['model']} | {r['context']} | {r['k']} | {f} ({d['sparse_layers']}) | "
                         f"{d['changed_share_mean']:.1%} / {d['changed_share_median']:.1%} | "
                         f"{d['full_bytes_per_step'] / 2**20:.2f} MiB | {d['partial_bytes_per_step'] / 2**20:.2f} MiB |")
    (out / "README.md").write_text("# Partial reload on real text\n\n" + "\n".join(lines) + "\n\n```\n"
                                   + json.dumps(meta, indent=2) + "\n```\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
