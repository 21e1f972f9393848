"""A passed-through function's BARs: what the guest's accesses to them reach.

Each memory BAR of at least a page is mapped by pieces (`areas`): the region's mmap areas
(sparse mmap honoured) as device memory in KVM slots, minus the pages of the MSI-X table and
PBA, which stay trapped with whatever else cannot be mapped; trapped accesses go to the
emulated MSI-X table and PBA, or to the device with pread/pwrite. I/O BARs and BARs smaller
than a page are trapped whole. Where the guest puts them, and when they decode, is the
function's (pyvmm.vfio.passthrough.function).
"""

from __future__ import annotations

import logging
import struct

from pyvmm.devices.pci.device import NUM_BARS, PCI_BASE_ADDRESS_0, Bar, BarArea, BarKind
from pyvmm.devices.pci.msix import Msix
from pyvmm.kvm.mmap import PAGE_SIZE
from pyvmm.uapi import vfio as uapi
from pyvmm.vfio.device import Region, VfioDevice
from pyvmm.vfio.errors import VfioError

log = logging.getLogger(__name__)


class PassthroughBars:
    """The BARs of `device`, found from its config bytes (`raw`) and regions, for the
    function `name`; `map` mmaps them once the MSI-X table and PBA that stay trapped are
    known."""

    def __init__(self, device: VfioDevice, raw: bytes, name: str) -> None:
        self.device = device
        self.name = name
        self._vfio_regions: dict[int, Region] = {}
        self.bars = {bar.index: bar for bar in self._bars(raw)}
        # (offset, size, host address) of each mmapped area, per BAR
        self._mappings: dict[int, list[tuple[int, int, int]]] = {}
        self._msix: Msix | None = None

    def _bars(self, raw: bytes) -> tuple[Bar, ...]:
        """BAR kinds from the device's registers, sizes from its regions."""
        bars = []
        index = 0
        while index < NUM_BARS:
            region = self.device.region(uapi.VfioPciRegion.BAR0 + index)
            low = struct.unpack_from("<I", raw, PCI_BASE_ADDRESS_0 + 4 * index)[0]
            if region.size == 0:
                index += 1
                continue
            if region.size & (region.size - 1):
                raise VfioError(f"{self.device.name}: BAR{index} of {region.size:#x} bytes")
            self._vfio_regions[index] = region
            if low & 1:
                bars.append(Bar(index, BarKind.IO, max(region.size, 4)))
                index += 1
                continue
            is_64 = (low >> 1) & 3 == 2
            kind = BarKind.MEM64 if is_64 else BarKind.MEM32
            bars.append(Bar(index, kind, max(region.size, 16), prefetchable=bool(low & 8)))
            index += 2 if is_64 else 1
        return tuple(bars)

    def map(self, msix: Msix | None) -> None:
        """mmap every mappable area of every memory BAR of at least a page, once; the pages
        of the MSI-X table and PBA of `msix` (if any) stay trapped all the same."""
        self._msix = msix
        for index, bar in self.bars.items():
            region = self._vfio_regions[index]
            if bar.kind is BarKind.IO or bar.size < PAGE_SIZE:
                continue
            pieces = []
            for start, size in region.mmap_areas:
                first = -(-start // PAGE_SIZE) * PAGE_SIZE
                end = (start + size) // PAGE_SIZE * PAGE_SIZE
                if end > first:
                    mapping = self.device.mmap(region, first, end - first)
                    pieces.append((first, end - first, mapping.addr))
            self._mappings[index] = pieces

    def _trapped_holes(self, index: int) -> list[tuple[int, int]]:
        """Page-rounded ranges of BAR `index` that must stay trapped: the MSI-X table, PBA."""
        holes = []
        msix = self._msix
        if msix is not None:
            tables = ((msix.table, msix.table_size), (msix.pba, msix.pba_size))
            for (bir, offset), size in tables:
                if bir == index:
                    start = offset // PAGE_SIZE * PAGE_SIZE
                    holes.append((start, -(-(offset + size) // PAGE_SIZE) * PAGE_SIZE))
        return holes

    def areas(self, index: int) -> list[BarArea]:
        """BAR `index` in pieces, trapped or over the device's mmap (see above)."""
        size = self.bars[index].size
        mapped = self._mappings.get(index)
        if not mapped:
            return [BarArea(0, size)]
        holes = self._trapped_holes(index)
        pieces: list[tuple[int, int, int]] = []  # (start, end, host address of start)
        for start, length, addr in mapped:
            cuts = [(start, start + length)]
            for lo, hi in holes:
                cuts = [
                    part
                    for a, b in cuts
                    for part in ((a, min(b, lo)), (max(a, hi), b))
                    if part[0] < part[1]
                ]
            pieces += [(a, b, addr + a - start) for a, b in cuts]
        areas = []
        position = 0
        for start, end, addr in sorted(pieces):
            if start > position:
                areas.append(BarArea(position, start - position))
            areas.append(BarArea(start, end - start, addr))
            position = end
        if position < size:
            areas.append(BarArea(position, size - position))
        return areas

    def _in(self, where: tuple[int, int], length: int, index: int, offset: int) -> bool:
        return where[0] == index and where[1] <= offset < where[1] + length

    def read(self, index: int, offset: int, size: int) -> int:
        """A trapped read of BAR `index`."""
        msix = self._msix
        if msix is not None and self._in(msix.table, msix.table_size, index, offset):
            return msix.table_read(offset - msix.table[1], size)
        if msix is not None and self._in(msix.pba, msix.pba_size, index, offset):
            return msix.pba_read(offset - msix.pba[1], size)
        try:
            data = self.device.read(self._vfio_regions[index], offset, size)
        except (VfioError, OSError) as err:
            log.debug("%s: BAR%d read at %#x: %s", self.name, index, offset, err)
            return (1 << (8 * size)) - 1
        return int.from_bytes(data, "little")

    def write(self, index: int, offset: int, size: int, value: int) -> None:
        """A trapped write to BAR `index`."""
        msix = self._msix
        if msix is not None and self._in(msix.table, msix.table_size, index, offset):
            msix.table_write(offset - msix.table[1], size, value)
            return
        if msix is not None and self._in(msix.pba, msix.pba_size, index, offset):
            return  # the PBA is read-only
        try:
            self.device.write(self._vfio_regions[index], offset, value.to_bytes(size, "little"))
        except (VfioError, OSError) as err:
            log.debug("%s: BAR%d write at %#x: %s", self.name, index, offset, err)
