"""Ports that test guests use to talk to the host harness (not part of a normal machine).

- `Checkpoint` (port 0x502): `outl(0x502, phase)` runs a host callback synchronously on the vCPU
  thread, with the guest paused: a sync point for tests (read the dirty log, inspect RAM...).
- `BenchSink` (port 0x510): `inl` returns the iteration count the host wants; each `outl` is one
  exit handled in Python and counted. The exits benchmark measures this path.
"""

from __future__ import annotations

from collections.abc import Callable


class Checkpoint:
    def __init__(self, callback: Callable[[int], None]) -> None:
        self._callback = callback

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self._callback(value)


class BenchSink:
    def __init__(self, iterations: int) -> None:
        self.iterations = iterations
        self.writes = 0

    def read(self, offset: int, size: int) -> int:
        return self.iterations

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes += 1
