"""A VFIO device's migration through the v2 uAPI, one arc at a time (states.py draws the map).

    migration = DeviceMigration(vfio_device)     # VFIO_DEVICE_FEATURE_MIGRATION: its flags
    migration.state                               # GET VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
    data = migration.move_to(State.STOP_COPY)     # SET, arc by arc: RUNNING -> ... -> STOP_COPY
    saved = data.read_all()                       # the device's state, read to the end
    migration.move_to(State.RUNNING)              # (the data fd is closed by then)

An arc into a state where data moves hands out a data fd (`MigrationData`, kept as `data`
until the transfer is left; from a PRE_COPY state into STOP_COPY the same fd carries on): read
it in STOP_COPY or a PRE_COPY state (`precopy_info()` says how much there is,
VFIO_MIG_GET_PRECOPY_INFO), write it in RESUMING. Every arc taken is logged and kept in `arcs`
(in order), so that a learner, or a test checking the P2P order across devices, sees exactly
what the kernel was asked.
A failed arc leaves the device where the kernel says it is (ERROR, often): `recover()` resets
a device in ERROR back to RUNNING.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
from collections.abc import Iterator
from typing import Any

from pyvmm.kvm.fd import FdOwner
from pyvmm.uapi import vfio as uapi
from pyvmm.uapi.ioctl import IoctlError, ioctl
from pyvmm.uapi.vfio import VfioDeviceState as State
from pyvmm.uapi.vfio import VfioMigrationFlag as Flag
from pyvmm.vfio.device import VfioDevice
from pyvmm.vfio.errors import VfioError
from pyvmm.vfio.migration.states import TRANSFER_STATES, ForbiddenArc, path

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20  # bytes a data fd read asks for at once

#: Arcs taken by several devices, in the order the kernel was asked: (device, from, to).
Journal = list[tuple[str, State, State]]


@functools.cache
def _request_type(payload: type[ctypes.Structure]) -> type[ctypes.Structure]:
    """struct vfio_device_feature followed by one feature's data."""
    return type(
        f"vfio_device_feature_{payload.__name__}",
        (ctypes.Structure,),
        {"_fields_": [("header", uapi.vfio_device_feature), ("data", payload)]},
    )


def feature(
    device: VfioDevice, index: uapi.VfioDeviceFeature, direction: int, data: ctypes.Structure
) -> ctypes.Structure:
    """VFIO_DEVICE_FEATURE `index` with `data` (GET or SET, `direction`); the data as the
    kernel left it."""
    request = _request_type(type(data))()
    request.header.argsz = ctypes.sizeof(request)
    request.header.flags = int(index) | direction
    request.data = data
    ioctl(device.fd, uapi.VFIO_DEVICE_FEATURE, request, name=f"VFIO_DEVICE_FEATURE {index.name}")
    return request.data


class MigrationData(FdOwner):
    """The data fd of a transfer: the device's state to read (saving) or to write (RESUMING)."""

    def __init__(self, fd: int, state: State) -> None:
        self.fd = fd
        self.opened_in = state

    def read_all(self) -> bytes:
        """Everything the device has to give now, to the end (a read of 0 bytes)."""
        chunks = []
        while chunk := os.read(self.fd, READ_CHUNK):
            chunks.append(chunk)
        return b"".join(chunks)

    def read_pieces(self, size: int) -> Iterator[bytes]:
        """Everything the device has to give now, to the end, in pieces of at most `size`
        bytes (a device's stopped state may be larger than is wise to hold at once)."""
        piece = bytearray()
        while chunk := os.read(self.fd, min(READ_CHUNK, size - len(piece))):
            piece += chunk
            if len(piece) == size:
                yield bytes(piece)
                piece.clear()
        if piece:
            yield bytes(piece)

    def read_available(self) -> bytes:
        """In a PRE_COPY state: what the device has for now (its read ends with ENOMSG once
        the initial and dirty bytes are out, where STOP_COPY's would end with 0)."""
        chunks = []
        try:
            while chunk := os.read(self.fd, READ_CHUNK):
                chunks.append(chunk)
        except OSError as err:
            if err.errno != errno.ENOMSG:
                raise
        return b"".join(chunks)

    def write_all(self, data: bytes | memoryview) -> None:
        """Give the device its saved state (RESUMING)."""
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def precopy_info(self) -> tuple[int, int]:
        """In a PRE_COPY state: (initial_bytes, dirty_bytes) still to read
        (VFIO_MIG_GET_PRECOPY_INFO)."""
        info = uapi.vfio_precopy_info(argsz=ctypes.sizeof(uapi.vfio_precopy_info))
        ioctl(self.fd, uapi.VFIO_MIG_GET_PRECOPY_INFO, info)
        return info.initial_bytes, info.dirty_bytes


class DeviceMigration:
    """The migration of `device`: its flags, its state, and the arcs between states."""

    def __init__(self, device: VfioDevice, journal: Journal | None = None) -> None:
        self.device = device
        self.flags = self._probe()
        self.arcs: list[tuple[State, State]] = []  # every arc taken, in order
        self._journal = journal  # shared with the machine's other devices (group.py)
        self.data: MigrationData | None = None  # the data fd of the transfer under way
        self._known: State | None = None  # the state as last set or read (None: ask)

    @property
    def name(self) -> str:
        return self.device.name

    def _probe(self) -> Flag:
        try:
            found = self._get(
                uapi.VfioDeviceFeature.MIGRATION, uapi.vfio_device_feature_migration()
            )
        except IoctlError as err:
            if err.errno == errno.ENOTTY:  # (no migration driver ops at all)
                return Flag(0)
            raise VfioError(f"{self.name}: cannot ask whether it migrates: {err}") from None
        return Flag(found.flags)

    def _get(self, index: uapi.VfioDeviceFeature, data: ctypes.Structure) -> Any:
        return feature(self.device, index, uapi.VfioDeviceFeatureFlag.GET, data)

    def missing(self) -> str:
        """Why this device cannot migrate ("" if it can)."""
        if not self.flags & Flag.STOP_COPY:
            return "its driver has no VFIO migration (VFIO_DEVICE_FEATURE_MIGRATION)"
        return ""

    @property
    def state(self) -> State:
        """The state the kernel says the device is in (asked now)."""
        found = self._get(
            uapi.VfioDeviceFeature.MIG_DEVICE_STATE, uapi.vfio_device_feature_mig_state()
        )
        self._known = State(found.device_state)
        return self._known

    @property
    def current(self) -> State:
        """The state the device is in: as the last arc left it, or asked if not known. Only
        pyvmm's arcs and a reset move a device, so this saves a downtime an ioctl an arc."""
        return self._known if self._known is not None else self.state

    def move_to(self, target: State) -> MigrationData | None:
        """Take the device to `target` one arc at a time (states.path), each logged; the data
        fd of the transfer `target` is in (`data`: opened on the way, or carried on from a
        PRE_COPY state into the next saving state), None where no data moves. A fd is closed
        once its transfer is left. ForbiddenArc, before any ioctl, for a state this device
        cannot reach; VfioError naming the arc the kernel refused."""
        if missing := self.missing():
            raise VfioError(f"{self.name}: {missing}")
        start = self.current
        try:
            way = path(start, target, self.flags)
        except ForbiddenArc as err:
            raise ForbiddenArc(f"{self.name}: {err}") from None
        current = start
        for following in way:
            opened = self._arc(current, following)
            if opened is not None:
                self._close_data()
                self.data = opened
            current = following
        if target not in TRANSFER_STATES:
            self._close_data()
        return self.data

    def _close_data(self) -> None:
        if self.data is not None:
            self.data.close()
            self.data = None

    def _arc(self, current: State, following: State) -> MigrationData | None:
        request = uapi.vfio_device_feature_mig_state(device_state=following, data_fd=-1)
        try:
            done = feature(
                self.device,
                uapi.VfioDeviceFeature.MIG_DEVICE_STATE,
                uapi.VfioDeviceFeatureFlag.SET,
                request,
            )
        except IoctlError as err:
            self._known = None
            now = self._state_after_failure()
            raise VfioError(
                f"{self.name}: {current.name} -> {following.name} failed "
                f"({os.strerror(err.errno)}); the device is in {now}"
            ) from None
        self._known = following
        self.arcs.append((current, following))
        if self._journal is not None:
            self._journal.append((self.name, current, following))
        log.info("%s: migration state %s -> %s", self.name, current.name, following.name)
        return MigrationData(done.data_fd, following) if done.data_fd >= 0 else None

    def _state_after_failure(self) -> str:
        try:
            return self.state.name
        except (IoctlError, ValueError) as err:
            return f"an unknown state ({err})"

    def data_size(self) -> int:
        """What STOP_COPY would give, as the device estimates it now (MIG_DATA_SIZE)."""
        found = self._get(
            uapi.VfioDeviceFeature.MIG_DATA_SIZE, uapi.vfio_device_feature_mig_data_size()
        )
        return int(found.stop_copy_length)

    def recover(self) -> None:
        """After a failed migration: the device back in RUNNING, by its arcs if it can take
        them, else by a reset (VFIO_DEVICE_RESET puts a migrating device in RUNNING), which
        the user is told of: the device's state is then its reset state."""
        state = self.state
        if state is not State.ERROR:
            try:
                self.move_to(State.RUNNING)
                return
            except VfioError as err:
                log.warning("%s", err)
        log.warning("%s: its migration failed in %s: resetting the device", self.name, state.name)
        self._known = None
        self.device.reset()
        self._close_data()
        if (now := self.state) is not State.RUNNING:
            raise VfioError(f"{self.name}: still in {now.name} after a reset")
