"""The PCI capability list of an emulated function (PCI Local Bus 3.0 §6.7).

Capabilities live in the device-specific part of the type-0 header (0x40-0xFF), each starting
with its ID and the offset of the next one; PCI_CAPABILITY_LIST (0x34) points at the first and
PCI_STATUS bit 4 says the list exists. A `Capability` owns a byte range of config space and a
write mask for it (the guest can only change the bits the mask allows, through the function's
ordinary masked write). Capabilities with side effects override `before_read` (refresh their
bytes before the guest sees them) and `after_write` (act on what the guest wrote).
"""

from __future__ import annotations

import struct

PCI_CAP_ID_MSIX = 0x11
PCI_CAP_ID_VNDR = 0x09

CAP_START = 0x40
CAP_END = 0x100  # standard capabilities must sit in the first 256 bytes
PCI_STATUS = 0x06
PCI_STATUS_CAP_LIST = 0x10
PCI_CAPABILITY_LIST = 0x34


class Capability:
    """One capability: `body` is its bytes after the ID and next pointer, `wmask` (same length)
    the bits of those bytes the guest may write."""

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
        return 2 + len(self.body)

    def attach(self, config: bytearray, offset: int) -> None:
        self._config = config
        self.offset = offset

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


class CapabilityList:
    """The chain of capabilities in one function's config space."""

    def __init__(self, config: bytearray, wmask: bytearray) -> None:
        self._config = config
        self._wmask = wmask
        self._caps: list[Capability] = []
        self._next_free = CAP_START

    def add(self, cap: Capability) -> int:
        """Place `cap` after the last one (dword aligned), link it and return its offset."""
        offset = self._next_free
        end = offset + cap.length
        if end > CAP_END:
            raise ValueError(
                f"capability {cap.cap_id:#x} ({cap.length} bytes) does not fit in config space"
            )
        self._config[offset] = cap.cap_id
        self._config[offset + 1] = 0
        self._config[offset + 2 : end] = cap.body
        self._wmask[offset : offset + 2] = b"\0\0"
        self._wmask[offset + 2 : end] = cap.body_wmask
        if self._caps:
            self._config[self._caps[-1].offset + 1] = offset
        else:
            self._config[PCI_CAPABILITY_LIST] = offset
            status = struct.unpack_from("<H", self._config, PCI_STATUS)[0]
            struct.pack_into("<H", self._config, PCI_STATUS, status | PCI_STATUS_CAP_LIST)
        cap.attach(self._config, offset)
        self._caps.append(cap)
        self._next_free = (end + 3) & ~3
        return offset

    def find(self, cap_id: int) -> Capability | None:
        return next((cap for cap in self._caps if cap.cap_id == cap_id), None)

    def _overlapping(self, offset: int, size: int) -> list[tuple[Capability, int, int]]:
        if offset + size <= CAP_START or offset >= self._next_free:
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
