"""The real engine: a loaded model + tokenizer + KV method behind `EngineLike`.

Generation goes through `omnikv.decoding.generation.generate`, the same code path as the CLI and the eval,
so served outputs equal `omnikv generate` outputs for the same prompt and sampling settings.
"""

from __future__ import annotations

import copy
import logging
import threading
from typing import Any, Callable, Hashable

from omnikv.errors import ConfigError, InputError
from omnikv.server.protocol import ChatMessage, EngineResult, GenRequest, LogprobEntry

log = logging.getLogger("omnikv.server")


class Engine:
    """Owns model, tokenizer and method; called from the server's single worker thread only."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        method: Any,
        *,
        name: str,
        max_context: int | None = None,
        has_chat_template: bool | None = None,
        prefill_chunk_size: int | None = None,
        max_batch_size: int = 1,
        prefix_cache_bytes: int = 0,
    ) -> None:
        """prefix_cache_bytes > 0: keep the prefill of recent prompts (host memory, at most this
        many bytes) and reuse it for later prompts that begin the same way (omnikv.decoding.prefix_cache)."""
        if max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.method = method
        self.name = name
        self.max_context = max_context or None  # 0 (unknown) -> None
        if has_chat_template is None:
            has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.has_chat_template = has_chat_template
        self.prefill_chunk_size = prefill_chunk_size
        # Batching needs a method whose cache takes several (left-padded) sequences.
        self.max_batch_size = max_batch_size if getattr(method, "supports_batch", False) else 1
        if getattr(method, "static", False):
            # A static / compiled step is captured per request (Session drives it); a batch would
            # go through model.generate and run eager, so compiled methods decode one at a time.
            self.max_batch_size = 1
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        # The longest text one token stands for (raw vocabulary strings are at least as long as
        # their decoded text): no prompt longer than this x the token limit can fit.
        self.max_token_chars = max((len(t) for t in tokenizer.get_vocab()), default=1) if hasattr(tokenizer, "get_vocab") else None
        # /tokenize and /detokenize run on the HTTP side, concurrently with generation: they use
        # their own copy of the tokenizer (fast tokenizers are not safe to share between threads).
        self._aux_tokenizer: Any = None
        self._aux_lock = threading.Lock()
        self.prefix_cache: Any = None
        if prefix_cache_bytes:
            from omnikv.decoding.prefix_cache import PrefixCache

            self.prefix_cache = PrefixCache(model, method, prefix_cache_bytes, prefill_chunk_size=prefill_chunk_size)
            if not self.prefix_cache.supported:
                log.warning("method %s cannot reuse prefixes (its cache cannot be seeded); prefix cache off", getattr(method, "name", method))

    @classmethod
    def from_loaded(
        cls, loaded: Any, method: Any, *, name: str | None = None, prefill_chunk_size: int | None = None, max_batch_size: int = 1,
        prefix_cache_bytes: int = 0,
    ) -> "Engine":
        """From an `omnikv.models.LoadedModel` and a method (instance or registry name)."""
        return cls(
            loaded.model,
            loaded.tokenizer,
            method,
            name=name or loaded.name,
            max_context=loaded.max_context,
            has_chat_template=loaded.has_chat_template,
            prefill_chunk_size=prefill_chunk_size,
            max_batch_size=max_batch_size,
            prefix_cache_bytes=prefix_cache_bytes,
        )

    def encode_prompt(self, prompt: str, *, tokenizer: Any = None, add_special_tokens: bool = True) -> list[int]:
        tok = tokenizer or self.tokenizer
        return list(tok(prompt, add_special_tokens=add_special_tokens)["input_ids"])

    def encode_chat(
        self,
        messages: list[ChatMessage],
        *,
        tokenizer: Any = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: dict[str, Any] | None = None,
        add_special_tokens: bool = False,
    ) -> list[int]:
        """Token ids of a chat. continue_final_message: the last message stays open (no end of
        turn), so the model continues it: an assistant prefill. template_kwargs: extra variables
        for the chat template (vLLM's `chat_template_kwargs`). add_special_tokens: the tokenizer's
        BOS on top of the template's (vLLM's chat `add_special_tokens`)."""
        tok = tokenizer or self.tokenizer
        if self.has_chat_template:
            turns = [{"role": m.role, "content": m.content} for m in messages]
            # Render to text, then tokenize without extra specials: the template already places BOS
            # and turn markers where the model was trained to see them.
            text = tok.apply_chat_template(
                turns, tokenize=False, add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                **(template_kwargs or {}),
            )
            return list(tok(text, add_special_tokens=add_special_tokens)["input_ids"])
        if template_kwargs:
            raise InputError("chat_template_kwargs: this model has no chat template to pass them to")
        # No template (base models): a plain transcript that ends where the assistant speaks.
        lines = [f"{m.role}: {m.content}" for m in messages]
        if continue_final_message:  # the last line stays open: the model continues it
            text = "".join(f"{line}\n" for line in lines[:-1]) + lines[-1]
        else:
            text = "".join(f"{line}\n" for line in lines) + ("assistant:" if add_generation_prompt else "")
        return self.encode_prompt(text, tokenizer=tok)

    def tokenizer_info(self) -> dict[str, Any]:
        """What vLLM's GET /tokenizer_info serves and lm-eval's remote tokenizer reads: the special
        tokens and the chat template (lm-eval then tokenizes through /tokenize, no hub needed)."""
        tok = self.tokenizer
        info: dict[str, Any] = {"tokenizer_class": type(tok).__name__, "model_max_length": self.max_context}
        for name in ("eos_token", "bos_token", "pad_token", "unk_token"):
            value = getattr(tok, name, None)
            info[name] = value if isinstance(value, str) else None
        template = getattr(tok, "chat_template", None)
        info["chat_template"] = template if isinstance(template, str) else None
        return info

    # -- /tokenize, /detokenize (any thread) -------------------------------------------------------
    def _aux(self) -> Any:
        if self._aux_tokenizer is None:
            self._aux_tokenizer = copy.deepcopy(self.tokenizer)
        return self._aux_tokenizer

    def tokenize(self, prompt: str | list[ChatMessage], *, add_special_tokens: bool = True) -> list[int]:
        with self._aux_lock:
            if isinstance(prompt, str):
                return self.encode_prompt(prompt, tokenizer=self._aux(), add_special_tokens=add_special_tokens)
            return self.encode_chat(prompt, tokenizer=self._aux(), add_generation_prompt=add_special_tokens)

    def detokenize(self, ids: list[int]) -> str:
        with self._aux_lock:
            return self._aux().decode(ids, skip_special_tokens=False)

    # -- generation (worker thread) ----------------------------------------------------------------
    def generate(self, request: GenRequest, on_token: Callable[[str], None]) -> EngineResult:
        return self.generate_choices(request, [on_token])[0]

    def generate_choices(self, request: GenRequest, on_tokens: list[Callable[[str], None]]) -> list[EngineResult]:
        """len(on_tokens) continuations of one prefill: the prefilled cache is deep-copied for
        every choice but the last (a cache that cannot be copied is prefilled again instead).

        Choice i samples with `request.choice_seed(i)`, so it equals a single request with that
        seed. Prompt logprobs come from the prefill, which is full attention for every method.
        With a prefix cache, the prompt's longest stored prefix is reused (`cached_tokens`)."""
        self._check_ids(request)
        ids = list(request.prompt_ids)
        base, logits, cached = self._prefill(request, on_tokens[0])
        prompt_lp = None
        if request.prompt_logprobs is not None:
            first = LogprobEntry(self._token_text(ids[0]), ids[0], None)
            prompt_lp = (first, *self._entries(base.prompt_logprobs))
        prompt_text = self.tokenizer.decode(ids, skip_special_tokens=True) if request.echo else None
        results: list[EngineResult] = []
        for i, on_token in enumerate(on_tokens):
            if request.max_tokens == 0:  # score the prompt only (echo)
                stats = base.cache.stats() if hasattr(base.cache, "stats") else {}
                lps = () if request.logprobs is not None else None
                results.append(EngineResult("", len(ids), 0, "length", dict(stats), lps, prompt_lp, prompt_text, cached))
                continue
            last = i == len(on_tokens) - 1
            session, start = (base, logits) if last else self._fork(base, logits, lambda: self._prefill(request, on_tokens[0])[:2])
            res = self._decode(session, start, request, i, on_token)
            logprobs = None
            if res.logprobs is not None:
                # The EOS that ended the output is an output token too (as vLLM returns it): a
                # client scoring "prompt + 1 generated token" (lm-eval's loglikelihood) drops it.
                ended = [res.eos_logprob] if res.eos_logprob is not None else []
                logprobs = self._entries([*res.logprobs, *ended])
            results.append(
                EngineResult(
                    text=res.text,
                    prompt_tokens=int(res.prompt_tokens),
                    completion_tokens=int(res.generated_tokens) + (res.eos_token_id is not None),
                    finish_reason="stop" if res.finish_reason == "stop" else "length",
                    stats=dict(res.stats or {}),
                    logprobs=logprobs,
                    prompt_logprobs=prompt_lp,
                    prompt_text=prompt_text,
                    cached_tokens=cached,
                )
            )
        return results

    def _prefill(self, request: GenRequest, probe: Callable[[str], None]) -> tuple[Any, Any, int]:
        """(session with the prompt fed, next-token logits, prompt tokens reused). `probe("")`
        runs between prefill chunks: it raises (and so stops the prefill) once the client left."""
        from omnikv.decoding.generation import Session

        ids = list(request.prompt_ids)
        check = lambda: probe("")  # noqa: E731
        # Prompt logprobs need every prompt position's logits, which a reused prefix has not kept.
        if self.prefix_cache is not None and request.prompt_logprobs is None:
            session, cached = self.prefix_cache.session(self.tokenizer, ids, salt=request.cache_salt, on_chunk=check,
                                                        max_new_tokens=request.max_tokens)
        else:
            session, cached = Session(self.model, self.tokenizer, self.method, prefill_chunk_size=self.prefill_chunk_size), 0
            session.append(ids)
        session.reserve(request.max_tokens)
        logits = session.feed(max_new_tokens=request.max_tokens, prompt_logprobs=request.prompt_logprobs, on_chunk=check)
        return session, logits, cached

    def _decode(self, session: Any, logits: Any, request: GenRequest, choice: int, on_token: Callable[[str], None]) -> Any:
        from omnikv.decoding.generation import SamplingParams

        params = SamplingParams(
            max_new_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            min_p=request.min_p,
            repetition_penalty=request.repetition_penalty,
            min_tokens=request.min_tokens,
            ignore_eos=request.ignore_eos,
            seed=request.choice_seed(choice),
            stop=request.stop,
            logprobs=request.logprobs,
            skip_special_tokens=request.skip_special_tokens,
        )
        sink = getattr(on_token, "logprob", None)  # streamed logprobs (a scheduler's TokenSink)
        on_logprob = (lambda lp: sink(self._entries([lp])[0])) if sink is not None and request.logprobs is not None else None
        return session.decode(logits, params, on_token=on_token, prompt_tokens=len(request.prompt_ids), on_logprob=on_logprob)

    @staticmethod
    def _fork(base: Any, logits: Any, prefill: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any]:
        try:
            return base.fork(), logits
        except Exception as exc:  # e.g. a cache holding device streams: correct, only slower
            log.warning("cannot copy the prefilled cache (%s); prefilling again for this choice", exc)
            return prefill()

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _entries(self, rows: Any) -> tuple[LogprobEntry, ...]:
        return tuple(
            LogprobEntry(self._token_text(r.token_id), r.token_id, r.logprob, tuple((self._token_text(t), t, lp) for t, lp in r.top)) for r in rows
        )

    def batch_key(self, request: GenRequest) -> Hashable | None:
        if self.max_batch_size <= 1 or not request.plain or (request.temperature > 0 and request.seed is not None):
            return None  # a seeded answer must not depend on its batch neighbours
        if self.prefix_cache is not None and self.prefix_cache.match(request.prompt_ids, request.cache_salt):
            return None  # reusing a stored prefix beats batching it with a full prefill
        return ("greedy",) if request.temperature == 0 else ("sample", request.temperature, request.top_p)

    def generate_batch(self, requests: list[GenRequest], on_tokens: list[Callable[[str], None]]) -> list[EngineResult | BaseException]:
        from omnikv.decoding.generation import eos_ids
        from omnikv.server.batching import generate_batch

        results: list[EngineResult | BaseException | None] = [None] * len(requests)
        ok: list[int] = []
        for i, r in enumerate(requests):  # a bad row is refused alone; the others still run
            try:
                self._check_ids(r)
                ok.append(i)
            except InputError as exc:
                results[i] = exc
        if ok:
            eos = eos_ids(self.model, self.tokenizer)
            pad = getattr(self.tokenizer, "pad_token_id", None)
            if pad is None:
                pad = min(eos) if eos else 0
            done = generate_batch(self.model, self.tokenizer, self.method, [requests[i] for i in ok], [on_tokens[i] for i in ok], pad_id=pad, eos=eos)
            for i, res in zip(ok, done):
                results[i] = res
        return [r for r in results if r is not None]

    def _check_ids(self, request: GenRequest) -> None:
        # Token-id prompts come straight from clients: an id outside the vocabulary would fail deep
        # inside the embedding lookup, so refuse it here with a message that says what is wrong.
        vocab = self.model.get_input_embeddings().num_embeddings
        bad = next((t for t in request.prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InputError(f"prompt token id {bad} is outside this model's vocabulary (0..{vocab - 1})")
