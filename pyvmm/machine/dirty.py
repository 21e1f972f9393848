"""Dirty-page tracking of guest RAM: KVM's dirty log merged with the pages pyvmm wrote itself
and those other sources report (a device's DMA).

KVM logs the pages the guest's vCPUs write (KVM_MEM_LOG_DIRTY_PAGES on each RAM slot). It never
sees pyvmm's own writes into guest RAM through the mapping: virtqueue used rings, block reads
landing in guest buffers, the loaders. Those reach `DirtyLog.mark` through GuestMemory's
`on_write` and are kept in a second bitmap per RAM region, as Firecracker keeps one. Nor does it
see what an assigned device writes by DMA: a `DirtySource` added to the log (the IOMMU's dirty
bits through iommufd, a device's own DMA logging) reports those, and is started and stopped
with the log. `collect()` reads and clears them all and returns one `DirtyBitmap` per RAM
region: the bitmaps themselves, not a Python object per page.

The log follows the address space: a RAM region added while logging is on is logged from then
on (and reported dirty in full, since nothing of it was ever collected).
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from pyvmm.kvm.mmap import PAGE_SIZE
from pyvmm.machine.address_space import AddressSpace
from pyvmm.machine.memory import MemoryRegion, RegionKind

_SET_BYTES = re.compile(rb"[^\x00]+")  # runs of bitmap bytes with a dirty page in each


def _bits_to_bytes(bits: int, pages: int) -> bytes:
    return bits.to_bytes((pages + 7) // 8, "little")


class DirtyPages(Protocol):
    """Pages a source found dirty: bit i of `bitmap` (little-endian) is the page at
    gpa + i * 4096."""

    @property
    def gpa(self) -> int: ...
    @property
    def pages(self) -> int: ...
    @property
    def bitmap(self) -> bytes: ...


class DirtySource(Protocol):
    """A writer of guest RAM that KVM's log does not see, able to say what it wrote: started
    with the log, read and cleared by each collect, stopped with it. `start` raises (and
    leaves nothing started) where it cannot track."""

    def start(self) -> None: ...
    def collect(self) -> Sequence[DirtyPages]: ...
    def stop(self) -> None: ...


@dataclass(frozen=True)
class DirtyBitmap:
    """The dirty pages of one RAM region: bit i of `kvm` (a vCPU wrote page i), of `vmm`
    (pyvmm wrote it) or of `dma` (a source of the log, a device, wrote it; empty if none),
    little-endian as KVM's log is; page i is at gpa + i * 4096."""

    gpa: int
    pages: int
    kvm: bytes
    vmm: bytes
    dma: bytes = b""

    @functools.cached_property
    def bitmap(self) -> bytes:
        """All of them merged: every page written since the last collect."""
        merged = (
            int.from_bytes(self.kvm, "little")
            | int.from_bytes(self.vmm, "little")
            | int.from_bytes(self.dma, "little")
        )
        return _bits_to_bytes(merged, self.pages)

    def __or__(self, other: DirtyBitmap) -> DirtyBitmap:
        """The pages dirty in either (of the same region: two collects in a row)."""
        if (self.gpa, self.pages) != (other.gpa, other.pages):
            raise ValueError("dirty bitmaps of different regions")

        def merged(a: bytes, b: bytes) -> bytes:
            bits = int.from_bytes(a, "little") | int.from_bytes(b, "little")
            return _bits_to_bytes(bits, self.pages)

        return DirtyBitmap(
            self.gpa,
            self.pages,
            merged(self.kvm, other.kvm),
            merged(self.vmm, other.vmm),
            merged(self.dma, other.dma) if self.dma or other.dma else b"",
        )

    def count(self) -> int:
        return int.from_bytes(self.bitmap, "little").bit_count()

    def __contains__(self, gpa: object) -> bool:
        if not isinstance(gpa, int) or not self.gpa <= gpa < self.gpa + self.pages * PAGE_SIZE:
            return False
        page = (gpa - self.gpa) // PAGE_SIZE
        return bool(self.bitmap[page // 8] >> (page % 8) & 1)

    def addresses(self, which: str = "both") -> Iterator[int]:
        """Guest-physical addresses of the dirty pages, ascending; `which` is "kvm", "vmm",
        "dma" or "both" (all). For tests and reports: a migration sends `ranges()`."""
        data = {"kvm": self.kvm, "vmm": self.vmm, "dma": self.dma, "both": self.bitmap}[which]
        for index, byte in enumerate(data):
            while byte:
                low = byte & -byte
                yield self.gpa + (index * 8 + low.bit_length() - 1) * PAGE_SIZE
                byte ^= low

    def ranges(self) -> list[tuple[int, int]]:
        """(gpa, size) of each run of consecutive dirty pages. The zero bytes between runs are
        skipped by a regex scan, in C: a sparse bitmap of a large region costs little."""
        runs: list[tuple[int, int]] = []
        for match in _SET_BYTES.finditer(self.bitmap):
            page, bits = match.start() * 8, int.from_bytes(match.group(), "little")
            while bits:
                clear = (bits & -bits).bit_length() - 1
                bits >>= clear
                page += clear
                dirty = (bits ^ (bits + 1)).bit_length() - 1  # the run of ones at the bottom
                runs.append((self.gpa + page * PAGE_SIZE, dirty * PAGE_SIZE))
                bits >>= dirty
                page += dirty
        return runs


class DirtyLog:
    """Dirty logging of every RAM region of an address space (a listener of it)."""

    def __init__(self, space: AddressSpace) -> None:
        self._space = space
        self._lock = threading.Lock()
        self._vmm: dict[MemoryRegion, bytearray] = {}  # while active
        self._sources: list[DirtySource] = []
        self._started: list[DirtySource] = []  # the sources logging now
        self.active = False
        space.listen(self)

    def add_source(self, source: DirtySource) -> None:
        """Merge what `source` reports from now on: started now if the log is on (raising if
        it cannot be), else with the log."""
        if self.active:
            source.start()
            self._started.append(source)
        self._sources.append(source)

    def remove_source(self, source: DirtySource) -> None:
        """Stop merging `source` (its device is going); if it is logging, what it found since
        the last collect is kept in the log (reported by the next one) and it is stopped."""
        self._sources.remove(source)
        if source in self._started:
            self._started.remove(source)
            try:
                self._keep(list(source.collect()))
            finally:
                source.stop()

    def start(self) -> None:
        """Log from now on: KVM's log on every RAM slot, pyvmm's own writes, and the sources;
        should a source refuse, nothing is left logging and its error is raised."""
        with self._lock:
            if self.active:
                return
            self.active = True
        for region in self._space.regions(RegionKind.RAM):
            self._log(region, full=False)
        self._space.memory.on_write = self.mark
        try:
            for source in self._sources:
                source.start()
                self._started.append(source)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Log no more; every source that was logging is stopped, whichever fails (the first
        error is raised once all have been asked)."""
        self._space.memory.on_write = None
        with self._lock:
            self.active = False
            regions = list(self._vmm)
            self._vmm.clear()
        started, self._started = self._started, []
        with contextlib.ExitStack() as stopping:
            for source in started:
                stopping.callback(source.stop)
            for region in regions:
                stopping.callback(self._space.set_dirty_logging, region, False)

    def _log(self, region: MemoryRegion, *, full: bool) -> None:
        pages = region.size // PAGE_SIZE
        bitmap = bytearray(_bits_to_bytes((1 << pages) - 1 if full else 0, pages))
        self._space.set_dirty_logging(region, True)
        with self._lock:
            self._vmm[region] = bitmap

    # the address space's listener

    def region_added(self, region: MemoryRegion) -> None:
        if self.active and region.kind is RegionKind.RAM:
            self._log(region, full=True)

    def region_removed(self, region: MemoryRegion) -> None:
        with self._lock:
            self._vmm.pop(region, None)

    # pyvmm's writes

    def mark(self, gpa: int, length: int) -> None:
        """pyvmm wrote guest RAM at gpa..gpa+length (any thread)."""
        if length <= 0:
            return
        with self._lock:
            for region, bitmap in self._vmm.items():
                if region.gpa <= gpa < region.end:
                    first = (gpa - region.gpa) // PAGE_SIZE
                    last = (min(gpa + length, region.end) - 1 - region.gpa) // PAGE_SIZE
                    for page in range(first, last + 1):
                        bitmap[page >> 3] |= 1 << (page & 7)
                    return

    def remark(self, collected: list[DirtyBitmap]) -> None:
        """Put what a `collect()` took back into the log (its reader could not use it), so the
        next collect reports those pages too."""
        with self._lock:
            for bitmap in collected:
                for region, vmm in self._vmm.items():
                    if region.gpa == bitmap.gpa and len(vmm) == len(bitmap.bitmap):
                        both = int.from_bytes(vmm, "little") | int.from_bytes(
                            bitmap.bitmap, "little"
                        )
                        vmm[:] = _bits_to_bytes(both, bitmap.pages)

    def _keep(self, reported: list[DirtyPages]) -> None:
        """Pages a source reported that no collect will return: into the log, so the next
        collect reports them (as pyvmm's own writes)."""
        with self._lock:
            for region, vmm in self._vmm.items():
                found = _within(region, reported)
                if found:
                    both = int.from_bytes(vmm, "little") | int.from_bytes(found, "little")
                    vmm[:] = _bits_to_bytes(both, region.size // PAGE_SIZE)

    # the query

    def collect(self) -> list[DirtyBitmap]:
        """Read and clear every log: one DirtyBitmap per RAM region, in address order."""
        if not self.active:
            raise RuntimeError("dirty logging is off; call start() first")
        reported: list[DirtyPages] = []
        try:
            for source in self._started:
                reported += source.collect()
        except BaseException:
            self._keep(reported)  # (what was read and cleared is not lost)
            raise
        result = []
        for region in self._space.regions(RegionKind.RAM):
            kvm = self._space.get_dirty_log(region)
            pages = region.size // PAGE_SIZE
            with self._lock:
                vmm = self._vmm.get(region)
                if vmm is None:
                    continue
                self._vmm[region] = bytearray(len(vmm))
            size = (pages + 7) // 8
            dma = _within(region, reported)
            result.append(DirtyBitmap(region.gpa, pages, kvm[:size], bytes(vmm), dma))
        return result


def _within(region: MemoryRegion, reported: list[DirtyPages]) -> bytes:
    """The pages of `region` that the sources reported, as a bitmap of the region's pages
    (b"" if none did): a source's ranges need not match the regions."""
    pages = region.size // PAGE_SIZE
    bits = 0
    for found in reported:
        if found.gpa % PAGE_SIZE:
            raise ValueError(f"a dirty source reported pages at {found.gpa:#x}, not page-aligned")
        first = (found.gpa - region.gpa) // PAGE_SIZE  # of the source's, in the region's pages
        if first >= pages or first + found.pages <= 0:
            continue
        ours = int.from_bytes(found.bitmap, "little") & ((1 << found.pages) - 1)
        bits |= ours << first if first >= 0 else ours >> -first
    return _bits_to_bytes(bits & ((1 << pages) - 1), pages) if bits else b""
