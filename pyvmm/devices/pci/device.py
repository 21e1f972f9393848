"""A PCI function as seen by the guest: a type-0 config space, its capabilities, and BARs that
the function maps itself.

Config space is 4 KiB of bytes with four masks over it, as QEMU keeps them:

- `wmask`: the bits a guest write may change;
- `w1cmask`: the bits a guest clears by writing 1 (the error bits of PCI_STATUS);
- `emulated`: the bits served from `config`; the others belong to the device behind the
  function (a passed-through device), read through `device_config_read` and written through
  `device_config_write`. An emulated function emulates every bit.

Standard capabilities sit in 0x40-0xFF, extended ones from 0x100 (see pyvmm.devices.pci.capability).

BARs: the guest programs a BAR's address and turns decoding on or off in PCI_COMMAND; each
time the result changes the function is told with `place_bar(index, address or None)`, and maps
the BAR itself (cloud-hypervisor's `move_bar`). By default it maps `bar_areas(index)`: pieces of
the BAR that are either trapped (accesses exit to `bar_read` / `bar_write`) or backed by host
memory (a DEVICE region in the address space: a KVM slot, no exits). The default is one trapped
area covering the BAR; a passed-through BAR is mostly host memory with trapped holes (MSI-X).
"""

from __future__ import annotations

import enum
import logging
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pyvmm.devices.pci.capability import (
    PCI_STATUS,
    Capability,
    CapabilityList,
    ExtendedCapability,
)
from pyvmm.machine.address_space import AddressSpaceError
from pyvmm.machine.bus import Bus, BusConflict
from pyvmm.machine.memory import MemoryRegion, RegionKind
from pyvmm.machine.state import StateError

if TYPE_CHECKING:
    from pyvmm.devices.pci.bus import PciBus

log = logging.getLogger(__name__)

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
# PCI_STATUS bits the guest clears by writing 1: parity, signalled/received aborts, SERR.
PCI_STATUS_W1C = 0xF900

PCI_BASE_ADDRESS_SPACE_IO = 0x1
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x4
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x8

CONFIG_SPACE_SIZE = 256
PCIE_CONFIG_SPACE_SIZE = 4096
NUM_BARS = 6


def bdf(devfn: int) -> str:
    """`00:03.0` for devfn 0x18 on bus 0."""
    return f"00:{devfn >> 3:02x}.{devfn & 7}"


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


@dataclass(frozen=True)
class BarArea:
    """A piece of a BAR: `size` bytes from `offset`, trapped (`host_addr` None) or backed by
    host memory at `host_addr` (page aligned, a memory BAR only)."""

    offset: int
    size: int
    host_addr: int | None = None


@dataclass
class PciFunctionState:
    """A function's config space: BAR addresses, command register, capabilities' registers."""

    VERSION: ClassVar[int] = 1

    config: bytes


class _BarWindow:
    """Bus adapter: forwards accesses in a trapped BAR area to its function."""

    def __init__(self, function: PciFunction, index: int, offset: int) -> None:
        self.function = function
        self.index = index
        self.offset = offset

    def read(self, offset: int, size: int) -> int:
        return self.function.bar_read(self.index, self.offset + offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.function.bar_write(self.index, self.offset + offset, size, value)


class PciFunction:
    """Config space and BARs of one PCI function; subclass for a device."""

    state_type: ClassVar[type] = PciFunctionState

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
        # What the bus's saved state names it by: the same on any machine built alike (a
        # passed-through function's name has its host device, which a restore may change).
        self.model = self.name
        self.config = bytearray(PCIE_CONFIG_SPACE_SIZE)
        self.wmask = bytearray(PCIE_CONFIG_SPACE_SIZE)
        self.w1cmask = bytearray(PCIE_CONFIG_SPACE_SIZE)
        self.emulated = bytearray(b"\xff" * PCIE_CONFIG_SPACE_SIZE)
        self.bars: dict[int, Bar] = {}
        self.capabilities = CapabilityList(self.config, self.wmask)
        self.extended_capabilities = CapabilityList(self.config, self.wmask, extended=True)
        self.bus: PciBus | None = None
        self.devfn = -1
        self._placed: dict[int, int] = {}  # BAR index -> where it is mapped now
        self._windows: dict[int, list[tuple[Bus, int]]] = {}  # its trapped areas on a bus
        self._regions: dict[tuple[int, int], MemoryRegion] = {}  # (BAR, offset) -> memory
        self._unmapped: set[tuple[int, int]] = set()  # areas that failed, warned about once
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
        struct.pack_into("<H", self.w1cmask, PCI_STATUS, PCI_STATUS_W1C)
        self.wmask[PCI_INTERRUPT_LINE] = 0xFF
        for bar in bars:
            self._add_bar(bar)

    @property
    def bdf(self) -> str:
        return bdf(self.devfn)

    def chosen_options(self) -> dict[str, Any]:
        """Options this function chose for itself (a random MAC address, say), as its kind's
        `create` takes them: the machine records them in its configuration, so that a machine
        built from that configuration (a restore, a migration's destination) is the same."""
        return {}

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

    def plugged(self) -> None:
        """The bus gave the function its slot (`devfn`, `bdf`) and its INTx line; BARs come
        next. A function wiring anything to its slot does it here."""

    def add_capability(self, cap: Capability, offset: int | None = None) -> int:
        """Append a capability to the right list in config space (at `offset`, or after the
        last); returns its offset."""
        if isinstance(cap, ExtendedCapability):
            return self.extended_capabilities.add(cap, offset)
        return self.capabilities.add(cap, offset)

    # the guest's view of config space

    def config_read(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > len(self.config):
            return (1 << (8 * size)) - 1
        self.capabilities.before_read(offset, size)
        self.extended_capabilities.before_read(offset, size)
        value = int.from_bytes(self.config[offset : offset + size], "little")
        emulated = int.from_bytes(self.emulated[offset : offset + size], "little")
        full = (1 << (8 * size)) - 1
        if emulated != full:
            value = (value & emulated) | (self.device_config_read(offset, size) & ~emulated & full)
        return value

    def config_write(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or offset + size > len(self.config):
            return
        old_command = self.command
        old_bars = {i: self.bar_address(i) for i in self.bars}
        forward = 0
        for i in range(size):
            pos = offset + i
            byte = (value >> (8 * i)) & 0xFF
            writable, clear = self.wmask[pos], self.w1cmask[pos]
            merged = (self.config[pos] & ~writable) | (byte & writable)
            self.config[pos] = merged & ~(byte & clear)
            forward |= ((writable | clear) & ~self.emulated[pos]) << (8 * i)
        if forward:
            self.device_config_write(offset, size, value, forward)
        self.capabilities.after_write(offset, size)
        self.extended_capabilities.after_write(offset, size)
        moved = any(self.bar_address(i) != addr for i, addr in old_bars.items())
        if moved or self.command != old_command:
            self.update_bars()

    # the device behind a function that does not emulate every bit (passthrough overrides)

    def device_config_read(self, offset: int, size: int) -> int:
        """The device's own config bytes, for the bits `emulated` leaves to it."""
        return (1 << (8 * size)) - 1

    def device_config_write(self, offset: int, size: int, value: int, mask: int) -> None:
        """A guest write reaching the device: only the bits in `mask` (writable and not
        emulated) are the guest's to change."""

    # BARs

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

    def update_bars(self) -> None:
        """Tell `place_bar` about every BAR whose decoded address changed."""
        if self.bus is None:
            return
        for index, bar in self.bars.items():
            address = self.bar_address(index)
            wanted = address if address and self.decodes(bar) else None
            if self._placed.get(index) != wanted:
                self.place_bar(index, wanted)

    def bar_areas(self, index: int) -> list[BarArea]:
        """How BAR `index` is mapped: by default one trapped area over all of it."""
        return [BarArea(0, self.bars[index].size)]

    def place_bar(self, index: int, address: int | None) -> None:
        """The guest put BAR `index` at `address` (None: not decoded). Maps `bar_areas`
        there: trapped areas on the port or MMIO bus, host memory as DEVICE regions of the
        address space (the same region each time, moved with its KVM slot when the BAR moves
        while decoded), inside the bus's memory windows only. A hostile guest may program
        overlapping BARs: what cannot be mapped stays unmapped, with a warning, as garbage
        decodes on real hardware."""
        assert self.bus is not None
        for bus, base in self._windows.pop(index, ()):
            bus.unregister(base)
        if address is None:
            self._placed.pop(index, None)
            for area in self.bar_areas(index):
                region = self._regions.get((index, area.offset))
                if region is not None and region.slot is not None:
                    self.bus.address_space.remove(region)
            return
        self._placed[index] = address
        bus = self.bus.pio if self.bars[index].kind is BarKind.IO else self.bus.mmio
        windows: list[tuple[Bus, int]] = []
        self._windows[index] = windows  # filled as they are registered, whatever fails later
        for area in self.bar_areas(index):
            where = address + area.offset
            region = None
            try:
                if area.host_addr is None:
                    window = _BarWindow(self, index, area.offset)
                    bus.register(
                        where, area.size, window, f"{self.name} BAR{index}+{area.offset:#x}"
                    )
                    windows.append((bus, where))
                    continue
                region = self._regions.get((index, area.offset))
                allowed = self.bus.memory_windows
                if not any(lo <= where and where + area.size <= hi for lo, hi in allowed):
                    raise AddressSpaceError(f"{where:#x} is outside the PCI memory windows")
                if region is None:
                    region = MemoryRegion(
                        RegionKind.DEVICE,
                        where,
                        area.size,
                        host_addr=area.host_addr,
                        name=f"{self.name} BAR{index}+{area.offset:#x}",
                    )
                    self._regions[index, area.offset] = region
                if region.slot is None:
                    region.gpa = where
                    self.bus.address_space.add(region)
                else:
                    self.bus.address_space.move(region, where)
            except (BusConflict, AddressSpaceError, OSError) as err:
                # once per area until it maps again: a guest may do this in a loop
                first = (index, area.offset) not in self._unmapped
                self._unmapped.add((index, area.offset))
                (log.warning if first else log.debug)(
                    "%s BAR%d area +%#x not mapped: %s", self.name, index, area.offset, err
                )
                if region is not None and region.slot is not None:
                    self.bus.address_space.remove(region)
            else:
                self._unmapped.discard((index, area.offset))

    def unplace_bars(self) -> None:
        for index in list(self._placed):
            self.place_bar(index, None)

    # BAR accesses (trapped); subclasses override

    def bar_read(self, index: int, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        pass

    # state (a device with more state has a state type of its own holding this one)

    def save(self) -> PciFunctionState:
        return PciFunctionState(bytes(self.config))

    def restore(self, state: PciFunctionState) -> None:
        self.restore_config(state)

    def check(self, state: PciFunctionState) -> None:
        self.check_config(state)

    def check_config(self, state: PciFunctionState) -> None:
        """The saved config space must be this function's: the same size, and the same in
        every bit the guest cannot write (IDs, BAR types, capability headers...)."""
        if len(state.config) != len(self.config):
            raise StateError(f"{self.name}: saved config space has {len(state.config)} bytes")

        def bits(data: bytes | bytearray) -> int:  # 4 KiB at once, not a loop over bytes
            return int.from_bytes(data, "little")

        fixed = ~(bits(self.wmask) | bits(self.w1cmask)) & bits(self.emulated)
        differs = (bits(state.config) ^ bits(self.config)) & fixed
        if differs:
            pos = ((differs & -differs).bit_length() - 1) // 8
            raise StateError(
                f"{self.name}: saved config space differs at {pos:#x} in bits the guest "
                "cannot write: it is another device's"
            )

    def restore_config(self, state: PciFunctionState) -> None:
        """Config space as saved, and the BARs mapped where it puts them."""
        self.check_config(state)
        self.config[:] = state.config
        self.update_bars()

    def close(self) -> None:
        """Unmap the BARs and release what the function holds (the bus calls this)."""
        if self.bus is not None:
            self.unplace_bars()
