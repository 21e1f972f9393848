"""The KVM-VFIO pseudo device against a real kernel: KVM learns about VFIO group and cdev fds."""

from __future__ import annotations

import os

import pytest

from pyvmm.kvm.system import System
from pyvmm.uapi.ioctl import IoctlError
from pyvmm.vfio.sysfs import Sysfs

pytestmark = pytest.mark.lab


@pytest.mark.parametrize("kind", ["group", "cdev"])
def test_vfio_file_add_and_del(lab_devices: dict[str, str], sysfs: Sysfs, kind: str) -> None:
    edu = sysfs.pci_device(lab_devices["edu"])
    nodes = {"group": f"/dev/vfio/{edu.iommu_group}", "cdev": f"/dev/vfio/devices/{edu.cdev}"}
    path = nodes[kind]
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        with System() as kvm, kvm.create_vm() as vm:
            vm.vfio_device.add(fd)
            vm.vfio_device.remove(fd)
            with pytest.raises(IoctlError, match="KVM_SET_DEVICE_ATTR"):
                vm.vfio_device.remove(fd)  # no longer known: the kernel says so
            kvm_fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
            try:
                with pytest.raises(IoctlError, match="KVM_SET_DEVICE_ATTR"):
                    vm.vfio_device.add(kvm_fd)  # not a VFIO file
            finally:
                os.close(kvm_fd)
    finally:
        os.close(fd)
