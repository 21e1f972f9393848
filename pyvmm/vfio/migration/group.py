"""A machine's migrating VFIO devices, stopped and started together in the order P2P asks for.

vfio.h's RUNNING_P2P exists for machines with more than one device: a device in it no longer
starts DMA to its peers (nor takes on new requests from them) but still answers what they sent
before. So that no device is stopped while a peer may still be writing to it, every device
reaches RUNNING_P2P before any goes on to STOP; and so that none runs before its peers can take
its requests, every device leaves STOP (or RESUMING) for RUNNING_P2P before any goes on to
RUNNING. QEMU orders its devices the same way (vfio_vmstate_change_prepare).

`MigratingDevices` is one machine component for all of them: pausing the machine takes each
device to RUNNING_P2P, then each to STOP (its DMA into RAM has ended when the pause returns, so
the last look at the dirty log misses nothing), and resuming goes back the same way. Every arc
any device takes goes into `journal` (device, from, to), in the order the kernel was asked, so
that a test can check the order and a learner can read it. The devices' data themselves are
each VfioPciFunction's to save and restore, with the rest of its state.
"""

from __future__ import annotations

import logging

from pyvmm.uapi.vfio import VfioDeviceState as State
from pyvmm.uapi.vfio import VfioMigrationFlag as Flag
from pyvmm.vfio.device import VfioDevice
from pyvmm.vfio.errors import VfioError
from pyvmm.vfio.migration.device import DeviceMigration, Journal

log = logging.getLogger(__name__)


class MigratingDevices:
    """The devices of one machine that migrate (their flags say STOP_COPY)."""

    def __init__(self) -> None:
        self.devices: list[DeviceMigration] = []
        self.journal: Journal = []  # every arc of every device, in order: (name, from, to)

    def add(self, device: VfioDevice) -> DeviceMigration:
        """The migration of `device`, probed; a device that migrates joins the group (one that
        does not is only asked why: `migration.missing()`)."""
        migration = DeviceMigration(device, journal=self.journal)
        if not migration.missing():
            self.devices.append(migration)
        return migration

    def forget(self, name: str) -> None:
        """Device `name` is going (closed, or its assignment failed)."""
        self.devices = [migration for migration in self.devices if migration.name != name]

    # Pausable

    def pause(self) -> None:
        """Every device to RUNNING_P2P (those with P2P), then every one to STOP; should one
        refuse, those already moved go back to RUNNING and the error is raised."""
        self._move_all([(State.RUNNING_P2P, True), (State.STOP, False)], undo=State.RUNNING)

    def resume(self) -> None:
        """Every device to RUNNING_P2P (those with P2P), then every one to RUNNING."""
        self._move_all([(State.RUNNING_P2P, True), (State.RUNNING, False)], undo=None)

    def _move_all(self, steps: list[tuple[State, bool]], undo: State | None) -> None:
        try:
            for target, needs_p2p in steps:
                for migration in self.devices:
                    if needs_p2p and not migration.flags & Flag.P2P:
                        continue
                    if migration.state is not target:
                        data = migration.move_to(target)
                        if data is not None:  # (no transfer ends in these states)
                            data.close()
        except VfioError:
            if undo is not None:
                self.recover()
            raise

    def recover(self) -> None:
        """After a failure: every device back in RUNNING (by a reset for one in ERROR), each
        one tried whatever the others do."""
        for migration in self.devices:
            try:
                migration.recover()
            except VfioError as err:
                log.error("%s", err)
