"""The debug-exit port: a test guest ends the VM with an exit code (`outl(0x501, code)`).

Like QEMU's isa-debug-exit, but the process exit code is the written value's low byte as is.
"""

from __future__ import annotations

from collections.abc import Callable


class DebugExit:
    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self._on_exit(value & 0xFF)
