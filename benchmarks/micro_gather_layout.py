"""Micro-benchmark behind docs/performance.md ("why 16K falls short"): gathering k selected tokens
of one Context Bank segment from the current layer-major layout (L x 2 x H, T, D) - what
the layer-major bank's `_gather_into` did when this was measured (the bank is token-major since:
`omnikv.offload.bank.gather_packed`) - against a token-major layout (T, L x 2 x H x D), where each
selected token is one contiguous block. SmolLM2 shapes, fp32, one thread.

    .venv/bin/python benchmarks/micro_gather_layout.py [--layers 10] [--k 1024] [--tokens 32768]
"""

import argparse
import time

import torch


def median_ms(fn, n: int = 15) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2] * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows = a.layers * 2 * a.heads
    idx = torch.sort(torch.randperm(a.tokens)[: a.k]).values
    layer_major = torch.randn(rows, a.tokens, a.head_dim)
    token_major = torch.randn(a.tokens, rows * a.head_dim)
    out_lm = torch.empty(rows, a.k, a.head_dim)
    out_tm = torch.empty(a.k, rows * a.head_dim)
    t_lm = median_ms(lambda: torch.index_select(layer_major, 1, idx, out=out_lm))
    t_tm = median_ms(lambda: torch.index_select(token_major, 0, idx, out=out_tm))
    # token-major gather + one re-layout copy into a layer-major working buffer
    t_tm_copy = median_ms(lambda: (torch.index_select(token_major, 0, idx, out=out_tm),
                                   out_lm.copy_(out_tm.view(a.k, rows, a.head_dim).transpose(0, 1))))
    mib = out_lm.numel() * 4 / 2**20
    print(f"{a.layers} layers, k={a.k} of {a.tokens}: {mib:.1f} MiB gathered")
    print(f"  layer-major index_select           {t_lm:7.2f} ms")
    print(f"  token-major index_select           {t_tm:7.2f} ms ({t_lm / t_tm:.1f}x faster)")
    print(f"  token-major + re-layout copy       {t_tm_copy:7.2f} ms ({t_lm / t_tm_copy:.1f}x faster)")


if __name__ == "__main__":
    main()
