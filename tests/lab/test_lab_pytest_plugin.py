"""pyvmm's pytest plugin's lab fixtures where they are meant to work, inside the lab: the device
on vfio-pci, mdevs made and removed, and a Linux guest running a script with the lab's NVMe
passed through to it (docs/testing.md's device test, as written there)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvmm.testing.linux import LinuxRun

MDEV_DEVICES = Path("/sys/bus/mdev/devices")
made_mdevs: list[str] = []  # (the next test checks that the fixture removed them)


@pytest.mark.lab
def test_vfio_device_is_the_labs_edu_on_vfio_pci(
    vfio_device: str, lab_devices: dict[str, str]
) -> None:
    assert vfio_device == lab_devices["edu"]
    driver = os.path.realpath(f"/sys/bus/pci/devices/{vfio_device}/driver")
    assert os.path.basename(driver) == "vfio-pci"


@pytest.mark.lab(devices=("nvme",))
def test_vfio_device_is_the_device_the_marker_asks_for(
    vfio_device: str, lab_devices: dict[str, str]
) -> None:
    assert vfio_device == lab_devices["nvme"]
    vendor = Path(f"/sys/bus/pci/devices/{vfio_device}/vendor").read_text().strip()
    assert vendor == "0x1b36"  # (QEMU's NVMe)


@pytest.mark.lab
def test_mdev_makes_mdevs(mdev: Callable[..., str]) -> None:
    first, second = mdev("mtty-2"), mdev("mtty-1")
    made_mdevs.extend([first, second])
    assert first != second
    assert (MDEV_DEVICES / first).is_dir() and (MDEV_DEVICES / second).is_dir()
    assert (MDEV_DEVICES / first / "mdev_type").resolve().name == "mtty-2"


@pytest.mark.lab
def test_the_mdevs_made_are_gone_after_their_test() -> None:
    assert made_mdevs, "test_mdev_makes_mdevs runs first"
    assert not [uuid for uuid in made_mdevs if (MDEV_DEVICES / uuid).exists()]


@pytest.mark.lab(devices=("nvme",), session="linux")
def test_linux_sees_the_nvme(linux_guest: Callable[..., LinuxRun], vfio_device: str) -> None:
    """docs/testing.md's example, as it is written there (and a script's exit status comes
    back: tests/test_pytest_plugin.py checks that protocol on the host)."""
    run = linux_guest("cat /sys/class/nvme/nvme0/model", pyvmm_args=["--vfio-pci", vfio_device])
    assert run.status == 0, run.summary()
    assert run.output.startswith("QEMU NVMe Ctrl")
