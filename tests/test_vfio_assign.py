"""What pyvmm checks before it opens a device for assignment, against a fake sysfs tree: the
device, its driver, its IOMMU group's other devices, and what each backend needs. Each refusal
is one line saying what to do (the lab runs the real thing)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakesysfs import FakeTree

from pyvmm.vfio.errors import VfioError
from pyvmm.vfio.passthrough import assign
from pyvmm.vfio.sysfs import NoSuchDevice, Sysfs

EDU, NIC, BRIDGE = "0000:00:04.0", "0000:00:05.0", "0000:00:06.0"


class FakeVfioHost:
    """What the backend choice asks of the machine: the backend its IOMMU context has, if any."""

    def __init__(self, backend: str | None = None) -> None:
        self.vfio_backend = backend


@pytest.fixture
def tree(tmp_path: Path) -> FakeTree:
    tree = FakeTree(tmp_path)
    for bdf, driver, group in ((EDU, "vfio-pci", "5"), (NIC, "e1000e", "6"), (BRIDGE, None, "5")):
        path = tree.device(bdf, (0x1234, 0x11E8), driver=driver, group=group)
        members = tmp_path / "sys/kernel/iommu_groups" / group / "devices"
        members.mkdir(parents=True, exist_ok=True)
        (members / bdf).symlink_to(path)
    (tree.pci / "devices" / EDU / "vfio-dev/vfio0").mkdir(parents=True)
    (tmp_path / "dev/vfio/devices/vfio0").touch()
    return tree


def host(tree: FakeTree, name: str):
    return assign.host_device(Sysfs(tree.root), name)


def test_a_device_bound_to_vfio_pci_is_described_for_its_backend(tree: FakeTree) -> None:
    device, cdev_exists = host(tree, "00:04.0")
    assert (device.name, device.iommu_group, device.cdev, cdev_exists) == (EDU, "5", "vfio0", True)
    assert host(tree, f"/sys/bus/pci/devices/{EDU}")[0] == device


def test_refusals_say_what_to_do(tree: FakeTree) -> None:
    with pytest.raises(NoSuchDevice, match=r"no PCI device 0000:00:1f\.7"):
        host(tree, "00:1f.7")
    with pytest.raises(VfioError, match=rf"^{NIC} is bound to e1000e: give it to VFIO with "):
        host(tree, NIC)
    (tree.pci / "devices" / BRIDGE / "driver").symlink_to(tree.driver("pcieport"))
    assert host(tree, EDU)[0].name == EDU  # a PCIe port leaves DMA to VFIO: the kernel allows it
    (tree.pci / "devices" / BRIDGE / "driver").unlink()
    (tree.pci / "devices" / BRIDGE / "driver").symlink_to(tree.driver("snd_hda_intel"))
    with pytest.raises(
        VfioError,
        match=rf"IOMMU group 5 of {EDU} is not viable: {BRIDGE} is bound to snd_hda_intel; bind",
    ):
        host(tree, EDU)
    lonely = tree.device("0000:00:07.0", (1, 2), driver="vfio-pci")
    assert lonely.exists()
    with pytest.raises(VfioError, match="has no IOMMU group: the host has no IOMMU"):
        host(tree, "0000:00:07.0")


def test_the_backend_is_the_machines_or_what_the_host_and_device_allow(tree: FakeTree) -> None:
    sysfs = Sysfs(tree.root)
    device, cdev = host(tree, EDU)
    assert assign._backend(FakeVfioHost(), sysfs, device, cdev, None) == "container"  # no iommufd
    (tree.root / "dev/iommu").touch()
    assert assign._backend(FakeVfioHost(), sysfs, device, cdev, None) == "iommufd"
    assert assign._backend(FakeVfioHost("container"), sysfs, device, cdev, None) == "container"
    assert assign._backend(FakeVfioHost(), sysfs, device, False, "container") == "container"
    with pytest.raises(
        VfioError, match=rf"iommufd \(asked for\), but there is no VFIO cdev for {EDU}"
    ):
        assign._backend(FakeVfioHost(), sysfs, device, False, "iommufd")
    with pytest.raises(VfioError, match=r"iommufd \(the backend of this machine's other devices\)"):
        assign._backend(FakeVfioHost("iommufd"), sysfs, device, False, None)
    (tree.root / "dev/iommu").unlink()
    with pytest.raises(
        VfioError, match=r"there is no /dev/iommu \(the kernel needs CONFIG_IOMMUFD"
    ):
        assign._backend(FakeVfioHost(), sysfs, device, cdev, "iommufd")
