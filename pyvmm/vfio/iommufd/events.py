"""The two queues through which iommufd reports to user space, each an object with an fd.

- A **fault queue** (IOMMU_FAULT_QUEUE_ALLOC) receives the I/O page faults (PRI / stall) of the
  HWPTs allocated with it; each read gives `iommu_hwpt_pgfault` records, and a group of faults
  (those up to the one flagged LAST_PAGE) is answered by writing one `iommu_hwpt_page_response`
  with the group's cookie. Faults left unanswered are answered INVALID by the kernel when the
  device detaches or the queue is destroyed.
- A **vEVENTQ** (IOMMU_VEVENTQ_ALLOC) receives a vIOMMU's events of one type (the guest-visible
  event records of an SMMUv3, say), each an `iommufd_vevent_header` then the type's record; when
  the queue overflows, a header flagged LOST_EVENTS (with no record) stands for what was lost,
  and the header's sequence number jumps.

A read of either fd returns at once, empty when nothing is queued; both are pollable. The
object cannot be destroyed while its fd is open, so `close()` closes the fd first (once nothing
pyvmm knows of uses the object).
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyvmm.uapi import iommufd as uapi
from pyvmm.vfio.errors import VfioError, checked_ioctl, errno_reason
from pyvmm.vfio.iommufd.objects import Iommufd, IommufdObject

if TYPE_CHECKING:
    from pyvmm.vfio.iommufd.viommu import Viommu

#: Records room is made for per read: the kernel hands out whole fault groups only (a PRI group
#: holds up to 512 requests in practice), and a read with no room for the next one gets nothing.
READ_BATCH = 1024

#: The record that follows a vEVENT header, by vEVENTQ type.
VEVENT_RECORDS: dict[uapi.IommuVeventqType, type[ctypes.Structure]] = {
    uapi.IommuVeventqType.ARM_SMMUV3: uapi.iommu_vevent_arm_smmuv3,
    uapi.IommuVeventqType.TEGRA241_CMDQV: uapi.iommu_vevent_tegra241_cmdqv,
    uapi.IommuVeventqType.SELFTEST: uapi.iommu_viommu_event_selftest,
}


class _QueueObject(IommufdObject):
    """An iommufd object with an fd of its own, closed before the object is destroyed."""

    def __init__(self, iommufd: Iommufd, object_id: int, fd: int) -> None:
        self.fd = fd
        super().__init__(iommufd, object_id)

    def _read(self, size: int) -> bytes:
        return os.read(self.fd, size)

    def _destroy(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        super()._destroy()


@dataclass(frozen=True)
class PageFault:
    """One I/O page fault as the kernel reported it."""

    dev_id: int
    pasid: int | None  # None: the fault carried no PASID
    group: int  # the PRI page request group
    perm: uapi.IommuPgfaultPerm
    addr: int
    length: int
    last: bool  # the group's last fault: answer the group with its cookie
    cookie: int


class FaultQueue(_QueueObject):
    """An I/O page fault queue; give it to `Hwpt.paging` or `Hwpt.nested` as `fault`."""

    kind = "fault"

    def __init__(self, iommufd: Iommufd) -> None:
        request = uapi.iommu_fault_alloc(size=ctypes.sizeof(uapi.iommu_fault_alloc))
        failed = "cannot allocate an iommufd fault queue"
        checked_ioctl(iommufd.fd, uapi.IOMMU_FAULT_QUEUE_ALLOC, request, failed, {})
        super().__init__(iommufd, request.out_fault_id, request.out_fault_fd)

    def read(self) -> list[PageFault]:
        """The faults queued now (whole groups only), oldest first; [] if none."""
        record_size = ctypes.sizeof(uapi.iommu_hwpt_pgfault)
        data = self._read(record_size * READ_BATCH)
        faults = []
        for offset in range(0, len(data) - record_size + 1, record_size):
            record = uapi.iommu_hwpt_pgfault.from_buffer_copy(data, offset)
            flags = uapi.IommuPgfaultFlag(record.flags)
            faults.append(
                PageFault(
                    dev_id=record.dev_id,
                    pasid=record.pasid if flags & uapi.IommuPgfaultFlag.PASID_VALID else None,
                    group=record.grpid,
                    perm=uapi.IommuPgfaultPerm(record.perm),
                    addr=record.addr,
                    length=record.length,
                    last=bool(flags & uapi.IommuPgfaultFlag.LAST_PAGE),
                    cookie=record.cookie,
                )
            )
        return faults

    def respond(self, fault: PageFault, *, success: bool = True) -> None:
        """Answer the group `fault` ends: the device retries (success) or gives up."""
        code = (
            uapi.IommufdPageResponseCode.SUCCESS
            if success
            else uapi.IommufdPageResponseCode.INVALID
        )
        response = uapi.iommu_hwpt_page_response(cookie=fault.cookie, code=code)
        try:
            os.write(self.fd, bytes(response))
        except OSError as err:
            what = errno_reason(err, {errno.EINVAL: "no such fault is pending"})
            raise VfioError(
                f"fault queue {self.id}: cannot answer fault {fault.cookie}: {what}"
            ) from None


@dataclass(frozen=True)
class Vevent:
    """One vEVENT: its sequence number and the type's record (None for a LOST_EVENTS mark:
    events were dropped before it)."""

    sequence: int
    record: ctypes.Structure | None

    @property
    def lost_before(self) -> bool:
        return self.record is None


class Veventq(_QueueObject):
    """A vIOMMU's queue of events of one type (`Viommu.veventq` makes one)."""

    kind = "veventq"

    def __init__(self, viommu: Viommu, event_type: uapi.IommuVeventqType, depth: int) -> None:
        request = uapi.iommu_veventq_alloc(
            size=ctypes.sizeof(uapi.iommu_veventq_alloc),
            viommu_id=viommu.id,
            type=event_type,
            veventq_depth=depth,
        )
        checked_ioctl(
            viommu.iommufd.fd,
            uapi.IOMMU_VEVENTQ_ALLOC,
            request,
            f"viommu {viommu.id}: cannot allocate a {event_type.name} vEVENTQ",
            {
                errno.EEXIST: "the vIOMMU has a queue of that type already",
                errno.EOPNOTSUPP: "its IOMMU has no such event type",
                errno.EINVAL: "the depth must be at least 1",
            },
        )
        self.viommu = viommu
        self.event_type = uapi.IommuVeventqType(event_type)
        self.depth = depth
        super().__init__(viommu.iommufd, request.out_veventq_id, request.out_veventq_fd)

    @property
    def parents(self) -> tuple[IommufdObject, ...]:
        return (self.viommu,)

    def details(self) -> dict[str, object]:
        return {"event_type": self.event_type.name.lower(), "depth": self.depth}

    def read(self) -> list[Vevent]:
        """The events queued now, oldest first; [] if none."""
        record_type = VEVENT_RECORDS[self.event_type]
        header_size = ctypes.sizeof(uapi.iommufd_vevent_header)
        record_size = ctypes.sizeof(record_type)
        data = self._read((header_size + record_size) * READ_BATCH)
        events, offset = [], 0
        while offset + header_size <= len(data):
            header = uapi.iommufd_vevent_header.from_buffer_copy(data, offset)
            offset += header_size
            if header.flags & uapi.IommuVeventqFlag.LOST_EVENTS:
                events.append(Vevent(header.sequence, None))
                continue
            if offset + record_size > len(data):
                raise VfioError(f"vEVENTQ {self.id}: the kernel gave a truncated event")
            events.append(Vevent(header.sequence, record_type.from_buffer_copy(data, offset)))
            offset += record_size
        return events
