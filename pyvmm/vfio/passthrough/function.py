"""A passed-through PCI function: the device's config space, virtualized, and its BARs.

The guest sees the device's identity and registers, but pyvmm decides what it may touch: the
rules, by config-space range, are pyvmm.vfio.passthrough.config's; how the BARs are mapped (the
device's mmap in KVM slots, the MSI-X table and PBA trapped) is pyvmm.vfio.passthrough.bars'. The
function puts the two together: vfio-pci zaps its BAR mmaps when the guest turns memory decode
off or leaves D0, so the slots over them go before such a write reaches the device, and come
back when the device decodes again (a BAR decodes only in D0).

State: what pyvmm virtualizes is saved and restored (`VfioPciFunctionState`): the config space
as the guest sees it, the guest's writes to the device's own registers (command, PM control,
PCIe device control), MSI and MSI-X. The device's own state (its registers, buffers, queues) is
saved too where its driver migrates it (VFIO migration, `migration`): read from its data fd in
STOP_COPY when the function is saved, written back in RESUMING when it is restored, with the
machine paused (so the device is in STOP: group.py orders the stops). A device that does not
migrate is restored as the reset at open left it, reprogrammed with the guest's config writes,
and the machine says so (`state_caveat`), so that a snapshot of it is taken only when asked for
knowingly.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from pyvmm.devices.pci.capability import PCI_CAP_ID_PM
from pyvmm.devices.pci.device import (
    PCI_COMMAND,
    PCI_INTERRUPT_PIN,
    Bar,
    BarArea,
    PciFunction,
    PciFunctionState,
)
from pyvmm.devices.pci.msi import Msi
from pyvmm.devices.pci.msix import Msix, MsixState
from pyvmm.machine.state import StateError
from pyvmm.uapi import vfio as uapi
from pyvmm.uapi.vfio import VfioDeviceState as State
from pyvmm.uapi.vfio import VfioMigrationFlag as Flag
from pyvmm.vfio.device import VfioDevice
from pyvmm.vfio.errors import VfioError
from pyvmm.vfio.migration.device import DeviceMigration, MigrationData
from pyvmm.vfio.passthrough.bars import PassthroughBars
from pyvmm.vfio.passthrough.config import PM_CTRL, PM_CTRL_STATE, PassthroughConfig
from pyvmm.vfio.passthrough.interrupts import VfioInterrupts

if TYPE_CHECKING:
    from pyvmm.machine.host import DeviceHost

log = logging.getLogger(__name__)


@dataclass
class VfioPciFunctionState:
    """A passed-through function's virtualized state, and the device's own if it migrates."""

    VERSION: ClassVar[int] = 2

    function: PciFunctionState  # the config space the guest sees, its writes to live fields
    msix: MsixState | None  # the emulated table and pending bits (MSI lives in config space)
    device: bytes | None  # what the device's data fd gave in STOP_COPY (None: no migration)


NO_MIGRATION_CAVEAT = (
    "its own state (registers, buffers, queues) cannot be saved: {why}; restored, the device "
    "is as reset, with the config space, BARs and interrupts the guest set up"
)


class VfioPciFunction(PciFunction):
    """A VFIO device as a PCI function of the guest; plug it into the machine's bus 0."""

    state_type: ClassVar[type] = VfioPciFunctionState

    def __init__(
        self,
        machine: DeviceHost,
        device: VfioDevice,
        name: str,
        *,
        release: Callable[[], None] | None = None,
        on_plugged: Callable[[int], None] | None = None,
        migration: DeviceMigration | None = None,
    ) -> None:
        self.device = device
        self.migration = migration  # its VFIO migration, if probed (it may lack one)
        self._release = release  # gives the device back to its context when closed
        self._on_plugged = on_plugged  # told the function's guest devfn
        self._config_region = device.region(uapi.VfioPciRegion.CONFIG)
        size = min(self._config_region.size, 4096)
        # A region shorter than the header (mtty's is 255 bytes) reads as zeros past its end.
        raw = device.read(self._config_region, 0, size).ljust(0x100, b"\0")
        self._passthrough_bars = PassthroughBars(device, raw, name)
        vendor, device_id = struct.unpack_from("<HH", raw, 0)
        super().__init__(
            vendor,
            device_id,
            int.from_bytes(raw[9:12], "little"),
            revision=raw[8],
            bars=tuple(self._passthrough_bars.bars.values()),
            subsystem_vendor_id=struct.unpack_from("<H", raw, 0x2C)[0],
            subsystem_id=struct.unpack_from("<H", raw, 0x2E)[0],
            name=name,
        )
        self.model = f"vfio {vendor:04x}:{device_id:04x}"  # (restored onto another, the same)
        # the data fd whose state stop_copy_pieces read at the stop, and whether to its end
        self._stop_read: MigrationData | None = None
        self._stop_read_whole = False
        self.interrupts = VfioInterrupts(machine.vm, device)
        self._passthrough_config = PassthroughConfig(self, device, size)
        try:
            self._passthrough_config.virtualize(raw, machine, self.interrupts)
            self._passthrough_bars.map(self.msix)
        except BaseException:
            self._close_interrupts()
            raise

    @property
    def msi(self) -> Msi | None:
        """The emulated MSI capability, if the device has MSI."""
        return self._passthrough_config.msi

    @property
    def msix(self) -> Msix | None:
        """The emulated MSI-X capability, table and PBA, if the device has MSI-X."""
        return self._passthrough_config.msix

    def plugged(self) -> None:
        if self._on_plugged is not None:
            self._on_plugged(self.devfn)
        if self.config[PCI_INTERRUPT_PIN]:
            self.interrupts.wire_intx(self.config[0x3C])

    # BARs

    def bar_areas(self, index: int) -> list[BarArea]:
        return self._passthrough_bars.areas(index)

    def bar_read(self, index: int, offset: int, size: int) -> int:
        return self._passthrough_bars.read(index, offset, size)

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        self._passthrough_bars.write(index, offset, size, value)

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

    # state (see the module docstring)

    @property
    def migrates(self) -> bool:
        return self.migration is not None and not self.migration.missing()

    @property
    def state_caveat(self) -> str:
        """What a save of this function leaves out ("" for a device that migrates)."""
        if self.migrates:
            return ""
        return f"{self.name}: " + NO_MIGRATION_CAVEAT.format(why=self._no_migration())

    def _no_migration(self) -> str:
        if self.migration is None:
            return "its migration was not probed"
        return self.migration.missing()

    def save(self) -> VfioPciFunctionState:
        return VfioPciFunctionState(
            super().save(),
            self.msix.save() if self.msix is not None else None,
            self._save_device() if self.migrates else None,
        )

    def _save_device(self) -> bytes:
        """The device's state, read to its end in STOP_COPY (the rest of it, after a saving
        ahead: the machine's pause took it on to STOP_COPY, its data fd carrying on), or none
        if `stop_copy_pieces` has just read it all out; the device is left in STOP (the
        machine is paused)."""
        assert self.migration is not None
        data = self.migration.move_to(State.STOP_COPY)
        if data is not None and data is self._stop_read and self._stop_read_whole:
            saved = b""
        else:
            saved = self._unread_stop_copy().read_all()
        self._stop_read = None
        self.migration.move_to(State.STOP)
        log.info("%s: saved %d bytes of device state", self.name, len(saved))
        return saved

    def stop_copy_pieces(self, size: int) -> Iterator[bytes]:
        """At the stop (the machine paused): the device to STOP_COPY and its state read to the
        end in pieces of at most `size` bytes, for a stream to carry ahead of the function's
        own state (whose save then holds none of it): a device's state may be larger than a
        section, or than is wise to hold at once."""
        data = self._unread_stop_copy()
        self._stop_read, self._stop_read_whole = data, False
        total = 0
        for piece in data.read_pieces(size):
            total += len(piece)
            yield piece
        self._stop_read_whole = True
        log.info("%s: read %d bytes of device state at the stop", self.name, total)

    def _unread_stop_copy(self) -> MigrationData:
        """The device in STOP_COPY on a data fd no read at the stop has touched: one that a
        save which failed afterwards (the machine staying paused) left read, in part or
        whole, is given up for a new one (STOP, then STOP_COPY: the state from its start)."""
        assert self.migration is not None
        data = self.migration.move_to(State.STOP_COPY)
        if data is not None and data is self._stop_read:
            self.migration.move_to(State.STOP)
            data = self.migration.move_to(State.STOP_COPY)
        self._stop_read = None
        if data is None:
            raise VfioError(f"{self.name}: STOP_COPY gave no data fd")
        return data

    # saving ahead (a live migration's pre-copy: pyvmm.migration.device_precopy)

    @property
    def precopy(self) -> bool:
        """Whether the device's state can be read ahead, the device running (PRE_COPY)."""
        return (
            self.migration is not None
            and self.migrates
            and bool(self.migration.flags & Flag.PRE_COPY)
        )

    def precopy_begin(self) -> None:
        """RUNNING -> PRE_COPY: from now on its state can be read while it runs."""
        assert self.migration is not None
        self.migration.move_to(State.PRE_COPY)

    def precopy_read(self) -> tuple[bytes, bool]:
        """What the device has to give ahead now, and whether its initial bytes are all out
        (VFIO_MIG_GET_PRECOPY_INFO): the destination may then load them before the stop."""
        assert self.migration is not None
        if self.migration.current not in (State.PRE_COPY, State.PRE_COPY_P2P):
            raise VfioError(
                f"{self.name}: no longer saving ahead (in {self.migration.current.name})"
            )
        assert self.migration.data is not None
        chunk = self.migration.data.read_available()
        initial, _dirty = self.migration.data.precopy_info()
        return chunk, initial == 0

    def precopy_abort(self) -> None:
        """The migration failed before the stop (the machine runs): back to RUNNING, by a
        reset if a failed arc left the device in ERROR."""
        assert self.migration is not None
        if self.migration.current is not State.RUNNING:
            self.migration.recover()

    def load_data(self, chunk: bytes) -> None:
        """On the destination: data the source's device gave (ahead, or at the stop before
        its function's state), written in RESUMING (the machine is paused, the device
        stopped: the first chunk takes it there)."""
        assert self.migration is not None
        if self.migration.current is not State.RESUMING:
            self.migration.move_to(State.RESUMING)
        assert self.migration.data is not None
        self.migration.data.write_all(chunk)

    def stop_copy_bytes(self) -> int:
        """What the stop would read, as the device estimates it now (MIG_DATA_SIZE)."""
        assert self.migration is not None
        return self.migration.data_size()

    @staticmethod
    def upgrade_state(version: int, data: object) -> object:
        """Version 1 had no device state: a device restored from it is as reset."""
        if version == 1 and isinstance(data, dict):
            return {**data, "device": None}
        return None

    def check(self, state: VfioPciFunctionState) -> None:
        self.check_config(state.function)
        if state.device is not None and not self.migrates:
            raise StateError(
                f"{self.name}: the saved state holds the device's own state, which this "
                f"device cannot take ({self._no_migration()})"
            )
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
        if state.device is not None:
            self._restore_device(state.device)
        elif self.migration is not None and self.migration.data is not None:
            raise StateError(f"{self.name}: data was sent ahead for it, but no state follows")
        self.unplace_bars()
        self.config[:] = state.function.config
        for offset, size, writable in self._passthrough_config.live_fields:
            value = int.from_bytes(self.config[offset : offset + size], "little")
            self.device_config_write(offset, size, value, writable)
        if self.msi is not None:
            self.msi.update()
        if self.msix is not None and state.msix is not None:
            self.msix.restore(state.msix)
        self.update_bars()

    def _restore_device(self, saved: bytes) -> None:
        """The device's state written in RESUMING (after what a pre-copy gave, if it did: the
        same data fd); the device is left in STOP (the machine is paused). A device that
        refuses it leaves a StateError."""
        assert self.migration is not None
        try:
            data = self.migration.data
            if self.migration.current is not State.RESUMING or data is None:
                data = self.migration.move_to(State.RESUMING)
            if data is None:
                raise VfioError(f"{self.name}: RESUMING gave no data fd")
            data.write_all(saved)
            self.migration.move_to(State.STOP)
        except (VfioError, OSError) as err:
            why = err.strerror if isinstance(err, OSError) and err.strerror else err
            raise StateError(f"{self.name}: the device refused its saved state: {why}") from None
        log.info("%s: restored %d bytes of device state", self.name, len(saved))

    # teardown

    def _close_interrupts(self) -> None:
        self.interrupts.close()
        self._passthrough_config.close()

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
