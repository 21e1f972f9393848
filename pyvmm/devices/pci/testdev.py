"""pyvmm's PCI test function: BARs of every kind with scratch registers behind them.

It exists so that guests and tests can exercise BAR assignment, BAR sizing and moves, and trapped
BAR accesses. IDs 0x5056:0x0001 ("PV") are pyvmm's own, not assigned to any hardware.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyvmm.devices.pci.device import Bar, BarKind, PciFunction, PciFunctionState

TESTDEV_VENDOR = 0x5056
TESTDEV_DEVICE = 0x0001
CLASS_OTHER = 0xFF0000

BARS = (
    Bar(0, BarKind.MEM32, 0x1000),
    Bar(1, BarKind.IO, 0x100),
    Bar(2, BarKind.MEM64, 0x100000, prefetchable=True),
)


@dataclass
class PciTestDeviceState(PciFunctionState):
    scratch: dict[int, bytes]


class PciTestDevice(PciFunction):
    """Each BAR is backed by a small scratch area: what the guest writes it reads back."""

    SCRATCH = 0x100

    def __init__(self) -> None:
        super().__init__(TESTDEV_VENDOR, TESTDEV_DEVICE, CLASS_OTHER, bars=BARS, name="pci-testdev")
        self.scratch = {bar.index: bytearray(self.SCRATCH) for bar in BARS}

    def bar_read(self, index: int, offset: int, size: int) -> int:
        area = self.scratch[index]
        if offset + size > len(area):
            return (1 << (8 * size)) - 1
        return int.from_bytes(area[offset : offset + size], "little")

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        area = self.scratch[index]
        if offset + size <= len(area):
            area[offset : offset + size] = value.to_bytes(size, "little")

    def state(self) -> PciTestDeviceState:
        scratch = {index: bytes(area) for index, area in self.scratch.items()}
        return PciTestDeviceState(bytes(self.config), scratch)

    def restore(self, state: PciFunctionState) -> None:
        if not isinstance(state, PciTestDeviceState) or state.scratch.keys() != self.scratch.keys():
            raise ValueError(f"{self.name}: the state is not of a PCI test device")
        super().restore(state)
        for index, data in state.scratch.items():
            self.scratch[index][:] = data
