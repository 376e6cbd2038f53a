"""The real engine: a loaded model + tokenizer + KV method behind `EngineLike`.

Generation goes through `omnikv.generation.generate`, the same code path as the CLI and the eval,
so served outputs equal `omnikv generate` outputs for the same prompt and sampling settings.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable

from omnikv.errors import ConfigError, InputError
from omnikv.server.protocol import ChatMessage, EngineResult, GenRequest


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
    ) -> None:
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

    @classmethod
    def from_loaded(
        cls, loaded: Any, method: Any, *, name: str | None = None, prefill_chunk_size: int | None = None, max_batch_size: int = 1
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
        )

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def encode_chat(self, messages: list[ChatMessage]) -> list[int]:
        if self.has_chat_template:
            turns = [{"role": m.role, "content": m.content} for m in messages]
            # Render to text, then tokenize without extra specials: the template already places BOS
            # and turn markers where the model was trained to see them.
            text = self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        # No template (base models): a plain transcript that ends where the assistant speaks.
        text = "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"
        return self.encode_prompt(text)

    def generate(self, request: GenRequest, on_token: Callable[[str], None]) -> EngineResult:
        from omnikv.generation import SamplingParams, generate

        self._check_ids(request)
        params = SamplingParams(
            max_new_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=request.stop,
        )
        res = generate(
            self.model,
            self.tokenizer,
            list(request.prompt_ids),
            self.method,
            params,
            on_token=on_token,
            prefill_chunk_size=self.prefill_chunk_size,
        )
        finish = "stop" if res.finish_reason == "stop" else "length"
        return EngineResult(
            text=res.text,
            prompt_tokens=int(res.prompt_tokens),
            completion_tokens=int(res.generated_tokens),
            finish_reason=finish,
            stats=dict(res.stats or {}),
        )

    def batch_key(self, request: GenRequest) -> Hashable | None:
        if self.max_batch_size <= 1 or (request.temperature > 0 and request.seed is not None):
            return None  # a seeded answer must not depend on its batch neighbours
        return ("greedy",) if request.temperature == 0 else ("sample", request.temperature, request.top_p)

    def generate_batch(self, requests: list[GenRequest], on_tokens: list[Callable[[str], None]]) -> list[EngineResult | BaseException]:
        from omnikv.generation import eos_ids
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
