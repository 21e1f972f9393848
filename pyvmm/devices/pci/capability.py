"""The capability lists of an emulated PCI function (PCI Local Bus 3.0 §6.7, PCIe 6.0 §7.6).

Standard capabilities live in the device-specific part of the type-0 header (0x40-0xFF), each
starting with its ID and the offset of the next one; PCI_CAPABILITY_LIST (0x34) points at the
first and PCI_STATUS bit 4 says the list exists. Extended capabilities live in PCIe's extended
config space (0x100-0xFFF), reachable through ECAM only: the first one sits at 0x100, and each
starts with a dword of ID (bits 15:0), version (19:16) and next offset (31:20).

A `Capability` owns a byte range of config space and a write mask for it (the guest can only
change the bits the mask allows, through the function's ordinary masked write). Capabilities
with side effects override `before_read` (refresh their bytes before the guest sees them) and
`after_write` (act on what the guest wrote).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

PCI_CAP_ID_PM = 0x01
PCI_CAP_ID_MSI = 0x05
PCI_CAP_ID_VNDR = 0x09
PCI_CAP_ID_EXP = 0x10
PCI_CAP_ID_MSIX = 0x11
PCI_EXT_CAP_ID_VNDR = 0x000B

CAP_START = 0x40
CAP_END = 0x100  # standard capabilities must sit in the first 256 bytes
EXT_CAP_START = 0x100
EXT_CAP_END = 0x1000
PCI_STATUS = 0x06
PCI_STATUS_CAP_LIST = 0x10
PCI_CAPABILITY_LIST = 0x34


class Capability:
    """One standard capability: `body` is its bytes after the ID and next pointer, `wmask`
    (same length) the bits of those bytes the guest may write."""

    HEADER_SIZE = 2

    def __init__(self, cap_id: int, body: bytes, wmask: bytes | None = None) -> None:
        if wmask is not None and len(wmask) != len(body):
            raise ValueError("capability write mask and body differ in length")
        self.cap_id = cap_id
        self.body = bytes(body)
        self.body_wmask = bytes(wmask) if wmask is not None else bytes(len(body))
        self.offset = -1  # set when added to a function
        self._config: bytearray | None = None

    @property
    def length(self) -> int:
        return self.HEADER_SIZE + len(self.body)

    def header(self, next_offset: int) -> bytes:
        return bytes((self.cap_id, next_offset))

    def attach(self, config: bytearray, offset: int) -> None:
        self._config = config
        self.offset = offset

    def link(self, next_offset: int) -> None:
        """Point this capability's next field at `next_offset`."""
        assert self._config is not None, "capability is not attached to a function"
        self._config[self.offset : self.offset + self.HEADER_SIZE] = self.header(next_offset)

    # register access for the capability's own code (not masked)

    def get(self, offset: int, size: int) -> int:
        """Little-endian value of `size` bytes at `offset` within the capability."""
        assert self._config is not None, "capability is not attached to a function"
        start = self.offset + offset
        return int.from_bytes(self._config[start : start + size], "little")

    def put(self, offset: int, size: int, value: int) -> None:
        assert self._config is not None, "capability is not attached to a function"
        start = self.offset + offset
        self._config[start : start + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(
            size, "little"
        )

    # hooks: `offset` and `size` are the part of a guest access that falls in this capability

    def before_read(self, offset: int, size: int) -> None:
        """Called before the guest reads these bytes."""

    def after_write(self, offset: int, size: int) -> None:
        """Called after a guest write has been merged into these bytes through the mask."""


class ExtendedCapability(Capability):
    """One PCIe extended capability: a 4-byte header of ID, version and next offset."""

    HEADER_SIZE = 4

    def __init__(self, cap_id: int, version: int, body: bytes, wmask: bytes | None = None) -> None:
        if not 0 <= cap_id <= 0xFFFF or not 0 <= version <= 0xF:
            raise ValueError(f"extended capability {cap_id:#x} version {version}: out of range")
        super().__init__(cap_id, body, wmask)
        self.version = version

    def header(self, next_offset: int) -> bytes:
        return struct.pack("<I", self.cap_id | self.version << 16 | next_offset << 20)


class CapabilityList:
    """The chain of standard (or, with `extended`, extended) capabilities of one function."""

    def __init__(self, config: bytearray, wmask: bytearray, *, extended: bool = False) -> None:
        self._config = config
        self._wmask = wmask
        self._extended = extended
        self._start, self._end = (EXT_CAP_START, EXT_CAP_END) if extended else (CAP_START, CAP_END)
        self._caps: list[Capability] = []
        self._next_free = self._start

    def add(self, cap: Capability, offset: int | None = None) -> int:
        """Place `cap` after the last one (dword aligned), or at `offset` (a passed-through
        device's capabilities stay where the device has them), link it from the previous one
        and return its offset."""
        if isinstance(cap, ExtendedCapability) != self._extended:
            raise TypeError(f"capability {cap.cap_id:#x} is of the other kind for this list")
        if offset is None:
            offset = self._next_free
        end = offset + cap.length
        if offset < self._start or offset % 4 or end > self._end:
            raise ValueError(
                f"capability {cap.cap_id:#x} ({cap.length} bytes) does not fit in config space"
            )
        if any(other.offset < end and offset < other.offset + other.length for other in self._caps):
            raise ValueError(f"capability {cap.cap_id:#x} at {offset:#x} overlaps another")
        cap.attach(self._config, offset)
        cap.link(0)
        self._config[offset + cap.HEADER_SIZE : end] = cap.body
        self._wmask[offset : offset + cap.HEADER_SIZE] = bytes(cap.HEADER_SIZE)
        self._wmask[offset + cap.HEADER_SIZE : end] = cap.body_wmask
        if self._caps:
            self._caps[-1].link(offset)
        elif not self._extended:  # an extended list starts at 0x100 by definition
            self._config[PCI_CAPABILITY_LIST] = offset
            status = struct.unpack_from("<H", self._config, PCI_STATUS)[0]
            struct.pack_into("<H", self._config, PCI_STATUS, status | PCI_STATUS_CAP_LIST)
        elif offset != EXT_CAP_START:
            raise ValueError("the first extended capability must be at 0x100")
        self._caps.append(cap)
        self._next_free = max(self._next_free, (end + 3) & ~3)
        return offset

    def find(self, cap_id: int) -> Capability | None:
        return next((cap for cap in self._caps if cap.cap_id == cap_id), None)

    def __iter__(self) -> Iterator[Capability]:
        return iter(list(self._caps))

    def _overlapping(self, offset: int, size: int) -> list[tuple[Capability, int, int]]:
        if offset + size <= self._start or offset >= self._next_free or not self._caps:
            return []
        hits = []
        for cap in self._caps:
            start = max(offset, cap.offset)
            end = min(offset + size, cap.offset + cap.length)
            if start < end:
                hits.append((cap, start - cap.offset, end - start))
        return hits

    def before_read(self, offset: int, size: int) -> None:
        for cap, cap_offset, length in self._overlapping(offset, size):
            cap.before_read(cap_offset, length)

    def after_write(self, offset: int, size: int) -> None:
        for cap, cap_offset, length in self._overlapping(offset, size):
            cap.after_write(cap_offset, length)
