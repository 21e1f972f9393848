"""The iommufd VFIO backend and its object model: /dev/iommu, the objects made in it, and VFIO
device cdevs (/dev/vfio/devices/vfioN) bound to it.

Where the legacy backend maps DMA on a container shared by groups, iommufd names every object by
an id in one fd: an IOAS (I/O address space) holds IOVA -> memory mappings; a device is bound
(getting a device id) and attached to an IOAS, the kernel then making (or reusing) a hardware
page table (HWPT) for it, or to a HWPT made explicitly over the IOAS (pyvmm.vfio.iommufd.hwpt);
for hardware nesting a vIOMMU wraps a nesting-parent HWPT and holds vDEVICEs, event queues and HW
queues (pyvmm.vfio.iommufd.viommu, pyvmm.vfio.iommufd.events). The kernel's iommufd selftest mock
gives devices without hardware (pyvmm.vfio.iommufd.mock).

Every object is an `IommufdObject`: it owns its id, knows the objects it depends on (its
parents), closes (IOMMU_DESTROY) once, and is listed by `Iommufd.objects()`. Closing the
`Iommufd` destroys what is left in dependency order, children first, then closes the fd.
The backend's IOMMU context for a VM is `backend.IommufdContext`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Sequence
from enum import IntFlag
from typing import TYPE_CHECKING, ClassVar, Self

from pyvmm.kvm.fd import FdOwner
from pyvmm.uapi import iommufd as uapi
from pyvmm.uapi import vfio as vfio_uapi
from pyvmm.uapi.ioctl import IoctlError, ioctl
from pyvmm.vfio.device import VfioDevice
from pyvmm.vfio.errors import VfioError, checked_ioctl, dma_map_error, open_node

if TYPE_CHECKING:
    from pyvmm.vfio.iommufd.hwpt import Hwpt

IOMMUFD_PATH = "/dev/iommu"
CDEV_DIR = "/dev/vfio/devices"
MAX_IOVA_RANGES = 4096  # a handful in practice (reserved regions split the space)


class Iommufd(FdOwner):
    """An open /dev/iommu; owns its fd and the objects made in it."""

    def __init__(self) -> None:
        self.fd = open_node(IOMMUFD_PATH, "iommufd", "the kernel needs CONFIG_IOMMUFD")
        self._objects: list[IommufdObject] = []  # live, in the order they were made

    def alloc_ioas(self) -> IoAddressSpace:
        request = uapi.iommu_ioas_alloc(size=ctypes.sizeof(uapi.iommu_ioas_alloc))
        ioctl(self.fd, uapi.IOMMU_IOAS_ALLOC, request)
        return IoAddressSpace(self, request.out_ioas_id)

    def objects(self) -> tuple[IommufdObject, ...]:
        """The live objects, oldest first."""
        return tuple(self._objects)

    def describe(self) -> list[dict[str, object]]:
        """The live objects as plain data (id, type, parents by id, what else each knows)."""
        return [item.describe() for item in tuple(self._objects)]  # (the control thread)

    def dependents(self, item: IommufdObject) -> list[IommufdObject]:
        """The live objects that depend on `item` (it cannot be destroyed before them)."""
        return [other for other in self._objects if item in other.parents]

    def option(self, option: uapi.IommuOption, object_id: int = 0, value: int | None = None) -> int:
        """Read an IOMMU_OPTION, or set it when `value` is given; returns its value."""
        request = uapi.iommu_option(
            size=ctypes.sizeof(uapi.iommu_option),
            option_id=option,
            op=uapi.IommuOptionOp.GET if value is None else uapi.IommuOptionOp.SET,
            object_id=object_id,
            val64=value or 0,
        )
        ioctl(self.fd, uapi.IOMMU_OPTION, request)
        return request.val64

    def destroy(self, object_id: int) -> None:
        """IOMMU_DESTROY of one object id (an `IommufdObject` closes itself through this)."""
        request = uapi.iommu_destroy(size=ctypes.sizeof(uapi.iommu_destroy), id=object_id)
        ioctl(self.fd, uapi.IOMMU_DESTROY, request)

    def _add(self, item: IommufdObject) -> None:
        self._objects.append(item)

    def _forget(self, item: IommufdObject) -> None:
        self._objects.remove(item)

    def close(self) -> None:
        """Destroy the objects left, each after those that depend on it, then close the fd
        (the kernel would free them with it, but an object's own fd would stay open)."""
        if self.fd < 0:
            return
        try:
            with contextlib.ExitStack() as closing:
                for item in self._teardown_order():
                    closing.push(_ignore_if_gone)
                    closing.callback(item.close)
        finally:
            self._objects.clear()
            super().close()

    def _teardown_order(self) -> list[IommufdObject]:
        """Every live object, parents before children (an ExitStack runs them in reverse)."""
        order: list[IommufdObject] = []
        remaining = list(self._objects)
        while remaining:
            ready = [item for item in remaining if not any(p in remaining for p in item.parents)]
            if not ready:  # a cycle cannot be built, but never loop for ever
                ready = remaining[:1]
            order.extend(ready)
            remaining = [item for item in remaining if item not in ready]
        return order


def _ignore_if_gone(
    exc_type: type[BaseException] | None, exc: BaseException | None, _tb: object
) -> bool:
    """Teardown goes on past an object the kernel no longer has (freed with its parent)."""
    return isinstance(exc, IoctlError) and exc.errno == errno.ENOENT


class IommufdObject:
    """An object in an iommufd: owns its id, knows its parents (the objects it depends on), and
    is destroyed once by `close()`; iommufd reuses freed ids, so the id is 0 afterwards."""

    kind: ClassVar[str]  # what `describe` calls it: "ioas", "hwpt", "viommu", ...

    def __init__(self, iommufd: Iommufd, object_id: int) -> None:
        self.iommufd = iommufd
        self.id = object_id
        iommufd._add(self)

    @property
    def parents(self) -> tuple[IommufdObject, ...]:
        return ()

    def details(self) -> dict[str, object]:
        """What else `describe` says of it (flags, types, virtual ids ...)."""
        return {}

    def describe(self) -> dict[str, object]:
        return {
            "id": self.id,
            "type": self.kind,
            "parents": [parent.id for parent in self.parents],
            **self.details(),
        }

    def _destroy(self) -> None:
        self.iommufd.destroy(self.id)

    def close(self) -> None:
        """Destroy the object; refused (VfioError) while another object uses it."""
        if not self.id:
            return
        # Users pyvmm knows of are refused here, before a queue's fd is closed for nothing;
        # the kernel refuses the others (an attached device) with EBUSY.
        users = self.iommufd.dependents(self)
        busy = bool(users)
        if not busy:
            try:
                self._destroy()
            except IoctlError as err:
                if err.errno != errno.EBUSY:
                    raise
                busy = True
        if busy:
            named = ", ".join(f"{o.kind} {o.id}" for o in users)
            what = f" by {named}: detach or destroy those first" if named else ""
            raise VfioError(f"iommufd {self.kind} {self.id} is in use{what}")
        self.iommufd._forget(self)
        self.id = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind} {self.id}>"


def flag_names(flags: IntFlag) -> list[str]:
    """The set members of a uAPI flag value, in lower case (for messages and `describe`)."""
    return [f.name.lower() for f in type(flags) if f.name and f.value and f in flags]


def _map_flags(writable: bool) -> int:
    """An IOAS map at the IOVA given (pyvmm maps guest RAM at IOVA = guest-physical address)."""
    flags = uapi.IommuIoasMapFlag.FIXED_IOVA | uapi.IommuIoasMapFlag.READABLE
    return flags | uapi.IommuIoasMapFlag.WRITEABLE if writable else flags


class IoAddressSpace(IommufdObject):
    """An IOAS: the IOVA -> process-memory mappings that attached devices and HWPTs DMA
    through (a `DmaSpace`, as the legacy container is)."""

    kind = "ioas"

    def map(self, iova: int, vaddr: int, size: int, *, writable: bool = True) -> None:
        """Let attached devices reach `size` bytes of this process at `vaddr` through bus
        addresses iova..iova+size (pinned until unmapped)."""
        request = uapi.iommu_ioas_map(
            size=ctypes.sizeof(uapi.iommu_ioas_map),
            flags=_map_flags(writable),
            ioas_id=self.id,
            user_va=vaddr,
            length=size,
            iova=iova,
        )
        try:
            ioctl(self.iommufd.fd, uapi.IOMMU_IOAS_MAP, request)
        except IoctlError as err:
            raise VfioError(
                f"IOAS {self.id}: map of {size:#x} bytes at IOVA {iova:#x} failed: "
                f"{dma_map_error(err)}"
            ) from None

    def map_file(self, iova: int, fd: int, offset: int, size: int) -> bool:
        """Map `size` bytes of file `fd` (a memfd) from `offset` at `iova`: the kernel pins the
        file's pages, not this process's mapping of them (IOMMU_IOAS_MAP_FILE, Linux 6.13).
        False when the kernel has no MAP_FILE (the caller maps the memory instead)."""
        request = uapi.iommu_ioas_map_file(
            size=ctypes.sizeof(uapi.iommu_ioas_map_file),
            flags=_map_flags(writable=True),
            ioas_id=self.id,
            fd=fd,
            start=offset,
            length=size,
            iova=iova,
        )
        try:
            ioctl(self.iommufd.fd, uapi.IOMMU_IOAS_MAP_FILE, request)
        except IoctlError as err:
            if err.errno in (errno.ENOTTY, errno.EOPNOTSUPP):
                return False
            raise VfioError(
                f"IOAS {self.id}: map of {size:#x} bytes of fd {fd} at IOVA {iova:#x} failed: "
                f"{dma_map_error(err)}"
            ) from None
        return True

    def copy_to(
        self,
        destination: IoAddressSpace,
        src_iova: int,
        dst_iova: int,
        size: int,
        *,
        writable: bool = True,
    ) -> None:
        """Map in `destination` at `dst_iova` the pages this IOAS maps at src_iova..+size,
        without pinning them again (IOMMU_IOAS_COPY)."""
        request = uapi.iommu_ioas_copy(
            size=ctypes.sizeof(uapi.iommu_ioas_copy),
            flags=_map_flags(writable),
            dst_ioas_id=destination.id,
            src_ioas_id=self.id,
            length=size,
            dst_iova=dst_iova,
            src_iova=src_iova,
        )
        try:
            ioctl(self.iommufd.fd, uapi.IOMMU_IOAS_COPY, request)
        except IoctlError as err:
            raise VfioError(
                f"IOAS {self.id}: copy of {size:#x} bytes at IOVA {src_iova:#x} to IOAS "
                f"{destination.id} at {dst_iova:#x} failed: {dma_map_error(err)}"
            ) from None

    def unmap(self, iova: int, size: int) -> int:
        """Remove the mappings in iova..iova+size; returns how many bytes were unmapped."""
        request = uapi.iommu_ioas_unmap(
            size=ctypes.sizeof(uapi.iommu_ioas_unmap), ioas_id=self.id, iova=iova, length=size
        )
        try:
            ioctl(self.iommufd.fd, uapi.IOMMU_IOAS_UNMAP, request)
        except IoctlError as err:
            if err.errno == errno.ENOENT:  # nothing mapped there: as the legacy backend, 0
                return 0
            raise
        return request.length

    def iova_ranges(self) -> tuple[tuple[int, int], ...]:
        """The usable IOVA ranges, (start, last inclusive), for the devices now attached."""
        count = 8
        for _ in range(2):
            ranges = (uapi.iommu_iova_range * count)()
            request = uapi.iommu_ioas_iova_ranges(
                size=ctypes.sizeof(uapi.iommu_ioas_iova_ranges),
                ioas_id=self.id,
                num_iovas=count,
                allowed_iovas=ctypes.addressof(ranges),
            )
            try:
                ioctl(self.iommufd.fd, uapi.IOMMU_IOAS_IOVA_RANGES, request)
            except IoctlError as err:
                if err.errno == errno.EMSGSIZE and count < request.num_iovas <= MAX_IOVA_RANGES:
                    count = request.num_iovas
                    continue
                raise
            return tuple((r.start, r.last) for r in ranges[: request.num_iovas])
        raise VfioError(f"IOAS {self.id}: the number of IOVA ranges keeps changing")

    def allow_iovas(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Keep these (start, last inclusive) ranges usable for ever: a device whose IOMMU
        reserves IOVAs in them can no longer attach (IOMMU_IOAS_ALLOW_IOVAS; it also bounds the
        kernel's own choice of IOVAs, which pyvmm never asks for)."""
        array = (uapi.iommu_iova_range * max(len(ranges), 1))(*ranges)
        request = uapi.iommu_ioas_allow_iovas(
            size=ctypes.sizeof(uapi.iommu_ioas_allow_iovas),
            ioas_id=self.id,
            num_iovas=len(ranges),
            allowed_iovas=ctypes.addressof(array),
        )
        checked_ioctl(
            self.iommufd.fd,
            uapi.IOMMU_IOAS_ALLOW_IOVAS,
            request,
            f"IOAS {self.id}: cannot keep those IOVA ranges",
            {
                errno.EADDRINUSE: "an attached device's IOMMU reserves IOVAs in them",
                errno.EINVAL: "a range ends before it starts, or two ranges overlap",
            },
        )

    @property
    def huge_pages(self) -> bool:
        """Whether mappings may use huge IOMMU pages (IOMMU_OPTION_HUGE_PAGES; on by default)."""
        return bool(self.iommufd.option(uapi.IommuOption.HUGE_PAGES, self.id))

    @huge_pages.setter
    def huge_pages(self, enabled: bool) -> None:
        self.iommufd.option(uapi.IommuOption.HUGE_PAGES, self.id, int(enabled))


class BoundDevice(IommufdObject):
    """A device bound to the iommufd, known there by its device id (`id`), which HWPT, vIOMMU
    and vDEVICE allocation take; attached to one page table at a time: an IOAS (the kernel then
    picks the HWPT, `hwpt_id`) or a HWPT. A subclass says how it attaches."""

    kind = "device"

    def __init__(self, iommufd: Iommufd, dev_id: int, name: str) -> None:
        super().__init__(iommufd, dev_id)
        self.name = name
        self.attached: IoAddressSpace | Hwpt | None = None
        self.hwpt_id = 0  # the HWPT the kernel attached it to (the attached one, or the IOAS's)

    @property
    def parents(self) -> tuple[IommufdObject, ...]:
        return (self.attached,) if self.attached is not None else ()

    def details(self) -> dict[str, object]:
        return {"name": self.name, "hwpt": self.hwpt_id}

    def close(self) -> None:
        """Unbind: what names the device (its vDEVICE) goes first, as the kernel needs."""
        for user in self.iommufd.dependents(self):
            user.close()
        super().close()

    def attach(self, page_table: IoAddressSpace | Hwpt) -> int:
        """Attach to an IOAS or HWPT, or replace the one attached (DMA switches to the new
        page table atomically); returns the HWPT id the kernel used."""
        self.hwpt_id = self._attach(page_table.id)
        self.attached = page_table
        return self.hwpt_id

    def _attach(self, pt_id: int) -> int:
        raise NotImplementedError


def open_cdev(cdev: str, name: str | None = None) -> VfioDevice:
    """Open a VFIO device cdev (`vfioN` or a path); it is usable once bound to an iommufd.
    `name` (its BDF, say) names it in messages; by default the cdev's."""
    path = cdev if "/" in cdev else os.path.join(CDEV_DIR, cdev)
    fd = open_node(path, "VFIO cdev", "bind the device to vfio-pci (pyvmm vfio bind BDF)")
    return VfioDevice(fd, name or os.path.basename(path))


class VfioBinding(BoundDevice):
    """A VFIO cdev bound to the iommufd (VFIO_DEVICE_BIND_IOMMUFD); the binding lasts as long as
    the device fd, so `close()` only detaches it. An `emulated` device (an mdev) gets an iommufd
    access, not a device behind an IOMMU: it attaches to an IOAS, and nothing else."""

    def __init__(self, device: VfioDevice, iommufd: Iommufd, *, emulated: bool = False) -> None:
        request = vfio_uapi.vfio_device_bind_iommufd(
            argsz=ctypes.sizeof(vfio_uapi.vfio_device_bind_iommufd), iommufd=iommufd.fd
        )
        try:
            ioctl(device.fd, vfio_uapi.VFIO_DEVICE_BIND_IOMMUFD, request)
        except IoctlError as err:
            hint = (
                " (it is in use, e.g. through its VFIO group)" if err.errno == errno.EBUSY else ""
            )
            raise VfioError(
                f"{device.name}: bind to iommufd failed: {os.strerror(err.errno)}{hint}"
            ) from None
        super().__init__(iommufd, request.out_devid, device.name)
        self.device = device
        self.emulated = emulated

    def details(self) -> dict[str, object]:
        return {**super().details(), "emulated": True} if self.emulated else super().details()

    def _attach(self, pt_id: int) -> int:
        request = vfio_uapi.vfio_device_attach_iommufd_pt(
            argsz=ctypes.sizeof(vfio_uapi.vfio_device_attach_iommufd_pt), pt_id=pt_id
        )
        try:
            ioctl(self.device.fd, vfio_uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, request)
        except IoctlError as err:
            raise VfioError(
                f"{self.name}: cannot attach it to iommufd object {pt_id}: "
                f"{os.strerror(err.errno)}"
                + (
                    " (its reserved IOVA ranges clash with what is mapped there?)"
                    if err.errno == errno.EADDRINUSE
                    else ""
                )
            ) from None
        return request.pt_id

    def detach(self) -> None:
        """Detach from its page table: its DMA is blocked until it is attached again."""
        request = vfio_uapi.vfio_device_detach_iommufd_pt(
            argsz=ctypes.sizeof(vfio_uapi.vfio_device_detach_iommufd_pt)
        )
        ioctl(self.device.fd, vfio_uapi.VFIO_DEVICE_DETACH_IOMMUFD_PT, request)
        self.attached = None
        self.hwpt_id = 0

    def _destroy(self) -> None:
        if self.attached is not None and self.device.fd >= 0:
            self.detach()
