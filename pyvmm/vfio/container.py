"""The legacy VFIO backend: a container (/dev/vfio/vfio) holding IOMMU groups (/dev/vfio/N).

The container is a `DmaSpace` (pyvmm.vfio.dma_space), as the iommufd backend's IOAS is, and
`ContainerContext` is this backend's IOMMU context for a VM (pyvmm.vfio.context).

A device is reached through its group; the group joins a container, whose Type1 v2 IOMMU holds
the DMA mappings (IOVA -> process memory) for every device in it. The first group added decides
the IOMMU model, as the uAPI requires (VFIO_SET_IOMMU needs a group attached).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyvmm.kvm.fd import FdOwner
from pyvmm.uapi import vfio as uapi
from pyvmm.uapi.ioctl import IoctlError, ioctl
from pyvmm.vfio.context import HostDevice, VfioContext
from pyvmm.vfio.device import VfioDevice, capability_chain, info_with_caps, read_capability
from pyvmm.vfio.errors import VfioError, dma_map_error, open_node

if TYPE_CHECKING:
    from pyvmm.kvm.vm import Vm
    from pyvmm.machine.address_space import AddressSpace

CONTAINER_PATH = "/dev/vfio/vfio"
GROUP_DIR = "/dev/vfio"


@dataclass(frozen=True)
class IommuInfo:
    page_sizes: int  # bitmap of the IOMMU page sizes
    iova_ranges: tuple[tuple[int, int], ...]  # usable (start, end inclusive); () if unreported
    dma_mappings_available: int | None  # how many more MAP_DMAs the kernel allows, if told


class Group(FdOwner):
    """An IOMMU group opened through the legacy interface; owns its fd."""

    def __init__(self, number: int | str) -> None:
        self.number = str(number)
        self.path = os.path.join(GROUP_DIR, self.number)
        self.fd = open_node(
            self.path,
            f"VFIO group {self.number}",
            "bind the group's devices to vfio-pci (pyvmm vfio bind BDF)",
        )
        self.container: Container | None = None

    def status(self) -> uapi.VfioGroupFlag:
        status = uapi.vfio_group_status(argsz=ctypes.sizeof(uapi.vfio_group_status))
        ioctl(self.fd, uapi.VFIO_GROUP_GET_STATUS, status)
        return uapi.VfioGroupFlag(status.flags)

    def check_viable(self) -> None:
        if not self.status() & uapi.VfioGroupFlag.VIABLE:
            raise VfioError(
                f"VFIO group {self.number} is not viable: every device in IOMMU group "
                f"{self.number} must be bound to vfio-pci or to no driver (see pyvmm vfio list)"
            )

    def open_device(self, bdf: str) -> VfioDevice:
        """The device fd of `bdf` (e.g. 0000:00:04.0); the group must be in a container."""
        if self.container is None:
            raise VfioError(f"VFIO group {self.number}: add it to a container first")
        name = ctypes.create_string_buffer(bdf.encode())
        try:
            fd = ioctl(self.fd, uapi.VFIO_GROUP_GET_DEVICE_FD, ctypes.addressof(name))
        except IoctlError as err:
            if err.errno == errno.ENODEV:
                raise VfioError(f"{bdf}: not a device of VFIO group {self.number}") from None
            raise VfioError(f"{bdf}: cannot open it: {os.strerror(err.errno)}") from None
        return VfioDevice(fd, bdf)

    def close(self) -> None:
        super().close()  # the kernel takes the group out of its container
        if self.container is not None:
            self.container.group_closed(self)
            self.container = None


class Container(FdOwner):
    """A VFIO container with a Type1 v2 IOMMU; owns its fd."""

    def __init__(self) -> None:
        self.fd = open_node(
            CONTAINER_PATH, "VFIO container", "the kernel needs CONFIG_VFIO_CONTAINER"
        )
        try:
            version = ioctl(self.fd, uapi.VFIO_GET_API_VERSION)
            if version != uapi.VFIO_API_VERSION:
                raise VfioError(f"VFIO API version {version}, pyvmm speaks version 0")
            if not self.check_extension(uapi.VfioExtension.TYPE1v2_IOMMU):
                raise VfioError("the VFIO container has no Type1 v2 IOMMU (no IOMMU driver?)")
        except BaseException:
            os.close(self.fd)
            raise
        self.groups: list[Group] = []

    def check_extension(self, extension: uapi.VfioExtension) -> bool:
        return ioctl(self.fd, uapi.VFIO_CHECK_EXTENSION, int(extension)) > 0

    def add_group(self, group: Group) -> None:
        """Put a viable group in this container; the first one also sets the IOMMU model (the
        kernel drops it again when the last group leaves)."""
        group.check_viable()
        ioctl(group.fd, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(self.fd))
        if not self.groups:
            try:
                ioctl(self.fd, uapi.VFIO_SET_IOMMU, int(uapi.VfioExtension.TYPE1v2_IOMMU))
            except IoctlError as err:
                ioctl(group.fd, uapi.VFIO_GROUP_UNSET_CONTAINER)
                raise VfioError(
                    f"VFIO group {group.number}: the Type1 v2 IOMMU cannot be set up: "
                    f"{os.strerror(err.errno)}"
                ) from None
        group.container = self
        self.groups.append(group)

    def group_closed(self, group: Group) -> None:
        self.groups.remove(group)

    def iommu_info(self) -> IommuInfo:
        data = info_with_caps(self.fd, uapi.VFIO_IOMMU_GET_INFO, uapi.vfio_iommu_type1_info)
        info = uapi.vfio_iommu_type1_info.from_buffer_copy(data)
        ranges: tuple[tuple[int, int], ...] = ()
        available = None
        if info.flags & uapi.VfioIommuInfoFlag.CAPS:
            for cap_id, offset in capability_chain(data, info.cap_offset):
                if cap_id == uapi.VfioIommuType1InfoCap.CAP_IOVA_RANGE:
                    ranges = self._iova_ranges(data, offset)
                elif cap_id == uapi.VfioIommuType1InfoCap.DMA_AVAIL:
                    cap = read_capability(uapi.vfio_iommu_type1_info_dma_avail, data, offset)
                    available = cap.avail
        return IommuInfo(info.iova_pgsizes, ranges, available)

    @staticmethod
    def _iova_ranges(data: bytes, offset: int) -> tuple[tuple[int, int], ...]:
        cap_type = uapi.vfio_iommu_type1_info_cap_iova_range
        cap = read_capability(cap_type, data, offset)
        entry = ctypes.sizeof(uapi.vfio_iova_range)
        first = offset + cap_type.iova_ranges.offset
        if first + cap.nr_iovas * entry > len(data):
            raise VfioError("malformed VFIO IOVA-range capability")
        return tuple(
            (r.start, r.end)
            for r in (
                uapi.vfio_iova_range.from_buffer_copy(data, first + i * entry)
                for i in range(cap.nr_iovas)
            )
        )

    def map(self, iova: int, vaddr: int, size: int, *, writable: bool = True) -> None:
        """Let the container's devices reach `size` bytes of this process at `vaddr` through
        bus addresses iova..iova+size (pinned by the kernel until unmapped)."""
        flags = uapi.VfioDmaMapFlag.READ | (uapi.VfioDmaMapFlag.WRITE if writable else 0)
        request = uapi.vfio_iommu_type1_dma_map(
            argsz=ctypes.sizeof(uapi.vfio_iommu_type1_dma_map),
            flags=flags,
            vaddr=vaddr,
            iova=iova,
            size=size,
        )
        try:
            ioctl(self.fd, uapi.VFIO_IOMMU_MAP_DMA, request)
        except IoctlError as err:
            raise VfioError(
                f"DMA map of {size:#x} bytes at IOVA {iova:#x} failed: {dma_map_error(err)}"
            ) from None

    def unmap(self, iova: int, size: int) -> int:
        """Remove mappings in iova..iova+size; returns how many bytes were unmapped."""
        request = uapi.vfio_iommu_type1_dma_unmap(
            argsz=ctypes.sizeof(uapi.vfio_iommu_type1_dma_unmap), iova=iova, size=size
        )
        ioctl(self.fd, uapi.VFIO_IOMMU_UNMAP_DMA, request)
        return request.size

    def iova_ranges(self) -> tuple[tuple[int, int], ...]:
        return self.iommu_info().iova_ranges


class ContainerContext(VfioContext):
    """The legacy backend's IOMMU context: one container, and each IOMMU group in it once
    (devices of one group share its fd, as the uAPI wants)."""

    backend = "container"

    def __init__(self, vm: Vm | None = None, address_space: AddressSpace | None = None) -> None:
        super().__init__(vm, address_space)
        self.container = self._stack.enter_context(Container())
        self.groups: dict[str, Group] = {}
        self._group_stacks: dict[str, contextlib.ExitStack] = {}
        self._group_users: dict[str, int] = {}

    @property
    def dma(self) -> Container:
        return self.container

    def _group_user_gone(self, number: str) -> None:
        self._group_users[number] -= 1
        if not self._group_users[number]:
            del self.groups[number], self._group_users[number]
            self._group_stacks.pop(number).close()

    def _open(self, device: HostDevice, stack: contextlib.ExitStack) -> VfioDevice:
        if not device.iommu_group:
            raise VfioError(f"{device.name}: no IOMMU group; is it bound to vfio-pci?")
        number = device.iommu_group
        group = self.groups.get(number)
        if group is None:
            with contextlib.ExitStack() as group_stack:
                group = group_stack.enter_context(Group(number))
                self.container.add_group(group)
                self._tell_kvm(group.fd, group_stack)
                self._group_stacks[number] = group_stack.pop_all()
            self.groups[number] = group
            self._group_users[number] = 0
        # a group stays while one of its devices is open (its devices share its fd)
        self._group_users[number] += 1
        stack.callback(self._group_user_gone, number)
        return stack.enter_context(group.open_device(device.name))
