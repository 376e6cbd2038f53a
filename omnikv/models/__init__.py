"""Model loading: embedded models, local checkpoints, GGUF files (`loading`), the one-time GGUF
conversion cache (`conversion`) and tiny random checkpoints for tests and examples (`tiny`)."""

from omnikv.models.loading import (
    EMBEDDED_MODELS,
    EmbeddedModel,
    LoadedModel,
    cache_dir,
    embedded_status,
    ensure_converted,
    ensure_gguf_converted,
    install_embedded,
    load_model,
)

__all__ = [
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "LoadedModel",
    "cache_dir",
    "embedded_status",
    "ensure_converted",
    "ensure_gguf_converted",
    "install_embedded",
    "load_model",
]
