"""`pyvmm vfio` against the real sysfs of the lab kernel."""

from __future__ import annotations

import pytest

from pyvmm.cli import main
from pyvmm.vfio.sysfs import Sysfs

pytestmark = pytest.mark.lab


def run_cli(*argv: str) -> int:
    """`pyvmm vfio ARGV...`, in this process (so capsys sees its output)."""
    return main(["vfio", *argv])


def test_list_shows_edu_on_vfio_pci(
    lab_devices: dict[str, str], sysfs: Sysfs, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("list") == 0
    out = capsys.readouterr().out
    edu = sysfs.pci_device(lab_devices["edu"])
    row = next(line for line in out.splitlines() if line.startswith(edu.bdf))
    assert "1234:11e8" in row
    assert "vfio-pci" in row
    assert f"/dev/vfio/{edu.iommu_group}" in row
    assert f"/dev/vfio/devices/{edu.cdev}" in row
    assert "/dev/iommu (iommufd): present" in out


@pytest.mark.lab(devices=("nvme",))
def test_unbind_and_bind_a_device_with_a_kernel_driver(
    lab_devices: dict[str, str], sysfs: Sysfs, capsys: pytest.CaptureFixture[str]
) -> None:
    bdf = lab_devices["nvme"]
    assert run_cli("unbind", bdf) == 0
    assert sysfs.pci_device(bdf).driver == "nvme"
    assert run_cli("bind", bdf) == 0
    assert sysfs.pci_device(bdf).driver == "vfio-pci"
    assert f"{bdf}: vfio-pci" in capsys.readouterr().out


def test_bind_of_a_missing_device_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("bind", "0000:00:1e.7") == 1
    err = capsys.readouterr().err
    assert err == "pyvmm vfio: no PCI device 0000:00:1e.7\n"


@pytest.mark.parametrize("backend", ["iommufd", "container"])
def test_info_shows_regions_and_irqs_through_either_backend(
    lab_devices: dict[str, str], capsys: pytest.CaptureFixture[str], backend: str
) -> None:
    assert run_cli("info", lab_devices["edu"], "--backend", backend) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{lab_devices['edu']} through {backend}: pci\n")
    bar0 = next(line for line in out.splitlines() if line.startswith("0 "))
    assert bar0.split() == ["0", "BAR0", "0x100000", "read,write,mmap", "0x0+0x100000", "-"]
    config = next(line for line in out.splitlines() if line.startswith("7 "))
    assert config.split()[:5] == ["7", "CONFIG", "0x100", "read,write", "-"]  # conventional PCI
    intx = next(line for line in out.splitlines() if line.startswith("0 ") and "INTx" in line)
    assert intx.split() == ["0", "INTx", "1", "eventfd,maskable,automasked"]
    assert "usable IOVA ranges: 0x0-" in out


def test_info_of_a_device_not_on_vfio_is_one_line(
    lab_devices: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("info", "0000:00:00.0") == 1  # the host bridge: no VFIO group node
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pyvmm vfio: ")
