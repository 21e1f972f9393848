"""A minimal i8042 keyboard controller: only what guests use to reset the machine.

Linux's `reboot=k` and most test code write 0xFE (pulse reset line) to the command port 0x64.
Status reads say "no data, input buffer empty" so polling loops finish.
"""

from __future__ import annotations

from collections.abc import Callable

COMMAND_RESET = 0xFE
DATA_OFFSET = 0
COMMAND_OFFSET = 4


class I8042:
    """Registered on ports 0x60-0x64."""

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == COMMAND_OFFSET and value & 0xFF == COMMAND_RESET:
            self._on_reset()
