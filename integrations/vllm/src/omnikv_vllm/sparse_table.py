"""The sparse block table of a decode step: which physical blocks a sparse layer's row attends.

A paged-attention kernel reads a row's keys through its block table and a sequence length: logical
block i of the table holds positions [i*bs, (i+1)*bs), and the row attends positions [0, seq_len).
Attention ignores key order (positions are already rotated into the keys), so a table naming only
some blocks, in any order, with the matching length, attends exactly those blocks' tokens. With a
block-granular selection (`OmniKVConfig.selection_block` = the cache's block size) a sparse layer's
decode row is then the stock kernel over

    the selected prompt blocks (ascending; the prompt's last block is always among them)
    + every block after it up to the current one (the generated tokens),

where every block but the current one is full, so seq_len = (m - 1) * bs + tokens of the current
block. Pure tensor code on any device (CPU here; a CUDA backend passes the same table to
FlashAttention / FlashInfer): no host loop, no data-dependent shapes beyond the padded width.

Shapes: R decode rows, NB blocks per row in vLLM's table, n selected prompt blocks per row.
"""

from __future__ import annotations

import torch


def sparse_block_table(
    block_table: torch.Tensor, selected: torch.Tensor, seq_lens: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each decode row's sparse table and its sequence length.

    Args:
        block_table: (R, NB) int physical block of each logical block (vLLM's table rows).
        selected: (R, n) int64 selected logical prompt blocks, ascending per row; a row with fewer
            may repeat its entries (duplicates count once). Each row's largest entry must be its
            prompt's last block.
        seq_lens: (R,) int tokens of each row, the current (decoded) one included.
    Returns:
        table: (R, m_max) block_table's dtype, each row's blocks in ascending logical order, then
            padding (block_table's entry 0; never read, the length stops before it);
        lens: (R,) int32 tokens the kernel attends per row.
    """
    r, nb = block_table.shape
    device = block_table.device
    current = (seq_lens.to(torch.int64) - 1) // block_size  # (R,) logical block of the newest token
    last_prompt = selected.amax(dim=1)  # (R,)
    logical = torch.arange(nb, device=device)
    keep = (logical[None, :] > last_prompt[:, None]) & (logical[None, :] <= current[:, None])  # generated blocks
    keep.scatter_(1, selected.to(torch.int64), True)
    count = keep.sum(dim=1)  # (R,) blocks per row
    # Kept blocks first, in ascending logical order (a stable sort of "not kept").
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
    width = int(count.max()) if r else 0
    table = block_table.gather(1, order[:, :width])
    lens = (count - 1) * block_size + seq_lens.to(torch.int64) - current * block_size
    return table, lens.to(torch.int32)


def attended_positions(selected: list[int], seq_len: int, block_size: int) -> list[int]:
    """The logical positions a row's sparse table attends, explicitly (the reference of
    `sparse_block_table`): every position of the selected blocks and of the blocks after the last
    of them, below seq_len."""
    last = max(selected)
    blocks = sorted(set(selected) | set(range(last + 1, (seq_len - 1) // block_size + 1)))
    return [p for b in blocks for p in range(b * block_size, (b + 1) * block_size) if p < seq_len]
