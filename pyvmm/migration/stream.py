"""The VM state stream: the container format of snapshots and migrations (docs/state-stream.md).

    stream  := header section* end
    header  := magic "PYVMMVM\\n" (8 bytes), u32 format version, u32 flags (0)
    section := u16 type, u16 flags, u32 length, payload (length bytes), u32 CRC-32
    end     := a section of type END with an empty payload

Integers are little-endian. The CRC-32 (zlib's) covers the section's 8-byte head and its
payload, so a flipped bit in a type or a length is caught as surely as one in the data. A
section whose flags have `OPTIONAL` set may be skipped by a reader that does not know its type;
any other unknown type is refused, as is a stream of another format version. A stream ends
with END: a stream cut short anywhere before it (a full disk, a dropped connection) is refused
as truncated, never taken for a complete one.

This module knows only the container. What the sections hold, and in which order, is the
business of pyvmm.migration.machine_sections (the machine's configuration and state) and of
the memory formats (a snapshot's memory file, a migration's page sections). The stream is
untrusted input: every length is checked against `MAX_SECTION` before anything is allocated,
and every problem is a `StreamError` saying where in the stream it is.
"""

from __future__ import annotations

import enum
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from pyvmm.machine.state import StateError

MAGIC = b"PYVMMVM\n"
FORMAT_VERSION = 1
MAX_SECTION = 64 << 20  # a page batch or a device's state; anything larger is corrupt

_HEADER = struct.Struct("<8sII")
_SECTION = struct.Struct("<HHI")
_CRC = struct.Struct("<I")


class StreamError(StateError):
    """The stream is not one this pyvmm can read: truncated, corrupt, or of another version."""


class SectionType(enum.IntEnum):
    END = 0
    CONFIG = 1  # the machine's configuration (JSON), always first
    COMPONENT = 2  # one component's saved state
    RAM_LAYOUT = 3  # a snapshot: where each RAM region's pages are in the memory file
    PAGES = 4  # a migration: a batch of guest pages
    INFO = 5  # what the writer records for people and tools (JSON): time, console, parent
    ZERO_PAGES = 6  # a migration: a range of guest pages that are all zeros
    PAGE_MAP = 7  # an incremental snapshot: which pages its memory file holds
    PAGE_RUNS = 8  # a migration: runs of guest pages, each with its address
    POSTCOPY = 9  # a migration switching to post-copy: the pages the destination lacks
    DEVICE_DATA = 10  # a migration: a part's state read ahead of the stop (VFIO PRE_COPY)
    SAVING_AHEAD = 11  # a migration: the parts that send DEVICE_DATA, before the first of it
    DEVICE_STATE = 12  # a part's state read at the stop (VFIO STOP_COPY), before the COMPONENTs


class SectionFlag(enum.IntFlag):
    OPTIONAL = 1  # a reader that does not know the type skips the section


@dataclass(frozen=True)
class Section:
    type: int
    payload: bytes
    flags: int = 0
    offset: int = 0  # where its head is in the stream, for error messages


class StreamWriter:
    """Writes a stream to a binary file (or socket file); call `end()` when all is written."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.written = 0
        self._write(_HEADER.pack(MAGIC, FORMAT_VERSION, 0))

    def _write(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self.written += len(data)

    def section(self, kind: SectionType, *payload: bytes | memoryview, flags: int = 0) -> None:
        """One section whose payload is the `payload` parts one after another (written as
        they are: a page batch is not copied into one buffer first)."""
        length = sum(len(part) for part in payload)
        if length > MAX_SECTION:
            raise ValueError(f"a {kind.name} section of {length} bytes is too large")
        head = _SECTION.pack(kind, flags, length)
        crc = zlib.crc32(head)
        self._write(head)
        for part in payload:
            crc = zlib.crc32(part, crc)
            self._write(part)
        self._write(_CRC.pack(crc))

    def flush(self) -> None:
        self._file.flush()

    def end(self) -> None:
        self.section(SectionType.END, b"")
        self._file.flush()


class StreamReader:
    """Reads and checks a stream's sections, one at a time (`sections()`), up to END."""

    def __init__(self, file: BinaryIO, what: str = "the stream") -> None:
        self._file = file
        self.what = what
        self.offset = 0
        self.ended = False
        head = self._read(_HEADER.size, "its header")
        magic, version, flags = _HEADER.unpack(head)
        if magic != MAGIC:
            raise StreamError(f"{what} is not a pyvmm VM state stream (no PYVMMVM header)")
        if version != FORMAT_VERSION:
            raise StreamError(
                f"{what} is in stream format {version}; this pyvmm reads format "
                f"{FORMAT_VERSION} only (use the pyvmm that wrote it)"
            )
        if flags:
            raise StreamError(f"{what} has header flags {flags:#x}, which this pyvmm lacks")

    def _read(self, size: int, part: str) -> bytes:
        """`size` bytes (read into one buffer: page batches are megabytes)."""
        data = bytearray(size)
        view, got = memoryview(data), 0
        while got < size:
            count = self._file.readinto(view[got:])  # type: ignore[attr-defined]
            if not count:
                raise StreamError(
                    f"{self.what} is truncated: it ends at byte {self.offset + got}, "
                    f"in {part} (an interrupted write or transfer)"
                )
            got += count
        view.release()
        self.offset += size
        return data  # type: ignore[return-value]  # a bytearray: as good, and no copy

    def next(self) -> Section:
        """The next section (END included); StreamError if there is none or it is corrupt."""
        if self.ended:
            raise StreamError(f"{self.what}: read past its END")
        at = self.offset
        head = self._read(_SECTION.size, f"the head of the section at byte {at}")
        kind, flags, length = _SECTION.unpack(head)
        if flags & ~int(SectionFlag.OPTIONAL):  # (an IntFlag's ~ keeps only known bits)
            raise StreamError(
                f"{self.what}: the section at byte {at} has flags {flags:#x}, which this pyvmm "
                "does not know (written by a newer one, or corrupt)"
            )
        if length > MAX_SECTION:
            raise StreamError(
                f"{self.what} is corrupt: the section at byte {at} claims {length} bytes "
                f"(at most {MAX_SECTION} are allowed)"
            )
        name = section_name(kind)
        payload = self._read(length, f"the {name} section at byte {at}")
        (crc,) = _CRC.unpack(self._read(_CRC.size, f"the checksum of the section at byte {at}"))
        if crc != zlib.crc32(payload, zlib.crc32(head)):
            raise StreamError(
                f"{self.what} is corrupt: the {name} section at byte {at} fails its checksum"
            )
        if kind == SectionType.END:
            if length:
                raise StreamError(f"{self.what} is corrupt: its END section at byte {at} has data")
            self.ended = True
        return Section(kind, payload, flags, at)

    def next_known(self) -> Section:
        """The next section of a type this pyvmm knows (END included), skipping optional
        ones of unknown type; StreamError for any other unknown type."""
        while True:
            section = self.next()
            if section.type in SectionType._value2member_map_:
                return section
            if not section.flags & SectionFlag.OPTIONAL:
                raise StreamError(
                    f"{self.what} has a section of type {section.type} at byte "
                    f"{section.offset}, which this pyvmm does not know (written by a newer one?)"
                )

    def sections(self) -> Iterator[Section]:
        """Every section up to END (not included), skipping optional ones of unknown type."""
        while (section := self.next_known()).type != SectionType.END:
            yield section

    def expect_eof(self) -> None:
        """StreamError unless the file ends here (after END: a file of one stream only)."""
        if self._file.read(1):
            raise StreamError(f"{self.what} has data after its END, at byte {self.offset}")


def section_name(kind: int) -> str:
    """A section type's name for messages, known or not."""
    try:
        return SectionType(kind).name
    except ValueError:
        return f"type-{kind}"
