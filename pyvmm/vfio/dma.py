"""What both VFIO backends offer for DMA: the legacy container and an iommufd IOAS.

Passthrough code maps guest RAM for device DMA through this, whichever backend opened the
device.
"""

from __future__ import annotations

from typing import Protocol


class DmaSpace(Protocol):
    """IOVA -> process-memory mappings that a backend's devices DMA through."""

    def map(self, iova: int, vaddr: int, size: int, *, writable: bool = True) -> None:
        """Let the devices reach `size` bytes at `vaddr` through IOVAs iova..iova+size."""

    def unmap(self, iova: int, size: int) -> int:
        """Remove the mappings in iova..iova+size; returns the bytes unmapped (0 if none)."""

    def iova_ranges(self) -> tuple[tuple[int, int], ...]:
        """The usable IOVA ranges, (start, last inclusive); () when the kernel reports none
        (old Type1 drivers did not: then nothing is known, not nothing usable)."""
