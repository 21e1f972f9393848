"""Guest RAM in a migration stream: the page sections, written by the source and checked and
read by the destination.

A PAGES section is a u64 guest-physical address followed by the pages' bytes; ZERO_PAGES is a u64
address and a u64 length; PAGE_RUNS carries many short runs of pages, each with its address (a
round's dirty pages are scattered, and a section apiece would cost more than their bytes): a u32
count, count x (u64 address, u32 pages), then the runs' pages one after another. A section holds
at most CHUNK bytes of pages. The stream is untrusted: the destination checks a section's shape
(`page_writes`) before it writes any of it, and writes only inside its RAM.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable, Iterable

from pyvmm.kvm.mmap import PAGE_SIZE
from pyvmm.libc import libc
from pyvmm.machine.dirty import DirtyBitmap
from pyvmm.machine.memory import GuestMemory
from pyvmm.migration.stream import Section, SectionType, StreamWriter, section_name

CHUNK = 4 << 20  # bytes of pages per PAGES or PAGE_RUNS section
LONG_RUN = 64 << 10  # dirty pages in a run this long go in a PAGES section of their own
MAX_RUNS = 4096  # runs per PAGE_RUNS section
PAGE_SECTIONS = (SectionType.PAGES, SectionType.ZERO_PAGES, SectionType.PAGE_RUNS)
_ADDRESS = struct.Struct("<Q")
_RUN_COUNT = struct.Struct("<I")
_RUN = struct.Struct("<QI")  # a run's guest-physical address and its number of pages
_ZERO = struct.Struct("<QQ")
_ZERO_CHUNK = bytes(CHUNK)


# the source


class _PageCopy:
    """The sender's copy of the pages it sends next, at most CHUNK bytes, made and compared to
    zeros with the GIL released (GuestMemory.copy_out, memcmp): the guest runs meanwhile, and
    its vCPU threads need the GIL for every exit pyvmm handles. A copy, because the section's
    checksum must be of the bytes sent; valid until the next copy."""

    def __init__(self, memory: GuestMemory) -> None:
        self._memory = memory
        self._buffer = (ctypes.c_char * CHUNK)()
        self._address = ctypes.addressof(self._buffer)
        self._view = memoryview(self._buffer).cast("B")

    def copy(self, gpa: int, length: int, at: int = 0) -> memoryview:
        """Guest RAM at gpa..gpa+length, copied to `at` in the buffer: that part of it."""
        self._memory.copy_out(gpa, self._address + at, length)
        return self._view[at : at + length]

    def copied(self, length: int) -> memoryview:
        """The buffer's first `length` bytes, as the copies since the last section left them."""
        return self._view[:length]

    def zero(self, length: int) -> bool:
        """Whether the buffer's first `length` bytes are all zero."""
        return libc.memcmp(self._address, _ZERO_CHUNK, length) == 0


class PageSender:
    """Writes a machine's pages to a stream as page sections. `check()` is called before each
    section (it raises to end the sending: a cancelled migration)."""

    def __init__(self, memory: GuestMemory, check: Callable[[], None]) -> None:
        self._pages = _PageCopy(memory)
        self._check = check

    def send_runs(self, writer: StreamWriter, runs: Iterable[tuple[int, int]]) -> None:
        """Runs (gpa, size) of pages: the short ones many to a PAGE_RUNS section, the long
        ones as `send_range` sends them, their chunks of zeros as ZERO_PAGES."""
        batch = _RunBatch(writer, self._pages)
        for gpa, size in runs:
            self._check()
            if size >= LONG_RUN:
                self.send_range(writer, gpa, size, zeros=True)
            else:
                batch.add(gpa, size)
        batch.send()

    def send_bitmaps(self, writer: StreamWriter, bitmaps: list[DirtyBitmap]) -> None:
        """The pages `bitmaps` mark."""
        self.send_runs(writer, (run for bitmap in bitmaps for run in bitmap.ranges()))

    def send_range(self, writer: StreamWriter, gpa: int, size: int, *, zeros: bool) -> None:
        """Send the pages of gpa..gpa+size; with `zeros`, all-zero chunks go as ZERO_PAGES (a
        page that became zero must still reach the destination), without, they are skipped."""
        for at in range(0, size, CHUNK):
            self._check()
            length = min(CHUNK, size - at)
            chunk = self._pages.copy(gpa + at, length)  # one copy: compared, checksummed, sent
            if self._pages.zero(length):
                if zeros:
                    writer.section(SectionType.ZERO_PAGES, _ZERO.pack(gpa + at, length))
                continue
            writer.section(SectionType.PAGES, _ADDRESS.pack(gpa + at), chunk)


class _RunBatch:
    """Short runs of pages gathered into PAGE_RUNS sections."""

    def __init__(self, writer: StreamWriter, pages: _PageCopy) -> None:
        self._writer = writer
        self._pages = pages
        self._runs: list[tuple[int, int]] = []
        self._size = 0

    def add(self, gpa: int, size: int) -> None:
        if self._size + size > CHUNK or len(self._runs) == MAX_RUNS:
            self.send()
        self._runs.append((gpa, size))
        self._size += size

    def send(self) -> None:
        if not self._runs:
            return
        # One copy of the pages (the guest may be running): checksummed and sent as it is.
        at = 0
        for gpa, size in self._runs:
            self._pages.copy(gpa, size, at)
            at += size
        head = _RUN_COUNT.pack(len(self._runs))
        head += b"".join(_RUN.pack(gpa, size // PAGE_SIZE) for gpa, size in self._runs)
        self._writer.section(SectionType.PAGE_RUNS, head, self._pages.copied(at))
        self._runs, self._size = [], 0


def union(first: list[DirtyBitmap], second: list[DirtyBitmap]) -> list[DirtyBitmap]:
    """The pages either marks, region by region (`second` names every region)."""
    earlier = {bitmap.gpa: bitmap for bitmap in first}
    return [earlier[b.gpa] | b if b.gpa in earlier else b for b in second]


# the destination


class Malformed(Exception):
    """A page section of the wrong shape (said with the section's place, by the caller)."""


def where(what: str, section: Section) -> str:
    """A section's place in the stream `what`, for messages."""
    return f"{what}: the {section_name(section.type)} section at byte {section.offset}"


def page_writes(section: Section) -> list[tuple[int, memoryview | bytes]]:
    """The (address, bytes) writes of a PAGES, ZERO_PAGES or PAGE_RUNS section, all checked
    for shape before any is made: pages whole and aligned, at most CHUNK bytes a section."""
    payload = section.payload
    if section.type == SectionType.PAGES and len(payload) >= _ADDRESS.size:
        (gpa,) = _ADDRESS.unpack_from(payload)
        writes = [(gpa, memoryview(payload)[_ADDRESS.size :])]
    elif section.type == SectionType.ZERO_PAGES and len(payload) == _ZERO.size:
        gpa, size = _ZERO.unpack(payload)
        if size > CHUNK:
            raise Malformed(f"zero pages are at most {CHUNK >> 20} MiB a section")
        writes = [(gpa, _ZERO_CHUNK[:size])]
    elif section.type == SectionType.PAGE_RUNS and len(payload) >= _RUN_COUNT.size:
        writes = _run_writes(memoryview(payload))
    else:
        raise Malformed("too short for its type")
    if not 0 < sum(len(data) for _, data in writes) <= CHUNK:
        raise Malformed(f"a section holds some pages, at most {CHUNK >> 20} MiB")
    for gpa, data in writes:
        if gpa % PAGE_SIZE or not data or len(data) % PAGE_SIZE:
            raise Malformed("pages are whole and page-aligned")
    return writes


def _run_writes(payload: memoryview) -> list[tuple[int, memoryview]]:
    (count,) = _RUN_COUNT.unpack_from(payload)
    table_end = _RUN_COUNT.size + count * _RUN.size
    if not 0 < count <= MAX_RUNS or table_end > len(payload):
        raise Malformed(f"1 to {MAX_RUNS} runs, each with its address and length")
    writes, at = [], table_end
    for gpa, pages in _RUN.iter_unpack(payload[_RUN_COUNT.size : table_end]):
        writes.append((gpa, payload[at : at + pages * PAGE_SIZE]))
        at += pages * PAGE_SIZE
    if at != len(payload):
        raise Malformed("its runs' pages are not the bytes that follow them")
    return writes
