"""`python -m omnikv_vllm generate|serve`: OmniKV under vLLM, with the flags of `omnikv generate`.

    python -m omnikv_vllm generate --model smollm2 --prompt-file p.txt --budget 128 --json
    python -m omnikv_vllm serve --model smollm2 --port 8000      # OpenAI server on 127.0.0.1

`--method full` runs stock vLLM attention (the plugin stays off); `--method omnikv` (default) the
OmniKV backend with the model's preset, `--budget` overriding its budget. Prompt ids are built as
`omnikv generate` builds them (chat template unless --no-chat; raw prompts get the BOS), so the two
commands decode the same prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from omnikv.budget import parse_budget
from omnikv.cli import run_command
from omnikv.errors import OmniKVError
from omnikv_vllm import models, settings

METHODS = ("omnikv", "full")


def cpu_env_defaults(environ: dict[str, str] | None = None, tensor_parallel: int = 1) -> dict[str, str]:
    """vLLM's CPU knobs this machine needs, unless the user set them: bind the OpenMP threads to
    the cores this process may use (none reserved; with tensor parallelism one `|`-separated group
    per worker, cores shared round-robin when there are fewer cores than workers), and a 1 GiB KV
    cache (enough for 8K tokens of the embedded models)."""
    env = os.environ if environ is None else environ
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if tensor_parallel > 1:
        per = max(1, len(cores) // tensor_parallel)
        groups = [cores[(i * per) % len(cores):][:per] for i in range(tensor_parallel)]
        bind = "|".join(",".join(map(str, g)) for g in groups)
    else:
        bind = ",".join(map(str, cores))
    defaults = {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": bind,
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }
    return {k: v for k, v in defaults.items() if k not in env}


def method_env(method: str, budget: int | float | None) -> dict[str, str]:
    """Environment that turns the plugin on (omnikv) or off (full), for vLLM's spawned processes."""
    if method == "full":
        return {settings.ENABLE_ENV: "0", settings.CONFIG_ENV: ""}
    overrides = {} if budget is None else {"budget": budget}
    return {settings.ENABLE_ENV: "1", settings.CONFIG_ENV: json.dumps(overrides) if overrides else ""}


def _budget(text: str) -> int | float:
    try:
        return parse_budget(text)
    except OmniKVError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="embedded model (gemma3, smollm2) or a checkpoint directory")
    p.add_argument("--method", choices=METHODS, default="omnikv",
                   help="omnikv (default): the OmniKV backend; full: vLLM's own attention")
    p.add_argument("--budget", type=_budget, default=None,
                   help="prompt tokens a sparse layer attends to (int) or a fraction (float in (0, 1]); "
                   "default: the model's preset")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="model dtype (default float32, as `omnikv generate` on CPU)")
    p.add_argument("--max-model-len", type=_positive, default=8192, help="context length (default 8192)")
    p.add_argument("--tensor-parallel-size", type=_positive, default=1, metavar="N",
                   help="vLLM workers the model is split across (its heads must divide by N; default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m omnikv_vllm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    g = sub.add_parser("generate", help="greedy-decode one prompt with vLLM (offline LLM)")
    _common(g)
    g.add_argument("prompt", nargs="?", default=None, help="the prompt text ('-' or nothing: stdin)")
    g.add_argument("--prompt-file", default=None, metavar="FILE", help="read the prompt from a UTF-8 text file")
    g.add_argument("--chat", default=None, action=argparse.BooleanOptionalAction,
                   help="wrap the prompt in the chat template (default: when the tokenizer has one)")
    g.add_argument("--max-new-tokens", type=_positive, default=256, metavar="N", help="most tokens (default 256)")
    g.add_argument("--json", action="store_true", help="print one JSON object (text, token_ids, ...)")
    g.set_defaults(func=run_generate)
    s = sub.add_parser("serve", help="vLLM's OpenAI server on 127.0.0.1 with the OmniKV backend")
    _common(s)
    s.add_argument("--port", type=_positive, default=8000)
    s.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more arguments for vLLM's api_server")
    s.set_defaults(func=run_serve)
    return parser


# -- prompts -------------------------------------------------------------------------------------
def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is not None and args.prompt not in (None, "-"):
        raise OmniKVError("give the prompt as an argument or with --prompt-file, not both")
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise OmniKVError(f"--prompt-file {path} does not exist")
        text = path.read_text(encoding="utf-8")
    elif args.prompt not in (None, "-"):
        text = args.prompt
    else:
        text = sys.stdin.read()
    if not text.strip():
        raise OmniKVError("the prompt is empty")
    return text


def encode_prompt(tokenizer: Any, text: str, chat: bool | None) -> tuple[list[int], bool]:
    """Ids as `omnikv generate` makes them: the chat template (it writes its own BOS) rendered as
    text then encoded without special tokens, or the raw text with the tokenizer's BOS."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise OmniKVError("--chat: this model has no chat template (a base model); drop --chat")
    use_chat = has_template if chat is None else bool(chat)
    if use_chat:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"]), True
    return list(tokenizer(text, add_special_tokens=True)["input_ids"]), False


def eos_ids(model_dir: Path, tokenizer: Any) -> list[int]:
    """EOS ids of the generation config and the tokenizer (the library stops on the same set)."""
    ids: set[int] = set()
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            ids.update(eos if isinstance(eos, list) else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def without_stop(token_ids: list[int], stop_ids: list[int]) -> list[int]:
    """vLLM returns the EOS that ended a completion; `omnikv generate` does not count it."""
    ids = list(token_ids)
    return ids[:-1] if ids and ids[-1] in stop_ids else ids


def claim_stdout() -> TextIO:
    """The process's stdout as a file of its own; descriptor 1 then points at stderr.

    vLLM logs INFO lines to stdout, from this process (also at exit) and from the engine process it
    spawns (which inherits descriptor 1), so `generate --json | jq` would read logs before the JSON.
    Moving the descriptor, not `sys.stdout`, is what reaches the children and C-level writes; the
    result is written to the returned file, which nothing else holds.
    """
    sys.stdout.flush()
    result = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    return result


# -- engine --------------------------------------------------------------------------------------
def build_llm(model_dir: Path, *, method: str, budget: int | float | None, dtype: str = "float32",
              max_model_len: int = 8192, tensor_parallel_size: int = 1, **engine_kwargs: Any):
    """A `vllm.LLM` with the OmniKV backend on (method omnikv) or off (full). The environment is
    set before vLLM starts its engine process, which reads it."""
    os.environ.update(cpu_env_defaults(tensor_parallel=tensor_parallel_size))
    os.environ.update(method_env(method, budget))
    from vllm import LLM

    return LLM(model=str(model_dir), dtype=dtype, enforce_eager=True, max_model_len=max_model_len, seed=0,
               tensor_parallel_size=tensor_parallel_size, **engine_kwargs)


def greedy(llm: Any, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int]) -> list[Any]:
    """Greedy completions of token-id prompts, in order."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=stop_ids)
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)


def run_generate(args: argparse.Namespace) -> int:
    text = read_prompt(args)
    model_dir = models.resolve(args.model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids, chat = encode_prompt(tokenizer, text, args.chat)
    if len(ids) + 1 > args.max_model_len:
        raise OmniKVError(f"the prompt is {len(ids)} tokens but --max-model-len is {args.max_model_len}")
    result = claim_stdout()  # stdout carries the result alone; vLLM's logs go to stderr
    llm = build_llm(model_dir, method=args.method, budget=args.budget, dtype=args.dtype,
                    max_model_len=args.max_model_len, tensor_parallel_size=args.tensor_parallel_size)
    stop_ids = eos_ids(model_dir, tokenizer)
    start = time.perf_counter()
    out = greedy(llm, [ids], args.max_new_tokens, stop_ids)[0].outputs[0]
    seconds = time.perf_counter() - start
    token_ids = without_stop(out.token_ids, stop_ids)
    if not args.json:
        print(out.text, file=result, flush=True)
        return 0
    print(json.dumps({
        "text": out.text,
        "token_ids": token_ids,
        "prompt_tokens": len(ids),
        "generated_tokens": len(token_ids),
        "finish_reason": "stop" if out.finish_reason == "stop" else "length",
        "seconds": round(seconds, 4),
        "method": args.method,
        "budget": args.budget,
        "model": args.model,
        "chat": chat,
        "dtype": args.dtype,
        "engine": "vllm",
    }), file=result, flush=True)
    return 0


def serve_command(args: argparse.Namespace, model_dir: Path) -> list[str]:
    extra = [a for a in (args.extra or []) if a != "--"]
    if any(a == "--host" or a.startswith("--host=") for a in extra):
        raise OmniKVError("serve binds 127.0.0.1 only; drop --host")
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", args.model, "--host", "127.0.0.1", "--port", str(args.port),
            "--dtype", args.dtype, "--enforce-eager", "--max-model-len", str(args.max_model_len),
            "--tensor-parallel-size", str(args.tensor_parallel_size), *extra]


def run_serve(args: argparse.Namespace) -> int:
    model_dir = models.resolve(args.model)
    env = dict(os.environ)
    env.update(cpu_env_defaults(env, tensor_parallel=args.tensor_parallel_size))
    env.update(method_env(args.method, args.budget))
    cmd = serve_command(args, model_dir)
    print("omnikv_vllm serve: " + " ".join(cmd), file=sys.stderr, flush=True)
    # `vllm serve` fails on this build looking up the version of a package named `vllm`; the
    # module entry point does not.
    os.execve(sys.executable, cmd, env)
    return 0  # pragma: no cover


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv, "omnikv_vllm")
