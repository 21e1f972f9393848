"""Snapshots: a paused machine written to a directory, and machines restored from one.

A snapshot directory holds two files:

- `state`: a VM state stream (stream.py): CONFIG, INFO, one COMPONENT per component, RAM_LAYOUT
  (where each RAM region is in `memory`), END;
- `memory`: guest RAM, sparse (memory_file.py).

It is written into a hidden directory beside the target, each file flushed to disk, and renamed
into place only once complete: a snapshot that failed half-way (a full disk) leaves nothing that
looks like one, and the running machine is not affected.

A restore reads and checks everything in `state` first (format, checksums, the configuration
against the memory file) and only then builds the machine. By default each RAM region maps the
memory file privately (MAP_PRIVATE): nothing is read until the guest touches it, so the cost
does not grow with RAM, and the guest's writes go to pages of its own, never into the file.
`copy=True` reads the file into fresh memfd RAM instead, as a machine built normally has: that is
what assigned devices' DMA needs (they pin shared pages), and what a machine to be snapshotted or
migrated again would rather have.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgpack

from pyvmm.board.devices import pins_guest_ram
from pyvmm.board.machine import Machine, SavedMachine
from pyvmm.errors import PyvmmError
from pyvmm.kvm.mmap import PAGE_SIZE
from pyvmm.machine import layout
from pyvmm.machine.component import SavedState
from pyvmm.machine.config import MachineConfig
from pyvmm.machine.console import Console
from pyvmm.machine.dirty import DirtyBitmap
from pyvmm.machine.memory import RamRegion
from pyvmm.machine.state import StateError, from_plain, to_plain
from pyvmm.migration import device_precopy, machine_sections, memory_file
from pyvmm.migration.memory_file import RamExtent
from pyvmm.migration.stream import SectionType, StreamError, StreamReader, StreamWriter

T = TypeVar("T")

STATE_FILE = "state"
MEMORY_FILE = "memory"
# the components' states and the devices' (DEVICE_STATE): larger is not a state file, and
# a snapshot whose devices' state would make it larger is refused when it is taken
MAX_STATE_FILE = 1 << 30


class SnapshotError(PyvmmError):
    """A snapshot cannot be written or read; the message says why and what to do."""


@dataclass(frozen=True)
class Snapshot:
    """A snapshot directory, read and checked: everything but the RAM itself."""

    directory: Path
    saved: SavedMachine
    info: dict[str, Any]
    ram: list[RamExtent]
    pages: list[PageMap] | None = None  # an incremental snapshot: the pages its memory holds
    parent: Snapshot | None = None  # the snapshot an incremental one builds on
    state_digest: str = ""  # the SHA-256 of the state file as it was read
    #: (component id, piece) of the devices' state read at the stop (device_precopy.py)
    device_states: tuple[tuple[str, bytes], ...] = ()

    @property
    def config(self) -> MachineConfig:
        return self.saved.config

    @property
    def layers(self) -> list[Snapshot]:
        """The full snapshot this one builds on, then each incremental one up to this one."""
        chain: list[Snapshot] = []
        layer: Snapshot | None = self
        while layer is not None:
            chain.append(layer)
            layer = layer.parent
        return chain[::-1]

    @property
    def memory_path(self) -> Path:
        return self.directory / MEMORY_FILE


@dataclass
class PageMap:
    """Which pages of one RAM region an incremental snapshot's memory file holds: bit i of
    `bitmap` (little-endian, as KVM's dirty log) for the page at gpa + i * 4096."""

    gpa: int
    pages: int
    bitmap: bytes

    def runs(self) -> list[tuple[int, int]]:
        """(offset in the region, length) of each run of pages held."""
        bitmap = DirtyBitmap(self.gpa, self.pages, self.bitmap, bytes(len(self.bitmap)))
        return [(gpa - self.gpa, size) for gpa, size in bitmap.ranges()]


@dataclass(frozen=True)
class SnapshotStats:
    """What writing a snapshot took."""

    seconds: float
    ram_bytes: int  # the guest's RAM
    written_bytes: int  # of it, what was not zero (the memory file's data)


# writing


def check_savable(machine: Machine, *, allow_device_reset: bool, incremental: bool) -> None:
    """SnapshotError if a part of `machine` cannot save all of its state (a passed-through
    device) and that was not allowed, or the snapshot is incremental: what such a device
    writes to RAM is not in the dirty log. Refused outright while RAM is not all there (a
    post-copy migration is still bringing it in)."""
    if machine.memory.missing:
        raise SnapshotError(f"cannot snapshot this machine yet: {machine.memory.missing}")
    caveats = machine.components.caveats()
    if not caveats:
        return
    first, caveat = next(iter(caveats.items()))
    if not allow_device_reset:
        raise SnapshotError(
            f"{first}: {caveat}; snapshot anyway with --allow-device-reset if its guest copes "
            "with that"
        )
    if incremental:
        raise SnapshotError(
            f"{first}: what a passed-through device writes to RAM is not in the dirty log, so "
            "an incremental snapshot would miss it: take a full one"
        )


def write(
    machine: Machine,
    directory: str | os.PathLike[str],
    info: dict[str, Any],
    *,
    parent: str | os.PathLike[str] | None = None,
    dirty: list[DirtyBitmap] | None = None,
    allow_device_reset: bool = False,
) -> SnapshotStats:
    """Write the machine, which must not be running (pause it), to a new `directory`. With
    `parent` (a snapshot of this machine) and `dirty` (the machine's dirty log collected
    since that snapshot was written), write an incremental snapshot: the state in full, but
    of RAM only the pages in `dirty`; a restore layers it on its parent. A machine with a
    part whose state cannot be saved whole (a passed-through device) is refused unless
    `allow_device_reset`: restored, that device is as reset."""
    started = time.monotonic()
    check_savable(machine, allow_device_reset=allow_device_reset, incremental=parent is not None)
    target = Path(directory)
    if target.exists():
        raise SnapshotError(f"{target} exists: give a new directory for the snapshot")
    if not target.parent.is_dir():
        raise SnapshotError(f"{target.parent} is not a directory: create it first")
    pages: list[PageMap] | None = None
    if parent is not None:
        if dirty is None:
            raise ValueError("an incremental snapshot needs the dirty log since its parent")
        parent_path = Path(parent).absolute()
        info = {**info, "parent": str(parent_path), "parent_state": _state_digest(parent_path)}
        pages = [PageMap(bitmap.gpa, bitmap.pages, bitmap.bitmap) for bitmap in dirty]
    device_states = list(device_precopy.stopped_states(machine.components))
    saved = machine.save()
    partial = target.parent / f".{target.name}.partial-{os.getpid()}"
    try:
        partial.mkdir()
        extents = memory_file.layout_regions(machine.memory.regions)
        written = _write_memory(machine, partial / MEMORY_FILE, extents, pages)
        _write_state(partial / STATE_FILE, saved, info, extents, pages, device_states)
        _fsync_dir(partial)
        partial.rename(target)
        _fsync_dir(target.parent)
    except OSError as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise SnapshotError(_write_failure(target, err)) from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return SnapshotStats(time.monotonic() - started, machine.memory.size, written)


def _write_memory(
    machine: Machine, path: Path, extents: list[RamExtent], pages: list[PageMap] | None
) -> int:
    by_gpa = {region.gpa: region for region in machine.memory.regions}
    held = {page_map.gpa: page_map for page_map in pages or ()}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, sum(extent.size for extent in extents))
        written = 0
        for extent in extents:
            region = by_gpa[extent.gpa]
            if pages is None:
                written += memory_file.write_region(region, fd, extent.offset)
            elif extent.gpa in held:
                runs = held[extent.gpa].runs()
                written += memory_file.write_runs(region, runs, fd, extent.offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def _write_state(
    path: Path,
    saved: SavedMachine,
    info: dict[str, Any],
    extents: list[RamExtent],
    pages: list[PageMap] | None,
    device_states: list[tuple[str, bytes]],
) -> None:
    with open(path, "xb") as file:
        writer = StreamWriter(file)
        writer.section(SectionType.CONFIG, machine_sections.encode_config(saved.config))
        writer.section(SectionType.INFO, machine_sections.encode_info(info))
        for component_id, piece in device_states:
            device_precopy.write_stopped_state(writer, component_id, piece)
        for state in saved.components:
            writer.section(SectionType.COMPONENT, machine_sections.encode_component(state))
        ram = msgpack.packb([to_plain(extent) for extent in extents])
        writer.section(SectionType.RAM_LAYOUT, ram)
        if pages is not None:
            writer.section(SectionType.PAGE_MAP, msgpack.packb([to_plain(p) for p in pages]))
        writer.end()
        if file.tell() > MAX_STATE_FILE:
            raise SnapshotError(
                f"the machine's state is {file.tell() >> 20} MiB with its devices' (a device's "
                f"own state is most of it), more than a snapshot holds ({MAX_STATE_FILE >> 20} "
                "MiB): migrate the machine instead, which has no such limit"
            )
        os.fsync(file.fileno())


def _state_digest(directory: Path) -> str:
    """What identifies a snapshot's state (its state file's SHA-256): an incremental snapshot
    records its parent's, so that a parent replaced since is noticed."""
    try:
        return hashlib.sha256((directory / STATE_FILE).read_bytes()).hexdigest()
    except OSError as err:
        raise SnapshotError(
            f"the previous snapshot {directory} cannot be read ({err.strerror}): take a full "
            "snapshot"
        ) from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_failure(target: Path, err: OSError) -> str:
    if err.errno == errno.ENOSPC:
        return (
            f"no space left on the device for the snapshot {target}: nothing was kept; free "
            "some space or write it elsewhere"
        )
    return f"cannot write the snapshot {target}: {err.strerror or err}"


# reading


MAX_LAYERS = 64  # incremental snapshots on one full one


def read(directory: str | os.PathLike[str], _depth: int = 0) -> Snapshot:
    """Read and check a snapshot directory's state (not its RAM), and for an incremental one,
    its parents' down to the full snapshot."""
    source = Path(directory)
    state_path = source / STATE_FILE
    what = f"snapshot {source}"
    if not state_path.is_file():
        raise SnapshotError(f"{source} is not a pyvmm snapshot (it has no {STATE_FILE} file)")
    try:
        # Read once: what is checked, parsed and digested (a child's record of its parent)
        # is the same bytes, whatever happens to the file meanwhile.
        with open(state_path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size > MAX_STATE_FILE:
                raise SnapshotError(f"{what} is corrupt: its {STATE_FILE} file is over 1 GiB")
            state = file.read(size + 1)  # (one that grew meanwhile has data after its END)
        with io.BytesIO(state) as file:
            reader = StreamReader(file, f"{what}'s {STATE_FILE}")
            config = machine_sections.decode_config(reader.next(), what)
            info: dict[str, Any] = {}
            components: list[SavedState] = []
            device_states: list[tuple[str, bytes]] = []
            ram: list[RamExtent] | None = None
            pages: list[PageMap] | None = None
            for section in reader.sections():
                if section.type == SectionType.INFO and not info:
                    info = machine_sections.decode_info(section, what)
                elif section.type == SectionType.DEVICE_STATE and not components:
                    device_states.append(device_precopy.decode_stopped_state(section, what))
                elif section.type == SectionType.COMPONENT and ram is None:
                    components.append(machine_sections.decode_component(section, what))
                elif section.type == SectionType.RAM_LAYOUT and ram is None:
                    ram = _decode_list(RamExtent, section.payload, f"{what}: RAM layout")
                elif section.type == SectionType.PAGE_MAP and ram is not None and pages is None:
                    pages = _decode_list(PageMap, section.payload, f"{what}: page map")
                else:
                    name = SectionType(section.type).name
                    raise StreamError(
                        f"{what}: a {name} section out of place at byte {section.offset}"
                    )
            if ram is None:
                raise StreamError(f"{what} has no RAM layout")
            reader.expect_eof()
    except OSError as err:
        raise SnapshotError(f"cannot read {state_path}: {err.strerror or err}") from None
    except StateError as err:
        raise SnapshotError(str(err)) from None
    except RecursionError:
        raise SnapshotError(f"{what} is corrupt: too deeply nested") from None
    parent = _read_parent(source, info, pages, _depth)
    saved = SavedMachine(config, components)
    digest = hashlib.sha256(state).hexdigest()
    snapshot = Snapshot(source, saved, info, ram, pages, parent, digest, tuple(device_states))
    _check_ram(snapshot)
    return snapshot


def _read_parent(
    source: Path, info: dict[str, Any], pages: list[PageMap] | None, depth: int
) -> Snapshot | None:
    """The parent of an incremental snapshot, read and checked against what it recorded."""
    what = f"snapshot {source}"
    recorded = info.get("parent")
    if (recorded is None) != (pages is None):
        raise SnapshotError(f"{what} is corrupt: a page map without a parent, or the reverse")
    if recorded is None:
        return None
    if not isinstance(recorded, str) or not isinstance(info.get("parent_state"), str):
        raise SnapshotError(f"{what} is corrupt: its parent is not named")
    if depth >= MAX_LAYERS:
        raise SnapshotError(f"{what} builds on more than {MAX_LAYERS} snapshots (a cycle?)")
    parent_path = Path(recorded)
    if not parent_path.is_dir():
        raise SnapshotError(
            f"{what} is incremental on {parent_path}, which is gone: restore needs it"
        )
    parent = read(parent_path, depth + 1)
    if parent.state_digest != info["parent_state"]:
        raise SnapshotError(
            f"{what} is incremental on {parent_path}, which has changed since (not the "
            "snapshot it was taken on)"
        )
    return parent


def _decode_list(kind: type[T], payload: bytes, what: str) -> list[T]:
    items = machine_sections.unpack(payload, what)
    if not isinstance(items, list):
        raise StreamError(f"{what} is not a list")
    return [from_plain(kind, item, f"{what}[{i}]") for i, item in enumerate(items)]


def _check_ram(snapshot: Snapshot) -> None:
    """The RAM layout must be the one the configuration builds, inside the memory file; an
    incremental snapshot's page map must cover the same regions, and its parent must be of
    the same machine."""
    what = f"snapshot {snapshot.directory}"
    expected = [(r.gpa, r.size) for r in layout.ram_ranges(snapshot.config.mem_size)]
    if [(e.gpa, e.size) for e in snapshot.ram] != expected:
        raise SnapshotError(
            f"{what} is corrupt: its RAM layout does not match its "
            f"{snapshot.config.mem_size >> 20} MiB configuration"
        )
    if snapshot.parent is not None and snapshot.parent.config != snapshot.config:
        raise SnapshotError(
            f"{what} is of another machine than its parent {snapshot.parent.directory}"
        )
    for page_map in snapshot.pages or ():
        sizes = {gpa: size for gpa, size in expected}
        if (
            sizes.get(page_map.gpa, -1) != page_map.pages * PAGE_SIZE
            or len(page_map.bitmap) != (page_map.pages + 7) // 8
        ):
            raise SnapshotError(f"{what} is corrupt: its page map does not fit its RAM")
    try:
        size = snapshot.memory_path.stat().st_size
    except OSError as err:
        raise SnapshotError(f"{what} has no usable {MEMORY_FILE} file: {err.strerror}") from None
    for extent in snapshot.ram:
        if extent.offset % PAGE_SIZE or extent.offset < 0:
            raise SnapshotError(f"{what} is corrupt: {extent.name} is at an unaligned offset")
        if extent.offset + extent.size > size:
            raise SnapshotError(
                f"{what}: its {MEMORY_FILE} file is {size} bytes, too short for "
                f"{snapshot.config.mem_size >> 20} MiB of RAM (truncated?)"
            )


# restoring


def restore(
    snapshot: Snapshot,
    console: Console | None = None,
    *,
    copy: bool | None = None,
    trace_exits: bool = False,
    hosts: dict[str, str] | None = None,
) -> Machine:
    """A machine built from the snapshot's configuration holding its RAM and state, not yet
    started (`start()` or `run()` it). Its RAM maps the memory file privately, or with `copy`
    is read into fresh memfd RAM; by default it is copied only for a machine with a device
    that pins RAM for DMA (an assigned device): the pin would read all of a mapping anyway,
    breaking its copy-on-write page by page, which takes about twice as long as the copy
    (measured in the lab), and a memfd can be given to the IOMMU by file. The RAM of an
    incremental snapshot is its full snapshot's, mapped or copied, with each later layer's
    pages copied over it in turn. `hosts` moves assigned devices to other host devices
    (MachineConfig.with_hosts)."""
    config = snapshot.config.with_hosts(hosts or {})
    if copy is None:
        copy = any(pins_guest_ram(device.kind) for device in config.devices)
    layers = snapshot.layers
    fds: list[int] = []
    try:
        for layer in layers:
            fds.append(os.open(layer.memory_path, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as err:
        for fd in fds:
            os.close(fd)
        raise SnapshotError(f"cannot open {layer.memory_path}: {err.strerror}") from None

    def ram(gpa: int, size: int, name: str) -> RamRegion:
        base = _extent(layers[0], gpa)
        if copy:
            region = RamRegion(gpa, size, name)
        else:
            region = RamRegion(gpa, size, name, fd=fds[0], offset=base.offset, private=True)
        try:
            if copy:
                memory_file.load_region(region, fds[0], base.offset)
            for layer, fd in zip(layers[1:], fds[1:], strict=True):
                page_map = next((m for m in layer.pages or () if m.gpa == gpa), None)
                if page_map is not None:
                    runs = page_map.runs()
                    memory_file.load_runs(region, runs, fd, _extent(layer, gpa).offset)
        except BaseException:
            region.close()
            raise
        return region

    try:
        machine = Machine.from_config(config, console, trace_exits=trace_exits, ram=ram)
    except OSError as err:
        raise SnapshotError(f"cannot restore {snapshot.directory}: {err.strerror or err}") from None
    finally:
        for fd in fds:
            os.close(fd)
    try:
        where = f"snapshot {snapshot.directory}: its device state"
        for component_id, piece in snapshot.device_states:
            device_precopy.load_stopped_state(machine.components, component_id, piece, where)
        machine.restore(SavedMachine(config, snapshot.saved.components))
    except BaseException:
        machine.close()
        raise
    return machine


def _extent(snapshot: Snapshot, gpa: int) -> RamExtent:
    return next(extent for extent in snapshot.ram if extent.gpa == gpa)
