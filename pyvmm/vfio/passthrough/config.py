"""A passed-through function's config space as the guest sees it: the device's, virtualized.

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
  and MSI-X are emulated entirely (interrupts.py). PM's power state and PCIe's device
  control registers are the device's (live, the guest's writes forwarded; vfio-pci carries out
  power-state changes and FLR); PCIe's device status is read-only; the link registers are
  emulated as a trained x1 2.5 GT/s link, since the guest's link is not the host's.
- Extended capabilities (0x100-0xFFF): all hidden (0 at 0x100), AER, ACS, SR-IOV and the rest
  being the host's business.
"""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING

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
from pyvmm.devices.pci.device import PCI_COMMAND, PCI_HEADER_TYPE, PCI_INTERRUPT_PIN, PciFunction
from pyvmm.devices.pci.msi import MSI_FLAGS_64BIT, MSI_FLAGS_MASKBIT, MSI_FLAGS_QMASK, Msi
from pyvmm.devices.pci.msix import Msix
from pyvmm.uapi import vfio as uapi
from pyvmm.vfio.device import VfioDevice
from pyvmm.vfio.passthrough.interrupts import VfioInterrupts

if TYPE_CHECKING:
    from pyvmm.machine.host import DeviceHost

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


class PassthroughConfig:
    """The rules above, carried out by `virtualize` on `function`'s config space and masks
    from `device`'s own config bytes, of which the first `size` are the device's (a region
    shorter than the header reads as zeros past its end). MSI and MSI-X become the emulated
    `msi` and `msix`; `close` closes them."""

    def __init__(self, function: PciFunction, device: VfioDevice, size: int) -> None:
        self._function = function
        self.device = device
        self._config_size = size
        # The device's own registers the guest writes (offset, size, bits): what a restore
        # writes to the device again, since the shadow config holds the guest's last writes.
        self.live_fields: list[tuple[int, int, int]] = []
        self.msi: Msi | None = None
        self.msix: Msix | None = None

    def virtualize(self, raw: bytes, machine: DeviceHost, interrupts: VfioInterrupts) -> None:
        """Present the header and the capabilities kept; the vectors of MSI and MSI-X are
        handed to `interrupts` as the guest enables them."""
        self._virtualize_header(raw)
        self._virtualize_capabilities(machine, interrupts, raw)

    def _virtualize_header(self, raw: bytes) -> None:
        function = self._function
        function.config[PCI_CACHE_LINE_SIZE : PCI_CACHE_LINE_SIZE + 2] = raw[0x0C:0x0E]
        function.config[PCI_HEADER_TYPE] = raw[PCI_HEADER_TYPE] & 0x7F  # single-function
        has_intx = self.device.irq(uapi.VfioPciIrq.INTX).count > 0
        pin = raw[PCI_INTERRUPT_PIN]
        function.config[PCI_INTERRUPT_PIN] = pin if has_intx and pin <= 4 else 0
        function.config[0x3E:0x40] = raw[0x3E:0x40]  # min grant, max latency
        # command: the device's, and the bits the guest may write go to it
        function.emulated[PCI_COMMAND : PCI_COMMAND + 2] = bytes(2)
        struct.pack_into("<H", function.wmask, PCI_COMMAND, COMMAND_WRITABLE)
        self.live_fields.append((PCI_COMMAND, 2, COMMAND_WRITABLE))
        # status: the device's, read-only (vfio-pci drops status writes), but for the
        # capability-list bit, which is this list's
        struct.pack_into("<H", function.emulated, PCI_STATUS, STATUS_CAP_LIST)
        struct.pack_into("<H", function.w1cmask, PCI_STATUS, 0)

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

    def _virtualize_capabilities(
        self, machine: DeviceHost, interrupts: VfioInterrupts, raw: bytes
    ) -> None:
        name = self._function.name
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
                    self._add_msi(machine, interrupts, raw, offset)
                elif cap_id == PCI_CAP_ID_MSIX and self.msix is None:
                    self._add_msix(machine, interrupts, raw, offset)
                else:
                    log.debug("%s: capability %#x at %#x hidden", name, cap_id, offset)
            except ValueError as err:  # a device's own capability pyvmm cannot present
                log.warning("%s: capability %#x at %#x hidden: %s", name, cap_id, offset, err)

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
        function = self._function
        cap = Capability(cap_id, raw[offset + 2 : offset + length])
        function.add_capability(cap, offset)
        for field, size, writable, clear in live:
            if field + size > length:
                continue
            at = offset + field
            function.emulated[at : at + size] = bytes(size)
            function.wmask[at : at + size] = writable.to_bytes(size, "little")
            function.w1cmask[at : at + size] = clear.to_bytes(size, "little")
            if writable:
                self.live_fields.insert(0, (at, size, writable))  # before the command
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
        if devctl in self.live_fields:  # a restore sets the guest's bits, but resets nothing
            at = self.live_fields.index(devctl)
            self.live_fields[at] = (offset + EXP_DEVCTL, 2, 0xFFFF & ~EXP_DEVCTL_BCR_FLR)
        if length >= EXP_LNKSTA + 2:  # the link the guest sees: one trained lane
            cap.put(EXP_LNKCAP, 4, EXP_LNKCAP_X1_2_5GT)
            cap.put(EXP_LNKCTL, 2, 0)
            cap.put(EXP_LNKSTA, 2, EXP_LNKSTA_X1_2_5GT)
        for field in range(0x14, length - 3, 4):  # slot, root and link 2 registers: none
            if field not in (EXP_DEVCAP2, EXP_DEVCTL2):  # device capabilities 2 and control 2
                cap.put(field, 4, 0)

    def _add_msi(
        self, machine: DeviceHost, interrupts: VfioInterrupts, raw: bytes, offset: int
    ) -> None:
        control = struct.unpack_from("<H", raw, offset + 2)[0]
        offered = 1 << ((control & MSI_FLAGS_QMASK) >> 1)
        offered = min(offered, max(1, self.device.irq(uapi.VfioPciIrq.MSI).count))
        self.msi = Msi(
            machine.vm,
            machine.gsi,
            1 << (offered.bit_length() - 1),
            is_64bit=bool(control & MSI_FLAGS_64BIT),
            maskable=bool(control & MSI_FLAGS_MASKBIT),
            on_control=lambda vectors: interrupts.msi(self.msi.eventfds, vectors),
        )
        self._function.add_capability(self.msi.capability, offset)

    def _add_msix(
        self, machine: DeviceHost, interrupts: VfioInterrupts, raw: bytes, offset: int
    ) -> None:
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
            on_control=lambda enabled, masked: interrupts.msix(self.msix.eventfds, enabled),
        )
        self._function.add_capability(self.msix.capability, offset)

    def close(self) -> None:
        for vectors in (self.msi, self.msix):
            if vectors is not None:
                vectors.close()
