"""Run by tests/test_reload.py in a child process with Triton on the path (no interpreter): the
partial-reload kernel built ahead of time for the GPUs it is meant for, sm_90 (H100/H200) and sm_80
(A100), at the launch the library makes for the paper's Llama-3-8B preset (24 sparse layers, 8 KV
heads of 128, k = 2048), one selection for every head and one per KV head, each dtype. Triton's
interpreter checks the kernel's logic; only this build checks what the GPU's compiler accepts
(types, the int64 atomic counter, masks). Exits non-zero on failure."""

from __future__ import annotations

import re
import sys

import torch

from omnikv.offload.reload import compile_for_target, kernel_launch


def launch_for(dtype: torch.dtype, batch: int, per_head: bool):
    layers, heads, dim, k, capacity = 24, 8, 128, 2048, 2048 + 64
    meta = dict(device="meta")  # shapes and dtypes only: nothing is allocated
    groups = heads if per_head else 1
    src = torch.empty(4096, batch, layers, 2, heads, dim, dtype=dtype, **meta)
    dst = torch.empty(layers, 2, batch, heads, capacity, dim, dtype=dtype, **meta)
    index = torch.empty(batch, groups, k, dtype=torch.int64, **meta)  # selection_delta_padded's dtype
    changed = torch.empty(batch, groups, k, dtype=torch.bool, **meta)
    moved = torch.empty(1, dtype=torch.int64, **meta)
    return kernel_launch(src, dst, index, index, changed, moved)


def main() -> int:
    built = 0
    for arch in (90, 80):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for batch, per_head in ((1, False), (4, False), (1, True)):
                launch = launch_for(dtype, batch, per_head)
                compiled = compile_for_target(launch, "cuda", arch)
                ptx = compiled.asm["ptx"]
                where = f"sm_{arch} {dtype} batch {batch} per_head {per_head}"
                assert re.search(rf"\.target sm_{arch}a?\b", ptx), f"{where}: PTX for another target"
                assert len(compiled.asm["cubin"]) > 0, f"{where}: no cubin"
                assert "atom.global" in ptx and ".u64" in ptx, f"{where}: the moved-bytes counter is not a 64-bit atomic"
                assert ".local" not in ptx, f"{where}: the kernel spills to local memory"
                built += 1
    print(f"reload kernel built for sm_90 and sm_80: {built} variants ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
