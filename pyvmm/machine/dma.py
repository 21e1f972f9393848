"""How emulated devices reach guest memory: through a DMA view, never through RAM directly.

A device holds the addresses the guest's driver gave it (ring addresses, buffer addresses): bus
addresses, which only equal guest-physical addresses while no IOMMU sits in front of the
device. Every device access to guest memory therefore goes through a `DmaView` injected when
the device is made, so that a virtual IOMMU can later give a device a view that translates (and
refuses) in this one place, without any device changing.

Today there is one view per machine, `IdentityDma`: bus address = guest-physical address, over
the machine's GuestMemory, so every access is bounds-checked against RAM and every write is
reported to the dirty log.
"""

from __future__ import annotations

from typing import Protocol

from pyvmm.machine.memory import GuestMemory


class DmaView(Protocol):
    """A device's window on guest memory. Raises GuestMemoryError for any address range the
    device may not reach (outside RAM, or, under an IOMMU, not mapped for it)."""

    def check(self, addr: int, length: int) -> None:
        """Raise unless addr..addr+length is reachable (as one contiguous range)."""

    def read(self, addr: int, length: int) -> bytes: ...

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None: ...

    def readable(self, addr: int, length: int) -> memoryview:
        """A view to read from (zero-copy: preadv/pwritev take these)."""

    def writable(self, addr: int, length: int) -> memoryview:
        """A view to write into; report `written()` for the range once the write is done."""

    def written(self, addr: int, length: int) -> None: ...


class IdentityDma:
    """Bus address = guest-physical address: no IOMMU between emulated devices and RAM."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        # Bound once: these run for every ring access, and the view adds nothing to them.
        self.read = memory.read
        self.write = memory.write
        self.readable = memory.slice
        self.writable = memory.writable
        self.written = memory.written

    def check(self, addr: int, length: int) -> None:
        self.memory.region_for(addr, length)
