"""What the HTTP layer needs from a model: the `EngineLike` protocol and its plain-data messages.

The server never touches torch or transformers directly. Everything model-specific sits behind
`EngineLike`, so the HTTP layer, the queue and the metrics can be tested with a fake engine, and the
real `omnikv.server.engine.Engine` is a thin adapter over `omnikv.generation.generate`.

Threading contract: the scheduler calls every `EngineLike` method from one worker thread only, one
request at a time, so an engine needs no locks of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class ChatMessage:
    """One chat turn with its content already flattened to text."""

    role: str
    content: str


@dataclass(frozen=True)
class GenRequest:
    """A validated generation request, in token ids, ready for the engine."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class EngineResult:
    """What one finished generation reports back (token counts feed `usage` and the metrics)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    # cache.stats() of the request: at least device_kv_bytes and host_kv_bytes when known.
    stats: dict = field(default_factory=dict)


@runtime_checkable
class EngineLike(Protocol):
    """A model + tokenizer + KV method that can serve requests one at a time."""

    name: str  # the model id clients put in "model"
    max_context: int | None  # prompt + completion tokens the model supports; None if unknown

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a raw completion prompt (with the model's BOS if it uses one)."""
        ...

    def encode_chat(self, messages: list[ChatMessage]) -> list[int]:
        """Token ids of a chat, rendered with the chat template, ending where the assistant speaks."""
        ...

    def generate(self, request: GenRequest, on_token: Callable[[str], None]) -> EngineResult:
        """Generate, calling `on_token` with each new text piece; an exception it raises aborts."""
        ...
