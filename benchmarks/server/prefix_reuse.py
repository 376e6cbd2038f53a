"""Time to first token per turn of a conversation about a long document, prefix reuse on vs off.

Two `omnikv serve` apps share one loaded model in this process: one with a prefix store, one
without. Each turn is sent to both, one after the other (side by side: both see the same machine
load), as a streamed chat request; the time to the first content chunk is the TTFT. The answers
of both must be identical (greedy); `usage.prompt_tokens_details.cached_tokens` and the store's
bytes are recorded. Results go to OUT/prefix_reuse.json (rewritten after every turn) and
OUT/prefix_reuse.md.

    python benchmarks/server/prefix_reuse.py [--models smollm2,gemma3] [--tokens 7700] [--turns 4]
        [--method omnikv] [--max-tokens 32] [--out benchmarks/results/server-prefix-reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import time
from pathlib import Path

import httpx
import torch

from omnikv.methods import get_method
from omnikv.models import load_model
from omnikv.server import Engine, ServerThread, create_app

NAMES = ("Ana", "Bo", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lena")
THINGS = ("blue key", "red box", "green lamp", "old map", "silver coin", "paper kite", "brass bell", "glass jar")


def document(tokenizer, target_tokens: int) -> tuple[str, list[tuple[str, str, int]]]:
    """Made-up records (fixed seed) until the text has about `target_tokens` tokens."""
    rng = random.Random(0)
    lines, rows = [], []
    while True:
        who, what, room = rng.choice(NAMES), rng.choice(THINGS), rng.randint(100, 999)
        rows.append((who, what, room))
        lines.append(f"Record {len(rows)}: {who} keeps the {what} in room {room}.")
        if len(rows) % 5 == 0 and len(tokenizer("\n".join(lines), add_special_tokens=False)["input_ids"]) >= target_tokens:
            return "\n".join(lines), rows


def questions(rows: list[tuple[str, str, int]], turns: int) -> list[str]:
    picks = [rows[len(rows) * (k + 1) // (turns + 1)] for k in range(turns)]
    return [f"In which room does {who} keep the {what}? Answer with the room number." for who, what, _ in picks]


def ask(client: httpx.Client, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat request: its text, usage and time to the first content chunk."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, text, usage = None, "", None
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode()}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk["choices"]:
                piece = c["delta"].get("content") or ""
                if piece and ttft is None:
                    ttft = time.perf_counter() - t0
                text += piece
    total = time.perf_counter() - t0
    return {"text": text, "usage": usage, "ttft_s": ttft if ttft is not None else total, "total_s": total}


def run_model(name: str, args: argparse.Namespace, out: dict, save) -> None:
    lm = load_model(name)
    doc, rows = document(lm.tokenizer, args.tokens)
    qs = questions(rows, args.turns)
    on = Engine.from_loaded(lm, get_method(args.method), prefill_chunk_size=512, prefix_cache_bytes=args.cache_bytes)
    off = Engine.from_loaded(lm, get_method(args.method), prefill_chunk_size=512)
    runs = out.setdefault("runs", [])
    with ServerThread(create_app(on)) as a, ServerThread(create_app(off)) as b, \
            httpx.Client(base_url=a.url, timeout=3600) as ca, httpx.Client(base_url=b.url, timeout=3600) as cb:
        for client in (cb, ca):  # warm-up: the first request of a process pays one-off costs
            ask(client, [{"role": "user", "content": "Hello."}], 2)
        messages = [{"role": "user", "content": f"Document:\n{doc}\n\nQuestion: {qs[0]}"}]
        reply = ""
        for turn, q in enumerate(qs, start=1):
            if turn > 1:
                messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": q}]
            r_off = ask(cb, messages, args.max_tokens)
            r_on = ask(ca, messages, args.max_tokens)
            reply = r_on["text"]
            st = on.prefix_cache.stats()
            row = {
                "model": name, "method": args.method, "turn": turn, "prompt_tokens": r_on["usage"]["prompt_tokens"],
                "cached_tokens": r_on["usage"]["prompt_tokens_details"]["cached_tokens"],
                "ttft_off_s": round(r_off["ttft_s"], 3), "ttft_on_s": round(r_on["ttft_s"], 3),
                "speedup": round(r_off["ttft_s"] / r_on["ttft_s"], 2),
                "same_answer": r_on["text"] == r_off["text"], "store_bytes": st.bytes, "store_entries": st.entries,
                "answer": r_on["text"], "load": os.getloadavg()[0],
            }
            runs.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "answer"}), flush=True)
            save()


def markdown(out: dict) -> str:
    lines = [f"Prefix reuse, TTFT per turn ({out['machine']}; torch {out['torch']}; commit {out['commit']}; "
             f"load average at start {out['load_start']}, at end {out.get('load_end')})", "",
             "| Model | Turn | Prompt tokens | Cached tokens | TTFT reuse off (s) | TTFT reuse on (s) | Off / on | Same answer | Store (MiB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in out["runs"]:
        lines.append(f"| {r['model']} | {r['turn']} | {r['prompt_tokens']} | {r['cached_tokens']} | {r['ttft_off_s']:.2f} | "
                     f"{r['ttft_on_s']:.2f} | {r['speedup']:.1f}x | {'yes' if r['same_answer'] else 'NO'} | {r['store_bytes'] / 2**20:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2,gemma3")
    p.add_argument("--method", default="omnikv")
    p.add_argument("--tokens", type=int, default=7700, help="document tokens (about; with the questions and answers the last turn has ~8K)")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--cache-bytes", type=int, default=4 * 2**30)
    p.add_argument("--out", default="benchmarks/results/server-prefix-reuse")
    args = p.parse_args()
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or None
    out = {"command": "python benchmarks/server/prefix_reuse.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU fp32",
           "torch": torch.__version__, "commit": commit, "load_start": os.getloadavg()[0], "threads": torch.get_num_threads()}

    def save() -> None:
        (folder / "prefix_reuse.json").write_text(json.dumps(out, indent=1))
        (folder / "prefix_reuse.md").write_text(markdown(out))

    for name in args.models.split(","):
        run_model(name, args, out, save)
    out["load_end"] = os.getloadavg()[0]
    save()
    print(markdown(out))


if __name__ == "__main__":
    main()
