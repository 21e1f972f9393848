"""DMA dirty tracking of guest RAM through the IOMMU, for live migration with assigned devices.

KVM's dirty log sees what vCPUs write; a device's DMA into guest RAM passes it by. Where the
IOMMU keeps dirty bits in its page table entries (VT-d with SLADS, SMMUv3 with HTTU, AMD),
iommufd reads and clears them: `DmaDirtyLog.start` moves the devices to a HWPT allocated with
dirty tracking over the guest-RAM IOAS (a replace: their DMA goes on), `collect` reads and
clears its bitmap for every DMA-mapped RAM region in guest pages, `stop` puts the devices back
on the page tables they had. An IOMMU that cannot is refused, naming it and what it lacks.

The bits are per IOMMU page: with huge IOMMU pages (the IOAS's default) one DMA write marks a
whole huge page, which costs a migration more copying but never misses a page.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from pyvmm.vfio.errors import VfioError
from pyvmm.vfio.iommufd.hwpt import Hwpt
from pyvmm.vfio.iommufd.info import hw_info
from pyvmm.vfio.iommufd.objects import BoundDevice, IoAddressSpace, IommufdObject

PAGE_SIZE = 4096


@dataclass(frozen=True)
class DmaDirtyPages:
    """The pages of one RAM region that DMA wrote: bit i of `bitmap` (little-endian) is the
    guest page at gpa + i * 4096, guest page number gpa // 4096 + i."""

    gpa: int
    pages: int
    bitmap: bytes

    def page_numbers(self) -> Iterator[int]:
        first = self.gpa // PAGE_SIZE
        bits = int.from_bytes(self.bitmap, "little")
        while bits:
            low = bits & -bits
            yield first + low.bit_length() - 1
            bits ^= low


class DmaDirtyLog:
    """Dirty tracking of `devices`' DMA into the RAM `mapped()` lists ({gpa: size}, mapped in
    `ioas` at IOVA = GPA)."""

    def __init__(
        self,
        ioas: IoAddressSpace,
        devices: Sequence[BoundDevice],
        mapped: Callable[[], dict[int, int]],
    ) -> None:
        self.ioas = ioas
        self.devices = list(devices)
        self._mapped = mapped
        self.hwpt: Hwpt | None = None
        self._before: dict[str, IommufdObject | None] = {}

    def start(self) -> None:
        """Move the devices to a dirty-tracking HWPT and start recording."""
        if self.hwpt is not None:
            return
        if not self.devices:
            raise VfioError("DMA dirty tracking: the machine has no device assigned")
        for device in self.devices:
            if device.attached is None:
                raise VfioError(f"{device.name}: DMA dirty tracking: it is detached; attach it")
            info = hw_info(device)
            missing = info.dirty_tracking_missing()
            if missing is not None:
                raise VfioError(
                    f"{device.name}: DMA dirty tracking: its IOMMU ({info.type_name}) cannot "
                    f"track dirty pages: {missing}"
                )
        hwpt = Hwpt.paging(self.ioas, self.devices[0], dirty_tracking=True)
        try:
            for device in self.devices:
                self._before[device.name] = device.attached
                device.attach(hwpt)
            hwpt.set_dirty_tracking(True)
        except BaseException:
            self._put_back()
            hwpt.close()
            raise
        self.hwpt = hwpt

    def collect(self) -> list[DmaDirtyPages]:
        """What DMA wrote since the start or the last collect, per mapped RAM region."""
        if self.hwpt is None:
            raise VfioError("DMA dirty tracking has not been started")
        found = []
        for gpa, size in sorted(self._mapped().items()):
            bitmap = self.hwpt.read_dirty(gpa, size, PAGE_SIZE)
            pages = size // PAGE_SIZE
            found.append(DmaDirtyPages(gpa, pages, bytes(bitmap[: (pages + 7) // 8])))
        return found

    def stop(self) -> None:
        """Stop recording; the devices go back to their page tables, the HWPT goes."""
        if self.hwpt is None:
            return
        hwpt, self.hwpt = self.hwpt, None
        try:
            hwpt.set_dirty_tracking(False)
        finally:
            self._put_back()
            hwpt.close()

    def _put_back(self) -> None:
        for device in self.devices:
            before = self._before.pop(device.name, None)
            if before is not None and before.id:
                device.attach(before)
