"""Option values the commands share."""

from __future__ import annotations

import argparse

_SIZE_SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """'64M', '1G', '512K' or a plain number of MiB (as kvmtool's -m)."""
    value = text.strip().upper().removesuffix("B")
    scale = _SIZE_SUFFIXES.get(value[-1:], 0)
    digits = value[:-1] if scale else value
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 64M, 1G or 512K")
    return int(digits) * (scale or 1 << 20)


def add_host_moves(parser: argparse.ArgumentParser) -> None:
    """--vfio-host OLD=NEW, for a machine that comes from a snapshot or a migration."""
    parser.add_argument(
        "--vfio-host",
        action="append",
        default=[],
        type=parse_host_move,
        metavar="OLD=NEW",
        help="open the assigned device that was on host OLD (a PCI address or an mdev's UUID) "
        "on NEW instead, e.g. a second mdev of the same type (repeatable)",
    )


def parse_host_move(text: str) -> tuple[str, str]:
    old, _, new = text.partition("=")
    if not old or not new:
        raise argparse.ArgumentTypeError(f"bad --vfio-host {text!r}: use OLD=NEW")
    return old, new
