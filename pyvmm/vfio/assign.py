"""Assigning a host device to a machine (device kind "vfio-pci"):

    machine.add_device("vfio-pci", host="0000:00:04.0")              # a PCI function
    machine.add_device("vfio-pci", host="/sys/bus/mdev/devices/UUID") # an mdev
    pyvmm run ... --vfio-pci 0000:00:04.0 --vfio-dev /sys/bus/mdev/devices/UUID

Before anything is opened, the device and its IOMMU group are checked on sysfs, so that what
the user must do is said in one line: every device of the group must be bound to vfio-pci (or
to no driver), the device must have a group (an IOMMU), and iommufd needs /dev/iommu and the
device's cdev. The device is then opened in the machine's one IOMMU context (which maps guest
RAM for its DMA and tells KVM about it), reset where it supports a reset, and put on bus 0 as a
VfioPciFunction.

The backend: `backend` names it, else the machine's context decides if there is one, else
iommufd where /dev/iommu and the device's cdev exist, the legacy container otherwise (logged).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from pyvmm.uapi import vfio as uapi
from pyvmm.vfio.context import HostDevice
from pyvmm.vfio.errors import VfioError
from pyvmm.vfio.pci import VfioPciFunction
from pyvmm.vfio.sysfs import VFIO_PCI, Sysfs, SysfsError

if TYPE_CHECKING:
    from pyvmm.machine.machine import Machine

log = logging.getLogger(__name__)

MDEV_DIR = "/sys/bus/mdev/devices/"


def create(machine: Machine, host: str, backend: str | None = None) -> VfioPciFunction:
    """The function of host device `host` (a PCI address, or an mdev's sysfs path or UUID),
    opened in `machine`'s IOMMU context."""
    sysfs = Sysfs("/")
    try:
        device, cdev_exists = _host_device(sysfs, host)
    except SysfsError as err:
        raise VfioError(str(err)) from None
    chosen = _backend(machine, sysfs, device, cdev_exists, backend)
    vfio_device = machine.vfio(chosen).open(device)
    if vfio_device.info().flags & uapi.VfioDeviceFlag.RESET:
        vfio_device.reset()  # a clean device, whatever its last user left
    return VfioPciFunction(machine, vfio_device, f"vfio {device.name}")


def _host_device(sysfs: Sysfs, host: str) -> tuple[HostDevice, bool]:
    """The device as VFIO will open it, and whether its cdev node exists; SysfsError or
    VfioError saying what is wrong with it."""
    if host.startswith(MDEV_DIR) or ("/" not in host and len(host) == 36):
        mdev = sysfs.mdev(os.path.basename(host.rstrip("/")))
        if not mdev.iommu_group:
            raise VfioError(f"mdev {mdev.uuid} has no IOMMU group (is vfio-mdev loaded?)")
        return HostDevice(mdev.uuid, mdev.iommu_group, mdev.cdev), mdev.cdev_node
    if "/" in host:
        host = os.path.basename(host.rstrip("/"))  # /sys/bus/pci/devices/BDF
    pci = sysfs.pci_device(host)
    if pci.driver != VFIO_PCI:
        bound = f"bound to {pci.driver}" if pci.driver else "bound to no driver"
        raise VfioError(f"{pci.bdf} is {bound}: give it to VFIO with pyvmm vfio bind {pci.bdf}")
    if not pci.iommu_group:
        raise VfioError(f"{pci.bdf} has no IOMMU group: the host has no IOMMU (intel_iommu=on?)")
    for member in sysfs.group_members(pci.iommu_group):
        if member.bdf != pci.bdf and member.driver not in (VFIO_PCI, None):
            raise VfioError(
                f"IOMMU group {pci.iommu_group} of {pci.bdf} is not viable: {member.bdf} is bound "
                f"to {member.driver}; bind it to vfio-pci too (pyvmm vfio bind {member.bdf})"
            )
    return HostDevice(pci.bdf, pci.iommu_group, pci.cdev), pci.cdev_node


def _backend(
    machine: Machine, sysfs: Sysfs, device: HostDevice, cdev_exists: bool, backend: str | None
) -> str:
    """The backend to open `device` with: asked for, the machine's already, or the default."""
    backend = backend or machine.vfio_backend  # a machine's devices share one context
    usable = sysfs.iommufd and device.cdev is not None and cdev_exists
    if backend is None:
        backend = "iommufd" if usable else "container"
        log.info("%s: VFIO backend %s (the default here)", device.name, backend)
    elif backend == "iommufd" and not usable:
        missing = "/dev/iommu" if not sysfs.iommufd else f"VFIO cdev for {device.name}"
        raise VfioError(
            f"iommufd asked for, but there is no {missing} (the kernel needs CONFIG_IOMMUFD and "
            "CONFIG_VFIO_DEVICE_CDEV); use --vfio-backend container"
        )
    return backend
