"""From validated request bodies to `GenRequest`s: prompt encoders, length limits, sampling fields.

The HTTP side checks what it can without the tokenizer (characters, token ids, max_tokens); the
worker thread, which owns the tokenizer, encodes each prompt and checks its length (`prepare`).
"""

from __future__ import annotations

from typing import Any, Callable

from omnikv.server.api_errors import APIError
from omnikv.server.protocol import ChatMessage, EngineLike, GenRequest
from omnikv.server.schemas import ChatCompletionRequest, CompletionRequest

GREEDY_BELOW_TEMPERATURE = 1e-5  # as omnikv.decoding.generation (kept here: this module imports no torch)
DEFAULT_CHAT_MAX_TOKENS = 256
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions

Encode = Callable[[EngineLike], list[int]]


class Limits:
    """The server's length limits. default_max_tokens None: per endpoint (completions 16, as
    OpenAI; chat 256), always capped by the context left."""

    def __init__(self, max_context: int | None, max_prompt_tokens: int | None, max_tokens_limit: int, default_max_tokens: int | None,
                 max_token_chars: int | None) -> None:
        self.max_context = max_context
        self.max_prompt_tokens = max_prompt_tokens
        self.max_tokens_limit = max_tokens_limit
        self.default_max_tokens = default_max_tokens
        token_limit = min((x for x in (max_context, max_prompt_tokens) if x is not None), default=None)
        # No prompt longer than this many characters can fit, so it is refused before anyone
        # tokenizes it (tokenizing megabytes would hold the single worker for seconds).
        self.max_prompt_chars = token_limit * max_token_chars if token_limit is not None and max_token_chars else None

    def default_for(self, req: Any) -> int:
        if self.default_max_tokens is not None:
            return self.default_max_tokens
        return DEFAULT_COMPLETION_MAX_TOKENS if isinstance(req, CompletionRequest) else DEFAULT_CHAT_MAX_TOKENS

    def check_chars(self, n_chars: int, param: str) -> None:
        if self.max_prompt_chars is not None and n_chars > self.max_prompt_chars:
            raise APIError(
                400,
                f"The prompt has {n_chars} characters: more than {self.max_prompt_chars}, so more tokens than this server accepts. Shorten the prompt.",
                param=param,
                code="prompt_too_long",
            )

    def check_max_tokens(self, max_tokens: int | None, echo: bool) -> None:
        lowest = 0 if echo else 1  # with echo, max_tokens 0 scores the prompt without generating
        if max_tokens is not None and not lowest <= max_tokens <= self.max_tokens_limit:
            raise APIError(
                400, f"Invalid value for 'max_tokens': {max_tokens}; it must be between {lowest} and {self.max_tokens_limit}.",
                param="max_tokens", code="invalid_value",
            )


# -- prompt encoders (run on the worker thread) ----------------------------------------------------
def chat_encoder(req: ChatCompletionRequest, limits: Limits) -> Encode:
    messages = [ChatMessage("system" if m.role == "developer" else m.role, m.text()) for m in req.messages]
    limits.check_chars(sum(len(m.content) for m in messages), "messages")
    options: dict[str, Any] = {}  # only what differs from the defaults: a minimal engine takes none
    if req.continue_final_message or not req.add_generation_prompt:
        options.update(add_generation_prompt=req.add_generation_prompt, continue_final_message=req.continue_final_message)
    if req.chat_template_kwargs:
        options["template_kwargs"] = dict(req.chat_template_kwargs)
    if req.add_special_tokens:
        options["add_special_tokens"] = True
    return lambda e: e.encode_chat(messages, **options)


def completion_encoders(req: CompletionRequest, limits: Limits, vocab_size: int | None) -> list[tuple[Encode, str | None]]:
    """(encoder, the prompt text to echo or None) per prompt."""
    prompts: list[tuple[Encode, str | None]] = []
    options = {} if req.add_special_tokens else {"add_special_tokens": False}
    for k, prompt in enumerate(req.prompts()):
        param = "prompt" if len(req.prompts()) == 1 else f"prompt[{k}]"
        if isinstance(prompt, str):
            limits.check_chars(len(prompt), param)
            prompts.append((lambda e, text=prompt: e.encode_prompt(text, **options), prompt))
        else:
            if not prompt:
                raise APIError(400, f"Invalid value for '{param}': a token-id prompt must not be empty.", param=param, code="empty_prompt")
            check_token_ids(vocab_size, prompt, param)
            prompts.append((lambda e, ids=prompt: list(ids), None))
    return prompts


def check_token_ids(vocab: int | None, ids: list[int], param: str) -> None:
    bad = next((t for t in ids if t < 0 or (vocab is not None and t >= vocab)), None)
    if bad is not None:
        upper = f"0..{vocab - 1}" if vocab is not None else ">= 0"
        raise APIError(400, f"Invalid value for '{param}': token id {bad} is outside this model's vocabulary ({upper}).", param=param, code="invalid_value")


# -- the worker-side step ----------------------------------------------------------------------------
def prepare(limits: Limits, prompts: list[Encode], req: Any) -> Callable[[EngineLike], list[GenRequest]]:
    """Build the worker-side step: tokenize (the tokenizer belongs to the worker thread) and check lengths."""

    def run(engine: EngineLike) -> list[GenRequest]:
        return [gen_request(limits, encode(engine), req, k if len(prompts) > 1 else None) for k, encode in enumerate(prompts)]

    return run


def gen_request(limits: Limits, ids: list[int], req: Any, k: int | None) -> GenRequest:
    """One prompt's `GenRequest`: its length checked, max_tokens resolved, sampling fields mapped."""
    n = len(ids)
    max_tokens = _budget(limits, n, req, "prompt" if k is None else f"prompt[{k}]")
    # top_p = 0 keeps only the most likely token, and a temperature too small to divide by
    # (< 1e-5, as vLLM) is the limit of sharpening: both are greedy decoding.
    greedy = req.top_p == 0 or req.temperature < GREEDY_BELOW_TEMPERATURE
    echo = bool(getattr(req, "echo", False)) and isinstance(req, CompletionRequest)
    logprobs = req.top_logprobs_count()
    return GenRequest(
        ids,
        max_tokens,
        0.0 if greedy else req.temperature,
        1.0 if req.top_p == 0 else req.top_p,
        req.seed,
        req.stop_tuple(),
        top_k=max(req.top_k, 0),
        min_p=req.min_p,
        repetition_penalty=req.repetition_penalty,
        min_tokens=min(req.min_tokens, max_tokens),
        ignore_eos=req.ignore_eos,
        n=req.n,
        logprobs=logprobs,
        prompt_logprobs=logprobs if echo and logprobs is not None else None,
        echo=echo,
        cache_salt=req.cache_salt,
        skip_special_tokens=req.skip_special_tokens,
    )


def _budget(limits: Limits, n: int, req: Any, param: str) -> int:
    """The completion's token budget for a prompt of n tokens; 400 when the prompt cannot fit."""
    if n == 0:
        raise APIError(400, "The prompt is empty.", param=param, code="empty_prompt")
    if limits.max_prompt_tokens is not None and n > limits.max_prompt_tokens:
        raise APIError(
            400, f"The prompt has {n} tokens; this server accepts at most {limits.max_prompt_tokens} (--max-prompt-tokens).", code="prompt_too_long"
        )
    ctx = limits.max_context
    if ctx is not None and n >= ctx:
        raise APIError(
            400, f"This model's maximum context length is {ctx} tokens, but the prompt has {n} tokens. Shorten the prompt.", code="context_length_exceeded"
        )
    max_tokens = req.requested_max_tokens()
    if max_tokens is None:
        default = limits.default_for(req)
        return default if ctx is None else min(default, ctx - n)
    if ctx is not None and n + max_tokens > ctx:
        raise APIError(
            400,
            f"This model's maximum context length is {ctx} tokens, but {n + max_tokens} were requested ({n} in the prompt, {max_tokens} for the completion). Lower max_tokens or shorten the prompt.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return max_tokens
