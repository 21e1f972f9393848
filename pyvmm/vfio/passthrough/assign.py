"""Assigning a host device to a machine (device kind "vfio-pci"):

    machine.add_device("vfio-pci", host="0000:00:04.0")              # a PCI function
    machine.add_device("vfio-pci", host="/sys/bus/mdev/devices/UUID") # an mdev
    pyvmm run ... --vfio-pci 0000:00:04.0 --vfio-dev /sys/bus/mdev/devices/UUID

Before anything is opened, the device and its IOMMU group are checked on sysfs, so that what
the user must do is said in one line: the device must be bound to vfio-pci (or a variant of it),
every other device of its group to VFIO, to a driver that leaves DMA to VFIO (pci-stub, the PCIe
port driver) or to none, the device must have a group (an IOMMU), and iommufd needs /dev/iommu
and the device's cdev. The device is then opened in the machine's one IOMMU context (which maps
guest RAM for its DMA and tells KVM about it), reset where it supports a reset, and put on bus 0
as a VfioPciFunction.

The backend: `backend` names it, else the machine's context decides if there is one, else
iommufd where /dev/iommu and the device's cdev exist, the legacy container otherwise (logged).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from pyvmm.errors import ConfigError
from pyvmm.uapi import vfio as uapi
from pyvmm.vfio.context import HostDevice
from pyvmm.vfio.errors import VfioError
from pyvmm.vfio.passthrough.function import VfioPciFunction
from pyvmm.vfio.sysfs import VFIO_PCI, Sysfs, SysfsError

if TYPE_CHECKING:
    from pyvmm.vfio.context import VfioHost

log = logging.getLogger(__name__)

# The machine's IOMMU context maps (pins) every RAM region for the device's DMA.
PINS_GUEST_RAM = True

MDEV_DIR = "/sys/bus/mdev/devices/"
#: --viommu: none, hardware nesting, or behind the machine's virtio-iommu (pyvmm.board.guest_iommu)
VIOMMU_MODES = ("none", "nested", "virtio")
# Drivers that leave DMA to whoever owns the IOMMU group (the kernel's driver_managed_dma):
# another device of the group may be bound to one of these, as the kernel allows.
DMA_SAFE_DRIVERS = frozenset({"pci-stub", "pcieport"})


def _vfio_driver(driver: str | None) -> bool:
    """vfio-pci, or one of its variant drivers (mlx5_vfio_pci, ...)."""
    return driver is not None and (driver == VFIO_PCI or driver.endswith("vfio_pci"))


def create(
    machine: VfioHost,
    host: str,
    backend: str | None = None,
    hwpt: bool = False,
    viommu: str = "none",
) -> VfioPciFunction:
    """The function of host device `host` (a PCI address, or an mdev's sysfs path or UUID),
    opened in `machine`'s IOMMU context; with iommufd, attached to the guest-RAM IOAS, to an
    explicit HWPT over it (`hwpt`), to the stage 2 of hardware nesting (`viommu` "nested"), or
    behind the machine's virtio-iommu, in whatever domain the guest puts it (`viommu`
    "virtio")."""
    if viommu not in VIOMMU_MODES:
        raise ConfigError(f"--viommu {viommu}: use {', '.join(VIOMMU_MODES)}")
    if hwpt and viommu != "none":
        raise ConfigError(f"--hwpt and --viommu {viommu} each choose the page table: give one")
    sysfs = Sysfs("/")
    try:
        device, cdev_exists = host_device(sysfs, host)
    except SysfsError as err:
        raise VfioError(str(err)) from None
    chosen = _backend(machine, sysfs, device, cdev_exists, backend)
    if (hwpt or viommu != "none") and chosen != "iommufd":
        option = "--hwpt" if hwpt else f"--viommu {viommu}"
        raise VfioError(
            f"{device.name}: {option} needs the iommufd backend (--vfio-backend iommufd)"
        )
    if (hwpt or viommu != "none") and device.mdev:
        raise VfioError(
            f"mdev {device.name}: --hwpt and --viommu are for devices behind an IOMMU; an mdev's "
            "DMA is its parent driver's"
        )
    context = machine.vfio(chosen)
    vfio_device = context.open(device)
    on_plugged = None
    try:
        if hwpt or viommu != "none":
            from pyvmm.vfio.iommufd.backend import IommufdContext  # only iommufd has them

            assert isinstance(context, IommufdContext)
            if hwpt:
                context.use_hwpt(device.name)
            elif viommu == "virtio":
                guest_iommu = machine.guest_iommu()
                binding = context.bindings[device.name]
                on_plugged = functools.partial(guest_iommu.add_endpoint, binding)
            else:
                nesting = context.nest(device.name)
                binding = context.bindings[device.name]
                on_plugged = functools.partial(nesting.identify, binding)  # virt_id: devfn
        if vfio_device.info().flags & uapi.VfioDeviceFlag.RESET:
            vfio_device.reset()  # a clean device, whatever its last user left
        return VfioPciFunction(
            machine,
            vfio_device,
            f"vfio {device.name}",
            release=lambda: context.release(device.name),
            on_plugged=on_plugged,
            migration=context.migrations.add(vfio_device, dma_by_iova=viommu == "virtio"),
        )
    except OSError as err:  # out of eventfds, say
        context.release(device.name)
        raise VfioError(f"{device.name}: cannot be set up: {err.strerror or err}") from None
    except BaseException:
        context.release(device.name)
        raise


def _is_mdev(host: str) -> bool:
    """A UUID, or a sysfs path of an mdev (under /sys/bus/mdev/devices or its real place)."""
    if host.startswith(MDEV_DIR):
        return True
    if "/" not in host:
        return len(host) == 36 and host.count("-") == 4
    return Path(host, "subsystem").resolve().name == "mdev"


def host_device(sysfs: Sysfs, host: str) -> tuple[HostDevice, bool]:
    """The device as VFIO will open it, and whether its cdev node exists; SysfsError or
    VfioError saying what is wrong with it."""
    if _is_mdev(host):
        mdev = sysfs.mdev(os.path.basename(host.rstrip("/")))
        if not mdev.iommu_group:
            raise VfioError(f"mdev {mdev.uuid} has no IOMMU group (is vfio-mdev loaded?)")
        return HostDevice(mdev.uuid, mdev.iommu_group, mdev.cdev, mdev=True), mdev.cdev_node
    if "/" in host:
        host = os.path.basename(host.rstrip("/"))  # /sys/bus/pci/devices/BDF
    pci = sysfs.pci_device(host)
    if not _vfio_driver(pci.driver):
        bound = f"bound to {pci.driver}" if pci.driver else "bound to no driver"
        raise VfioError(f"{pci.bdf} is {bound}: give it to VFIO with pyvmm vfio bind {pci.bdf}")
    if not pci.iommu_group:
        raise VfioError(f"{pci.bdf} has no IOMMU group: the host has no IOMMU (intel_iommu=on?)")
    for member in sysfs.group_members(pci.iommu_group):
        driver = member.driver
        if member.bdf != pci.bdf and driver not in DMA_SAFE_DRIVERS | {None}:
            if _vfio_driver(driver):
                continue
            raise VfioError(
                f"IOMMU group {pci.iommu_group} of {pci.bdf} is not viable: {member.bdf} is bound "
                f"to {member.driver}; bind it to vfio-pci too (pyvmm vfio bind {member.bdf})"
            )
    return HostDevice(pci.bdf, pci.iommu_group, pci.cdev), pci.cdev_node


def _backend(
    machine: VfioHost, sysfs: Sysfs, device: HostDevice, cdev_exists: bool, backend: str | None
) -> str:
    """The backend to open `device` with: asked for, the machine's already, or the default
    (said in one log line)."""
    chosen = backend or machine.vfio_backend  # a machine's devices share one context
    usable = sysfs.iommufd and device.cdev is not None and cdev_exists
    if chosen is None:
        chosen = "iommufd" if usable else "container"
        log.warning("%s: VFIO backend %s (the default here; --vfio-backend to choose)",
                    device.name, chosen)  # fmt: skip
    elif chosen == "iommufd" and not usable:
        why = "asked for" if backend else "the backend of this machine's other devices"
        missing = "/dev/iommu" if not sysfs.iommufd else f"VFIO cdev for {device.name}"
        raise VfioError(
            f"iommufd ({why}), but there is no {missing} (the kernel needs CONFIG_IOMMUFD and "
            "CONFIG_VFIO_DEVICE_CDEV); use --vfio-backend container"
        )
    return chosen
