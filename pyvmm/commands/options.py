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
