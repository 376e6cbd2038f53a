"""The sync-free partial reload (omnikv/offload/reload.py, omnikv/offload/delta.py): the padded,
device-side delta against the host-sized one, the torch reference against a full gather, and the
Triton kernel against the reference under Triton's interpreter (a child process: TRITON_INTERPRET
must be set before Triton is imported; Triton lives in its own directory, scripts/setup_triton.sh)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _side_venv import TRITON_SITE

from omnikv.offload.delta import selection_delta, selection_delta_padded
from omnikv.offload.layouts import gather_packed, to_work_layout
from omnikv.offload.reload import reload_rows_reference

ROOT = Path(__file__).resolve().parents[1]


def selections(b: int, g: int, k: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    prev = torch.stack([torch.stack([torch.randperm(t, generator=gen)[:k] for _ in range(g)]) for _ in range(b)])
    new = torch.stack([torch.stack([torch.randperm(t, generator=gen)[:k] for _ in range(g)]) for _ in range(b)])
    mix = torch.rand(b, g, k, generator=gen) < 0.7
    # keep ~70% of the old positions where they do not collide with the new ones
    for bi in range(b):
        for gi in range(g):
            keep = [p for p, m in zip(prev[bi, gi].tolist(), mix[bi, gi].tolist()) if m]
            fresh = [p for p in new[bi, gi].tolist() if p not in keep][: k - len(keep)]
            new[bi, gi] = torch.tensor(keep + fresh)
    return prev, new


@pytest.mark.parametrize("b,g", [(1, 1), (2, 1), (2, 3)])
def test_padded_delta_is_the_host_sized_delta_plus_no_op_columns(b, g):
    for seed in range(4):
        prev, new = selections(b, g, 12, 50, seed)
        slots, tokens, changed = selection_delta_padded(prev, new, 50)
        m_slots, m_tokens = selection_delta(prev, new, 50)
        m = m_slots.shape[-1]
        assert torch.equal(slots[..., :m], m_slots) and torch.equal(tokens[..., :m], m_tokens)
        fresh = [[len(set(new[bi, gi].tolist()) - set(prev[bi, gi].tolist())) for gi in range(g)] for bi in range(b)]
        assert changed.sum(-1).tolist() == fresh  # one changed column per position that is new
        # the padding columns rewrite the position a slot already holds
        assert torch.equal(torch.where(changed, prev.gather(-1, slots), tokens), prev.gather(-1, slots))
        assert torch.equal(prev.scatter(-1, slots, tokens).sort(-1).values, new.sort(-1).values)


@pytest.mark.parametrize("b,g", [(1, 1), (2, 1), (2, 2)])
def test_reference_reload_leaves_the_buffer_equal_to_a_full_gather(b, g):
    t, lsz, h, d, k = 30, 2, 2, 4, 8
    bank = torch.randn(t, b, lsz, 2, h, d)
    prev, new = selections(b, g, k, t, seed=3)
    work = torch.zeros(lsz, 2, b, h, k + 3, d)
    work[..., :k, :] = to_work_layout(gather_packed(bank, prev))
    slots, tokens, changed = selection_delta_padded(prev, new, t)
    moved = torch.zeros(1, dtype=torch.int64)
    reload_rows_reference(bank, work, slots, tokens, changed, moved)
    held = prev.scatter(-1, slots, tokens)
    assert torch.equal(work[..., :k, :], to_work_layout(gather_packed(bank, held)))
    assert int(moved) == b * g * k * lsz * 2 * (h if g == 1 else 1) * d * 4


def run_with_triton(script: str, interpret: bool = True, tmp: Path | None = None) -> str:
    """Run tests/`script` in a child process with TRITON_INTERPRET=1 (or, `interpret=False`, Triton's
    real compiler with its cache in `tmp`, so that it builds every time) and Triton on the path
    (installed by scripts/setup_triton.sh under CI or OMNIKV_TRITON_SETUP=1, else a skip that
    says how); returns its stdout, failing the test on a non-zero exit."""
    if not (TRITON_SITE / "triton").is_dir():
        allowed = os.environ.get("CI", "").lower() == "true" or os.environ.get("OMNIKV_TRITON_SETUP") == "1"
        if not allowed:
            msg = (f"Triton kernel test SKIPPED: {TRITON_SITE} has no triton. Run `bash scripts/setup_triton.sh` "
                   "(or set OMNIKV_TRITON_SETUP=1) to install it there and run it")
            print(msg, file=sys.stderr)
            pytest.skip(msg)
        subprocess.run(["bash", str(ROOT / "scripts/setup_triton.sh"), "--quiet"], check=True, timeout=1800)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(TRITON_SITE)]))
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    if tmp is not None:
        env["TRITON_CACHE_DIR"] = str(tmp)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / script)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_triton_kernel_equals_the_reference_under_the_interpreter():
    out = run_with_triton("_reload_check.py")
    assert "reload kernel == reference: ok" in out and "first-use check: ok" in out


def test_the_kernel_builds_for_the_gpus_it_is_meant_for(tmp_path):
    """tests/_reload_aot.py: Triton's real pipeline and ptxas build the kernel for sm_90 (H100/H200)
    and sm_80 (A100) at the Llama-3-8B preset's launch, every dtype, one selection and one per KV
    head: no GPU needed, and what the interpreter cannot check (the compiler's acceptance, no
    spills, a 64-bit atomic counter) is checked before a GPU session spends its minutes."""
    assert "variants ok" in run_with_triton("_reload_aot.py", interpret=False, tmp=tmp_path)


def test_the_kernel_is_the_decode_steps_gather_and_moves_only_changed_rows():
    """tests/_reload_cache_check.py: a real cache over a simulated link, eager and static (compiled
    with fullgraph=True): the same tokens as without offload, no host sync in a step, and each
    step's h2d bytes exactly the rows that entered the selection."""
    assert "reload in the decode step: ok" in run_with_triton("_reload_cache_check.py")


def test_the_custom_op_compiles_whole_and_equals_the_reference():
    """`torch.ops.omnikv.reload_rows` inside a step compiled with fullgraph=True (aot_eager): the
    delta computed on the device and the reload are one graph, with the reference's result."""
    from omnikv.offload.reload import reload_op

    op = reload_op()
    t, b, lsz, h, d, k = 30, 1, 2, 2, 4, 8
    bank = torch.randn(t, b, lsz, 2, h, d)
    prev, new = selections(b, 1, k, t, seed=5)

    def step(work, moved, prev, new):
        slots, tokens, changed = selection_delta_padded(prev, new, t)
        op(bank, work, slots, tokens, changed, moved)
        return prev.scatter(-1, slots, tokens)

    def fresh():
        work = torch.zeros(lsz, 2, b, h, k + 2, d)
        work[..., :k, :] = to_work_layout(gather_packed(bank, prev))
        return work, torch.zeros(1, dtype=torch.int64)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    (w1, m1), (w2, m2) = fresh(), fresh()
    held = compiled(w1, m1, prev, new)
    assert torch.equal(held, step(w2, m2, prev, new))
    assert torch.equal(w1, w2) and int(m1) == int(m2) > 0
    assert torch.equal(w1[..., :k, :], to_work_layout(gather_packed(bank, held)))
