"""One generation loop for the CLI, the server, eval and bench.

`Session` owns a cache and the token history of one conversation: `append` queues tokens (a
document, a question, a new turn), `generate` feeds them (chunked prefill) and decodes. Between
turns nothing is re-read: the cache keeps the prefilled document. `generate()` is a one-turn session.
The same caches also work with `model.generate` (tested); this loop adds streaming, stop strings,
chunked prefill and timings.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from omnikv._compat import cache_kwargs
from omnikv.errors import ConfigError, InputError
from omnikv.methods import Method, get_method, make_decoder


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings. temperature 0 = greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be an int >= 1; got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"temperature must be a finite number >= 0; got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ConfigError(f"top_p must be in (0, 1]; got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k must be an int >= 0; got {self.top_k!r}")
        # The range torch.Generator.manual_seed accepts (beyond it: a raw OverflowError/ValueError).
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not -(2**63) <= self.seed < 2**64):
            raise ConfigError(f"seed must be an int in [-2**63, 2**64); got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise ConfigError("stop strings must be non-empty strings")
        object.__setattr__(self, "stop", stop)


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
    cfg = model.config.get_text_config(decoder=True)
    return getattr(cfg, "max_position_embeddings", None)


class Session:
    """A conversation with one cache. Not thread-safe: one session per worker."""

    def __init__(self, model, tokenizer, method: Method | str, *, prefill_chunk_size: int | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.method = get_method(method)
        self.cache = self.method.make_cache(model)
        # static / compile=True: decode steps go through omnikv.static.StaticDecoder
        self.decoder = make_decoder(self.method, model, self.cache)
        self.device = next(model.parameters()).device
        self.history: list[int] = []  # tokens already in the cache
        self.pending: list[int] = []  # tokens to feed before the next decode
        self.prefill_chunk_size = prefill_chunk_size or getattr(getattr(self.method, "base", None), "prefill_chunk_size", None)
        self.limit = max_context(model)

    @property
    def total_tokens(self) -> int:
        return len(self.history) + len(self.pending)

    def append(self, ids: Sequence[int] | torch.Tensor) -> None:
        ids = _as_ids(ids)
        if not ids:
            raise InputError("empty input: give at least one token of prompt")
        vocab = self.model.get_input_embeddings().num_embeddings
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:  # would be an IndexError deep inside the embedding otherwise
            raise InputError(f"token id {bad[0]} is outside the model's vocabulary (0..{vocab - 1})")
        self.pending.extend(ids)

    def _check_memory(self, max_new_tokens: int = 0) -> None:
        """Refuse, before any work, a request that cannot fit (see omnikv.methods.memory)."""
        from omnikv.methods.memory import check_fits, guard_enabled, plan_memory

        if not guard_enabled() or len(self.pending) < 1024:
            return
        cfg = self.method.config_for(self.model) if hasattr(self.method, "config_for") else None
        if self.limit is not None:  # generation stops at the context limit anyway
            max_new_tokens = max(0, min(max_new_tokens, self.limit - self.total_tokens))
        plan = plan_memory(
            self.model.config,
            self.total_tokens,
            self.method.name,
            device=str(self.device),
            dtype_bytes=next(self.model.parameters()).element_size(),
            max_new_tokens=max_new_tokens,
            prefill_chunk_size=self.prefill_chunk_size,
            omnikv_config=cfg,
            budget=self.method.budget,
            weights_bytes=0,  # already loaded: free memory excludes them
        )
        check_fits(plan)

    @torch.inference_mode()
    def _forward(self, ids: list[int]) -> torch.Tensor:
        """Feed `ids` through the model and cache; (V,) float32 logits after the last one."""
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        if self.decoder is not None:
            logits = self.decoder(x)
        else:
            logits = self.model(input_ids=x, use_cache=True, logits_to_keep=1, **cache_kwargs(self.cache)).logits
        self.history.extend(ids)
        return logits[0, -1].float()

    def feed(self, *, progress: bool = False, max_new_tokens: int = 0) -> torch.Tensor:
        """Feed every pending token (chunked); returns (V,) logits after the last one."""
        if not self.pending:
            raise InputError("nothing to feed: append tokens first")
        if self.limit is not None and self.total_tokens > self.limit:
            raise InputError(
                f"prompt + history is {self.total_tokens} tokens but the model's context is "
                f"{self.limit}; shorten the prompt"
            )
        self._check_memory(max_new_tokens)
        ids, self.pending = self.pending, []
        chunk = self.prefill_chunk_size or len(ids)
        starts = range(0, len(ids), chunk)
        if progress and len(starts) > 1:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="prefill", unit="chunk", leave=False)
        logits = None
        for s in starts:
            logits = self._forward(ids[s : s + chunk])
        return logits

    def _stats(self, compile_seconds: float) -> dict[str, Any]:
        stats = self.cache.stats() if hasattr(self.cache, "stats") else {}
        if self.decoder is not None and self.decoder.compiled:
            stats["compile_seconds"] = round(compile_seconds, 4)
            stats["compiles"] = self.decoder.compiles
        return stats

    def generate(
        self,
        params: SamplingParams | None = None,
        *,
        on_token: Callable[[str], None] | None = None,
        progress: bool = False,
    ) -> GenerationResult:
        params = params or SamplingParams()
        if hasattr(self.cache, "reserve"):
            extra = params.max_new_tokens + len(self.pending)
            if self.limit is not None:  # decoding stops at the context limit: never reserve past it
                extra = min(extra, max(self.limit - len(self.history), 0))
            self.cache.reserve(extra, decode_tokens=params.max_new_tokens)
        prompt_tokens = self.total_tokens
        t0 = time.perf_counter()
        logits = self.feed(progress=progress, max_new_tokens=params.max_new_tokens)
        prefill_s = time.perf_counter() - t0
        sampler = _Sampler(params, self.device)
        stops = eos_ids(self.model, self.tokenizer) if not params.ignore_eos else set()
        streamer = _TextStream(self.tokenizer, params.stop, on_token)
        out: list[int] = []
        finish = "length"
        compiled_before = self.decoder.compile_seconds if self.decoder is not None else 0.0
        t1 = time.perf_counter()
        while True:
            tok = sampler(logits, self.history)
            if tok in stops:
                finish = "stop"
                break
            out.append(tok)
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
        # The last sampled token is not in the cache yet: it starts the next turn.
        if out and finish == "length":
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
        )


class _Sampler:
    """Greedy or sampled next token, with transformers' logits warpers."""

    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        self.greedy = params.temperature == 0
        procs = []
        if not self.greedy:
            procs.append(TemperatureLogitsWarper(float(params.temperature)))
            if params.top_k:
                procs.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1:
                procs.append(TopPLogitsWarper(float(params.top_p)))
        self.procs = LogitsProcessorList(procs)
        self.gen = torch.Generator(device="cpu")
        if params.seed is not None:
            self.gen.manual_seed(params.seed)
        else:
            self.gen.seed()

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        if self.greedy:
            return int(torch.argmax(logits))
        ids = torch.tensor([history[-1:] or [0]], dtype=torch.long)
        scores = self.procs(ids, logits[None].cpu())
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs[0], 1, generator=self.gen))


class _TextStream:
    """Incremental detokenisation with stop strings; emits only text that is final."""

    def __init__(self, tokenizer, stop: tuple[str, ...], on_token: Callable[[str], None] | None) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.on_token = on_token
        self.text = ""
        self.emitted = 0
        self.hold = max((len(s) for s in stop), default=1) - 1

    def push(self, ids: list[int]) -> bool:
        """Update with all generated ids; True when a stop string was reached."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for s in self.stop:
            at = text.find(s)
            if at != -1:
                self.text = text[:at]
                return True
        self.text = text
        # A trailing U+FFFD is an incomplete UTF-8 sequence: wait for the next token.
        safe = len(text.rstrip("\ufffd")) - self.hold
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
) -> GenerationResult:
    """Generate a continuation of `input_ids` with `method` (one request, one fresh cache)."""
    session = Session(model, tokenizer, method, prefill_chunk_size=prefill_chunk_size)
    session.append(input_ids)
    return session.generate(params, on_token=on_token, progress=progress)


@torch.inference_mode()
def teacher_forced_logits(
    model,
    prompt_ids: Sequence[int] | torch.Tensor,
    continuation_ids: Sequence[int] | torch.Tensor,
    method: Method | str,
    *,
    prefill_chunk_size: int | None = None,
) -> torch.Tensor:
    """(N, V) float32: row i = next-token logits after prompt + continuation[:i], computed token
    by token through the method's cache (so sparse decoding is what is measured)."""
    cont = _as_ids(continuation_ids)
    if not cont:
        raise InputError("continuation is empty")
    session = Session(model, None, method, prefill_chunk_size=prefill_chunk_size)
    session.append(prompt_ids)
    if session.decoder is not None:  # a static cache is sized before the prompt
        session.cache.reserve(len(session.pending) + len(cont), decode_tokens=len(cont))
    rows = [session.feed()]
    for tok in cont[:-1]:
        rows.append(session._forward([tok]))
    return torch.stack(rows)
