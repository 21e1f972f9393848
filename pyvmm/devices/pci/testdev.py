"""pyvmm's PCI test function: BARs of every kind, and one that is mostly host memory.

It exists so that guests and tests can exercise BAR assignment, sizing and moves, trapped BAR
accesses, and device memory mapped into the guest as a KVM slot the way a passed-through BAR
is: BAR4's first page is trapped (scratch registers), the rest is an anonymous host mapping
standing in for a device's memory, which the guest reads and writes with no exit. Its config
space has two extended capabilities (vendor-specific), for guests that walk them through ECAM.
IDs 0x5056:0x0001 ("PV") are pyvmm's own, not assigned to any hardware.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from pyvmm.devices.pci.capability import PCI_EXT_CAP_ID_VNDR, ExtendedCapability
from pyvmm.devices.pci.device import (
    Bar,
    BarArea,
    BarKind,
    PciFunction,
    PciFunctionState,
)
from pyvmm.kvm.mmap import PAGE_SIZE, Mapping
from pyvmm.machine.state import StateError

if TYPE_CHECKING:
    from pyvmm.machine.host import DeviceHost

TESTDEV_VENDOR = 0x5056
TESTDEV_DEVICE = 0x0001
CLASS_OTHER = 0xFF0000

MAPPED_BAR = 4
MAPPED_OFFSET = PAGE_SIZE  # BAR4: one trapped page, then device memory
BARS = (
    Bar(0, BarKind.MEM32, 0x1000),
    Bar(1, BarKind.IO, 0x100),
    Bar(2, BarKind.MEM64, 0x100000, prefetchable=True),
    Bar(MAPPED_BAR, BarKind.MEM32, 0x10000),
)
MAPPED_SIZE = BARS[-1].size - MAPPED_OFFSET
# Two vendor-specific extended capabilities, VSEC IDs 1 and 2, each 16 bytes: the extended
# header, the VSEC header (ID, revision 1, length 16), then pyvmm's vendor ID and the VSEC ID.
VSEC_IDS = (1, 2)
VSEC_LENGTH = 16


def _vsec_body(vsec_id: int) -> bytes:
    return struct.pack("<III", vsec_id | 1 << 16 | VSEC_LENGTH << 20, TESTDEV_VENDOR, vsec_id)


@dataclass
class PciTestDeviceState:
    VERSION: ClassVar[int] = 1

    function: PciFunctionState
    scratch: dict[int, bytes]
    device_memory: bytes


class PciTestDevice(PciFunction):
    """Each BAR is backed by a small scratch area (what the guest writes it reads back);
    BAR4 has device memory after its first page."""

    SCRATCH = 0x100
    state_type: ClassVar[type] = PciTestDeviceState

    def __init__(self) -> None:
        super().__init__(TESTDEV_VENDOR, TESTDEV_DEVICE, CLASS_OTHER, bars=BARS, name="pci-testdev")
        self.scratch = {bar.index: bytearray(self.SCRATCH) for bar in BARS}
        for vsec_id in VSEC_IDS:
            self.add_capability(ExtendedCapability(PCI_EXT_CAP_ID_VNDR, 1, _vsec_body(vsec_id)))
        self.device_memory = Mapping(MAPPED_SIZE)

    def bar_areas(self, index: int) -> list[BarArea]:
        if index != MAPPED_BAR:
            return super().bar_areas(index)
        return [
            BarArea(0, MAPPED_OFFSET),
            BarArea(MAPPED_OFFSET, MAPPED_SIZE, self.device_memory.addr),
        ]

    def bar_read(self, index: int, offset: int, size: int) -> int:
        area = self.scratch[index]
        if offset + size > len(area):
            return (1 << (8 * size)) - 1
        return int.from_bytes(area[offset : offset + size], "little")

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        area = self.scratch[index]
        if offset + size <= len(area):
            area[offset : offset + size] = value.to_bytes(size, "little")

    def save(self) -> PciTestDeviceState:
        scratch = {index: bytes(area) for index, area in self.scratch.items()}
        return PciTestDeviceState(super().save(), scratch, bytes(self.device_memory.view))

    def check(self, state: PciTestDeviceState) -> None:
        self.check_config(state.function)
        sizes = {index: len(data) for index, data in state.scratch.items()}
        if sizes != {index: self.SCRATCH for index in self.scratch}:
            raise StateError(f"{self.name}: saved scratch areas {sizes} are not this device's")
        if len(state.device_memory) != MAPPED_SIZE:
            raise StateError(
                f"{self.name}: saved device memory has {len(state.device_memory)} bytes"
            )

    def restore(self, state: PciTestDeviceState) -> None:
        self.check(state)
        self.restore_config(state.function)
        for index, data in state.scratch.items():
            self.scratch[index][:] = data
        self.device_memory.view[:] = state.device_memory

    def close(self) -> None:
        super().close()
        self.device_memory.close()


def create(machine: DeviceHost) -> PciTestDevice:
    """The PCI test function (device kind "pci-testdev")."""
    return PciTestDevice()
