"""The hardware-reduced ACPI sleep registers (FADT SLEEP_CONTROL_REG / SLEEP_STATUS_REG).

Linux powers off by writing SLP_TYPx(S5) << 2 | SLP_EN to the 8-bit sleep control register at
port 0x3C0 (see pyvmm.machine.acpi). Any other sleep state is ignored: pyvmm has no suspend.
"""

from __future__ import annotations

from collections.abc import Callable

SLEEP_CONTROL_OFFSET = 0
SLP_EN = 0x20
SLP_TYP_SHIFT = 2
SLP_TYP_MASK = 0x7


class AcpiSleepRegisters:
    """Registered on two ports: sleep control (+0) and sleep status (+1)."""

    def __init__(self, on_poweroff: Callable[[], None], s5_sleep_type: int) -> None:
        self._on_poweroff = on_poweroff
        self._s5 = s5_sleep_type

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != SLEEP_CONTROL_OFFSET or not value & SLP_EN:
            return
        if (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == self._s5:
            self._on_poweroff()
