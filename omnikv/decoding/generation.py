"""One generation loop for the CLI, the server, eval and bench.

`Session` owns a cache and the token history of one conversation: `append` queues tokens (a
document, a question, a new turn), `generate` feeds them (chunked prefill) and decodes. Between
turns nothing is re-read: the cache keeps the prefilled document. `generate()` is a one-turn session.
The same caches also work with `model.generate` (tested); this loop adds streaming, stop strings,
chunked prefill and timings.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from omnikv.hf.compat import cache_kwargs, text_config
from omnikv.errors import ConfigError, InputError, check_int
from omnikv.methods import Method, get_method, make_decoder
from omnikv.decoding.stops import StopMatcher


# Temperatures below this decode greedily (as vLLM does): dividing logits by 1e-40 overflows to
# inf and the softmax to nan.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings. temperature 0 (or below `GREEDY_BELOW_TEMPERATURE`) = greedy.

    min_p: drop tokens less likely than min_p x the most likely one (sampling only).
    repetition_penalty: > 1 discourages tokens already in the prompt or output (CTRL-style, also
        applied when greedy). min_tokens: EOS cannot end the output before this many tokens.
    logprobs: None = no logprobs; k >= 0 = record each output token's log-probability under the
        model (raw logits, before temperature and penalties) and the k most likely alternatives.
    skip_special_tokens: leave special tokens (other than the final EOS, never in the text) out of
        the text, as transformers' decode does by default.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, 1)
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"temperature must be a finite number >= 0; got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ConfigError(f"top_p must be in (0, 1]; got {self.top_p!r}")
        check_int("top_k", self.top_k, 0)
        if not (isinstance(self.min_p, (int, float)) and 0 <= self.min_p <= 1):
            raise ConfigError(f"min_p must be in [0, 1]; got {self.min_p!r}")
        if not (isinstance(self.repetition_penalty, (int, float)) and math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ConfigError(f"repetition_penalty must be a finite number > 0; got {self.repetition_penalty!r}")
        check_int("min_tokens", self.min_tokens, 0)
        if self.logprobs is not None:
            check_int("logprobs", self.logprobs, 0)
        # The range torch.Generator.manual_seed accepts (beyond it: a raw OverflowError/ValueError).
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not -(2**63) <= self.seed < 2**64):
            raise ConfigError(f"seed must be an int in [-2**63, 2**64); got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise ConfigError("stop strings must be non-empty strings")
        object.__setattr__(self, "stop", stop)


@dataclass(frozen=True)
class TokenLogprob:
    """One position's log-probability (natural log) and its `top` most likely (token id, logprob)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, token_ids: Sequence[int], k: int) -> list[TokenLogprob]:
    """(N, V) logits, the N tokens that followed them -> N `TokenLogprob`s with top-k alternatives."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, torch.tensor(list(token_ids), dtype=torch.long, device=logp.device)[:, None])[:, 0]
    top_v, top_i = (logp.topk(k, dim=-1) if k > 0 else (logp[:, :0], logp[:, :0].long()))
    return [
        TokenLogprob(int(t), float(c), tuple(zip(map(int, ti), map(float, tv))))
        for t, c, ti, tv in zip(token_ids, chosen.tolist(), top_i.tolist(), top_v.tolist())
    ]


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    generated_tokens: int
    prefill_seconds: float
    decode_seconds: float
    decode_tokens_per_second: float
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    stats: dict[str, Any] = field(default_factory=dict)
    method: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry when params.logprobs is set
    # The EOS token that ended the output (finish_reason "stop"; not in token_ids or the text) and,
    # when params.logprobs is set, its log-probability: clients that score text (lm-eval) count it.
    eos_token_id: int | None = None
    eos_logprob: TokenLogprob | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_seconds": round(self.prefill_seconds, 4),
            "decode_seconds": round(self.decode_seconds, 4),
            "decode_tokens_per_second": round(self.decode_tokens_per_second, 3),
            "finish_reason": self.finish_reason,
            "device_kv_bytes": self.stats.get("device_kv_bytes"),
            "host_kv_bytes": self.stats.get("host_kv_bytes"),
            "h2d_bytes_per_step": self.stats.get("h2d_bytes_per_step"),
            "telemetry": self.stats.get("telemetry"),
            "method": self.method,
            "config": self.config,
            "token_ids": self.token_ids,
        }


def _as_ids(input_ids: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2:
            if input_ids.shape[0] != 1:
                raise InputError("this loop runs one sequence; for batches use model.generate with the cache")
            input_ids = input_ids[0]
        return [int(t) for t in input_ids.tolist()]
    return [int(t) for t in input_ids]


def eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(src, "eos_token_id", None)
        if eos is None:
            continue
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return ids


def max_context(model) -> int | None:
    return getattr(text_config(model), "max_position_embeddings", None)


def prefill_chunks(n: int, chunk: int | None) -> list[tuple[int, int]]:
    """[start, end) bounds of `n` prompt tokens fed `chunk` at a time (None: one chunk). A last
    chunk of one token joins the one before: after cached tokens, a one-token forward is a decode
    step for the methods (OmniKV selects, Quest and the lossy caches evict), not a prefill."""
    chunk = chunk or n
    bounds = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


class Session:
    """A conversation with one cache. Not thread-safe: one session per worker.

    A session continues after `generate`: `append` the next turn's tokens and `generate` again;
    only the new tokens are prefilled. The cache then holds the prompt and every generated token
    but a final EOS (the token that completed a stop string included): `tokens` lists them.
    """

    def __init__(
        self,
        model,
        tokenizer,
        method: Method | str,
        *,
        prefill_chunk_size: int | None = None,
        cache: Any = None,
        history: Sequence[int] = (),
        pending: Sequence[int] = (),
    ) -> None:
        """`cache` + `history`: a cache already holding `history` (a fork of a shared prefill,
        see omnikv.decoding.fork); `pending`: tokens queued to feed first. Default: a fresh, empty cache."""
        self.model = model
        self.tokenizer = tokenizer
        self.method = get_method(method)
        if cache is None and history:
            raise InputError("history given without the cache that holds it")
        self.cache = self.method.make_cache(model) if cache is None else cache
        # static / compile=True: decode steps go through omnikv.hf.static.StaticDecoder
        self.decoder = make_decoder(self.method, model, self.cache)
        self.device = next(model.parameters()).device
        self.history: list[int] = list(history)  # tokens already in the cache
        self.pending: list[int] = list(pending)  # tokens to feed before the next decode
        self.prefill_chunk_size = prefill_chunk_size or getattr(getattr(self.method, "base", None), "prefill_chunk_size", None)
        if self.method.prefill_in_one_forward:
            self.prefill_chunk_size = None  # the method compresses at the end of the prompt's forward
        self.limit = max_context(model)

    @property
    def total_tokens(self) -> int:
        return len(self.history) + len(self.pending)

    @property
    def tokens(self) -> list[int]:
        """The conversation so far: tokens in the cache, then those queued to feed next."""
        return self.history + self.pending

    def append(self, ids: Sequence[int] | torch.Tensor) -> None:
        ids = _as_ids(ids)
        if not ids:
            raise InputError("empty input: give at least one token of prompt")
        vocab = self.model.get_input_embeddings().num_embeddings
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:  # would be an IndexError deep inside the embedding otherwise
            raise InputError(f"token id {bad[0]} is outside the model's vocabulary (0..{vocab - 1})")
        self.pending.extend(ids)

    def check_memory(self, max_new_tokens: int = 0) -> None:
        """Refuse, before any work, a request that cannot fit (see omnikv.methods.memory); `feed`
        checks the pending tokens itself."""
        from omnikv.methods.memory import check_fits, guard_enabled, plan_memory

        if not guard_enabled() or len(self.pending) < 1024:
            return
        if self.limit is not None:  # generation stops at the context limit anyway
            max_new_tokens = max(0, min(max_new_tokens, self.limit - self.total_tokens))
        plan = plan_memory(
            self.model.config,
            self.total_tokens,
            self.method,
            device=str(self.device),
            dtype_bytes=next(self.model.parameters()).element_size(),
            max_new_tokens=max_new_tokens,
            prefill_chunk_size=self.prefill_chunk_size,
            weights_bytes=0,  # already loaded: free memory excludes them
        )
        check_fits(plan)

    @torch.inference_mode()
    def _forward(self, ids: list[int], *, all_logits: bool = False) -> torch.Tensor:
        """Feed `ids` through the model and cache; (V,) float32 logits after the last one, or
        (len(ids), V) logits after each one when `all_logits`."""
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        if self.decoder is not None and not all_logits:
            logits = self.decoder(x)[0, -1]
        else:
            with self.method.forward_context(self.model, self.cache, len(ids)) as extra:
                out = self.model(input_ids=x, use_cache=True, logits_to_keep=0 if all_logits else 1,
                                 **cache_kwargs(self.cache), **extra)
            logits = out.logits[0] if all_logits else out.logits[0, -1]
        self.history.extend(ids)
        return logits.float()

    def fork(self) -> "Session":
        """An independent copy of this session (cache deep-copied): decode several continuations
        of one prefill. The copy shares model, tokenizer and method, nothing mutable."""
        twin = copy.copy(self)
        twin.cache = copy.deepcopy(self.cache)
        twin.history = list(self.history)
        twin.pending = list(self.pending)
        return twin

    def feed(
        self,
        *,
        progress: bool = False,
        max_new_tokens: int = 0,
        prompt_logprobs: int | None = None,
        on_chunk: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """Feed every pending token (chunked); returns (V,) logits after the last one.

        prompt_logprobs: k >= 0 also sets `self.prompt_logprobs`: for each fed token but the first,
            its log-probability given the tokens before it, with the k most likely alternatives
            (from the prefill's logits: full attention for every method).
        on_chunk: called before each prefill chunk; an exception it raises aborts the prefill
            (the server uses it to stop work for a client that went away).
        """
        if not self.pending:
            raise InputError("nothing to feed: append tokens first")
        if self.limit is not None and self.total_tokens > self.limit:
            raise InputError(
                f"prompt + history is {self.total_tokens} tokens but the model's context is "
                f"{self.limit}; shorten the prompt"
            )
        self.check_memory(max_new_tokens)
        ids, self.pending = self.pending, []
        bounds = prefill_chunks(len(ids), self.prefill_chunk_size)
        if progress and len(bounds) > 1:
            from tqdm.auto import tqdm

            bounds = tqdm(bounds, desc="prefill", unit="chunk", leave=False)
        logits = None
        rows: list[TokenLogprob] = []
        for s, e in bounds:
            if on_chunk is not None:
                on_chunk()
            part = ids[s:e]
            if prompt_logprobs is None:
                logits = self._forward(part)
                continue
            # Logits after token j score token j + 1: keep them per chunk, reduced to top-k at once
            # (never the whole (T, V) matrix).
            all_logits = self._forward(part, all_logits=True)
            rows += token_logprobs(all_logits[:-1], part[1:], prompt_logprobs)
            if e < len(ids):
                rows += token_logprobs(all_logits[-1:], [ids[e]], prompt_logprobs)
            logits = all_logits[-1]
        if prompt_logprobs is not None:
            self.prompt_logprobs = rows
        return logits

    @torch.inference_mode()
    def step(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Feed the pending tokens, then `ids`, one token per forward: as decode steps, not as a
        new prompt. For text that arrives after the context was prefilled and must not be part of
        it (a question asked about an already cached document: a method that compresses at the
        end of prefill has compressed before it sees the question). Returns (V,) last logits."""
        todo = self.pending + _as_ids(ids)
        if not todo:
            raise InputError("nothing to step: give at least one token")
        if self.limit is not None and self.total_tokens + len(todo) - len(self.pending) > self.limit:
            raise InputError(f"{self.total_tokens + len(todo) - len(self.pending)} tokens exceed the model's "
                             f"context of {self.limit}")
        self.pending = []
        logits = None
        for tok in todo:
            logits = self._forward([tok])
        return logits

    def _stats(self, compile_seconds: float) -> dict[str, Any]:
        stats = self.cache.stats() if hasattr(self.cache, "stats") else {}
        if self.decoder is not None and (self.decoder.compiled or self.decoder.eager_fallback):
            stats["compile_seconds"] = round(compile_seconds, 4)
            stats["compiles"] = self.decoder.compiles
            if self.decoder.eager_fallback:  # torch's recompile limit: this request decoded eagerly
                stats["compile_fallback"] = "eager"
        return stats

    def generate(
        self,
        params: SamplingParams | None = None,
        *,
        on_token: Callable[[str], None] | None = None,
        progress: bool = False,
    ) -> GenerationResult:
        params = params or SamplingParams()
        self.reserve(params.max_new_tokens)
        prompt_tokens = self.total_tokens
        t0 = time.perf_counter()
        logits = self.feed(progress=progress, max_new_tokens=params.max_new_tokens)
        prefill_s = time.perf_counter() - t0
        return self.decode(logits, params, on_token=on_token, prompt_tokens=prompt_tokens, prefill_seconds=prefill_s)

    def reserve(self, max_new_tokens: int) -> None:
        """Size the cache's buffers for the pending tokens plus `max_new_tokens` (a hint)."""
        if hasattr(self.cache, "reserve"):
            extra = max_new_tokens + len(self.pending)
            if self.limit is not None:  # decoding stops at the context limit: never reserve past it
                extra = min(extra, max(self.limit - len(self.history), 0))
            # decode_tokens capped like extra: max_new_tokens may be far past the context (10**12).
            self.cache.reserve(extra, decode_tokens=min(max_new_tokens, extra))

    def decode(
        self,
        logits: torch.Tensor,
        params: SamplingParams,
        *,
        on_token: Callable[[str], None] | None = None,
        prompt_tokens: int | None = None,
        prefill_seconds: float = 0.0,
        on_logprob: Callable[[TokenLogprob], None] | None = None,
    ) -> GenerationResult:
        """Decode from `logits` (V,), the next-token logits after everything fed (see `feed`).

        on_logprob: with params.logprobs set, called with each output token's `TokenLogprob` (the
        ending EOS's too) as soon as it is sampled, before its text reaches `on_token`."""
        prompt_tokens = len(self.history) if prompt_tokens is None else prompt_tokens
        prefill_s = prefill_seconds
        sampler = _Sampler(params, self.device)
        stops = eos_ids(self.model, self.tokenizer) if not params.ignore_eos else set()
        streamer = _TextStream(self.tokenizer, params.stop, on_token, params.skip_special_tokens)
        out: list[int] = []
        logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        finish = "length"
        eos: int | None = None
        eos_lp: TokenLogprob | None = None
        compiled_before = self.decoder.compile_seconds if self.decoder is not None else 0.0
        t1 = time.perf_counter()
        while True:
            # EOS may not end the output before min_tokens.
            tok = sampler(logits, self.history, banned=stops if len(out) < params.min_tokens else ())
            lp = token_logprobs(logits[None], [tok], params.logprobs or 0)[0] if logprobs is not None else None
            if lp is not None and on_logprob is not None:
                on_logprob(lp)
            if tok in stops:
                finish, eos, eos_lp = "stop", tok, lp
                break
            out.append(tok)
            if lp is not None:
                logprobs.append(lp)
            if streamer.push(out):
                finish = "stop"
                break
            if len(out) >= params.max_new_tokens:
                break
            if self.limit is not None and self.total_tokens + 1 > self.limit:
                break
            logits = self._forward([tok])
        decode_s = time.perf_counter() - t1
        compile_s = (self.decoder.compile_seconds - compiled_before) if self.decoder is not None else 0.0
        decode_s -= compile_s  # compiling is not decoding: reported apart, as stats["compile_seconds"]
        # The last sampled token is not in the cache yet: it starts the next turn (unless EOS
        # ended the output: a chat template's next turn starts with its own end-of-turn text).
        if out and eos is None:
            self.pending.append(out[-1])
        streamer.flush()
        steps = max(len(out) - 1, 0)
        return GenerationResult(
            text=streamer.text,
            token_ids=out,
            prompt_tokens=prompt_tokens,
            generated_tokens=len(out),
            prefill_seconds=prefill_s,
            decode_seconds=decode_s,
            decode_tokens_per_second=(steps / decode_s) if steps and decode_s > 0 else 0.0,
            finish_reason=finish,
            stats=self._stats(compile_s),
            method=self.method.name,
            config=self.method.describe(),
            logprobs=logprobs,
            eos_token_id=eos,
            eos_logprob=eos_lp,
        )


class _Sampler:
    """Greedy or sampled next token, with transformers' logits processors."""

    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        self.greedy = params.temperature < GREEDY_BELOW_TEMPERATURE
        # Only the repetition penalty reads the history; the others look at the scores alone.
        self.penalty = RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty)) if params.repetition_penalty != 1 else None
        procs = []
        if not self.greedy:
            procs.append(TemperatureLogitsWarper(float(params.temperature)))
            if params.top_k:
                procs.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1:
                procs.append(TopPLogitsWarper(float(params.top_p)))
            if params.min_p > 0:
                procs.append(MinPLogitsWarper(float(params.min_p)))
        self.procs = LogitsProcessorList(procs)
        self.gen = torch.Generator(device="cpu")
        if params.seed is not None:
            self.gen.manual_seed(params.seed)
        else:
            self.gen.seed()

    def __call__(self, logits: torch.Tensor, history: list[int], banned: Sequence[int] | set[int] = ()) -> int:
        if self.penalty is not None or banned:
            logits = logits.clone()
            if banned:
                logits[list(banned)] = -math.inf
            if self.penalty is not None:
                logits = self.penalty(torch.tensor([history], dtype=torch.long, device=logits.device), logits[None])[0]
        if self.greedy:
            return int(torch.argmax(logits))
        ids = torch.tensor([history[-1:] or [0]], dtype=torch.long)
        scores = self.procs(ids, logits[None].cpu())
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs[0], 1, generator=self.gen))


class _TextStream:
    """Incremental detokenisation with stop strings; emits only text that is final."""

    def __init__(self, tokenizer, stop: tuple[str, ...], on_token: Callable[[str], None] | None,
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stops = StopMatcher(stop)
        self.on_token = on_token
        self.text = ""
        self.emitted = 0

    def push(self, ids: list[int]) -> bool:
        """Update with all generated ids; True when a stop string was reached."""
        text = self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
        cut, _ = self.stops.scan(text)
        if cut is not None:
            self.text = text[:cut]
            return True
        self.text = text
        # A trailing U+FFFD is an incomplete UTF-8 sequence: wait for the next token. A tail that
        # could still start a stop string waits too.
        _, safe = self.stops.scan(text.rstrip("\ufffd"))
        if self.on_token and safe > self.emitted:
            self.on_token(text[self.emitted : safe])
            self.emitted = safe
        return False

    def flush(self) -> None:
        if self.on_token and len(self.text) > self.emitted:
            self.on_token(self.text[self.emitted :])
        self.emitted = len(self.text)


def generate(
    model,
    tokenizer,
    input_ids: Sequence[int] | torch.Tensor,
    method: Method | str = "omnikv",
    params: SamplingParams | None = None,
    *,
    on_token: Callable[[str], None] | None = None,
    prefill_chunk_size: int | None = None,
    progress: bool = False,
    shared: Any = None,
) -> GenerationResult:
    """Generate a continuation of `input_ids` with `method` (one request, one fresh cache).

    `shared`: an `omnikv.decoding.fork.SharedPrefill` of `input_ids`: the method's cache is forked from it
    (only the shared prefill's tail is prefilled here; `prefill_seconds` counts that tail)."""
    session = _prompt_session(model, tokenizer, method, input_ids, prefill_chunk_size, shared)
    return session.generate(params, on_token=on_token, progress=progress)


def _prompt_session(model, tokenizer, method, input_ids, prefill_chunk_size: int | None, shared: Any) -> Session:
    """A Session with `input_ids` pending: a fresh cache, or one forked from `shared` (an
    `omnikv.decoding.fork.SharedPrefill` of the same ids, whose tail is then what is pending)."""
    if shared is None:
        session = Session(model, tokenizer, method, prefill_chunk_size=prefill_chunk_size)
        session.append(input_ids)
        return session
    if shared.ids != _as_ids(input_ids):
        raise InputError("the shared prefill is of another prompt: build it from the same input_ids")
    return shared.session(tokenizer, method, prefill_chunk_size=prefill_chunk_size)


@torch.inference_mode()
def teacher_forced_logits(
    model,
    prompt_ids: Sequence[int] | torch.Tensor,
    continuation_ids: Sequence[int] | torch.Tensor,
    method: Method | str,
    *,
    prefill_chunk_size: int | None = None,
    shared: Any = None,
) -> torch.Tensor:
    """(N, V) float32: row i = next-token logits after prompt + continuation[:i], computed token
    by token through the method's cache (so sparse decoding is what is measured). `shared`: an
    `omnikv.decoding.fork.SharedPrefill` of `prompt_ids` to fork the method's cache from."""
    cont = _as_ids(continuation_ids)
    if not cont:
        raise InputError("continuation is empty")
    session = _prompt_session(model, None, method, prompt_ids, prefill_chunk_size, shared)
    if session.decoder is not None:  # a static cache is sized before the (rest of the) prompt is fed
        session.reserve(len(cont))
    rows = [session.feed()]
    for tok in cont[:-1]:
        rows.append(session._forward([tok]))
    return torch.stack(rows)
