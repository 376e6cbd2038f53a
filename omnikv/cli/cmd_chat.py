"""`omnikv chat`: multi-turn questions about one long document, which is read (prefilled) once,
before any question.

One `omnikv.decoding.generation.Session` holds the conversation. The document is prefilled as soon as
the model is loaded, before the first question is read; every question then arrives token by token,
as decode steps (`Session.step`, as the eval's shared-context task asks them), and its answer stays
in the cache for the next turn. So a method that decides what to keep when decoding starts (SnapKV,
H2O, StreamingLLM) decides on the document alone, as it would for a document cached ahead of the
questions; OmniKV keeps every token and selects again for each question. The per-turn stats line
shows how many tokens each turn read.

Prompt layout:
  * models with a chat template: the document goes in the first user message
    ("Document:\\n...\\n\\nQuestion: q1"; the document part up to "Question:" is what is
    prefilled first), later questions are plain user messages. Each turn's new text is the template
    rendering of the whole conversation minus what the cache already holds;
  * base models: "Document:\\n...\\n\\n", then "Question: q1\\nAnswer:", "\\n\\nQuestion: q2\\nAnswer:" ...
    Answers stop at a blank line or at a new "Question:" (base models continue the pattern).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from omnikv.cli import common
from omnikv.cli.common import add_command
from omnikv.errors import ConfigError

EXIT_COMMANDS = ("/exit", "/quit")
BASE_STOPS = ("\n\n", "\nQuestion:")


def register(subparsers) -> None:
    p = add_command(
        subparsers, "chat", run,
        help="ask several questions about a long document without re-reading it",
        description="Prefill --context-file once, before any question, then answer questions read from stdin "
        "(one per line; works with piped input). Every turn reads only its new tokens; the stats line after "
        "each answer says how many. Exit with /exit or end of input (Ctrl-D).",
    )
    p.add_argument("--context-file", required=True, metavar="FILE", help="the document (UTF-8 text)")
    p.add_argument("--chat", default=None, action=argparse.BooleanOptionalAction,
                   help="use the model's chat template (default: on when the tokenizer has one)")
    common.add_model_arguments(p)
    common.add_method_arguments(p)
    common.add_sampling_arguments(p, max_new_tokens=128)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per turn (question, answer, prefill_tokens, timings, KV bytes)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no stats lines on stderr")


class Conversation:
    """Turns the questions of a conversation into the token ids each turn must feed."""

    # Stands in for the last answer when the template is rendered, so that the text after it (the
    # template's end of turn, the new question, the answer prompt) can be cut out even when the
    # template rewrites answers (e.g. trims them).
    SENTINEL = "\u2063OMNIKV-ANSWER\u2063"

    def __init__(self, tokenizer, document: str, chat: bool) -> None:
        self.tokenizer = tokenizer
        self.document = document
        self.chat = chat
        self.messages: list[dict[str, str]] = []
        self._gap = "\n\n"  # base mode: text needed before the next "Question:"

    def document_ids(self) -> list[int]:
        """Token ids of everything before the first question: prefilled before any is asked."""
        if not self.chat:
            return common.encode(self.tokenizer, f"Document:\n{self.document}\n\n", special=True)
        return common.encode(self.tokenizer, self._first_turn()[0], special=False)

    def _first_turn(self) -> tuple[str, str]:
        """The first user turn rendered around where its question goes: (before, after)."""
        turn = [{"role": "user", "content": f"Document:\n{self.document}\n\n{self.SENTINEL}"}]
        text = common.chat_text(self.tokenizer, turn)
        if text.count(self.SENTINEL) != 1:
            raise ConfigError("this model's chat template rewrites the user's message, so the document cannot be "
                              "prefilled before the question; use --no-chat")
        before, after = text.split(self.SENTINEL)
        return before, after

    def turn_ids(self, question: str) -> list[int]:
        """Token ids to append for the next question (after `document_ids` on the first turn)."""
        first = not self.messages
        content = f"Document:\n{self.document}\n\nQuestion: {question}" if first else question
        self.messages.append({"role": "user", "content": content})
        if not self.chat:
            gap = "" if first else self._gap
            return common.encode(self.tokenizer, f"{gap}Question: {question}\nAnswer:", special=False)
        if first:
            return common.encode(self.tokenizer, f"Question: {question}{self._first_turn()[1]}", special=False)
        msgs = self.messages[:-2] + [{"role": "assistant", "content": self.SENTINEL}, self.messages[-1]]
        text = common.chat_text(self.tokenizer, msgs)
        if text.count(self.SENTINEL) != 1:
            raise ConfigError("this model's chat template drops earlier answers, so turns cannot be appended "
                              "to the cached conversation; use --no-chat")
        return common.encode(self.tokenizer, text.split(self.SENTINEL, 1)[1], special=False)

    def record_answer(self, res) -> None:
        """Remember the answer. The cache holds every generated token (a stop string included, the
        EOS token not)."""
        self.messages.append({"role": "assistant", "content": res.text})
        if not self.chat:
            full = self.tokenizer.decode(res.token_ids, skip_special_tokens=True)
            tail = full[len(res.text):] if full.startswith(res.text) else ""
            self._gap = "" if tail.endswith("\n\n") else "\n" if tail.endswith("\n") else "\n\n"


def _questions(stdin) -> Any:
    interactive = stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:
            return
        q = line.strip()
        if not q:
            continue
        if q in EXIT_COMMANDS:
            return
        yield q


def run(args: argparse.Namespace) -> int:
    document = common.read_text_file(args.context_file, "context file")
    if not document.strip():
        raise ConfigError(f"context file {args.context_file} is empty")
    method = common.build_method(args)
    common.sampling_params(args)  # validate before the slow load
    lm = common.load(args)
    chat = common.use_chat(args, lm)
    conv = Conversation(lm.tokenizer, document, chat)

    from omnikv.decoding.generation import Session

    session = Session(lm.model, lm.tokenizer, method, prefill_chunk_size=args.prefill_chunk_size)
    device = str(next(lm.model.parameters()).device)
    stops = () if chat else BASE_STOPS
    doc_ids = conv.document_ids()
    common.check_fits(lm, len(doc_ids), "the document")
    session.append(doc_ids)
    t0 = time.perf_counter()
    session.feed(progress=not (args.quiet or args.json))  # the document, before any question
    doc_s = time.perf_counter() - t0
    if not (args.quiet or args.json):
        print(f"[document] read {len(doc_ids)} tokens in {doc_s:.2f} s; ask your questions", file=sys.stderr)
    for turn, question in enumerate(_questions(sys.stdin), start=1):
        ids = conv.turn_ids(question)
        common.check_fits(lm, session.total_tokens + len(ids), "the conversation")
        new_tokens = len(session.pending) + len(ids)  # the question (and the last answer's final token)
        t0 = time.perf_counter()
        if new_tokens > 1:  # the question arrives after the cached document: as decode steps
            session.step(ids[:-1])
        session.append(ids[-1:])  # generate() feeds the last one, then decodes
        read_s = time.perf_counter() - t0
        stream = None
        if not args.json:
            def stream(piece: str) -> None:
                sys.stdout.write(piece)
                sys.stdout.flush()

        res = session.generate(common.sampling_params(args, stop=stops), on_token=stream)
        res.prefill_seconds += read_s
        conv.record_answer(res)
        if args.json:
            row = common.result_dict(res)
            row.update(turn=turn, question=question, prefill_tokens=new_tokens, context_tokens=res.prompt_tokens, chat=chat)
            if turn == 1:
                row.update(document_tokens=len(doc_ids), document_prefill_seconds=round(doc_s, 4))
            print(json.dumps(row), flush=True)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        if not args.quiet:
            print(f"[turn {turn}] read {new_tokens} new tokens (document not re-read; {res.prompt_tokens} in context) "
                  f"in {res.prefill_seconds:.2f} s, {res.generated_tokens} tokens at "
                  f"{res.decode_tokens_per_second:.1f} tok/s, KV {common.human_bytes(res.stats.get('device_kv_bytes'))} "
                  f"on {device}, {common.human_bytes(res.stats.get('host_kv_bytes'))} on host",
                  file=sys.stderr)
    return 0
