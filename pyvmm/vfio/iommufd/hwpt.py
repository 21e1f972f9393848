"""Hardware page tables (HWPTs): iommu_domains made explicitly with IOMMU_HWPT_ALLOC.

A *paging* HWPT is kernel-managed: it translates through an IOAS's mappings, and can be made a
nesting parent (the stage 2 of hardware nesting, which a vIOMMU then wraps) or track which pages
devices wrote (dirty tracking, for live migration). A *nested* HWPT is user-managed: the guest's
own stage-1 page table (its format given by the driver's data type: VT-d S1, an SMMUv3 STE, an
AMD guest DTE, the selftest's), translated through a nesting parent or a vIOMMU; its IOTLB is the
caller's to invalidate (IOMMU_HWPT_INVALIDATE), as a vIOMMU's caches are.

Allocation takes a device id: the kernel makes the table in the format of that device's IOMMU.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pyvmm.uapi import iommufd as uapi
from pyvmm.uapi.ioctl import IoctlError, ioctl
from pyvmm.vfio.errors import VfioError, errno_reason
from pyvmm.vfio.iommufd.objects import BoundDevice, IoAddressSpace, IommufdObject, flag_names

if TYPE_CHECKING:
    from pyvmm.vfio.iommufd.events import FaultQueue
    from pyvmm.vfio.iommufd.viommu import Viommu

_Invalidate = uapi.IommuHwptInvalidateDataType

#: The data type IOMMU_HWPT_ALLOC takes for each driver's nested page table description.
NESTED_DATA_TYPES: dict[type[ctypes.Structure], uapi.IommuHwptDataType] = {
    uapi.iommu_hwpt_vtd_s1: uapi.IommuHwptDataType.VTD_S1,
    uapi.iommu_hwpt_arm_smmuv3: uapi.IommuHwptDataType.ARM_SMMUV3,
    uapi.iommu_hwpt_amd_guest: uapi.IommuHwptDataType.AMD_GUEST,
    uapi.iommu_hwpt_selftest: uapi.IommuHwptDataType.SELFTEST,
}

#: The data type IOMMU_HWPT_INVALIDATE takes for each kind of invalidation request.
INVALIDATE_DATA_TYPES: dict[type[ctypes.Structure], int] = {
    uapi.iommu_hwpt_vtd_s1_invalidate: _Invalidate.HWPT_INVALIDATE_DATA_VTD_S1,
    uapi.iommu_viommu_arm_smmuv3_invalidate: _Invalidate.VIOMMU_INVALIDATE_DATA_ARM_SMMUV3,
    uapi.iommu_hwpt_invalidate_selftest: _Invalidate.HWPT_INVALIDATE_DATA_SELFTEST,
    uapi.iommu_viommu_invalidate_selftest: _Invalidate.VIOMMU_INVALIDATE_DATA_SELFTEST,
}

_ALLOC_ERRORS = {
    errno.EOPNOTSUPP: "its IOMMU cannot do that",
    errno.EINVAL: "its IOMMU does not accept those flags or that data",
    errno.ENOENT: "no such IOAS, parent HWPT, vIOMMU or fault queue",
}


class Hwpt(IommufdObject):
    """A hardware page table; `Hwpt.paging` and `Hwpt.nested` make one."""

    kind = "hwpt"

    def __init__(
        self,
        over: IommufdObject,
        device: BoundDevice,
        flags: uapi.IommuHwptAllocFlag,
        data: ctypes.Structure | None,
        fault: FaultQueue | None,
    ) -> None:
        """IOMMU_HWPT_ALLOC over `over` (an IOAS, a nesting-parent HWPT or a vIOMMU) in the
        format of `device`'s IOMMU; `data` describes a nested table (None: a paging one)."""
        data_type = uapi.IommuHwptDataType.NONE
        if data is not None:
            data_type = NESTED_DATA_TYPES[type(data)]
        if fault is not None:
            flags |= uapi.IommuHwptAllocFlag.FAULT_ID_VALID
        request = uapi.iommu_hwpt_alloc(
            size=ctypes.sizeof(uapi.iommu_hwpt_alloc),
            flags=flags,
            dev_id=device.id,
            pt_id=over.id,
            data_type=data_type,
            data_len=ctypes.sizeof(data) if data is not None else 0,
            data_uptr=ctypes.addressof(data) if data is not None else 0,
            fault_id=fault.id if fault is not None else 0,
        )
        try:
            ioctl(over.iommufd.fd, uapi.IOMMU_HWPT_ALLOC, request)
        except IoctlError as err:
            what = "nested " if data is not None else ""
            raise VfioError(
                f"{device.name}: cannot allocate a {what}HWPT {_describe_flags(flags)}over "
                f"{over.kind} {over.id}: {errno_reason(err, _ALLOC_ERRORS)}"
            ) from None
        self.over = over
        self.flags = flags
        self.data_type = data_type
        self.fault = fault
        super().__init__(over.iommufd, request.out_hwpt_id)

    @classmethod
    def paging(
        cls,
        ioas: IoAddressSpace,
        device: BoundDevice,
        *,
        nest_parent: bool = False,
        dirty_tracking: bool = False,
        fault: FaultQueue | None = None,
    ) -> Hwpt:
        """A kernel-managed page table of `ioas`'s mappings."""
        flags = uapi.IommuHwptAllocFlag(0)
        if nest_parent:
            flags |= uapi.IommuHwptAllocFlag.ALLOC_NEST_PARENT
        if dirty_tracking:
            flags |= uapi.IommuHwptAllocFlag.ALLOC_DIRTY_TRACKING
        return cls(ioas, device, flags, None, fault)

    @classmethod
    def nested(
        cls,
        parent: Hwpt | Viommu,
        device: BoundDevice,
        data: ctypes.Structure,
        *,
        fault: FaultQueue | None = None,
    ) -> Hwpt:
        """A user-managed stage-1 table described by `data` (e.g. `iommu_hwpt_vtd_s1`, or
        `iommu_hwpt_selftest` on the mock), over a nesting parent or a vIOMMU."""
        if type(data) not in NESTED_DATA_TYPES:
            raise TypeError(f"no nested HWPT data type for {type(data).__name__}")
        return cls(parent, device, uapi.IommuHwptAllocFlag(0), data, fault)

    @property
    def is_nested(self) -> bool:
        return self.data_type != uapi.IommuHwptDataType.NONE

    @property
    def parents(self) -> tuple[IommufdObject, ...]:
        return (self.over,) if self.fault is None else (self.over, self.fault)

    def details(self) -> dict[str, object]:
        return {
            "flags": flag_names(self.flags),
            "data_type": self.data_type.name.lower() if self.is_nested else "paging",
        }

    # dirty tracking (a paging HWPT allocated with dirty_tracking=True)

    def set_dirty_tracking(self, enabled: bool) -> None:
        """Start or stop recording which pages DMA wrote (IOMMU_HWPT_SET_DIRTY_TRACKING)."""
        flags = uapi.IommuHwptDirtyTrackingFlag.ENABLE if enabled else 0
        request = uapi.iommu_hwpt_set_dirty_tracking(
            size=ctypes.sizeof(uapi.iommu_hwpt_set_dirty_tracking), flags=flags, hwpt_id=self.id
        )
        try:
            ioctl(self.iommufd.fd, uapi.IOMMU_HWPT_SET_DIRTY_TRACKING, request)
        except IoctlError as err:
            raise VfioError(
                f"HWPT {self.id}: cannot {'start' if enabled else 'stop'} dirty tracking: "
                + self._dirty_error(err)
            ) from None

    def read_dirty(
        self, iova: int, length: int, page_size: int, *, clear: bool = True
    ) -> bytearray:
        """The dirty bitmap of iova..iova+length: bit n (little-endian u64 words, as the kernel
        writes them) for the page at iova + n * page_size; cleared as it is read unless `clear`
        is False (IOMMU_HWPT_GET_DIRTY_BITMAP)."""
        pages = -(-length // page_size)
        bitmap = (ctypes.c_uint64 * max(-(-pages // 64), 1))()
        request = uapi.iommu_hwpt_get_dirty_bitmap(
            size=ctypes.sizeof(uapi.iommu_hwpt_get_dirty_bitmap),
            hwpt_id=self.id,
            flags=0 if clear else uapi.IommuHwptGetDirtyBitmapFlag.NO_CLEAR,
            iova=iova,
            length=length,
            page_size=page_size,
            data=ctypes.addressof(bitmap),
        )
        try:
            ioctl(self.iommufd.fd, uapi.IOMMU_HWPT_GET_DIRTY_BITMAP, request)
        except IoctlError as err:
            raise VfioError(
                f"HWPT {self.id}: cannot read the dirty bitmap of {length:#x} bytes at IOVA "
                f"{iova:#x}: {self._dirty_error(err)}"
            ) from None
        return bytearray(bitmap)

    def _dirty_error(self, err: OSError) -> str:
        if not self.flags & uapi.IommuHwptAllocFlag.ALLOC_DIRTY_TRACKING:
            return "it was allocated without dirty tracking"
        return os.strerror(err.errno or 0)

    def invalidate(self, requests: Sequence[ctypes.Structure]) -> None:
        """Invalidate a nested HWPT's caches (its IOTLB) with driver-format requests."""
        invalidate(self, requests)


class InvalidationError(VfioError):
    """IOMMU_HWPT_INVALIDATE stopped at request `index`; those before it were carried out."""

    def __init__(self, target: str, index: int, count: int, error: int) -> None:
        super().__init__(
            f"{target}: invalidation request {index} of {count} failed: {os.strerror(error)} "
            f"(the {index} before it were carried out)"
        )
        self.index = index
        self.errno = error


def invalidate(target: IommufdObject, requests: Sequence[ctypes.Structure]) -> None:
    """IOMMU_HWPT_INVALIDATE on a nested HWPT or a vIOMMU: every request, in order, all of one
    driver-format type; raises `InvalidationError` naming the first that failed."""
    if not requests:
        return
    entry_type = type(requests[0])
    if entry_type not in INVALIDATE_DATA_TYPES or any(type(r) is not entry_type for r in requests):
        raise TypeError("invalidation requests must all be of one known driver-format type")
    entries = (entry_type * len(requests))(*requests)
    request = uapi.iommu_hwpt_invalidate(
        size=ctypes.sizeof(uapi.iommu_hwpt_invalidate),
        hwpt_id=target.id,
        data_uptr=ctypes.addressof(entries),
        data_type=INVALIDATE_DATA_TYPES[entry_type],
        entry_len=ctypes.sizeof(entry_type),
        entry_num=len(requests),
    )
    try:
        ioctl(target.iommufd.fd, uapi.IOMMU_HWPT_INVALIDATE, request)
    except IoctlError as err:
        # the kernel wrote back how many it handled: the failed one is the next
        raise InvalidationError(
            f"{target.kind} {target.id}", request.entry_num, len(requests), err.errno or 0
        ) from None


def _describe_flags(flags: uapi.IommuHwptAllocFlag) -> str:
    names = flag_names(flags)
    return f"({', '.join(names)}) " if names else ""
