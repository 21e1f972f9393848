"""The iommufd VFIO backend: /dev/iommu, I/O address spaces (IOAS), and VFIO device cdevs
(/dev/vfio/devices/vfioN) bound to the iommufd and attached to an IOAS.

Where the legacy backend maps DMA on a container shared by groups, here each object has an id in
the iommufd: an IOAS holds the mappings, a device is bound (getting a device id) and attached to
the IOAS (the kernel then makes, or reuses, a hardware page table for it, and reports its id).
`IommufdContext` is this backend's IOMMU context for a VM (pyvmm.vfio.context).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from typing import TYPE_CHECKING

from pyvmm.uapi import iommufd as uapi
from pyvmm.uapi import vfio as vfio_uapi
from pyvmm.uapi.ioctl import IoctlError, ioctl
from pyvmm.vfio.context import HostDevice, VfioContext
from pyvmm.vfio.device import VfioDevice
from pyvmm.vfio.errors import VfioError, dma_map_error, open_node

if TYPE_CHECKING:
    from pyvmm.kvm.vm import Vm
    from pyvmm.machine.address_space import AddressSpace

IOMMUFD_PATH = "/dev/iommu"
CDEV_DIR = "/dev/vfio/devices"
MAX_IOVA_RANGES = 4096  # a handful in practice (reserved regions split the space)


class Iommufd:
    """An open /dev/iommu; owns its fd. Objects made in it go when it is closed."""

    def __init__(self) -> None:
        self.fd = open_node(IOMMUFD_PATH, "iommufd", "the kernel needs CONFIG_IOMMUFD")

    def alloc_ioas(self) -> IoAddressSpace:
        request = uapi.iommu_ioas_alloc(size=ctypes.sizeof(uapi.iommu_ioas_alloc))
        ioctl(self.fd, uapi.IOMMU_IOAS_ALLOC, request)
        return IoAddressSpace(self, request.out_ioas_id)

    def destroy(self, object_id: int) -> None:
        request = uapi.iommu_destroy(size=ctypes.sizeof(uapi.iommu_destroy), id=object_id)
        try:
            ioctl(self.fd, uapi.IOMMU_DESTROY, request)
        except IoctlError as err:
            if err.errno == errno.EBUSY:
                raise VfioError(
                    f"iommufd object {object_id} is in use: detach its devices first"
                ) from None
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Iommufd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _map_flags(writable: bool) -> int:
    """An IOAS map at the IOVA given (pyvmm maps guest RAM at IOVA = guest-physical address)."""
    flags = uapi.IommuIoasMapFlag.FIXED_IOVA | uapi.IommuIoasMapFlag.READABLE
    return flags | uapi.IommuIoasMapFlag.WRITEABLE if writable else flags


class IoAddressSpace:
    """An IOAS: the IOVA -> process-memory mappings that attached devices DMA through (a
    `DmaSpace`, as the legacy container is)."""

    def __init__(self, iommufd: Iommufd, ioas_id: int) -> None:
        self.iommufd = iommufd
        self.id = ioas_id

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

    def close(self) -> None:
        """Destroy the IOAS (once: iommufd reuses freed ids)."""
        if self.id:
            self.iommufd.destroy(self.id)
            self.id = 0

    def __enter__(self) -> IoAddressSpace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_cdev(cdev: str, name: str | None = None) -> VfioDevice:
    """Open a VFIO device cdev (`vfioN` or a path); it is usable once bound to an iommufd.
    `name` (its BDF, say) names it in messages; by default the cdev's."""
    path = cdev if "/" in cdev else os.path.join(CDEV_DIR, cdev)
    fd = open_node(path, "VFIO cdev", "bind the device to vfio-pci (pyvmm vfio bind BDF)")
    return VfioDevice(fd, name or os.path.basename(path))


def bind(device: VfioDevice, iommufd: Iommufd) -> int:
    """Bind a cdev-opened device to the iommufd; returns its device id there."""
    request = vfio_uapi.vfio_device_bind_iommufd(
        argsz=ctypes.sizeof(vfio_uapi.vfio_device_bind_iommufd), iommufd=iommufd.fd
    )
    try:
        ioctl(device.fd, vfio_uapi.VFIO_DEVICE_BIND_IOMMUFD, request)
    except IoctlError as err:
        hint = " (it is in use, e.g. through its VFIO group)" if err.errno == errno.EBUSY else ""
        raise VfioError(
            f"{device.name}: bind to iommufd failed: {os.strerror(err.errno)}{hint}"
        ) from None
    return request.out_devid


def attach(device: VfioDevice, pt_id: int) -> int:
    """Attach a bound device to an IOAS or hardware page table; returns the HWPT id used."""
    request = vfio_uapi.vfio_device_attach_iommufd_pt(
        argsz=ctypes.sizeof(vfio_uapi.vfio_device_attach_iommufd_pt), pt_id=pt_id
    )
    ioctl(device.fd, vfio_uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, request)
    return request.pt_id


def detach(device: VfioDevice) -> None:
    request = vfio_uapi.vfio_device_detach_iommufd_pt(
        argsz=ctypes.sizeof(vfio_uapi.vfio_device_detach_iommufd_pt)
    )
    ioctl(device.fd, vfio_uapi.VFIO_DEVICE_DETACH_IOMMUFD_PT, request)


class IommufdContext(VfioContext):
    """The iommufd backend's IOMMU context: one iommufd and one IOAS holding guest RAM; each
    device's cdev is bound to the iommufd and attached to the IOAS."""

    backend = "iommufd"

    def __init__(self, vm: Vm | None = None, address_space: AddressSpace | None = None) -> None:
        super().__init__(vm, address_space)
        self.iommufd = self._stack.enter_context(Iommufd())
        try:
            self.ioas = self.iommufd.alloc_ioas()
        except BaseException:
            self._stack.close()
            raise
        self._stack.callback(self.ioas.close)  # after the devices that are attached to it
        self.hwpt_ids: dict[str, int] = {}  # the page table each device got, by BDF

    @property
    def dma(self) -> IoAddressSpace:
        return self.ioas

    def _open(self, device: HostDevice, stack: contextlib.ExitStack) -> VfioDevice:
        if not device.cdev:
            raise VfioError(f"{device.name}: no VFIO cdev; is it bound to vfio-pci?")
        vfio_device = stack.enter_context(open_cdev(device.cdev, device.name))
        bind(vfio_device, self.iommufd)
        try:
            self.hwpt_ids[device.name] = attach(vfio_device, self.ioas.id)
            stack.callback(self.hwpt_ids.pop, device.name, None)
        except IoctlError as err:
            raise VfioError(
                f"{device.name}: cannot attach it to the VM's IOAS: {os.strerror(err.errno)}"
                + (
                    " (its reserved IOVA ranges clash with guest RAM?)"
                    if err.errno == errno.EADDRINUSE
                    else ""
                )
            ) from None
        self._tell_kvm(vfio_device.fd, stack)
        return vfio_device
