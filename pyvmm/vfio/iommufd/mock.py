"""The kernel's iommufd selftest mock (CONFIG_IOMMUFD_TEST): devices without hardware.

IOMMU_TEST_CMD's MOCK_DOMAIN op plugs a mock device into an iommufd, bound and attached to an
IOAS or HWPT, behind a mock IOMMU that implements every iommufd object (dirty tracking, nesting
with the SELFTEST data types, a SELFTEST vIOMMU with vEVENTs and HW queues, I/O page faults).
Its other ops look into the kernel's side: which pages the mock page table maps, how often a
page is pinned, what a nested HWPT's IOTLB or a device's cache holds, and they raise what
hardware would (a fault, a vEVENT, a dirty bit). It is how pyvmm's iommufd classes are tested
where no IOMMU can nest, and a way to learn the object model on any kernel that has it.

The mock IOMMU translates IOVAs in MOCK_APERTURE_START..MOCK_APERTURE_LAST (16 MiB - 2 GiB)
with 2 KiB pages.
"""

from __future__ import annotations

import ctypes
import errno
import os

from pyvmm.uapi import iommufd as uapi
from pyvmm.uapi.ioctl import IoctlError, ioctl
from pyvmm.vfio.errors import VfioError
from pyvmm.vfio.iommufd.hwpt import Hwpt
from pyvmm.vfio.iommufd.objects import BoundDevice, IoAddressSpace, Iommufd, IommufdObject

Op = uapi.IommuTestOp


def test_cmd(
    iommufd: Iommufd, op: uapi.IommuTestOp, object_id: int = 0, **fields: object
) -> uapi.iommu_test_cmd:
    """One IOMMU_TEST_CMD; `fields` fill the op's member of the union (named as the op)."""
    cmd = uapi.iommu_test_cmd(size=ctypes.sizeof(uapi.iommu_test_cmd), op=op, id=object_id)
    member = getattr(cmd, _MEMBERS[op])
    for name, value in fields.items():
        setattr(member, name, value)
    ioctl(iommufd.fd, uapi.IOMMU_TEST_CMD, cmd, name=f"IOMMU_TEST_OP_{op.name}")
    return cmd


_MEMBERS = {
    Op.MOCK_DOMAIN: "mock_domain",
    Op.MOCK_DOMAIN_FLAGS: "mock_domain_flags",
    Op.MOCK_DOMAIN_REPLACE: "mock_domain_replace",
    Op.MD_CHECK_MAP: "check_map",
    Op.MD_CHECK_REFS: "check_refs",
    Op.MD_CHECK_IOTLB: "check_iotlb",
    Op.DEV_CHECK_CACHE: "check_dev_cache",
    Op.TRIGGER_IOPF: "trigger_iopf",
    Op.TRIGGER_VEVENT: "trigger_vevent",
    Op.DIRTY: "dirty",
}


def available(iommufd: Iommufd) -> bool:
    """Whether this kernel has the mock (IOMMU_TEST_CMD is ENOTTY without CONFIG_IOMMUFD_TEST)."""
    try:
        test_cmd(iommufd, Op.MD_CHECK_REFS, length=0, uptr=0, refs=0)
    except IoctlError as err:
        return err.errno != errno.ENOTTY
    return True


class MockDevice(BoundDevice):
    """A mock device, bound to the iommufd (its device id is `id`) and attached to `page_table`;
    `close()` unplugs it."""

    def __init__(
        self,
        page_table: IoAddressSpace | Hwpt,
        flags: uapi.MockDeviceFlag | int = 0,
        name: str = "mock",
    ) -> None:
        iommufd = page_table.iommufd
        try:
            cmd = test_cmd(iommufd, Op.MOCK_DOMAIN_FLAGS, page_table.id, dev_flags=flags)
        except IoctlError as err:
            if err.errno == errno.ENOTTY:
                raise VfioError(
                    "the iommufd selftest mock is not in this kernel (CONFIG_IOMMUFD_TEST)"
                ) from None
            reserved = " (the mock IOMMU reserves IOVAs the IOAS keeps)"
            raise VfioError(
                f"cannot plug a mock device into {page_table.kind} {page_table.id}: "
                f"{os.strerror(err.errno)}{reserved if err.errno == errno.EADDRINUSE else ''}"
            ) from None
        out = cmd.mock_domain_flags
        self.stdev_id = out.out_stdev_id
        self.flags = uapi.MockDeviceFlag(flags)
        super().__init__(iommufd, out.out_idev_id, name)
        self.attached = page_table
        self.hwpt_id = out.out_hwpt_id

    def details(self) -> dict[str, object]:
        return {**super().details(), "mock": self.stdev_id}

    def _attach(self, pt_id: int) -> int:
        try:
            cmd = test_cmd(self.iommufd, Op.MOCK_DOMAIN_REPLACE, self.stdev_id, pt_id=pt_id)
        except IoctlError as err:
            raise VfioError(
                f"{self.name}: cannot attach it to iommufd object {pt_id}: {os.strerror(err.errno)}"
            ) from None
        return cmd.mock_domain_replace.pt_id

    def _destroy(self) -> None:
        self.iommufd.destroy(self.stdev_id)  # the device goes with its selftest object

    # what the mock raises, as hardware would

    def trigger_fault(
        self,
        addr: int,
        perm: uapi.IommuPgfaultPerm = uapi.IommuPgfaultPerm.READ,
        *,
        pasid: int = 0,
        group: int = 0,
    ) -> None:
        """An I/O page fault at `addr` (the last of its group), sent to the fault queue of the
        HWPT the device is attached to (for its PASID, if one is given)."""
        test_cmd(
            self.iommufd,
            Op.TRIGGER_IOPF,
            dev_id=self.id,
            pasid=pasid,
            grpid=group,
            perm=perm,
            addr=addr,
        )

    def trigger_vevent(self) -> None:
        """A SELFTEST vEVENT naming this device by its vDEVICE's virt_id (the device must be
        attached to a nested HWPT over the vIOMMU)."""
        test_cmd(self.iommufd, Op.TRIGGER_VEVENT, dev_id=self.id)

    # the kernel's view

    def cache(self, index: int, expected: int) -> bool:
        """Whether entry `index` of the device's cache (invalidated through a vIOMMU) holds
        `expected` (IOMMU_TEST_OP_DEV_CHECK_CACHE)."""
        return _check(self.iommufd, Op.DEV_CHECK_CACHE, self.id, id=index, cache=expected)


def _check(iommufd: Iommufd, op: uapi.IommuTestOp, object_id: int = 0, **fields: object) -> bool:
    """A check op: True if the kernel's state is as given, False if it differs (EINVAL or EIO)."""
    try:
        test_cmd(iommufd, op, object_id, **fields)
    except IoctlError as err:
        if err.errno in (errno.EINVAL, errno.EIO):
            return False
        raise
    return True


def maps(iommufd: Iommufd, hwpt_id: int, iova: int, length: int, addr: int) -> bool:
    """Whether the mock paging HWPT `hwpt_id` (an explicit one, or the one the kernel made for
    a mock device on an IOAS) translates iova..iova+length to the pages this process has at
    `addr` (IOMMU_TEST_OP_MD_CHECK_MAP)."""
    return _check(iommufd, Op.MD_CHECK_MAP, hwpt_id, iova=iova, length=length, uptr=addr)


def pinned(iommufd: Iommufd, addr: int, length: int, times: int) -> bool:
    """Whether every page of this process at addr..addr+length is pinned `times` times
    (IOMMU_TEST_OP_MD_CHECK_REFS; page-aligned)."""
    return _check(iommufd, Op.MD_CHECK_REFS, length=length, uptr=addr, refs=times)


def iotlb_holds(hwpt: IommufdObject, index: int, expected: int) -> bool:
    """Whether entry `index` of a mock nested HWPT's IOTLB holds `expected` (it starts at the
    `iotlb` of its `iommu_hwpt_selftest` and is 0 once invalidated)."""
    return _check(hwpt.iommufd, Op.MD_CHECK_IOTLB, hwpt.id, id=index, iotlb=expected)


def mark_dirty(hwpt: IommufdObject, iova: int, page_size: int, bitmap: bytes) -> int:
    """Make the mock IOMMU record DMA writes to the pages whose bits are set in `bitmap` (bit n:
    iova + n * page_size), as a device would (IOMMU_TEST_OP_DIRTY; dirty tracking must be on);
    returns how many it marked."""
    buffer = (ctypes.c_char * len(bitmap)).from_buffer_copy(bitmap)
    cmd = test_cmd(
        hwpt.iommufd,
        Op.DIRTY,
        hwpt.id,
        iova=iova,
        length=len(bitmap) * 8 * page_size,
        page_size=page_size,
        uptr=ctypes.addressof(buffer),
    )
    return cmd.dirty.out_nr_dirty
