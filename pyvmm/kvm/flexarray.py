"""Buffers for structs that end in a C flexible array member (kvm_msrs, kvm_cpuid2, ...)."""

from __future__ import annotations

import ctypes
from functools import cache


@cache
def flexible(header: type[ctypes.Structure], entry: type, count: int) -> type[ctypes.Structure]:
    """A struct type made of `header` followed by `count` entries of type `entry`."""
    return type(
        f"{header.__name__}_{count}",
        (ctypes.Structure,),
        {"_fields_": [("header", header), ("entries", entry * count)]},
    )
