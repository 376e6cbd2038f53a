"""`omnikv` command line. Each subcommand lives in its own module exposing `register(subparsers)`.

A module's `register` adds one `argparse` subparser and sets `func=handler` on it, where
`handler(args) -> int` returns the exit code. User errors are raised as `omnikv.errors.OmniKVError`
and printed here as one line, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order `omnikv --help` lists them. A missing module is skipped so that
# a partial install (e.g. without the server extra) still gives a working CLI for the rest.
_COMMAND_MODULES = (
    "generate",
    "chat",
    "compare",
    "demo",
    "models",
    "eval",
    "bench",
    "analyze",
    "calibrate",
    "plan",
    "serve",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omnikv",
        description="OmniKV long-context decoding: generate, compare, evaluate, benchmark, serve.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(f"omnikv.cli.cmd_{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"omnikv.cli.cmd_{name}":
                continue
            raise
        module.register(sub)
    from omnikv.cli.common import one_line_errors

    one_line_errors(parser)
    for subparser in sub.choices.values():
        one_line_errors(subparser)
    return parser


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None = None, prog: str = "omnikv") -> int:
    """Parse `argv` with `parser` and run the chosen subcommand's `func(args)`, returning its exit
    code. A user error (`OmniKVError`) is printed as one line, `PROG COMMAND: error: ...` (exit 2),
    Ctrl-C as `interrupted` (130); no subcommand prints the help (2). Shared with the vLLM
    plugin's CLI (integrations/vllm), so both report errors the same way."""
    from omnikv.errors import OmniKVError

    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except OmniKVError as exc:
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv, "omnikv")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
