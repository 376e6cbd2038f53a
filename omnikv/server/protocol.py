"""What the HTTP layer needs from a model: the `EngineLike` protocol and its plain-data messages.

The server never touches torch or transformers directly. Everything model-specific sits behind
`EngineLike`, so the HTTP layer, the queue and the metrics can be tested with a fake engine, and the
real `omnikv.server.engine.Engine` is a thin adapter over `omnikv.decoding.generation.generate`.

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
    """A validated generation request, in token ids, ready for the engine.

    n: continuations of this one prompt (choice i samples with seed + i when a seed is given).
    logprobs: None = none; k >= 0 = each output token's logprob plus the k most likely tokens.
    prompt_logprobs: the same for the prompt tokens (from the prefill); echo: return the prompt
    text in front of the output. max_tokens may be 0 only with echo (score the prompt only).
    cache_salt: prefix reuse only between requests with the same salt (vLLM's `cache_salt`).
    skip_special_tokens: leave special tokens out of the output text (the default).
    """

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    echo: bool = False
    cache_salt: str | None = None
    skip_special_tokens: bool = True

    def choice_seed(self, i: int) -> int | None:
        """The seed of choice i: seed + i, wrapped into the range torch generators accept."""
        if self.seed is None:
            return None
        s = self.seed + i
        return s - 2**64 if s >= 2**64 else s

    @property
    def plain(self) -> bool:
        """Only the settings `model.generate` batching honours (temperature, top_p, stop, max_tokens)."""
        return (self.top_k, self.min_p, self.repetition_penalty, self.min_tokens, self.ignore_eos, self.n, self.logprobs,
                self.prompt_logprobs, self.echo, self.skip_special_tokens) == (0, 0.0, 1.0, 0, False, 1, None, None, False, True)


@dataclass(frozen=True)
class LogprobEntry:
    """One token's log-probability (natural log; None for a prompt's first token, which has no
    context) and the most likely tokens at its position as (text, id, logprob), best first."""

    token: str
    token_id: int
    logprob: float | None
    top: tuple[tuple[str, int, float], ...] = ()


@dataclass(frozen=True)
class EngineResult:
    """What one finished generation reports back (token counts feed `usage` and the metrics)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    # cache.stats() of the request: at least device_kv_bytes and host_kv_bytes when known.
    stats: dict = field(default_factory=dict)
    logprobs: tuple[LogprobEntry, ...] | None = None  # one per completion token, when asked for
    prompt_logprobs: tuple[LogprobEntry, ...] | None = None  # one per prompt token, when asked for
    prompt_text: str | None = None  # the prompt as text, when echo was asked for
    cached_tokens: int = 0  # prompt tokens whose prefill was reused from an earlier request


@runtime_checkable
class EngineLike(Protocol):
    """A model + tokenizer + KV method that can serve requests one at a time."""

    name: str  # the model id clients put in "model"
    max_context: int | None  # prompt + completion tokens the model supports; None if unknown
    # Optional attributes, read with getattr: `vocab_size` (token ids outside 0..vocab_size-1 are
    # refused naming "prompt"), `max_token_chars` (the most characters one token stands for: a
    # prompt over max_token_chars x the token limit is refused before it is tokenized).

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a raw completion prompt (with the model's BOS if it uses one)."""
        ...

    def encode_chat(self, messages: list[ChatMessage]) -> list[int]:
        """Token ids of a chat, rendered with the chat template, ending where the assistant speaks."""
        ...

    def generate(self, request: GenRequest, on_token: Callable[[str], None]) -> EngineResult:
        """Generate one continuation (the scheduler calls it with n = 1), calling `on_token` with each
        new text piece; an exception it raises aborts. `on_token("")` is a liveness probe an engine
        may call at any time (between prefill chunks, say): it raises if the client went away.
        The scheduler's `on_token` is a `TokenSink`: an engine may also hand it each output
        token's logprobs as they come (streamed logprobs); else they come with the result."""
        ...


class TokenSink(Protocol):
    """What the scheduler passes as `on_token`: a callable, plus `logprob` for streamed logprobs."""

    def __call__(self, piece: str) -> None:
        ...

    def logprob(self, entry: LogprobEntry) -> None:
        """One output token's logprob entry (in order, the ending EOS's included)."""
        ...


@runtime_checkable
class ForkingEngineLike(EngineLike, Protocol):
    """Optional: an engine that samples n > 1 continuations from one prefill."""

    def generate_choices(self, request: GenRequest, on_tokens: list[Callable[[str], None]]) -> list[EngineResult]:
        """`request.n` continuations; choice i streams to `on_tokens[i]`."""
        ...


@runtime_checkable
class TokenizingEngineLike(EngineLike, Protocol):
    """Optional, for /tokenize and /detokenize. Unlike the rest, these may be called from any
    thread (the HTTP side), concurrently with generation."""

    vocab_size: int

    def tokenize(self, prompt: str | list[ChatMessage], *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a completion prompt (str) or of a chat rendered for the assistant's turn."""
        ...

    def detokenize(self, ids: list[int]) -> str:
        ...
