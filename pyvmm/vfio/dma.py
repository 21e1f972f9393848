"""What both VFIO backends offer for DMA: the legacy container and an iommufd IOAS.

Passthrough code maps guest RAM for device DMA through this, whichever backend opened the
device.
"""

from __future__ import annotations

from typing import Protocol

from pyvmm.machine.memory import GuestMemory
from pyvmm.vfio.errors import VfioError


class DmaSpace(Protocol):
    """IOVA -> process-memory mappings that a backend's devices DMA through."""

    def map(self, iova: int, vaddr: int, size: int, *, writable: bool = True) -> None:
        """Let the devices reach `size` bytes at `vaddr` through IOVAs iova..iova+size."""

    def unmap(self, iova: int, size: int) -> int:
        """Remove the mappings in iova..iova+size; returns the bytes unmapped (0 if none)."""

    def iova_ranges(self) -> tuple[tuple[int, int], ...]:
        """The usable IOVA ranges, (start, last inclusive); () when the kernel reports none
        (old Type1 drivers did not: then nothing is known, not nothing usable)."""


def map_guest_memory(space: DmaSpace, memory: GuestMemory) -> list[tuple[int, int]]:
    """Map all guest RAM for device DMA at IOVA = guest-physical address, as a guest that
    programs a device with its physical addresses expects (no vIOMMU). Returns the (iova, size)
    ranges mapped; on failure nothing stays mapped."""
    usable = space.iova_ranges()
    mapped: list[tuple[int, int]] = []
    try:
        for region in memory.regions:
            last = region.gpa + region.size - 1
            if usable and not any(lo <= region.gpa and last <= hi for lo, hi in usable):
                raise VfioError(
                    f"guest RAM {region.gpa:#x}-{last:#x} is outside the IOVA ranges the IOMMU "
                    "allows (reserved regions); give the guest less memory"
                )
            space.map(region.gpa, region.host_addr, region.size)
            mapped.append((region.gpa, region.size))
    except BaseException:
        for iova, size in mapped:
            space.unmap(iova, size)
        raise
    return mapped
