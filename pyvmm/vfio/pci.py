"""A passed-through PCI function: the device's config space, virtualized, and its BARs.

The guest sees the device's identity and registers, but pyvmm decides what it may touch. The
rules, by config-space range (stricter than QEMU's hw/vfio/pci.c, which passes other
capabilities through):

- IDs, class, revision, subsystem IDs, cache line size, latency timer, interrupt pin (0 when
  VFIO offers no INTx): the device's, read-only (taken once at attach). The header type says
  single-function.
- Command register: the device's own (read live); the guest may write I/O and memory decode,
  bus mastering, parity and SERR reporting and INTx disable, and only those bits of its write
  go to the device (the rest of the access is written back as the device has it).
- Status register: the device's, live and read-only (vfio-pci drops writes to it).
- BARs: shadowed by pyvmm, sized from the VFIO regions; the ROM BAR reads 0 (hidden).
  Interrupt line: emulated, the GSI of the slot's INTx (pyvmm.machine.layout).
- Capabilities: only PM, PCI Express, MSI and MSI-X stay in the list, at the device's offsets
  (others are unlinked, and their bytes read 0; one the region cannot hold is hidden too). MSI
  and MSI-X are emulated entirely (pyvmm.vfio.interrupts). PM's power state and PCIe's device
  control registers are the device's (live, the guest's writes forwarded; vfio-pci carries out
  power-state changes and FLR); PCIe's device status is read-only; the link registers are
  emulated as a trained x1 2.5 GT/s link, since the guest's link is not the host's.
- Extended capabilities (0x100-0xFFF): all hidden (0 at 0x100), AER, ACS, SR-IOV and the rest
  being the host's business.

BARs: each memory BAR of at least a page is mapped by pieces (`bar_areas`): the region's mmap
areas (sparse mmap honoured) as device memory in KVM slots, minus the pages of the MSI-X table
and PBA, which stay trapped with whatever else cannot be mapped; trapped accesses go to the
emulated MSI-X table and PBA, or to the device with pread/pwrite. I/O BARs and BARs smaller
than a page are trapped whole. vfio-pci zaps its mmaps when the guest turns memory decode off
or leaves D0, so the slots over them go before such a write reaches the device, and come back
when the device decodes again (a BAR decodes only in D0).

State: what pyvmm virtualizes is saved and restored (`VfioPciFunctionState`): the config space
as the guest sees it, the guest's writes to the device's own registers (command, PM control,
PCIe device control), MSI and MSI-X. The device's own state (its registers, buffers, queues)
would need VFIO migration, which pyvmm does not do yet: a restored device is as the reset at
open left it, reprogrammed with the guest's config writes, and the machine says so
(`state_caveat`), so that a snapshot of it is taken only when asked for knowingly.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from pyvmm.devices.pci.capability import (
    CAP_START,
    PCI_CAP_ID_EXP,
    PCI_CAP_ID_MSI,
    PCI_CAP_ID_MSIX,
    PCI_CAP_ID_PM,
    PCI_CAPABILITY_LIST,
    PCI_STATUS,
    Capability,
)
from pyvmm.devices.pci.device import (
    NUM_BARS,
    PCI_BASE_ADDRESS_0,
    PCI_COMMAND,
    PCI_HEADER_TYPE,
    PCI_INTERRUPT_PIN,
    Bar,
    BarArea,
    BarKind,
    PciFunction,
    PciFunctionState,
)
from pyvmm.devices.pci.msi import MSI_FLAGS_64BIT, MSI_FLAGS_MASKBIT, MSI_FLAGS_QMASK, Msi
from pyvmm.devices.pci.msix import Msix, MsixState
from pyvmm.kvm.mmap import PAGE_SIZE
from pyvmm.machine.state import StateError
from pyvmm.uapi import vfio as uapi
from pyvmm.vfio.device import Region, VfioDevice
from pyvmm.vfio.errors import VfioError
from pyvmm.vfio.interrupts import VfioInterrupts

if TYPE_CHECKING:
    from pyvmm.machine.machine import Machine

log = logging.getLogger(__name__)

# The command bits the guest may change on the device.
COMMAND_WRITABLE = 0x0547  # I/O, memory, bus master, parity, SERR, INTx disable
STATUS_CAP_LIST = 0x0010
PCI_CACHE_LINE_SIZE = 0x0C
MAX_CAPS = 48  # a capability list longer than this loops

# PM: power management control/status at +4: the power state (1:0) is the guest's to change
# (vfio-pci carries it out); PME enable and status are vfio-pci's own.
PM_CTRL = 4
PM_CTRL_WRITABLE = 0x0003
PM_CTRL_STATE = 0x0003
PM_LENGTH = 8
# PCI Express: device control at +8 (writable), device status at +0xA (error bits W1C), link
# capabilities +0xC, link control +0x10, link status +0x12; device control 2 at +0x28.
EXP_DEVCTL, EXP_DEVSTA, EXP_LNKCAP, EXP_LNKCTL, EXP_LNKSTA = 8, 10, 12, 16, 18
EXP_DEVCAP2, EXP_DEVCTL2 = 0x24, 0x28
EXP_DEVCTL_BCR_FLR = 0x8000  # initiate function-level reset: an action, never replayed
EXP_LENGTH = 0x3C
EXP_LENGTH_V1 = 0x24
EXP_LNKCAP_X1_2_5GT = 0x0000_0011  # max link speed 2.5 GT/s, max width x1
EXP_LNKSTA_X1_2_5GT = 0x0011  # current speed 2.5 GT/s, negotiated width x1
# MSI-X: message control at +2 (table size - 1 in 10:0), table and PBA BIR|offset at +4, +8.
MSIX_TABLE_SIZE_MASK = 0x07FF
# The fewest bytes each capability pyvmm presents needs (MSI: 32-bit address, no masking).
MIN_LENGTHS = {
    PCI_CAP_ID_PM: PM_LENGTH,
    PCI_CAP_ID_EXP: 0x14,
    PCI_CAP_ID_MSI: 10,
    PCI_CAP_ID_MSIX: 12,
}


# A field of a passed-through capability that is the device's (read live, written through):
# (offset in the capability, size, bits the guest may write, bits it clears by writing 1).
LiveField = tuple[int, int, int, int]


@dataclass
class VfioPciFunctionState:
    """A passed-through function's virtualized state (not the device's own: see above)."""

    VERSION: ClassVar[int] = 1

    function: PciFunctionState  # the config space the guest sees, its writes to live fields
    msix: MsixState | None  # the emulated table and pending bits (MSI lives in config space)


class VfioPciFunction(PciFunction):
    """A VFIO device as a PCI function of the guest; plug it into the machine's bus 0."""

    state_type: ClassVar[type] = VfioPciFunctionState
    state_caveat: ClassVar[str] = (
        "a passed-through device's own state (its registers, buffers, queues) cannot be saved "
        "without VFIO migration: restored, the device is as reset, with the config space, BARs "
        "and interrupts the guest set up"
    )

    def __init__(
        self,
        machine: Machine,
        device: VfioDevice,
        name: str,
        *,
        release: Callable[[], None] | None = None,
        on_plugged: Callable[[int], None] | None = None,
    ) -> None:
        self.device = device
        self._release = release  # gives the device back to its context when closed
        self._on_plugged = on_plugged  # told the function's guest devfn
        self._config_region = device.region(uapi.VfioPciRegion.CONFIG)
        size = min(self._config_region.size, 4096)
        # A region shorter than the header (mtty's is 255 bytes) reads as zeros past its end.
        raw = device.read(self._config_region, 0, size).ljust(0x100, b"\0")
        self._config_size = size
        # The device's own registers the guest writes (offset, size, bits): what a restore
        # writes to the device again, since the shadow config holds the guest's last writes.
        self._live_fields: list[tuple[int, int, int]] = []
        self._vfio_regions: dict[int, Region] = {}
        bars = self._bars(raw)
        vendor, device_id = struct.unpack_from("<HH", raw, 0)
        super().__init__(
            vendor,
            device_id,
            int.from_bytes(raw[9:12], "little"),
            revision=raw[8],
            bars=bars,
            subsystem_vendor_id=struct.unpack_from("<H", raw, 0x2C)[0],
            subsystem_id=struct.unpack_from("<H", raw, 0x2E)[0],
            name=name,
        )
        self.interrupts = VfioInterrupts(machine.vm, device)
        self.msi: Msi | None = None
        self.msix: Msix | None = None
        try:
            self._virtualize_header(raw)
            self._virtualize_capabilities(machine, raw)
            self._mappings = self._map_bars()
        except BaseException:
            self._close_interrupts()
            raise

    # set-up

    def _bars(self, raw: bytes) -> tuple[Bar, ...]:
        """BAR kinds from the device's registers, sizes from its regions."""
        bars = []
        index = 0
        while index < NUM_BARS:
            region = self.device.region(uapi.VfioPciRegion.BAR0 + index)
            low = struct.unpack_from("<I", raw, PCI_BASE_ADDRESS_0 + 4 * index)[0]
            if region.size == 0:
                index += 1
                continue
            if region.size & (region.size - 1):
                raise VfioError(f"{self.device.name}: BAR{index} of {region.size:#x} bytes")
            self._vfio_regions[index] = region
            if low & 1:
                bars.append(Bar(index, BarKind.IO, max(region.size, 4)))
                index += 1
                continue
            is_64 = (low >> 1) & 3 == 2
            kind = BarKind.MEM64 if is_64 else BarKind.MEM32
            bars.append(Bar(index, kind, max(region.size, 16), prefetchable=bool(low & 8)))
            index += 2 if is_64 else 1
        return tuple(bars)

    def _virtualize_header(self, raw: bytes) -> None:
        self.config[PCI_CACHE_LINE_SIZE : PCI_CACHE_LINE_SIZE + 2] = raw[0x0C:0x0E]
        self.config[PCI_HEADER_TYPE] = raw[PCI_HEADER_TYPE] & 0x7F  # single-function
        has_intx = self.device.irq(uapi.VfioPciIrq.INTX).count > 0
        pin = raw[PCI_INTERRUPT_PIN]
        self.config[PCI_INTERRUPT_PIN] = pin if has_intx and pin <= 4 else 0
        self.config[0x3E:0x40] = raw[0x3E:0x40]  # min grant, max latency
        # command: the device's, and the bits the guest may write go to it
        self.emulated[PCI_COMMAND : PCI_COMMAND + 2] = bytes(2)
        struct.pack_into("<H", self.wmask, PCI_COMMAND, COMMAND_WRITABLE)
        self._live_fields.append((PCI_COMMAND, 2, COMMAND_WRITABLE))
        # status: the device's, read-only (vfio-pci drops status writes), but for the
        # capability-list bit, which is this list's
        struct.pack_into("<H", self.emulated, PCI_STATUS, STATUS_CAP_LIST)
        struct.pack_into("<H", self.w1cmask, PCI_STATUS, 0)

    def _device_capabilities(self, raw: bytes) -> list[tuple[int, int]]:
        """(id, offset) of the device's standard capabilities, loops and bad offsets refused."""
        found = []
        if not struct.unpack_from("<H", raw, PCI_STATUS)[0] & STATUS_CAP_LIST:
            return found
        offset = raw[PCI_CAPABILITY_LIST] & ~3
        seen = set()
        while offset:
            bad = offset < CAP_START or offset + 2 > min(self._config_size, 0x100)
            if bad or offset in seen or len(seen) > MAX_CAPS:
                log.warning("%s: capability list broken at %#x", self.device.name, offset)
                break
            seen.add(offset)
            found.append((raw[offset], offset))
            offset = raw[offset + 1] & ~3
        return found

    def _virtualize_capabilities(self, machine: Machine, raw: bytes) -> None:
        found = self._device_capabilities(raw)
        starts = sorted(offset for _, offset in found)
        limit = min(self._config_size, 0x100)
        for cap_id, offset in found:
            # a capability ends where the next one starts, at the latest
            room = min(next((o for o in starts if o > offset), 0x100), limit) - offset
            try:
                if room < MIN_LENGTHS.get(cap_id, 0x100):
                    raise ValueError(f"{room} bytes is too short")
                if cap_id == PCI_CAP_ID_PM:
                    live = ((PM_CTRL, 2, PM_CTRL_WRITABLE, 0),)
                    self._add_passthrough(cap_id, raw, offset, min(PM_LENGTH, room), live)
                elif cap_id == PCI_CAP_ID_EXP:
                    self._add_express(raw, offset, room)
                elif cap_id == PCI_CAP_ID_MSI and self.msi is None:
                    self._add_msi(machine, raw, offset)
                elif cap_id == PCI_CAP_ID_MSIX and self.msix is None:
                    self._add_msix(machine, raw, offset)
                else:
                    log.debug("%s: capability %#x at %#x hidden", self.name, cap_id, offset)
            except ValueError as err:  # a device's own capability pyvmm cannot present
                log.warning("%s: capability %#x at %#x hidden: %s", self.name, cap_id, offset, err)

    def _add_passthrough(
        self,
        cap_id: int,
        raw: bytes,
        offset: int,
        length: int,
        live: tuple[LiveField, ...],
    ) -> Capability:
        """The device's capability as it was at attach, read-only but for its `live` fields
        (those that fit in `length`)."""
        cap = Capability(cap_id, raw[offset + 2 : offset + length])
        self.add_capability(cap, offset)
        for field, size, writable, clear in live:
            if field + size > length:
                continue
            at = offset + field
            self.emulated[at : at + size] = bytes(size)
            self.wmask[at : at + size] = writable.to_bytes(size, "little")
            self.w1cmask[at : at + size] = clear.to_bytes(size, "little")
            if writable:
                self._live_fields.insert(0, (at, size, writable))  # before the command
        return cap

    def _add_express(self, raw: bytes, offset: int, room: int) -> None:
        version = raw[offset + 2] & 0xF  # a version 1 capability ends after the slot fields
        length = min(EXP_LENGTH if version >= 2 else EXP_LENGTH_V1, room)
        live = (
            (EXP_DEVCTL, 2, 0xFFFF, 0),
            (EXP_DEVSTA, 2, 0, 0),  # read-only: vfio-pci drops writes to it
            (EXP_DEVCTL2, 2, 0xFFFF, 0),
        )
        cap = self._add_passthrough(PCI_CAP_ID_EXP, raw, offset, length, live)
        devctl = (offset + EXP_DEVCTL, 2, 0xFFFF)
        if devctl in self._live_fields:  # a restore sets the guest's bits, but resets nothing
            at = self._live_fields.index(devctl)
            self._live_fields[at] = (offset + EXP_DEVCTL, 2, 0xFFFF & ~EXP_DEVCTL_BCR_FLR)
        if length >= EXP_LNKSTA + 2:  # the link the guest sees: one trained lane
            cap.put(EXP_LNKCAP, 4, EXP_LNKCAP_X1_2_5GT)
            cap.put(EXP_LNKCTL, 2, 0)
            cap.put(EXP_LNKSTA, 2, EXP_LNKSTA_X1_2_5GT)
        for field in range(0x14, length - 3, 4):  # slot, root and link 2 registers: none
            if field not in (EXP_DEVCAP2, EXP_DEVCTL2):  # device capabilities 2 and control 2
                cap.put(field, 4, 0)

    def _add_msi(self, machine: Machine, raw: bytes, offset: int) -> None:
        control = struct.unpack_from("<H", raw, offset + 2)[0]
        offered = 1 << ((control & MSI_FLAGS_QMASK) >> 1)
        offered = min(offered, max(1, self.device.irq(uapi.VfioPciIrq.MSI).count))
        self.msi = Msi(
            machine.vm,
            machine.gsi,
            1 << (offered.bit_length() - 1),
            is_64bit=bool(control & MSI_FLAGS_64BIT),
            maskable=bool(control & MSI_FLAGS_MASKBIT),
            on_control=lambda vectors: self.interrupts.msi(self.msi.eventfds, vectors),
        )
        self.add_capability(self.msi.capability, offset)

    def _add_msix(self, machine: Machine, raw: bytes, offset: int) -> None:
        control, table, pba = struct.unpack_from("<HII", raw, offset + 2)
        # as many vectors as the device has and VFIO offers: the guest sees that table size
        offered = self.device.irq(uapi.VfioPciIrq.MSIX).count
        vectors = min((control & MSIX_TABLE_SIZE_MASK) + 1, offered)
        if vectors < 1:
            raise ValueError("VFIO offers no MSI-X vectors")
        self.msix = Msix(
            machine.vm,
            machine.gsi,
            vectors,
            table=(table & 7, table & ~7),
            pba=(pba & 7, pba & ~7),
            on_control=lambda enabled, masked: self.interrupts.msix(self.msix.eventfds, enabled),
        )
        self.add_capability(self.msix.capability, offset)

    def _map_bars(self) -> dict[int, list[tuple[int, int, int]]]:
        """mmap every mappable area of every memory BAR of at least a page, once:
        (offset, size, host address) per BAR."""
        mappings: dict[int, list[tuple[int, int, int]]] = {}
        for index, bar in self.bars.items():
            region = self._vfio_regions[index]
            if bar.kind is BarKind.IO or bar.size < PAGE_SIZE:
                continue
            pieces = []
            for start, size in region.mmap_areas:
                first = -(-start // PAGE_SIZE) * PAGE_SIZE
                end = (start + size) // PAGE_SIZE * PAGE_SIZE
                if end > first:
                    mapping = self.device.mmap(region, first, end - first)
                    pieces.append((first, end - first, mapping.addr))
            mappings[index] = pieces
        return mappings

    def plugged(self) -> None:
        if self._on_plugged is not None:
            self._on_plugged(self.devfn)
        if self.config[PCI_INTERRUPT_PIN]:
            self.interrupts.wire_intx(self.config[0x3C])

    # BARs

    def _trapped_holes(self, index: int) -> list[tuple[int, int]]:
        """Page-rounded ranges of BAR `index` that must stay trapped: the MSI-X table, PBA."""
        holes = []
        if self.msix is not None:
            tables = ((self.msix.table, self.msix.table_size), (self.msix.pba, self.msix.pba_size))
            for (bir, offset), size in tables:
                if bir == index:
                    start = offset // PAGE_SIZE * PAGE_SIZE
                    holes.append((start, -(-(offset + size) // PAGE_SIZE) * PAGE_SIZE))
        return holes

    def bar_areas(self, index: int) -> list[BarArea]:
        size = self.bars[index].size
        mapped = self._mappings.get(index)
        if not mapped:
            return [BarArea(0, size)]
        holes = self._trapped_holes(index)
        pieces: list[tuple[int, int, int]] = []  # (start, end, host address of start)
        for start, length, addr in mapped:
            cuts = [(start, start + length)]
            for lo, hi in holes:
                cuts = [
                    part
                    for a, b in cuts
                    for part in ((a, min(b, lo)), (max(a, hi), b))
                    if part[0] < part[1]
                ]
            pieces += [(a, b, addr + a - start) for a, b in cuts]
        areas = []
        position = 0
        for start, end, addr in sorted(pieces):
            if start > position:
                areas.append(BarArea(position, start - position))
            areas.append(BarArea(start, end - start, addr))
            position = end
        if position < size:
            areas.append(BarArea(position, size - position))
        return areas

    def _in(self, where: tuple[int, int], length: int, index: int, offset: int) -> bool:
        return where[0] == index and where[1] <= offset < where[1] + length

    def bar_read(self, index: int, offset: int, size: int) -> int:
        msix = self.msix
        if msix is not None and self._in(msix.table, msix.table_size, index, offset):
            return msix.table_read(offset - msix.table[1], size)
        if msix is not None and self._in(msix.pba, msix.pba_size, index, offset):
            return msix.pba_read(offset - msix.pba[1], size)
        try:
            data = self.device.read(self._vfio_regions[index], offset, size)
        except (VfioError, OSError) as err:
            log.debug("%s: BAR%d read at %#x: %s", self.name, index, offset, err)
            return (1 << (8 * size)) - 1
        return int.from_bytes(data, "little")

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        msix = self.msix
        if msix is not None and self._in(msix.table, msix.table_size, index, offset):
            msix.table_write(offset - msix.table[1], size, value)
            return
        if msix is not None and self._in(msix.pba, msix.pba_size, index, offset):
            return  # the PBA is read-only
        try:
            self.device.write(self._vfio_regions[index], offset, value.to_bytes(size, "little"))
        except (VfioError, OSError) as err:
            log.debug("%s: BAR%d write at %#x: %s", self.name, index, offset, err)

    # the device's own config bytes

    def device_config_read(self, offset: int, size: int) -> int:
        try:
            data = self.device.read(self._config_region, offset, size)
        except (VfioError, OSError):
            return (1 << (8 * size)) - 1
        return int.from_bytes(data, "little")

    def device_config_write(self, offset: int, size: int, value: int, mask: int) -> None:
        """Write the guest's bits in `mask`, the device's current value in the others (the
        access's other bytes are written back as they read: harmless, as vfio-pci checks
        every bit against its own permissions)."""
        try:
            current = int.from_bytes(self.device.read(self._config_region, offset, size), "little")
            merged = (current & ~mask) | (value & mask)
            self.device.write(self._config_region, offset, merged.to_bytes(size, "little"))
        except (VfioError, OSError) as err:  # a failed read writes nothing, not all-ones
            log.debug("%s: config write at %#x: %s", self.name, offset, err)

    # decoding: vfio-pci zaps its BAR mmaps when memory decode goes off or the device leaves
    # D0, so the KVM slots over them must go first (a vCPU touching one would fault)

    def _power_state(self) -> int:
        pm = self.capabilities.find(PCI_CAP_ID_PM)
        return pm.get(PM_CTRL, 2) & PM_CTRL_STATE if pm is not None else 0

    def decodes(self, bar: Bar) -> bool:
        return super().decodes(bar) and self._power_state() == 0

    def config_write(self, offset: int, size: int, value: int) -> None:
        pm = self.capabilities.find(PCI_CAP_ID_PM)
        touched = [(PCI_COMMAND, 2)] + ([(pm.offset + PM_CTRL, 2)] if pm is not None else [])
        if any(start < offset + size and offset < start + length for start, length in touched):
            self.unplace_bars()  # before the device stops decoding; placed again below
            super().config_write(offset, size, value)
            self.update_bars()
            return
        super().config_write(offset, size, value)

    # state (see the module docstring: the device's own is not in it)

    def save(self) -> VfioPciFunctionState:
        return VfioPciFunctionState(
            super().save(), self.msix.save() if self.msix is not None else None
        )

    def check(self, state: VfioPciFunctionState) -> None:
        self.check_config(state.function)
        if (state.msix is None) != (self.msix is None):
            raise StateError(f"{self.name}: saved MSI-X state does not fit this device's")
        if self.msix is not None and len(state.msix.table) != self.msix.table_size:
            raise StateError(
                f"{self.name}: saved MSI-X table has {len(state.msix.table)} bytes, this "
                f"device's {self.msix.table_size}"
            )

    def restore(self, state: VfioPciFunctionState) -> None:
        """The guest's config space again, its writes to the device's registers replayed
        (power state and device control first, the command register last), its interrupts
        routed again, and the BARs where it put them."""
        self.check(state)
        self.unplace_bars()
        self.config[:] = state.function.config
        for offset, size, writable in self._live_fields:
            value = int.from_bytes(self.config[offset : offset + size], "little")
            self.device_config_write(offset, size, value, writable)
        if self.msi is not None:
            self.msi.update()
        if self.msix is not None and state.msix is not None:
            self.msix.restore(state.msix)
        self.update_bars()

    # teardown

    def _close_interrupts(self) -> None:
        self.interrupts.close()
        for vectors in (self.msi, self.msix):
            if vectors is not None:
                vectors.close()

    def close(self) -> None:
        """Unmap the BARs, stop the interrupts, and reset the device for its next user."""
        super().close()
        self._close_interrupts()
        try:
            if self.device.info().flags & uapi.VfioDeviceFlag.RESET:
                self.device.reset()
        except (VfioError, OSError) as err:
            log.warning("%s", err)
        finally:
            if self._release is not None:
                self._release()
