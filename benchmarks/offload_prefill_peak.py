"""The device peak of OmniKV's offload prefill on a real model, counted by the device meter through
the transfer interface (`transfer="simulated"`: the offload path on a CPU), beside the plan's figure
and full attention's KV. The device is where a GPU would hold the bytes; nothing here is timed.

    nice -n 5 .venv/bin/python benchmarks/offload_prefill_peak.py [--model smollm2] [--context 4096]
        [--chunk 1024] [--out benchmarks/results/offload-prefill-peak]
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch


@torch.no_grad()
def main() -> None:
    from omnikv import OmniKVCache
    from omnikv.bench.report import finish_metadata, run_metadata
    from omnikv.hf.compat import cache_kwargs
    from omnikv.methods import get_method
    from omnikv.methods.memory import plan_memory
    from omnikv.models import load_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--new", type=int, default=4)
    p.add_argument("--out", default="benchmarks/results/offload-prefill-peak")
    a = p.parse_args()
    torch.set_num_threads(1)
    meta = run_metadata(probe_bandwidth=False)  # hardware, versions, commit, command, load
    model = load_model(a.model, dtype=torch.float32, device="cpu").model
    method = get_method("omnikv", offload=True)
    cache = OmniKVCache(model, method.config_for(model, warn=False), transfer="simulated")
    cache.reserve(a.context + a.new, decode_tokens=a.new)
    ids = torch.randint(0, 1000, (1, a.context), generator=torch.Generator().manual_seed(0))
    for s in range(0, a.context, a.chunk):
        out = model(input_ids=ids[:, s : s + a.chunk], use_cache=True, **cache_kwargs(cache))
    prefill_peak = cache.meter.peak
    tok = out.logits[:, -1:].argmax(-1)
    for _ in range(a.new):
        tok = model(input_ids=tok, use_cache=True, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
    gc.collect()
    st = cache.stats()
    plan = plan_memory(model.config, a.context, method, device="cuda", dtype_bytes=4, max_new_tokens=a.new,
                       prefill_chunk_size=a.chunk, weights_bytes=0)
    sparse = sum(len(seg.layers) for seg in cache.all_segments())
    row = plan.full_device_kv_bytes // (len(cache.layers) * (a.context + a.new))
    result = {
        "model": a.model, "context": a.context, "chunk": a.chunk, "layer_roles": st["layer_roles"],
        "full_attention_kv_bytes": plan.full_device_kv_bytes,
        "prefill_peak_measured_bytes": prefill_peak, "prefill_peak_planned_bytes": plan.device_peak_kv_bytes,
        "before_streaming_peak_bytes": st["device_kv_allocated_bytes"] - sparse * (st["selected_tokens"] + a.new) * row
        + sparse * a.context * row,
        "decode_device_kv_allocated_bytes": st["device_kv_allocated_bytes"], "decode_planned_bytes": plan.device_kv_bytes,
        "meter_live_after_decode_bytes": cache.meter.live, "h2d_bytes_prefill": st["h2d_bytes_prefill"],
        "d2h_bytes_prefill": st["d2h_bytes_prefill"], "host_kv_bytes": st["host_kv_bytes"],
    }
    finish_metadata(meta)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "result": result}, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
