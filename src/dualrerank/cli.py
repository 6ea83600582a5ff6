"""The `dualrerank` command line: one entry point, one module per subcommand.

Each module in `dualrerank.commands` exposes `register(subparsers)`, which adds its
parser and sets `func(args) -> int`. Errors caused by the user (`DualRerankError`) are
printed as one line on stderr with exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from dualrerank import commands
from dualrerank.errors import DualRerankError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dualrerank",
        description="Generative list-wise reranking: AR teacher, NAR student, sequential "
        "knowledge distillation, the simulated world, offline evaluation and serving.",
    )
    from dualrerank import __version__

    parser.add_argument("--version", action="version", version=f"dualrerank {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        importlib.import_module(f"dualrerank.commands.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except DualRerankError as exc:
        print(f"dualrerank {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (`dualrerank ... | head`): stop quietly instead of a
        # traceback, and keep Python from failing again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        print(f"dualrerank {args.command}: error: output closed early (broken pipe)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
