"""A filter layer's decode attention on its own, eager and compiled, in the forms it could take.

    PYTHONPATH=. .venv/bin/python benchmarks/micro_filter_attention.py --threads 2 --context 16384 \\
        --out benchmarks/results/micro-filter-attention

A filter layer needs the attention logits of its decode query (they are the selector's scores), so
it cannot call SDPA alone; it computes logits, softmax and the weighted sum of the values itself
(`FilterLayer._attend_and_select`). Compiled on CPU with `omnikv.hf.static.CPU_INDUCTOR_CONFIG`
(max-autotune), the logits' matrix product against the key buffer becomes inductor's C++ GEMM
template, which copies and re-packs the whole key buffer every step. This script times, on one
layer of the model's shape (synthetic tensors, batch 1, one query):

* `logits`: the logits alone as a matrix product (q @ K^T), as K @ q^T, and as the
  multiply-and-sum of `omnikv.hf.attention.grouped_logits` when traced;
* `values`: the weighted sum of the values as a product (P @ V) and as a multiply-and-sum;
* `filter`: the whole filter attention + top-k as the library runs it (`grouped_logits`), as it ran
  before (q @ K^T), and SDPA alone (what a dense layer pays, without scores) for scale.

Each form's compiled output is checked against eager before timing. Prints a table of medians and
writes `micro-filter-attention.json` with the host, versions and command.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config

from omnikv.hf.attention import grouped_logits, masked_softmax
from omnikv.hf.static import CPU_INDUCTOR_CONFIG


def forms(hk: int, g: int, d: int, prompt: int, k: int):
    """name -> fn(q (1, Hk, g, D), K, V (1, Hk, N, D), mask (1, 1, 1, N) bool) -> tensor(s)."""
    scale = d**-0.5

    def select_and_attend(logits, v, mask):
        idx = logits[..., :prompt].amax(2).topk(k, dim=-1).indices  # `last` scores, max over heads
        return torch.matmul(masked_softmax(logits, mask).to(v.dtype), v), idx

    return {
        "logits q@K^T": lambda q, kk, v, m: torch.matmul(q, kk.transpose(-1, -2)),
        "logits K@q^T": lambda q, kk, v, m: torch.matmul(kk, q.transpose(-1, -2)).transpose(-1, -2),
        "logits grouped_logits": lambda q, kk, v, m: grouped_logits(q, kk),
        # the "values" forms get softmax weights P (1, Hk, g, N) as their first input (see main)
        "values P@V": lambda p, kk, v, m: torch.matmul(p, v),
        "values multiply-and-sum": lambda p, kk, v, m: (p.unsqueeze(-1) * v.unsqueeze(2)).sum(-2),
        "filter, q@K^T (before)": lambda q, kk, v, m: select_and_attend(
            torch.matmul(q, kk.transpose(-1, -2)) * scale, v, m),
        "filter, grouped_logits (now)": lambda q, kk, v, m: select_and_attend(grouped_logits(q, kk) * scale, v, m),
        "SDPA alone (a dense layer)": lambda q, kk, v, m: torch.nn.functional.scaled_dot_product_attention(
            q, kk, v, attn_mask=m, scale=scale),
    }


def _median_ms(fn, args, reps: int) -> float:
    for _ in range(5):
        fn(*args)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=16384, help="prompt rows in the layer's buffer")
    ap.add_argument("--decode-rows", type=int, default=40, help="reserved rows for generated tokens")
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--groups", type=int, default=3, help="query heads per KV head")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--budget", type=float, default=0.067)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--out", default=None, help="directory for micro-filter-attention.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hk, g, d, prompt = args.kv_heads, args.groups, args.head_dim, args.context
    n = prompt + args.decode_rows
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, hk, g, d, generator=gen)
    keys, values = (torch.randn(1, hk, n, d, generator=gen) for _ in range(2))
    mask = torch.zeros(1, 1, 1, n, dtype=torch.bool)
    mask[..., : prompt + 1] = True  # the prompt and the current token; later rows not written yet
    probs = torch.softmax(torch.randn(1, hk, g, n, generator=gen), dim=-1)
    rows = []
    for name, fn in forms(hk, g, d, prompt, max(1, int(args.budget * prompt))).items():
        inputs = (probs if name.startswith("values") else q, keys, values, mask)
        with torch.inference_mode(), inductor_config.patch(CPU_INDUCTOR_CONFIG):
            compiled = torch.compile(fn, fullgraph=True, dynamic=False)
            t0 = time.perf_counter()
            got = compiled(*inputs)
            compile_s = time.perf_counter() - t0
            torch.testing.assert_close(_first(got), _first(fn(*inputs)), atol=1e-3, rtol=1e-3)
            eager_ms, compiled_ms = _median_ms(fn, inputs, args.reps), _median_ms(compiled, inputs, args.reps)
        rows.append({"form": name, "eager_ms": round(eager_ms, 3), "compiled_ms": round(compiled_ms, 3),
                     "compile_s": round(compile_s, 1)})
        print(f"{name:32s} eager {eager_ms:7.2f} ms   compiled {compiled_ms:7.2f} ms   (compile {compile_s:.0f} s)",
              flush=True)
    if args.out:
        import subprocess

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True).stdout.strip()
        meta = {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv),
                "commit": commit, "cpu": platform.processor() or platform.machine(), "threads": args.threads,
                "torch": torch.__version__, "shape": {"kv_heads": hk, "groups": g, "head_dim": d, "rows": n}}
        (out / "micro-filter-attention.json").write_text(json.dumps({"metadata": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
