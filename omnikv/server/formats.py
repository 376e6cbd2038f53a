"""OpenAI response shapes (full JSON and stream chunks) for chat and plain completions.

A response has one choice per (prompt, sample): `results` is indexed like the choices. Logprobs
are natural logs under the model's own distribution (raw logits, before temperature and
penalties); -inf is written as -9999.0 (JSON has no infinity).
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

from omnikv.server.protocol import EngineResult, LogprobEntry

_FLOOR = -9999.0


def _lp(x: float) -> float:
    return x if math.isfinite(x) else _FLOOR


def _usage(results: list[EngineResult], n: int) -> dict[str, int]:
    # Results come n per prompt: a prompt's tokens count once, however many choices it has.
    prompt = sum(r.prompt_tokens for r in results[::n])
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class ResponseFormat:
    """Response shapes of one endpoint (chat or plain completion)."""

    object_full = ""
    object_chunk = ""
    prefix = ""

    def __init__(self, model: str, n: int = 1) -> None:
        self.model = model
        self.n = n  # choices per prompt
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def stream_usage(self, results: list[EngineResult]) -> dict[str, Any]:
        return {**self._envelope(self.object_chunk, []), "usage": _usage(results, self.n)}

    def stream_start(self, prompts: int) -> list[dict[str, Any]]:
        return []

    def stream_text(self, index: int, text: str) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def stream_end(self, index: int, finish_reason: str) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def full(self, results: list[EngineResult]) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError


class ChatFormat(ResponseFormat):
    object_full = "chat.completion"
    object_chunk = "chat.completion.chunk"
    prefix = "chatcmpl"

    def _delta(self, index: int, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return self._envelope(self.object_chunk, [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}])

    def stream_start(self, prompts: int) -> list[dict[str, Any]]:
        return [self._delta(i, {"role": "assistant", "content": ""}, None) for i in range(prompts * self.n)]

    def stream_text(self, index: int, text: str) -> dict[str, Any]:
        return self._delta(index, {"content": text}, None)

    def stream_end(self, index: int, finish_reason: str) -> dict[str, Any]:
        return self._delta(index, {}, finish_reason)

    def full(self, results: list[EngineResult]) -> dict[str, Any]:
        choices = [
            {"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": _chat_logprobs(r), "finish_reason": r.finish_reason}
            for i, r in enumerate(results)
        ]
        return {**self._envelope(self.object_full, choices), "usage": _usage(results, self.n)}


def _chat_logprobs(r: EngineResult) -> dict[str, Any] | None:
    if r.logprobs is None:
        return None

    def item(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": _lp(logprob), "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {**item(e.token, e.logprob if e.logprob is not None else _FLOOR), "top_logprobs": [item(t, lp) for t, _, lp in e.top]}
            for e in r.logprobs
        ]
    }


class CompletionFormat(ResponseFormat):
    object_full = "text_completion"
    object_chunk = "text_completion"
    prefix = "cmpl"

    def __init__(self, model: str, n: int = 1, echo: bool = False) -> None:
        super().__init__(model, n)
        self.echo = echo

    def _choice(self, index: int, text: str, finish: str | None, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def stream_text(self, index: int, text: str) -> dict[str, Any]:
        return self._envelope(self.object_chunk, [self._choice(index, text, None)])

    def stream_end(self, index: int, finish_reason: str) -> dict[str, Any]:
        return self._envelope(self.object_chunk, [self._choice(index, "", finish_reason)])

    def full(self, results: list[EngineResult]) -> dict[str, Any]:
        choices = []
        for i, r in enumerate(results):
            prefix = (r.prompt_text or "") if self.echo else ""
            choices.append(self._choice(i, prefix + r.text, r.finish_reason, _completion_logprobs(r, self.echo)))
        return {**self._envelope(self.object_full, choices), "usage": _usage(results, self.n)}


def _completion_logprobs(r: EngineResult, echo: bool) -> dict[str, Any] | None:
    """Legacy completions logprobs: parallel lists over the (echoed prompt +) completion tokens;
    `top_logprobs[i]` maps token text -> logprob for the top-k and the chosen token."""
    if r.logprobs is None:
        return None
    entries: list[LogprobEntry] = list(r.prompt_logprobs or ()) if echo else []
    entries += list(r.logprobs)
    tokens, lps, tops, offsets = [], [], [], []
    offset = 0
    for e in entries:
        tokens.append(e.token)
        offsets.append(offset)
        offset += len(e.token)
        if e.logprob is None:  # the prompt's first token: nothing before it to condition on
            lps.append(None)
            tops.append(None)
            continue
        lps.append(_lp(e.logprob))
        top: dict[str, float] = {}
        for t, _, lp in (*e.top, (e.token, e.token_id, e.logprob)):
            top.setdefault(t, _lp(lp))  # best first: tokens that decode alike keep the best value
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}
