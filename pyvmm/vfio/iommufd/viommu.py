"""The objects of hardware nesting: a vIOMMU, its vDEVICEs and its HW queues.

A **vIOMMU** is a VM's slice of a physical IOMMU: it wraps a nesting-parent HWPT (the stage 2
that translates guest-physical addresses, i.e. the guest RAM IOAS) and is where the guest's
stage-1 tables (nested HWPTs allocated over it), its per-device caches (invalidated through it)
and its event queue (`events.Veventq`) hang. A **vDEVICE** tells the vIOMMU a device's
identity as the guest sees it (`virt_id`: its stream id on SMMUv3, its requester id / BDF on
VT-d), which is how invalidations and events name devices. A **HW queue** is a guest queue in
guest memory that the IOMMU consumes directly (a Tegra241 CMDQV command queue, say): its memory
is the nesting parent's, pinned for as long as the queue exists.

The type of each (`IommuViommuType`, ...) must be what the device's IOMMU driver implements;
`info.hw_info` tells which that is. The kernel's selftest mock implements the SELFTEST
types of all of them.
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Sequence

from pyvmm.uapi import iommufd as uapi
from pyvmm.vfio.errors import checked_ioctl
from pyvmm.vfio.iommufd.events import FaultQueue, Veventq
from pyvmm.vfio.iommufd.hwpt import Hwpt, invalidate
from pyvmm.vfio.iommufd.objects import BoundDevice, IommufdObject


class Viommu(IommufdObject):
    """A vIOMMU over a nesting-parent HWPT, of the type the device's IOMMU driver offers;
    `data` is the driver's structure for it (the selftest's `iommu_viommu_selftest`, filled
    in by the kernel on return), if it takes one."""

    kind = "viommu"

    def __init__(
        self,
        parent: Hwpt,
        device: BoundDevice,
        viommu_type: uapi.IommuViommuType,
        data: ctypes.Structure | None = None,
    ) -> None:
        request = uapi.iommu_viommu_alloc(
            size=ctypes.sizeof(uapi.iommu_viommu_alloc),
            type=viommu_type,
            dev_id=device.id,
            hwpt_id=parent.id,
            data_len=ctypes.sizeof(data) if data is not None else 0,
            data_uptr=ctypes.addressof(data) if data is not None else 0,
        )
        checked_ioctl(
            parent.iommufd.fd,
            uapi.IOMMU_VIOMMU_ALLOC,
            request,
            f"{device.name}: cannot allocate a {uapi.IommuViommuType(viommu_type).name} vIOMMU "
            f"over HWPT {parent.id}",
            {
                errno.EOPNOTSUPP: "its IOMMU driver has no vIOMMU of that type",
                errno.EINVAL: f"HWPT {parent.id} is not a nesting parent",
            },
        )
        self.parent = parent
        self.viommu_type = uapi.IommuViommuType(viommu_type)
        super().__init__(parent.iommufd, request.out_viommu_id)

    @property
    def parents(self) -> tuple[IommufdObject, ...]:
        return (self.parent,)

    def details(self) -> dict[str, object]:
        return {"viommu_type": self.viommu_type.name.lower()}

    def vdevice(self, device: BoundDevice, virt_id: int) -> Vdevice:
        return Vdevice(self, device, virt_id)

    def veventq(self, event_type: uapi.IommuVeventqType, depth: int = 64) -> Veventq:
        return Veventq(self, event_type, depth)

    def hw_queue(
        self, queue_type: uapi.IommuHwQueueType, index: int, iova: int, length: int
    ) -> HwQueue:
        return HwQueue(self, queue_type, index, iova, length)

    def nested_hwpt(
        self, device: BoundDevice, data: ctypes.Structure, *, fault: FaultQueue | None = None
    ) -> Hwpt:
        """A stage-1 HWPT for `device` (which needs a vDEVICE here before it attaches)."""
        return Hwpt.nested(self, device, data, fault=fault)

    def invalidate(self, requests: Sequence[ctypes.Structure]) -> None:
        """Invalidate the vIOMMU's caches (per-device caches, the SMMUv3 command queue's
        commands) with driver-format requests naming devices by virt_id."""
        invalidate(self, requests)


class Vdevice(IommufdObject):
    """A device's identity under a vIOMMU: `virt_id` is its id as the guest sees it."""

    kind = "vdevice"

    def __init__(self, viommu: Viommu, device: BoundDevice, virt_id: int) -> None:
        request = uapi.iommu_vdevice_alloc(
            size=ctypes.sizeof(uapi.iommu_vdevice_alloc),
            viommu_id=viommu.id,
            dev_id=device.id,
            virt_id=virt_id,
        )
        checked_ioctl(
            viommu.iommufd.fd,
            uapi.IOMMU_VDEVICE_ALLOC,
            request,
            f"{device.name}: cannot allocate vDEVICE {virt_id:#x} in viommu {viommu.id}",
            {
                errno.EEXIST: "the device, or that virtual id, has a vDEVICE already",
                errno.EINVAL: "the device is behind another IOMMU than the vIOMMU",
            },
        )
        self.viommu = viommu
        self.device = device
        self.virt_id = virt_id
        super().__init__(viommu.iommufd, request.out_vdevice_id)

    @property
    def parents(self) -> tuple[IommufdObject, ...]:
        return (self.viommu, self.device)

    def details(self) -> dict[str, object]:
        return {"virt_id": self.virt_id}


class HwQueue(IommufdObject):
    """A queue the IOMMU reads from guest memory: `length` bytes at `iova` of the nesting
    parent (mapped there and physically contiguous); queue `index` > 0 needs queue 0."""

    kind = "hw_queue"

    def __init__(
        self,
        viommu: Viommu,
        queue_type: uapi.IommuHwQueueType,
        index: int,
        iova: int,
        length: int,
    ) -> None:
        request = uapi.iommu_hw_queue_alloc(
            size=ctypes.sizeof(uapi.iommu_hw_queue_alloc),
            viommu_id=viommu.id,
            type=queue_type,
            index=index,
            nesting_parent_iova=iova,
            length=length,
        )
        checked_ioctl(
            viommu.iommufd.fd,
            uapi.IOMMU_HW_QUEUE_ALLOC,
            request,
            f"viommu {viommu.id}: cannot allocate HW queue {index} of {length:#x} bytes at IOVA "
            f"{iova:#x}",
            {
                errno.ENOENT: "nothing is mapped there in the nesting parent",
                errno.EFAULT: "that memory is not physically contiguous",
                errno.EEXIST: "the vIOMMU has a queue of that index already",
                errno.EIO: "the queues before it must exist first",
                errno.EOPNOTSUPP: "its IOMMU driver has no HW queue of that type",
            },
        )
        self.viommu = viommu
        self.queue_type = uapi.IommuHwQueueType(queue_type)
        self.index = index
        self.iova = iova
        self.length = length
        super().__init__(viommu.iommufd, request.out_hw_queue_id)

    @property
    def parents(self) -> tuple[IommufdObject, ...]:
        earlier = [
            other
            for other in self.iommufd.objects()
            if isinstance(other, HwQueue)
            and other.viommu is self.viommu
            and other.index < self.index
        ]
        return (self.viommu, *earlier)

    def details(self) -> dict[str, object]:
        return {"index": self.index, "iova": self.iova, "length": self.length}
