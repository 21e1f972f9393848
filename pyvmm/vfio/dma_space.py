"""DMA for assigned devices: what both VFIO backends offer (the legacy container and an iommufd
IOAS are each a `DmaSpace`), and the listener that keeps guest RAM mapped in one.

`GuestRamMapper` follows a machine's address space (pyvmm.machine.address_space): every RAM
region is mapped at IOVA = guest-physical address while it is in the map, as a guest that
programs a device with its physical addresses expects (no vIOMMU), and unmapped when it goes.
A space that can map a file (iommufd's IOMMU_IOAS_MAP_FILE) is given the RAM's memfd, so the
kernel pins the file's pages rather than walking this process's mapping; others get the
mapping's address.
Device memory (a BAR put into the guest) and reserved ranges are never mapped. A RAM region
outside the IOVA ranges the IOMMU allows is refused with the range named.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from pyvmm.machine.memory import MemoryRegion, RamRegion, RegionKind
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


@runtime_checkable
class FileDmaSpace(DmaSpace, Protocol):
    """A DMA space that can also map a file's pages directly (an iommufd IOAS)."""

    def map_file(self, iova: int, fd: int, offset: int, size: int) -> bool:
        """Map `size` bytes of `fd` from `offset` at `iova`; False if the kernel cannot."""


class GuestRamMapper:
    """An address-space listener mapping RAM regions into `space` at IOVA = GPA."""

    def __init__(self, space: DmaSpace) -> None:
        self._space = space
        self.mapped: dict[int, int] = {}  # iova -> size

    def region_added(self, region: MemoryRegion) -> None:
        if region.kind is not RegionKind.RAM:
            return
        last = region.gpa + region.size - 1
        usable = self._space.iova_ranges()
        if usable and not any(lo <= region.gpa and last <= hi for lo, hi in usable):
            allowed = ", ".join(f"{lo:#x}-{hi:#x}" for lo, hi in usable)
            raise VfioError(
                f"guest RAM {region.gpa:#x}-{last:#x} is outside the IOVA ranges the IOMMU "
                f"allows ({allowed}); give the guest less memory"
            )
        # Only a shared mapping's pages are the file's: a private one's are this process's.
        by_file = (
            isinstance(self._space, FileDmaSpace)
            and isinstance(region, RamRegion)
            and region.shared
        )
        if not (
            by_file and self._space.map_file(region.gpa, region.fd, region.offset, region.size)
        ):
            self._space.map(region.gpa, region.host_addr, region.size)
        self.mapped[region.gpa] = region.size

    def region_removed(self, region: MemoryRegion) -> None:
        if region.kind is RegionKind.RAM and self.mapped.pop(region.gpa, None) is not None:
            self._space.unmap(region.gpa, region.size)
