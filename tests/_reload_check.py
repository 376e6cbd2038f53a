"""Run by tests/test_reload.py in a child process with TRITON_INTERPRET=1 and Triton on the path:
the partial-reload kernel against the torch reference, on CPU tensors. Exits non-zero on failure."""

from __future__ import annotations

import os
import sys

import torch

from omnikv.offload.delta import selection_delta_padded
from omnikv.offload.layouts import gather_packed, to_work_layout
from omnikv.offload.reload import reload_op, reload_rows, reload_rows_reference, triton_usable


def case(b: int, g: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    t, lsz, h, d, k, cap = 40, 3, 2, 4, 10, 13
    bank = torch.randn(t, b, lsz, 2, h, d, generator=gen)
    prev = torch.stack([torch.stack([torch.randperm(t, generator=gen)[:k] for _ in range(g)]) for _ in range(b)])
    new = prev.clone()
    for bi in range(b):
        for gi in range(g):
            outside = torch.tensor([p for p in range(t) if p not in set(prev[bi, gi].tolist())])
            n = int(torch.randint(0, k + 1, (1,), generator=gen))
            new[bi, gi, torch.randperm(k, generator=gen)[:n]] = outside[torch.randperm(len(outside), generator=gen)[:n]]
    slots, tokens, changed = selection_delta_padded(prev, new, t)
    work = torch.randn(lsz, 2, b, h, cap, d, generator=gen)  # slots past k: generated rows
    work[..., :k, :] = to_work_layout(gather_packed(bank, prev))  # the rows `prev` selected
    ref, moved_ref = work.clone(), torch.zeros(1, dtype=torch.int64)
    reload_rows_reference(bank, ref, slots, tokens, changed, moved_ref)
    # Every bank row the kernel must not read is NaN: a read of one would land in the buffer.
    poisoned = torch.full_like(bank, float("nan"))
    for bi in range(b):
        for gi in range(g):
            for j in range(k):
                if changed[bi, gi, j]:
                    tok, heads = int(tokens[bi, gi, j]), slice(None) if g == 1 else slice(gi, gi + 1)
                    poisoned[tok, bi, :, :, heads] = bank[tok, bi, :, :, heads]
    out, moved = work.clone(), torch.zeros(1, dtype=torch.int64)
    assert reload_rows(poisoned, out, slots, tokens, changed, moved) == "triton"
    assert not torch.isnan(out).any(), "the kernel read a row whose slot did not change"
    assert torch.equal(out, ref), (b, g, seed)
    row = lsz * 2 * (h if g == 1 else 1) * d * bank.element_size()
    assert int(moved) == int(changed.sum()) * row  # only the changed rows crossed
    assert int(moved_ref) == b * g * k * row  # the torch fallback moves every row
    via_op, moved_op = work.clone(), torch.zeros(1, dtype=torch.int64)
    reload_op()(poisoned, via_op, slots, tokens, changed, moved_op)  # the custom op runs the kernel too
    assert torch.equal(via_op, ref) and int(moved_op) == int(moved)


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET") == "1" and triton_usable(torch.device("cpu"))
    for b, g in ((1, 1), (2, 1), (2, 2)):
        for seed in range(3):
            case(b, g, seed)
    print("reload kernel == reference: ok")
    first_use_check()
    print("first-use check: ok")
    return 0


def first_use_check() -> None:
    """`kernel_check`, the once-per-device check a CUDA device runs before the kernel's first
    step, passes the kernel as it is, and names the fault of one that is wrong or raises."""
    import warnings

    import omnikv.offload.reload as reload

    assert reload.kernel_check("cpu") is None
    assert reload.kernel_check("cpu", torch.float16) is None and reload.kernel_check("cpu", torch.bfloat16) is None
    real = reload.reload_rows_triton

    def off_by_one(src, dst, slots, tokens, changed, moved):  # reads the next token's row
        real(src, dst, slots, (tokens + 1) % src.shape[0], changed, moved)

    def raises(*args):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    for fake, needle in ((off_by_one, "differs from its torch reference"), (raises, "no kernel image")):
        reload.reload_rows_triton = fake
        reload.kernel_check.cache_clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reason = reload.kernel_check("cpu")
        assert reason is not None and needle in reason, reason
        assert any("falls back to the full gather" in str(w.message) for w in caught), [str(w.message) for w in caught]
    reload.reload_rows_triton = real
    reload.kernel_check.cache_clear()


if __name__ == "__main__":
    sys.exit(main())
