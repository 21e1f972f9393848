"""A VFIO device fd, however it was opened (a legacy group, or an iommufd-bound cdev).

The device's regions (a PCI function's BARs, ROM and config space) are reached by pread/pwrite
at each region's offset in the fd, or mmap()ed where the region allows it; its interrupts are
signalled on eventfds set with VFIO_DEVICE_SET_IRQS. Info ioctls with capability chains are read
twice when the kernel asks for a bigger buffer, and their chains are walked with bounds checks.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from pyvmm.kvm.fd import FdOwner
from pyvmm.kvm.mmap import Mapping
from pyvmm.uapi import vfio as uapi
from pyvmm.uapi.ioctl import IoctlError, ioctl, request_name
from pyvmm.vfio.errors import VfioError

RegionFlag = uapi.VfioRegionInfoFlag
IrqFlag = uapi.VfioIrqInfoFlag
IrqSetFlag = uapi.VfioIrqSetFlag
CapT = TypeVar("CapT", bound=ctypes.Structure)


@dataclass(frozen=True)
class DeviceInfo:
    flags: uapi.VfioDeviceFlag
    num_regions: int
    num_irqs: int


@dataclass(frozen=True)
class Region:
    """One region of the device: `offset` is where it starts in the device fd."""

    index: int
    flags: RegionFlag
    size: int
    offset: int
    # The parts that may be mmap()ed, as (offset in region, size): the whole region when it
    # allows mmap and has no sparse-mmap capability, none when it does not allow mmap.
    mmap_areas: tuple[tuple[int, int], ...]
    type: tuple[int, int] | None = None  # (type, subtype) of a device-specific region
    msix_mappable: bool = False


@dataclass(frozen=True)
class IrqInfo:
    index: int
    flags: IrqFlag
    count: int


def capability_chain(buffer: bytes, first: int) -> Iterator[tuple[int, int]]:
    """(id, offset) of each capability in an info buffer, from the offset of the first.

    The kernel builds the chain, but a bad offset must give an error, not a read outside the
    buffer or an endless loop."""
    header_size = ctypes.sizeof(uapi.vfio_info_cap_header)
    seen = set()
    offset = first
    while offset:
        if offset in seen or offset + header_size > len(buffer):
            raise VfioError(f"malformed VFIO capability chain at offset {offset}")
        seen.add(offset)
        header = uapi.vfio_info_cap_header.from_buffer_copy(buffer, offset)
        yield header.id, offset
        offset = header.next


MAX_INFO_SIZE = 1 << 16  # an info struct with its capabilities is a few hundred bytes


def info_with_caps(
    fd: int, request: int, struct: type[ctypes.Structure], index: int | None = None
) -> bytes:
    """An info struct (argsz first) and its capability chain: asked once with the bare struct,
    again with the size the kernel says it needs."""
    argsz = ctypes.sizeof(struct)
    for _ in range(2):
        buffer = (ctypes.c_ubyte * argsz)()
        info = struct.from_buffer(buffer)
        info.argsz = argsz  # type: ignore[attr-defined]
        if index is not None:
            info.index = index  # type: ignore[attr-defined]
        ioctl(fd, request, buffer)
        if info.argsz <= argsz:  # type: ignore[attr-defined]
            return bytes(buffer)
        argsz = info.argsz  # type: ignore[attr-defined]
        if argsz > MAX_INFO_SIZE:
            break
    raise VfioError(f"{request_name(request)}: the kernel asks for an implausible {argsz} bytes")


def read_capability(struct: type[CapT], buffer: bytes, offset: int) -> CapT:
    """A capability struct at `offset`, which must fit in the buffer."""
    if offset + ctypes.sizeof(struct) > len(buffer):
        raise VfioError(f"malformed VFIO capability {struct.__name__} at offset {offset}")
    return struct.from_buffer_copy(buffer, offset)


def sparse_mmap_areas(buffer: bytes, offset: int, region_size: int) -> tuple[tuple[int, int], ...]:
    """The (offset, size) areas of a sparse-mmap capability that lie inside the region."""
    cap = read_capability(uapi.vfio_region_info_cap_sparse_mmap, buffer, offset)
    area_type = uapi.vfio_region_sparse_mmap_area
    first = offset + uapi.vfio_region_info_cap_sparse_mmap.areas.offset
    if first + cap.nr_areas * ctypes.sizeof(area_type) > len(buffer):
        raise VfioError("malformed VFIO sparse-mmap capability")
    areas = []
    for i in range(cap.nr_areas):
        area = area_type.from_buffer_copy(buffer, first + i * ctypes.sizeof(area_type))
        if area.size and area.offset + area.size <= region_size:
            areas.append((area.offset, area.size))
    return tuple(areas)


class VfioDevice(FdOwner):
    """A VFIO device fd; owns it and closes it."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        self._mappings: list[Mapping] = []

    # info

    def info(self) -> DeviceInfo:
        info = uapi.vfio_device_info(argsz=ctypes.sizeof(uapi.vfio_device_info))
        ioctl(self.fd, uapi.VFIO_DEVICE_GET_INFO, info)
        return DeviceInfo(uapi.VfioDeviceFlag(info.flags), info.num_regions, info.num_irqs)

    def region(self, index: int) -> Region:
        request, struct = uapi.VFIO_DEVICE_GET_REGION_INFO, uapi.vfio_region_info
        buffer = info_with_caps(self.fd, request, struct, index)
        info = uapi.vfio_region_info.from_buffer_copy(buffer)
        flags = RegionFlag(info.flags)
        areas: tuple[tuple[int, int], ...] = ((0, info.size),) if flags & RegionFlag.MMAP else ()
        region_type = None
        msix_mappable = False
        if flags & RegionFlag.CAPS:
            for cap_id, offset in capability_chain(buffer, info.cap_offset):
                if cap_id == uapi.VfioRegionInfoCap.SPARSE_MMAP and flags & RegionFlag.MMAP:
                    areas = sparse_mmap_areas(buffer, offset, info.size)
                elif cap_id == uapi.VfioRegionInfoCap.TYPE:
                    cap = read_capability(uapi.vfio_region_info_cap_type, buffer, offset)
                    region_type = (cap.type, cap.subtype)
                elif cap_id == uapi.VfioRegionInfoCap.MSIX_MAPPABLE:
                    msix_mappable = True
        return Region(index, flags, info.size, info.offset, areas, region_type, msix_mappable)

    def irq(self, index: int) -> IrqInfo:
        info = uapi.vfio_irq_info(argsz=ctypes.sizeof(uapi.vfio_irq_info), index=index)
        ioctl(self.fd, uapi.VFIO_DEVICE_GET_IRQ_INFO, info)
        return IrqInfo(index, IrqFlag(info.flags), info.count)

    # region access

    def read(self, region: Region, offset: int, size: int) -> bytes:
        """Bytes of a region through the fd (the trapped path; works for every readable one)."""
        self._check(region, offset, size, RegionFlag.READ)
        data = os.pread(self.fd, size, region.offset + offset)
        if len(data) != size:
            raise VfioError(f"{self.name}: short read of region {region.index} at {offset:#x}")
        return data

    def write(self, region: Region, offset: int, data: bytes) -> None:
        self._check(region, offset, len(data), RegionFlag.WRITE)
        if os.pwrite(self.fd, data, region.offset + offset) != len(data):
            raise VfioError(f"{self.name}: short write to region {region.index} at {offset:#x}")

    def mmap(self, region: Region, offset: int, size: int) -> Mapping:
        """Map part of a region; it must lie inside one of the region's mmap areas. The device
        owns the mapping: it is unmapped when the device is closed."""
        if not any(a <= offset and offset + size <= a + s for a, s in region.mmap_areas):
            raise VfioError(
                f"{self.name}: region {region.index} +{offset:#x} ({size:#x} bytes) may not be "
                "mmap()ed: access it through read()/write()"
            )
        prot = (mmap.PROT_READ if region.flags & RegionFlag.READ else 0) | (
            mmap.PROT_WRITE if region.flags & RegionFlag.WRITE else 0
        )
        try:
            mapping = Mapping(size, self.fd, region.offset + offset, prot=prot)
        except OSError as err:
            raise VfioError(
                f"{self.name}: mmap of region {region.index} +{offset:#x} failed: {err.strerror}"
            ) from None
        self._mappings.append(mapping)
        return mapping

    def _check(self, region: Region, offset: int, size: int, needed: RegionFlag) -> None:
        if not region.flags & needed:
            what = "readable" if needed == RegionFlag.READ else "writable"
            raise VfioError(f"{self.name}: region {region.index} is not {what}")
        if offset < 0 or size < 0 or offset + size > region.size:
            raise VfioError(
                f"{self.name}: {offset:#x}+{size:#x} is outside region {region.index} "
                f"({region.size:#x} bytes)"
            )

    # interrupts

    def set_irq_eventfds(self, index: int, fds: Sequence[int], start: int = 0) -> int:
        """Signal vectors start.. of an IRQ index on these eventfds (-1: that vector off).
        Returns 0, or, when the kernel could not allocate that many vectors and so enabled
        none, how many it could (vfio_msi_enable's answer)."""
        return self._set_irqs(
            index, IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER, start, fds
        )

    def set_irq_unmask_eventfd(self, index: int, fd: int) -> None:
        """A level-triggered index (INTx) is unmasked by a write to `fd`: KVM's resamplefd."""
        self._set_irqs(index, IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_UNMASK, 0, [fd])

    def unmask_irq(self, index: int) -> None:
        """Unmask a level-triggered index (INTx) from here, when no unmask eventfd is set."""
        self._set_irqs(index, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_UNMASK, 0, [], count=1)

    def disable_irqs(self, index: int) -> None:
        self._set_irqs(index, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER, 0, [])

    def _set_irqs(
        self, index: int, flags: IrqSetFlag, start: int, fds: Sequence[int], count: int = -1
    ) -> int:
        data = (ctypes.c_int32 * len(fds))(*fds)
        header_size = ctypes.sizeof(uapi.vfio_irq_set)
        buffer = (ctypes.c_ubyte * (header_size + ctypes.sizeof(data)))()
        header = uapi.vfio_irq_set.from_buffer(buffer)
        header.argsz = len(buffer)
        header.flags = flags
        header.index = index
        header.start = start
        header.count = len(fds) if count < 0 else count
        ctypes.memmove(ctypes.addressof(buffer) + header_size, data, ctypes.sizeof(data))
        return ioctl(self.fd, uapi.VFIO_DEVICE_SET_IRQS, buffer)

    # lifetime

    def reset(self) -> None:
        if not self.info().flags & uapi.VfioDeviceFlag.RESET:
            raise VfioError(f"{self.name}: the device has no reset (no FLR, PM or bus reset)")
        try:
            ioctl(self.fd, uapi.VFIO_DEVICE_RESET)
        except IoctlError as err:
            raise VfioError(f"{self.name}: reset failed: {os.strerror(err.errno)}") from None

    def close(self) -> None:
        """Unmap every mapping, then close the fd, whatever fails on the way."""
        with contextlib.ExitStack() as stack:
            stack.callback(super().close)
            for mapping in self._mappings:
                stack.callback(mapping.close)
            self._mappings.clear()
