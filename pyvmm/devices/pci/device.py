"""A PCI function as seen by the guest: a type-0 config space with BARs.

Config space is bytes plus a write mask; BAR registers are sized by the usual all-ones probe. When
the guest moves a BAR or toggles memory/I/O decode in PCI_COMMAND, the function's BAR windows are
re-registered on the machine's MMIO / port buses by the `PciBus` it sits on. A subclass handles
accesses to its trapped BARs in `bar_read` / `bar_write`, and adds capabilities (MSI-X,
vendor-specific) with `add_capability` (see pyvmm.devices.pci.capability).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyvmm.devices.pci.capability import Capability, CapabilityList

if TYPE_CHECKING:
    from pyvmm.devices.pci.bus import PciBus

PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_HEADER_TYPE = 0x0E
PCI_BASE_ADDRESS_0 = 0x10
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D

PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_COMMAND_INTX_DISABLE = 0x400

PCI_BASE_ADDRESS_SPACE_IO = 0x1
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x4
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x8

CONFIG_SPACE_SIZE = 256
PCIE_CONFIG_SPACE_SIZE = 4096
NUM_BARS = 6


class BarKind(enum.Enum):
    IO = "io"
    MEM32 = "mem32"
    MEM64 = "mem64"


@dataclass(frozen=True)
class Bar:
    index: int
    kind: BarKind
    size: int
    prefetchable: bool = False

    @property
    def flag_bits(self) -> int:
        if self.kind is BarKind.IO:
            return PCI_BASE_ADDRESS_SPACE_IO
        bits = PCI_BASE_ADDRESS_MEM_TYPE_64 if self.kind is BarKind.MEM64 else 0
        return bits | (PCI_BASE_ADDRESS_MEM_PREFETCH if self.prefetchable else 0)


@dataclass
class PciFunctionState:
    """A function's config space: BAR addresses, command register, capabilities' registers."""

    config: bytes


class PciFunction:
    """Config space and BARs of one PCI function; subclass for a device."""

    def __init__(
        self,
        vendor_id: int,
        device_id: int,
        class_code: int,
        *,
        revision: int = 0,
        bars: tuple[Bar, ...] = (),
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        name: str = "",
    ) -> None:
        self.name = name or type(self).__name__
        self.config = bytearray(PCIE_CONFIG_SPACE_SIZE)
        self.wmask = bytearray(PCIE_CONFIG_SPACE_SIZE)
        self.bars: dict[int, Bar] = {}
        self.capabilities = CapabilityList(self.config, self.wmask)
        self.bus: PciBus | None = None
        self.devfn = -1
        self._set16(PCI_VENDOR_ID, vendor_id)
        self._set16(PCI_DEVICE_ID, device_id)
        self.config[PCI_REVISION_ID] = revision
        self.config[PCI_CLASS_PROG : PCI_CLASS_PROG + 3] = class_code.to_bytes(3, "little")
        self._set16(PCI_SUBSYSTEM_VENDOR_ID, subsystem_vendor_id)
        self._set16(PCI_SUBSYSTEM_ID, subsystem_id)
        self._set16(
            PCI_COMMAND,
            0,
            wmask=PCI_COMMAND_IO
            | PCI_COMMAND_MEMORY
            | PCI_COMMAND_MASTER
            | PCI_COMMAND_INTX_DISABLE,
        )
        self.wmask[PCI_INTERRUPT_LINE] = 0xFF
        for bar in bars:
            self._add_bar(bar)

    def _set16(self, offset: int, value: int, *, wmask: int = 0) -> None:
        struct.pack_into("<H", self.config, offset, value)
        struct.pack_into("<H", self.wmask, offset, wmask)

    def _add_bar(self, bar: Bar) -> None:
        if bar.size & (bar.size - 1) or bar.size < (4 if bar.kind is BarKind.IO else 16):
            raise ValueError(f"BAR{bar.index} size {bar.size:#x} must be a power of two")
        self.bars[bar.index] = bar
        offset = PCI_BASE_ADDRESS_0 + 4 * bar.index
        mask = ~(bar.size - 1)
        struct.pack_into("<I", self.config, offset, bar.flag_bits)
        struct.pack_into(
            "<I",
            self.wmask,
            offset,
            mask & 0xFFFFFFFF & ~0xF if bar.kind is not BarKind.IO else mask & 0xFFFFFFFC,
        )
        if bar.kind is BarKind.MEM64:
            struct.pack_into("<I", self.wmask, offset + 4, (mask >> 32) & 0xFFFFFFFF)

    def add_capability(self, cap: Capability) -> int:
        """Append a capability to the list in config space; returns its offset."""
        return self.capabilities.add(cap)

    # the guest's view

    def config_read(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > len(self.config):
            return (1 << (8 * size)) - 1
        self.capabilities.before_read(offset, size)
        return int.from_bytes(self.config[offset : offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or offset + size > len(self.config):
            return
        old_command = self.command
        old_bars = {i: self.bar_address(i) for i in self.bars}
        for i in range(size):
            mask = self.wmask[offset + i]
            byte = (value >> (8 * i)) & 0xFF
            self.config[offset + i] = (self.config[offset + i] & ~mask) | (byte & mask)
        self.capabilities.after_write(offset, size)
        moved = any(self.bar_address(i) != addr for i, addr in old_bars.items())
        if self.bus is not None and (moved or self.command != old_command):
            self.bus.update_bar_mappings(self)

    @property
    def command(self) -> int:
        return struct.unpack_from("<H", self.config, PCI_COMMAND)[0]

    def bar_address(self, index: int) -> int:
        bar = self.bars[index]
        offset = PCI_BASE_ADDRESS_0 + 4 * index
        low = struct.unpack_from("<I", self.config, offset)[0]
        if bar.kind is BarKind.IO:
            return low & ~0x3
        address = low & ~0xF
        if bar.kind is BarKind.MEM64:
            address |= struct.unpack_from("<I", self.config, offset + 4)[0] << 32
        return address

    def set_bar_address(self, index: int, address: int) -> None:
        """Program a BAR (what firmware does before the guest runs)."""
        bar = self.bars[index]
        offset = PCI_BASE_ADDRESS_0 + 4 * index
        struct.pack_into("<I", self.config, offset, (address & 0xFFFFFFFF) | bar.flag_bits)
        if bar.kind is BarKind.MEM64:
            struct.pack_into("<I", self.config, offset + 4, address >> 32)

    def decodes(self, bar: Bar) -> bool:
        flag = PCI_COMMAND_IO if bar.kind is BarKind.IO else PCI_COMMAND_MEMORY
        return bool(self.command & flag)

    # BAR accesses (trapped); subclasses override

    def bar_read(self, index: int, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        pass

    # snapshot (a device with more state extends these)

    def state(self) -> PciFunctionState:
        return PciFunctionState(bytes(self.config))

    def restore(self, state: PciFunctionState) -> None:
        """Config space as saved, and the BAR windows where it puts them."""
        if len(state.config) != len(self.config):
            raise ValueError(f"{self.name}: saved config space has {len(state.config)} bytes")
        self.config[:] = state.config
        if self.bus is not None:
            self.bus.update_bar_mappings(self)
