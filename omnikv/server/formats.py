"""OpenAI response shapes (full JSON and stream chunks) for chat and plain completions."""

from __future__ import annotations

import time
import uuid
from typing import Any

from omnikv.server.protocol import EngineResult


def _usage(result: EngineResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


class ResponseFormat:
    """Response shapes of one endpoint (chat or plain completion)."""

    object_full = ""
    object_chunk = ""
    prefix = ""

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def stream_usage(self, result: EngineResult) -> dict[str, Any]:
        return {**self._envelope(self.object_chunk, []), "usage": _usage(result)}

    def stream_start(self) -> list[dict[str, Any]]:
        return []

    def stream_text(self, text: str) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def stream_end(self, finish_reason: str) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def full(self, result: EngineResult) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError


class ChatFormat(ResponseFormat):
    object_full = "chat.completion"
    object_chunk = "chat.completion.chunk"
    prefix = "chatcmpl"

    def _delta(self, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return self._envelope(self.object_chunk, [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])

    def stream_start(self) -> list[dict[str, Any]]:
        return [self._delta({"role": "assistant", "content": ""}, None)]

    def stream_text(self, text: str) -> dict[str, Any]:
        return self._delta({"content": text}, None)

    def stream_end(self, finish_reason: str) -> dict[str, Any]:
        return self._delta({}, finish_reason)

    def full(self, result: EngineResult) -> dict[str, Any]:
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None, "finish_reason": result.finish_reason}
        return {**self._envelope(self.object_full, [choice]), "usage": _usage(result)}


class CompletionFormat(ResponseFormat):
    object_full = "text_completion"
    object_chunk = "text_completion"
    prefix = "cmpl"

    def _choice(self, text: str, finish: str | None) -> dict[str, Any]:
        return self._envelope(self.object_chunk, [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}])

    def stream_text(self, text: str) -> dict[str, Any]:
        return self._choice(text, None)

    def stream_end(self, finish_reason: str) -> dict[str, Any]:
        return self._choice("", finish_reason)

    def full(self, result: EngineResult) -> dict[str, Any]:
        return {**self._choice(result.text, result.finish_reason), "usage": _usage(result)}
