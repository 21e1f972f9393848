"""Guest memory: the typed regions of the guest-physical map, and bounds-checked access to RAM.

A region is one of three kinds, as kvmtool's memory banks are:

- RAM: a memfd mapped shared into pyvmm. It is shared so that VFIO can pin the same pages for
  device DMA, a snapshot can write the fd's contents and a migration peer can map it. A machine
  restored from a snapshot may instead map the snapshot's memory file privately (lazily). RAM is a
  KVM memory slot, DMA-mapped for assigned devices (IOVA = guest-physical address) and
  dirty-logged while logging is on.
- DEVICE: host memory pyvmm does not own, such as the mmap of an assigned device's BAR, put
  into the guest as a KVM slot so that guest accesses never exit. It is never DMA-mapped and
  never dirty-logged, and it moves when the guest moves its BAR.
- RESERVED: guest-physical addresses nothing may occupy (KVM's TSS pages, the APIC windows),
  with no slot and no host memory, so that a hostile BAR cannot be placed over them.

The address space (pyvmm.machine.address_space) places regions and gives them KVM slots.
`GuestMemory` is the RAM part of the map: every read and write of guest RAM by pyvmm goes
through it, is checked to lie inside one RAM region, and every write is reported to `on_write`
(the dirty log's record of what the VMM wrote, which KVM's log never sees).
"""

from __future__ import annotations

import ctypes
import enum
import mmap as _mmap
import os
from collections.abc import Callable
from typing import BinaryIO

from pyvmm.kvm.mmap import PAGE_SIZE, Mapping, populate_write


class RegionKind(enum.Enum):
    RAM = "ram"
    DEVICE = "device"
    RESERVED = "reserved"


class MemoryRegion:
    """`size` bytes of the guest-physical map at `gpa`. `host_addr` is where a RAM or DEVICE
    region's memory is in this process (0 for RESERVED); `slot` is its KVM slot while the
    address space has it."""

    def __init__(
        self,
        kind: RegionKind,
        gpa: int,
        size: int,
        *,
        host_addr: int = 0,
        name: str = "",
        read_only: bool = False,
    ) -> None:
        if size <= 0 or size % PAGE_SIZE or gpa % PAGE_SIZE or host_addr % PAGE_SIZE:
            raise ValueError(f"region {name} {gpa:#x}+{size:#x} is not page aligned")
        if (kind is RegionKind.RESERVED) != (host_addr == 0):
            raise ValueError(f"region {name}: only a reserved region has no host memory")
        self.kind = kind
        self.gpa = gpa
        self.size = size
        self.host_addr = host_addr
        self.name = name or kind.value
        self.read_only = read_only
        self.slot: int | None = None

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.gpa + self.size

    def __repr__(self) -> str:
        return f"<{self.kind.value} {self.name} {self.gpa:#x}+{self.size:#x}>"


class RamRegion(MemoryRegion):
    """RAM at `gpa`: `size` bytes of a file mapped into this process, by default a new memfd
    mapped shared. `fd` and `offset` map another file instead (the region takes a duplicate of
    the descriptor): a snapshot's memory file, mapped `private`ly so that the guest's writes go
    to copy-on-write pages of this process and never into the file."""

    def __init__(
        self,
        gpa: int,
        size: int,
        name: str = "ram",
        *,
        fd: int | None = None,
        offset: int = 0,
        private: bool = False,
    ) -> None:
        if size <= 0 or size % PAGE_SIZE or gpa % PAGE_SIZE or offset % PAGE_SIZE:
            raise ValueError(f"RAM region {gpa:#x}+{size:#x} is not page aligned")
        if fd is None:
            self.fd = os.memfd_create(f"pyvmm-{name}", os.MFD_CLOEXEC)
        else:
            self.fd = os.dup(fd)
        self.offset = offset
        self.shared = not private
        try:
            if fd is None:
                os.ftruncate(self.fd, size)
            flags = _mmap.MAP_PRIVATE if private else _mmap.MAP_SHARED
            self.mapping = Mapping(size, self.fd, offset, flags=flags)
            super().__init__(RegionKind.RAM, gpa, size, host_addr=self.mapping.addr, name=name)
        except BaseException:
            os.close(self.fd)
            raise

    @property
    def view(self) -> memoryview:
        return self.mapping.view

    def close(self) -> None:
        self.mapping.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class GuestMemoryError(ValueError):
    """A guest-physical access fell outside guest RAM."""


class GuestMemory:
    """All RAM regions of a VM, with bounds-checked guest-physical reads and writes.

    `on_write(gpa, length)`, when set, hears of every write made through this object: after
    `write()` copied its bytes, when `writable()` hands out a view, and again when the writer
    of such a view reports with `written()` that it is done (so a write that spans a dirty-log
    read is not lost: the page is marked again after it).

    `before_access(gpa, length)`, when set, is called before any access is handed out, to make
    the pages there present: while a post-copy migration brings RAM in (postcopy.py), a Python
    thread that touched a page not yet there would fault holding the GIL, which the thread that
    fills the page needs. `missing` then says why RAM is not all here, for whatever would read
    it all (a snapshot, a migration onwards): "" once it is."""

    def __init__(self) -> None:
        self.regions: list[RamRegion] = []
        self.on_write: Callable[[int, int], None] | None = None
        self.before_access: Callable[[int, int], None] | None = None
        self.missing = ""

    def add(self, region: RamRegion) -> None:
        self.regions.append(region)
        self.regions.sort(key=lambda r: r.gpa)

    def region_for(self, gpa: int, length: int = 1) -> RamRegion:
        for region in self.regions:
            if region.contains(gpa, length):
                return region
        raise GuestMemoryError(f"guest-physical range {gpa:#x}+{length:#x} is not RAM")

    def slice(self, gpa: int, length: int) -> memoryview:
        """A view of guest RAM at `gpa` to read; the whole range must lie inside one region."""
        region = self._present(gpa, length)
        start = gpa - region.gpa
        return region.view[start : start + length]

    def copy_out(self, gpa: int, into: int, length: int) -> None:
        """Copy guest RAM at `gpa` to the address `into` with the GIL released, unlike a copy of
        `slice()`: a thread that copies megabytes while the guest runs (a migration's rounds)
        would otherwise hold up every vCPU exit handled meanwhile, each for a whole copy (in
        the lab's TCG, a 4 MiB copy takes milliseconds, and each byte to the console is an exit)."""
        region = self._present(gpa, length)
        ctypes.memmove(into, region.host_addr + gpa - region.gpa, length)

    def _present(self, gpa: int, length: int) -> RamRegion:
        """The region holding gpa..gpa+length, its pages there made present."""
        region = self.region_for(gpa, length)
        if self.before_access is not None:
            self.before_access(gpa, length)
        return region

    def writable(self, gpa: int, length: int) -> memoryview:
        """A view of guest RAM at `gpa` that the caller writes into (counted as written now;
        report `written()` when done if the writing may overlap a dirty-log read)."""
        view = self.slice(gpa, length)
        self.written(gpa, length)
        return view

    def written(self, gpa: int, length: int) -> None:
        """Report that pyvmm wrote guest RAM at gpa..gpa+length."""
        if self.on_write is not None:
            self.on_write(gpa, length)

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.slice(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.slice(gpa, len(data))[:] = data
        self.written(gpa, len(data))

    def write_pages(self, gpa: int, data: bytes | memoryview, *, populate: bool = False) -> None:
        """`write()` for many pages at once (a migration's): through the region's file where
        its pages are the file's, which spares a page fault for each page not touched yet
        (several times faster for fresh RAM). With `populate`, the pages are then faulted into
        the mapping in the kernel, so that the guest's first touch of each does not take a
        host page fault as well as KVM's: a migrated guest's first moments would go there."""
        region = self.region_for(gpa, len(data))
        if self.before_access is not None:
            self.before_access(gpa, len(data))
        if region.shared:
            at, done = region.offset + gpa - region.gpa, 0
            while done < len(data):
                done += os.pwrite(region.fd, data[done:], at + done)
            if populate:
                populate_write(region.host_addr + gpa - region.gpa, len(data))
        else:
            region.view[gpa - region.gpa : gpa - region.gpa + len(data)] = data
        self.written(gpa, len(data))

    def fill_from(self, gpa: int, file: BinaryIO, length: int) -> int:
        """Read up to `length` bytes of `file` straight into RAM at `gpa` (no copy through a
        bytes object: kernels are megabytes); returns how many bytes the file had."""
        view = self.writable(gpa, length)
        done = 0
        while done < length:
            count = file.readinto(view[done:])
            if not count:
                break
            done += count
        self.written(gpa, done)
        return done

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    def close(self) -> None:
        for region in self.regions:
            region.close()
        self.regions.clear()
