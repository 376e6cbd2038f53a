"""Per-request prompt lengths, from what vLLM hands an attention metadata builder each step.

The backend sees batch rows, not request ids, and vLLM passes prompt lengths to backends only in
some configurations. What it does pass (vLLM >= 0.32, v1 runner): per row the query length, the
sequence length, the block table and `is_prefilling` (num_computed_tokens < num_prompt_tokens).

Definitions, as in the library's HF path (omnikv.algorithm.cache): a row is a *decode* row when it brings one
new token and is not prefilling; every other row (prefill, a chunk of it, a prompt recomputed after
preemption) makes the prompt "every token seen so far", so its prompt length is its new sequence
length. A decode row keeps the prompt length of its request.

To carry that length from step to step without request ids, it is stored under the physical block
that holds the row's newest token, with the sequence length it was stored at. That block belongs to
the row's request alone: a block is shared (prefix caching) only once full, and the block being
written is not. At the next decode step the newest token is in the same block, or in a new one, in
which case the previous block (this request's) holds the entry. An entry is used only if it was
stored at sequence length s - 1 (or s, when a step is built twice), which rejects stale entries of
freed blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RowState:
    """One batch row of one step."""

    decode: bool  # one new token past the prompt
    prompt_len: int | None  # None: a decode row whose request was not seen (treat it as dense)


class PromptTracker:
    def __init__(self, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0; got {block_size}")
        self.block_size = block_size
        # physical block id -> (prompt length, sequence length when stored). At most one entry per
        # block of the KV cache, so its size is bounded by the cache.
        self._entries: dict[int, tuple[int, int]] = {}

    def step(
        self,
        query_lens: Sequence[int],
        seq_lens: Sequence[int],
        is_prefilling: Sequence[bool] | None,
        block_table: Sequence[Sequence[int]],
    ) -> list[RowState | None]:
        """Classify the rows of one step and update the entries. Rows with no query (padding) get
        None. block_table[r][i] is the physical block of row r's logical block i."""
        out: list[RowState | None] = []
        updates: list[tuple[int, tuple[int, int]]] = []
        bs = self.block_size
        for r, (q, s) in enumerate(zip(query_lens, seq_lens)):
            q, s = int(q), int(s)
            if q <= 0 or s <= 0:
                out.append(None)
                continue
            row = block_table[r]
            cur = int(row[(s - 1) // bs])
            prefilling = bool(is_prefilling[r]) if is_prefilling is not None else False
            if q == 1 and not prefilling and s >= 2:
                # The entry is in this block unless the new token opened a new block.
                where = int(row[(s - 2) // bs]) if (s - 1) % bs == 0 else cur
                entry = self._entries.get(where)
                if entry is not None and entry[1] in (s - 1, s) and entry[0] < s:
                    prompt = entry[0]
                    out.append(RowState(decode=True, prompt_len=prompt))
                    updates.append((cur, (prompt, s)))
                else:
                    out.append(RowState(decode=True, prompt_len=None))
                continue
            out.append(RowState(decode=False, prompt_len=s))
            updates.append((cur, (s, s)))
        for block, entry in updates:  # after all lookups: rows of one step do not see each other
            self._entries[block] = entry
        return out
