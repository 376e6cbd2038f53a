"""Questions asked in turn about one prefilled document (the shared-context task).

The document is prefilled once (or forked from a shared prefill, omnikv.decoding.fork). Each question then
arrives token by token, as decode steps (`Session.step`), and its answer is decoded greedily; the
answer stays in the cache and the next question follows it, as in a chat about a document. So a
method that decides what to keep at the end of prefill (SnapKV's window, H2O's scores, StreamingLLM's
window) decides on the document alone, before any question is known - the setting where drop-free
selection should separate from eviction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from omnikv.errors import InputError
from omnikv.decoding.generation import GenerationResult, SamplingParams, Session
from omnikv.methods import Method


def ask_in_turn(
    model: Any,
    tokenizer: Any,
    method: Method,
    document_ids: Sequence[int],
    questions: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    shared: Any = None,
    prefill_chunk_size: int | None = None,
) -> list[GenerationResult]:
    """One `GenerationResult` per question, in the order asked."""
    if not questions or any(len(q) == 0 for q in questions):
        raise InputError("ask_in_turn needs at least one question, each of at least one token")
    if shared is not None:
        if shared.ids != list(document_ids):
            raise InputError("the shared prefill is of another document")
        session = shared.session(tokenizer, method, prefill_chunk_size=prefill_chunk_size)
    else:
        session = Session(model, tokenizer, method, prefill_chunk_size=prefill_chunk_size)
        session.append(document_ids)
    session.feed()  # the document (a fork: its tail); its last logits are not used
    results = []
    for q in questions:
        if len(q) > 1 or session.pending:  # (pending: the last answer's final token)
            session.step(list(q[:-1]))
        session.append(list(q[-1:]))  # generate() feeds the question's last token, then decodes
        results.append(session.generate(params))
    return results


def encode_question(tokenizer: Any, text: str) -> list[int]:
    """A question's tokens as they continue the conversation (no BOS)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
