"""The `lorafleet` command line: `serve | sample | models | adapters | alias | rollback | eval | ...`.

Each area registers its subcommands from its own module (`cli/<area>.py`, a `register`
function taking the subparsers object); this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lorafleet.errors import LorafleetError

# Modules that contribute subcommands, in the order their commands appear in --help.
AREAS = ("lorafleet.cli.serve", "lorafleet.cli.sample", "lorafleet.cli.models", "lorafleet.cli.catalog",
         "lorafleet.cli.cookbook")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafleet", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in AREAS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue  # an area not built yet
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `key=value` after options: only commands that take free settings (cookbook)
        if not hasattr(args, "settings"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.settings += extra
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except LorafleetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
