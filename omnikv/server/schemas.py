"""Request bodies of the OpenAI-compatible endpoints (pydantic, strict types).

Types are strict ("5" is not an int, "true" is not a bool) so a client bug surfaces as a 400 naming
the field instead of silently coerced values. Unknown fields are ignored, as OpenAI clients send
extras (user, metadata, ...). Parameters the server knows but cannot honour (`logit_bias`, `tools`,
`response_format`, ...) are refused with a 400 naming the field whenever they would change the
answer; their neutral values (null, {}, [], {"type": "text"}) are accepted.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from omnikv.server.api_errors import APIError

# vLLM has no limit; lm-eval sends a task's `until` strings plus the EOS string. Bounded so that
# matching stays cheap per token (it scans every stop string's prefixes).
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 512  # characters per stop string
MAX_N = 16  # continuations per prompt
MAX_PROMPTS = 64  # prompts in one completion request
MAX_LOGPROBS = 20  # alternatives per token (vLLM's default cap)


class _Strict(BaseModel):
    # allow_inf_nan=False: NaN / Infinity (which Python's JSON accepts) are refused as "not a
    # finite number" instead of failing a range check with a misleading message.
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    @model_validator(mode="after")
    def _content_needed(self) -> "Message":
        # Only an assistant turn may come without content (OpenAI: it had tool calls instead).
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content (a string or text parts), not null")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


# Values of refused parameters that ask for nothing beyond their None / false / {} / [] forms.
_ALSO_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "response_format": ({"type": "text"},),
    "length_penalty": (1, 1.0),  # beam search only
    "priority": (0,),
}
# Parameters whose default is true: only that (or null) is neutral, false asks for something.
_NEUTRAL_ONLY: dict[str, tuple[Any, ...]] = {"spaces_between_special_tokens": (None, True)}


def _neutral(name: str, v: Any) -> bool:
    """True when an unsupported parameter's value asks for nothing (so it can be accepted)."""
    if name in _NEUTRAL_ONLY:
        return any(v is x for x in _NEUTRAL_ONLY[name])
    if v is None or v is False or v == {} or v == []:
        return True
    return any(v == x and type(v) is type(x) for x in _ALSO_NEUTRAL.get(name, ()))


# OpenAI and vLLM parameters this server does not implement; a non-neutral value is refused.
_REFUSED = (
    "logit_bias",
    "response_format",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "audio",
    "modalities",
    "prediction",
    "web_search_options",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
    "use_beam_search",
    "stop_token_ids",
    "bad_words",
    "allowed_token_ids",
    "prompt_logprobs",
    "truncate_prompt_tokens",
    "include_stop_str_in_output",
    # vLLM request fields beyond sampling
    "chat_template",
    "tools_in_template",
    "documents",
    "mm_processor_kwargs",
    "logits_processors",
    "length_penalty",
    "spaces_between_special_tokens",
    "priority",
    "prompt_embeds",
    "return_token_ids",
    "kv_transfer_params",
    "vllm_xargs",
    "guided_decoding_backend",
    "guided_whitespace_pattern",
)

# chat_template_kwargs keys that would change how the server renders or tokenizes, not the template.
_RESERVED_TEMPLATE_KWARGS = (
    "conversation", "messages", "tokenize", "add_generation_prompt", "continue_final_message", "return_dict",
    "return_assistant_tokens_mask", "tools", "documents", "chat_template", "padding", "truncation", "max_length",
    "return_tensors", "tokenizer_kwargs",
)


class _Sampling(_Strict):
    model: str | None = None  # optional here; must name the served model when given
    max_tokens: int | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)  # what torch generators accept
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's extra sampling parameters
    top_k: int = Field(default=0, ge=-1)  # 0 or -1 = off
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    # vLLM's output and caching fields
    skip_special_tokens: bool = True
    return_tokens_as_token_ids: bool = False
    cache_salt: str | None = Field(default=None, min_length=1, max_length=1024)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in _REFUSED:
                if name in data and not _neutral(name, data[name]):
                    # Raised as an APIError (not a ValueError) so the response can name the field.
                    raise APIError(400, f"'{name}' is not supported by this server; remove it.", param=name, code="unsupported_parameter")
        return data

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(items)}")
        if any(s == "" for s in items):
            raise ValueError("stop strings must be non-empty")
        if any(len(s) > MAX_STOP_CHARS for s in items):
            raise ValueError(f"a stop string may have at most {MAX_STOP_CHARS} characters")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _check_penalty(cls, v: float) -> float:
        if v != 0:
            raise ValueError("penalties are not supported; leave them at 0 (repetition_penalty is)")
        return v

    @model_validator(mode="after")
    def _check_combination(self) -> "_Sampling":
        if self.min_tokens and self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise APIError(400, f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens}).", param="min_tokens", code="invalid_value")
        return self

    def stop_tuple(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def top_logprobs_count(self) -> int | None:  # pragma: no cover - per endpoint
        raise NotImplementedError


JSONScalar = str | int | float | bool | None


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None  # newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    # vLLM's chat fields
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the last message stays open: an assistant prefill
    echo: bool = False  # put the open last message in front of the answer
    add_special_tokens: bool = False  # the tokenizer's BOS on top of the template's
    chat_template_kwargs: dict[str, JSONScalar | list[JSONScalar]] | None = None

    @model_validator(mode="after")
    def _check_chat_options(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true.", param="top_logprobs", code="invalid_value")
        if self.continue_final_message and self.add_generation_prompt:
            raise APIError(
                400, "continue_final_message needs add_generation_prompt: false (the last message is continued, no new turn starts).",
                param="continue_final_message", code="invalid_value",
            )
        for key in self.chat_template_kwargs or {}:
            if key in _RESERVED_TEMPLATE_KWARGS:
                raise APIError(400, f"chat_template_kwargs may not set '{key}'; use the request field of that name if there is one.",
                               param="chat_template_kwargs", code="invalid_value")
        return self

    def echo_text(self) -> str:
        """vLLM's chat echo: the answer starts with the last message when it is the assistant's own."""
        last = self.messages[-1]
        return last.text() if self.echo and last.role == "assistant" else ""

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


PromptType = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Sampling):
    # A string, a list of strings, a list of token ids, or a list of token-id lists.
    prompt: PromptType
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v: PromptType) -> PromptType:
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if not isinstance(v[0], int) and len(v) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request are allowed, got {len(v)}")
        return v

    @field_validator("best_of")
    @classmethod
    def _check_best_of(cls, v: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if v is not None and v != n:
            raise ValueError(f"best_of must equal n ({n}): ranking several samples is not supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _check_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix (insertion) is not supported")
        return v

    add_special_tokens: bool = True  # the tokenizer's BOS in front of a text prompt

    @model_validator(mode="after")
    def _check_stream(self) -> "CompletionRequest":
        if self.echo and self.stream:
            raise APIError(400, "echo is not supported with stream: true.", param="echo", code="invalid_value")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def top_logprobs_count(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "Give exactly one of 'prompt' or 'messages'.", param="prompt", code="invalid_value")
        if self.messages is not None and not self.messages:
            raise APIError(400, "'messages' must not be empty.", param="messages", code="invalid_value")
        return self


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


def parse_body(model: type[_Strict], body: bytes) -> _Strict:
    """Validate a raw JSON body; raise a 400 `APIError` that names the first bad field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise APIError(400, f"Request body is not valid JSON: {err['msg'].removeprefix('Invalid JSON: ')}.", code="invalid_json") from None
        if not err["loc"]:
            raise APIError(400, "Request body must be a JSON object.", code="invalid_json") from None
        param = _loc_name(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            text = f"Missing required parameter '{param}'."
        else:
            text = f"Invalid value for '{param}': {msg}."
        raise APIError(400, text, param=param, code="invalid_value" if err["type"] != "missing" else "missing_required_parameter") from None


def _loc_name(loc: tuple) -> str:
    # ("messages", 0, "content") -> "messages[0].content"; union branches ("str", "list[int]") dropped
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool", "none"}):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out
