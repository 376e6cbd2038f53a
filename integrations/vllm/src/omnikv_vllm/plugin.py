"""vLLM general plugin: registers the OmniKV backend when OMNIKV_VLLM=1 (else does nothing)."""

from __future__ import annotations

from omnikv_vllm import settings

BACKEND = "omnikv_vllm.backend.OmniKVCPUBackend"


def register() -> None:
    """Entry point `vllm.general_plugins`: vLLM calls it in every process it starts."""
    if not settings.enabled():
        return
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if not current_platform.is_cpu():
        raise RuntimeError(
            "OMNIKV_VLLM=1: the OmniKV vLLM backend runs on vLLM's CPU platform only so far "
            "(docs/vllm.md has the plan for CUDA); unset OMNIKV_VLLM for stock vLLM")
    # On CPU only CPU_ATTN is selectable, so the override takes its place.
    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND)
