"""The sync-free partial reload: only the rows whose selection changed cross the link.

Consecutive selections of a filter layer overlap heavily on real text (benchmarks/results/
partial-reload/ measures how much), so a step needs only the changed rows of the Context Bank. The
change is computed on the device (`selection_delta_padded`, omnikv/offload/delta.py: fixed width,
nothing read back), and `reload_rows` copies bank rows `tokens` into working-buffer slots `slots`
where `changed` is set:

* `reload_rows_triton` - a Triton kernel, one program per (sequence, head group, slot), whose loads
  and stores are masked by `changed`: a slot that keeps its row reads nothing, so the link carries
  exactly the changed rows (read from the mapped host bank on a GPU). It also adds the bytes it
  moved to a device counter (no host read). Tested on CPU with Triton's interpreter
  (`TRITON_INTERPRET=1`, tests/test_reload.py).
* `reload_rows_reference` - the same result with torch operations (gather every one of the k rows,
  scatter them; the unchanged columns rewrite the row a slot already holds): the slow, obviously
  correct twin the kernel is held to, and the fallback where Triton is missing (it moves all k rows,
  and counts them).

Layouts: bank `src` (T, B, L, 2, H, D) token-major; working buffer `dst` (L, 2, B, H, capacity, D);
slots / tokens / changed (B, G, k) with G = 1 (one selection for every head) or G = H (per KV head).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch

from omnikv.offload.layouts import gather_packed, scatter_rows, to_work_layout


def reload_rows_reference(src: torch.Tensor, dst: torch.Tensor, slots: torch.Tensor, tokens: torch.Tensor,
                          changed: torch.Tensor, moved: torch.Tensor) -> None:
    """dst[..., slots, :] <- src rows `tokens` (every column: an unchanged one rewrites the row
    its slot already holds); adds the bytes read (all k rows of every (b, g)) to `moved` (1,)."""
    rows = gather_packed(src, tokens)  # (k, B, L, 2, H, D); per KV head (G = H): head g's own rows
    scatter_rows(dst, slots, to_work_layout(rows))
    moved += rows.numel() * rows.element_size()


@functools.lru_cache(maxsize=1)
def triton_module() -> Any:
    """`triton` and `triton.language`, or None where Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    return triton, tl


def triton_usable(device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """The kernel can run here on `dtype` rows: Triton installed, and a CUDA device where it passed
    its first-use check (`kernel_check`), or the interpreter, on CPU."""
    return triton_unusable_reason(device, dtype) is None


def triton_unusable_reason(device: torch.device, dtype: torch.dtype = torch.float32) -> str | None:
    """Why the kernel cannot run on `device` with `dtype` rows (None: it can)."""
    device = torch.device(device)
    if triton_module() is None:
        return "Triton is not installed"
    if device.type == "cuda":
        return kernel_check(str(device), dtype)
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"the kernel runs on a CUDA device (or under TRITON_INTERPRET=1), not on {device.type}"


@functools.lru_cache(maxsize=None)
def kernel_check(device: str, dtype: torch.dtype = torch.float32) -> str | None:
    """Once per CUDA device and row dtype, before the first step that would use the kernel: its
    two variants (one selection for every head, one per KV head) on a small problem in device
    memory against `reload_rows_reference`. None when they match; otherwise the reason (a compile
    or launch error, a wrong result or byte count), warned once, and the partial reload falls back
    to the full gather instead of failing every step of a run (a first GPU session must not lose
    its OmniKV rows to a kernel that has never met that GPU)."""
    import warnings

    try:
        for groups in (1, 2):
            reason = _check_once(device, dtype, groups)
            if reason is not None:
                break
        else:
            return None
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use the kernel here
        reason = f"the reload kernel failed on {device}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
    warnings.warn(f"{reason}; the partial reload falls back to the full gather", RuntimeWarning, stacklevel=2)
    return reason


def _check_once(device: str, dtype: torch.dtype, groups: int) -> str | None:
    """One variant of `kernel_check`: the reason it fails, or None. `groups` 1 (shared selection)
    or the KV heads (2 here: a selection per head)."""
    gen = torch.Generator().manual_seed(groups)
    t, b, lsz, h, d, k, cap = 16, 2, 2, 2, 8, 6, 9
    src = torch.randn(t, b, lsz, 2, h, d, generator=gen).to(device=device, dtype=dtype)
    dst = torch.randn(lsz, 2, b, h, cap, d, generator=gen).to(device=device, dtype=dtype)
    slots = torch.stack([torch.stack([torch.randperm(k, generator=gen) for _ in range(groups)]) for _ in range(b)]).to(device)
    tokens = torch.stack([torch.stack([torch.randperm(t, generator=gen)[:k] for _ in range(groups)]) for _ in range(b)]).to(device)
    changed = (torch.rand(b, groups, k, generator=gen) < 0.5).to(device)
    # The reference writes every column; the kernel only the changed ones (in a real step an
    # unchanged column's slot already holds its row): expected = the reference's rows in the slots
    # of changed columns (per head, with a selection per head), the buffer as it was elsewhere.
    every, out = dst.clone(), dst.clone()
    reload_rows_reference(src, every, slots, tokens, changed, torch.zeros(1, dtype=torch.int64, device=device))
    expected = torch.where(_slot_mask(changed, slots, cap, dst.shape), every, dst)
    moved = torch.zeros(1, dtype=torch.int64, device=device)
    reload_rows_triton(src, out, slots, tokens, changed, moved)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)  # a launch error surfaces here, inside kernel_check's try
    row = lsz * 2 * (h if groups == 1 else 1) * d * src.element_size()
    if not torch.equal(out, expected):
        return f"the reload kernel's result differs from its torch reference on {device} ({dtype}, groups={groups})"
    if int(moved) != int(changed.sum()) * row:
        return f"the reload kernel counted other bytes than it moved on {device} ({dtype}, groups={groups})"
    return None


def _slot_mask(changed: torch.Tensor, slots: torch.Tensor, cap: int, shape: torch.Size) -> torch.Tensor:
    """(L, 2, B, H, cap, D) bool: the working-buffer slots a changed column writes. changed /
    slots (B, G, k); G = 1 writes the slot for every head, G = H only for head g."""
    b, g, _ = changed.shape
    hit = torch.zeros(b, g, cap, dtype=torch.bool, device=changed.device)
    hit.scatter_(2, slots, changed)
    return hit[None, None, :, :, :, None].expand(shape)


@functools.lru_cache(maxsize=1)
def _kernel() -> Any:
    triton, tl = triton_module()

    @triton.jit
    def reload_kernel(src, dst, slots, tokens, changed, moved, B, G, K, CAP, L2: tl.constexpr,
                      H: tl.constexpr, D: tl.constexpr, HEADS: tl.constexpr, PER_HEAD: tl.constexpr,
                      ELT: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)  # one (b, g, j) column of the delta
        g = (pid // K) % G
        b = pid // (K * G)
        ch = tl.load(changed + pid) != 0
        tok = tl.load(tokens + pid).to(tl.int64)
        slot = tl.load(slots + pid).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        head = offs // D + g * PER_HEAD  # per KV head: head g only; else every head
        d = offs % D
        mask = (offs < HEADS * D) & ch  # a slot that keeps its row reads and writes nothing
        for l2 in tl.static_range(L2):  # each layer's K, then V
            src_off = ((tok * B + b) * L2 + l2) * (H * D) + head * D + d
            dst_off = (((l2 * B + b) * H + head) * CAP + slot) * D + d
            x = tl.load(src + src_off, mask=mask)
            tl.store(dst + dst_off, x, mask=mask)
        tl.atomic_add(moved, tl.where(ch, L2 * HEADS * D * ELT, 0).to(tl.int64))

    return reload_kernel


@dataclass(frozen=True)
class KernelLaunch:
    """One launch of the reload kernel: `grid`, the runtime arguments (tensors and ints, in the
    kernel's order) and the compile-time constants. Built in one place for the launch itself and
    for `compile_for_target` (an ahead-of-time build for a GPU this machine may not have)."""

    grid: tuple[int]
    args: tuple[Any, ...]
    constants: dict[str, int]


def kernel_launch(src: torch.Tensor, dst: torch.Tensor, slots: torch.Tensor, tokens: torch.Tensor,
                  changed: torch.Tensor, moved: torch.Tensor) -> KernelLaunch | None:
    """The launch `reload_rows_triton` makes for these tensors (None: nothing to reload).
    src (T, B, L, 2, H, D); dst (L, 2, B, H, capacity, D); slots / tokens / changed (B, G, k)."""
    _, b, lsz, two, h, d = src.shape
    _, g, k = slots.shape
    if b * g * k == 0:
        return None
    heads = 1 if g > 1 else h
    block = 1 << max(heads * d - 1, 0).bit_length()  # the next power of two (Triton's arange width)
    return KernelLaunch(
        grid=(b * g * k,),
        args=(src, dst, slots.contiguous(), tokens.contiguous(), changed.to(torch.int8).contiguous(), moved,
              b, g, k, dst.shape[-2]),
        constants=dict(L2=lsz * two, H=h, D=d, HEADS=heads, PER_HEAD=int(g > 1), ELT=src.element_size(), BLOCK=block),
    )


def reload_rows_triton(src: torch.Tensor, dst: torch.Tensor, slots: torch.Tensor, tokens: torch.Tensor,
                       changed: torch.Tensor, moved: torch.Tensor) -> None:
    """`reload_rows_reference`'s result, reading only the changed rows; `moved` (1,) int64 gains
    the bytes read. src and dst contiguous; slots / tokens / changed (B, G, k)."""
    launch = kernel_launch(src, dst, slots, tokens, changed, moved)
    if launch is not None:
        _kernel()[launch.grid](*launch.args, **launch.constants)


_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
                  torch.int32: "i32", torch.int8: "i8"}


def compile_for_target(launch: KernelLaunch, backend: str = "cuda", arch: int = 90, warp_size: int = 32) -> Any:
    """Compile the kernel for `launch`'s argument types through Triton's whole pipeline (TTIR ->
    PTX -> cubin with Triton's own ptxas) for a GPU this machine need not have (default sm_90,
    H100/H200); returns Triton's compiled kernel (`.asm["ptx"]`, `.asm["cubin"]`). The interpreter
    runs the kernel's logic on CPU; this checks what only a real build checks (types, atomics,
    what the backend accepts) before a GPU session spends its time on it."""
    triton, _ = triton_module()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _kernel()
    signature: dict[str, str] = {}
    for name, value in zip(kernel.arg_names, launch.args):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_DTYPES[value.dtype]
        else:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
    signature.update({name: "constexpr" for name in launch.constants})
    constexprs = {(kernel.arg_names.index(name),): value for name, value in launch.constants.items()}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget(backend, arch, warp_size))


def reload_rows(src: torch.Tensor, dst: torch.Tensor, slots: torch.Tensor, tokens: torch.Tensor,
                changed: torch.Tensor, moved: torch.Tensor) -> str:
    """The partial reload by the kernel where it can run, else the torch reference; returns which
    ran ("triton" / "torch")."""
    if triton_usable(dst.device, src.dtype) and src.is_contiguous() and dst.is_contiguous():
        reload_rows_triton(src, dst, slots, tokens, changed, moved)
        return "triton"
    reload_rows_reference(src, dst, slots, tokens, changed, moved)
    return "torch"


@functools.lru_cache(maxsize=1)
def reload_op() -> Any:
    """`torch.ops.omnikv.reload_rows`: `reload_rows` as a torch custom op (registered on first
    use), so that a compiled step (torch.compile, fullgraph, CUDA graphs) calls the kernel as one
    opaque node that mutates `dst` and `moved` instead of tracing into Triton or breaking the graph."""

    @torch.library.custom_op("omnikv::reload_rows", mutates_args=("dst", "moved"))
    def _reload(src: torch.Tensor, dst: torch.Tensor, slots: torch.Tensor, tokens: torch.Tensor,
                changed: torch.Tensor, moved: torch.Tensor) -> None:
        reload_rows(src, dst, slots, tokens, changed, moved)

    @_reload.register_fake
    def _(src, dst, slots, tokens, changed, moved) -> None:  # shapes do not change: nothing to infer
        return None

    return torch.ops.omnikv.reload_rows
