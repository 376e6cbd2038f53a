"""Reading token rows out of vLLM's CPU paged KV cache.

The CPU cache of one layer is `[num_blocks, Hk, block_size, 2 * D]`: per (block, KV head) a tile
of 2 * block_size * D values, keys first, in a layout private to the kernel's instruction set
(e.g. `vec`: keys column-major [D, block_size], values row-major). Rather than hard-coding each
layout, `TileLayout.probe` learns it from the stock writer (`cpu_attn_reshape_and_cache`): it
writes token/dim codes into a scratch block and records where each (token, dim) landed. Any layout
that is a permutation of the tile (all of vLLM's CPU layouts) is then read back with one gather.

Shapes: n rows, Hk KV heads, D head dim, bs block size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Keys read per step of `TileLayout.block_logits`: small enough to stay in a core's L2 cache.
CHUNK_BYTES = 1 << 20

# Codes written by the probe are small integers (1..16), exact in fp32, bf16 and fp16.
_BASE = 16


@dataclass(frozen=True)
class TileLayout:
    """Where token t, dim d of a (block, head) tile lives, as offsets into the flat tile."""

    block_size: int
    head_dim: int
    key_offsets: torch.Tensor  # (bs, D) int64 into the flat 2*bs*D tile
    value_offsets: torch.Tensor  # (bs, D) int64
    keys_column_major: bool = False  # a block's keys stored as [D, bs] (then read as a view)

    @classmethod
    def probe(cls, block_size: int, head_dim: int, dtype: torch.dtype, isa: str) -> TileLayout:
        """Learn the layout that `cpu_attn_reshape_and_cache(..., isa)` writes."""
        from vllm import _custom_ops as ops

        bs, d = block_size, head_dim
        n = bs * d
        digits = max(1, math.ceil(math.log(n, _BASE)))
        codes = torch.arange(n, dtype=torch.int64).view(bs, d)  # code of (t, d) = t*D + d
        offsets = []
        for which in (0, 1):  # 0: keys, 1: values
            decoded = torch.zeros(2 * n, dtype=torch.int64)
            seen = torch.zeros(2 * n, dtype=torch.bool)
            for k in range(digits):
                digit = (codes // _BASE**k) % _BASE + 1  # 1..16: 0 means "not written"
                kv = torch.zeros(1, 1, bs, 2 * d, dtype=dtype)
                key_cache, value_cache = kv.view(1, 1, 2 * bs, d).chunk(2, dim=2)
                payload = digit.to(dtype).view(bs, 1, d)
                zeros = torch.zeros_like(payload)
                ops.cpu_attn_reshape_and_cache(
                    payload if which == 0 else zeros, zeros if which == 0 else payload,
                    key_cache, value_cache, torch.arange(bs, dtype=torch.int64), isa,
                    k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
                flat = kv.view(-1).to(torch.float32)
                written = flat != 0
                if k == 0:
                    seen = written
                elif not torch.equal(written, seen):
                    raise RuntimeError(f"the {isa} KV layout is not a fixed permutation of the tile")
                decoded += (flat.round().to(torch.int64) - 1).clamp(min=0) * _BASE**k
            where = seen.nonzero().flatten()
            if where.numel() != n:
                raise RuntimeError(f"the {isa} KV layout wrote {where.numel()} of {n} values of a tile")
            inverse = torch.full((n,), -1, dtype=torch.int64)
            inverse[decoded[where]] = where
            if (inverse < 0).any():
                raise RuntimeError(f"the {isa} KV layout is not a permutation of (token, dim)")
            offsets.append(inverse.view(bs, d))
        column_major = torch.equal(offsets[0], torch.arange(d).view(1, d) * bs + torch.arange(bs).view(bs, 1))
        return cls(bs, d, offsets[0], offsets[1], column_major)

    def gather(
        self, kv_cache: torch.Tensor, block_row: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of logical `positions` of one request.

        Args:
            kv_cache: (num_blocks, Hk, bs, 2*D) one layer's cache, as vLLM passes it.
            block_row: (max_blocks,) int the request's block table row.
            positions: (n,) int64 logical token positions.
        Returns:
            keys, values: (Hk, n, D) in the cache's dtype.
        """
        nb, hk, bs, two_d = kv_cache.shape
        flat = kv_cache.view(nb, hk, bs * two_d)
        blocks = block_row.to(torch.int64)[positions // bs]  # (n,)
        slot = positions % bs
        heads = torch.arange(hk).view(hk, 1, 1)
        b = blocks.view(1, -1, 1)
        keys = flat[b, heads, self.key_offsets[slot].unsqueeze(0)]  # (Hk, n, D)
        values = flat[b, heads, self.value_offsets[slot].unsqueeze(0)]
        return keys, values

    def block_keys(self, kv_cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """The keys of whole blocks, head-major and transposed: q @ them scores every token.

        Args:
            kv_cache: (num_blocks, Hk, bs, 2*D) one layer's cache, as vLLM passes it.
            blocks: (n,) int physical block ids, in logical order.
        Returns:
            (Hk, D, n*bs): column j is logical token j of the blocks. When the layout stores a
            block's keys column-major (vLLM's `vec` / `vec16`: [D, bs] first in the tile) it is one
            index_select over the block dimension of a (Hk, D, blocks, bs) view of the cache: one
            copy of the keys alone, laid out so that scoring is one GEMM per KV head (a product per
            block would be n * Hk tiny GEMMs). Another layout is gathered through the probed offsets.
        """
        nb, hk, bs, two_d = kv_cache.shape
        d = two_d // 2
        blocks = blocks.to(torch.int64)
        n = blocks.numel()
        if self.keys_column_major:
            view = kv_cache.view(nb, hk, 2, d, bs)[:, :, 0].permute(1, 2, 0, 3)  # (Hk, D, NB, bs), no copy
            return view.index_select(2, blocks).view(hk, d, n * bs)
        flat = kv_cache.view(nb, hk, bs * two_d).index_select(0, blocks)
        keys = flat[:, :, self.key_offsets.t().reshape(-1)].view(n, hk, d, bs)
        return keys.permute(1, 2, 0, 3).reshape(hk, d, n * bs)

    def block_logits(self, kv_cache: torch.Tensor, blocks: torch.Tensor, q: torch.Tensor,
                     chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
        """Every token of whole blocks scored by q, the keys read a chunk of blocks at a time.

        Equal to `q.float() @ block_keys(kv_cache, blocks).float()` (the reference; a test holds
        them equal), without ever copying all the blocks' keys at once: a 32K-token prompt of
        SmolLM2 has 25 MB of fp32 keys per layer, and copying them out and reading the copy back
        tripled the memory traffic of a filter layer's selection (a fifth of a 32K decode step).
        A chunk's copy (~`chunk_bytes`) stays in the core's cache while it is multiplied.

        Args:
            kv_cache: (num_blocks, Hk, bs, 2*D) one layer's cache, as vLLM passes it.
            blocks: (n,) int physical block ids, in logical order.
            q: (Hk, g, D) the row's query heads, grouped by the KV head they read.
        Returns:
            (Hk, g, n*bs) float32: column j scores logical token j of the blocks (unscaled).
        """
        _, hk, bs, two_d = kv_cache.shape
        n = blocks.numel()
        per_chunk = max(1, chunk_bytes // (hk * bs * (two_d // 2) * kv_cache.element_size()))
        qf = q.float()
        out = torch.empty(hk, q.shape[1], n * bs, dtype=torch.float32)
        for start in range(0, n, per_chunk):
            end = min(n, start + per_chunk)
            keys_t = self.block_keys(kv_cache, blocks[start:end])  # (Hk, D, (end-start)*bs)
            out[:, :, start * bs:end * bs] = torch.matmul(qf, keys_t.float())
        return out
