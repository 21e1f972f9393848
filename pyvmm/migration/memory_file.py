"""A snapshot's memory file: guest RAM, region after region, with zero pages left as holes.

Each RAM region takes `size` bytes of the file at a page-aligned offset (`RamExtent`), so that a
restore can map a region straight from the file. Writing skips what reads as zeros: ranges the
region's memfd never had (SEEK_HOLE: never faulted in, so not even read), and zero granules of
64 KiB within what it has; the file is a sparse file of the RAM's full length. Loading (the
`--copy` restore) copies only the file's data extents (SEEK_DATA) into a fresh region's memfd.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass

from pyvmm.kvm.mmap import PAGE_SIZE
from pyvmm.machine.memory import RamRegion

GRANULE = 16 * PAGE_SIZE  # the unit of "is this zero": 64 KiB (about 10 GB/s compared)
_ZERO = bytes(GRANULE)
_MAX_IO = 8 << 20  # bytes per pwrite/preadv


@dataclass
class RamExtent:
    """Where one RAM region is in the memory file."""

    name: str
    gpa: int
    size: int
    offset: int


def file_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each data extent of `fd` within start..end; holes are zeros. A file
    system without SEEK_DATA gives the whole range as data."""
    position = start
    while position < end:
        try:
            data = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # only a hole from here on
                return
            if err.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield position, end
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole
        position = hole


def _nonzero_runs(view: memoryview, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Runs of granules in view[start:end] that are not all zeros (start, end page aligned)."""
    run_start: int | None = None
    for at in range(start, end, GRANULE):
        stop = min(at + GRANULE, end)
        zero = view[at:stop].tobytes() == _ZERO[: stop - at]  # (a memoryview compares slowly)
        if zero and run_start is not None:
            yield run_start, at
            run_start = None
        elif not zero and run_start is None:
            run_start = at
    if run_start is not None:
        yield run_start, end


def region_extents(region: RamRegion) -> list[tuple[int, int]]:
    """(start, end) offsets in the region of what its file has (the rest was never touched
    and reads as zeros); a private mapping's pages may all be its own, so all of it."""
    if not region.shared:
        return [(0, region.size)]
    return [
        (lo - region.offset, hi - region.offset)
        for lo, hi in file_extents(region.fd, region.offset, region.offset + region.size)
    ]


def data_runs(region: RamRegion) -> Iterator[tuple[int, int]]:
    """(start, end) offsets in the region of runs that may hold something other than zeros."""
    for lo, hi in region_extents(region):
        yield from _nonzero_runs(region.view, lo, hi)


def write_region(region: RamRegion, fd: int, offset: int) -> int:
    """Write `region` into `fd` at `offset`, skipping zeros; returns the bytes written."""
    written = 0
    view = region.view
    for run_lo, run_hi in data_runs(region):
        for at in range(run_lo, run_hi, _MAX_IO):
            chunk = view[at : min(at + _MAX_IO, run_hi)]
            done = 0
            while done < len(chunk):
                done += os.pwrite(fd, chunk[done:], offset + at + done)
            written += len(chunk)
    return written


def write_runs(region: RamRegion, runs: list[tuple[int, int]], fd: int, offset: int) -> int:
    """Write the region's bytes at each (offset in the region, length) of `runs` into `fd` at
    `offset` plus the same offset (an incremental snapshot's pages); returns the bytes written."""
    view = region.view
    for start, length in runs:
        done = 0
        while done < length:
            done += os.pwrite(fd, view[start + done : start + length], offset + start + done)
    return sum(length for _, length in runs)


def load_runs(region: RamRegion, runs: list[tuple[int, int]], fd: int, offset: int) -> None:
    """Read each run of `runs` (as write_runs wrote them) from `fd` into the region."""
    view = region.view
    for start, length in runs:
        if os.preadv(fd, [view[start : start + length]], offset + start) != length:
            raise OSError(errno.EIO, f"short read of the memory file at byte {offset + start}")


def load_region(region: RamRegion, fd: int, offset: int) -> int:
    """Copy the region's pages from `fd` at `offset` into the region's (new, empty) memfd;
    returns the bytes copied. The kernel copies file to file (sendfile): reading into the
    mapping instead would take a page fault per page, about eight times slower."""
    if not region.shared:
        raise ValueError("only a region of its own memfd is loaded")
    loaded = 0
    for lo, hi in file_extents(fd, offset, offset + region.size):
        os.lseek(region.fd, lo - offset, os.SEEK_SET)
        at = lo
        while at < hi:
            sent = os.sendfile(region.fd, fd, at, hi - at)
            if sent <= 0:
                raise OSError(errno.EIO, f"the memory file ends early, at byte {at}")
            at += sent
        loaded += hi - lo
    return loaded


def layout_regions(regions: list[RamRegion]) -> list[RamExtent]:
    """Where each region goes in a new memory file: one after another, in address order."""
    extents, offset = [], 0
    for region in sorted(regions, key=lambda r: r.gpa):
        extents.append(RamExtent(region.name, region.gpa, region.size, offset))
        offset += region.size
    return extents
