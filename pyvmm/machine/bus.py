"""Address-space registries for port I/O and MMIO.

Devices register the ranges they decode; a vCPU exit is dispatched by lookup, so adding a device
never touches a central switch (the kvmtool way). A device implements `read(offset, size)` and
`write(offset, size, value)` where `offset` is relative to the start of its registered range.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass
from typing import Protocol


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


@dataclass(frozen=True)
class Range:
    base: int
    length: int
    device: BusDevice
    name: str

    @property
    def end(self) -> int:
        return self.base + self.length


class BusConflict(ValueError):
    """Two devices claimed overlapping ranges."""


class Bus:
    """Non-overlapping ranges, found by address. Lookups are cached per address."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._bases: list[int] = []
        self._ranges: list[Range] = []
        self._cache: dict[int, Range | None] = {}

    def register(self, base: int, length: int, device: BusDevice, name: str = "") -> None:
        if length <= 0:
            raise ValueError(f"{self.name} range for {name or device!r} has no length")
        new = Range(base, length, device, name or type(device).__name__)
        with self._lock:
            i = bisect.bisect_right(self._bases, base)
            for neighbour in self._ranges[max(i - 1, 0) : i + 1]:
                if neighbour.base < new.end and base < neighbour.end:
                    raise BusConflict(
                        f"{self.name} {base:#x}+{length:#x} ({new.name}) overlaps "
                        f"{neighbour.base:#x}+{neighbour.length:#x} ({neighbour.name})"
                    )
            self._bases.insert(i, base)
            self._ranges.insert(i, new)
            self._cache = {}

    def unregister(self, base: int) -> None:
        with self._lock:
            i = bisect.bisect_left(self._bases, base)
            if i == len(self._bases) or self._bases[i] != base:
                raise KeyError(f"nothing registered on {self.name} at {base:#x}")
            del self._bases[i]
            del self._ranges[i]
            self._cache = {}

    def find(self, addr: int) -> Range | None:
        """The range containing `addr`, or None."""
        try:
            return self._cache[addr]
        except KeyError:
            pass
        i = bisect.bisect_right(self._bases, addr) - 1
        found = None
        if i >= 0 and addr < self._ranges[i].end:
            found = self._ranges[i]
        if len(self._cache) < 4096:
            self._cache[addr] = found
        return found

    def ranges(self) -> list[Range]:
        return list(self._ranges)
