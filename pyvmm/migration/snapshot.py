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
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from pyvmm.errors import PyvmmError
from pyvmm.kvm.mmap import PAGE_SIZE
from pyvmm.machine import layout
from pyvmm.machine.component import SavedState
from pyvmm.machine.config import MachineConfig
from pyvmm.machine.console import Console
from pyvmm.machine.machine import Machine, SavedMachine
from pyvmm.machine.memory import RamRegion
from pyvmm.machine.state import StateError, from_plain, to_plain
from pyvmm.migration import memory_file, vmstate
from pyvmm.migration.memory_file import RamExtent
from pyvmm.migration.stream import SectionType, StreamError, StreamReader, StreamWriter

STATE_FILE = "state"
MEMORY_FILE = "memory"


class SnapshotError(PyvmmError):
    """A snapshot cannot be written or read; the message says why and what to do."""


@dataclass(frozen=True)
class Snapshot:
    """A snapshot directory, read and checked: everything but the RAM itself."""

    directory: Path
    saved: SavedMachine
    info: dict[str, Any]
    ram: list[RamExtent]

    @property
    def config(self) -> MachineConfig:
        return self.saved.config

    @property
    def memory_path(self) -> Path:
        return self.directory / MEMORY_FILE


@dataclass(frozen=True)
class SnapshotStats:
    """What writing a snapshot took."""

    seconds: float
    ram_bytes: int  # the guest's RAM
    written_bytes: int  # of it, what was not zero (the memory file's data)


# writing


def write(
    machine: Machine, directory: str | os.PathLike[str], info: dict[str, Any]
) -> SnapshotStats:
    """Write the machine, which must not be running (pause it), to a new `directory`."""
    started = time.monotonic()
    target = Path(directory)
    if target.exists():
        raise SnapshotError(f"{target} exists: give a new directory for the snapshot")
    if not target.parent.is_dir():
        raise SnapshotError(f"{target.parent} is not a directory: create it first")
    saved = machine.save()
    partial = target.parent / f".{target.name}.partial-{os.getpid()}"
    try:
        partial.mkdir()
        written = _write_memory(machine, partial / MEMORY_FILE)
        extents = memory_file.layout_regions(machine.memory.regions)
        _write_state(partial / STATE_FILE, saved, info, extents)
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


def _write_memory(machine: Machine, path: Path) -> int:
    extents = memory_file.layout_regions(machine.memory.regions)
    by_gpa = {region.gpa: region for region in machine.memory.regions}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, sum(extent.size for extent in extents))
        written = sum(memory_file.write_region(by_gpa[e.gpa], fd, e.offset) for e in extents)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def _write_state(
    path: Path, saved: SavedMachine, info: dict[str, Any], extents: list[RamExtent]
) -> None:
    with open(path, "xb") as file:
        writer = StreamWriter(file)
        writer.section(SectionType.CONFIG, vmstate.encode_config(saved.config))
        writer.section(SectionType.INFO, vmstate.encode_info(info))
        for state in saved.components:
            writer.section(SectionType.COMPONENT, vmstate.encode_component(state))
        ram = msgpack.packb([to_plain(extent) for extent in extents])
        writer.section(SectionType.RAM_LAYOUT, ram)
        writer.end()
        os.fsync(file.fileno())


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


def read(directory: str | os.PathLike[str]) -> Snapshot:
    """Read and check a snapshot directory's state (not its RAM)."""
    source = Path(directory)
    state_path = source / STATE_FILE
    what = f"snapshot {source}"
    if not state_path.is_file():
        raise SnapshotError(f"{source} is not a pyvmm snapshot (it has no {STATE_FILE} file)")
    try:
        with open(state_path, "rb") as file:
            reader = StreamReader(file, f"{what}'s {STATE_FILE}")
            config = vmstate.decode_config(reader.next(), what)
            info: dict[str, Any] = {}
            components: list[SavedState] = []
            ram: list[RamExtent] | None = None
            for section in reader.sections():
                if section.type == SectionType.INFO and not info:
                    info = vmstate.decode_info(section, what)
                elif section.type == SectionType.COMPONENT and ram is None:
                    components.append(vmstate.decode_component(section, what))
                elif section.type == SectionType.RAM_LAYOUT and ram is None:
                    ram = _decode_ram(section.payload, what)
                else:
                    name = SectionType(section.type).name
                    raise StreamError(
                        f"{what}: a {name} section out of place at byte {section.offset}"
                    )
            if ram is None:
                raise StreamError(f"{what} has no RAM layout")
    except OSError as err:
        raise SnapshotError(f"cannot read {state_path}: {err.strerror or err}") from None
    except StateError as err:
        raise SnapshotError(str(err)) from None
    snapshot = Snapshot(source, SavedMachine(config, components), info, ram)
    _check_ram(snapshot)
    return snapshot


def _decode_ram(payload: bytes, what: str) -> list[RamExtent]:
    try:
        items = msgpack.unpackb(payload, raw=False)
    except Exception as err:  # see vmstate.decode_component
        raise StreamError(f"{what}: its RAM layout cannot be decoded ({err})") from None
    if not isinstance(items, list):
        raise StreamError(f"{what}: its RAM layout is not a list")
    return [from_plain(RamExtent, item, f"{what}: RAM layout[{i}]") for i, item in enumerate(items)]


def _check_ram(snapshot: Snapshot) -> None:
    """The RAM layout must be the one the configuration builds, inside the memory file."""
    what = f"snapshot {snapshot.directory}"
    expected = [(r.gpa, r.size) for r in layout.ram_ranges(snapshot.config.mem_size)]
    if [(e.gpa, e.size) for e in snapshot.ram] != expected:
        raise SnapshotError(
            f"{what} is corrupt: its RAM layout does not match its "
            f"{snapshot.config.mem_size >> 20} MiB configuration"
        )
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
    copy: bool = False,
    trace_exits: bool = False,
) -> Machine:
    """A machine built from the snapshot's configuration holding its RAM and state, not yet
    started (`start()` or `run()` it)."""
    extents = {(e.gpa, e.size): e for e in snapshot.ram}
    try:
        fd = os.open(snapshot.memory_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise SnapshotError(f"cannot open {snapshot.memory_path}: {err.strerror}") from None

    def ram(gpa: int, size: int, name: str) -> RamRegion:
        extent = extents[(gpa, size)]
        if not copy:
            return RamRegion(gpa, size, name, fd=fd, offset=extent.offset, private=True)
        region = RamRegion(gpa, size, name)
        try:
            memory_file.load_region(region, fd, extent.offset)
        except BaseException:
            region.close()
            raise
        return region

    try:
        machine = Machine.from_config(snapshot.config, console, trace_exits=trace_exits, ram=ram)
    except OSError as err:
        raise SnapshotError(f"cannot restore {snapshot.directory}: {err.strerror or err}") from None
    finally:
        os.close(fd)
    try:
        machine.restore(snapshot.saved)
    except BaseException:
        machine.close()
        raise
    return machine
