"""The ``rexrag`` command: one entry point, one module per subcommand.

Each subcommand lives in ``rexrag.commands.<name>`` and exposes ``add_parser(subparsers)`` which
registers its arguments and sets ``func``. Adding a subcommand = adding its module to COMMANDS.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rexrag import __version__

COMMANDS = ["index", "serve", "eval", "warmup", "train", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rexrag", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"rexrag {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"rexrag.commands.{name}").add_parser(sub)
    return parser


def quiet_libraries() -> None:
    """Our console shows our progress bars and messages; library bars and info logs stay out of it."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is first imported
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bars follow it


def main(argv: list[str] | None = None) -> int:
    from rexrag.errors import EngineError, UserError
    from rexrag.memory import bound_kernel_caches

    bound_kernel_caches()  # before the parser's imports load torch
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"rexrag {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except EngineError as exc:
        print(f"rexrag {args.command}: engine error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
