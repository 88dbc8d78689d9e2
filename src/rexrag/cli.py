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


def main(argv: list[str] | None = None) -> int:
    from rexrag.errors import UserError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"rexrag {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
