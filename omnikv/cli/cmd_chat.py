"""`omnikv chat`: multi-turn questions about one long document, which is read (prefilled) once.

One `omnikv.decoding.generation.Session` holds the conversation: the first turn feeds the document and the
first question; every later turn feeds only the new text (the previous answer's end, the new
question and the answer prompt). The per-turn stats line shows how many tokens each turn read.

Prompt layout:
  * models with a chat template: the document goes in the first user message
    ("Document:\\n...\\n\\nQuestion: q1"), later questions are plain user messages. Each turn's new
    text is the template rendering of the whole conversation minus what the cache already holds;
  * base models: "Document:\\n...\\n\\nQuestion: q1\\nAnswer:", then "\\n\\nQuestion: q2\\nAnswer:" ...
    Answers stop at a blank line or at a new "Question:" (base models continue the pattern).
"""

from __future__ import annotations

import argparse
import json
import sys
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
        description="Prefill --context-file once, then answer questions read from stdin (one per line; "
        "works with piped input). Every turn reads only its new tokens; the stats line after each answer "
        "says how many. Exit with /exit or end of input (Ctrl-D).",
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

    def turn_ids(self, question: str) -> list[int]:
        """Token ids to append for the next question (the document only on the first turn)."""
        first = not self.messages
        content = f"Document:\n{self.document}\n\nQuestion: {question}" if first else question
        self.messages.append({"role": "user", "content": content})
        if not self.chat:
            if first:
                return common.encode(self.tokenizer, f"{content}\nAnswer:", special=True)
            return common.encode(self.tokenizer, f"{self._gap}Question: {question}\nAnswer:", special=False)
        if first:
            return common.encode(self.tokenizer, common.chat_text(self.tokenizer, self.messages), special=False)
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
    for turn, question in enumerate(_questions(sys.stdin), start=1):
        ids = conv.turn_ids(question)
        common.check_fits(lm, session.total_tokens + len(ids), "the conversation" if turn > 1 else "the document")
        session.append(ids)
        new_tokens = len(session.pending)  # what this turn reads: the question (and, first, the document)
        stream = None
        if not args.json:
            def stream(piece: str) -> None:
                sys.stdout.write(piece)
                sys.stdout.flush()

        res = session.generate(common.sampling_params(args, stop=stops), on_token=stream,
                               progress=not (args.quiet or args.json))
        conv.record_answer(res)
        if args.json:
            row = common.result_dict(res)
            row.update(turn=turn, question=question, prefill_tokens=new_tokens,
                       context_tokens=res.prompt_tokens, chat=chat)
            print(json.dumps(row), flush=True)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        if not args.quiet:
            reread = "document + question" if turn == 1 else "document not re-read"
            print(f"[turn {turn}] read {new_tokens} new tokens ({reread}; {res.prompt_tokens} in context), "
                  f"prefill {res.prefill_seconds:.2f} s, {res.generated_tokens} tokens at "
                  f"{res.decode_tokens_per_second:.1f} tok/s, KV {common.human_bytes(res.stats.get('device_kv_bytes'))} "
                  f"on {device}, {common.human_bytes(res.stats.get('host_kv_bytes'))} on host",
                  file=sys.stderr)
    return 0
