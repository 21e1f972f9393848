"""Devices' state sent ahead of the stop (VFIO PRE_COPY), and the switch-over acknowledgement.

A device whose driver has PRE_COPY gives part of its state while it runs: on the source, a
live migration moves it from RUNNING to PRE_COPY with its first round of pages, and each round
reads what the device has for now and sends it as a DEVICE_DATA section (msgpack
`[component id, data, initial_done]`); a SAVING_AHEAD section (msgpack, the ids) names those
devices before the first of it. `initial_done` says that VFIO_MIG_GET_PRECOPY_INFO
reported no initial bytes left: what the device needs to have loaded before it can take the
rest quickly (for a NIC, its ring setup). On the destination, the first chunk takes the stopped
device to RESUMING and each chunk is written to its data fd; once every device the source
named has its initial bytes loaded, it answers `{"switchover_ack": true}` (a device that saves
ahead here but not on the source takes all its state at the stop, as one that never saves
ahead does), and
the source does not stop its machine before it has that answer (QEMU's switchover-ack, for the
same reason: loading the initial bytes can take long, and it must not take the downtime). At
the stop, the device goes from PRE_COPY_P2P to STOP_COPY on the same data fd, and what is left
is its saved state (VfioPciFunction.save), written on the destination after the chunks.

What MIG_DATA_SIZE says the stop would still read counts in the downtime estimate.

At the stop, every device that migrates gives the rest of its state (all of it, for one that
did not save ahead) in DEVICE_STATE sections (msgpack `[component id, piece]`, SECTION_DATA
bytes at most each) before the COMPONENT sections, so that a device's state has no size limit
but the device's own; the destination writes each piece to the device as it comes, and the
device's COMPONENT then holds none of it. A snapshot's state file carries them the same way.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import msgpack

from pyvmm.machine.component import Components
from pyvmm.machine.state import StateError
from pyvmm.migration.machine_sections import unpack, unpack_row
from pyvmm.migration.stream import Section, SectionFlag, SectionType, StreamError, StreamWriter
from pyvmm.uapi.ioctl import IoctlError
from pyvmm.vfio.errors import VfioError

log = logging.getLogger(__name__)

SECTION_DATA = 32 << 20  # bytes of device data a DEVICE_DATA section carries, at most


class DevicePrecopy:
    """The source's side: the parts of a machine that save ahead, and what they sent."""

    def __init__(self, parts: dict[str, Any]) -> None:
        self.parts = parts  # Components.precopy_parts()
        self.initial_done: set[str] = set()
        self.sent_bytes = 0
        self.rounds = 0

    def begin(self, writer: StreamWriter) -> None:
        """Every part to PRE_COPY (as the first round of pages starts), and the destination
        told which parts will send data ahead."""
        for component_id, part in self.parts.items():
            part.precopy_begin()
            log.info("%s: saving ahead (PRE_COPY)", component_id)
        if self.parts:
            # OPTIONAL: a destination that does not know it waits for all its own parts
            writer.section(
                SectionType.SAVING_AHEAD,
                msgpack.packb(list(self.parts), use_bin_type=True),
                flags=SectionFlag.OPTIONAL,
            )

    def send(self, writer: StreamWriter) -> None:
        """One round: what each part has for now, as DEVICE_DATA sections (one at least, with
        whether its initial bytes are out; a large chunk in pieces a section can hold)."""
        for component_id, part in self.parts.items():
            chunk, initial_done = part.precopy_read()
            if initial_done and component_id not in self.initial_done:
                self.initial_done.add(component_id)
                log.info("%s: its initial bytes are out", component_id)
            view = memoryview(chunk)
            for start in range(0, max(len(view), 1), SECTION_DATA):
                piece = bytes(view[start : start + SECTION_DATA])
                payload = [component_id, piece, component_id in self.initial_done]
                writer.section(SectionType.DEVICE_DATA, msgpack.packb(payload, use_bin_type=True))
            self.sent_bytes += len(chunk)
        if self.parts:
            self.rounds += 1

    @property
    def initial_sent(self) -> bool:
        return self.initial_done == set(self.parts)

    def stop_copy_bytes(self) -> int:
        """What the stop would still read of the parts, as they estimate it (0 where the
        driver cannot say)."""
        total = 0
        for part in self.parts.values():
            with contextlib.suppress(IoctlError, VfioError):
                total += part.stop_copy_bytes()
        return total

    def abort(self) -> None:
        """The migration failed before the stop: every part back to RUNNING (one whose
        begin or a read failed too, by a reset if it must)."""
        for part in self.parts.values():
            try:
                part.precopy_abort()
            except VfioError as err:
                log.error("%s", err)


def stopped_states(components: Components) -> Iterator[tuple[str, bytes]]:
    """At the stop (the machine paused): (component id, piece) of each part's state, read out
    in pieces a DEVICE_STATE section holds."""
    for component_id, part in components.stopped_state_parts().items():
        for piece in part.stop_copy_pieces(SECTION_DATA):
            yield component_id, piece


def write_stopped_state(writer: StreamWriter, component_id: str, piece: bytes) -> None:
    payload = msgpack.packb([component_id, piece], use_bin_type=True)
    writer.section(SectionType.DEVICE_STATE, payload)


def send_stopped_states(writer: StreamWriter, components: Components) -> int:
    """Each part's state read at the stop, sent ahead of the COMPONENT sections; the bytes."""
    sent = 0
    for component_id, piece in stopped_states(components):
        write_stopped_state(writer, component_id, piece)
        sent += len(piece)
    return sent


def decode_stopped_state(section: Section, what: str) -> tuple[str, bytes]:
    """A DEVICE_STATE section's (component id, piece), or a StreamError saying where."""
    where = f"{what}: the device state at byte {section.offset}"
    component_id, piece = unpack_row(section.payload, where, "[id, data]", str, bytes)
    return component_id, piece


def load_stopped_state(components: Components, component_id: str, piece: bytes, where: str) -> None:
    """Write one piece of a part's stopped state into it (RESUMING)."""
    part = components.stopped_state_parts().get(component_id)
    if part is None:
        raise StreamError(f"{where} is for {component_id!r}, which takes no device state here")
    _load_data(part, component_id, piece, "its state")


def _load_data(part: Any, component_id: str, data: bytes, what: str) -> None:
    """Write `data` into the part's device; a StateError naming it if the device refuses."""
    try:
        part.load_data(data)
    except (VfioError, OSError) as err:
        name = getattr(part, "name", component_id)
        raise StateError(f"{name}: the device refused {what}: {err}") from None


class DeviceLoader:
    """The destination's side: chunks into the parts, and the acknowledgement once every part
    the source saves ahead has its initial bytes (`acknowledge()` is called once)."""

    def __init__(self, components: Components, acknowledge: Callable[[], None]) -> None:
        self._components = components
        self.parts = components.precopy_parts()
        self._acknowledge = acknowledge
        #: the parts whose initial bytes the acknowledgement waits for: those the source names
        #: (all that save ahead here, for a source that names none)
        self.awaited: set[str] = set(self.parts)
        self._initial_done: set[str] = set()
        self.acknowledged = False
        self._named = self._loaded = False

    def expect(self, section: Section, what: str) -> None:
        """The SAVING_AHEAD section: the parts the source will send data ahead for (once, before
        any of their data)."""
        where = f"{what}: the list of devices saving ahead at byte {section.offset}"
        if self._named or self._loaded:
            raise StreamError(f"{where} comes after another or after the data it names")
        ids = unpack(section.payload, where)
        if not (isinstance(ids, list) and ids and all(isinstance(i, str) for i in ids)):
            raise StreamError(f"{where} is not a list of component ids")
        unable = [i for i in ids if i not in self.parts]
        if unable:
            raise StreamError(
                f"{where}: the source saves {', '.join(unable)} ahead (VFIO PRE_COPY), which "
                "cannot take data ahead here: pair it with a device whose driver has PRE_COPY"
            )
        self.awaited = set(ids)
        self._named = True

    def load(self, section: Section, what: str) -> None:
        where = f"{what}: the device data at byte {section.offset}"
        row = unpack_row(section.payload, where, "[id, data, initial_done]", str, bytes, bool)
        component_id, chunk, initial_done = row
        self._loaded = True
        part = self.parts.get(component_id)
        if part is None:
            raise StreamError(f"{where} is for {component_id!r}, which saves nothing ahead here")
        if component_id not in self.awaited:
            raise StreamError(f"{where} is for {component_id!r}, which the source did not name")
        _load_data(part, component_id, chunk, "the data sent ahead")
        if initial_done:
            self._initial_done.add(component_id)
        if not self.acknowledged and self._initial_done >= self.awaited:
            self.acknowledged = True
            self._acknowledge()

    def load_state(self, section: Section, what: str) -> None:
        """A DEVICE_STATE section: a piece of a device's state read at the stop."""
        component_id, piece = decode_stopped_state(section, what)
        where = f"{what}: the device state at byte {section.offset}"
        load_stopped_state(self._components, component_id, piece, where)
