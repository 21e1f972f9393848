"""The lab's NVMe: on vfio-pci for the tests, with namespace 1 on the boot's disk image, which
the kernel's own nvme driver finds when it is given the controller. No DMA is mapped here (the
lab README: some IOVA ranges through the emulated IOMMU with the NVMe can crash QEMU 10.0)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pyvmm.lab.qemu import DEVICES
from pyvmm.vfio.sysfs import VFIO_PCI, Sysfs

pytestmark = pytest.mark.lab(devices=("nvme",))

NAMESPACE_TIMEOUT = 60.0  # the nvme driver resets the controller and scans it asynchronously


def test_the_nvme_is_on_vfio_pci(lab_devices: dict[str, str], sysfs: Sysfs) -> None:
    nvme = sysfs.pci_device(lab_devices["nvme"])
    assert (nvme.vendor, nvme.device) == (0x1B36, 0x0010)
    assert nvme.driver == VFIO_PCI
    assert nvme.iommu_group is not None and nvme.group_node
    assert nvme.cdev is not None and nvme.cdev_node


def namespaces(bdf: str) -> list[Path]:
    """The block devices of the controller's namespaces (`nvme/nvmeX/nvmeXnY` in sysfs)."""
    return sorted(Path("/sys/bus/pci/devices", bdf).glob("nvme/nvme*/nvme*n*"))


def test_the_nvme_has_namespace_1_the_size_of_its_image(
    lab_devices: dict[str, str], sysfs: Sysfs
) -> None:
    bdf = lab_devices["nvme"]
    try:
        assert sysfs.unbind(bdf).driver == "nvme"
        deadline = time.monotonic() + NAMESPACE_TIMEOUT
        while not namespaces(bdf):
            assert time.monotonic() < deadline, f"no namespace on {bdf} after {NAMESPACE_TIMEOUT} s"
            time.sleep(0.2)
        [namespace] = namespaces(bdf)
        assert (namespace / "nsid").read_text().strip() == "1"
        assert int((namespace / "size").read_text()) * 512 == DEVICES["nvme"].disk_mib << 20
        assert Path("/sys/block", namespace.name).exists()
    finally:
        assert sysfs.bind_vfio(bdf).driver == VFIO_PCI
    assert namespaces(bdf) == []
