"""A machine's migrating VFIO devices, stopped and started together in the order P2P asks for.

vfio.h's RUNNING_P2P exists for machines with more than one device: a device in it no longer
starts DMA to its peers (nor takes on new requests from them) but still answers what they sent
before. So that no device is stopped while a peer may still be writing to it, every device
reaches RUNNING_P2P before any goes on to STOP; and so that none runs before its peers can take
its requests, every device leaves STOP for RUNNING_P2P before any goes on to RUNNING. QEMU
orders its devices the same way (vfio_vmstate_change_prepare).

`MigratingDevices` is one machine component for all of them: pausing the machine takes each
device to RUNNING_P2P, then each to STOP (its DMA into RAM has ended when the pause returns, so
the last look at the dirty log misses nothing), and resuming goes back the same way. Every arc
any device takes goes into `journal` (device, from, to), in the order the kernel was asked, so
that a test can check the order and a learner can read it. The devices' data themselves are
each VfioPciFunction's to save and restore, with the rest of its state.

It is also the source of the devices' DMA writes in the machine's dirty log (a DirtySource),
from the best of three: each device's own DMA log where its driver has one (dma_log.py); else,
for the devices on iommufd, their IOMMU's dirty bits (a dirty-tracking HWPT: `iommu_dirty`,
pyvmm.vfio.iommufd.dirty), where the IOMMU keeps them; else nothing can know the pages they
wrote, so once the devices are stopped (the last look of a migration, or of an incremental
snapshot) every page mapped for DMA is reported dirty and goes again: `untracked` names those
devices, and starting the log warns of each.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from pyvmm.uapi.vfio import VfioDeviceState as State
from pyvmm.uapi.vfio import VfioMigrationFlag as Flag
from pyvmm.vfio.device import VfioDevice
from pyvmm.vfio.errors import VfioError
from pyvmm.vfio.migration import dma_log
from pyvmm.vfio.migration.device import DeviceMigration, Journal
from pyvmm.vfio.migration.dma_log import PAGE_SIZE, DeviceDmaLog, LoggedPages

if TYPE_CHECKING:
    from pyvmm.machine.dirty import DirtyPages, DirtySource

#: Makes the IOMMU's dirty log of those of the named devices it can cover (an mdev has no
#: IOMMU page table): the log (a DirtySource whose start raises a VfioError where their IOMMU
#: cannot track) and the names covered; a VfioError if none. For devices on iommufd.
IommuDirty = Callable[[list[str]], "tuple[DirtySource, list[str]]"]

log = logging.getLogger(__name__)


# from -> to, for each step of a pause and of a resume
_PAUSE_P2P = {State.RUNNING: State.RUNNING_P2P, State.PRE_COPY: State.PRE_COPY_P2P}
_PAUSE_STOP = {
    State.RUNNING: State.STOP,
    State.RUNNING_P2P: State.STOP,
    State.PRE_COPY: State.STOP_COPY,
    State.PRE_COPY_P2P: State.STOP_COPY,
}
_RESUME_P2P = {State.STOP: State.RUNNING_P2P, State.STOP_COPY: State.RUNNING_P2P}
_RESUME_RUN = {
    State.STOP: State.RUNNING,
    State.STOP_COPY: State.RUNNING,
    State.RUNNING_P2P: State.RUNNING,
}


class MigratingDevices:
    """The devices of one machine that migrate (their flags say STOP_COPY)."""

    def __init__(
        self, mapped: Callable[[], dict[int, int]] = dict, iommu_dirty: IommuDirty | None = None
    ) -> None:
        self.devices: list[DeviceMigration] = []
        self.journal: Journal = []  # every arc of every device, in order: (name, from, to)
        self._mapped = mapped  # the RAM mapped for the devices' DMA: {gpa: size}
        self.dma_logs: dict[str, DeviceDmaLog] = {}  # of the devices that have one
        self.by_iova: set[str] = set()  # devices behind the guest's virtio-iommu
        self.iommu_dirty = iommu_dirty  # (a backend on iommufd sets it)
        self.iommu_log: DirtySource | None = None  # while started, for `iommu_logged`
        self.iommu_logged: list[str] = []
        self._paused = False

    def add(self, device: VfioDevice, *, dma_by_iova: bool = False) -> DeviceMigration:
        """The migration of `device`, probed; a device that migrates joins the group (one that
        does not is only asked why: `migration.missing()`). A device whose DMA addresses are
        the guest's IOVAs (behind its virtio-iommu) is not logged: its log would name IOVAs,
        not guest pages, so every page mapped for DMA goes again once it has stopped."""
        migration = DeviceMigration(device, journal=self.journal)
        if not migration.missing():
            self.devices.append(migration)
            if dma_by_iova:
                self.by_iova.add(device.name)
            elif dma_log.supported(device):
                self.dma_logs[device.name] = DeviceDmaLog(device, self._mapped)
        return migration

    def forget(self, name: str) -> None:
        """Device `name` is going (closed, or its assignment failed): its transfer's data fd
        closed, its DMA log stopped (a failure said, not raised: the device goes anyway)."""
        for migration in self.devices:
            if migration.name == name and migration.data is not None:
                migration.data.close()
        self.devices = [migration for migration in self.devices if migration.name != name]
        self.by_iova.discard(name)
        if name in self.iommu_logged:  # (the others are then untracked: sent whole, as is safe)
            try:
                self._stop_iommu_log()
            except VfioError as err:
                log.warning("%s", err)
        log_of_it = self.dma_logs.pop(name, None)
        if log_of_it is not None:
            try:
                log_of_it.stop()
            except VfioError as err:
                log.warning("%s", err)

    @property
    def untracked(self) -> list[str]:
        """The migrating devices whose DMA writes no log records."""
        logged = {*self.dma_logs, *self.iommu_logged}
        return [m.name for m in self.devices if m.name not in logged]

    # DirtySource

    def start(self) -> None:
        self._start_iommu_log()
        for name in self.untracked:
            why = (
                "its DMA log would name the guest's IOVAs (it is behind the guest's virtio-iommu)"
                if name in self.by_iova
                else "its driver logs no DMA writes"
            )
            log.warning(
                "%s: %s: every page mapped for its DMA goes again once it has stopped", name, why
            )
        started: list[DeviceDmaLog] = []
        try:
            for device_log in self.dma_logs.values():
                device_log.start()
                started.append(device_log)
        except BaseException:
            for device_log in started:
                device_log.stop()
            self._stop_iommu_log()
            raise

    def _start_iommu_log(self) -> None:
        """The IOMMU's dirty bits for the devices on iommufd that log nothing themselves;
        where it cannot keep them, those devices stay untracked (and the user is told why)."""
        wanted = [name for name in self.untracked if name not in self.by_iova]
        if not wanted or self.iommu_dirty is None:
            return
        try:
            iommu_log, covered = self.iommu_dirty(wanted)
            iommu_log.start()
        except VfioError as err:
            log.warning("%s", err)
            return
        self.iommu_log, self.iommu_logged = iommu_log, covered
        log.info("%s: DMA writes tracked by the IOMMU's dirty bits", ", ".join(covered))

    def _stop_iommu_log(self) -> None:
        iommu_log, self.iommu_log, self.iommu_logged = self.iommu_log, None, []
        if iommu_log is not None:
            iommu_log.stop()

    def collect(self) -> list[DirtyPages]:
        found: list[DirtyPages] = [
            pages for log_ in self.dma_logs.values() for pages in log_.collect()
        ]
        if self.iommu_log is not None:
            found.extend(self.iommu_log.collect())
        if self._paused and self.untracked:
            for gpa, size in sorted(self._mapped().items()):
                pages = size // PAGE_SIZE
                found.append(
                    LoggedPages(gpa, pages, ((1 << pages) - 1).to_bytes((pages + 7) // 8, "little"))
                )
        return found

    def stop(self) -> None:
        with contextlib.ExitStack() as stopping:
            stopping.callback(self._stop_iommu_log)
            for device_log in self.dma_logs.values():
                stopping.callback(device_log.stop)

    # Pausable

    def pause(self) -> None:
        """Every device to RUNNING_P2P (PRE_COPY_P2P if it is saving ahead; those with P2P),
        then every one to STOP (STOP_COPY if it is saving ahead: its data fd carries on); a
        device already stopped or being restored stays. Should one refuse, those already
        moved go back to RUNNING and the error is raised."""
        try:
            self._move_all(_PAUSE_P2P, p2p_only=True)
            self._move_all(_PAUSE_STOP)
        except VfioError:
            self.recover()
            raise
        self._paused = True

    def resume(self) -> None:
        """Every device to RUNNING_P2P (those with P2P), then every one to RUNNING; one that a
        failed save or restore left in ERROR is reset (and the user told)."""
        self._paused = False
        for migration in self.devices:
            if migration.current is State.ERROR:
                migration.recover()
        self._move_all(_RESUME_P2P, p2p_only=True)
        self._move_all(_RESUME_RUN)

    def _move_all(self, targets: dict[State, State], p2p_only: bool = False) -> None:
        """Each device in a state of `targets` to the state it maps to."""
        for migration in self.devices:
            if p2p_only and not migration.flags & Flag.P2P:
                continue
            target = targets.get(migration.current)
            if target is not None:
                migration.move_to(target)

    def recover(self) -> None:
        """After a failure: every device back in RUNNING (by a reset for one in ERROR), each
        one tried whatever the others do."""
        for migration in self.devices:
            try:
                migration.recover()
            except VfioError as err:
                log.error("%s", err)
