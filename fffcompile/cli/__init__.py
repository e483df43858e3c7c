"""The fffcompile command line: thin over the API, one module per subcommand, heavy imports lazy.

Each subcommand module defines ``add_parser(subparsers)`` and ``run(args) -> int``. Exit codes:
0 success, 1 verification failed, 2 bad input or usage (one line, no traceback), 3 internal
error (traceback only with FFFCOMPILE_DEBUG=1).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

# Subcommand modules, in the order --help lists them.
SUBCOMMANDS: tuple[str, ...] = ("export", "inspect", "verify", "bench")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fffcompile", description="Compile Fast FeedForward soft trees into one fused descent op.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in SUBCOMMANDS:
        importlib.import_module(f"fffcompile.cli.{name}").add_parser(subparsers)
    return parser


def _version() -> str:
    from .. import __version__
    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    from ..errors import FFFCompileError, InternalError
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("fffcompile: interrupted", file=sys.stderr)
        return 130
    except FFFCompileError as error:
        if os.environ.get("FFFCOMPILE_DEBUG"):
            traceback.print_exc()
        print(f"fffcompile {args.command}: error: {error}", file=sys.stderr)
        return getattr(error, "exit_code", 2)
    except Exception as error:  # anything else is our fault: say so in one line
        if os.environ.get("FFFCOMPILE_DEBUG"):
            traceback.print_exc()
        print(f"fffcompile {args.command}: error: {InternalError(f'{type(error).__name__}: {error}')} "
              f"(set FFFCOMPILE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 3
