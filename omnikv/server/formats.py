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


def _usage(results: list[EngineResult], n: int) -> dict[str, Any]:
    # Results come n per prompt: a prompt's tokens count once, however many choices it has.
    prompt = sum(r.prompt_tokens for r in results[::n])
    completion = sum(r.completion_tokens for r in results)
    cached = sum(r.cached_tokens for r in results[::n])
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


class ResponseFormat:
    """Response shapes of one endpoint (chat or plain completion).

    token_ids: logprob tokens are written "token_id:<id>" (vLLM's `return_tokens_as_token_ids`),
    so that tokens that do not decode to valid UTF-8 on their own stay distinguishable."""

    object_full = ""
    object_chunk = ""
    prefix = ""

    def __init__(self, model: str, n: int = 1, *, token_ids: bool = False) -> None:
        self.model = model
        self.n = n  # choices per prompt
        self.token_ids = token_ids
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def _name(self, token: str, token_id: int) -> str:
        return f"token_id:{token_id}" if self.token_ids else token

    def stream_usage(self, results: list[EngineResult]) -> dict[str, Any]:
        return {**self._envelope(self.object_chunk, []), "usage": _usage(results, self.n)}

    def stream_start(self, prompts: int) -> list[dict[str, Any]]:
        return []

    def stream_text(self, index: int, text: str, logprobs: tuple[LogprobEntry, ...] = ()) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def stream_end(self, index: int, finish_reason: str, logprobs: tuple[LogprobEntry, ...] = ()) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def full(self, results: list[EngineResult]) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError


class ChatFormat(ResponseFormat):
    object_full = "chat.completion"
    object_chunk = "chat.completion.chunk"
    prefix = "chatcmpl"

    def __init__(self, model: str, n: int = 1, *, token_ids: bool = False, logprobs: bool = False, echo: tuple[str, ...] = ()) -> None:
        """logprobs: the request asked for them (streamed chunks then carry theirs); echo: per
        prompt, text to put in front of the answer (vLLM's chat `echo`: the open last message)."""
        super().__init__(model, n, token_ids=token_ids)
        self.logprobs = logprobs
        self.echo = echo

    def _delta(self, index: int, delta: dict[str, Any], finish: str | None, logprobs: tuple[LogprobEntry, ...] = ()) -> dict[str, Any]:
        lps = self._logprobs(logprobs) if self.logprobs else None
        return self._envelope(self.object_chunk, [{"index": index, "delta": delta, "logprobs": lps, "finish_reason": finish}])

    def _echo(self, index: int) -> str:
        return self.echo[index // self.n] if self.echo else ""

    def stream_start(self, prompts: int) -> list[dict[str, Any]]:
        return [self._delta(i, {"role": "assistant", "content": self._echo(i)}, None) for i in range(prompts * self.n)]

    def stream_text(self, index: int, text: str, logprobs: tuple[LogprobEntry, ...] = ()) -> dict[str, Any]:
        return self._delta(index, {"content": text}, None, logprobs)

    def stream_end(self, index: int, finish_reason: str, logprobs: tuple[LogprobEntry, ...] = ()) -> dict[str, Any]:
        return self._delta(index, {}, finish_reason, logprobs)

    def full(self, results: list[EngineResult]) -> dict[str, Any]:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": self._echo(i) + r.text},
                "logprobs": self._logprobs(r.logprobs) if r.logprobs is not None else None,
                "finish_reason": r.finish_reason,
            }
            for i, r in enumerate(results)
        ]
        return {**self._envelope(self.object_full, choices), "usage": _usage(results, self.n)}

    def _logprobs(self, entries: tuple[LogprobEntry, ...] | list[LogprobEntry]) -> dict[str, Any]:
        def item(token: str, token_id: int, logprob: float) -> dict[str, Any]:
            return {"token": self._name(token, token_id), "logprob": _lp(logprob), "bytes": list(token.encode("utf-8"))}

        return {
            "content": [
                {**item(e.token, e.token_id, e.logprob if e.logprob is not None else _FLOOR), "top_logprobs": [item(t, i, lp) for t, i, lp in e.top]}
                for e in entries
            ]
        }


class CompletionFormat(ResponseFormat):
    object_full = "text_completion"
    object_chunk = "text_completion"
    prefix = "cmpl"

    def __init__(self, model: str, n: int = 1, echo: bool = False, *, token_ids: bool = False) -> None:
        super().__init__(model, n, token_ids=token_ids)
        self.echo = echo
        self._offsets: dict[int, int] = {}  # streamed choices: text length sent so far

    def _choice(self, index: int, text: str, finish: str | None, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def _stream_logprobs(self, index: int, logprobs: tuple[LogprobEntry, ...]) -> dict[str, Any] | None:
        if not logprobs:
            return None
        out = self._logprobs(logprobs, self._offsets.get(index, 0))
        self._offsets[index] = self._offsets.get(index, 0) + sum(len(e.token) for e in logprobs)
        return out

    def stream_text(self, index: int, text: str, logprobs: tuple[LogprobEntry, ...] = ()) -> dict[str, Any]:
        return self._envelope(self.object_chunk, [self._choice(index, text, None, self._stream_logprobs(index, logprobs))])

    def stream_end(self, index: int, finish_reason: str, logprobs: tuple[LogprobEntry, ...] = ()) -> dict[str, Any]:
        return self._envelope(self.object_chunk, [self._choice(index, "", finish_reason, self._stream_logprobs(index, logprobs))])

    def full(self, results: list[EngineResult]) -> dict[str, Any]:
        choices = []
        for i, r in enumerate(results):
            prefix = (r.prompt_text or "") if self.echo else ""
            logprobs = None
            if r.logprobs is not None:
                logprobs = self._logprobs([*(r.prompt_logprobs or ()), *r.logprobs] if self.echo else r.logprobs)
            choices.append(self._choice(i, prefix + r.text, r.finish_reason, logprobs))
        return {**self._envelope(self.object_full, choices), "usage": _usage(results, self.n)}

    def _logprobs(self, entries: tuple[LogprobEntry, ...] | list[LogprobEntry], offset: int = 0) -> dict[str, Any]:
        """Legacy completions logprobs: parallel lists over the (echoed prompt +) completion tokens;
        `top_logprobs[i]` maps token text -> logprob for the top-k and the chosen token."""
        tokens, lps, tops, offsets = [], [], [], []
        for e in entries:
            tokens.append(self._name(e.token, e.token_id))
            offsets.append(offset)
            offset += len(e.token)
            if e.logprob is None:  # the prompt's first token: nothing before it to condition on
                lps.append(None)
                tops.append(None)
                continue
            lps.append(_lp(e.logprob))
            top: dict[str, float] = {}
            for t, i, lp in (*e.top, (e.token, e.token_id, e.logprob)):
                top.setdefault(self._name(t, i), _lp(lp))  # best first: tokens that decode alike keep the best value
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}
