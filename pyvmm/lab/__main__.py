"""`python -m pyvmm.lab run|shell ...`: the lab's commands without the `pyvmm` entry point."""

from __future__ import annotations

import argparse
import logging
import sys

from pyvmm.lab import cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyvmm")
    cli.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["lab", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(
        level=logging.INFO if args.lab_verbose else logging.WARNING,
        format="%(name)s: %(message)s",
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
