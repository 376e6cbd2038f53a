"""Decode several requests together with `model.generate` over one cache of the method.

Prompts are left-padded into one (B, T) batch; the method's cache handles the padding (padding is
masked and never selected, see tests/test_omnikv_equivalence.py). Each row keeps its own token
budget, stop strings, EOS and client: a streamer sees every step's (B,) new tokens, and a stopping
criterion ends each row on its own. Only rows that share the sampling settings are batched together
(the engine's `batch_key`), since `generate` applies one temperature/top_p to the whole batch.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from omnikv.hf.compat import cache_kwargs
from omnikv.server.protocol import EngineResult, GenRequest
from omnikv.decoding.stops import StopMatcher


class _Row:
    """One request inside the batch: its tokens, incremental text and finish state."""

    def __init__(self, request: GenRequest, on_token: Callable[[str], None], tokenizer: Any, eos: set[int]) -> None:
        self.request = request
        self.on_token = on_token
        self.tokenizer = tokenizer
        self.eos = eos
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stops = StopMatcher(request.stop)  # only to know when to stop; the scheduler cuts the text
        self.finish: str | None = None
        self.ended_by_eos = False  # the EOS counts as an output token, as in omnikv.server.engine
        self.error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.finish is not None or self.error is not None

    def push(self, token: int) -> None:
        if self.done:
            return  # finished rows keep receiving padding until the whole batch ends
        if token in self.eos:
            self.finish = "stop"
            self.ended_by_eos = True
            return
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        # A trailing U+FFFD is an incomplete UTF-8 sequence: wait for the next token.
        self._emit(len(self.text.rstrip("\ufffd")))
        if self.stops.stopped:
            self.finish = "stop"
        elif len(self.ids) >= self.request.max_tokens:
            self.finish = "length"

    def close(self) -> None:
        if self.error is None and not self.stops.stopped:
            self._emit(len(self.text))

    def _emit(self, upto: int) -> None:
        if upto <= self.emitted or self.error is not None:
            return
        piece = self.text[self.emitted : upto]
        self.emitted = upto
        self.stops.feed(piece)
        try:
            self.on_token(piece)
        except BaseException as exc:  # this row's client went away: drop the row, keep the batch
            self.error = exc


class _Streamer:
    """`generate(streamer=...)`: first the prompt (B, T), then each step's new tokens (B,)."""

    def __init__(self, rows: list[_Row]) -> None:
        self.rows = rows
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        for row, token in zip(self.rows, value.view(-1).tolist()):
            row.push(int(token))

    def end(self) -> None:
        pass


class _RowsDone(StoppingCriteria):
    def __init__(self, rows: list[_Row]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.tensor([r.done for r in self.rows], dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def generate_batch(
    model: Any,
    tokenizer: Any,
    method: Any,
    requests: list[GenRequest],
    on_tokens: list[Callable[[str], None]],
    *,
    pad_id: int,
    eos: set[int],
) -> list[EngineResult | BaseException]:
    """Generate every request in one left-padded batch; see the module docstring."""
    device = next(model.parameters()).device
    width = max(len(r.prompt_ids) for r in requests)
    ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(requests), width), dtype=torch.long)
    for i, r in enumerate(requests):
        ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids, dtype=torch.long)
        mask[i, width - len(r.prompt_ids) :] = 1
    rows = [_Row(r, cb, tokenizer, eos) for r, cb in zip(requests, on_tokens)]
    max_new = max(r.max_tokens for r in requests)
    first = requests[0]
    sample = first.temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new,
        do_sample=sample,
        temperature=first.temperature if sample else None,
        top_p=first.top_p if sample else None,
        top_k=0 if sample else None,  # as omnikv.decoding.generation: no implicit top-k
        pad_token_id=pad_id,
        eos_token_id=sorted(eos) or None,
    )
    cache = method.make_cache(model)
    if hasattr(cache, "reserve"):
        cache.reserve(width + max_new)
    model.generate(
        ids.to(device),
        attention_mask=mask.to(device),
        generation_config=config,
        streamer=_Streamer(rows),
        stopping_criteria=StoppingCriteriaList([_RowsDone(rows)]),
        **cache_kwargs(cache),
    )
    stats = cache.stats() if hasattr(cache, "stats") else {}
    results: list[EngineResult | BaseException] = []
    for r, row in zip(requests, rows):
        row.close()
        if row.error is not None:
            results.append(row.error)
        else:
            tokens = len(row.ids) + row.ended_by_eos
            results.append(EngineResult(row.text, len(r.prompt_ids), tokens, "stop" if row.finish == "stop" else "length", dict(stats)))
    return results
